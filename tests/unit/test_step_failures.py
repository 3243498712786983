"""When a replica counts as broken: an unbroken run of failed engine steps, long in count and time."""

from __future__ import annotations

from replicas.engine.step_failures import MIN_FAILED_STEPS, MIN_SPAN_S, FailureRun


def test_a_long_unbroken_run_of_failures_is_stuck_and_a_good_step_clears_it() -> None:
    """Catches a broken replica never reported (it would fail every request sent to it), and a
    replica reported broken for a short burst of bad requests or after it recovered."""
    run = FailureRun()
    step_s = MIN_SPAN_S / (MIN_FAILED_STEPS - 1)
    for k in range(MIN_FAILED_STEPS - 1):
        run.failed(100.0 + k * step_s, f"boom {k}")
    assert run.stuck_reason() is None  # enough time, one step short
    run.failed(100.0 + MIN_SPAN_S, "boom last")
    reason = run.stuck_reason()
    assert reason is not None and "boom last" in reason and f"last {MIN_FAILED_STEPS} steps" in reason
    run.succeeded()
    assert run.stuck_reason() is None
    for k in range(10 * MIN_FAILED_STEPS):  # a burst: many steps within a second
        run.failed(500.0 + k / 100, "bad input")
    assert run.stuck_reason() is None
