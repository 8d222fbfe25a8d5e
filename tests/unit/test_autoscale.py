"""The autoscaling decision and its inputs, without Redis or Ray (those are in
tests/integration/test_autoscale.py)."""

from __future__ import annotations

import pytest
from ray.serve._private.common import DeploymentID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from sluice.autoscale import (
    BacklogPolicy,
    RateWindow,
    ServiceMeter,
    Snapshot,
    Targets,
    _median,
    desired_replicas,
)
from sluice.backlog import Backlog

T = Targets(target_drain_s=10.0, utilization=0.8, hysteresis=0.25, default_rate=50.0)


def backlog(waiting: int = 0, in_flight: int = 0, age_s: float = 0.0) -> Backlog:
    return Backlog(waiting, in_flight, added=0, oldest_age_s=age_s, read_at=0.0)


def test_nothing_queued_nothing_arriving_means_zero():
    assert desired_replicas(backlog(), 0.0, 100.0, current=3, t=T) == 0


def test_a_job_at_zero_replicas_asks_for_one():
    assert desired_replicas(backlog(waiting=1), 0.0, 100.0, current=0, t=T) == 1


def test_enough_replicas_to_drain_the_backlog_within_the_target():
    # 4000 waiting over 10 s = 400 jobs/s; one replica does 100 * 0.8 = 80: five replicas.
    assert desired_replicas(backlog(waiting=4000), 0.0, 100.0, current=1, t=T) == 5
    # Arrivals count on top: 400 + 80 = 480 jobs/s, six replicas.
    assert desired_replicas(backlog(waiting=4000), 80.0, 100.0, current=1, t=T) == 6


def test_steady_arrivals_with_no_backlog_keep_replicas():
    # 150 jobs/s arriving, 80 a replica: two replicas stay although nothing waits.
    assert desired_replicas(backlog(), 150.0, 100.0, current=2, t=T) == 2


def test_hysteresis_keeps_a_replica_near_the_boundary():
    # 1.9 replicas' worth of work: up to 2 from 1, and from 2 no change.
    assert desired_replicas(backlog(), 152.0, 100.0, current=1, t=T) == 2
    assert desired_replicas(backlog(), 152.0, 100.0, current=2, t=T) == 2
    # From 3, down only once the work fits in 2 with a quarter replica to spare: 1.8
    # replicas' worth (144 jobs/s) keeps 3 (1.8 + 0.25 > 2), 1.7 (136 jobs/s) goes to 2.
    assert desired_replicas(backlog(), 144.0, 100.0, current=3, t=T) == 3
    assert desired_replicas(backlog(), 136.0, 100.0, current=3, t=T) == 2


def test_jobs_older_than_the_target_add_a_replica_whatever_the_estimate():
    stuck = backlog(waiting=10, age_s=30.0)
    assert desired_replicas(stuck, 0.0, 1000.0, current=2, t=T) == 3
    # ...but only while something still waits to be delivered.
    assert desired_replicas(backlog(in_flight=10, age_s=30.0), 0.0, 1000.0, 2, T) == 1


def test_targets_are_validated():
    with pytest.raises(ValueError, match="utilization"):
        Targets(utilization=1.5)
    with pytest.raises(ValueError, match="target_drain_s"):
        Targets(target_drain_s=0)
    with pytest.raises(ValueError, match="hysteresis"):
        BacklogPolicy(model="m", hysteresis=-1)


def test_rate_window_is_the_counter_slope_over_the_window():
    window = RateWindow(window_s=10.0)
    assert window.rate() == 0.0
    for second in range(30):
        window.add(float(second), 100 * second)
    assert window.rate() == pytest.approx(100.0)
    # A burst of 1000 in the last second shows at once, diluted over the window.
    window.add(30.0, 100 * 29 + 1000)
    assert 150 < window.rate() < 250
    window.add(31.0, 5)  # the stream was recreated: the counter restarted
    assert window.rate() == 0.0


def test_median_ignores_replicas_that_reported_nothing():
    assert _median({"a": 100.0, "b": 300.0, "c": 120.0}) == 120.0
    assert _median({"a": 0.0}) is None
    assert _median(None) is None


def context(metrics: dict[str, dict[str, float]], replicas: int = 2) -> AutoscalingContext:
    """Serve's own context object, as the controller builds it each tick."""
    return AutoscalingContext(
        deployment_id=DeploymentID(name="Replica", app_name="m"),
        deployment_name="Replica",
        app_name="m",
        current_num_replicas=replicas,
        target_num_replicas=replicas,
        running_replicas=[],
        total_num_requests=0.0,
        total_queued_requests=0.0,
        aggregated_metrics=metrics,
        raw_metrics={},
        capacity_adjusted_min_replicas=0,
        capacity_adjusted_max_replicas=4,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=0.0,
        config=AutoscalingConfig(min_replicas=0, max_replicas=4, look_back_period_s=15.0),
    )


def test_capacity_is_measured_only_on_saturated_replicas():
    policy = BacklogPolicy(model="m", default_rate=50.0)
    reports = {"throughput": {"a": 30.0, "b": 40.0}, "service_rate": {"a": 900.0, "b": 800.0}}
    queued = Snapshot(backlog(waiting=500), arrival_rate=0.0, backlogged_s=5.0)
    # Jobs waited for less than the look-back window: the default, as the model allows.
    assert policy._capacity(context(reports), queued) == 50.0
    slow_model = {"service_rate": {"a": 20.0}}
    assert policy._capacity(context(slow_model), queued) == 20.0
    # Jobs waited the whole window: what the replicas did is what they can do...
    saturated = Snapshot(backlog(waiting=500), arrival_rate=0.0, backlogged_s=16.0)
    policy._rate = policy._capacity(context(reports), saturated)
    assert policy._rate == 35.0
    # ...and it is kept once the queue is empty and the replicas idle.
    idle = {"throughput": {"a": 0.0}, "service_rate": {"a": 900.0}}
    assert policy._capacity(context(idle), Snapshot(backlog(), 0.0, 0.0)) == 35.0


def test_service_meter_reports_jobs_per_second_of_model_time():
    done = {"jobs": 0, "busy": 0.0}
    meter = ServiceMeter(lambda: (done["jobs"], done["busy"]))
    assert meter.report()["service_rate"] == 0.0  # nothing done yet: nothing known
    done.update(jobs=200, busy=0.5)
    busy = meter.report()
    assert busy["service_rate"] == pytest.approx(400.0)
    assert busy["throughput"] > 0
    # Idle since: the rate stays what the replica could do, its utilization drops to 0.
    idle = meter.report()
    assert idle["service_rate"] == pytest.approx(400.0)
    assert idle["utilization"] == 0.0
    assert idle["throughput"] == 0.0
