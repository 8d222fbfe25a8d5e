"""A graceful stop (Serve deletes or replaces the replica) finishes what it pulled."""

from __future__ import annotations

import pytest
from ray import serve

from sluice.protocol import GROUP, jobs_key
from tests.helpers import group_pending, results_of, wait_all_results, wait_for, xadd_jobs

pytestmark = pytest.mark.integration


def test_graceful_stop_answers_everything_it_pulled(r, deploy, model_name, tiny_bert):
    deploy(model_name, tiny_bert, max_batch_size=8, prefetch_batches=4)
    ids = xadd_jobs(r, model_name, [f"text {i} " + "pad " * (i % 60) for i in range(3000)])
    wait_for(
        lambda: any(v is not None for v in results_of(r, model_name, ids[:200]).values()),
        60,
        what="the run to be under way",
    )

    serve.delete(model_name, _blocking=True)

    # Everything pulled was answered and acked; the consumer left the group clean.
    assert group_pending(r, model_name) == 0
    assert r.xinfo_consumers(jobs_key(model_name), GROUP) == []
    done = sum(v is not None for v in results_of(r, model_name, ids).values())
    assert 0 < done < len(ids), "stop the replica mid-run, not before or after"

    # The rest is served by the next replica, each job once.
    deploy(model_name, tiny_bert, max_batch_size=64)
    results = wait_all_results(r, model_name, ids, timeout_s=120)
    assert {res["status"] for res in results.values()} == {"ok"}
