"""`serve run`, Ray's own CLI, started as README shows it and stopped by a signal in the middle
of a drain; then the next replica. Shared by test_serve_run_sigint.py and
test_serve_run_sigterm.py (two files, so that the two halves run side by side in `make test`).

Ray's CLI decides how it stops, not Sluice:
- SIGINT (Ctrl-C): `serve run` deletes the apps, so the replicas finish and answer what they
  hold (Serve's graceful stop): nothing is left pending.
- SIGTERM: Ray's driver exits at once and takes its local cluster with it: the replicas are
  killed outright and what they held stays pending. Their heartbeats lapse with them, so the
  next replica to run takes those jobs once its own heartbeat has beaten for a TTL, not a
  visibility timeout later. With RAY_DISABLE_FAILURE_SIGNAL_HANDLER=1, as README says, Ray
  prints no stack trace for it.
- A SIGINT inherited as ignored (`serve run ... &` from a script) cannot reach Ray's CLI:
  SIGTERM still stops it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import yaml

from sluice.protocol import GROUP, MODELS_KEY, jobs_key, result_key
from sluice.settings import QueueSettings
from sluice.stack import RedisServer
from sluice.supervisor import kill_session, session_members
from tests.helpers import null_replica, wait_for, xadd_jobs
from tests.integration.local_stack import ALARMING

ROOT = Path(__file__).resolve().parents[2]
SERVE = ROOT / ".venv" / "bin" / "serve"
JOBS = 20_000
# Printed by Ray's CLI itself, whatever it serves; README says what they mean. The first at
# every start (a cluster started with token authentication), the second on Ctrl-C (the Serve
# controller kills itself while its own shutdown call is still counted as running).
RAYS_OWN_NOTICES = ("Token authentication is enabled", "Task ServeController.graceful_shutdown")


def small_config(path: Path, model_path: str, **queue: Any) -> Path:
    """deployments/local.yaml with the tiny model in batches of 2 (so that a stop comes in the
    middle of a drain: in batches of 64 it drains 60,000 jobs in 5 s) and these queue
    settings; as shipped otherwise."""
    config = yaml.safe_load((ROOT / "deployments" / "local.yaml").read_text())
    app = config["applications"][0]
    app["args"]["model"].update(model_path=model_path, torch_threads=1, max_batch_size=2)
    app["args"]["queue"].update(queue)
    app["deployments"][0]["ray_actor_options"]["num_cpus"] = 0.5
    path.write_text(yaml.safe_dump(config))
    return path


def serve_run(config: Path, url: str, log: Path, *, ignore_sigint: bool) -> subprocess.Popen[bytes]:
    """`serve run CONFIG` as README shows it, in a session of its own (so that a group
    signal reaches only what it started)."""

    def prepare() -> None:
        os.setsid()
        if ignore_sigint:
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    env = {
        **os.environ,
        "SLUICE_REDIS_URL": url,
        "RAY_ADDRESS": "local",
        "RAY_DISABLE_FAILURE_SIGNAL_HANDLER": "1",
    }
    with log.open("w") as out:
        return subprocess.Popen(
            [str(SERVE), "run", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=prepare,
            env=env,
        )


def answered(client: redis.Redis, ids: list[str]) -> int:
    with client.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.exists(result_key("minilm", job_id))
        return sum(pipe.execute())


@dataclass
class Stopped:
    """What a stop of `serve run` left: its log and status, the jobs, and those still held."""

    status: int
    log: str
    ids: list[str]
    answered: int
    pending: int


def stop_mid_drain(
    config: Path, server: RedisServer, log: Path, sig: int, *, to_group: bool, ignore_sigint: bool
) -> Stopped:
    """Starts `serve run`, queues JOBS jobs, sends `sig` (to the pid or the group) once the
    first is answered; checks that it exited, left no Ray process and printed nothing
    alarming beyond Ray's own notices."""
    client = redis.Redis.from_url(server.url, decode_responses=True)
    proc = serve_run(config, server.url, log, ignore_sigint=ignore_sigint)
    try:
        wait_for(lambda: client.sismember(MODELS_KEY, "minilm"), 180, 0.2, "the replica")
        ids = xadd_jobs(client, "minilm", [f"job number {i}" for i in range(JOBS)], prefix="sr")
        wait_for(lambda: client.exists(result_key("minilm", ids[0])), 60, what="a first result")

        if to_group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        status = proc.wait(90)
        wait_for(lambda: not session_members(proc.pid), 30, 0.2, "Ray's processes to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_session(proc.pid, grace_s=1.0)

    text = log.read_text()
    assert status in (0, 1, sig, -sig, 128 + sig), f"status {status}\n{text[-3000:]}"
    alarming = [
        line
        for line in text.splitlines()
        if any(a in line for a in ALARMING) and not any(n in line for n in RAYS_OWN_NOTICES)
    ]
    assert not alarming, "\n".join(alarming)
    pending = int(client.xpending(jobs_key("minilm"), GROUP)["pending"])
    stopped = Stopped(status, text, ids, answered(client, ids), pending)
    client.close()
    assert 0 < stopped.answered < len(ids), "the stop did not come mid-drain"
    return stopped


def next_replica_answers_the_rest(
    server: RedisServer, ids: list[str], limits: QueueSettings
) -> float:
    """A replica started after the stop (bare, the null model): every job answered, nothing
    pending; how long it took."""
    client = redis.Redis.from_url(server.url, decode_responses=True)
    started = time.monotonic()
    with null_replica(server.url, "minilm", limits=limits):
        wait_for(lambda: answered(client, ids) == len(ids), 120, 0.5, "every job answered")
        took_s = time.monotonic() - started
    assert int(client.xpending(jobs_key("minilm"), GROUP)["pending"]) == 0
    client.close()
    return took_s
