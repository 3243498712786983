"""Benchmark JSON provenance (`benchmarks/provenance.py`): a result names the commit it ran at."""

from __future__ import annotations

import re

from benchmarks.provenance import provenance


def test_provenance_names_the_commit_versions_and_host() -> None:
    """Catches a result that cannot be traced to a commit, or that hides versions and load."""
    source = provenance()
    assert re.fullmatch(r"[0-9a-f]{40}", source["commit"])
    assert isinstance(source["dirty_files"], list)
    assert {"ray", "torch"} <= set(source["versions"])
    assert source["cpus"] >= 1 and len(source["load_average"]) == 3
