"""Redis goes away mid-run: the replica backs off and resumes by itself, the SDK client
reconnects, and every job whose submit returned is answered exactly once."""

from __future__ import annotations

import signal
import threading
from typing import Any

import pytest
import redis

from sluice.client import Client
from sluice.stack import RedisServer
from tests.checker import check_exactly_once
from tests.helpers import wait_all_results, wait_for, xadd_jobs

pytestmark = pytest.mark.integration

CHUNK = 10


class Submitter:
    """Submits chunks of jobs through the SDK (admission) from a thread, at a steady pace,
    and records which submits returned and which raised."""

    def __init__(self, client: Client, model: str, pause_s: float = 0.03) -> None:
        self.client, self.model, self.pause_s = client, model, pause_s
        self.returned: list[str] = []
        self.raised: list[str] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="submitter", daemon=True)
        self._n = 0

    def start(self) -> Submitter:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "a submit hung"

    def _run(self) -> None:
        while not self._stop.wait(self.pause_s):
            ids = [f"j-{self._n + k}" for k in range(CHUNK)]
            self._n += CHUNK
            texts = [f"text {i}" for i in ids]
            try:
                self.client.submit_many(self.model, texts, ids=ids)
            except Exception as exc:  # an outage: recorded, the ids may or may not be queued
                self.errors.append(exc)
                self.raised += ids
            else:
                self.returned += ids


def test_redis_kill_and_restart_mid_run(deploy, model_name, tiny_bert):
    # AOF with appendfsync always: a write is on disk before Redis replies to it, so a
    # SIGKILL loses nothing any client was told had happened.
    server = RedisServer(extra_args=("--appendonly", "yes", "--appendfsync", "always")).start()
    try:
        r = redis.Redis.from_url(server.url)
        handle = deploy(model_name, tiny_bert, url=server.url, max_batch_size=8)
        pid = handle.info.remote().result(timeout_s=30)["pid"]
        with Client(server.url) as client:
            submitter = Submitter(client, model_name).start()
            wait_for(lambda: len(submitter.returned) >= 300, 60, what="submits under way")
            wait_all_results(r, model_name, submitter.returned[:100], timeout_s=60)

            _kill(server)
            wait_for(lambda: len(submitter.errors) >= 3, 60, what="submits to fail")
            wait_for(lambda: _stats(handle)["redis_errors"] > 0, 30, what="the replica to notice")
            mark = len(submitter.returned)
            server.start()

            # The same client, no new connection made by the test: redis-py reconnects.
            wait_for(lambda: len(submitter.returned) >= mark + 300, 60, what="submits resume")
            submitter.stop()
            r = redis.Redis.from_url(server.url)
            report = check_exactly_once(
                r,
                model_name,
                submitter.returned,
                reply_streams=[client._async.reply_stream],
                expect_status="ok",
                timeout_s=120,
            )
            # The failed submits, retried with the same ids: the ones that did enter before
            # the outage are not queued twice (admission dedupes), so every id of the run
            # ends with exactly one answer.
            client.submit_many(model_name, submitter.raised, ids=submitter.raised)
            everything = submitter.returned + submitter.raised
            check_exactly_once(
                r,
                model_name,
                everything,
                reply_streams=[client._async.reply_stream],
                expect_status="ok",
                timeout_s=60,
            )
        assert report.ok == len(submitter.returned)
        # The same replica process rode out the outage and came back by itself.
        info = handle.info.remote().result(timeout_s=30)
        assert info["pid"] == pid and info["stats"]["redis_errors"] > 0
    finally:
        server.cleanup()


def test_redis_restart_without_persistence_recreates_the_group(deploy, model_name, tiny_bert):
    server = RedisServer().start()
    try:
        r = redis.Redis.from_url(server.url)
        deploy(model_name, tiny_bert, url=server.url)
        wait_all_results(r, model_name, xadd_jobs(r, model_name, ["one"], prefix="a"), 60)

        server.stop()
        server.start()  # empty: no stream, no group

        r = redis.Redis.from_url(server.url)
        ids = xadd_jobs(r, model_name, [f"after {i}" for i in range(20)], prefix="b")
        check_exactly_once(r, model_name, ids, expect_status="ok", timeout_s=60)
    finally:
        server.cleanup()


def _kill(server: RedisServer) -> None:
    """SIGKILL: no shutdown save, no goodbye to clients; only the AOF survives."""
    assert server.proc is not None
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    server.proc = None


def _stats(handle: Any) -> dict[str, Any]:
    stats: dict[str, Any] = handle.info.remote().result(timeout_s=30)["stats"]
    return stats
