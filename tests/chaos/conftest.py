"""Fixtures of the chaos suite. Each test module starts a Ray cluster of its own (`cluster.py`):
its faults (a worker node killed, the GCS restarted on an external Redis) break or need a cluster
shaped for them, so the session cluster of tests/integration is not reused; token auth and the
loopback binding come from tests/conftest.py as for every Ray test."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.cluster import KEY

pytest.importorskip("ray")


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("chaos-keys") / "api-keys"
    path.write_text(f"{KEY}\n")
    return path
