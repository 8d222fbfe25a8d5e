"""`sluice up` stopped by each signal, to its pid and to its group (issue 19): one orderly
stop, nothing it started left, no job held by a stopped replica."""

from __future__ import annotations

import os
import signal

import pytest
import redis

from sluice.protocol import GROUP, jobs_key, result_key
from sluice.stack import RedisServer, free_port, redis_answers
from tests.helpers import wait_for, xadd_jobs
from tests.integration.local_stack import (
    ALARMING,
    serving,
    start_up,
    stopped,
)

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("sig", "to_group", "ignore_sigint"),
    [
        (signal.SIGINT, False, True),
        (signal.SIGTERM, False, False),
        (signal.SIGINT, True, False),
    ],
    ids=["sigint-pid-inherited-ignored", "sigterm-pid", "sigint-group"],
)
def test_up_stops_in_order_on_each_signal_and_leaves_nothing(
    tmp_path, tiny_config, sig, to_group, ignore_sigint
):
    """`sluice up &` from a script (SIGINT ignored on the way in, and still the way to stop
    it), `kill PID`, Ctrl-C in a terminal (the group): one orderly stop, and the redis-server
    it started goes with it. (SIGTERM to the group, mid-drain: the next test.)"""
    url = f"redis://127.0.0.1:{free_port()}/0"
    log = tmp_path / "up.log"
    proc = start_up(tiny_config, url, log, ignore_sigint=ignore_sigint)
    child = serving(proc, log)
    client = redis.Redis.from_url(url)
    client.xadd(jobs_key("minilm"), {"id": "up-1", "input": '{"text": "hi"}'})
    wait_for(lambda: client.get(result_key("minilm", "up-1")), 60, what="a result")

    if to_group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    text = stopped(proc, log, child)
    assert "stopping" in text and "stack stopped." in text
    assert not [line for line in text.splitlines() if any(a in line for a in ALARMING)], text
    assert not redis_answers(url), "the redis-server that `sluice up` started is still running"


def test_up_stops_on_sigterm_to_its_group_and_every_job_is_answered_or_waits(tmp_path, tiny_config):
    """SIGTERM to the whole group (systemd, `kill -TERM -PGID`) while the replica is busy:
    one orderly stop, no stack trace, and every job either answered or still waiting in the
    stream, none held by a consumer that is gone (nothing waits out a visibility timeout)."""
    server = RedisServer().start()  # the user's Redis: it outlives the stack
    try:
        log = tmp_path / "up.log"
        proc = start_up(tiny_config, server.url, log)
        child = serving(proc, log)
        client = redis.Redis.from_url(server.url, decode_responses=True)
        ids = xadd_jobs(client, "minilm", [f"job number {i}" for i in range(20_000)], prefix="up")
        wait_for(lambda: client.get(result_key("minilm", ids[0])), 60, what="a first result")

        os.killpg(proc.pid, signal.SIGTERM)
        text = stopped(proc, log, child)
        assert not [line for line in text.splitlines() if any(a in line for a in ALARMING)], text
        answered = [i for i in ids if client.exists(result_key("minilm", i))]
        waiting = {e[1]["id"] for e in client.xrange(jobs_key("minilm"))}
        pending = client.xpending(jobs_key("minilm"), GROUP)["pending"]
        assert pending == 0, "jobs held by a stopped replica wait out the visibility timeout"
        assert 0 < len(answered) < len(ids), "the stop did not come mid-drain"
        assert set(ids) <= set(answered) | waiting, "a job neither answered nor waiting"
    finally:
        server.cleanup()
