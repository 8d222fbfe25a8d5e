"""A graceful stop (Serve deletes, scales down or replaces a replica) finishes what it pulled:
no job lost, none answered twice."""

from __future__ import annotations

from typing import Any

import pytest
from ray import serve

from sluice.protocol import GROUP, jobs_key
from tests.checker import check_exactly_once
from tests.faults.feeder import Feeder
from tests.helpers import group_pending, results_of, wait_for

pytestmark = pytest.mark.integration


def test_graceful_stop_answers_everything_it_pulled(r, deploy, model_name, tiny_bert):
    deploy(model_name, tiny_bert, max_batch_size=8, prefetch_batches=4)
    reply = f"sluice:reply:{model_name}"
    # Kept 400 jobs ahead of the answers, so the stop lands mid-run however fast the box.
    feeder = Feeder(r, model_name, 50_000, reply_to=reply, ahead=400).start()
    wait_for(lambda: feeder.answered() >= 200, 60, what="the run to be under way")

    serve.delete(model_name, _blocking=True)
    feeder.stop()
    ids = feeder.ids

    # Everything pulled was answered and acked; the consumer left the group clean.
    assert group_pending(r, model_name) == 0
    assert r.xinfo_consumers(jobs_key(model_name), GROUP) == []
    done = sum(v is not None for v in results_of(r, model_name, ids).values())
    assert 0 < done < len(ids), "stop the replica mid-run, not before or after"

    # The rest is served by the next replica, each job once.
    deploy(model_name, tiny_bert, max_batch_size=64)
    check_exactly_once(r, model_name, ids, reply_streams=[reply], expect_status="ok")


def test_scale_down_and_redeploy_mid_run(r, deploy, model_name, tiny_bert):
    # A 60 s visibility timeout (the default): nothing here waits on a reclaim. Every answer
    # kept on the reply stream, for the exactly-once check.
    queue = {"visibility_timeout_s": 60, "reply_maxlen": 1_000_000}
    deploy(model_name, tiny_bert, num_replicas=2, max_batch_size=8, prefetch_batches=4, queue=queue)
    reply = f"sluice:reply:{model_name}"
    # Kept 300 jobs ahead of the answers, so each stop finds batches pulled and queued, and
    # fed until both changes are over, however long Serve takes over them.
    feeder = Feeder(r, model_name, 500_000, reply_to=reply, ahead=300).start()

    # Scale down 2 -> 1: the same config, so Serve stops one replica gracefully.
    wait_for(lambda: feeder.answered() >= 300, 60, what="the run to be under way")
    deploy(model_name, tiny_bert, num_replicas=1, max_batch_size=8, prefetch_batches=4, queue=queue)
    wait_for(lambda: _replicas(model_name) == {"RUNNING": 1}, 60, what="the scale-down")
    mark = feeder.answered()

    # Redeploy with a changed config: Serve replaces the replica (a rolling update).
    wait_for(lambda: feeder.answered() >= mark + 300, 60, what="progress after scale-down")
    handle = deploy(model_name, tiny_bert, num_replicas=1, max_batch_size=16, queue=queue)
    wait_for(lambda: _replicas(model_name) == {"RUNNING": 1}, 60, what="the old replica gone")
    mark = feeder.answered()
    wait_for(lambda: feeder.answered() >= mark + 300, 60, what="progress after the redeploy")
    feeder.stop()
    assert len(feeder.ids) < 500_000, "both changes landed mid-run"

    # No crash here: every job answered once and pushed once, none dead-lettered, and
    # (with a 60 s visibility timeout) none left to a reclaim to finish.
    check_exactly_once(r, model_name, feeder.ids, reply_streams=[reply], expect_status="ok")
    live = handle.info.remote().result(timeout_s=30)
    assert live["stats"]["reclaimed"] == 0
    # The stopped replicas drained and left the group; only the live one is in it.
    assert _consumers(r, model_name) <= {live["consumer"]}


def _replicas(app: str) -> dict[str, int]:
    """The app's replicas by state (STARTING, RUNNING, STOPPING...)."""
    deployments = serve.status().applications[app].deployments
    states = deployments["Replica"].replica_states
    return {getattr(k, "value", str(k)): n for k, n in states.items() if n}


def _consumers(r: Any, model: str) -> set[str]:
    return {c["name"].decode() for c in r.xinfo_consumers(jobs_key(model), GROUP)}


def test_rolling_update_with_thousands_queued(r, deploy, model_name, tiny_bert):
    """A changed config deployed while thousands of jobs wait and a replica is mid-batch. The
    old replica finishes what it pulled and leaves; the new one takes the rest."""
    reply = f"sluice:reply:{model_name}"
    queue = {"reply_maxlen": 1_000_000}  # every answer kept on the reply stream, to count them
    handle = deploy(model_name, tiny_bert, max_batch_size=32, queue=queue)
    old = handle.info.remote().result(timeout_s=30)
    # Kept 4,000 jobs past the answers: thousands queued whenever the update lands, however
    # fast the box drains them.
    feeder = Feeder(r, model_name, 500_000, reply_to=reply, ahead=4000).start()
    wait_for(lambda: feeder.answered() >= 1000, 60, what="the old replica well under way")
    queued = feeder.sent - feeder.answered()
    handle = deploy(model_name, tiny_bert, max_batch_size=16, queue=queue)
    new = handle.info.remote().result(timeout_s=30)
    assert new["pid"] != old["pid"]
    wait_for(
        lambda: handle.info.remote().result(timeout_s=30)["stats"]["ok"] >= 1000,
        60,
        what="the new replica under way",
    )
    feeder.stop()
    assert queued >= 2000, f"the update landed with {queued} jobs queued, not thousands"

    check_exactly_once(r, model_name, feeder.ids, reply_streams=[reply], expect_status="ok")
    stats = handle.info.remote().result(timeout_s=30)["stats"]
    assert 0 < stats["ok"] < len(feeder.ids)  # both served
    assert stats["reclaimed"] == stats["duplicates"] == 0
    assert _consumers(r, model_name) <= {new["consumer"]}
