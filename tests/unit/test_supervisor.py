"""The supervisor of `sluice up`, without a stack: a second stop signal kills a child that
hangs before it is ready; as PID 1 (a container started without an init), it reaps the
stack's orphans and leaves its own child to `Popen` (in a PID namespace of its own: `unshare`,
as an unprivileged user namespace)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

from tests.helpers import wait_for

LOCAL_YAML = Path(__file__).resolve().parents[2] / "deployments" / "local.yaml"

# util-linux's, in every Debian; an unprivileged user namespace, so that no root is needed.
UNSHARE = ("unshare", "--user", "--map-root-user", "--pid", "--fork")
AS_PID_1 = textwrap.dedent(
    """
    import json, os, subprocess, sys, time
    from sluice.supervisor import reap_orphans

    assert os.getpid() == 1
    stack = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    # Three processes orphaned at once (their parent shell exits), ours as PID 1's.
    subprocess.run(["sh", "-c", "for i in 1 2 3; do (sleep 0.1 &); done"], check=True)
    time.sleep(1.0)
    exited = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    reaped = reap_orphans(keep=stack.pid)
    again = reap_orphans(keep=stack.pid)
    stack_runs = stack.poll() is None
    stack.kill()
    print(json.dumps({"zombie_before": exited is not None, "reaped": reaped, "again": again,
                      "stack_runs": stack_runs, "stack_status": stack.wait()}))
    """
)


def test_as_pid_1_the_supervisor_reaps_orphans_and_leaves_the_stack_to_popen():
    out = subprocess.run(
        [*UNSHARE, sys.executable, "-c", AS_PID_1],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert facts == {
        "zombie_before": True,
        "reaped": 3,
        "again": 0,
        "stack_runs": True,
        "stack_status": -9,
    }, out.stderr


SLOW_START = textwrap.dedent(
    """
    import os, time
    if os.environ.get("SLUICE_SUPERVISED") == "1":
        time.sleep(60)  # the stack's child, hanging before it can take a stop
    """
)


def test_a_second_stop_signal_kills_a_child_that_hangs_before_it_is_ready(tmp_path):
    """The first signal waits for the child to be ready (a KeyboardInterrupt during its imports
    would be a traceback); the second kills it whatever it is doing."""
    (tmp_path / "sitecustomize.py").write_text(SLOW_START)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    command = [sys.executable, "-m", "sluice.cli", "up", "--config", str(LOCAL_YAML)]
    proc = subprocess.Popen(
        [*command, "--metrics-port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(lambda: len(psutil.Process(proc.pid).children()) == 1, 30, what="the child")
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        out, _ = proc.communicate(timeout=30)
        took_s = time.monotonic() - started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, out
    assert "forced: killing the stack now" in out, out
    assert took_s < 5, f"the forced stop took {took_s:.1f}s"
