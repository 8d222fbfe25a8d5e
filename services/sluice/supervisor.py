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

import atexit
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

import psutil

from sluice.stack import RUN_DIR_ENV

log = logging.getLogger(__name__)

SUPERVISED_ENV = "SLUICE_SUPERVISED"
READY_FD_ENV = "SLUICE_SUPERVISOR_READY_FD"
PARENT_ENV = "SLUICE_SUPERVISOR_PID"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def supervised() -> bool:
    """True in the child that runs the stack (it must not supervise itself again)."""
    return os.environ.get(SUPERVISED_ENV) == "1"


class _Stops:
    """The stop signals the supervisor has received: the first asks for the orderly stop,
    the second forces it (the stack is killed at once, as after `stop_timeout_s`)."""

    def __init__(self, stop_timeout_s: float) -> None:
        self.asked = threading.Event()
        self.forced = threading.Event()
        self.stop_timeout_s = stop_timeout_s

    def on_signal(self, signum: int, frame: object) -> None:
        if not self.asked.is_set():
            self.asked.set()
            return
        if not self.forced.is_set():
            print(
                "forced: killing the stack now (the next replica to run takes the jobs its "
                "replicas held)",
                file=sys.stderr,
                flush=True,
            )
            self.forced.set()


def run_supervised(argv: Sequence[str], stop_timeout_s: float) -> int:
    """Runs `python -m sluice.cli *argv` as the supervised child; returns its exit status.

    The first SIGINT, SIGTERM or SIGHUP is relayed to the child as one SIGINT, once the child
    says it can take it (before that it is still importing, and a KeyboardInterrupt there
    would be a traceback). A second one kills the stack at once.
    """
    stops = _Stops(stop_timeout_s)
    # Blocked signals are inherited too (and would never arrive): unblocked first. Handlers
    # are installed before the child starts: a handler (unlike SIG_IGN) is reset to the
    # default across exec, so the child stops on SIGINT whatever this process inherited.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    for sig in STOP_SIGNALS:
        signal.signal(sig, stops.on_signal)
    ready_r, ready_w = os.pipe()
    # The stack's own files (its redis-server's folder) go here, removed below even when the
    # stack was killed and could not remove them itself.
    run_dir = tempfile.mkdtemp(prefix="sluice-up-")
    env = {**os.environ, SUPERVISED_ENV: "1", READY_FD_ENV: str(ready_w), RUN_DIR_ENV: run_dir}
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
        _wait_until_ready_or_ended(child, ready_r, stops)
        status = _supervise(child, stops)
    finally:
        os.close(ready_r)
        # Whatever the child's own stop missed (or all of it, after a kill).
        leftovers = kill_session(child.pid)
        if leftovers:
            log.info("stopped %d process(es) the stack had not stopped itself", leftovers)
        shutil.rmtree(run_dir, ignore_errors=True)
    if status < 0:  # killed by a signal: the shell's convention, 128 + its number
        print(f"the stack was killed by signal {-status}", file=sys.stderr)
        status = 128 - status
    return status


def _wait_until_ready_or_ended(child: subprocess.Popen[bytes], ready_r: int, stops: _Stops) -> None:
    """Until the child is past its imports (a byte on the pipe), or gone (EOF), or the stop
    is forced (a child that hangs before it is ready must not outlast a second signal)."""
    while _running(child) and not stops.forced.is_set():
        readable, _, _ = select.select([ready_r], [], [], 0.2)
        if readable:
            return


def _supervise(child: subprocess.Popen[bytes], stops: _Stops) -> int:
    """Relays the first stop as one SIGINT, kills on the second or past the timeout; the
    child's exit status."""
    while _running(child) and not stops.asked.wait(0.2):
        pass
    if child.poll() is not None:
        return child.returncode
    if stops.forced.is_set():
        return _kill(child)
    child.send_signal(signal.SIGINT)
    deadline = time.monotonic() + stops.stop_timeout_s
    while _running(child):
        if stops.forced.wait(0.2):
            break
        if time.monotonic() > deadline:
            print(
                f"the stack did not stop in {stops.stop_timeout_s:.0f}s; killing it",
                file=sys.stderr,
            )
            break
    if child.poll() is not None:
        return child.returncode
    return _kill(child)


def _kill(child: subprocess.Popen[bytes]) -> int:
    """The child at once (the rest of its session goes after it); the status of a forced
    stop."""
    child.kill()
    child.wait()
    return 1


def _running(child: subprocess.Popen[bytes]) -> bool:
    """Whether the child still runs. As PID 1 (a container started without an init), this
    process is also the parent of every orphan of the stack (a Ray worker whose raylet went
    first): those are reaped on the way, or they would stay zombies while the stack runs."""
    if os.getpid() == 1:
        reap_orphans(keep=child.pid)
    return child.poll() is None


def reap_orphans(keep: int) -> int:
    """Reaps every child of this process that has exited, but `keep` (the supervised child,
    which `Popen` waits for itself); how many."""
    reaped = 0
    while True:
        try:
            # WNOWAIT: look first, so that `keep` is left for Popen to reap.
            exited = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return reaped  # no children at all
        if exited is None or exited.si_pid in (0, keep):
            return reaped
        os.waitpid(exited.si_pid, 0)
        reaped += 1


def child_started() -> None:
    """In the supervised child, once it can take a SIGINT: tells the supervisor, and starts
    the watch that stops the stack should the supervisor die (SIGKILL), so that the stack
    never outlives it."""
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is not None:
        try:
            os.write(int(fd), b"1")
            os.close(int(fd))
        except OSError:
            pass  # the supervisor is gone: the watch below stops us
    signal.signal(signal.SIGINT, _on_stop)
    run_dir = os.environ.get(RUN_DIR_ENV)
    if run_dir is not None:
        # The supervisor removes it too, unless it was killed: then only we can.
        atexit.register(shutil.rmtree, run_dir, ignore_errors=True)
    parent = os.environ.get(PARENT_ENV)
    if parent is not None:
        watch = threading.Thread(
            target=_stop_when_orphaned, args=(int(parent),), name="supervisor-watch", daemon=True
        )
        watch.start()


_stop_asked = threading.Event()


def _on_stop(signum: int, frame: object) -> None:
    """Python's own SIGINT handler, remembering that a stop is under way."""
    _stop_asked.set()
    raise KeyboardInterrupt


def _stop_when_orphaned(supervisor_pid: int, poll_s: float = 0.5) -> None:
    """Sends this process one SIGINT once its parent is no longer the supervisor.

    A watch rather than the kernel's parent-death signal (PR_SET_PDEATHSIG): that one fires
    when the forking *thread* ends and is lost if the parent died before it was asked for,
    and it cannot say why the stack stops. Only one SIGINT is ever sent: a second would
    interrupt the orderly stop the first began (the supervisor's relayed one, say, should
    the supervisor be killed while the stack stops).
    """
    while os.getppid() == supervisor_pid:
        time.sleep(poll_s)
    if _stop_asked.is_set():
        return
    print(f"the supervisor (pid {supervisor_pid}) is gone; stopping the stack", file=sys.stderr)
    os.kill(os.getpid(), signal.SIGINT)


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
