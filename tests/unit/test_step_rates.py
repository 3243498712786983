"""The engine's measured rates that replicas report to routers (`replicas.engine.step_rates`)."""

from __future__ import annotations

import pytest

from protocol.messages import GenerateRequest
from replicas.engine.engine import Engine
from replicas.engine.engine_config import EngineConfig
from replicas.engine.step_rates import StepRates
from tests.unit.test_engine import _greedy, _model, _tokenizer


def test_nothing_measured_reports_none() -> None:
    """Catches a fresh replica claiming rates it never measured (routers must use their defaults)."""
    rates = StepRates()
    assert rates.step_s is None and rates.prefill_tokens_per_s is None
    rates.record(ended_at=1.0, duration_s=0.01, prefill_tokens=0)  # decodes only
    assert rates.step_s == pytest.approx(0.01) and rates.prefill_tokens_per_s is None


def test_step_time_is_the_mean_and_prefill_rate_counts_only_prefill_steps() -> None:
    """Catches a prefill rate diluted by decode-only steps, or a step time that is not the mean."""
    rates = StepRates(window_s=10.0)
    rates.record(ended_at=1.0, duration_s=0.010, prefill_tokens=0)
    rates.record(ended_at=2.0, duration_s=0.100, prefill_tokens=512)
    rates.record(ended_at=3.0, duration_s=0.040, prefill_tokens=128)
    assert rates.step_s == pytest.approx((0.010 + 0.100 + 0.040) / 3)
    assert rates.prefill_tokens_per_s == pytest.approx((512 + 128) / (0.100 + 0.040))


def test_old_steps_leave_the_window_and_an_idle_engine_keeps_its_estimates() -> None:
    """Catches rates stuck on steps long past, and rates that vanish while the replica is idle."""
    rates = StepRates(window_s=5.0)
    rates.record(ended_at=0.0, duration_s=1.0, prefill_tokens=100)
    rates.record(ended_at=10.0, duration_s=0.02, prefill_tokens=0)  # the first step left the window
    assert rates.step_s == pytest.approx(0.02)
    assert rates.prefill_tokens_per_s == pytest.approx(100.0)  # the last prefill measured, kept
    rates.record(ended_at=11.0, duration_s=0.5, prefill_tokens=1000)
    assert rates.prefill_tokens_per_s == pytest.approx(2000.0)


def test_bad_records_are_refused() -> None:
    with pytest.raises(ValueError):
        StepRates(window_s=0)
    with pytest.raises(ValueError):
        StepRates().record(ended_at=0.0, duration_s=-1.0, prefill_tokens=0)


def test_the_engine_measures_its_steps() -> None:
    """Catches an engine whose reports never carry rates: prefill and decode steps both counted."""
    engine = Engine(_model(), _tokenizer(), EngineConfig(block_size=4, max_model_len=200))
    assert engine.rates.step_s is None
    engine.add(GenerateRequest("a", list(range(3, 40)), _greedy(max_tokens=4)))
    while engine.has_work():
        engine.step()
    assert engine.rates.step_s is not None and engine.rates.step_s > 0
    assert engine.rates.prefill_tokens_per_s is not None and engine.rates.prefill_tokens_per_s > 0
