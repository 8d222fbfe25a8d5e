"""Redis cost per job: the figure that sizes Redis (docs/scaling.md), with no model in the way.

    .venv/bin/python -m loadtest.rediscost [--jobs 20000] [--batch 64] [--encoding json] ...

A redis-server on a free port; per repeat, a fresh model (its groups and registration made by
the real `StreamQueue`), then three phases, each timed by Redis' own CPU counters (INFO cpu,
user + system), so how fast this Python client drives it does not matter:

* **submit, raw**: `--jobs` jobs XADDed in pipelines of `--batch` (any producer's path);
* **submit, admitted**: as many through `FCALL sluice_submit` (the SDK's: admission, dedupe);
* **serve**: what replicas do for the raw jobs, through the real `StreamQueue`: the pull
  script in batches of `--batch`, then `finish` (result SET NX + XACK in one MULTI) with a
  result shaped like MiniLM's (384 floats, as JSON or base64, plus timings), then one trim.

Redis' CPU per job, in microseconds, is reported for each, and jobs/s that one Redis core
could carry (1e6 ÷ (submit + serve)). Figures are medians over repeats.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shlex
import statistics as st
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import redis
from tqdm import tqdm

from loadtest.report import machine_info, print_medians, report_file
from sluice import admission
from sluice.protocol import Result, jobs_key
from sluice.queue import Outcome, StreamQueue, connect
from sluice.settings import QueueSettings
from sluice.stack import RedisServer

ROOT = Path(__file__).resolve().parents[1]
Json = dict[str, Any]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.rediscost",
        description="Redis CPU per job on the protocol path (see the module docstring).",
    )
    add = p.add_argument
    add("--jobs", type=int, default=20_000, help="jobs per phase (20000)")
    add("--batch", type=int, default=64, help="pipeline and pull batch size (64)")
    add("--dim", type=int, default=384, help="floats in a result (384: MiniLM)")
    add("--encoding", choices=("json", "base64"), default="json", help="result output (json)")
    add("--repeats", type=int, default=3, help="(3)")
    add("--out", type=Path, help="JSON report (default loadtest/reports/rediscost-<time>.json)")
    ns = p.parse_args(argv)
    if min(ns.jobs, ns.batch, ns.dim, ns.repeats) < 1:
        p.error("counts must be at least 1")
    return ns


async def cpu_s(redis: Any) -> float:
    cpu = await redis.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def output(ns: argparse.Namespace, rng: np.random.Generator) -> Any:
    vector = rng.standard_normal(ns.dim).astype(np.float32)
    if ns.encoding == "base64":
        return base64.b64encode(vector.tobytes()).decode()
    return [float(x) for x in vector]


async def repeat(ns: argparse.Namespace, url: str, bar: tqdm) -> Json:
    redis = connect(url)
    model = f"cost-{uuid.uuid4().hex[:8]}"
    queue = StreamQueue(redis, model, "bench", QueueSettings())
    await queue.ensure_group()
    await queue.register({"task": "embed", "model_path": "none", "registered_ms": 0})
    text = "a sentence of about fourteen words, like the ones in every other benchmark here"
    fields: dict[Any, Any] = {"input": orjson.dumps({"text": text}).decode()}
    ids = [f"j{i}" for i in range(ns.jobs)]
    chunks = [ids[i : i + ns.batch] for i in range(0, ns.jobs, ns.batch)]
    out: Json = {}

    before = await cpu_s(redis)
    for chunk in chunks:
        async with redis.pipeline(transaction=False) as pipe:
            for job_id in chunk:
                pipe.xadd(jobs_key(model), {"id": job_id, **fields})
            await pipe.execute()
        bar.update(len(chunk))
    out["submit_raw_us"] = (await cpu_s(redis) - before) * 1e6 / ns.jobs

    admitted = f"{model}-a"
    other = StreamQueue(redis, admitted, "bench", QueueSettings())
    await other.ensure_group()
    await other.register({"task": "embed", "model_path": "none", "registered_ms": 0})
    before = await cpu_s(redis)
    for chunk in chunks:
        await admission.submit(redis, admitted, [(i, fields) for i in chunk])
        bar.update(len(chunk))
    out["submit_admitted_us"] = (await cpu_s(redis) - before) * 1e6 / ns.jobs

    rng = np.random.default_rng(0)
    timings = {"queue_ms": 1.0, "batch_wait_ms": 1.0, "compute_ms": 10.0, "total_ms": 12.0,
               "batch_size": float(ns.batch)}  # fmt: skip
    served, result_bytes = 0, 0
    before = await cpu_s(redis)
    while served < ns.jobs:
        entries = await queue.pull(ns.batch, None)
        outcomes = []
        for e in entries:
            job_id = e.fields[b"id"].decode()
            body = Result(job_id, model, "ok", output=output(ns, rng), timings=timings).to_json()
            result_bytes += len(body)
            outcomes.append(Outcome(e.entry_id, job_id, body))
        await queue.finish(outcomes)
        served += len(entries)
        bar.update(len(entries))
    await queue.trim()
    out["serve_us"] = (await cpu_s(redis) - before) * 1e6 / ns.jobs
    out["result_bytes"] = result_bytes / ns.jobs
    out["total_us"] = out["submit_raw_us"] + out["serve_us"]
    out["jobs_per_s_per_core"] = 1e6 / out["total_us"]
    await redis.aclose()
    return out


def main(argv: list[str] | None = None) -> int:
    ns = parse(argv)
    out = report_file("rediscost", ns.out)
    server = RedisServer().start()
    runs = []
    try:
        bar = tqdm(total=3 * ns.jobs * ns.repeats, unit="job", desc="redis cost")
        for _ in range(ns.repeats):
            runs.append(asyncio.run(repeat(ns, server.url, bar)))
        bar.close()
        version = redis.Redis.from_url(server.url).info("server")["redis_version"]
    finally:
        server.cleanup()
    summary = {k: {"median": st.median(r[k] for r in runs), "runs": [r[k] for r in runs]}
               for k in runs[0]}  # fmt: skip
    report = {
        "command": shlex.join(sys.orig_argv),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(ns).items()},
        "redis_version": version,
        "machine": machine_info(),
        "summary": summary,
        "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nredis {version}, {ns.jobs} jobs a phase, batch {ns.batch}, {ns.dim} floats as "
          f"{ns.encoding}, {ns.repeats} repeats\n")  # fmt: skip
    print_medians([(k, row["runs"]) for k, row in summary.items()], 1, "Redis CPU per job")
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
