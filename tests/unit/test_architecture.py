"""Architecture rules that import-linter cannot state (it sees packages, not Ray's private names):
each private or alpha Ray API is touched by exactly one adapter file, found by reading the syntax
tree of every product module (docstrings and comments do not count)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ["protocol", "mimo", "observability", "replicas", "router", "gateway", "cluster", "training"]
PRIVATE_NAMES = {"_set_request_context", "_with_ingress_request_router", "_replica", "_reserve"}


def _uses(path: Path) -> set[str]:
    """Private Ray modules imported, private names touched and alpha modules imported in a file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        else:
            modules = []
        found.update(
            m for m in modules if m.startswith("ray.") and ("._private" in m or "request_router" in m)
        )
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE_NAMES:
            found.add(node.attr)
        if isinstance(node, ast.keyword) and node.arg in PRIVATE_NAMES:
            found.add(node.arg)
    return found


def _product_files() -> list[Path]:
    return sorted(p for package in PRODUCT for p in (ROOT / package).rglob("*.py"))


def test_each_private_or_alpha_ray_api_has_one_adapter_file() -> None:
    """Catches a private Serve API (or the alpha RequestRouter) used outside its adapter, where a
    Ray upgrade would break it silently."""
    users = {str(p.relative_to(ROOT)): u for p in _product_files() if (u := _uses(p))}
    alpha = {f for f, u in users.items() if any(m.startswith("ray.serve.request_router") for m in u)}
    private = {f for f, u in users.items() if any(not m.startswith("ray.serve.request_router") for m in u)}
    assert private == {"cluster/serving/ray_private.py"}, users
    assert alpha == {"router/serve_adapter.py"}, users


def test_the_scan_sees_a_private_use() -> None:
    """Catches a scan that would pass anything (the rule above must be able to fail)."""
    probe = ROOT / "cluster" / "serving" / "ray_private.py"
    assert {"ray.serve._private.api", "_set_request_context", "_replica", "_reserve"} <= _uses(probe)
