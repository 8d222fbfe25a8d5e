"""The replica pipeline's own ceiling, without Ray: where each microsecond of a job goes.

    .venv/bin/python -m loadtest.pipeline [--n 30000] [--repeats 3] [--replicas 1] ...

A redis-server on a free port and `--replicas` processes, each running the same `Worker` a
Serve replica runs, with the null runner (the right-shaped output from no model, `task:
null`), so what is timed is the pipeline alone: pull, decode, validate, batch, build results,
the Redis writes. Per repeat, N jobs are XADDed raw first (a backlog, as `loadtest.userpath`
queues it), the replicas load and say ready, and the clock runs from "go" to the last entry
acked. CPU is read around the drain, Redis' from its own counters (INFO cpu, and INFO
commandstats per command), the replicas' from `os.times()` in each, so each job's cost is
split into replica CPU and Redis CPU in microseconds, and the cores each side kept busy show
which one bounds the rate (Redis near 1.0 core is Redis; both together near the machine's
cores is the CPU). `--profile FILE.svg` runs one more drain under py-spy.

Jobs carry no reply_to unless `--reply` (then all name one reply stream, as a gateway's do).
Figures are medians over repeats.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import statistics as st
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson
from tqdm import tqdm

from loadtest.report import machine_info, print_medians, report_file
from sluice.protocol import GROUP, lane_keys, reply_key
from sluice.queue import StreamQueue, connect
from sluice.runners import build_runner
from sluice.settings import ModelSettings, QueueSettings
from sluice.stack import RedisServer
from sluice.worker import Worker

Json = dict[str, Any]
TEXT = "a sentence of about fourteen words, like the ones in every other benchmark here"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.pipeline",
        description="Drains N jobs through the replica pipeline with the null runner, no Ray; "
        "reports jobs/s and each job's CPU in the replica and in Redis (µs).",
    )
    add = p.add_argument
    add("--n", type=int, default=30_000, help="jobs per drain (30000)")
    add("--repeats", type=int, default=3, help="drains (3)")
    add("--batch-size", type=int, default=64, help="max_batch_size (64)")
    add("--dim", type=int, default=384, help="floats in a result (384: MiniLM's)")
    add("--encoding", choices=("float", "base64"), default="float", help="params.encoding")
    add("--replicas", type=int, default=1, help="replica processes on the one queue (1)")
    add("--reply", action="store_true", help="every job names one reply_to stream")
    add("--profile", type=Path, help="also one drain under py-spy: its SVG goes here")
    add("--idle", action="store_true", help="py-spy: include idle threads")
    add("--out", type=Path, help="JSON report (default loadtest/reports/pipeline-<time>.json)")
    return p.parse_args(argv)


async def queue_backlog(redis: Any, model: str, ns: argparse.Namespace) -> None:
    params = orjson.dumps({"encoding": ns.encoding}).decode()
    fields: dict[Any, Any] = {"input": orjson.dumps({"text": TEXT}).decode(), "params": params}
    if ns.reply:
        fields["reply_to"] = reply_key(f"bench-{model}")
    lane = lane_keys(model)[1]
    for start in range(0, ns.n, 1000):
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(start, min(ns.n, start + 1000)):
                pipe.xadd(lane, {**fields, "id": f"j{i}"})
            await pipe.execute()


async def command_us(redis: Any) -> dict[str, float]:
    """Redis' own CPU per command name so far (INFO commandstats), in microseconds."""
    stats = await redis.info("commandstats")
    return {name.removeprefix("cmdstat_"): float(row["usec"]) for name, row in stats.items()}


async def redis_cpu_s(redis: Any) -> float:
    cpu = await redis.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


async def acked_all(redis: Any, model: str, n: int) -> bool:
    lane = lane_keys(model)[1]
    groups = await redis.xinfo_groups(lane)
    for group in groups:  # none until the worker has created it
        if group["name"] in (GROUP, GROUP.encode()):
            return int(group["pending"]) == 0 and int(group["entries-read"] or 0) >= n
    return False


def settings_of(ns: argparse.Namespace, model: str) -> ModelSettings:
    return ModelSettings(
        name=model, task="null", model_path=f"null:{ns.dim}", max_batch_size=ns.batch_size
    )


def replica_process(url: str, settings: ModelSettings, consumer: str, conn: Connection) -> None:
    """One replica in a process of its own (as Serve runs each): loads, says ready, serves
    from "go" to "stop", and sends back its CPU seconds and counters."""
    asyncio.run(serve_replica(url, settings, consumer, conn))


async def serve_replica(url: str, settings: ModelSettings, consumer: str, conn: Connection) -> None:
    limits = QueueSettings()
    runner = build_runner(settings)
    runner.load()
    worker = Worker(
        StreamQueue(connect(url), settings.name, consumer, limits), runner, settings, limits
    )
    loop = asyncio.get_running_loop()
    conn.send("ready")
    await loop.run_in_executor(None, conn.recv)  # "go"
    before = own_cpu_s()
    worker.start()
    await loop.run_in_executor(None, conn.recv)  # "stop"
    cpu_s = own_cpu_s() - before
    await worker.stop()
    conn.send({"cpu_s": cpu_s, "batches": worker.stats.batches, "ok": worker.stats.ok})


async def drain(url: str, ns: argparse.Namespace, repeat: int) -> Json:
    """One drain of a backlog of N jobs by `--replicas` replica processes."""
    model = f"null{repeat}"
    redis = connect(url)
    await queue_backlog(redis, model, ns)
    spawn = mp.get_context("spawn")
    pipes, procs = [], []
    for i in range(ns.replicas):
        ours, theirs = spawn.Pipe()
        proc = spawn.Process(
            target=replica_process, args=(url, settings_of(ns, model), f"r{i}", theirs)
        )
        proc.start()
        pipes.append(ours)
        procs.append(proc)
    try:
        for pipe in pipes:
            if not pipe.poll(120) or pipe.recv() != "ready":
                raise RuntimeError("a replica process did not start")
        await redis.config_resetstat()
        redis_before = await redis_cpu_s(redis)
        started = time.perf_counter()
        for pipe in pipes:
            pipe.send("go")
        while not await acked_all(redis, model, ns.n):
            await asyncio.sleep(0.005)
        took_s = time.perf_counter() - started
        redis_s = await redis_cpu_s(redis) - redis_before
        commands = await command_us(redis)
        for pipe in pipes:
            pipe.send("stop")
        reports = [pipe.recv() for pipe in pipes]
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
        await redis.aclose()
    replicas_cpu_s = sum(r["cpu_s"] for r in reports)
    return {
        "jobs_per_s": ns.n / took_s,
        "replica_cpu_us_per_job": replicas_cpu_s * 1e6 / ns.n,
        "redis_cpu_us_per_job": redis_s * 1e6 / ns.n,
        # Cores busy on average over the drain: Redis near 1.0 would make Redis the bound.
        "redis_cores": redis_s / took_s,
        "replica_cores": replicas_cpu_s / took_s,
        "mean_batch": ns.n / max(1, sum(r["batches"] for r in reports)),
        # Inside commands only: the rest of Redis' CPU is reading, parsing and writing.
        "redis_us_per_job_by_command": {
            name: round(us / ns.n, 2) for name, us in sorted(commands.items(), key=lambda x: -x[1])
        },
        "ok": sum(r["ok"] for r in reports),
    }


def profile(ns: argparse.Namespace) -> None:
    """One more drain in a child process under py-spy: the flame graph and the top table."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    argv = [a for a in sys.argv[1:] if a not in ("--idle",)]
    if "--profile" in argv:
        i = argv.index("--profile")
        del argv[i : i + 2]
    child = [sys.executable, "-m", "loadtest.pipeline", *argv, "--repeats", "1"]
    idle = ["--idle"] if ns.idle else []
    svg = str(ns.profile)
    record = [spy, "record", "--subprocesses", "-o", svg, "-r", "500", *idle, "--", *child]
    subprocess.run(record, check=True)
    print(f"flame graph: {svg}")


def main(argv: list[str] | None = None) -> int:
    ns = parse(argv)
    server = RedisServer().start()
    runs: list[Json] = []
    try:
        with tqdm(total=ns.repeats, desc="drains", unit="drain") as bar:
            for repeat in range(ns.repeats):
                runs.append(asyncio.run(drain(server.url, ns, repeat)))
                bar.update()
    finally:
        server.cleanup()
    keys = [
        "jobs_per_s",
        "replica_cpu_us_per_job",
        "redis_cpu_us_per_job",
        "replica_cores",
        "redis_cores",
        "mean_batch",
    ]
    medians = {k: st.median(r[k] for r in runs) for k in keys}
    print_medians([(k, [r[k] for r in runs]) for k in keys], digits=1)
    out = report_file("pipeline", ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "argv": sys.argv,
        "settings": vars(ns),
        "machine": machine_info(),
        "runs": runs,
        "medians": medians,
    }
    out.write_text(json.dumps(report, indent=2, default=str))
    print("Redis CPU per job inside each command (µs), last run:")
    for name, us in runs[-1]["redis_us_per_job_by_command"].items():
        print(f"  {name:<24} {us:6.2f}")
    print(f"report: {out}")
    if ns.profile:
        profile(ns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
