"""A circuit breaker per attention replica: `failures_to_open` failures within `window_s` open a
replica's breaker, and no request is sent to it for `cooldown_s`; after that it takes requests
again on probation (for another `window_s`), where a single failure opens it again at once.
Pure logic (no Ray): the gateway's request router (`cluster/serving/request_router.py`) feeds it
the failures Serve reports per replica and routes only among the replicas it allows.

Failures are counted in a window rather than strictly in a row because Serve tells the router of a
request's end before it tells it of a failure, so "success" is not a signal it can trust."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BreakerConfig:
    failures_to_open: int = 3
    window_s: float = 30.0
    cooldown_s: float = 10.0

    def __post_init__(self) -> None:
        assert self.failures_to_open >= 1 and self.window_s > 0 and self.cooldown_s > 0


@dataclass
class _Replica:
    failures_s: list[float] = field(default_factory=list)  # times of recent failures
    open_until_s: float = 0.0  # not sent to before this
    probation_until_s: float = 0.0  # one failure before this opens the breaker again


@dataclass
class CircuitBreaker:
    config: BreakerConfig = BreakerConfig()
    _replicas: dict[str, _Replica] = field(default_factory=dict)

    def allows(self, replica_id: str, now_s: float) -> bool:
        r = self._replicas.get(replica_id)
        return r is None or now_s >= r.open_until_s

    def allowed(self, replica_ids: Iterable[str], now_s: float) -> list[str]:
        """The replicas a request may go to; all of them when every breaker is open (refusing
        everything would turn a partial failure into a full outage)."""
        ids = list(replica_ids)
        return [i for i in ids if self.allows(i, now_s)] or ids

    def on_failure(self, replica_id: str, now_s: float) -> bool:
        """Counts a failure of `replica_id`; True when this failure opened its breaker."""
        c = self.config
        r = self._replicas.setdefault(replica_id, _Replica())
        if now_s < r.open_until_s:
            return False  # already open: a request sent before it opened
        r.failures_s = [t for t in r.failures_s if now_s - t < c.window_s] + [now_s]
        if len(r.failures_s) < c.failures_to_open and now_s >= r.probation_until_s:
            return False
        r.failures_s = []
        r.open_until_s = now_s + c.cooldown_s
        r.probation_until_s = r.open_until_s + c.window_s
        return True

    def num_open(self, now_s: float) -> int:
        return sum(now_s < r.open_until_s for r in self._replicas.values())

    def retain(self, replica_ids: Iterable[str]) -> None:
        """Forgets replicas no longer in the deployment."""
        keep = set(replica_ids)
        for gone in set(self._replicas) - keep:
            del self._replicas[gone]
