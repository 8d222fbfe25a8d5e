"""Redis goes away mid-run: the replica backs off, resumes, and answers everything."""

from __future__ import annotations

import pytest

from sluice.stack import RedisServer
from tests.helpers import group_pending, wait_all_results, wait_for, xadd_jobs

pytestmark = pytest.mark.integration


def test_redis_restart_mid_run(deploy, model_name, tiny_bert):
    import redis

    server = RedisServer(extra_args=("--appendonly", "yes", "--appendfsync", "always")).start()
    try:
        r = redis.Redis.from_url(server.url)
        handle = deploy(model_name, tiny_bert, url=server.url, max_batch_size=8)
        first = xadd_jobs(r, model_name, [f"before {i}" for i in range(300)], prefix="a")
        wait_for(lambda: r.exists(f"sluice:{{{model_name}}}:result:a-10"), 60)

        server.stop()
        wait_for(
            lambda: handle.info.remote().result()["stats"]["redis_errors"] > 0,
            30,
            what="the replica to notice the outage",
        )
        server.start()

        r = redis.Redis.from_url(server.url)
        second = xadd_jobs(r, model_name, [f"after {i}" for i in range(100)], prefix="b")
        results = wait_all_results(r, model_name, first + second, timeout_s=120)
        assert {res["status"] for res in results.values()} == {"ok"}
        wait_for(lambda: group_pending(r, model_name) == 0, 30, what="nothing pending")
        assert handle.info.remote().result()["stats"]["redis_errors"] > 0
    finally:
        server.cleanup()


def test_redis_restart_without_persistence_recreates_the_group(deploy, model_name, tiny_bert):
    import redis

    server = RedisServer().start()
    try:
        r = redis.Redis.from_url(server.url)
        deploy(model_name, tiny_bert, url=server.url)
        wait_all_results(r, model_name, xadd_jobs(r, model_name, ["one"], prefix="a"), 60)

        server.stop()
        server.start()  # empty: no stream, no group

        r = redis.Redis.from_url(server.url)
        ids = xadd_jobs(r, model_name, [f"after {i}" for i in range(20)], prefix="b")
        results = wait_all_results(r, model_name, ids, timeout_s=60)
        assert {res["status"] for res in results.values()} == {"ok"}
    finally:
        server.cleanup()
