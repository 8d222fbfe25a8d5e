"""`serve run deployments/local.yaml` stopped by SIGTERM, to its pid, to its group, and with
SIGINT inherited as ignored (issue 19): Ray's driver exits and kills its replicas outright;
no Ray process is left, nothing alarming is printed beyond Ray's own notices (serve_run.py),
no job is lost, and the jobs the killed replicas held are taken by the next replica once its
heartbeat has beaten for a TTL, not a visibility timeout later.

The heartbeat here is fast (every 0.2 s, a TTL of 1 s) and the visibility timeout 5 minutes,
so that what is taken back within the bound is taken by heartbeat; with the defaults (15 s),
tests/integration/test_heartbeats.py's killed worker."""

from __future__ import annotations

import signal

import pytest

from sluice.settings import QueueSettings
from sluice.stack import RedisServer
from tests.integration.serve_run import next_replica_answers_the_rest, small_config, stop_mid_drain

pytestmark = pytest.mark.integration

QUEUE = {"visibility_timeout_s": 300, "heartbeat_interval_s": 0.2, "heartbeat_ttl_s": 1.0}


@pytest.mark.parametrize(
    ("to_group", "ignore_sigint"),
    [(False, False), (True, False), (False, True)],
    ids=["pid", "group", "sigint-inherited-ignored"],
)
def test_serve_run_stops_on_sigterm_and_the_next_replica_takes_what_it_held(
    tmp_path, tiny_bert, to_group, ignore_sigint
):
    config = small_config(tmp_path / "tiny.yaml", tiny_bert, **QUEUE)
    server = RedisServer().start()
    try:
        log = tmp_path / "serve-run.log"
        stopped = stop_mid_drain(
            config, server, log, signal.SIGTERM, to_group=to_group, ignore_sigint=ignore_sigint
        )
        limits = QueueSettings(block_ms=100, reclaim_interval_s=0.5, **QUEUE)
        took_s = next_replica_answers_the_rest(server, stopped.ids, limits)
        if stopped.pending:
            assert took_s < 60, f"{stopped.pending} held jobs waited {took_s:.0f}s"
    finally:
        server.cleanup()
