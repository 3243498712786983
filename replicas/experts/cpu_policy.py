"""CPU scheduling of expert-shard processes: they are batch workers, not interactive ones.

A dispatcher sends one message per shard per MoE layer. Under the default policy (SCHED_OTHER) the
first shard woken by its message preempts the dispatcher on a shared core while it is still
sending to the others, so the fan-out itself stretches by a shard's compute per message
(`benchmarks/NOTES.md`: 4x longer with 4 shards on 2 cores). SCHED_BATCH keeps
the shard's fair share of CPU but lets it not preempt on wake-up: the caller finishes its fan-out,
then the shards run. Where shards have cores of their own (a GPU node) the policy changes nothing.
"""

from __future__ import annotations

import os
import sys


def run_as_batch_worker() -> int:
    """Puts every thread of this process under SCHED_BATCH (threads started later inherit it from
    their creator); returns how many threads changed. Linux only; elsewhere a no-op returning 0."""
    if not sys.platform.startswith("linux"):
        return 0
    changed = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setscheduler(int(tid), os.SCHED_BATCH, os.sched_param(0))
        except (ProcessLookupError, PermissionError):  # a thread that just ended; a locked-down host
            continue
        changed += 1
    return changed
