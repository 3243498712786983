"""router/recent_routes.py: the load a direct-streaming router adds to a replica's last report."""

from __future__ import annotations

import pytest

from router.recent_routes import RecentRoutes


def test_counts_only_routings_after_the_report_and_within_the_horizon() -> None:
    """Catches counting requests the report already includes (double load: sessions pushed off
    their cache) or never forgetting old ones (a replica's load only grows, as when nothing ends)."""
    routes = RecentRoutes(horizon_s=10.0)
    for t in (1.0, 2.0, 3.0, 4.0):
        routes.note("a", t)
    routes.note("b", 3.5)
    assert routes.count_since("a", since=2.5, now=4.0) == 2  # the report arrived at 2.5
    assert routes.count_since("a", since=None, now=4.0) == 4  # no report yet: all of them
    assert routes.count_since("a", since=None, now=12.5) == 2  # 1.0 and 2.0 are past the horizon
    assert routes.count_since("b", since=3.0, now=4.0) == 1
    assert routes.count_since("c", since=None, now=4.0) == 0


def test_retain_forgets_replicas_that_are_gone() -> None:
    routes = RecentRoutes(horizon_s=10.0)
    routes.note("a", 1.0)
    routes.note("b", 1.0)
    routes.retain(["b"])
    assert routes.count_since("a", None, 2.0) == 0
    assert routes.count_since("b", None, 2.0) == 1


def test_horizon_must_be_positive() -> None:
    with pytest.raises(ValueError, match="horizon_s"):
        RecentRoutes(0.0)
