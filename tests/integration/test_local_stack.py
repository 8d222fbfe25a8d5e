"""`sluice demo` and `sluice up` end to end in child processes: their own redis-server, Ray
and Serve config, and how they stop (issue 19: any stop signal, however sent, is one orderly
stop that leaves no process behind and no job held)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import redis
import yaml

from sluice.protocol import GROUP, jobs_key, result_key
from sluice.stack import RUN_DIR_ENV, RedisServer, free_port, redis_answers
from sluice.supervisor import kill_session, session_members
from tests.helpers import wait_for, xadd_jobs

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tiny_config(tmp_path, tiny_bert) -> Path:
    """deployments/local.yaml with the tiny model and half a CPU: the shipped config, small."""
    config = yaml.safe_load((ROOT / "deployments" / "local.yaml").read_text())
    app = config["applications"][0]
    app["args"]["model"].update(model_path=tiny_bert, torch_threads=1)
    app["deployments"][0]["ray_actor_options"]["num_cpus"] = 0.5
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


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
