"""The load test's peer: Ray Serve asynchronous inference (Celery, Redis) behind `PeerTarget`."""

from __future__ import annotations

import uuid

import pytest
import redis
from loadtest.peer import PeerTarget
from loadtest.target import Completion

from sluice.settings import ModelSettings
from tests.helpers import wait_for

pytestmark = pytest.mark.integration


def test_peer_serves_jobs_through_celery_and_stops(ray_serve, admin_url, tiny_bert):
    from ray import serve

    tag = uuid.uuid4().hex[:8]
    # Celery needs broad commands (LPUSH/BRPOP on its own keys, pub/sub, KEYS...): the admin.
    target = PeerTarget(
        admin_url,
        ModelSettings(model_path=tiny_bert, dtype="fp32"),
        num_cpus=0.5,
        torch_threads=1,
        queue_name=f"peer-{tag}",
        app_name=f"peer-{tag}",
        warmup_jobs=2,
    )
    target.start()
    try:
        app = serve.status().applications[f"peer-{tag}"]
        assert app.status == "RUNNING"
        assert list(app.deployments) == ["PeerConsumer"]
        assert target.queue_depth() == 0
        jobs = [(f"job-{i}", f"sentence number {i} for the peer") for i in range(20)]
        assert target.send(jobs) == []
        got: list[Completion] = []

        def all_done() -> bool:
            got.extend(target.poll(0.2))
            return len(got) >= len(jobs)

        wait_for(all_done, 30, 0.0, "20 peer jobs")
        assert sorted(c.job_id for c in got) == sorted(i for i, _ in jobs)
        assert {c.status for c in got} == {"ok"}
        assert all(0 < c.timings["stored_at_s"] <= c.done_s + 0.5 for c in got)
        assert target.poll(0) == []
        assert target.queue_depth() == 0
        # Celery's keys live on the peer's own database, none on Sluice's.
        with redis.Redis.from_url(admin_url) as r:
            assert not r.exists(f"peer-{tag}")
    finally:
        target.stop()
    assert f"peer-{tag}" not in serve.status().applications
    target.stop()  # twice is fine


def test_peer_keys_go_to_their_own_database():
    from loadtest.peer import on_db

    assert on_db("redis://127.0.0.1:6379/0", 1) == "redis://127.0.0.1:6379/1"
    assert on_db("redis://u:p@h:1", 3) == "redis://u:p@h:1/3"
    assert on_db("rediss://h:1/0?ssl_ca_certs=/x", 1) == "rediss://h:1/1?ssl_ca_certs=/x"
