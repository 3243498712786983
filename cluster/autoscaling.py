"""Autoscaling decisions for the attention replicas and the expert pool: pure, no ray or torch.

Inputs are a metrics snapshot per pool (None when nothing arrived), the current size, the time and
the previous `PoolState`; the output is a target size, a short cause code, a sentence of reason
and the next state. Attention scales on KV usage, waiting requests per replica and the TTFT SLO;
the expert pool on its mean busy fraction. Hysteresis: a band between the scale-down and
scale-up thresholds where nothing moves; a wish must hold continuously for the up/down delay; a
cooldown separates changes. Stale or missing metrics hold the size (never scale on no data); zero
traffic (no TTFT samples, empty KV) is data and scales down to the minimum.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar


@dataclass(frozen=True)
class AttentionSnapshot:
    observed_s: float  # when the newest sample behind these numbers was taken
    kv_usage: float  # mean over replicas of the fullest KV pool, 0..1
    num_waiting: float  # waiting requests, summed over replicas
    num_running: float  # running requests, summed over replicas
    ttft_p90_s: float | None  # None: no request finished its first token in the window


@dataclass(frozen=True)
class ExpertSnapshot:
    observed_s: float
    busy_ratio: float  # mean over shards of the fraction of time spent computing, 0..1


_Snapshot = TypeVar("_Snapshot", AttentionSnapshot, ExpertSnapshot)


@dataclass(frozen=True)
class PoolLimits:
    min_size: int
    max_size: int

    def __post_init__(self) -> None:
        if not 1 <= self.min_size <= self.max_size:
            raise ValueError(f"need 1 <= min_size <= max_size, got {self.min_size}, {self.max_size}")

    def clamp(self, n: int) -> int:
        return max(self.min_size, min(self.max_size, n))


@dataclass(frozen=True)
class ScalingConfig:
    attention: PoolLimits
    experts: PoolLimits
    target_kv_usage: float = 0.7  # scale attention up above this mean KV usage
    scale_down_kv_usage: float = 0.3  # ... and down only below this (the band between holds)
    target_waiting_per_replica: float = 2.0
    ttft_slo_s: float = 2.0  # p90
    expert_target_load: float = 0.7  # scale the expert pool up above this mean busy fraction
    expert_scale_down_load: float = 0.3
    upscale_delay_s: float = 10.0  # a wish must hold this long before it acts
    downscale_delay_s: float = 60.0
    cooldown_s: float = 30.0  # at least this long between two changes of one pool
    stale_after_s: float = 30.0  # older snapshots are not trusted

    def __post_init__(self) -> None:
        if not 0 <= self.scale_down_kv_usage < self.target_kv_usage <= 1:
            raise ValueError("need 0 <= scale_down_kv_usage < target_kv_usage <= 1")
        if not 0 <= self.expert_scale_down_load < self.expert_target_load <= 1:
            raise ValueError("need 0 <= expert_scale_down_load < expert_target_load <= 1")


@dataclass(frozen=True)
class PoolState:
    """What one pool's decisions remember: the wish being timed and the last change."""

    wish: int = 0  # +1 wants up, -1 wants down, 0 content
    wish_since_s: float | None = None
    last_change_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"wish": self.wish, "wish_since_s": self.wish_since_s, "last_change_s": self.last_change_s}

    @staticmethod
    def from_dict(d: dict[str, Any] | None) -> PoolState:
        if not d:
            return PoolState()
        return PoolState(int(d.get("wish", 0)), d.get("wish_since_s"), d.get("last_change_s"))


@dataclass(frozen=True)
class Decision:
    target: int
    cause: str  # short code, a metric label: hold, clamp, stale, missing, kv, queue, ttft, load, idle, delay, cooldown
    reason: str  # one sentence for logs
    state: PoolState


@dataclass(frozen=True)
class _Wish:
    direction: int
    size: int  # the size the signals ask for
    cause: str
    reason: str


def _attention_wish(s: AttentionSnapshot, current: int, c: ScalingConfig) -> _Wish:
    kv_need = math.ceil(current * s.kv_usage / c.target_kv_usage - 1e-9)
    queue_need = (
        math.ceil(s.num_waiting / c.target_waiting_per_replica - 1e-9)
        if c.target_waiting_per_replica > 0
        else current
    )
    ups: list[tuple[int, str, str]] = []
    if s.kv_usage > c.target_kv_usage:
        ups.append((kv_need, "kv", f"KV usage {s.kv_usage:.2f} > {c.target_kv_usage:.2f}"))
    if s.num_waiting > c.target_waiting_per_replica * current:
        ups.append(
            (queue_need, "queue", f"{s.num_waiting:g} waiting > {c.target_waiting_per_replica:g} per replica")
        )
    if s.ttft_p90_s is not None and s.ttft_p90_s > c.ttft_slo_s:
        ups.append((current + 1, "ttft", f"TTFT p90 {s.ttft_p90_s:.2f}s > SLO {c.ttft_slo_s:.2f}s"))
    if ups:
        size, cause, reason = max(ups, key=lambda u: u[0])
        return _Wish(+1, max(size, current + 1), cause, reason)
    # an idle pool scales down whatever TTFT its trailing window (e.g. a PromQL rate over minutes)
    # still remembers from the load that ended
    is_idle = s.num_running == 0 and s.num_waiting == 0
    ttft_ok = is_idle or s.ttft_p90_s is None or s.ttft_p90_s <= c.ttft_slo_s / 2
    # one fewer replica must still sit under the scale-up thresholds, or it would bounce back
    fits_one_fewer = current > 1 and s.kv_usage * current / (current - 1) <= c.target_kv_usage
    if s.kv_usage < c.scale_down_kv_usage and s.num_waiting == 0 and ttft_ok and fits_one_fewer:
        cause = "idle" if s.num_running == 0 else "kv"
        return _Wish(
            -1, current - 1, cause, f"KV usage {s.kv_usage:.2f} < {c.scale_down_kv_usage:.2f}, no queue"
        )
    return _Wish(0, current, "hold", "within the band")


def _expert_wish(s: ExpertSnapshot, current: int, c: ScalingConfig) -> _Wish:
    if s.busy_ratio > c.expert_target_load:
        size = max(current + 1, math.ceil(current * s.busy_ratio / c.expert_target_load - 1e-9))
        return _Wish(+1, size, "load", f"shards busy {s.busy_ratio:.2f} > {c.expert_target_load:.2f}")
    fits_one_fewer = current > 1 and s.busy_ratio * current / (current - 1) <= c.expert_target_load
    if s.busy_ratio < c.expert_scale_down_load and fits_one_fewer:
        cause = "idle" if s.busy_ratio == 0 else "load"
        return _Wish(
            -1, current - 1, cause, f"shards busy {s.busy_ratio:.2f} < {c.expert_scale_down_load:.2f}"
        )
    return _Wish(0, current, "hold", "within the band")


def _settle(
    wish: _Wish, current: int, limits: PoolLimits, now_s: float, c: ScalingConfig, state: PoolState
) -> Decision:
    """Applies bounds, the delay a wish must hold for, and the cooldown between changes."""
    target = limits.clamp(wish.size)
    if target == current:
        why = wish.reason if wish.direction == 0 else f"{wish.reason}, but at the limit {target}"
        return Decision(current, "hold", why, replace(state, wish=0, wish_since_s=None))
    direction = 1 if target > current else -1
    since = state.wish_since_s if state.wish == direction and state.wish_since_s is not None else now_s
    pending = PoolState(direction, since, state.last_change_s)
    delay = c.upscale_delay_s if direction > 0 else c.downscale_delay_s
    if now_s - since < delay - 1e-9:
        return Decision(
            current, "delay", f"{wish.reason}: held {now_s - since:.0f}s of {delay:.0f}s", pending
        )
    if state.last_change_s is not None and now_s - state.last_change_s < c.cooldown_s - 1e-9:
        return Decision(current, "cooldown", f"{wish.reason}: cooling down after the last change", pending)
    return Decision(target, wish.cause, wish.reason, PoolState(0, None, now_s))


def _guard(
    snapshot_s: float | None,
    current: int,
    limits: PoolLimits,
    now_s: float,
    c: ScalingConfig,
    state: PoolState,
) -> Decision | None:
    """Out-of-bounds sizes move into bounds at once; missing or stale metrics hold."""
    if limits.clamp(current) != current:
        target = limits.clamp(current)
        return Decision(
            target,
            "clamp",
            f"{current} is outside [{limits.min_size}, {limits.max_size}]",
            PoolState(0, None, now_s),
        )
    if snapshot_s is None:
        return Decision(current, "missing", "no metrics: hold", replace(state, wish=0, wish_since_s=None))
    if now_s - snapshot_s > c.stale_after_s:
        age = now_s - snapshot_s
        return Decision(
            current, "stale", f"metrics {age:.0f}s old: hold", replace(state, wish=0, wish_since_s=None)
        )
    return None


def decide_attention(
    snapshot: AttentionSnapshot | None, current: int, now_s: float, config: ScalingConfig, state: PoolState
) -> Decision:
    return _decide(snapshot, _attention_wish, current, config.attention, now_s, config, state)


def decide_experts(
    snapshot: ExpertSnapshot | None, current: int, now_s: float, config: ScalingConfig, state: PoolState
) -> Decision:
    return _decide(snapshot, _expert_wish, current, config.experts, now_s, config, state)


def _decide(
    snapshot: _Snapshot | None,
    wish: Callable[[_Snapshot, int, ScalingConfig], _Wish],
    current: int,
    limits: PoolLimits,
    now_s: float,
    config: ScalingConfig,
    state: PoolState,
) -> Decision:
    """Guard (missing, stale, out of bounds, cooling down), else settle the pool's wish."""
    guard = _guard(snapshot.observed_s if snapshot else None, current, limits, now_s, config, state)
    if guard is not None:
        return guard
    assert snapshot is not None  # _guard holds on a missing snapshot
    return _settle(wish(snapshot, current, config), current, limits, now_s, config, state)
