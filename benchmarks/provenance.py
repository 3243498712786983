"""Where a benchmark result came from, recorded in its JSON: the commit (and whether the tree held
uncommitted changes, file by file), the versions of what ran, and the host's cores and load."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ray", "torch", "deepspeed", "fastapi", "openai", "transformers")


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def provenance() -> dict[str, Any]:
    """Commit, uncommitted files (`git status --porcelain`), versions, cores and load average now."""
    return {
        "commit": _git("rev-parse", "HEAD"),
        "dirty_files": _git("status", "--porcelain").splitlines(),
        "python": platform.python_version(),
        "versions": {p: v for p in PACKAGES if (v := _version(p)) is not None},
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
