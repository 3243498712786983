"""`benchmarks/results/chaos.json`: one entry per fault, merged into the file a run finds (a run of
one test replaces that test's entry only). Each entry carries what it was measured on: git commit,
Ray/torch/Python versions, time, the spec (the fields the test set) and the cluster's layout."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(os.environ.get("MIMO_CHAOS_RESULTS", ROOT / "benchmarks" / "results" / "chaos.json"))


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict[str, Any]:
    import ray
    import torch

    return {
        "commit": _commit(),
        "ray": ray.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def record_fault(name: str, summary: dict[str, Any], spec: dict[str, Any], **context: Any) -> dict[str, Any]:
    """Writes (or replaces) the entry `name` of chaos.json; returns the entry."""
    entry = {**summary, "context": context, "spec": spec, "env": environment()}
    data: dict[str, Any] = {}
    if RESULTS.exists():
        try:
            data = json.loads(RESULTS.read_text())
        except json.JSONDecodeError:
            data = {}
    faults = data.setdefault("faults", {})
    faults[name] = entry
    data["about"] = (
        "tests/chaos: faults on the served cluster under steady streaming load; per fault the "
        "requests sent, completed, retried, failed retriably (429/503 or a retriable stream error), "
        "failed otherwise, lost (must be 0) and the seconds from the fault to the first success"
    )
    data["faults"] = dict(sorted(faults.items()))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")
    return entry
