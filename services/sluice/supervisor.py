"""One orderly stop for `sluice up` and `sluice demo`, however the stop is asked for.

The stack (redis-server, Ray's daemons, the Serve replicas) runs in a child process in a
session of its own; this process only waits and relays. Why a second process:

- A signal sent to the group (Ctrl-C in a terminal, `kill -TERM -PGID`, systemd's
  control-group stop) would otherwise reach redis-server and Ray's daemons at the same moment
  as the driver: Redis dies before the replicas answer their jobs, and Ray's C++ handlers print
  stack traces. In their own session they see nothing until the driver stops them in order.
- A signal that arrives while `ray.init` runs, or SIGTERM, which Ray's driver takes over, would
  skip the orderly stop. Here the child only ever gets SIGINT, from us, once.
- Dispositions inherited as ignored (`sluice up &` from a script ignores SIGINT) are replaced
  before the child starts, so both the supervisor and the child stop on SIGINT.

Past `stop_timeout_s` the child and everything left in its session are killed, so a stop
always ends, and never leaves a redis-server, raylet or worker behind.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence

import psutil

log = logging.getLogger(__name__)

SUPERVISED_ENV = "SLUICE_SUPERVISED"
READY_FD_ENV = "SLUICE_SUPERVISOR_READY_FD"
PARENT_ENV = "SLUICE_SUPERVISOR_PID"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def supervised() -> bool:
    """True in the child that runs the stack (it must not supervise itself again)."""
    return os.environ.get(SUPERVISED_ENV) == "1"


def run_supervised(argv: Sequence[str], stop_timeout_s: float) -> int:
    """Runs `python -m sluice.cli *argv` as the supervised child; returns its exit status.

    The first SIGINT, SIGTERM or SIGHUP is relayed to the child as one SIGINT, once the child
    says it can take it (before that it is still importing, and a KeyboardInterrupt there
    would be a traceback); later ones only say that the stop is under way.
    """
    asked = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        if asked.is_set():
            print(f"still stopping (at most {stop_timeout_s:.0f}s) ...", flush=True)
        asked.set()

    # Blocked signals are inherited too (and would never arrive): unblocked first. Handlers
    # are installed before the child starts: a handler (unlike SIG_IGN) is reset to the
    # default across exec, so the child stops on SIGINT whatever this process inherited.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)
    ready_r, ready_w = os.pipe()
    env = {**os.environ, SUPERVISED_ENV: "1", READY_FD_ENV: str(ready_w)}
    env[PARENT_ENV] = str(os.getpid())
    # -P: not the working directory first on the import path (a user's queue.py or yaml.py
    # must not stand in for the library's), as for the `sluice` script itself.
    child = subprocess.Popen(
        [sys.executable, "-P", "-m", "sluice.cli", *argv],
        env=env,
        start_new_session=True,
        pass_fds=(ready_w,),
    )
    os.close(ready_w)
    try:
        _wait_for_stop(child, asked, ready_r)
        if child.poll() is None:
            child.send_signal(signal.SIGINT)
            status = _wait(child, stop_timeout_s)
        else:
            status = child.returncode
    finally:
        os.close(ready_r)
        # Whatever the child's own stop missed (or all of it, after a kill).
        leftovers = kill_session(child.pid)
        if leftovers:
            log.info("stopped %d process(es) the stack had not stopped itself", leftovers)
    if status < 0:  # killed by a signal: the shell's convention, 128 + its number
        print(f"the stack was killed by signal {-status}", file=sys.stderr)
        status = 128 - status
    return status


def _wait_for_stop(child: subprocess.Popen[bytes], asked: threading.Event, ready_r: int) -> None:
    """Until the child exits, or a stop is asked for and the child can take it."""
    ready = False
    while child.poll() is None:
        if not ready:
            readable, _, _ = select.select([ready_r], [], [], 0.2)
            ready = bool(readable)  # a byte, or EOF: the child is past its imports or gone
        elif asked.wait(0.2):
            return
        if ready and asked.is_set():
            return


def child_started() -> None:
    """In the supervised child, once it can take a SIGINT: tells the supervisor, and asks the
    kernel for a SIGINT should the supervisor die (SIGKILL), so the stack never outlives it."""
    _die_with_parent()
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is not None:
        try:
            os.write(int(fd), b"1")
            os.close(int(fd))
        except OSError:
            pass  # the supervisor is gone: the parent check below stops us
    parent = os.environ.get(PARENT_ENV)
    if parent is not None and os.getppid() != int(parent):
        raise KeyboardInterrupt  # the supervisor died before we could ask to follow it


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, int(signal.SIGINT))


def _wait(child: subprocess.Popen[bytes], timeout_s: float) -> int:
    try:
        return child.wait(timeout_s)
    except subprocess.TimeoutExpired:
        print(f"the stack did not stop in {timeout_s:.0f}s; killing it", file=sys.stderr)
        child.kill()
        child.wait()
        return 1


def session_members(sid: int) -> list[psutil.Process]:
    """The live processes of session `sid` (the child's: its pid is the session's id)."""
    members = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != sid and os.getsid(proc.pid) == sid and proc.status() != "zombie":
                members.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue  # gone meanwhile, or not ours
    return members


def kill_session(sid: int, grace_s: float = 5.0) -> int:
    """SIGTERM, then SIGKILL after `grace_s`, to what is left of session `sid`; how many."""
    members = session_members(sid)
    for proc in members:
        _send(proc, signal.SIGTERM)
    _, alive = psutil.wait_procs(members, timeout=grace_s)
    for proc in alive:
        _send(proc, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=grace_s)
    return len(members)


def _send(proc: psutil.Process, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except psutil.Error:
        pass  # exited meanwhile
