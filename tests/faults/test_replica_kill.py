"""A replica SIGKILLed three times mid-run: Serve restarts it each time, and every job still
gets exactly one `ok` result, with no dead letter."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

from tests.checker import check_exactly_once
from tests.faults.feeder import Feeder
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

KILLS = 3
BATCH = 8
QUEUE = {
    "visibility_timeout_s": 2,
    "reclaim_interval_s": 0.5,
    "max_deliveries": 10,
    "reply_maxlen": 1_000_000,
}


def test_three_sigkills_mid_run_lose_nothing(r, deploy, model_name, tiny_bert):
    handle = deploy(
        model_name,
        tiny_bert,
        max_batch_size=BATCH,
        # A small visibility timeout, so a dead replica's entries come back within seconds.
        # max_deliveries 10, not the default 3: a job pulled by each of the killed replicas
        # is delivered four times, and on this 2-core box a restarted replica may also
        # reclaim a slow live entry once more. Dead-lettering it would be the retry policy
        # at work, not a loss, but this test's promise is every job `ok`.
        # Every answer kept on the reply stream, for the exactly-once check.
        queue=QUEUE,
    )
    reply = f"sluice:reply:{model_name}"
    # Kept at most 300 jobs ahead of the answers, and fed until the last replica has made
    # progress of its own: jobs are still coming after the last kill, however fast the box.
    feeder = Feeder(r, model_name, 500_000, reply_to=reply, ahead=300).start()
    pids = [handle.info.remote().result(timeout_s=30)["pid"]]

    for kill in range(KILLS):
        mark = feeder.answered()
        # Each replica, the restarted ones too, makes progress of its own before it dies.
        wait_for(lambda m=mark: feeder.answered() >= m + 300, 90, what=f"progress {kill}")
        assert feeder.sent < len(feeder.ids), "kill mid-run, not after the last job was sent"
        os.kill(pids[-1], signal.SIGKILL)
        pids.append(wait_for(lambda: _new_pid(handle, pids), 90, what=f"replica {kill + 2}"))

    mark = feeder.answered()
    wait_for(lambda: feeder.answered() >= mark + 300, 90, what="progress after the last kill")
    feeder.stop()
    report = check_exactly_once(
        r,
        model_name,
        feeder.ids,
        reply_streams=[reply],
        # An entry is acked only after its push: a kill between a batch's store and its
        # push leaves the entries pending, and the replica that reclaims them pushes the
        # stored results. So no push is missing; a re-run or a repeated push may happen,
        # a second, different answer may not.
        max_missing_pushes=0,
        expect_status="ok",
        timeout_s=180,
    )
    assert report.ok == len(feeder.ids) and not report.dead and not report.dead_without_id
    assert len(set(pids)) == KILLS + 1, pids
    # The last kill caught entries in flight: the replica that followed reclaimed them.
    assert handle.info.remote().result(timeout_s=30)["stats"]["reclaimed"] > 0


def _new_pid(handle: Any, old: list[int]) -> int | None:
    """The pid of the replica serving now, once it is one none of `old`."""
    try:
        pid = int(handle.info.remote().result(timeout_s=5)["pid"])
    except Exception:  # the killed actor, until Serve notices it is gone
        return None
    return None if pid in old else pid
