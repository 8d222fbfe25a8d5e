"""The `sluice` command: up, demo, submit, chat, cancel, status, dlq, exporter, tenants.
`sluice COMMAND --help` for each."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import shlex
import shutil
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import redis
import yaml
from pydantic import ValidationError
from redis.exceptions import MovedError, NoPermissionError

from sluice import admission, dlq, exporter, submitting, tenants
from sluice.client import AsyncClient, Client
from sluice.connection import SyncRedis, cluster_hint, connect_sync
from sluice.errors import (
    Internal,
    InvalidInput,
    SluiceError,
    Unauthorized,
    Unavailable,
    UnknownModel,
)
from sluice.protocol import (
    GROUP,
    MODELS_KEY,
    PRIORITIES,
    Result,
    dead_key,
    decode_embedding,
    info_key,
    jobs_key,
    scoped_id,
)
from sluice.settings import Settings
from sluice.supervisor import child_started, run_supervised, supervised

STREAM_ID_RE = re.compile(r"\d+-\d+")
URL_HELP = "default: SLUICE_REDIS_URL or redis://127.0.0.1:6379/0"

DEFAULT_CONFIG = "deployments/local.yaml"
DEMO_SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A woman is holding a child in her arms.",
    "A man is riding a horse.",
    "Someone is riding a white horse on a track.",
    "Two men pushed carts through the woods.",
    "A monkey is playing drums.",
]
DEMO_QUESTIONS = [
    "What is the capital of France? Answer in one word.",
    "Write a haiku about a river.",
    "Explain in two sentences what a message queue is.",
]


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = _parse(parser, argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the supervised child
    try:
        if supervised():
            child_started()  # from here on, a stop is a KeyboardInterrupt we handle
        settings = Settings()
        logging.basicConfig(
            level=args.log_level or settings.log_level,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        with cluster_hint():
            return int(args.func(args, settings))
    except KeyboardInterrupt:
        # Stopped before it was done (e.g. while the stack started): whatever was started
        # has been stopped by the `with` blocks on the way out.
        print("\ninterrupted; stopped.", file=sys.stderr)
        return 130
    except Exception as exc:
        # One line with a stable code, never a traceback: what a newcomer reads first is the
        # whole story. The traceback is there for whoever asks for it.
        logging.getLogger(__name__).debug("the traceback of the error below", exc_info=exc)
        err, status = explain(exc)
        print(f"error [{err.code}]: {_one_line(err.message)}", file=sys.stderr)
        return status


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parse_args`, except that the texts of `submit` may follow its options too (`submit
    minilm --json TEXT`): once an option follows the model name, argparse has given the
    optional list of texts nothing, and would call the texts unrecognized."""
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "texts", None), list):
        if not any(x.startswith("-") and x != "-" for x in extra):
            args.texts = [*args.texts, *extra]
            return args
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


REDIS_URL_FROM = "the URL comes from --redis-url or SLUICE_REDIS_URL"


def explain(exc: Exception) -> tuple[SluiceError, int]:
    """What the CLI says of an error, as a `SluiceError`, and its exit status: 2 when the
    command, its input or a job was refused; 1 when Redis, or what the command starts
    (redis-server, Ray, the Serve apps), cannot be reached or used."""
    if isinstance(exc, SluiceError):
        return exc, 2
    if isinstance(exc, redis.AuthenticationError | NoPermissionError):
        return Unauthorized(
            f"Redis refused this user: {exc} ({REDIS_URL_FROM}; status, dlq and tenants "
            "need an admin user: docs/security.md)"
        ), 1
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return Unavailable(
            f"cannot reach Redis: {exc} (is redis-server running there? `sluice up` starts "
            f"one; {REDIS_URL_FROM})"
        ), 1
    if isinstance(exc, redis.RedisError):
        return Unavailable(f"Redis answered an error: {exc}"), 1
    if isinstance(exc, OSError | RuntimeError | redis.RedisClusterException):
        # RedisModeError, and what the local stack raises when it cannot start.
        return Unavailable(str(exc) or type(exc).__name__), 1
    if isinstance(exc, ValidationError):
        fields = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return InvalidInput(f"invalid SLUICE_ settings: {fields}"), 2
    if isinstance(exc, ValueError):
        return InvalidInput(str(exc)), 2
    return Internal(
        f"{type(exc).__name__}: {exc} (a bug in sluice; --log-level DEBUG prints its traceback)"
    ), 2


def _one_line(text: str) -> str:
    return " / ".join(part.strip() for part in text.splitlines() if part.strip())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sluice",
        description="Queue-fed inference: put jobs into Redis, get results back, batched.",
    )
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default INFO)")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="start redis-server (if none), local Ray and the Serve apps")
    _stack_options(up)
    up.set_defaults(func=cmd_up)

    demo = sub.add_parser("demo", help="start the stack, embed sample sentences, print, stop")
    _stack_options(demo)
    demo.set_defaults(func=cmd_demo)

    submitting.add_command(sub)  # its code lives in submitting.py

    chat = sub.add_parser("chat", help="ask a generate model; print its answer as it streams")
    chat.add_argument("model", help="model name, e.g. smollm2")
    chat.add_argument("question", help="the user's message")
    chat.add_argument("--system", default=None, help="a system message before it")
    chat.add_argument("--max-tokens", type=int, default=None, help="default: the model's cap")
    chat.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    chat.add_argument("--seed", type=int, default=None, help="repeatable sampling")
    chat.add_argument("--no-stream", action="store_true", help="print the answer once, whole")
    chat.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (300)")
    chat.add_argument("--redis-url", help=URL_HELP)
    chat.set_defaults(func=cmd_chat)

    cancel = sub.add_parser(
        "cancel",
        help="cancel queued jobs; print each job's final status",
        description="Cancels each job that has no result yet and prints its final status: "
        "'cancelled', or the status of a job that had already ended (not cancelled). An id "
        "that admission never queued, or whose result has expired, is unknown: one line "
        "'error [not_found]' on stderr, and the exit status is 1.",
    )
    cancel.add_argument("model", help="model name")
    cancel.add_argument("ids", nargs="+", metavar="ID", help="job ids")
    cancel.add_argument("--redis-url", help=URL_HELP)
    cancel.add_argument(
        "--force",
        action="store_true",
        help="cancel unknown ids too (a raw XADD's job, or one not submitted yet): each is "
        "answered 'cancelled' if it comes within result_ttl_s",
    )
    cancel.set_defaults(func=cmd_cancel)

    status = sub.add_parser("status", help="queue depth, pending, lag, dead letters, consumers")
    status.add_argument("models", nargs="*", metavar="MODEL", help="default: every model found")
    status.add_argument("--redis-url", help=URL_HELP)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)

    _dlq_parser(sub)
    exporter.add_command(sub)  # its code lives in exporter.py
    tenants.add_command(sub)  # and this one's in tenants.py
    return parser


def _dlq_parser(sub: Any) -> None:
    top = sub.add_parser("dlq", help="dead letters: list, show, replay, purge")
    verbs = top.add_subparsers(required=True, metavar="ACTION")

    def verb(name: str, help: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = verbs.add_parser(name, help=help)
        p.add_argument("model", help="model name")
        p.add_argument("--redis-url", help=URL_HELP)
        return p

    ls = verb("list", "the newest dead letters: id, job id, lane, deliveries, reason")
    ls.add_argument("--count", type=int, default=50, help="how many (50)")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_dlq_list)
    show = verb("show", "every field of one dead letter")
    show.add_argument("dead_id", metavar="DEAD_ID", help="the entry id on sluice:{M}:dead")
    show.set_defaults(func=cmd_dlq_show)
    for name, help, func in (
        ("replay", "put dead letters back on their lane, to run again", cmd_dlq_replay),
        ("purge", "delete dead letters", cmd_dlq_purge),
    ):
        p = verb(name, help)
        p.add_argument("dead_ids", nargs="*", metavar="DEAD_ID", help="ids on the dead stream")
        p.add_argument("--all", action="store_true", help="every dead letter of the model")
        if name == "purge":
            p.add_argument("--yes", action="store_true", help="needed with --all")
        p.set_defaults(func=func)


def _stack_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"Serve config ({DEFAULT_CONFIG})")
    p.add_argument("--redis-url", help="default: SLUICE_REDIS_URL or redis://127.0.0.1:6379/0")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for local Ray (all)")
    p.add_argument("--metrics-port", type=int, default=9109, help="Ray's /metrics port (9109)")
    p.add_argument(
        "--stop-timeout-s",
        type=float,
        default=90.0,
        help="on SIGINT/SIGTERM, how long replicas may take to answer what they hold "
        "before everything left is killed (90)",
    )


def checked_config(path: str) -> dict[str, Any]:
    """The Serve config at `path`, or `invalid_input` saying what is wrong with it: checked
    before anything starts, by the supervisor as well, so that a typo is one line at once."""
    from sluice.stack import load_config

    if not Path(path).is_file():
        raise InvalidInput(f"no Serve config at {path} (run from the repo root?)")
    try:
        return load_config(path)
    except yaml.YAMLError as exc:
        raise InvalidInput(f"{path} is not YAML: {exc}") from exc
    except ValidationError as exc:
        fields = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InvalidInput(f"{path} is not a Serve config: {fields}") from exc


def _preflight(args: argparse.Namespace) -> None:
    """What `up` and `demo` can check before anything starts, each a one-line error."""
    checked_config(args.config)
    if args.metrics_port:
        with socket.socket() as probe:
            # As a server binds it: a connection of a past run in TIME_WAIT is no obstacle,
            # a listener is.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                # Where Ray binds it: every interface.
                probe.bind(("", args.metrics_port))
            except OSError as exc:
                raise InvalidInput(
                    f"the metrics port {args.metrics_port} is taken ({exc.strerror}): "
                    "pass --metrics-port with a free one"
                ) from exc


def _stack(args: argparse.Namespace, settings: Settings) -> Any:
    from sluice.stack import LocalStack

    checked_config(args.config)
    url = args.redis_url or settings.redis_url
    print(f"starting the local stack: redis {url}, Ray, {args.config} ...", flush=True)
    return LocalStack(
        args.config, redis_url=url, num_cpus=args.num_cpus, metrics_port=args.metrics_port
    )


def _try_hint(config_path: str, redis_url: str | None = None) -> str:
    """What to try first, for the config's first model and its task, as commands that run
    as printed: `sluice` by its path when a shell would not find it, the URL when it is not
    the default one, and a reply stream to wait on (the result is stored a moment after the
    XADD, not at once)."""
    from sluice.stack import load_config

    model = load_config(config_path)["applications"][0]["args"]["model"]
    name, task = model.get("name", "minilm"), model.get("task", "embed")
    # The local stack exports the URL it serves on as SLUICE_REDIS_URL, so Settings has it.
    url = redis_url or Settings().redis_url
    default = url == Settings.model_fields["redis_url"].default
    url_option = "" if default else f" --redis-url {shlex.quote(url)}"
    cli = "redis-cli" if default else f"redis-cli -u {shlex.quote(url)}"
    xadd = f"  {cli} XADD 'sluice:{{{name}}}:jobs' '*' id job-1 input "
    read = f"  {cli} XREAD BLOCK 60000 STREAMS myapp:replies 0"
    if task == "generate":
        chat = '{"messages":[{"role":"user","content":"Hello! Who are you?"}]}'
        ask = f"  {sluice_command()} chat{url_option} {name} 'Hello! Who are you?'"
        return f"{ask}\n{xadd}'{chat}' reply_to myapp:replies\n{read}"
    submit = f"  {sluice_command()} submit{url_option} {name} 'hello world'"
    text = '{"text":"hello"}'
    return f"{submit}\n{xadd}'{text}' reply_to myapp:replies\n{read}"


def sluice_command() -> str:
    """`sluice` as a shell would run it: the bare name when PATH finds this one (an activated
    venv, an installed package), else this environment's script by its path
    (`.venv/bin/sluice`), else `python -m sluice.cli` with this interpreter."""
    script = Path(sys.executable).parent / "sluice"
    found = shutil.which("sluice")
    if found is not None and (not script.exists() or Path(found).samefile(script)):
        return "sluice"
    if script.exists():
        return shlex.quote(_shown_path(script))
    return f"{shlex.quote(_shown_path(Path(sys.executable)))} -m sluice.cli"


def _shown_path(path: Path) -> str:
    """Relative to the working directory when it is under it, else absolute; never a bare
    name, which a shell would look up on PATH."""
    try:
        relative = path.relative_to(Path.cwd())
    except ValueError:
        return str(path)
    return relative.as_posix() if len(relative.parts) > 1 else f"./{relative}"


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    if not supervised():
        _preflight(args)
        return run_supervised(args.argv, args.stop_timeout_s)
    with _stack(args, settings) as stack:
        hint = _try_hint(args.config, stack.redis_url)
        _say(f"serving on {stack.redis_url}. Try:\n{hint}")
        _say("Ctrl-C (or SIGTERM) stops everything.")
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            # Only the supervisor's SIGINT lands here (sluice.supervisor).
            _say("\nstopping ...")
    _say("stack stopped.")
    return 0


def _say(text: str) -> None:
    """A line to stdout that a reader who left (`sluice up | head -1`, a killed `| cat`)
    cannot turn into an error: the stack serves, and stops, without anyone reading."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # and no error again at exit's flush
        os.close(devnull)


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    if not supervised():
        _preflight(args)
        return run_supervised(args.argv, args.stop_timeout_s)
    model = checked_config(args.config)["applications"][0]["args"]["model"]
    if model.get("task") == "generate":
        return _chat_demo(args, settings, model.get("name", "smollm2"))
    with _stack(args, settings) as stack, Client(stack.redis_url) as client:
        started = time.perf_counter()
        ids = client.submit_many("minilm", DEMO_SENTENCES)
        results = client.results(ids, timeout=120)
        elapsed_ms = (time.perf_counter() - started) * 1000
        vectors = np.stack([decode_embedding(r.output) for r in results])
        print(
            f"\n{len(ids)} jobs through sluice:{{minilm}}:jobs in {elapsed_ms:.0f} ms "
            f"(dimension {vectors.shape[1]}); cosine similarity:\n"
        )
        _print_similarity(vectors)
        bad = client.submit("minilm", {"text": 42})
        try:
            client.result(bad)
        except SluiceError as err:
            print(
                f'\na malformed job ({{"text": 42}}) is answered, not dropped: '
                f"[{err.code}] {err.message}"
            )
    print("stack stopped.")
    return 0


def _chat_demo(args: argparse.Namespace, settings: Settings, model: str) -> int:
    """Streams the answers to a few questions through the queue, as they are made."""
    with _stack(args, settings) as stack, Client(stack.redis_url) as client:
        for question in DEMO_QUESTIONS:
            print(f"\n> {question}", flush=True)
            messages = [{"role": "user", "content": question}]
            _print_streamed(client, model, messages, 300.0, {"max_new_tokens": 96})
    print("stack stopped.")
    return 0


def _print_similarity(vectors: np.ndarray[Any, Any]) -> None:
    sims = vectors @ vectors.T
    width = max(len(s) for s in DEMO_SENTENCES)
    print(" " * (width + 2) + " ".join(f"{i:>5d}" for i in range(len(vectors))))
    for i, sentence in enumerate(DEMO_SENTENCES):
        print(f"{i} {sentence:<{width}} " + " ".join(f"{v:5.2f}" for v in sims[i]))
    print("\nnearest neighbours:")
    for i, sentence in enumerate(DEMO_SENTENCES):
        j = int(np.argsort(-sims[i])[1])
        print(f"  {sentence!r:<{width + 2}} -> {DEMO_SENTENCES[j]!r} ({sims[i, j]:.2f})")


def cmd_chat(args: argparse.Namespace, settings: Settings) -> int:
    submitting.checked_model(args.model)
    messages = [{"role": "user", "content": args.question}]
    if args.system:
        messages.insert(0, {"role": "system", "content": args.system})
    params: dict[str, Any] = {"temperature": args.temperature}
    if args.max_tokens is not None:
        params["max_new_tokens"] = args.max_tokens
    if args.seed is not None:
        params["seed"] = args.seed
    with Client(args.redis_url or settings.redis_url) as client:
        if args.no_stream:
            print(client.chat(args.model, messages, timeout=args.timeout, **params))
            return 0
        _print_streamed(client, args.model, messages, args.timeout, params)
    return 0


def _print_streamed(
    client: Client, model: str, messages: list[dict[str, str]], timeout: float, params: Any
) -> None:
    """Prints the answer as it comes, then (on stderr) its first-token time and speed."""
    started = time.perf_counter()
    first_s = None
    pieces = 0
    for text in client.chat(model, messages, stream=True, timeout=timeout, **params):
        first_s = first_s if first_s is not None else time.perf_counter() - started
        pieces += 1
        print(text, end="", flush=True)
    elapsed_s = time.perf_counter() - started
    print()
    if first_s is not None and pieces > 1:
        rate = (pieces - 1) / max(elapsed_s - first_s, 1e-9)
        print(f"[first text {first_s * 1000:.0f} ms, then {rate:.1f} pieces/s]", file=sys.stderr)


def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    model = submitting.checked_model(args.model)
    url = args.redis_url or settings.redis_url
    unknown = asyncio.run(_cancel(url, model, args.ids, force=args.force))
    return 1 if unknown else 0


async def _cancel(url: str, model: str, ids: Sequence[str], *, force: bool) -> int:
    """Cancels each job that is queued, prints each one's final status; returns how many ids
    were unknown. A cancel alone would answer any id `cancelled` (it must win a race with its
    own submit), so a typo would look like success: the job is looked up first."""
    unknown = 0
    async with AsyncClient(url) as client:
        for job_id in ids:
            if force:
                print(_final_line(job_id, await client.cancel(job_id, model=model), True))
                continue
            wire = job_id if client.tenant is None else scoped_id(client.tenant, job_id)
            known = await admission.lookup(client.redis, model, wire)
            if known.result is not None:
                print(_final_line(job_id, known.result, False))
            elif known.queued:
                print(_final_line(job_id, await client.cancel(job_id, model=model), True))
            elif not known.registered:
                message = f"no model {model!r} is registered in this Redis"
                raise UnknownModel(await submitting.with_registered(client.redis, message))
            else:
                unknown += 1
                print(
                    f"error [not_found]: {job_id}: no such job of {model} (never submitted "
                    "through admission, or its result has expired; --force cancels it anyway)",
                    file=sys.stderr,
                )
    return unknown


def _final_line(job_id: str, final: Result, cancelling: bool) -> str:
    """`cancelling`: this command asked for the cancel (else the job had a result already)."""
    if final.status == "cancelled":
        return f"{job_id} cancelled" + ("" if cancelling else " (already)")
    code = f" [{final.error['code']}]" if final.status == "error" and final.error else ""
    return f"{job_id} {final.status}{code} (it had ended: not cancelled)"


def _redis(args: argparse.Namespace, settings: Settings, **options: Any) -> SyncRedis:
    return connect_sync(
        args.redis_url or settings.redis_url, cluster=settings.redis_cluster, **options
    )


def cmd_dlq_list(args: argparse.Namespace, settings: Settings) -> int:
    client = _redis(args, settings)
    rows = [e.summary() for e in dlq.list_entries(client, args.model, args.count)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    total = dlq.count(client, args.model)
    print(f"{args.model}: {total} dead letters" + (f", newest {len(rows)}:" if rows else ""))
    for row in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["dead_at_ms"] / 1000))
        print(
            f"  {row['dead_id']}  {when}  id={row['id']}  lane={row['lane']}  "
            f"deliveries={row['deliveries']}  {row['reason']}"
        )
    return 0


def cmd_dlq_show(args: argparse.Namespace, settings: Settings) -> int:
    if not STREAM_ID_RE.fullmatch(args.dead_id):
        raise InvalidInput(f"a dead letter id looks like 1718000000000-0, got {args.dead_id!r}")
    entry = dlq.get(_redis(args, settings), args.model, args.dead_id)
    if entry is None:
        print(
            f"error [not_found]: no dead letter {args.dead_id} on {dead_key(args.model)}",
            file=sys.stderr,
        )
        return 1
    print(json.dumps({"dead_id": entry.dead_id, **entry.fields}, indent=2, ensure_ascii=False))
    return 0


def _chosen(args: argparse.Namespace, client: SyncRedis) -> list[str] | None:
    if args.all == bool(args.dead_ids):
        raise InvalidInput("name dead letter ids, or --all (not both)")
    return dlq.all_ids(client, args.model) if args.all else list(args.dead_ids)


def cmd_dlq_replay(args: argparse.Namespace, settings: Settings) -> int:
    client = _redis(args, settings)
    outcome = dlq.replay(client, args.model, _chosen(args, client) or [])
    for dead_id, what in outcome.items():
        print(f"{dead_id} {what}")
    print(f"replayed {sum(w.startswith('replayed') for w in outcome.values())} of {len(outcome)}")
    return 0 if all(w.startswith("replayed") for w in outcome.values()) else 1


def cmd_dlq_purge(args: argparse.Namespace, settings: Settings) -> int:
    client = _redis(args, settings)
    if args.all and not args.yes:
        raise InvalidInput(f"purge --all deletes every dead letter of {args.model}: add --yes")
    chosen = None if args.all else _chosen(args, client)
    print(f"purged {dlq.purge(client, args.model, chosen)} dead letters of {args.model}")
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    client = _redis(args, settings, decode_responses=True)
    found = {key.split("{", 1)[1].split("}", 1)[0] for key in client.scan_iter("sluice:{*}:jobs")}
    registered: Any = client.smembers(MODELS_KEY)
    models = args.models or sorted(found | set(registered))
    report = [_safe_status(client, m) for m in models]
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if not report:
        print("no models found (no sluice:{M}:jobs stream yet)")
    for row in report:
        if "error" in row:
            print(f"{row['model']}: cannot read its keys: {row['error']}")
            continue
        lanes = ", ".join(f"{p} {lane['depth']}" for p, lane in row["lanes"].items())
        note = "" if row["registered"] else " (not registered: SDK submits are refused)"
        print(
            f"{row['model']}{note}: depth {row['depth']} ({lanes}), pending {row['pending']}, "
            f"lag {row['lag']}, dead letters {row['dead_letters']}, "
            f"consumers {len(row['consumers'])}"
        )
        for c in row["consumers"]:
            print(f"    {c['name']}: pending {c['pending']}, idle {c['idle_ms'] / 1000:.1f}s")
    return 0


def _safe_status(client: SyncRedis, model: str) -> dict[str, Any]:
    try:
        return model_status(client, model)
    except MovedError:
        raise  # not this model's problem: the whole connection is in the wrong mode
    except redis.ResponseError as exc:
        # One model's keys in a bad state must not hide the others.
        return {
            "model": model,
            "depth": None,
            "pending": None,
            "lag": None,
            "dead_letters": None,
            "consumers": [],
            "error": str(exc),
        }


def model_status(client: SyncRedis, model: str) -> dict[str, Any]:
    """Depth (jobs not yet acked), pending, lag and entries per lane; dead letters, consumers."""
    row: dict[str, Any] = {
        "model": model,
        "registered": bool(client.exists(info_key(model))),
        "depth": 0,
        "pending": 0,
        "lag": 0,
        "entries": 0,
        "dead_letters": client.xlen(dead_key(model)),
        "lanes": {},
        "consumers": [],
    }
    consumers: dict[str, dict[str, Any]] = {}
    for priority in PRIORITIES:
        lane = _lane_status(client, jobs_key(model, priority), consumers)
        row["lanes"][priority] = lane
        for name in ("depth", "pending", "lag", "entries"):
            row[name] += lane[name]
    row["consumers"] = sorted(consumers.values(), key=lambda c: str(c["name"]))
    return row


def _lane_status(
    client: SyncRedis, key: str, consumers: dict[str, dict[str, Any]]
) -> dict[str, int]:
    entries = int(client.xlen(key))
    try:
        groups = {_str(g["name"]): g for g in client.xinfo_groups(key)}
    except redis.ResponseError:
        groups = {}  # no stream yet
    group = groups.get(GROUP)
    if group is None:
        return {"depth": entries, "pending": 0, "lag": entries, "entries": entries}
    pending = int(group["pending"])
    # Redis cannot always tell the lag (after XDEL): count every entry then, as admission does.
    lag = entries if group.get("lag") is None else int(group["lag"])
    for c in client.xinfo_consumers(key, GROUP):
        name = _str(c["name"])
        seen = consumers.setdefault(name, {"name": name, "pending": 0, "idle_ms": c["idle"]})
        seen["pending"] += int(c["pending"])
        seen["idle_ms"] = min(seen["idle_ms"], c["idle"])
    return {"depth": lag + pending, "pending": pending, "lag": lag, "entries": entries}


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


if __name__ == "__main__":
    sys.exit(main())
