"""Shared by the tests of `sluice up` and `sluice demo` (test_local_stack*.py): the stack
started in a session of its own, and the checks of its stop. (The shipped config made small,
`tiny_config`, is a fixture of conftest.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from sluice.stack import RUN_DIR_ENV, free_port
from sluice.supervisor import session_members
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]


def start_up(
    config: Path, url: str, log: Path, *, ignore_sigint: bool = False, verb: str = "up"
) -> subprocess.Popen[bytes]:
    """`sluice up` (or `verb`) in a session of its own (so a group signal reaches only what it
    started), optionally with SIGINT ignored as inherited by `sluice up &` from a script."""

    def prepare() -> None:
        os.setsid()
        if ignore_sigint:
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    with log.open("w") as out:
        command = [sys.executable, "-m", "sluice.cli", verb, "--config", str(config)]
        command += ["--redis-url", url, "--num-cpus", "1", "--metrics-port", str(free_port())]
        env = {**os.environ, "RAY_ADDRESS": "local"}
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, preexec_fn=prepare, env=env
        )


def serving(proc: subprocess.Popen[bytes], log: Path) -> psutil.Process:
    """Waits for the stack to serve; returns the supervised child that runs it."""
    wait_for(lambda: "stops everything" in log.read_text(), 180, 0.2, "sluice up serving")
    [child] = psutil.Process(proc.pid).children()
    return child


def stopped(
    proc: subprocess.Popen[bytes], log: Path, child: psutil.Process, expect: int = 0
) -> str:
    """Waits for the exit (status `expect`), checks that nothing it started is left; the log."""
    try:
        status = proc.wait(150)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert status == expect, text
    assert not session_members(child.pid), f"left running: {session_members(child.pid)}\n{text}"
    return text


ALARMING = ("Traceback", "SIGTERM received", "logging.cc", "failed", "Token authentication")


def ended(proc: psutil.Process) -> bool:
    """Exited: gone, or a zombie. An orphan's new parent may be a subreaper that does not reap
    it: Ray makes its driver one, and under pytest-xdist this test's process is a driver."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def run_dir(child: psutil.Process) -> Path:
    """The folder the stack's own files go in (its redis-server's), removed at every end."""
    return Path(child.environ()[RUN_DIR_ENV])
