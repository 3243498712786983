"""The API under two fuzzers over real HTTP (`benchmarks/api_fuzz.py`, CI size): schemathesis from
our own OpenAPI schema (valid and invalid inputs, stateful chains) and a byte-level fuzz of JSON
bodies. Every request is answered within 30 s, never with a 5xx, always as documented."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.api_fuzz import local_gateway, run_byte_fuzz, run_schemathesis


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with local_gateway() as served:
        yield served


def test_schemathesis_finds_no_server_error_hang_or_undocumented_answer(url: str, tmp_path: Path) -> None:
    """Catches any input that crashes a handler (500), hangs past 30 s, or gets a status, content
    type or body the schema does not document; schemathesis' exit status is its verdict."""
    report = run_schemathesis(url, max_examples=30, seed=1, report_dir=tmp_path)
    print(json.dumps(report.__dict__)[:2000])
    assert report.exit_code == 0, "\n".join(report.failures)
    assert report.num_requests > 500  # it really ran: every phase, both modes
    assert {"200", "400"} <= set(report.statuses)
    assert report.num_server_errors == 0 and report.num_over_limit == 0


def test_byte_level_fuzz_finds_no_server_error_or_hang(url: str) -> None:
    """Catches bodies that break the parser or a validator into a 5xx, a non-JSON answer, or a
    request that never ends: mutated JSON, lone surrogates, huge numbers, nesting bombs."""
    report = run_byte_fuzz(url, num_examples=300, seed=1)
    print(json.dumps(report.__dict__)[:2000])
    assert report.num_requests == 300
    assert report.num_server_errors == 0 and report.num_over_limit == 0, report.failures
    assert not report.failures
    assert {"200", "400"} <= set(report.statuses)
