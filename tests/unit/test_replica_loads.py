"""router/replica_loads.py: a router's estimate of each replica's requests between reports."""

from __future__ import annotations

from router.replica_loads import ReplicaLoads


def test_a_late_report_does_not_count_requests_this_router_saw_finish() -> None:
    """Catches a burst right after a burst piling onto one replica: every replica's last report
    was taken mid-burst (2 running each) and arrives late; three of this router's four requests
    have finished since, whether before or after the report arrived."""
    loads = ReplicaLoads("handle", horizon_s=10.0)
    for replica_id in ("a", "b"):
        loads.routed(replica_id, now=1.0)
        loads.routed(replica_id, now=1.0)
    loads.completed("a", routed_at=1.0, now=2.0)
    loads.completed("a", routed_at=1.0, now=2.0)
    loads.completed("b", routed_at=1.0, now=2.0)
    assert loads.num_requests("a", reported=2, recorded_at=1.5, queue_len=0, now=2.5) == 0
    assert loads.num_requests("b", reported=2, recorded_at=1.5, queue_len=0, now=2.5) == 1


def test_requests_of_other_routers_still_count() -> None:
    """Catches subtracting more than this router's own finished requests (another gateway's load
    ignored), or subtracting a completion the report already left out."""
    loads = ReplicaLoads("handle", horizon_s=10.0)
    loads.routed("a", now=1.0)
    loads.completed("a", routed_at=1.0, now=2.0)
    # 3 running at 1.5: ours and two of another gateway's
    assert loads.num_requests("a", reported=3, recorded_at=1.5, queue_len=0, now=2.5) == 2
    # taken at 2.2, after ours finished: it is not in this report
    assert loads.num_requests("a", reported=2, recorded_at=2.2, queue_len=0, now=2.5) == 2


def test_a_request_routed_after_the_report_was_taken_is_not_subtracted() -> None:
    """Catches a completion reducing a report taken before the request existed."""
    loads = ReplicaLoads("handle", horizon_s=10.0)
    loads.routed("a", now=2.0)
    loads.completed("a", routed_at=2.0, now=2.1)
    assert loads.num_requests("a", reported=1, recorded_at=1.0, queue_len=0, now=2.2) == 1


def test_completions_past_the_horizon_are_forgotten() -> None:
    """Catches the completion record growing without bound (one entry per request, forever)."""
    loads = ReplicaLoads("handle", horizon_s=10.0)
    for t in range(100):
        loads.routed("a", now=float(t))
        loads.completed("a", routed_at=float(t), now=t + 0.5)
    assert len(loads._completed["a"]) == 11  # completed at 89.5 .. 99.5
    assert loads.num_requests("a", reported=5, recorded_at=95.0, queue_len=0, now=100.0) == 4


def test_in_flight_and_queue_length_bound_the_estimate_from_below() -> None:
    """Catches a missing or stale report hiding requests this router has in flight, or Serve's
    queue-length cache being ignored; dropped and moved requests leave the count."""
    loads = ReplicaLoads("handle", horizon_s=10.0)
    for _ in range(3):
        loads.routed("a", now=1.0)
    assert loads.num_requests("a", reported=None, recorded_at=0.0, queue_len=0, now=1.0) == 3
    assert loads.num_requests("a", reported=1, recorded_at=1.0, queue_len=5, now=1.0) == 5
    loads.dropped("a")
    loads.moved("a", "b")
    assert loads.num_requests("a", reported=None, recorded_at=0.0, queue_len=0, now=1.0) == 1
    assert loads.num_requests("b", reported=None, recorded_at=0.0, queue_len=0, now=1.0) == 1
    loads.dropped("c")  # never routed there: no negative counts
    assert loads.num_requests("c", reported=None, recorded_at=0.0, queue_len=0, now=1.0) == 0


def test_reports_mode_adds_routings_after_the_report_was_taken() -> None:
    """Catches a direct-streaming router (requests never seen to end) counting what the report
    already includes, or ignoring requests routed after it was taken."""
    loads = ReplicaLoads("reports", horizon_s=10.0)
    loads.routed("a", now=1.0)
    loads.routed("a", now=3.0)
    loads.routed("a", now=3.5)
    assert loads.num_requests("a", reported=4, recorded_at=2.0, queue_len=9, now=4.0) == 6
    assert loads.num_requests("a", reported=None, recorded_at=0.0, queue_len=0, now=4.0) == 3


def test_retain_forgets_replicas_that_are_gone() -> None:
    loads = ReplicaLoads("handle", horizon_s=10.0)
    loads.routed("a", now=1.0)
    loads.completed("a", routed_at=1.0, now=2.0)
    loads.routed("a", now=2.0)
    loads.routed("b", now=1.0)
    loads.retain(["b"])
    assert loads.num_requests("a", reported=None, recorded_at=0.0, queue_len=0, now=3.0) == 0
    assert loads.num_requests("a", reported=1, recorded_at=1.5, queue_len=0, now=3.0) == 1
    assert loads.num_requests("b", reported=None, recorded_at=0.0, queue_len=0, now=3.0) == 1
