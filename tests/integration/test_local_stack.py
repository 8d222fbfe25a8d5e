"""`sluice demo` and `sluice up` end to end in child processes: their own redis-server, Ray
and Serve config; the demo's stop while it starts, `sluice up` killed outright, and a second
stop signal (issue 19: any stop, however sent, leaves no process behind and no job held).
Each signal to `sluice up`'s pid and group: test_local_stack_signals.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest

from sluice.stack import free_port, redis_answers
from sluice.supervisor import kill_session, session_members
from tests.helpers import wait_for
from tests.integration.local_stack import (
    ALARMING,
    ended,
    run_dir,
    serving,
    start_up,
    stopped,
)

pytestmark = pytest.mark.integration


def test_demo_starts_serves_and_stops_everything(tiny_config):
    url = f"redis://127.0.0.1:{free_port()}/0"

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sluice.cli",
            "demo",
            "--config",
            str(tiny_config),
            "--redis-url",
            url,
            "--num-cpus",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "RAY_ADDRESS": "local"},
    )

    assert out.returncode == 0, out.stdout + out.stderr
    assert "8 jobs through sluice:{minilm}:jobs" in out.stdout
    assert "nearest neighbours:" in out.stdout
    assert "[invalid_input]" in out.stdout
    assert "stack stopped." in out.stdout
    assert not redis_answers(url), "the redis-server the demo started is still running"


def test_demo_stopped_while_its_stack_starts_stops_everything_it_started(tmp_path, tiny_config):
    """SIGTERM to `sluice demo`'s group while Ray and Serve are still starting (the demo's
    redis-server already up): it says it was interrupted (status 130), without a traceback,
    and the redis-server, Ray and replica it started are all gone."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    log = tmp_path / "demo.log"
    proc = start_up(tiny_config, url, log, verb="demo")
    wait_for(lambda: redis_answers(url, 0.2), 60, 0.1, "the demo's redis-server")
    [child] = psutil.Process(proc.pid).children()

    os.killpg(proc.pid, signal.SIGTERM)
    text = stopped(proc, log, child, expect=130)
    assert "interrupted; stopped." in text
    assert not [line for line in text.splitlines() if any(a in line for a in ALARMING)], text
    assert not redis_answers(url), "the redis-server the demo started is still running"


def test_the_stack_stops_itself_when_sluice_up_is_killed(tmp_path, tiny_config):
    """SIGKILL of `sluice up` itself (nothing can be relayed): the stack does not run on as an
    orphan, it says why and stops in order, and nothing is left, its files included."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    log = tmp_path / "up.log"
    proc = start_up(tiny_config, url, log)
    child = serving(proc, log)
    files = run_dir(child)
    try:
        proc.kill()
        proc.wait()
        wait_for(lambda: not session_members(child.pid) and ended(child), 150, 0.2, "the stop")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the log:\n{log.read_text()}") from exc
    finally:
        kill_session(child.pid, grace_s=1.0)  # a failed stop leaves nothing for later tests
    text = log.read_text()
    assert f"the supervisor (pid {proc.pid}) is gone; stopping the stack" in text, text
    assert "stack stopped." in text, text
    assert not redis_answers(url), "the redis-server that `sluice up` started is still running"
    assert not files.exists(), f"{files} is left"


def test_a_second_stop_signal_kills_the_stack_at_once(tmp_path, tiny_config):
    """Ctrl-C twice: the second does not wait for the orderly stop; the stack is killed, and
    still nothing is left, the files that its killed redis-server could not remove included."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    log = tmp_path / "up.log"
    proc = start_up(tiny_config, url, log)
    child = serving(proc, log)
    files = run_dir(child)

    proc.send_signal(signal.SIGINT)
    wait_for(lambda: "stopping ..." in log.read_text(), 30, 0.05, "the orderly stop to begin")
    proc.send_signal(signal.SIGINT)
    text = stopped(proc, log, child, expect=1)
    assert "forced: killing the stack now" in text, text
    assert "stack stopped." not in text, text
    assert not redis_answers(url), "the redis-server that `sluice up` started is still running"
    assert not files.exists(), f"{files} is left"
