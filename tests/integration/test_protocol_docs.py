"""The `redis-cli` examples of docs/protocol.md, run as written against a live stack.

Every line starting with `redis-cli ` in the doc's ```sh blocks is split with shlex and run, in
order, through the real `redis-cli` binary (no shell), against the session's redis-server, with
an app `minilm` (the tiny random BERT) deployed. What each line prints is checked against what
the protocol promises for the jobs the doc itself submitted. The doc must keep the examples that a
newcomer needs (see REQUIRED); it cannot silently lose them.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import redis

from sluice.protocol import GROUP, dead_key, jobs_key, result_key
from sluice.settings import QueueSettings
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
MODEL = "minilm"
JOBS, DEAD = jobs_key(MODEL), dead_key(MODEL)
RESULT_PREFIX = result_key(MODEL, "")
JOB_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
ENTRY_ID_RE = re.compile(r"^\d+-\d+$")
TIMINGS = {"queue_ms", "batch_wait_ms", "compute_ms", "total_ms", "batch_size", "input_tokens"}
FENCE_RE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
# redis-cli flags a doc line may carry (the test adds -h/-p for the session's server and -e).
CLI_FLAGS = {"--raw", "-e", "--no-auth-warning"}
FORBIDDEN = {"FLUSHALL", "FLUSHDB", "SHUTDOWN", "DEBUG", "CONFIG", "SWAPDB", "MONITOR"}

#: The examples the doc must have, with what each one proves.
REQUIRED = {
    "xadd": "XADD of a plain job (id + JSON input)",
    "get-ok": "GET of a result with status ok and a list of floats",
    "xadd-base64": 'XADD with params {"encoding":"base64"}',
    "get-base64": "a base64 output read back (GET or XREAD) and decoded",
    "xadd-reply_to": "XADD with a reply_to stream",
    "xread-block-reply": "XREAD BLOCK on that reply stream, returning the result",
    "xadd-bad-json": "XADD of a job whose input is not valid JSON",
    "get-invalid_input": "GET of its error result, code invalid_input",
    "xadd-no-id": "XADD of an entry with no id",
    "xrange-dead": "XRANGE of the dead stream showing the entry's reason",
    "xinfo-groups": "XINFO GROUPS on the jobs stream",
    "fcall-submit": "FCALL sluice_submit of a plain job, answered `queued`",
}


# -- reading the doc --------------------------------------------------------------------------


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(info string, body) of every fenced code block."""
    return [(m.group(1).strip(), m.group(2)) for m in FENCE_RE.finditer(text)]


def doc_commands(text: str) -> list[str]:
    """The `redis-cli ` lines of the ```sh blocks, in order."""
    return [
        line.strip()
        for info, body in fenced_blocks(text)
        if info == "sh"
        for line in body.splitlines()
        if line.startswith("redis-cli ")
    ]


def split_command(line: str) -> tuple[list[str], list[str]]:
    """(redis-cli flags, the command and its arguments) of one doc line; refuses anything a
    shell would treat specially, or that picks a server (the test adds its own)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    ops = [t for t in lexer if t and set(t) <= set("|&;<>()")]
    assert not ops, f"doc example needs a shell ({ops}); keep it one redis-cli command: {line}"
    tokens = shlex.split(line)
    assert tokens[0] == "redis-cli", line
    i = 1
    while i < len(tokens) and tokens[i].startswith("-"):
        i += 1
    flags, words = tokens[1:i], tokens[i:]
    unknown = [f for f in flags if f not in CLI_FLAGS]
    assert not unknown, f"doc examples may use only {sorted(CLI_FLAGS)} ({unknown}): {line}"
    assert words, f"no command: {line}"
    assert words[0].upper() not in FORBIDDEN, f"not in the docs, please: {line}"
    return flags, words


@dataclass
class Expect:
    """What the protocol promises for one job the doc submitted."""

    status: str  # ok, error, expired, dead
    code: str | None = None
    encoding: str = "float"


def expect_for(fields: dict[str, str]) -> Expect:
    """The outcome the protocol promises for these job fields (docs/protocol.md, section 2)."""
    if not JOB_ID_RE.fullmatch(fields.get("id", "")):
        return Expect("dead")
    if "input" not in fields:
        return Expect("error", "invalid_input")
    try:
        job_input = json.loads(fields["input"])
    except ValueError:
        return Expect("error", "invalid_input")
    if not isinstance(job_input, dict):
        return Expect("error", "invalid_input")
    try:
        params = json.loads(fields.get("params", "{}"))
    except ValueError:
        return Expect("error", "invalid_params")
    if not isinstance(params, dict):
        return Expect("error", "invalid_params")
    deadline = fields.get("deadline_ms")
    if deadline and int(deadline) <= time.time() * 1000:
        return Expect("expired")
    if set(job_input) != {"text"} or not isinstance(job_input["text"], str):
        return Expect("error", "invalid_input")
    encoding = params.get("encoding", "float")
    if set(params) - {"encoding", "truncate"} or encoding not in ("float", "base64"):
        return Expect("error", "invalid_params")
    return Expect("ok", encoding=encoding)


def xadd_fields(args: list[str]) -> tuple[str, dict[str, str]]:
    """(key, fields) of an `XADD key [options] <id|*> field value ...`."""
    key, rest = args[1], args[2:]
    while rest and rest[0].upper() in ("NOMKSTREAM", "MAXLEN", "MINID", "LIMIT"):
        option = rest.pop(0).upper()
        if option != "NOMKSTREAM":
            if rest and rest[0] in ("=", "~"):
                rest.pop(0)
            rest.pop(0)
    rest = rest[1:]  # the entry id
    assert len(rest) % 2 == 0, f"XADD with an odd number of field arguments: {args}"
    return key, dict(zip(rest[::2], rest[1::2], strict=True))


def xadd_kinds(fields: dict[str, str], expect: Expect) -> set[str]:
    kinds = set()
    if expect.status == "dead" and "id" not in fields:
        kinds.add("xadd-no-id")
    if expect.status == "ok" and not {"params", "reply_to", "deadline_ms"} & set(fields):
        kinds.add("xadd")
    if expect.encoding == "base64":
        kinds.add("xadd-base64")
    if "reply_to" in fields:
        kinds.add("xadd-reply_to")
    if "input" in fields:
        try:
            json.loads(fields["input"])
        except ValueError:
            kinds.add("xadd-bad-json")
    return kinds


def fcall_fields(args: list[str]) -> tuple[list[str], dict[str, str]]:
    """(keys, fields) of an `FCALL sluice_submit <numkeys> key... field value ...`."""
    numkeys = int(args[2])
    keys, rest = args[3 : 3 + numkeys], args[3 + numkeys :]
    assert len(rest) % 2 == 0, f"FCALL with an odd number of field arguments: {args}"
    return keys, dict(zip(rest[::2], rest[1::2], strict=True))


def submission(words: list[str]) -> tuple[dict[str, str], set[str]] | None:
    """(fields, kinds) of a doc command that submits a job of MODEL's, else None."""
    name, key = words[0].upper(), words[1] if len(words) > 1 else ""
    if name == "XADD" and key == JOBS:
        _, fields = xadd_fields(words)
        return fields, xadd_kinds(fields, expect_for(fields))
    if name == "FCALL" and key == "sluice_submit":
        keys, fields = fcall_fields(words)
        if keys and keys[0] == JOBS and "id" in fields:
            return fields, {"fcall-submit"}
    return None


def static_kinds(commands: list[str]) -> set[str]:
    """The example kinds the doc's commands cover, read without running anything."""
    kinds: set[str] = set()
    submitted: dict[str, Expect] = {}
    reply_streams: set[str] = set()
    for line in commands:
        _, words = split_command(line)
        name, key = words[0].upper(), words[1] if len(words) > 1 else ""
        if (sub := submission(words)) is not None:
            fields, new = sub
            kinds |= new
            if "id" in fields:
                submitted[fields["id"]] = expect_for(fields)
            if "reply_to" in fields:
                reply_streams.add(fields["reply_to"])
        elif name == "GET" and key.startswith(RESULT_PREFIX):
            expect = submitted.get(key.removeprefix(RESULT_PREFIX))
            if expect and expect.status == "ok":
                kinds.add("get-ok" if expect.encoding == "float" else "get-base64")
            if expect and expect.code == "invalid_input":
                kinds.add("get-invalid_input")
        elif name == "XRANGE" and key == DEAD and "xadd-no-id" in kinds:
            kinds.add("xrange-dead")
        elif name == "XINFO" and key.upper() == "GROUPS" and words[2:3] == [JOBS]:
            kinds.add("xinfo-groups")
        elif name == "XREAD" and "BLOCK" in (w.upper() for w in words):
            if reply_streams & set(words):
                kinds.add("xread-block-reply")
    return kinds


def test_doc_has_the_required_examples():
    text = DOC.read_text()
    commands = doc_commands(text)
    missing = {k: v for k, v in REQUIRED.items() if k not in static_kinds(commands)}
    assert not missing, f"docs/protocol.md lost examples: {missing}"
    stray = [
        line
        for info, body in fenced_blocks(text)
        if info != "sh"
        for line in body.splitlines()
        if line.strip().startswith("redis-cli ")
    ]
    assert not stray, f"redis-cli examples outside ```sh blocks are not tested: {stray}"


# -- running the doc --------------------------------------------------------------------------


@dataclass
class DocRun:
    """Runs the doc's commands one by one and checks what each prints."""

    redis_cli: str
    port: int
    r: redis.Redis
    jobs: dict[str, Expect] = field(default_factory=dict)
    reply_streams: dict[str, list[str]] = field(default_factory=dict)
    no_id_entries: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)

    def cli(self, line: str) -> list[str]:
        flags, words = split_command(line)
        proc = subprocess.run(
            [self.redis_cli, "-h", "127.0.0.1", "-p", str(self.port), "-e", *flags, *words],
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        assert proc.returncode == 0, f"{line}\n-> rc {proc.returncode}: {proc.stderr.strip()}"
        return proc.stdout.splitlines()

    def run(self, line: str) -> None:
        _, words = split_command(line)
        handler = getattr(self, f"_{words[0].lower()}", None)
        if handler is None or len(words) < 2:
            self.cli(line)  # anything else: it must at least succeed
        else:
            handler(words, line)

    # one method per command with something to check

    def _xadd(self, words: list[str], line: str) -> None:
        key, fields = xadd_fields(words)
        out = self.cli(line)
        assert len(out) == 1 and ENTRY_ID_RE.match(out[0]), f"{line}\n-> {out}"
        if key != JOBS:
            return
        expect = expect_for(fields)
        self.seen |= xadd_kinds(fields, expect)
        if expect.status == "dead":
            self.no_id_entries.append(out[0])
            return
        job_id = fields["id"]
        assert job_id not in self.jobs, f"the doc reuses job id {job_id}: {line}"
        self.jobs[job_id] = expect
        if "reply_to" in fields:
            self.reply_streams.setdefault(fields["reply_to"], []).append(job_id)

    def _fcall(self, words: list[str], line: str) -> None:
        out = self.cli(line)
        if words[1] != "sluice_submit":
            return
        keys, fields = fcall_fields(words)
        assert keys[0] in (JOBS, f"{JOBS}:high", f"{JOBS}:low"), f"{line}: not a lane of {MODEL}"
        assert out[:1] == ["queued"] and ENTRY_ID_RE.match(out[1]), f"{line}\n-> {out}"
        job_id = fields["id"]
        assert job_id not in self.jobs, f"the doc reuses job id {job_id}: {line}"
        self.jobs[job_id] = expect_for(fields)
        self.seen.add("fcall-submit")
        again = self.cli(line)  # the same id again: one job
        assert again == ["duplicate", out[1]] or again == ["done"], f"{line} twice -> {again}"

    def _get(self, words: list[str], line: str) -> None:
        key = words[1]
        if not key.startswith(RESULT_PREFIX):
            self.cli(line)
            return
        job_id = key.removeprefix(RESULT_PREFIX)
        assert job_id in self.jobs, f"the doc reads a result it never submitted: {line}"
        wait_for(lambda: self.r.exists(key), 60, what=f"the result of {job_id}")
        out = self.cli(line)
        assert len(out) == 1, f"{line}\n-> {out}"
        self.check_result(json.loads(out[0]), job_id)

    def _xread(self, words: list[str], line: str) -> None:
        upper = [w.upper() for w in words]
        streams = words[upper.index("STREAMS") + 1 :]
        keys = streams[: len(streams) // 2]
        out = self.cli(line)
        results = [json.loads(x) for x in out if x.startswith("{")]
        for key in keys:
            if key not in self.reply_streams:
                continue
            assert "BLOCK" in upper, f"wait on a reply stream with BLOCK: {line}"
            mine = [res for res in results if res.get("id") in self.reply_streams[key]]
            assert mine, f"{line}\n-> no result of {self.reply_streams[key]} in {out}"
            for res in mine:
                self.check_result(res, res["id"])
                stored = self.r.get(result_key(MODEL, res["id"]))
                assert stored is not None and json.loads(stored) == res
            self.seen.add("xread-block-reply")

    def _xrange(self, words: list[str], line: str) -> None:
        if words[1] != DEAD:
            self.cli(line)
            return
        self.wait_dead_letters()
        out = self.cli(line)
        for field_name in ("reason", "deliveries", "entry_id"):
            assert field_name in out, f"{line}\n-> no `{field_name}` in {out}"
        for entry_id in self.no_id_entries:
            assert entry_id in out, f"{line}\n-> the dead letter of {entry_id} missing: {out}"
        letters = {f[b"entry_id"].decode(): f for _, f in self.r.xrange(DEAD)}
        for entry_id in self.no_id_entries:
            assert letters[entry_id][b"reason"] == b"missing field `id`"
            assert letters[entry_id][b"deliveries"] == b"1"
        if self.no_id_entries:
            self.seen.add("xrange-dead")

    def _xlen(self, words: list[str], line: str) -> None:
        if words[1] == DEAD:
            self.wait_dead_letters()
        out = self.cli(line)
        assert len(out) == 1 and out[0].isdigit(), f"{line}\n-> {out}"
        if words[1] == DEAD:
            assert int(out[0]) >= len(self.no_id_entries)

    def _xinfo(self, words: list[str], line: str) -> None:
        out = self.cli(line)
        if words[1].upper() == "GROUPS" and words[2:3] == [JOBS]:
            assert GROUP in out and "lag" in out and "pending" in out, f"{line}\n-> {out}"
            self.seen.add("xinfo-groups")

    def _ttl(self, words: list[str], line: str) -> None:
        key = words[1]
        if key.startswith(RESULT_PREFIX):
            job_id = key.removeprefix(RESULT_PREFIX)
            wait_for(lambda: self.r.exists(key), 60, what=f"the result of {job_id}")
        out = self.cli(line)
        if key.startswith(RESULT_PREFIX):
            assert 0 < int(out[0]) <= QueueSettings().result_ttl_s, f"{line}\n-> {out}"

    # checks

    def wait_dead_letters(self) -> None:
        want = len(self.no_id_entries)
        wait_for(lambda: self.r.xlen(DEAD) >= want, 60, what=f"{want} dead letters")

    def check_result(self, res: dict, job_id: str) -> None:
        expect = self.jobs[job_id]
        assert res["id"] == job_id and res["model"] == MODEL, res
        assert res["status"] == expect.status, f"{job_id}: want {expect}, got {res}"
        keys = ["id", "model", "status"]
        if expect.status == "ok":
            keys.append("output")
            vector = self.check_embedding(res["output"], expect.encoding)
            assert abs(float(np.linalg.norm(vector)) - 1) < 1e-4
            assert set(res["timings"]) == TIMINGS, res["timings"]
            self.seen.add("get-ok" if expect.encoding == "float" else "get-base64")
        else:
            keys.append("error")
            code = expect.code if expect.status == "error" else expect.status
            assert res["error"]["code"] == code, f"{job_id}: want {expect}, got {res}"
            assert res["error"]["message"]
            if expect.code == "invalid_input":
                self.seen.add("get-invalid_input")
        assert list(res) == [*keys, "timings"], f"keys of a result, in order: {res}"

    @staticmethod
    def check_embedding(output: object, encoding: str) -> np.ndarray:
        if encoding == "base64":
            assert isinstance(output, str), output
            return np.frombuffer(base64.b64decode(output), dtype="<f4")
        assert isinstance(output, list) and output, output
        assert all(isinstance(v, float) for v in output), output[:8]
        return np.asarray(output, dtype=np.float32)


def test_doc_examples_run_against_a_live_stack(r, redis_server, redis_cli, deploy, tiny_bert):
    commands = doc_commands(DOC.read_text())
    assert commands, "no redis-cli lines in the ```sh blocks of docs/protocol.md"
    deploy(MODEL, tiny_bert)
    # The doc's reply stream names are plain ones (myapp:replies): none left by another test.
    r.delete(*{m for c in commands for m in re.findall(r"reply_to (\S+)", c)} or {"-"})
    doc = DocRun(redis_cli, redis_server.port, r)

    for line in commands:
        doc.run(line)

    missing = {k: v for k, v in REQUIRED.items() if k not in doc.seen}
    assert not missing, f"examples that ran but did not show what they should: {missing}"
