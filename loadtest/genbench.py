"""Generation benchmark: Sluice's continuous batching against static HF `generate`, one process.

    .venv/bin/python -m loadtest.genbench [--shape small] [--batch 8] [--arrival poisson --rate 2]
    .venv/bin/python -m loadtest.genbench --model smollm2 ...   (the real chat model, end to end,
                                                                 against its peers: chatbench.py)

The same seeded workload (random prompt ids, no special tokens; mixed prompt and output lengths)
goes through the same model two ways, alternating per repeat after one unrecorded warm-up each:

* **static**: `model.generate` on batches of `--batch` requests in arrival order (left-padded,
  masked, greedy; not sorted by length: a server knows neither output lengths nor the queue to
  come). `generate` stops a batch at one length, so it must run to its longest request's
  `max_new_tokens`: shorter rows decode tokens nobody asked for (reported as waste), and every
  result exists only when `generate` returns, which is its finish. First token = the first call
  of a `LogitsProcessor` hook, right after the prefill: when a streamer could have sent it, so
  TTFT is not charged for the late return. Under Poisson arrivals a batch starts once `--batch`
  wait, the oldest waited `--max-wait-ms`, or all the rest have come.
* **continuous**: every request goes into `ContinuousBatcher` (EOS off, greedy) with its own
  `max_new_tokens`, as it arrives, between steps; TTFT is its `first_token_s`, finish is the
  return of the `step()` that ended it. Its per-step detokenisation is inside the timing (static
  does none: a small edge to static).

Useful tokens are each request's own `max_new_tokens` (EOS is off, so lengths are exact); tokens/s
= useful tokens ÷ (last finish - first arrival); TTFT and e2e count from arrival; TPOT = (finish -
first token) ÷ (tokens - 1). Model build, warm-up and workload are outside the clock. Spot check:
4 requests' continuous greedy tokens against single-request `generate` (fp32 only: bf16 rounding
varies with batch shape). Random weights cost exactly what trained ones of that shape would.
"""

from __future__ import annotations

import argparse
import statistics as st
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import torch
from tokenizers import Tokenizer, models
from tqdm import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessorList,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from loadtest.report import _save, machine_info, print_medians, report_file, save_repeats
from sluice.runners.decoding import ContinuousBatcher, GenRequest
from sluice.runners.loading import resolve_model_path

Json: TypeAlias = dict[str, Any]
Bar: TypeAlias = "tqdm[Any]"
ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SHAPES: dict[str, Json] = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=1024,
    ),
    "small": dict(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=1408,
        vocab_size=32000,
    ),
    "qwen2.5-0.5b": dict(
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
}
SPOT = 4  # requests in the correctness spot check


@dataclass(slots=True)
class Req:
    key: str
    prompt: list[int]
    new_tokens: int
    arrival: float  # seconds after the run's start


@dataclass(slots=True)
class Trace:
    """What one path's run saw, per request key; times are `time.monotonic()` seconds."""

    t0: float  # the run's start, where arrival offsets count from
    first: dict[str, float] = field(default_factory=dict)
    finish: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, list[int]] = field(default_factory=dict)


def load_model(ns: argparse.Namespace) -> tuple[Any, Any]:
    """The model (eval, on the device, EOS off) and its tokenizer."""
    dtype, device = DTYPES[ns.dtype], torch.device(ns.device)
    model: Any
    if ns.model_path:
        path = resolve_model_path(ns.model_path)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    else:
        tok = word_tokenizer(SHAPES[ns.shape]["vocab_size"])
        torch.manual_seed(ns.seed)
        model = Qwen2ForCausalLM(Qwen2Config(**SHAPES[ns.shape], pad_token_id=0))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    # A fresh config drops a checkpoint's sampling defaults (Qwen's repetition_penalty, top_k):
    # both paths must be plain greedy, and without eos every request runs to its own length.
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None
    )
    return model.to(device=device, dtype=dtype).eval(), tok


def word_tokenizer(vocab: int) -> Any:
    """One word per id (`<pad>` is 0): the batcher detokenises, random ids need any decoder."""
    words = {"<pad>": 0} | {f"w{i}": i for i in range(1, vocab)}
    words_only = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok: Any = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=words_only, pad_token="<pad>"
    )
    return tok


def workload(ns: argparse.Namespace, tok: Any, n: int, seed: int) -> list[Req]:
    """`n` requests: random non-special prompt ids, uniform lengths, arrival offsets."""
    rng = np.random.default_rng(seed)
    ids = np.setdiff1d(np.arange(tok.vocab_size), tok.all_special_ids)
    plens = rng.integers(ns.prompt_len[0], ns.prompt_len[1] + 1, n)
    olens = rng.integers(ns.output_len[0], ns.output_len[1] + 1, n)
    gaps = rng.exponential(1 / ns.rate, n - 1) if ns.arrival == "poisson" else np.zeros(n - 1)
    arrive = np.concatenate([[0.0], np.cumsum(gaps)])
    return [
        Req(f"r{i}", [int(x) for x in rng.choice(ids, int(p))], int(o), float(a))
        for i, (p, o, a) in enumerate(zip(plens, olens, arrive, strict=True))
    ]


@dataclass(slots=True)
class StepClock:
    """A `LogitsProcessor` that only notes when each step's logits exist (first = first token)."""

    times: list[float] = field(default_factory=list)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.is_cuda:  # launches are async; the time must be when the logits exist
            torch.cuda.synchronize(scores.device)
        self.times.append(time.monotonic())
        return scores


def static_batch(model: Any, batch: list[Req], pad: int) -> tuple[list[list[int]], StepClock]:
    """One left-padded greedy `generate` to the batch's longest `max_new_tokens`."""
    width = max(len(r.prompt) for r in batch)
    ids = torch.tensor([[pad] * (width - len(r.prompt)) + r.prompt for r in batch])
    mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in batch])
    clock, longest, dev = StepClock(), max(r.new_tokens for r in batch), model.device
    hook = LogitsProcessorList([clock])
    out = model.generate(
        ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=longest, logits_processor=hook
    )
    rows: list[list[int]] = out[:, width:].tolist()  # .tolist() waits for the device
    return [row[: r.new_tokens] for row, r in zip(rows, batch, strict=True)], clock


def next_batch(reqs: list[Req], done: int, ns: argparse.Namespace, t0: float) -> int:
    """Waits until static may start its next batch; returns the end index of that batch."""
    last = min(done + ns.batch, len(reqs)) - 1
    start = min(t0 + reqs[last].arrival, t0 + reqs[done].arrival + ns.max_wait_ms / 1000)
    time.sleep(max(0.0, start - time.monotonic()))
    now = time.monotonic()
    return next(i for i in range(last, done - 1, -1) if t0 + reqs[i].arrival <= now) + 1


def run_static(model: Any, tok: Any, reqs: list[Req], ns: argparse.Namespace, bar: Bar) -> Json:
    trace, steps, done, computed = Trace(time.monotonic()), [], 0, 0
    while done < len(reqs):
        end = next_batch(reqs, done, ns, trace.t0)
        batch = reqs[done:end]
        rows, clock = static_batch(model, batch, tok.pad_token_id)
        now = time.monotonic()
        for r, row in zip(batch, rows, strict=True):
            trace.first[r.key], trace.finish[r.key], trace.tokens[r.key] = clock.times[0], now, row
        steps += [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
        computed += len(batch) * len(clock.times)
        bar.update(len(batch))
        done = end
    out = figures(reqs, trace)
    out["decode_step_ms_p50"] = 1000 * st.median(steps) if steps else 0.0
    out["wasted_token_share"] = 1 - out["useful_tokens"] / computed
    return out


def run_continuous(model: Any, tok: Any, reqs: list[Req], ns: argparse.Namespace, bar: Bar) -> Json:
    batcher = ContinuousBatcher(
        model, tok, max_batch=ns.batch, max_batch_tokens=ns.max_batch_tokens, eos_token_ids=()
    )
    trace = Trace(time.monotonic(), tokens={r.key: [] for r in reqs})
    decode: list[tuple[float, int]] = []  # (seconds, rows) of steps that admitted nobody
    added = 0
    while len(trace.finish) < len(reqs):
        now = time.monotonic()
        while added < len(reqs) and trace.t0 + reqs[added].arrival <= now:
            batcher.add(GenRequest(reqs[added].key, reqs[added].prompt, reqs[added].new_tokens))
            added += 1
        if batcher.idle:
            time.sleep(max(0.0, trace.t0 + reqs[added].arrival - now))
            continue
        events = batcher.step()
        end = time.monotonic()
        for e in events:
            trace.tokens[e.key] += e.token_ids
            trace.first.setdefault(e.key, e.first_token_s or end)
            if e.finished:
                trace.finish[e.key] = end
                bar.update(1)
        if events and all(e.generated > 1 for e in events):
            decode.append((end - now, len(events)))
    out = figures(reqs, trace)
    out["decode_step_ms_p50"] = 1000 * st.median(s for s, _ in decode) if decode else 0.0
    out["decode_rows_mean"] = st.mean(n for _, n in decode) if decode else 0.0
    out["tokens"] = trace.tokens  # for the spot check, which drops it
    return out


def figures(reqs: list[Req], trace: Trace) -> Json:
    """Throughput and latency of one path's run."""
    got = [len(trace.tokens[r.key]) for r in reqs]
    if got != [r.new_tokens for r in reqs]:
        raise RuntimeError("a request got a different number of tokens than it asked for")
    first, finish, n = trace.first, trace.finish, sum(got)
    arrive = {r.key: trace.t0 + r.arrival for r in reqs}
    wall = max(finish.values()) - min(arrive.values())
    ttft = [1000 * (first[k] - arrive[k]) for k in arrive]
    e2e = [1000 * (finish[k] - arrive[k]) for k in arrive]
    tpot = [(e - t) / (g - 1) for e, t, g in zip(e2e, ttft, got, strict=True) if g > 1]
    out: Json = {"wall_s": wall, "useful_tokens": n, "tokens_per_s": n / wall}
    out["requests_per_s"] = len(reqs) / wall
    for name, values in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e)):
        p50, p99 = np.percentile(values, [50, 99]) if values else (np.nan, np.nan)
        out |= {f"{name}_p50_ms": float(p50), f"{name}_p99_ms": float(p99)}
    out["per_request"] = {"output_len": got, "e2e_ms": e2e, "ttft_ms": ttft}
    return out


def spot_check(model: Any, reqs: list[Req], tokens: dict[str, list[int]], dtype: str) -> Json:
    """Continuous greedy tokens against single-request `generate`, for SPOT requests."""
    if dtype != "fp32":
        return {"checked": False, "note": f"skipped in {dtype}: rounding differs with batch shape"}
    picks, mismatched = reqs[:: max(1, len(reqs) // SPOT)][:SPOT], []
    for r in picks:
        ids = torch.tensor([r.prompt], device=model.device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=r.new_tokens)
        if out[0, len(r.prompt) :].tolist() != tokens[r.key]:
            mismatched.append(r.key)
    keys, ok = [r.key for r in picks], not mismatched
    note = f"passed: {keys} equal" if ok else f"WARNING: {mismatched} differ from"
    note += " single-request generate"
    return {"checked": True, "keys": keys, "mismatched": mismatched, "passed": ok, "note": note}


PATHS = ("static", "continuous")
METRICS = (
    [("useful tokens/s", "tokens_per_s"), ("requests/s", "requests_per_s")]
    + [
        (f"{name} {q} (ms)", f"{name.lower()}_{q}_ms")
        for name in ("TTFT", "TPOT", "e2e")
        for q in ("p50", "p99")
    ]
    + [("decode step p50 (ms)", "decode_step_ms_p50")]
)


def summary(runs: list[Json]) -> list[tuple[str, list[float]]]:
    def col(path: str, key: str) -> list[float]:
        return [float(run[path][key]) for run in runs]

    rows = [(f"{path}: {label}", col(path, key)) for label, key in METRICS for path in PATHS]
    ratio = (np.array(col("continuous", "tokens_per_s")) / col("static", "tokens_per_s")).tolist()
    rows.insert(2, ("**ratio continuous ÷ static, tokens/s**", ratio))
    rows.append(("static: share of decoded tokens wasted", col("static", "wasted_token_share")))
    rows.append(("continuous: rows per decode step", col("continuous", "decode_rows_mean")))
    return rows


def plot(run: Json, path: Path) -> None:
    import matplotlib.pyplot as plt  # after loadtest.report, which picked the Agg backend

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, marker in zip(PATHS, "ox", strict=True):
        per = run[name]["per_request"]
        ax.scatter(per["output_len"], np.array(per["e2e_ms"]) / 1000, marker=marker, label=name)
    ax.set(xlabel="output tokens", ylabel="e2e latency (s)", title="per-request latency")
    _save(fig, ax, path)


def _span(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("..")
    try:
        span = (int(lo), int(hi or lo))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected LO..HI or N, got {text!r}") from exc
    if not 1 <= span[0] <= span[1]:
        raise argparse.ArgumentTypeError(f"expected 1 <= LO <= HI, got {text!r}")
    return span


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.genbench",
        description="Static HF generate against Sluice's continuous batcher on one workload, "
        "alternating, in one process; a Markdown table and a JSON report (method: module doc).",
    )
    add = p.add_argument
    add("--shape", choices=tuple(SHAPES), default="small", help="random-weight Qwen2 (small)")
    add("--model-path", help="a local model folder instead of --shape")
    add(
        "--model",
        choices=("smollm2",),
        help="the real chat model against its peers "
        "(loadtest/chatbench.py; its own options: --model smollm2 --help)",
    )
    add("--requests", type=int, default=48, help="requests per run (48)")
    add("--prompt-len", type=_span, default=(16, 128), help="uniform prompt tokens (16..128)")
    add("--output-len", type=_span, default=(8, 128), help="uniform new tokens (8..128)")
    add("--batch", type=int, default=8, help="static batch and continuous max_batch (8)")
    add("--max-batch-tokens", type=int, default=4096, help="continuous prefill budget (4096)")
    add("--arrival", choices=("offline", "poisson"), default="offline", help="(offline: all at 0)")
    add("--rate", type=float, default=1.0, help="poisson requests/s (1)")
    add("--max-wait-ms", type=float, default=100.0, help="static: oldest waits at most (100)")
    add("--dtype", choices=tuple(DTYPES), default="fp32", help="(fp32)")
    add("--device", choices=("cpu", "cuda"), default="cpu", help="(cpu)")
    add("--threads", type=int, help="torch threads (torch's default)")
    add("--repeats", type=int, default=3, help="static/continuous alternations (3)")
    add("--seed", type=int, default=0, help="workload and weights seed (0)")
    add("--out", type=Path, help="JSON report (default loadtest/reports/genbench-<time>.json)")
    add("--plot", action="store_true", help="also a PNG of e2e latency vs output length")
    add("--no-progress", action="store_true", help="no progress bars")
    ns = p.parse_args(argv)
    counts = (ns.requests, ns.batch, ns.max_batch_tokens, ns.repeats, ns.threads or 1)
    if min(counts) < 1 or ns.rate <= 0 or ns.max_wait_ms < 0:
        p.error("counts must be at least 1, --rate positive, --max-wait-ms not negative")
    return ns


def measure(ns: argparse.Namespace, model: Any, tok: Any, bar: Bar) -> tuple[list[Json], Json]:
    """The warm-up, the alternating repeats, and the spot check on the first continuous run."""
    reqs = workload(ns, tok, ns.requests, ns.seed)
    warm = workload(ns, tok, ns.batch, ns.seed + 1)
    for r in warm:
        r.new_tokens, r.arrival = min(4, r.new_tokens), 0.0
    off = tqdm(disable=True)
    bar.set_description("warm-up")
    run_static(model, tok, warm, ns, off)
    run_continuous(model, tok, warm, ns, off)
    runs: list[Json] = []
    tokens: dict[str, list[int]] = {}
    for k in range(ns.repeats):
        bar.set_description(f"{k + 1}/{ns.repeats} static")
        static = run_static(model, tok, reqs, ns, bar)
        bar.set_description(f"{k + 1}/{ns.repeats} continuous")
        cont = run_continuous(model, tok, reqs, ns, bar)
        got = cont.pop("tokens")
        tokens = tokens or got
        bar.set_postfix(ratio=f"{cont['tokens_per_s'] / static['tokens_per_s']:.2f}")
        runs.append({"static": static, "continuous": cont})
    bar.set_description("spot check")
    return runs, spot_check(model, reqs, tokens, ns.dtype)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a == "--model" or a.startswith("--model=") for a in args):
        from loadtest import chatbench

        return chatbench.main(args)
    ns, started = parse(args), time.time()
    out = report_file("genbench", ns.out)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    model, tok = load_model(ns)
    bar = tqdm(total=2 * ns.repeats * ns.requests, unit="req", disable=ns.no_progress)
    with torch.inference_mode():
        runs, check = measure(ns, model, tok, bar)
    bar.close()
    rows = summary(runs)
    params = sum(p.numel() for p in model.parameters())
    report = save_repeats(
        out,
        ns,
        started,
        rows,
        runs,
        spot_check=check,
        model={"name": ns.model_path or ns.shape, "parameters": params},
        machine=machine_info() | {"torch_threads": torch.get_num_threads()},
    )
    if ns.plot:
        plot(runs[-1], out.with_suffix(".png"))
    print(
        f"\n{ns.requests} requests ({ns.arrival}), prompts {ns.prompt_len}, outputs {ns.output_len}"
        f", batch {ns.batch}; {report['model']['name']} ({params / 1e6:.1f} M), {ns.dtype} on "
        f"{ns.device}, {torch.get_num_threads()} threads, {ns.repeats} repeats\n"
    )
    print_medians(rows)
    print(f"\nspot check of continuous greedy tokens: {check['note']}")
    print(f"\nreport: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
