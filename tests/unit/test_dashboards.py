"""Grafana dashboards (observability/dashboards/*.json): every PromQL query parses and reads only
metrics the catalog exports under exactly that name; the live Prometheus test executes them."""

from __future__ import annotations

import pytest

from observability.catalog import BY_SERIES, CATALOG, Kind
from observability.dashboards import PromQLError, dashboard_exprs, load_dashboards, metric_names


def test_every_dashboard_query_parses_and_uses_exported_catalog_names() -> None:
    """Catches a dashboard query with a typo'd or renamed metric (e.g. `mimo:...` or a counter
    without `_total`, which Ray never exports), or broken PromQL, that would chart nothing."""
    boards = load_dashboards()
    assert sorted(boards) == ["capacity", "experts", "overview", "router"]
    exprs = dashboard_exprs()
    assert len(exprs) == 36
    used: set[str] = set()
    for board, title, expr in exprs:
        names = metric_names(expr)
        assert names, f"{board}/{title}: {expr} reads no metric"
        unknown = [n for n in names if n not in BY_SERIES]
        assert unknown == [], f"{board}/{title}: {unknown} not exported by any catalog metric"
        used.update(BY_SERIES[n].name for n in names)
    # every catalog metric is charted somewhere, so nothing is recorded for no one
    assert used == {m.name for m in CATALOG}
    heatmaps = [p for p in boards["experts"]["panels"] if p["type"] == "heatmap"]
    assert [metric_names(t["expr"]) for p in heatmaps for t in p["targets"]] == [
        ["ray_mimo_expert_tokens_total"]
    ]


def test_histograms_are_read_through_buckets_and_counters_through_rates() -> None:
    """Catches quantiles taken over `_sum`/`_count` or a raw counter charted as if it were a rate
    (a line that only grows)."""
    for board, title, expr in dashboard_exprs():
        for name in metric_names(expr):
            kind = BY_SERIES[name].kind
            if kind is Kind.COUNTER:
                assert "rate(" in expr or "increase(" in expr, f"{board}/{title}: raw counter {name}"
            if kind is Kind.HISTOGRAM:
                assert name.endswith("_bucket") and "histogram_quantile(" in expr, f"{board}/{title}"


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (le) (rate(a_bucket{x="1", y=~"b.*"}[5m]))', ["a_bucket"]),
        ("1 + sum(rate(a[1m])) / on (r) group_left max(b) > bool 0", ["a", "b"]),
        ("histogram_quantile(0.9, sum without (w) (rate(h_bucket[30s] offset 1h)))", ["h_bucket"]),
        ("max(timestamp(up))", ["up"]),
    ],
)
def test_promql_parser_accepts_valid_queries(expr: str, names: list[str]) -> None:
    """Catches the checker rejecting PromQL the dashboards may legitimately use."""
    assert metric_names(expr) == names


@pytest.mark.parametrize(
    "expr", ["sum(rate(a[5m])", "rate(a[5x])", 'a{b="c"', "sum by le (a)", "a +", "a{b=c}", "a b"]
)
def test_promql_parser_rejects_broken_queries(expr: str) -> None:
    """Catches a checker so lenient that broken dashboard queries would pass the unit test."""
    with pytest.raises(PromQLError):
        metric_names(expr)
