"""Entries left pending by a vanished consumer are reclaimed; over-delivered ones dead-lettered."""

from __future__ import annotations

import pytest

from sluice.protocol import GROUP, jobs_key
from tests.helpers import dead_letters, group_pending, wait_all_results, wait_for, xadd_jobs

pytestmark = pytest.mark.integration


def test_pending_entries_of_a_vanished_consumer_are_reclaimed(r, deploy, model_name, tiny_bert):
    stream = jobs_key(model_name)
    r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    ids = xadd_jobs(r, model_name, [f"stranded {i}" for i in range(12)])
    # A consumer that read everything and died before answering anything.
    r.xreadgroup(GROUP, "ghost", {stream: ">"}, count=100)
    # One entry has already been delivered 5 times: it crashed replicas before.
    poison = r.xpending_range(stream, GROUP, "-", "+", 1)[0]["message_id"]
    r.xclaim(stream, GROUP, "ghost", 0, [poison], retrycount=5)
    assert group_pending(r, model_name) == 12

    deploy(
        model_name,
        tiny_bert,
        queue={"visibility_timeout_s": 1, "reclaim_interval_s": 0.2, "max_deliveries": 3},
    )

    results = wait_all_results(r, model_name, ids, timeout_s=60)
    statuses = {job_id: res["status"] for job_id, res in results.items()}
    assert statuses.pop("job-0") == "error"
    assert results["job-0"]["error"]["code"] == "dead_lettered"
    assert set(statuses.values()) == {"ok"}
    (letter,) = dead_letters(r, model_name)
    assert letter["id"] == "job-0" and int(letter["deliveries"]) > 3
    assert "max_deliveries" in letter["reason"]
    wait_for(lambda: group_pending(r, model_name) == 0, 10, what="nothing pending")
