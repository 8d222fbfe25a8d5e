"""`sluice demo` end to end in a child process: its own redis-server, Ray and Serve config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sluice.stack import free_port, redis_answers

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
        [sys.executable, "-m", "sluice.cli", "demo", "--config", str(tiny_config),
         "--redis-url", url, "--num-cpus", "1"],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "RAY_ADDRESS": "local"},
    )  # fmt: skip

    assert out.returncode == 0, out.stdout + out.stderr
    assert "8 jobs through sluice:{minilm}:jobs" in out.stdout
    assert "nearest neighbours:" in out.stdout
    assert "[invalid_input]" in out.stdout
    assert "stack stopped." in out.stdout
    assert not redis_answers(url), "the redis-server the demo started is still running"


def test_up_serves_until_ctrl_c_then_stops_what_it_started(tmp_path, tiny_config):
    import signal

    import redis

    from sluice.protocol import jobs_key, result_key
    from tests.helpers import wait_for

    url = f"redis://127.0.0.1:{free_port()}/0"
    log = tmp_path / "up.log"

    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sluice.cli", "up", "--config", str(tiny_config),
             "--redis-url", url, "--num-cpus", "1"],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "RAY_ADDRESS": "local"},
        )  # fmt: skip
    try:
        wait_for(lambda: "Ctrl-C stops everything" in log.read_text(), 180, 0.2, "sluice up")
        client = redis.Redis.from_url(url)
        client.xadd(jobs_key("minilm"), {"id": "up-1", "input": '{"text": "hi"}'})
        wait_for(lambda: client.get(result_key("minilm", "up-1")), 60, what="a result")

        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "stopping" in log.read_text()
    assert not redis_answers(url), "the redis-server that `sluice up` started is still running"
