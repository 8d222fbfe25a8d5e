"""The real chat model side by side: Sluice through the queue against what a CPU user would
run instead (issue 18).

    .venv/bin/python -m loadtest.genbench --model smollm2 [--concurrency 8] [--rate R] ...

One seeded workload: chat prompts of varied lengths (a question, a task with some context, a
~300-token document to summarise) through SmolLM2-135M-Instruct's own chat template, each with
`max_tokens` drawn from `--output-len`, greedy, and `ignore_eos`, so that every system makes
exactly the tokens asked for (the same work, whichever token each one picks). Each system runs
the workload `--repeats` times, the systems alternating within each repeat, after one
unrecorded warm-up each:

* **sluice**: redis-server, one replica process running the `Worker` that a Serve replica runs
  (the GGUF file dequantised to fp32, continuous batching, `max_batch_size` = `--concurrency`,
  `--threads` torch threads) and the gateway (`uvicorn --factory sluice.gateway:from_env`, a
  process of its own). Requests go through the official `openai` client, streamed: end to end,
  HTTP, admission, the stream, the replica, the reply stream, SSE.
* **llama.cpp**: its `llama-server` on the same GGUF file (Q4_1 weights, as they are),
  `--parallel` = `--concurrency` slots, `--threads`; the same `openai` client, streamed.
* **batcher**: Sluice's scheduler (`runners/decoding.py`) in this process, fed directly: the
  bare model under continuous batching (Sluice ÷ batcher is what the queue, the replica's
  pipeline, the gateway and HTTP cost).
* **static**: transformers' `generate` in this process on the same fp32 weights, static batches
  of the requests waiting (up to `--concurrency`); a batch runs to its longest request.
* **cb**: transformers' own continuous batching (`init_continuous_batching`), in this process.

Load: a closed loop of `--concurrency` clients (each sends its next request when its last is
answered), or with `--rate` Poisson arrivals (an open loop). Per request: TTFT (sent → first
text), TPOT ((finish - first) / (tokens - 1)), e2e. Reported per system: output tokens/s
(tokens ÷ (last finish - first send)), requests/s, TTFT and TPOT p50/p99, and goodput: requests/s
that met the SLO (TTFT ≤ `--slo-ttft-ms`, TPOT ≤ `--slo-tpot-ms`). Sluice's ratios to each
other system are computed within each repeat, then their medians taken.

`make llama-server` builds `llama-server` from the llama.cpp source that PyPI's
`llama-cpp-python` package ships (cmake, ~5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import statistics as st
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from loadtest.chatsystems import (
    MODEL,
    Batcher,
    LlamaCpp,
    Record,
    Req,
    Sluice,
    Static,
    TransformersCB,
    hf_model,
)
from loadtest.report import _save, machine_info, print_medians, report_file, save_repeats

Json = dict[str, Any]
ROOT = Path(__file__).resolve().parent.parent
LLAMA_SERVER = ROOT / ".cache" / "llama.cpp" / "build" / "bin" / "llama-server"
SYSTEMS = ("sluice", "batcher", "llama.cpp", "static", "cb")
DOCUMENT = (
    "The river rises in the hills above the town, where a dozen small streams meet in a "
    "marshy valley. For most of the year it is slow and shallow, and children wade across it "
    "at the old ford below the mill. In spring, when the snow melts on the high ground, it "
    "becomes something else entirely: brown, fast and loud, carrying branches and sometimes "
    "whole trees down towards the sea. The town has flooded four times in the last century. "
    "After the worst of these floods, the council built a sluice gate at the head of the "
    "millrace, so that the miller could divert the excess water into the old channel that "
    "runs behind the church and rejoins the river a mile downstream. The gate is opened by "
    "hand, with a large iron wheel, and for forty years the same family has been paid to "
    "watch the water level and turn the wheel when the marker stone disappears. The last of "
    "them retired this winter, and the council is now arguing about whether to replace him "
    "with an automatic gate, a warning system connected to the internet, or nothing at all. "
)
# ~300 tokens that every request of `--shared-prompt` begins with: prefix caching's case.
SHARED_SYSTEM_PROMPT = (
    "You answer questions from the people of a small river town. Here is what you know about "
    f"the town and its river; use it when it helps, and say so when it does not.\n\n{DOCUMENT}"
)
PROMPTS = [
    "What is the capital of France?",
    "Name three animals that live in the ocean.",
    "Write a short story about a dragon who loves tea.",
    "Explain how a queue works, for a child.",
    "Give me five tips for learning to cook.",
    "Describe a sunset over the mountains in a few sentences.",
    "What are the benefits of regular exercise? Answer in detail.",
    "Write a letter to a friend about your weekend.",
    f"Summarise this text in three sentences.\n\n{DOCUMENT}",
    f"What should the council do? Read this first.\n\n{DOCUMENT}",
    "List the planets of the solar system and one fact about each.",
    "Write a poem about autumn leaves.",
]


# -- the workload -----------------------------------------------------------------------------


def workload(tokenizer: Any, ns: argparse.Namespace, n: int, seed: int) -> list[Req]:
    rng = np.random.default_rng(seed)
    lo, hi = ns.output_len
    gaps = rng.exponential(1 / ns.rate, n - 1) if ns.rate else np.zeros(n - 1)
    arrivals = np.concatenate([[0.0], np.cumsum(gaps)])
    reqs = []
    for i in range(n):
        messages = [{"role": "user", "content": PROMPTS[int(rng.integers(len(PROMPTS)))]}]
        if ns.shared_prompt:
            messages.insert(0, {"role": "system", "content": SHARED_SYSTEM_PROMPT})
        ids: Any = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        tokens = int(rng.integers(lo, hi + 1))
        reqs.append(Req(f"q{i}", messages, list(ids["input_ids"]), tokens, float(arrivals[i])))
    return reqs


# -- figures ----------------------------------------------------------------------------------


def figures(reqs: Sequence[Req], records: Sequence[Record], ns: argparse.Namespace) -> Json:
    short = [r.key for r, rec in zip(reqs, records, strict=True) if rec.tokens != r.max_tokens]
    tokens = sum(rec.tokens for rec in records)
    wall = max(r.finish for r in records) - min(r.sent for r in records)
    ttft = [1000 * (r.first - r.sent) for r in records]
    tpot = [1000 * (r.finish - r.first) / (r.tokens - 1) for r in records if r.tokens > 1]
    good = sum(
        1
        for r, t in zip(records, ttft, strict=True)
        if t <= ns.slo_ttft_ms
        and (r.tokens <= 1 or 1000 * (r.finish - r.first) / (r.tokens - 1) <= ns.slo_tpot_ms)
    )
    out: Json = {
        "tokens_per_s": tokens / wall,
        "requests_per_s": len(records) / wall,
        "goodput_requests_per_s": good / wall,
        "slo_met_share": good / len(records),
        "wall_s": wall,
        "tokens": tokens,
        "requests_short": len(short),
    }
    for name, values in (("ttft", ttft), ("tpot", tpot)):
        p50, p99 = np.percentile(values, [50, 99])
        out |= {f"{name}_p50_ms": float(p50), f"{name}_p99_ms": float(p99)}
    return out


METRICS = [
    ("output tokens/s", "tokens_per_s"),
    ("requests/s", "requests_per_s"),
    ("goodput (requests/s in SLO)", "goodput_requests_per_s"),
    ("TTFT p50 (ms)", "ttft_p50_ms"),
    ("TTFT p99 (ms)", "ttft_p99_ms"),
    ("TPOT p50 (ms)", "tpot_p50_ms"),
    ("TPOT p99 (ms)", "tpot_p99_ms"),
]


def summary(runs: list[Json], systems: Sequence[str]) -> list[tuple[str, list[float]]]:
    rows: list[tuple[str, list[float]]] = []
    for label, key in METRICS:
        for name in systems:
            rows.append((f"{name}: {label}", [float(run[name][key]) for run in runs]))
    if "sluice" in systems:
        for name in systems:
            if name != "sluice":
                ratio = [run["sluice"]["tokens_per_s"] / run[name]["tokens_per_s"] for run in runs]
                rows.insert(0, (f"**Sluice ÷ {name}, tokens/s**", ratio))
    return rows


def plot(runs: list[Json], systems: Sequence[str], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    med = {s: {k: st.median(run[s][k] for run in runs) for _, k in METRICS} for s in systems}
    left.bar(systems, [med[s]["tokens_per_s"] for s in systems], color="tab:blue", label="tokens/s")
    left.set(ylabel="output tokens/s", title="throughput (median of repeats)")
    x = np.arange(len(systems))
    for offset, key, label in ((-0.2, "ttft_p50_ms", "TTFT p50"), (0.2, "ttft_p99_ms", "TTFT p99")):
        right.bar(x + offset, [med[s][key] for s in systems], 0.4, label=label)
    right.set_xticks(x, systems)
    right.set(ylabel="ms", title="time to first token (median of repeats)")
    right.legend(fontsize=8)
    right.grid(True, alpha=0.3)
    _save(fig, left, path)


# -- main -------------------------------------------------------------------------------------


def _span(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("..")
    span = (int(lo), int(hi or lo))
    if not 1 <= span[0] <= span[1]:
        raise argparse.ArgumentTypeError(f"expected 1 <= LO <= HI, got {text!r}")
    return span


def _quantized(ns: argparse.Namespace) -> str:
    return "" if ns.quantization == "none" else f" + {ns.quantization}"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.genbench --model smollm2",
        description="SmolLM2-135M-Instruct through Sluice (end to end, over the gateway) "
        "against llama.cpp's server, static generate and transformers' continuous batching, "
        "on one workload, alternating (method: loadtest/chatbench.py's doc).",
    )
    add = p.add_argument
    add("--model", choices=("smollm2",), default="smollm2", help="the real chat model")
    add("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    add("--requests", type=int, default=32, help="requests per run (32)")
    add("--output-len", type=_span, default=(32, 96), help="max_tokens, uniform (32..96)")
    add("--concurrency", type=int, default=8, help="clients, slots, batch size (8)")
    add("--rate", type=float, default=0.0, help="Poisson requests/s instead of a closed loop")
    add("--threads", type=int, default=2, help="threads of every system (2)")
    add(
        "--shared-prompt",
        action="store_true",
        help="every request begins with the same ~300-token system prompt",
    )
    add(
        "--prefix-cache-tokens",
        type=int,
        default=4096,
        help="sluice's and batcher's prefix cache (4096; 0: off)",
    )
    add(
        "--dtype",
        choices=("fp32", "auto", "bf16"),
        default="fp32",
        help="weights of sluice, static and cb (fp32; auto: bf16 where the CPU has it, as "
        "deployments/chat.yaml; Sluice's quality gate may still keep fp32)",
    )
    add(
        "--quantization",
        choices=("none", "int8-weight", "int4-weight"),
        default="none",
        help="weight-only int8/int4 for sluice, batcher, static and cb (none; needs bf16: "
        "--dtype bf16, or auto on a CPU with native bf16)",
    )
    add("--repeats", type=int, default=3, help="alternations (3)")
    add("--seed", type=int, default=0, help="workload seed (0)")
    add("--slo-ttft-ms", type=float, default=1000.0, help="goodput's TTFT bound (1000)")
    add("--slo-tpot-ms", type=float, default=100.0, help="goodput's TPOT bound (100)")
    add("--llama-server", default=str(LLAMA_SERVER), help="the binary (make llama-server)")
    add("--out", type=Path, help="JSON report (default loadtest/reports/chatbench-<time>.json)")
    add("--plot", action="store_true", help="also a PNG: tokens/s and TTFT per system")
    add("--no-progress", action="store_true", help="no progress bars")
    ns = p.parse_args(argv)
    ns.systems = [s for s in ns.systems.split(",") if s]
    if unknown := set(ns.systems) - set(SYSTEMS):
        p.error(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    if min(ns.requests, ns.concurrency, ns.threads, ns.repeats) < 1 or ns.rate < 0:
        p.error("counts must be at least 1 and --rate not negative")
    return ns


def start(name: str, ns: argparse.Namespace) -> Any:
    """A system, loaded and warm. In-process ones get a model of their own: transformers'
    continuous batching switches its model's attention to a paged one."""
    if name == "sluice":
        return Sluice(ns)
    if name == "llama.cpp":
        return LlamaCpp(ns)
    model, tokenizer = hf_model(ns)
    if name == "batcher":
        return Batcher(ns, model, tokenizer)
    if name == "static":
        return Static(ns, model, tokenizer)
    return TransformersCB(ns, model, tokenizer)


def main(argv: list[str] | None = None) -> int:
    ns, began = parse(argv), time.time()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = report_file("chatbench", ns.out)
    torch.set_num_threads(ns.threads)
    _, tokenizer = hf_model(ns)
    reqs = workload(tokenizer, ns, ns.requests, ns.seed)
    warm = workload(tokenizer, ns, ns.concurrency, ns.seed + 1)
    for r in warm:
        r.max_tokens, r.arrival_s = 4, 0.0
    runs: list[Json] = [{} for _ in range(ns.repeats)]
    failures: Json = {}
    with ExitStack() as stack:
        # All started (loads are not timed), then the repeats alternate between them: a slow
        # minute of this box then costs every system alike. Idle, each waits on a socket.
        live: dict[str, Any] = {}
        for name in tqdm(ns.systems, desc="starting", disable=ns.no_progress):
            try:
                live[name] = system = start(name, ns)
                stack.callback(system.close)
                system.run(warm, ns)
            except (RuntimeError, FileNotFoundError, OSError) as exc:
                failures[name] = repr(exc)
                print(f"\n{name} failed, left out: {exc!r}", file=sys.stderr)
        total = len(live) * ns.repeats * ns.requests
        with tqdm(total=total, unit="req", disable=ns.no_progress) as bar:
            for k in range(ns.repeats):
                for name, system in live.items():
                    bar.set_description(f"{k + 1}/{ns.repeats} {name}")
                    runs[k][name] = figures(reqs, system.run(reqs, ns, bar), ns)
    systems = [s for s in ns.systems if s not in failures]
    rows = summary(runs, systems)
    report = save_repeats(
        out,
        ns,
        began,
        rows,
        runs,
        failures=failures,
        model={"name": "SmolLM2-135M-Instruct", "path": MODEL},
        machine=machine_info() | {"threads": ns.threads},
    )
    del report
    if ns.plot and systems:
        plot(runs, systems, out.with_suffix(".png"))
    load = f"Poisson {ns.rate}/s" if ns.rate else f"closed loop, {ns.concurrency} clients"
    print(
        f"\n{ns.requests} chat requests ({load}), max_tokens {ns.output_len}, greedy, "
        f"ignore_eos, {ns.dtype} weights{_quantized(ns)} (llama.cpp: the GGUF's Q4_1), "
        f"{ns.threads} threads, "
        f"{ns.repeats} repeats\n"
    )
    print_medians(rows)
    print(f"\nreport: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
