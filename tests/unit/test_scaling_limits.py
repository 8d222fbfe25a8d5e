"""The policy's two limits: room on the nodes, and replicas that pay for themselves; and the
replica's own fit to what Ray reserved (threads, priority). No Ray, no Redis."""

from __future__ import annotations

import os
import threading
import time

import pytest

from sluice.autoscale import VIEW_LAG_S, BacklogPolicy, Snapshot
from sluice.placement import fit_threads, run_at_full_priority
from sluice.scaling_limits import GainCheck, Headroom
from sluice.settings import ModelSettings
from tests.unit.test_autoscale import backlog, context


def test_headroom_counts_whole_replicas_per_node() -> None:
    free = {"a": {"CPU": 1.0}, "b": {"CPU": 3.5, "GPU": 1.0}}
    room = Headroom(lambda: free)
    assert room.room({"CPU": 2.0}) == 1  # a has one CPU: nothing there; b fits one
    assert room.room({"CPU": 1.0}) == 4
    assert room.room({"CPU": 1.0, "GPU": 0.5}) == 2  # only b has a GPU: two halves
    assert room.room({"CPU": 0.0, "GPU": 0.0}) is None  # needs nothing Ray counts


def test_the_policy_asks_for_no_replica_that_no_node_can_place() -> None:
    policy = BacklogPolicy(model="m", default_rate=10.0)
    free: dict[str, dict[str, float]] = {"node": {"CPU": 0.0}}
    policy._headroom = Headroom(lambda: free, refresh_s=0.0)
    # Two busy replicas of 2 CPUs each; 4,000 jobs wait: the wish is many more.
    reports = {"throughput": {"a": 20.0, "b": 20.0}, "cpus": {"a": 2.0, "b": 2.0}}
    ctx = context(reports, replicas=2)
    snap = Snapshot(backlog(waiting=4000), arrival_rate=0.0, backlogged_s=1.0)
    assert policy._limit(ctx, snap, wish=8) == 2
    assert policy._limited_by == "no_free_resources"
    # A node frees 4 CPUs: two more fit, and no more.
    free["node"] = {"CPU": 4.5}
    assert policy._limit(ctx, snap, wish=8) == 4
    free["node"] = {"CPU": 64.0}
    assert policy._limit(ctx, snap, wish=8) == 8
    assert policy._limited_by is None
    # Scaling down is never held.
    free["node"] = {"CPU": 0.0}
    assert policy._limit(ctx, snap, wish=1) == 1


def test_a_replica_that_added_no_throughput_is_not_kept() -> None:
    check = GainCheck(settle_s=10.0, hold_s=100.0)
    # One saturated replica at 100 jobs/s; the policy wants two.
    check.observe(running=1, desired=2, total=100.0, saturated=True, now=0.0)
    # It takes 30 s to start (a long model load): that is not held against it.
    check.observe(running=1, desired=2, total=100.0, saturated=True, now=30.0)
    check.observe(running=2, desired=2, total=100.0, saturated=True, now=31.0, reporting=1)
    check.observe(running=2, desired=2, total=104.0, saturated=True, now=32.0)  # joined
    check.observe(running=2, desired=2, total=104.0, saturated=True, now=40.0)  # too soon
    assert check.limit(now=40.0) is None
    check.observe(running=2, desired=2, total=104.0, saturated=True, now=43.0)
    assert check.limit(now=43.0) == 1
    assert check.last_verdict is not None and "added no throughput" in check.last_verdict
    # While held, no new trial; after the hold, adding may be tried again.
    check.observe(running=1, desired=2, total=100.0, saturated=True, now=80.0)
    assert check.limit(now=80.0) == 1
    assert check.limit(now=144.0) is None


def test_a_replica_that_added_throughput_is_kept() -> None:
    check = GainCheck(settle_s=10.0)
    check.observe(running=2, desired=3, total=200.0, saturated=True, now=0.0)
    check.observe(running=3, desired=3, total=250.0, saturated=True, now=5.0)
    check.observe(running=3, desired=3, total=290.0, saturated=True, now=16.0)
    assert check.limit(now=16.0) is None
    assert check.last_verdict == "replica 3 added 90.0 jobs/s"


def test_no_verdict_when_the_queue_empties_or_the_replica_never_comes() -> None:
    check = GainCheck(settle_s=10.0)
    check.observe(running=1, desired=2, total=100.0, saturated=True, now=0.0)
    check.observe(running=2, desired=2, total=60.0, saturated=True, now=1.0)
    check.observe(running=2, desired=2, total=60.0, saturated=False, now=12.0)
    assert check.limit(now=12.0) is None and check.last_verdict is None
    check.observe(running=1, desired=2, total=100.0, saturated=True, now=20.0)
    check.observe(running=1, desired=1, total=100.0, saturated=True, now=21.0)  # not wanted
    assert check._trial is None
    check.observe(running=1, desired=2, total=100.0, saturated=True, now=22.0)  # a new trial
    assert check.limit(now=22.0) is None and check._trial is not None


def test_at_zero_replicas_one_is_asked_for_until_one_reports_its_size() -> None:
    policy = BacklogPolicy(model="m", default_rate=10.0)
    policy._headroom = Headroom(lambda: {"node": {"CPU": 0.0}}, refresh_s=0.0)
    snap = Snapshot(backlog(waiting=4000), arrival_rate=0.0, backlogged_s=0.0)
    assert policy._limit(context({}, replicas=0), snap, wish=8) == 1
    # Once a replica reported 2 CPUs, the size is remembered at zero replicas too.
    policy._limit(context({"cpus": {"a": 2.0}}, replicas=1), snap, wish=1)
    assert policy._limit(context({}, replicas=0), snap, wish=8) == 1  # never below one
    policy._headroom = Headroom(lambda: {"node": {"CPU": 4.0}}, refresh_s=0.0)
    assert policy._limit(context({}, replicas=0), snap, wish=8) == 2


def test_a_starting_replica_is_not_cancelled_for_want_of_room() -> None:
    policy = BacklogPolicy(model="m", default_rate=10.0)
    policy._headroom = Headroom(lambda: {"node": {"CPU": 0.0}}, refresh_s=0.0)
    snap = Snapshot(backlog(waiting=4000), arrival_rate=0.0, backlogged_s=0.0)
    ctx = context({"cpus": {"a": 2.0}}, replicas=1)
    ctx.target_num_replicas = 2  # one running, one starting (its CPUs already taken)
    assert policy._limit(ctx, snap, wish=4) == 2


def test_a_starting_replica_counts_as_taking_room_that_rays_view_still_shows_free() -> None:
    """Found by the GPU-share test: Ray's free resources lag the replica just asked for, so
    the next tick saw its GPU share still free and asked for one more, which waited pending."""
    policy = BacklogPolicy(model="m", default_rate=10.0)
    # One GPU in halves; one replica runs (half taken), one was just asked for, and Ray's
    # view does not show its half taken yet.
    policy._headroom = Headroom(lambda: {"node": {"CPU": 8.0, "GPU": 0.5}}, refresh_s=0.0)
    snap = Snapshot(backlog(waiting=4000), arrival_rate=0.0, backlogged_s=0.0)
    ctx = context({"cpus": {"a": 0.5}, "gpus": {"a": 0.5}}, replicas=1)
    ctx.target_num_replicas = 2
    policy._raised_at = time.monotonic()  # it asked for the second replica just now
    assert policy._limit(ctx, snap, wish=4) == 2
    assert policy._limited_by == "no_free_resources"
    # Seconds later Ray's view has placed it: a share still free there is really free (the
    # starting replica is not subtracted twice while it loads its model).
    policy._raised_at = time.monotonic() - VIEW_LAG_S
    assert policy._limit(ctx, snap, wish=4) == 3
    # Once it runs (and Ray shows the GPU full), still two.
    policy._headroom = Headroom(lambda: {"node": {"CPU": 7.5, "GPU": 0.0}}, refresh_s=0.0)
    ctx = context({"cpus": {"a": 0.5, "b": 0.5}, "gpus": {"a": 0.5, "b": 0.5}}, replicas=2)
    assert policy._limit(ctx, snap, wish=4) == 2


def test_the_limit_can_be_turned_off_for_clusters_that_add_nodes() -> None:
    policy = BacklogPolicy(model="m", default_rate=10.0, limit_to_free_resources=False)
    policy._headroom = Headroom(lambda: {"node": {"CPU": 0.0}}, refresh_s=0.0)
    snap = Snapshot(backlog(waiting=4000), arrival_rate=0.0, backlogged_s=0.0)
    assert policy._limit(context({"cpus": {"a": 2.0}}, replicas=1), snap, wish=4) == 4


def test_the_policy_drops_the_replica_that_added_nothing() -> None:
    policy = BacklogPolicy(model="m", default_rate=10.0)
    policy._headroom = Headroom(lambda: {"node": {"CPU": 64.0}}, refresh_s=0.0)
    policy._gain = GainCheck(settle_s=0.0, hold_s=600.0)
    snap = Snapshot(backlog(waiting=4000), arrival_rate=0.0, backlogged_s=60.0)
    one = context({"throughput": {"a": 50.0}, "cpus": {"a": 1.0}}, replicas=1)
    assert policy._limit(one, snap, wish=2) == 2
    two = context({"throughput": {"a": 26.0, "b": 25.0}, "cpus": {"a": 1.0, "b": 1.0}}, replicas=2)
    assert policy._limit(two, snap, wish=2) == 2  # it joined: judged from now on
    assert policy._limit(two, snap, wish=2) == 2  # judged: no gain, held from the next tick
    assert policy._limit(two, snap, wish=2) == 1
    assert policy._limited_by == "no_gain"


def settings(**kw: object) -> ModelSettings:
    return ModelSettings(name="m", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("threads", "cpus", "device", "fitted"),
    [
        (2, 1.0, "cpu", 1),  # local.yaml before: 2 threads on 1 reserved CPU
        (2, 2.0, "cpu", 2),
        (None, 3.0, "cpu", 3),
        (1, 0.5, "cpu", 1),  # at least one thread
        (8, 1.0, "cuda", 8),  # a GPU replica's threads feed the GPU: left alone
        (4, None, "cpu", 4),  # outside Ray: nothing reserved, nothing to fit
    ],
)
def test_a_cpu_replica_runs_no_more_threads_than_ray_reserved(
    threads: int | None, cpus: float | None, device: str, fitted: int
) -> None:
    assert fit_threads(settings(torch_threads=threads, device=device), cpus).torch_threads == fitted


def nice_of(thread_id: int) -> int | None:
    """A thread's niceness; None for one that ended since /proc listed it (a joined thread
    can linger there for a moment)."""
    try:
        return os.getpriority(os.PRIO_PROCESS, thread_id)
    except ProcessLookupError:
        return None


def test_a_replica_asks_for_full_priority_for_all_its_threads() -> None:
    pid = os.fork()
    if pid == 0:  # a child at Ray's worker niceness, as `serve run` starts a replica
        os.nice(15)
        ready, go = threading.Event(), threading.Event()
        older = threading.Thread(target=lambda: (ready.set(), go.wait()))  # a Ray thread, say
        older.start()
        ready.wait()
        expected = 0 if os.geteuid() == 0 else 15
        ok = run_at_full_priority() == expected
        newer = []
        younger = threading.Thread(target=lambda: newer.append(os.getpriority(os.PRIO_PROCESS, 0)))
        younger.start()
        younger.join()
        nices = {nice_of(int(t)) for t in os.listdir("/proc/self/task")} - {None}
        go.set()
        older.join()
        os._exit(0 if ok and nices == {expected} and newer == [expected] else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_the_null_runner_answers_the_shape_of_an_embedding_without_a_model() -> None:
    from sluice.errors import InvalidInput
    from sluice.protocol import Job
    from sluice.runners import build_runner

    runner = build_runner(settings(task="null", model_path="null:8", max_batch_size=4))
    runner.load()
    jobs = [Job("0-0", "a", {"text": "hello world"}, {}), Job("0-0", "b", {"text": 3}, {})]
    encoded = runner.encode(jobs)
    assert isinstance(encoded[1], InvalidInput)
    good = [e for e in encoded if not isinstance(e, InvalidInput)]
    (vector,) = runner.finish(runner.run(runner.collate(good)), good)
    assert len(vector) == 8 and abs(sum(v * v for v in vector) - 1.0) < 1e-6
