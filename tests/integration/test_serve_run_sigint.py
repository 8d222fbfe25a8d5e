"""`serve run deployments/local.yaml` stopped by Ctrl-C, to its pid and to its group (issue
19): Serve's graceful stop, so the replicas answer what they hold, nothing is left pending,
no Ray process is left, nothing alarming is printed beyond Ray's own notices (serve_run.py),
and the next replica answers the rest."""

from __future__ import annotations

import signal

import pytest

from sluice.settings import QueueSettings
from sluice.stack import RedisServer
from tests.integration.serve_run import next_replica_answers_the_rest, small_config, stop_mid_drain

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("to_group", [False, True], ids=["pid", "group"])
def test_serve_run_stops_on_sigint_and_leaves_nothing_pending(tmp_path, tiny_bert, to_group):
    config = small_config(tmp_path / "tiny.yaml", tiny_bert)
    server = RedisServer().start()
    try:
        log = tmp_path / "serve-run.log"
        stopped = stop_mid_drain(
            config, server, log, signal.SIGINT, to_group=to_group, ignore_sigint=False
        )
        assert stopped.pending == 0, "a graceful stop left jobs held by a stopped replica"
        next_replica_answers_the_rest(server, stopped.ids, QueueSettings(block_ms=100))
    finally:
        server.cleanup()
