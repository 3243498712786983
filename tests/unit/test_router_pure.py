"""The router's decision core stays pure (the pure-logic import contract in pyproject.toml lists
the older router modules; these two are checked here until it lists them too)."""

from __future__ import annotations

import subprocess
import sys


def test_the_router_core_and_peer_loads_import_neither_ray_nor_torch() -> None:
    """Catches Ray or torch creeping into the code the replay simulates and every gateway runs
    (`router.router_core`, `router.peer_loads`): it must stay fast to test exactly, with no cluster."""
    code = (
        "import sys, router.router_core, router.peer_loads; "
        "print(sorted(m for m in ('ray', 'torch', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
