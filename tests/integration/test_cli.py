"""The CLI against the session's real redis-server, as a newcomer runs it: `cancel` tells an
unknown id from a cancelled one, `submit` takes texts from stdin and files and prints results
as they come, every error is one line with its code, and `sluice up`'s hint runs as printed.

A bare replica pipeline (no Ray) with the null runner serves the model: these tests are about
the CLI, and it answers in milliseconds.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import orjson
import pytest
import redis
import yaml

from sluice import cli
from sluice.client import Client
from sluice.protocol import jobs_key, result_key
from tests.helpers import null_replica

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ERROR_LINE = re.compile(r"^error \[[a-z_]+\]: \S.*$")


def sluice(
    *args: str, url: str, stdin: str | None = None, path: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SLUICE_REDIS_URL": url}
    if path is not None:
        env["PATH"] = path
    return subprocess.run(
        [sys.executable, "-m", "sluice.cli", *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def one_error(out: subprocess.CompletedProcess[str], code: str) -> str:
    """stderr is one line `error [code]: ...`, no traceback."""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and ERROR_LINE.match(lines[0]), out.stderr
    assert lines[0].startswith(f"error [{code}]: "), out.stderr
    return lines[0]


# -- cancel -----------------------------------------------------------------------------------


def test_cancel_tells_unknown_ids_from_cancelled_and_ended_ones(
    r, model_name, worker_url, producer_url
):
    with null_replica(worker_url, model_name), Client(producer_url) as client:
        ended = client.submit(model_name, "answered already")
        assert client.result(ended, timeout=30).ok
    with Client(producer_url) as client:  # nobody serves the model now: this one waits
        queued = client.submit(model_name, "still queued")

    out = sluice("cancel", model_name, ended, queued, "nosuchjob", url=producer_url)
    assert out.returncode == 1, out.stderr  # a typo is not a success
    assert out.stdout.splitlines() == [
        f"{ended} ok (it had ended: not cancelled)",
        f"{queued} cancelled",
    ]
    line = one_error(out, "not_found")
    assert "nosuchjob" in line and "--force" in line
    assert not r.exists(result_key(model_name, "nosuchjob")), "an unknown id left a result"
    assert orjson.loads(r.get(result_key(model_name, queued)))["status"] == "cancelled"

    again = sluice("cancel", model_name, queued, url=producer_url)
    assert (again.returncode, again.stdout.strip()) == (0, f"{queued} cancelled (already)")

    forced = sluice("cancel", "--force", model_name, "raw-1", url=producer_url)
    assert (forced.returncode, forced.stdout.strip()) == (0, "raw-1 cancelled")
    assert orjson.loads(r.get(result_key(model_name, "raw-1")))["status"] == "cancelled"

    nobody = sluice("cancel", "nobody-serves-this", "x", url=producer_url)
    assert nobody.returncode == 2
    assert model_name in one_error(nobody, "unknown_model")  # the models there are named


# -- submit: stdin, files, JSON lines, results as they come ------------------------------------


def result_lines(stdout: str) -> list[tuple[str, str]]:
    """(status, the text shown) of each result line."""
    shown = re.compile(r"^\S+ (\S+) .*  '(.*)'$")
    return [shown.match(line).groups() for line in stdout.splitlines()]  # type: ignore[union-attr]


def test_submit_reads_stdin_and_files_and_prints_results_in_input_order(
    tmp_path, model_name, worker_url, producer_url
):
    with null_replica(worker_url, model_name):
        out = sluice("submit", model_name, url=producer_url, stdin="one\ntwo\n\nfour\n")
        assert out.returncode == 0, out.stderr
        assert result_lines(out.stdout) == [
            ("ok", "one"),
            ("ok", "two"),
            ("ok", ""),
            ("ok", "four"),
        ]
        assert "note: stdin line 3 is an empty text" in out.stderr

        texts = [f"line {i} " + "x" * 500 for i in range(2000)]  # 1 MB: too long for argv
        path = tmp_path / "texts.txt"
        path.write_text("\n".join(texts) + "\n", encoding="utf-8")
        big = sluice(
            "submit", model_name, "--file", str(path), "--in-flight", "300", url=producer_url
        )
        assert big.returncode == 0, big.stderr
        assert [text for _, text in result_lines(big.stdout)] == [t[:50] for t in texts]

        piped = sluice(
            "submit", "--json", model_name, "-", url=producer_url, stdin=path.read_text()
        )
        results = [orjson.loads(line) for line in piped.stdout.splitlines()]
        assert len(results) == 2000 and {x["status"] for x in results} == {"ok"}
        assert len({x["id"] for x in results}) == 2000


def test_submit_jsonl_takes_inputs_and_stops_at_a_bad_line_after_answering_the_rest(
    model_name, worker_url, producer_url
):
    with null_replica(worker_url, model_name):
        lines = '{"text": "an object"}\n"a string"\n\n{"text": 7}\n'
        out = sluice("submit", "--jsonl", model_name, url=producer_url, stdin=lines)
        assert out.returncode == 1  # one job failed, and its line says why
        statuses = [line.split()[1] for line in out.stdout.splitlines()]
        assert statuses == ["ok", "ok", "error"] and "invalid_input" in out.stdout

        bad = sluice(
            "submit",
            "--jsonl",
            model_name,
            url=producer_url,
            stdin='"fine"\n{not json\n"never sent"\n',
        )
        assert bad.returncode == 2
        assert "stdin line 2 is not JSON" in one_error(bad, "invalid_input")
        assert len(bad.stdout.splitlines()) == 1  # the job before it, answered and printed


def test_submit_prints_each_result_before_its_input_ends(model_name, worker_url, producer_url):
    """A pipe that pauses (`tail -f texts | sluice submit ...`): what came is answered now."""
    with null_replica(worker_url, model_name):
        proc = subprocess.Popen(
            [sys.executable, "-m", "sluice.cli", "submit", model_name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "SLUICE_REDIS_URL": producer_url},
        )
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write("first\n")
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], 60)
            assert ready, "no result while the input was still open"
            assert proc.stdout.readline().rstrip().endswith("'first'")
            proc.stdin.write("second\n")
            proc.stdin.close()
            assert proc.stdout.readline().rstrip().endswith("'second'")
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


# -- errors -----------------------------------------------------------------------------------


def test_every_error_is_one_line_with_its_code(model_name, worker_url, producer_url):
    parts = urlsplit(producer_url)
    wrong = urlunsplit(
        parts._replace(netloc=f"sluice-producer:wrong@{parts.hostname}:{parts.port}")
    )
    out = sluice("submit", model_name, "x", url=wrong)
    assert out.returncode == 1
    assert "invalid username-password pair" in one_error(out, "unauthorized")

    out = sluice("status", url=producer_url)  # an operator command, as the producer
    assert out.returncode == 1 and "admin user" in one_error(out, "unauthorized")

    out = sluice("submit", "Minilm", "x", url=producer_url)
    assert out.returncode == 2 and "'minilm'?" in one_error(out, "invalid_input")

    out = sluice("submit", "--jsonl", model_name, '{"text": ', url=producer_url)
    assert out.returncode == 2 and "argument 1 is not JSON" in one_error(out, "invalid_input")

    with null_replica(worker_url, model_name):
        pass  # registered, served by nobody: a typo of its name is answered with it
    out = sluice("submit", f"{model_name}x", "x", url=producer_url)
    assert out.returncode == 2 and model_name in one_error(out, "unknown_model")


# -- `sluice up`'s hint -----------------------------------------------------------------------


def test_the_hint_of_sluice_up_runs_as_printed(
    tmp_path, monkeypatch, model_name, redis_url, redis_cli
):
    """Without an activated venv and on another port than 6379: every line, pasted into a
    shell, does what it says (`redis_cli`: the fixture fails the test without redis-cli)."""
    config = yaml.safe_load((ROOT / "deployments" / "local.yaml").read_text())
    config["applications"][0]["args"]["model"]["name"] = model_name
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump(config))
    bare = os.pathsep.join(
        p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p) != BIN
    )
    monkeypatch.setenv("PATH", bare)
    monkeypatch.chdir(ROOT)
    hint = cli._try_hint(str(path), redis_url)
    with null_replica(redis_url, model_name):
        outputs = [
            subprocess.run(
                ["bash", "-c", line],
                cwd=ROOT,
                env={**os.environ, "PATH": bare},
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            for line in hint.splitlines()
        ]
    # The hint's reply stream has the doc's name: leave the session's Redis without it, or
    # docs/protocol.md's own example (tests/integration/test_protocol_docs.py) reads this one.
    redis.Redis.from_url(redis_url).delete("myapp:replies")
    submit, xadd, xread = outputs
    assert submit.returncode == 0 and " ok dim=8 " in submit.stdout, submit.stderr
    assert xadd.returncode == 0 and xadd.stdout.strip()
    mine = f'{{"id":"job-1","model":"{model_name}","status":"ok"'
    assert mine in xread.stdout, xread.stdout
    assert jobs_key(model_name) in hint
