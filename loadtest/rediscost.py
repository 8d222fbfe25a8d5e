"""Redis cost per job: the figure that sizes Redis (docs/scaling.md), with no model in the way.

    .venv/bin/python -m loadtest.rediscost [--jobs 20000] [--batch 64] [--encoding json] ...

A redis-server on a free port; per repeat, a fresh model (its groups and registration made by
the real `StreamQueue`), then three phases, each timed by Redis' own CPU counters (INFO cpu,
user + system), so how fast this Python client drives it does not matter:

* **submit, raw**: `--jobs` jobs XADDed in pipelines of `--batch` (any producer's path);
* **submit, admitted**: as many through `FCALL sluice_submit` (the SDK's: admission, dedupe);
* **submit as a tenant**: as many through `FCALL sluice_enqueue` (into the tenant's inbox),
  then the **intake** that replicas run, moving the inbox into the lane (`admit-n.lua`);
* **serve**: what replicas do for the raw jobs, through the real `StreamQueue`: the pull
  script in batches of `--batch`, then `finish` (the store script, the reply push, the XACK)
  with a result shaped like MiniLM's (384 floats, as JSON or base64, plus timings), then one
  trim.

Then the two storms of issue 16, each submitted raw and served as a replica serves it (the
pull, the look for a stored result, `finish` with that result: acked unrun, pushed again):

* **resubmit storm**: every id of the first phase XADDed again, already answered;
* **cancel storm**: `--jobs` fresh jobs, each cancelled (`SET NX` of a `cancelled` result)
  before a replica pulls it.

Every job of every phase names the same `reply_to`, a stream that already holds 10,000 results
(a gateway's, say): a push's cost must not depend on it. Redis' CPU per job, in microseconds,
is reported for each, with storm ÷ normal, and jobs/s that one Redis core could carry
(1e6 ÷ (submit + serve)). Figures are medians over repeats.
"""

from __future__ import annotations

import argparse
import asyncio
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
from sluice.errors import JobCancelled
from sluice.intake import Intake
from sluice.protocol import (
    TENANTS_KEY,
    Result,
    encode_embedding,
    error_result,
    jobs_key,
    reply_key,
    result_key,
)
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
    add(
        "--reply",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="every job names a reply_to holding 10,000 results (default); --no-reply: none",
    )
    add("--out", type=Path, help="JSON report (default loadtest/reports/rediscost-<time>.json)")
    ns = p.parse_args(argv)
    if min(ns.jobs, ns.batch, ns.dim, ns.repeats) < 1:
        p.error("counts must be at least 1")
    return ns


async def cpu_s(redis: Any) -> float:
    cpu = await redis.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def output(ns: argparse.Namespace, rng: np.random.Generator) -> Any:
    """A result's output as the embedding runner gives it (float32 floats, or base64)."""
    vector = rng.standard_normal(ns.dim).astype(np.float32)
    return encode_embedding(vector, "base64" if ns.encoding == "base64" else "float")


async def repeat(ns: argparse.Namespace, url: str, bar: tqdm) -> Json:
    redis = connect(url)
    model = f"cost-{uuid.uuid4().hex[:8]}"
    queue = StreamQueue(redis, model, "bench", QueueSettings())
    await queue.ensure_group()
    await queue.register({"task": "embed", "model_path": "none", "registered_ms": 0})
    text = "a sentence of about fourteen words, like the ones in every other benchmark here"
    reply = reply_key(f"cost-{model}")
    fields: dict[Any, Any] = {"input": orjson.dumps({"text": text}).decode()}
    if ns.reply:
        fields["reply_to"] = reply
    filler = orjson.dumps({"id": "other", "status": "ok", "output": [0.1] * 32})
    for start in range(0, 10_000, 1000):
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(start, start + 1000):
                pipe.xadd(reply, {"id": f"other-{i}", "result": filler})
            await pipe.execute()
    ids = [f"j{i}" for i in range(ns.jobs)]
    chunks = [ids[i : i + ns.batch] for i in range(0, ns.jobs, ns.batch)]
    out: Json = {}

    before = await cpu_s(redis)
    await submit_raw(redis, model, chunks, fields, bar)
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
    out.update(await tenant_submit(redis, f"{model}-t", chunks, fields, bar))

    rng = np.random.default_rng(0)
    timings = {
        "queue_ms": 1.0,
        "batch_wait_ms": 1.0,
        "compute_ms": 10.0,
        "total_ms": 12.0,
        "batch_size": float(ns.batch),
    }
    served, result_bytes = 0, 0
    before = await cpu_s(redis)
    while served < ns.jobs:
        entries = await queue.pull(ns.batch, None)
        outcomes = []
        for e in entries:
            job_id = e.fields[b"id"].decode()
            body = Result(job_id, model, "ok", output=output(ns, rng), timings=timings).to_json()
            result_bytes += len(body)
            outcomes.append(Outcome(e.entry_id, job_id, body, reply if ns.reply else None))
        await queue.finish(outcomes)
        served += len(entries)
        bar.update(len(entries))
    await queue.trim()
    out["serve_us"] = (await cpu_s(redis) - before) * 1e6 / ns.jobs
    out["result_bytes"] = result_bytes / ns.jobs
    out["total_us"] = out["submit_raw_us"] + out["serve_us"]
    out["jobs_per_s_per_core"] = 1e6 / out["total_us"]

    # The resubmit storm: every answered id again, raw.
    before = await cpu_s(redis)
    await submit_raw(redis, model, chunks, fields, bar)
    await serve_answered(queue, ns, reply, bar)
    out["resubmit_storm_us"] = (await cpu_s(redis) - before) * 1e6 / ns.jobs

    # The cancel storm: fresh ids, each cancelled before it is pulled.
    fresh = [[f"c{i}" for i in chunk] for chunk in chunks]
    before = await cpu_s(redis)
    await submit_raw(redis, model, fresh, fields, bar)
    for chunk in fresh:
        async with redis.pipeline(transaction=False) as pipe:
            for job_id in chunk:
                res = error_result(model, job_id, JobCancelled("cancelled by request"))
                pipe.set(result_key(model, job_id), res.to_json(), nx=True, ex=86_400)
            await pipe.execute()
    await serve_answered(queue, ns, reply, bar)
    out["cancel_storm_us"] = (await cpu_s(redis) - before) * 1e6 / ns.jobs
    out["resubmit_storm_vs_normal"] = out["resubmit_storm_us"] / out["total_us"]
    out["cancel_storm_vs_normal"] = out["cancel_storm_us"] / out["total_us"]
    await redis.aclose()
    return out


async def tenant_submit(
    redis: Any, model: str, chunks: list[list[str]], fields: Any, bar: tqdm
) -> Json:
    """A tenant's path to the lane: FCALL sluice_enqueue (admission, dedupe, RPUSH to its
    inbox, the bell), then the replicas' intake moving the inbox into the lane (admit-n.lua)."""
    queue = StreamQueue(redis, model, "bench", QueueSettings())
    await queue.ensure_group()
    await queue.register({"task": "embed", "model_path": "none", "registered_ms": 0})
    await redis.sadd(TENANTS_KEY, "bench")
    jobs = sum(len(c) for c in chunks)
    before = await cpu_s(redis)
    for chunk in chunks:
        await admission.submit(redis, model, [(i, fields) for i in chunk], tenant="bench")
        bar.update(len(chunk))
    submitted = await cpu_s(redis)
    intake = Intake(redis, model, QueueSettings())
    while (await intake.move(["bench"])).moved:
        pass
    moved = await cpu_s(redis)
    await redis.srem(TENANTS_KEY, "bench")
    return {
        "submit_tenant_us": (submitted - before) * 1e6 / jobs,
        "intake_us": (moved - submitted) * 1e6 / jobs,
    }


async def submit_raw(
    redis: Any, model: str, chunks: list[list[str]], fields: Any, bar: tqdm
) -> None:
    for chunk in chunks:
        async with redis.pipeline(transaction=False) as pipe:
            for job_id in chunk:
                pipe.xadd(jobs_key(model), {"id": job_id, **fields})
            await pipe.execute()
        bar.update(len(chunk))


async def serve_answered(queue: StreamQueue, ns: argparse.Namespace, reply: str, bar: tqdm) -> None:
    """What a replica does with jobs that have a result already: it looks (one MGET a batch),
    runs none, and acks each with its stored result pushed to reply_to (the worker's path)."""
    served = 0
    while served < ns.jobs:
        entries = await queue.pull(ns.batch, None)
        ids = [e.fields[b"id"].decode() for e in entries]
        stored = await queue.existing_results(ids)
        outcomes = [
            Outcome(e.entry_id, job_id, body, reply if ns.reply else None, "skipped", e.lane)
            for e, job_id, body in zip(entries, ids, stored, strict=True)
            if body is not None
        ]
        await queue.finish(outcomes)
        served += len(entries)
        bar.update(len(entries))


def main(argv: list[str] | None = None) -> int:
    ns = parse(argv)
    out = report_file("rediscost", ns.out)
    server = RedisServer().start()
    runs = []
    try:
        bar = tqdm(total=8 * ns.jobs * ns.repeats, unit="job", desc="redis cost")
        for _ in range(ns.repeats):
            runs.append(asyncio.run(repeat(ns, server.url, bar)))
        bar.close()
        version = redis.Redis.from_url(server.url).info("server")["redis_version"]
    finally:
        server.cleanup()
    summary = {
        k: {"median": st.median(r[k] for r in runs), "runs": [r[k] for r in runs]} for k in runs[0]
    }
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
    print(
        f"\nredis {version}, {ns.jobs} jobs a phase, batch {ns.batch}, {ns.dim} floats as "
        f"{ns.encoding}, {ns.repeats} repeats\n"
    )
    print_medians([(k, row["runs"]) for k, row in summary.items()], 1, "Redis CPU per job")
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
