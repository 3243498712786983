"""Autoscaling decisions (cluster/autoscaling.py) replayed over recorded traces, tick by tick.

A trace row is the demand the cluster saw at time t: KV demand in replicas' worth of blocks, the
waiting and running requests, TTFT p90 (None = no traffic). The replay turns demand into the
per-replica metrics the current size would show, feeds the decision, applies its target at once
and passes the state through a dict as Serve's policy_state does.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.autoscaling import (
    AttentionSnapshot,
    Decision,
    ExpertSnapshot,
    PoolLimits,
    PoolState,
    ScalingConfig,
    decide_attention,
    decide_experts,
)

CONFIG = ScalingConfig(
    attention=PoolLimits(1, 4),
    experts=PoolLimits(1, 8),
    upscale_delay_s=10,
    downscale_delay_s=60,
    cooldown_s=30,
    stale_after_s=30,
)


@dataclass(frozen=True)
class Row:
    t: float
    kv_demand: float  # replicas' worth of KV blocks in use
    waiting: float = 0
    running: float = 0
    ttft_s: float | None = None
    age_s: float = 0.0  # how old the metrics are at t
    missing: bool = False


def _replay(rows: list[Row], start: int, config: ScalingConfig = CONFIG) -> tuple[list[tuple[float, int, str]], list[Decision]]:  # fmt: skip
    current, state = start, PoolState().to_dict()
    changes, decisions = [], []
    for r in rows:
        snap = None
        if not r.missing:
            kv = min(1.0, r.kv_demand / max(current, 1))
            snap = AttentionSnapshot(r.t - r.age_s, kv, r.waiting, r.running, r.ttft_s)
        d = decide_attention(snap, current, r.t, config, PoolState.from_dict(state))
        state = d.state.to_dict()
        decisions.append(d)
        if d.target != current:
            changes.append((r.t, d.target, d.cause))
            current = d.target
    return changes, decisions


def _ticks(start: float, end: float, **kw: object) -> list[Row]:
    return [Row(float(t), **kw) for t in range(int(start), int(end), 5)]  # type: ignore[arg-type]


def test_load_step_up_and_back_without_flapping() -> None:
    """Catches flapping (scaling back down while the doubled load still needs two replicas, or
    bouncing on noise inside the band) and scaling before the condition held for the delay."""
    noisy = [0.85, 0.95, 0.9, 0.88, 0.93]
    rows = (
        _ticks(0, 30, kv_demand=0.2, running=2, ttft_s=0.3)
        + [Row(float(t), noisy[i % 5], running=6, ttft_s=0.8) for i, t in enumerate(range(30, 120, 5))]
        + _ticks(120, 300, kv_demand=0.1, running=1, ttft_s=0.2)
    )
    changes, decisions = _replay(rows, start=1)
    # up at 30 + 10 s delay; down at 120 + 60 s delay; nothing in between or after
    assert changes == [(40.0, 2, "kv"), (180.0, 1, "kv")]
    assert [d.cause for d in decisions[6:8]] == ["delay", "delay"]


def test_noise_across_the_threshold_never_scales() -> None:
    """Catches a wish that survives an interruption: KV alternating 0.6 / 0.8 never stays above
    the 0.7 target for the 10 s upscale delay, so the size must not move."""
    rows = [
        Row(float(t), 0.8 if i % 2 else 0.6, running=4, ttft_s=0.5) for i, t in enumerate(range(0, 300, 5))
    ]
    changes, decisions = _replay(rows, start=1)
    assert changes == []
    assert {d.cause for d in decisions} == {"hold", "delay"}


def test_zero_traffic_scales_down_to_the_minimum() -> None:
    """Catches the 'never scales down at zero traffic' bug (TTFT is NaN/None without requests):
    idle replicas go one by one, each after the downscale delay, down to min and no further."""
    changes, _ = _replay(_ticks(0, 400, kv_demand=0.0, ttft_s=None), start=3)
    assert changes == [(60.0, 2, "idle"), (125.0, 1, "idle")]


def test_idle_scales_down_despite_the_trailing_ttft_of_the_load_that_ended() -> None:
    """Catches a pool stuck at its peak size after the load: a PromQL TTFT p90 over a window of
    minutes still reports the load's slow first tokens while nothing runs or waits."""
    changes, _ = _replay(_ticks(0, 200, kv_demand=0.0, running=0, ttft_s=1.8), start=2)
    assert changes == [(60.0, 1, "idle")]


def test_missing_and_stale_metrics_hold() -> None:
    """Catches scaling on no data: with metrics missing or older than stale_after_s the size holds
    however alarming the last numbers; a gap also restarts the delay of a pending wish."""
    missing = _replay([Row(float(t), 0.0, missing=True) for t in range(0, 300, 5)], start=3)
    assert missing[0] == [] and {d.cause for d in missing[1]} == {"missing"}
    stale = _replay(_ticks(0, 300, kv_demand=4.0, waiting=50, ttft_s=9.0, age_s=31.0), start=1)
    assert stale[0] == [] and {d.cause for d in stale[1]} == {"stale"}
    # wish up from t=0, a stale tick at t=5 resets it: acts at 10 + 10, not at 10
    rows = [Row(0.0, 0.9), Row(5.0, 0.9, age_s=60.0), Row(10.0, 0.9), Row(15.0, 0.9), Row(20.0, 0.9)]
    assert _replay(rows, start=1)[0] == [(20.0, 2, "kv")]


def test_min_max_clamps() -> None:
    """Catches targets outside [min, max]: a huge queue asks for 50 replicas and gets max (4);
    at max it holds; a size outside the bounds (after a config change) moves in at once."""
    rows = _ticks(0, 100, kv_demand=3.0, waiting=100, running=40, ttft_s=1.0)
    changes, decisions = _replay(rows, start=3)
    assert changes == [(10.0, 4, "queue")]
    assert decisions[-1].cause == "hold" and "at the limit 4" in decisions[-1].reason
    d = decide_attention(AttentionSnapshot(0, 0.5, 0, 1, 0.2), 6, 0.0, CONFIG, PoolState())
    assert (d.target, d.cause) == (4, "clamp")
    d = decide_attention(None, 0, 0.0, CONFIG, PoolState())
    assert (d.target, d.cause) == (1, "clamp")


def test_ttft_slo_breach_adds_a_replica_and_blocks_scale_down() -> None:
    """Catches an SLO breach ignored because KV and queue look fine, and scaling down while
    TTFT is close to the SLO (p90 above half the SLO keeps the size)."""
    breach = _ticks(0, 40, kv_demand=0.5, running=3, ttft_s=3.0)
    assert _replay(breach, start=1)[0] == [(10.0, 2, "ttft")]
    near = _ticks(0, 300, kv_demand=0.2, running=1, ttft_s=1.5)
    assert _replay(near, start=2)[0] == []


def test_cooldown_spaces_consecutive_changes() -> None:
    """Catches a second scale-up fired before the first replica could take load: with demand
    staying high, the next change waits for the 30 s cooldown after the previous one."""
    rows = _ticks(0, 100, kv_demand=3.5, running=20, ttft_s=1.0)
    changes, _ = _replay(rows, start=1)
    # 1 replica at KV 1.0 asks ceil(1/0.7) = 2; 2 replicas at 1.0 ask 3; 3 at 1.0 ask 5 -> max 4
    assert changes == [(10.0, 2, "kv"), (40.0, 3, "kv"), (70.0, 4, "kv")]


def test_expert_pool_scales_on_busy_fraction() -> None:
    """Catches the expert pool ignoring load or scaling on imbalance-free idle shards: 0.9 busy on
    2 shards asks ceil(2 x 0.9 / 0.7) = 3 after the delay; idle shards drop one at a time."""
    state, current, changes = PoolState(), 2, []
    for t in range(0, 50, 5):
        busy = 0.9 * 2 / current
        d = decide_experts(ExpertSnapshot(float(t), busy), current, float(t), CONFIG, state)
        state = d.state
        if d.target != current:
            changes.append((t, d.target, d.cause))
            current = d.target
    assert changes == [(10, 3, "load")]
    d = decide_experts(ExpertSnapshot(100.0, 0.0), 3, 100.0, CONFIG, PoolState(-1, 30.0, 10.0))
    assert (d.target, d.cause) == (2, "idle")
    assert decide_experts(None, 3, 0.0, CONFIG, PoolState()).cause == "missing"
