"""Tokens/s per weight scheme, from chatbench reports: one panel per concurrency.

    python -m loadtest.weightsplot loadtest/reports/quant-c*-*.json --out docs/bench/weights.png

Each report is one `python -m loadtest.genbench --model smollm2 --quantization Q
--concurrency C` run; the bars are its medians per system, grouped by scheme.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

SCHEMES = ("none", "int8-weight", "int4-weight")
LABELS = {"none": "bf16", "int8-weight": "int8 weights", "int4-weight": "int4 weights"}


def medians(report: dict[str, Any]) -> dict[str, float]:
    """System → its median output tokens/s in this report."""
    out = {}
    for key, value in report["summary"].items():
        system, _, measure = key.partition(": ")
        if measure == "output tokens/s":
            out[system] = float(value["median"])
    return out


def load(paths: list[Path]) -> dict[int, dict[str, dict[str, float]]]:
    """Concurrency → scheme → system → tokens/s."""
    table: dict[int, dict[str, dict[str, float]]] = defaultdict(dict)
    for path in paths:
        report = json.loads(path.read_text())
        settings = report["settings"]
        table[int(settings["concurrency"])][settings["quantization"]] = medians(report)
    return table


def plot(table: dict[int, dict[str, dict[str, float]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    levels = sorted(table)
    fig, axes = plt.subplots(1, len(levels), figsize=(5.5 * len(levels), 4), squeeze=False)
    for ax, level in zip(axes[0], levels, strict=True):
        schemes = [s for s in SCHEMES if s in table[level]]
        systems = sorted({name for s in schemes for name in table[level][s]})
        x = np.arange(len(systems))
        width = 0.8 / max(len(schemes), 1)
        for k, scheme in enumerate(schemes):
            values = [table[level][scheme].get(name, 0.0) for name in systems]
            bars = ax.bar(x + (k - (len(schemes) - 1) / 2) * width, values, width)
            bars.set_label(LABELS[scheme])
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        top = max(v for s in schemes for v in table[level][s].values())
        ax.set_ylim(0, top * 1.3)  # headroom for the legend above the bars
        ax.set_xticks(x, systems)
        ax.set(ylabel="output tokens/s (median)", title=f"{level} concurrent request(s)")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", ncol=len(schemes))
    fig.suptitle("SmolLM2-135M, 2 threads: weight schemes (llama.cpp: its Q4_1 in every group)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.weightsplot", description=__doc__)
    p.add_argument("reports", nargs="+", type=Path, help="chatbench JSON reports")
    p.add_argument("--out", type=Path, default=Path("weights.png"), help="PNG (weights.png)")
    ns = p.parse_args(argv)
    plot(load(ns.reports), ns.out)
    print(f"plot: {ns.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
