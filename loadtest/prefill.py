"""What one long prompt does to the streams already running: chunked prefill on and off.

    .venv/bin/python -m loadtest.prefill [--streams 7] [--prompt-tokens 2000] [--chunks 0,512,256]

SmolLM2-135M-Instruct in Sluice's scheduler (`runners/decoding.py`), in this process: `--streams`
requests decode (ignore_eos), then one request with a `--prompt-tokens` prompt arrives. Every
step is timed. Reported per `--prefill-chunk-tokens` setting (0: the whole prompt in one step):
the longest step while the long prompt is prefilled (the running streams' worst gap between
two tokens), the running streams' time per output token p50/p99 over the run, and the long
request's time to first token. Settings alternate within each repeat; medians over repeats.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np
import torch

from loadtest.chatbench import DOCUMENT
from loadtest.chatsystems import hf_model
from loadtest.report import machine_info, print_medians, report_file, save_repeats
from sluice.runners.decoding import ContinuousBatcher, GenRequest

Json = dict[str, Any]


def one_run(model: Any, tokenizer: Any, ns: argparse.Namespace, chunk: int) -> Json:
    batcher = ContinuousBatcher(
        model, tokenizer, max_batch=ns.streams + 1, prefill_chunk_tokens=chunk
    )
    short = list(tokenizer("Tell me about the river.")["input_ids"])
    text = DOCUMENT * (ns.prompt_tokens // 250 + 1)
    long_ids = list(tokenizer(text)["input_ids"])[: ns.prompt_tokens]
    for i in range(ns.streams):
        batcher.add(GenRequest(f"s{i}", short, ns.new_tokens, ignore_eos=True))
    for _ in range(4):  # the streams are running
        batcher.step()
    steps: list[float] = []
    arrived = time.perf_counter()
    batcher.add(GenRequest("long", long_ids, 4, ignore_eos=True))
    first = None
    prefill_steps = 0
    while not batcher.idle:
        began = time.perf_counter()
        events = batcher.step()
        steps.append(time.perf_counter() - began)
        if first is None and any(e.key == "long" for e in events):
            first = time.perf_counter() - arrived
            prefill_steps = len(steps)
    assert first is not None
    gaps = np.array(steps) * 1000
    return {
        "longest_step_ms": float(gaps[:prefill_steps].max()),
        "step_p50_ms": float(np.percentile(gaps, 50)),
        "step_p99_ms": float(np.percentile(gaps, 99)),
        "long_ttft_ms": first * 1000,
        "prefill_steps": prefill_steps,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.prefill",
        description="A long prompt arriving among running streams, with chunked prefill on "
        "and off (method: this module's doc).",
    )
    p.add_argument("--streams", type=int, default=7, help="running streams (7)")
    p.add_argument("--prompt-tokens", type=int, default=2000, help="the long prompt (2000)")
    p.add_argument("--new-tokens", type=int, default=64, help="each stream's tokens (64)")
    p.add_argument("--chunks", default="0,512,256", help="prefill_chunk_tokens values (0,512,256)")
    p.add_argument("--dtype", choices=("fp32", "auto", "bf16"), default="auto", help="(auto)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    p.add_argument("--repeats", type=int, default=3, help="(3)")
    ns = p.parse_args(argv)
    chunks = [int(c) for c in ns.chunks.split(",")]
    started = time.time()
    torch.set_num_threads(ns.threads)
    model, tokenizer = hf_model(ns)
    runs: list[Json] = []
    with torch.inference_mode():
        one_run(model, tokenizer, ns, chunks[0])  # warm-up, unrecorded
        for _ in range(ns.repeats):
            runs.append({f"chunk {c}": one_run(model, tokenizer, ns, c) for c in chunks})
    keys = [
        ("longest step while prefilling (ms)", "longest_step_ms"),
        ("step p99 (ms)", "step_p99_ms"),
        ("step p50 (ms)", "step_p50_ms"),
        ("long prompt's TTFT (ms)", "long_ttft_ms"),
    ]
    rows = [
        (f"{name}: {label}", [run[name][key] for run in runs])
        for label, key in keys
        for name in runs[0]
    ]
    out = report_file("prefill", None)
    save_repeats(out, ns, started, rows, runs, machine=machine_info())
    print(
        f"\n{ns.streams} streams running, then one {ns.prompt_tokens}-token prompt arrives; "
        f"{ns.dtype}, {ns.threads} threads, {ns.repeats} repeats\n"
    )
    print_medians(rows)
    print(f"\nreport: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
