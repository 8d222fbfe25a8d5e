"""Drain the way users start Sluice: the backlog queued first, then the documented start command.

    .venv/bin/python -m loadtest.userpath [--start serve-run|sluice-up] [--n 3000] [--repeats 5]

`loadtest.drain` measures its own stack, warm. This one does what a new user does. Per repeat:
a fresh redis-server on a free port; N MiniLM jobs XADDed raw (no replica exists yet, so no
group either: the replica creates it at id 0 and serves the backlog); then the documented
command, as a subprocess, with `SLUICE_REDIS_URL` pointing at that Redis:

* `serve-run`: `serve run deployments/local.yaml` (README, the YAML's header), so Ray starts
  as `serve run` starts it: workers at nice 15, the autoscaling policy of the YAML in charge;
* `sluice-up`: `sluice up --config deployments/local.yaml`.

(`RAY_ADDRESS=local`, so that the command starts a Ray of its own, as on a user's machine.)
The drain is timed from the first job pulled (the group's `entries-read` leaves 0: start-up
and the model load are the cold start, loadtest.scaling's measure) to the last one acked, and
divided into N. Then SIGINT to its process group stops the command, as a user's Ctrl-C does
(and the next repeat waits until every process it started is gone). The bare model (the same
runner, same settings, this process) runs the same sentences first in each repeat, on the
idle machine, so each repeat has its own ratio. A drain's first batches are slow (torch's and
the tokenizer's first calls): the rate after the first fifth of the jobs is reported too,
what a long backlog drains at. The replica's niceness and OS threads, read from its process,
go in the report. Medians over repeats; a ratio is the median of the per-repeat ratios.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
import yaml
from tqdm import tqdm

from loadtest.corpus import sentences
from loadtest.drain import bare_drain
from loadtest.report import machine_info, offline_env, print_medians, report_file, save_repeats
from sluice.protocol import GROUP, encode_job_fields, jobs_key
from sluice.runners import build_runner
from sluice.settings import ModelSettings
from sluice.stack import RedisServer

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
Json = dict[str, Any]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.userpath",
        description="Queues N jobs, starts Sluice with a documented command, times the drain, "
        "stops it with SIGINT, runs the bare model alike; per repeat. Prints a Markdown table, "
        "writes a JSON report. Method: see the module docstring.",
    )
    add = p.add_argument
    add("--start", choices=("serve-run", "sluice-up"), default="serve-run", help="(serve-run)")
    add("--n", type=int, default=3000, help="jobs queued before the start (3000)")
    add("--repeats", type=int, default=5, help="(5)")
    add("--config", type=Path, default=ROOT / "deployments/local.yaml", help="Serve config")
    add(
        "--dtype",
        choices=("fp32", "bf16"),
        help="run the config's first model in this dtype (a copy of the config is started, "
        "the bare model alike); default: as the config says",
    )
    add("--start-timeout-s", type=float, default=180.0, help="to the first job pulled (180)")
    add("--drain-timeout-s", type=float, default=600.0, help="first pull to done (600)")
    add("--out", type=Path, help="JSON report (default loadtest/reports/userpath-<time>.json)")
    ns = p.parse_args(argv)
    if min(ns.n, ns.repeats) < 1:
        p.error("counts must be at least 1")
    return ns


def command(ns: argparse.Namespace, url: str) -> list[str]:
    if ns.start == "serve-run":
        return [str(VENV_BIN / "serve"), "run", str(ns.config)]
    return [str(VENV_BIN / "sluice"), "up", "--config", str(ns.config), "--redis-url", url]


def progress(r: redis.Redis, lanes: list[str]) -> tuple[int, int]:
    """(entries delivered, entries pending) over the lanes; (0, 0) before the group exists."""
    read = pending = 0
    for key in lanes:
        try:
            groups = r.xinfo_groups(key)
        except redis.ResponseError:
            continue
        for g in groups:
            if g["name"] == GROUP:
                read += int(g.get("entries-read") or 0)
                pending += int(g["pending"])
    return read, pending


def replica_facts(r: redis.Redis, lane: str) -> Json:
    """The replica process's niceness and OS threads, from /proc: its pid is in its consumer
    name (`<host>-<pid>-<tag>`), so no other Ray on the machine can be mistaken for it."""
    for consumer in r.xinfo_consumers(lane, GROUP):
        pid = int(str(consumer["name"]).rsplit("-", 2)[1])
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return {"pid": pid, "nice": int(stat[16]), "os_threads": int(stat[17])}
    return {}


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    """SIGINT to the command's whole process group (a user's Ctrl-C reaches the group), then
    waits for every process of the group to be gone, so no repeat overlaps the next one."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)  # anyone left in the group?
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)


def one_repeat(ns: argparse.Namespace, app: Json, texts: list[str], k: int) -> Json:
    model = app["args"]["model"]["name"]
    server = RedisServer().start()
    log_path = ns.out.with_suffix(f".{k}.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        r = redis.Redis.from_url(server.url, decode_responses=True)
        lane = jobs_key(model)
        with r.pipeline(transaction=False) as pipe:
            for i, text in enumerate(texts):
                pipe.xadd(lane, dict[Any, Any](encode_job_fields(f"u{k}-{i}", {"text": text})))
            pipe.execute()
        env = {**os.environ, "SLUICE_REDIS_URL": server.url}
        env.pop("RAY_worker_niceness", None)  # as a user's shell has it
        # A Ray of its own, as on a user's machine: never one another process runs here.
        env["RAY_ADDRESS"] = "local"
        started = time.monotonic()
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                command(ns, server.url),
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: a Ctrl-C reaches all it starts
            )
        try:
            lanes = [lane, jobs_key(model, "high"), jobs_key(model, "low")]
            first = last = steady_at = None
            steady_done = 0
            facts: Json = {}
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{ns.start} exited ({proc.returncode}): see {log_path}")
                now = time.monotonic()
                read, pending = progress(r, lanes)
                if first is None and read > 0:
                    first = now
                    facts = replica_facts(r, lane)
                if steady_at is None and read - pending >= ns.n // 5:
                    steady_at, steady_done = now, read - pending
                if read >= ns.n and pending == 0:
                    last = now
                    break
                if first is None and now - started > ns.start_timeout_s:
                    raise TimeoutError(f"no job pulled {ns.start_timeout_s}s after the start")
                if first is not None and now - first > ns.drain_timeout_s:
                    raise TimeoutError(f"the drain took over {ns.drain_timeout_s}s: {log_path}")
                time.sleep(0.01)
        finally:
            stop(proc)
        r.close()
    finally:
        server.cleanup()
    assert first is not None and last is not None and steady_at is not None
    return {
        "start_to_first_pull_s": first - started,
        "drain_s": last - first,
        "per_s": ns.n / (last - first),
        # The last four fifths: a replica past its first batches (torch's and the tokenizer's
        # first calls are slow), what a long backlog drains at.
        "steady_per_s": (ns.n - steady_done) / (last - steady_at),
        "replica": facts,
        "loadavg": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    ns = parse(argv)
    offline_env()
    out = ns.out = report_file("userpath", ns.out)
    config = yaml.safe_load(ns.config.read_text())
    app = config["applications"][0]
    if ns.dtype:
        # The documented command, on a copy of the config that differs in the dtype alone.
        app["args"]["model"]["dtype"] = ns.dtype
        copy = Path(tempfile.mkdtemp(prefix="sluice-userpath-")) / ns.config.name
        copy.write_text(yaml.safe_dump(config, sort_keys=False))
        ns.config = copy
    settings = ModelSettings(**app["args"]["model"])
    texts = sentences(ns.n)
    started = time.time()
    runs = []
    bar = tqdm(total=ns.repeats, desc=f"{ns.start}", unit="repeat")
    for k in range(ns.repeats):
        # The bare model first, on the idle machine, then freed: the stack gets the machine.
        runner = build_runner(settings)
        runner.load()
        bare = bare_drain(runner, texts, settings.max_batch_size, tqdm(disable=True))
        del runner
        run = one_repeat(ns, app, texts, k)
        run["bare"] = bare
        run["ratio"] = run["per_s"] / run["bare"]["per_s"]
        run["steady_ratio"] = run["steady_per_s"] / run["bare"]["per_s"]
        runs.append(run)
        bar.set_postfix(ratio=f"{run['ratio']:.3f}")
        bar.update()
    bar.close()
    rows = [
        ("Sluice drain, jobs/s", [x["per_s"] for x in runs]),
        ("Sluice drain after the first fifth, jobs/s", [x["steady_per_s"] for x in runs]),
        ("bare model, sentences/s", [x["bare"]["per_s"] for x in runs]),
        ("**Sluice after the first fifth ÷ bare**", [x["steady_ratio"] for x in runs]),
        ("**Sluice ÷ bare**", [x["ratio"] for x in runs]),
        ("start → first job pulled, s", [x["start_to_first_pull_s"] for x in runs]),
    ]
    save_repeats(out, ns, started, rows, runs, machine=machine_info(), serve_config=config)
    nice = {x["replica"].get("nice") for x in runs}
    print(f"\n{ns.start}, {ns.n} jobs queued first, {ns.repeats} repeats; replica nice {nice}\n")
    print_medians(rows)
    print(f"\nreport: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
