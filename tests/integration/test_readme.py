"""The README's tour runs as pasted: its Python snippet from the first line to the last, and its
redis-cli lines, which wait for the result instead of reading it before it is stored.

Each runs against the session's redis-server with a bare null replica (no Ray; 384-float
vectors, as MiniLM's) under this test's own model name, so nothing here touches `minilm`.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.helpers import null_replica

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"


def block_after(marker: str, lang: str) -> str:
    """The first fenced block of `lang` after the line that holds `marker`."""
    text = README.read_text()
    start = text.index(marker)
    match = re.compile(rf"^```{lang}\n(.*?)^```$", re.M | re.S).search(text, start)
    assert match is not None, f"no ```{lang} block after {marker!r} in README.md"
    return match.group(1)


def test_the_python_snippet_runs_whole(model_name, worker_url, producer_url):
    code = block_after("**From Python**", "python")
    assert 'Client("redis://127.0.0.1:6379/0")' in code
    code = code.replace('"redis://127.0.0.1:6379/0"', repr(producer_url))
    code = code.replace('"minilm"', repr(model_name))
    with null_replica(worker_url, model_name, dim=384):
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
        )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[1:] for line in lines[:2]] == [["ok", "384"], ["ok", "384"]]
    assert lines[2] == "invalid_input input.text must be a string, got int"
    assert lines[3] == "ok"
    assert lines[4] in ("cancelled", "ok")


def test_the_redis_cli_lines_wait_for_the_result(model_name, redis_url, redis_cli):
    lines = [
        line.split("#", 1)[0].strip()
        for line in block_after("**From redis-cli**", "sh").splitlines()
        if line.startswith("redis-cli ")
    ]
    assert [shlex.split(line)[1] for line in lines] == ["XADD", "XREAD", "GET"]
    replies = f"myapp:replies:{model_name}"  # this test's own, the session shares the doc's
    outputs = []
    with null_replica(redis_url, model_name, dim=384):
        for line in lines:
            line = line.replace("{minilm}", f"{{{model_name}}}").replace("myapp:replies", replies)
            args = [redis_cli, "-u", redis_url, *shlex.split(line)[1:]]
            done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
            assert done.returncode == 0, done.stderr
            outputs.append(done.stdout)
    _, xread, get = outputs
    assert '"id":"job-1"' in xread and '"status":"ok"' in xread, xread
    stored = orjson.loads(get)
    assert (stored["id"], stored["status"], len(stored["output"])) == ("job-1", "ok", 384)
