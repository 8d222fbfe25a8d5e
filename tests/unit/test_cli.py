"""The CLI as a newcomer meets it: every error one line with its code, hints that run as
printed. Nothing here needs a Redis: a closed port is what "Redis is not running" looks like."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from sluice import cli
from sluice.connection import RedisModeError
from sluice.errors import Overloaded
from sluice.stack import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def one_error_line(err: str) -> str:
    """The whole of stderr: one line, `error [code]: ...`, no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error ["), err
    return lines[0]


@pytest.mark.parametrize(
    "command",
    [
        ["submit", "minilm", "hello"],
        ["cancel", "minilm", "some-job"],
        ["status"],
        ["dlq", "list", "minilm"],
        ["tenants", "list"],
    ],
)
def test_redis_not_answering_is_one_line_with_its_code(capsys, command):
    argv = [*command, "--redis-url", f"redis://127.0.0.1:{free_port()}/0"]
    assert cli.main(argv) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error [unavailable]: cannot reach Redis:"), line
    assert "SLUICE_REDIS_URL" in line  # where the URL came from, so it can be fixed


@pytest.mark.parametrize("verb", ["submit", "cancel", "chat"])
def test_a_model_name_in_capitals_is_refused_in_one_line_naming_the_right_one(capsys, verb):
    assert cli.main([verb, "Minilm", "x"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error [invalid_input]: model name must match"), line
    assert "'minilm'?" in line


def test_a_bad_setting_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("SLUICE_QUEUE__MAX_DELIVERIES", "many")
    assert cli.main(["status"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error [invalid_input]: invalid SLUICE_ settings: queue.max_deliveries")


def test_dlq_misuse_is_one_line_with_a_code(capsys):
    url = f"redis://127.0.0.1:{free_port()}/0"
    assert cli.main(["dlq", "show", "minilm", "not-an-id", "--redis-url", url]) == 2
    assert "[invalid_input]" in one_error_line(capsys.readouterr().err)
    assert cli.main(["dlq", "purge", "minilm", "--all", "--redis-url", url]) == 2
    assert "add --yes" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("exc", "code", "status"),
    [
        (Overloaded("full"), "rejected", 2),
        (redis.AuthenticationError("WRONGPASS"), "unauthorized", 1),
        (redis.exceptions.NoPermissionError("NOPERM"), "unauthorized", 1),
        (redis.ConnectionError("Connection refused"), "unavailable", 1),
        (redis.TimeoutError("Timeout reading"), "unavailable", 1),
        (redis.ResponseError("OOM command not allowed"), "unavailable", 1),
        (RedisModeError("set SLUICE_REDIS_CLUSTER=true"), "unavailable", 1),
        (FileNotFoundError("redis-server is not installed"), "unavailable", 1),
        (RuntimeError("redis-server exited at start: Address already in use"), "unavailable", 1),
        (ValueError("priority must be one of"), "invalid_input", 2),
        (KeyError("a bug"), "internal", 2),
    ],
)
def test_explain_gives_every_error_a_code(exc, code, status):
    err, got = cli.explain(exc)
    assert (err.code, got) == (code, status)
    assert str(exc).strip("'") in err.message


def test_an_unexpected_error_is_still_one_line(capsys, monkeypatch):
    def broken(args, settings):
        raise KeyError("oops")

    monkeypatch.setattr(cli, "cmd_status", broken)
    assert cli.main(["status"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error [internal]: KeyError: 'oops'") and "DEBUG" in line


def test_submit_texts_may_follow_its_options():
    parser = cli._parser()
    args = cli._parse(parser, ["submit", "minilm", "--json", "a", "b"])
    assert (args.model, args.texts, args.json) == ("minilm", ["a", "b"], True)
    assert cli._parse(parser, ["submit", "minilm", "a", "--no-wait", "b"]).texts == ["a", "b"]
    with pytest.raises(SystemExit):
        cli._parse(parser, ["submit", "minilm", "--bogus", "a"])
    with pytest.raises(SystemExit):
        cli._parse(parser, ["status", "extra", "--bogus"])


def test_submit_help_says_what_an_empty_text_does():
    out = subprocess.run(
        [sys.executable, "-m", "sluice.cli", "submit", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert "empty text is a job like any other" in text
    assert "--file PATH" in text and "--jsonl" in text


# -- hints that run as printed ----------------------------------------------------------------


def path_without_this_venv() -> str:
    return os.pathsep.join(
        p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p) != BIN
    )


def runs(command: str, path: str) -> bool:
    """The command, as a shell would run it from the repo root with this PATH, answers
    `--help`."""
    done = subprocess.run(
        ["bash", "-c", f"{command} --help"],
        cwd=ROOT,
        env={**os.environ, "PATH": path},
        capture_output=True,
        timeout=60,
        check=False,
    )
    return done.returncode == 0


def test_the_sluice_command_runs_without_an_activated_venv(monkeypatch):
    monkeypatch.chdir(ROOT)
    bare = path_without_this_venv()
    monkeypatch.setenv("PATH", bare)
    command = cli.sluice_command()
    assert command != "sluice" or runs("sluice", bare), "a bare `sluice` PATH cannot find"
    assert runs(command, bare), command

    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{bare}")  # the venv activated
    assert cli.sluice_command() == "sluice"


def test_try_hint_names_the_url_and_waits_for_the_result(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PATH", path_without_this_venv())
    monkeypatch.delenv("SLUICE_REDIS_URL", raising=False)
    default = cli._try_hint("deployments/local.yaml")
    first = default.splitlines()[0].strip()
    assert first == f"{cli.sluice_command()} submit minilm 'hello world'"
    assert "-u " not in default and "reply_to myapp:replies" in default
    assert "XREAD BLOCK" in default  # the result a moment later, not an empty GET

    url = "redis://127.0.0.1:6390/0"
    other = cli._try_hint("deployments/local.yaml", url)
    assert f"submit --redis-url {url} minilm" in other
    assert all(f"redis-cli -u {shlex.quote(url)} X" in line for line in other.splitlines()[1:])


def test_a_redis_server_that_cannot_listen_says_why(tmp_path):
    """The port-taken case of README's Troubleshooting: redis-server's own reason, not blank."""
    import socket

    from sluice.stack import RedisServer

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = RedisServer(taken.getsockname()[1])
        with pytest.raises(RuntimeError, match="Address already in use"):
            server.start()
        server.cleanup()


@pytest.mark.parametrize("verb", ["up", "demo"])
@pytest.mark.parametrize(
    ("text", "says"),
    [
        (None, "no Serve config at"),
        ("applications: [\n", "is not YAML:"),
        ("applications:\n  - name: x\n", "is not a Serve config: applications.0.import_path"),
    ],
)
def test_a_bad_config_is_refused_before_anything_starts(capsys, tmp_path, verb, text, says):
    config = tmp_path / "stack.yaml"
    if text is not None:
        config.write_text(text)
    assert cli.main([verb, "--config", str(config)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error [invalid_input]: "), line
    assert says in line, line


@pytest.mark.parametrize("verb", ["up", "demo"])
def test_a_taken_metrics_port_is_refused_before_anything_starts(capsys, verb):
    config = ROOT / "deployments" / "local.yaml"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main([verb, "--config", str(config), "--metrics-port", str(port)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error [invalid_input]: the metrics port {port} is taken"), line
