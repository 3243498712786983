"""The Grafana dashboards in `observability/dashboards/` and every PromQL query in them.

`dashboard_exprs()` lists (dashboard, panel title, expr) for the live Prometheus test to execute;
`metric_names(expr)` parses an expression with a small recursive-descent PromQL parser (the subset
dashboards use: selectors, ranges, functions, aggregations with by/without, binary operators with
bool/on/ignoring/group_*) and returns the metric names it reads, so a test can hold every name to
the catalog's exported names. A syntax error raises `PromQLError` naming the position.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DASHBOARDS = Path(__file__).resolve().parent / "dashboards"

AGGREGATIONS = {"sum", "avg", "min", "max", "count", "stddev", "stdvar", "group", "topk", "bottomk", "quantile", "count_values"}  # fmt: skip
FUNCTIONS = {
    "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile", "abs", "ceil", "floor",
    "round", "clamp", "clamp_min", "clamp_max", "time", "timestamp", "vector", "scalar", "absent", "sort",
    "sort_desc", "label_replace", "avg_over_time", "max_over_time", "min_over_time", "sum_over_time",
    "count_over_time", "last_over_time", "exp", "ln", "log2", "log10", "sqrt", "resets", "changes",
}  # fmt: skip
BINARY_OPS = {"+", "-", "*", "/", "%", "^", "==", "!=", ">", "<", ">=", "<=", "and", "or", "unless"}
_TOKEN = re.compile(
    r"\s*(?:(?P<dur>\d+(?:ms|s|m|h|d|w|y))(?![a-zA-Z0-9_])|(?P<num>\d+(?:\.\d+)?(?:e[+-]?\d+)?)(?![a-zA-Z0-9_.])"
    r"|(?P<str>\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*')|(?P<id>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r"|(?P<op>==|!=|>=|<=|=~|!~|[-+*/%^<>=(){}\[\],]))"
)


class PromQLError(ValueError):
    """An expression the parser cannot read; the message gives the position and what it expected."""


def _tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        if expr[pos:].strip() == "":
            break
        m = _TOKEN.match(expr, pos)
        if m is None or m.end() == pos:
            raise PromQLError(f"unexpected character at {pos}: {expr[pos : pos + 10]!r}")
        kind = m.lastgroup
        assert kind is not None
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


class _Parser:
    def __init__(self, expr: str) -> None:
        self.toks = _tokens(expr)
        self.i = 0
        self.metrics: list[str] = []

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, value: str | None = None, kind: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (value is not None and tok[1] != value) or (kind is not None and tok[0] != kind):
            want = value or kind
            raise PromQLError(f"token {self.i}: expected {want!r}, got {tok[1] if tok else 'end'!r}")
        self.i += 1
        return tok[1]

    def parse(self) -> list[str]:
        self.expr()
        if self.peek() is not None:
            raise PromQLError(f"token {self.i}: unexpected {self.peek()[1]!r} after a complete expression")  # type: ignore[index]
        return self.metrics

    def expr(self) -> None:
        self.unary()
        while (tok := self.peek()) is not None and tok[1] in BINARY_OPS:
            self.i += 1
            if (nxt := self.peek()) is not None and nxt[1] == "bool":
                self.i += 1
            if (nxt := self.peek()) is not None and nxt[1] in ("on", "ignoring"):
                self.i += 1
                self.labels()
                if (nxt := self.peek()) is not None and nxt[1] in ("group_left", "group_right"):
                    self.i += 1
                    if (p := self.peek()) is not None and p[1] == "(":
                        self.labels()
            self.unary()

    def unary(self) -> None:
        if (tok := self.peek()) is not None and tok[1] in ("-", "+"):
            self.i += 1
        self.primary()

    def labels(self) -> None:
        self.take("(")
        while (tok := self.peek()) is not None and tok[1] != ")":
            self.take(kind="id")
            if (tok := self.peek()) is not None and tok[1] == ",":
                self.i += 1
        self.take(")")

    def args(self) -> None:
        self.take("(")
        while (tok := self.peek()) is not None and tok[1] != ")":
            self.expr()
            if (tok := self.peek()) is not None and tok[1] == ",":
                self.i += 1
        self.take(")")

    def primary(self) -> None:
        tok = self.peek()
        if tok is None:
            raise PromQLError("unexpected end of expression")
        kind, value = tok
        if kind in ("num", "str"):
            self.i += 1
        elif value == "(":
            self.i += 1
            self.expr()
            self.take(")")
        elif kind == "id" and value in AGGREGATIONS:
            self.i += 1
            if (t := self.peek()) is not None and t[1] in ("by", "without"):
                self.i += 1
                self.labels()
            self.args()
            if (t := self.peek()) is not None and t[1] in ("by", "without"):
                self.i += 1
                self.labels()
        elif (
            kind == "id"
            and value in FUNCTIONS
            and (n := self.toks[self.i + 1 : self.i + 2])
            and n[0][1] == "("
        ):
            self.i += 1
            self.args()
        elif kind == "id":
            self.i += 1
            self.metrics.append(value)
            self.selector_rest()
        else:
            raise PromQLError(f"token {self.i}: unexpected {value!r}")
        self.range_and_offset()

    def selector_rest(self) -> None:
        if (tok := self.peek()) is not None and tok[1] == "{":
            self.i += 1
            while (tok := self.peek()) is not None and tok[1] != "}":
                self.take(kind="id")
                op = self.take()
                if op not in ("=", "!=", "=~", "!~"):
                    raise PromQLError(f"token {self.i}: bad label matcher {op!r}")
                self.take(kind="str")
                if (tok := self.peek()) is not None and tok[1] == ",":
                    self.i += 1
            self.take("}")

    def range_and_offset(self) -> None:
        if (tok := self.peek()) is not None and tok[1] == "[":
            self.i += 1
            self.take(kind="dur")
            if (tok := self.peek()) is not None and tok[1] == ":":
                raise PromQLError("subqueries are not supported here")
            self.take("]")
        if (tok := self.peek()) is not None and tok[1] == "offset":
            self.i += 1
            self.take(kind="dur")


def metric_names(expr: str) -> list[str]:
    """Metric names `expr` reads, in order; raises PromQLError if it does not parse."""
    return _Parser(expr).parse()


def load_dashboards(directory: Path = DASHBOARDS) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))}


def _panels(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in node.get("panels", []):
        yield panel
        yield from _panels(panel)  # rows nest their panels


def dashboard_exprs(directory: Path = DASHBOARDS) -> list[tuple[str, str, str]]:
    """(dashboard file stem, panel title, PromQL expr) for every target of every panel."""
    return [
        (name, panel.get("title", ""), target["expr"])
        for name, board in load_dashboards(directory).items()
        for panel in _panels(board)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
