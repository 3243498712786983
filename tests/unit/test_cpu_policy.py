"""Expert-shard processes run under SCHED_BATCH: every thread, including those started before and
after the switch (checked in a child process so the test runner keeps its own policy)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import os, threading
from replicas.experts.cpu_policy import run_as_batch_worker

def policies():
    return {int(t): os.sched_getscheduler(int(t)) for t in os.listdir("/proc/self/task")}

stop = threading.Event()
before = threading.Thread(target=stop.wait)
before.start()
assert set(policies().values()) == {os.SCHED_OTHER}
changed = run_as_batch_worker()
after = threading.Thread(target=stop.wait)
after.start()
seen = policies()
stop.set()
print(changed, len(seen), sorted(set(seen.values())) == [os.SCHED_BATCH])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_BATCH is Linux's")
def test_every_thread_becomes_a_batch_worker() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    changed, num_threads, all_batch = out.stdout.split()
    assert int(changed) >= 2  # the main thread and the one started before
    assert int(num_threads) >= 3
    assert all_batch == "True"
