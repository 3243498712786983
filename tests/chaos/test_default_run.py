"""The chaos suite's slice of the default test run (CI's budget: about two minutes): one cluster
of three raylets, a 15 s overload surge at ~10x capacity, then a worker node SIGKILLed under
steady streaming load. The longer versions, the GCS restart and KV exhaustion are `slow`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.test_node_loss import LAYOUT, check_node_loss, lose_the_victim, victim_cluster
from tests.chaos.test_overload import OVERLOAD_SPEC, check_overload, surge

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def served(keys_file: Path) -> Iterator[Any]:
    with victim_cluster(keys_file, **OVERLOAD_SPEC) as served:
        yield served


def test_a_short_surge_is_served_or_refused_in_bounded_time(served: Any) -> None:
    """Catches queues that grow without bound under overload (first tokens after minutes, refusals
    late, without Retry-After or not in the API's error format) and a cluster slow after the surge."""
    _, _, app = served
    check_overload(surge(app, 15, "overload_short", LAYOUT))


def test_a_lost_worker_node_loses_no_request_and_the_cluster_serves_again(served: Any) -> None:
    """Catches node loss that hangs requests, fails them with a non-retriable error, or leaves the
    cluster unable to serve: Serve must restart the attention replica and Ray the expert shard (its
    placement group bundle rescheduled) on the spare node."""
    cluster, victim, app = served
    check_node_loss(lose_the_victim(cluster, victim, app, 5, 4, "node_loss_short"))
