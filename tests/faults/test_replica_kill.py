"""A replica SIGKILLed mid-run: Serve restarts it, and every job still gets exactly one result."""

from __future__ import annotations

import os
import signal

import pytest

from tests.helpers import (
    dead_letters,
    group_pending,
    results_of,
    wait_all_results,
    wait_for,
    xadd_jobs,
)

pytestmark = pytest.mark.integration


def test_sigkill_mid_run_loses_nothing(r, deploy, model_name, tiny_bert):
    handle = deploy(
        model_name,
        tiny_bert,
        max_batch_size=8,
        queue={"visibility_timeout_s": 2, "reclaim_interval_s": 0.5},
    )
    reply = f"replies-{model_name}"
    ids = xadd_jobs(
        r, model_name, [f"job text {i} " + "pad " * (i % 40) for i in range(3000)], reply_to=reply
    )
    first_pid = handle.info.remote().result()["pid"]
    wait_for(
        lambda: sum(v is not None for v in results_of(r, model_name, ids[:300]).values()) >= 100,
        60,
        what="the run to be under way",
    )

    os.kill(first_pid, signal.SIGKILL)

    results = wait_all_results(r, model_name, ids, timeout_s=240)
    assert {res["status"] for res in results.values()} == {"ok"}
    assert dead_letters(r, model_name) == []
    wait_for(lambda: group_pending(r, model_name) == 0, 30, what="nothing pending")
    # Serve replaced the replica: a new process serves the stream now.
    new_pid = wait_for(lambda: _pid_or_none(handle), 60, what="a new replica")
    assert new_pid != first_pid
    # The reply stream carries at most one result per id: a re-run after the crash may
    # happen, a second answer may not (the push follows a winning SET NX only).
    pushed = [f[b"result"] for _, f in r.xrange(reply)]
    pushed_ids = [p.split(b'"id":"', 1)[1].split(b'"', 1)[0].decode() for p in pushed]
    assert len(pushed_ids) == len(set(pushed_ids))
    assert len(pushed_ids) >= len(ids) - 8 * 2  # at most the batches caught mid-write


def _pid_or_none(handle):  # type: ignore[no-untyped-def]
    try:
        return handle.info.remote().result(timeout_s=5)["pid"]
    except Exception:
        return None
