"""Reports: one folder per command, `loadtest/reports/<name>-<time>/`.

- `report.json`: the command, settings, machine, and per run its figures (stats.py) with the
  series the plots are drawn from (latency CDF, queue depth, a per-second timeline).
- `summary.md`: the table of runs, the stage times, and for a comparison the ratios.
- PNGs: latency vs offered load (p50/p99), throughput and goodput vs offered load, latency CDF
  (log-scale tail), queue depth over time, and the per-second timeline.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display, and safe off the main thread
import matplotlib.pyplot as plt
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator

from loadtest.stats import STAGES

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ROOT / "loadtest" / "reports"
Json = dict[str, Any]


def report_dir(name: str, out: Path | None) -> Path:
    folder = out or REPORTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def report_file(name: str, out: Path | None) -> Path:
    """Where a benchmark writes its JSON report: `out`, or `loadtest/reports/<name>-<time>.json`."""
    return out or REPORTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"


def offline_env() -> None:
    """What every benchmark that starts Ray sets unless told otherwise: no weights downloaded at
    run time, and no usage reporting from a machine that may have no network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def save_repeats(
    out: Path,
    ns: Any,
    started: float,
    rows: Sequence[tuple[str, Sequence[float]]],
    runs: Sequence[Json],
    **extra: Any,
) -> Json:
    """Writes the JSON report of a repeated benchmark (drain, scaling, ...): the command, when,
    its settings, `extra` (machine, config...), each measure's median over `rows`, the runs."""
    import shlex
    import statistics
    import sys

    report = {
        "command": shlex.join(sys.orig_argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": time.time() - started,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(ns).items()},
        **extra,
        "summary": {name: {"median": statistics.median(v), "runs": list(v)} for name, v in rows},
        "runs": list(runs),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return report


def print_medians(
    rows: Sequence[tuple[str, Sequence[float]]], digits: int = 3, header: str = "measure"
) -> None:
    """A repeated benchmark's Markdown table: each measure's median, then every run."""
    import statistics

    print(f"| {header} | median | runs |\n|---|---|---|")
    for name, values in rows:
        runs = ", ".join(f"{v:.{digits}f}" for v in values)
        print(f"| {name} | {statistics.median(values):.{digits}f} | {runs} |")


def machine_info() -> Json:
    """CPU, cores, load, versions and the git commit: enough to tell two reports apart."""
    import torch

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in info.splitlines())}
    flags = set(cpu.get("flags", "").split()) & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}
    head, dirty = (
        subprocess.run(["git", "-C", str(ROOT), *cmd], capture_output=True, text=True).stdout
        for cmd in (["rev-parse", "HEAD"], ["status", "--porcelain"])
    )
    return {
        "cpu": cpu.get("model name", platform.processor()),
        "cpu_flags": sorted(flags),
        "cores": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git": head.strip() + ("-dirty" if dirty else ""),
    }


def _save(fig: Any, ax: Any, path: Path, grid: str = "major") -> Path:
    """Grid, legend, PNG, close: the common end of every plot."""
    ax.grid(True, which=grid, alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _x(run: Json) -> float:
    """A run's offered load: the schedule's rate (open loop), the send rate (closed loop)."""
    return float(run["offered_rate"] if run["mode"] == "open" else run["sent_rate"])


def _label(run: Json) -> str:
    if run["mode"] == "closed":
        return f"{run['target']} c={run['concurrency']}"
    return f"{run['target']} {run['offered_rate']:.0f}/s"


def _by_target(runs: Sequence[Json]) -> dict[str, list[Json]]:
    out: dict[str, list[Json]] = {}
    for run in runs:
        out.setdefault(run["target"], []).append(run)
    return {k: sorted(v, key=_x) for k, v in out.items()}


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(report: Json) -> str:
    runs: list[Json] = report["runs"]
    slo = report["settings"].get("slo_ms")
    lines = [
        f"# Load test `{report['name']}`",
        "",
        f"`{report['command']}`  ",
        f"{report['started']}, {report['machine']['cpu']} ({report['machine']['cores']} cores),"
        f" git {report['machine']['git']}; SLO {slo} ms; warm-up "
        f"{report['settings'].get('warmup')} s excluded.",
        "",
        "| target | mode | offered/s | throughput/s | goodput/s | p50 ms | p90 ms | p99 ms "
        "| p99.9 ms | max ms | mean batch | sent >10 ms late | max lag ms | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        lat, snd = run["latency_ms"], run["sender"]
        errors = ", ".join(f"{k} {v}" for k, v in run["errors"].items()) or "none"
        mode = "open" if run["mode"] == "open" else f"closed c={run['concurrency']}"
        mode += " (saturated)" if run.get("saturation") else ""
        lines.append(
            f"| {run['target']} | {mode} | {_x(run):.1f} | {run['throughput_per_s']:.1f} "
            f"| {run['goodput_per_s']:.1f} | {_fmt(lat.get('p50'))} | {_fmt(lat.get('p90'))} "
            f"| {_fmt(lat.get('p99'))} | {_fmt(lat.get('p99.9'))} | {_fmt(lat.get('max'))} "
            f"| {run['batch_size']['mean']:.1f} | {snd['behind_10ms']} "
            f"| {snd['lag_max_ms']:.1f} | {errors} |"
        )
    lines += ["", "Stage times from the results' own timings, ms (p50 / p99):", ""]
    lines += ["| run | queue wait | batch wait | compute | write |", "|---|---|---|---|---|"]
    for run in runs:
        cells = [
            f"{s['p50']:.1f} / {s['p99']:.1f}" if s else "-" for s in run["stages_ms"].values()
        ]
        lines.append(f"| {_label(run)} | " + " | ".join(cells) + " |")
    if report.get("comparison"):
        lines += ["", "## Side by side", "", comparison_markdown(report["comparison"])]
    return "\n".join(lines) + "\n"


def comparison(runs: Sequence[Json], base: str) -> Json:
    """Per target: best throughput and goodput over its runs, and each as a ratio of `base`."""
    best: Json = {}
    for target, rs in _by_target(runs).items():
        best[target] = {
            "throughput_per_s": max(r["throughput_per_s"] for r in rs),
            "goodput_per_s": max(r["goodput_per_s"] for r in rs),
            "p99_ms_at_lowest_load": rs[0]["latency_ms"].get("p99"),
        }
    for row in best.values():
        for key in ("throughput_per_s", "goodput_per_s"):
            ref = best.get(base, {}).get(key)
            row[f"{key}_vs_{base}"] = row[key] / ref if ref else None
    return {"base": base, "targets": best}


def comparison_markdown(comp: Json) -> str:
    base = comp["base"]
    lines = [
        f"| target | best throughput/s | ÷ {base} | best goodput/s | ÷ {base} "
        "| p99 ms at the lowest load |",
        "|---|---|---|---|---|---|",
    ]
    for target, row in comp["targets"].items():
        lines.append(
            f"| {target} | {row['throughput_per_s']:.1f} "
            f"| {_fmt(row[f'throughput_per_s_vs_{base}'], 2)} | {row['goodput_per_s']:.1f} "
            f"| {_fmt(row[f'goodput_per_s_vs_{base}'], 2)} "
            f"| {_fmt(row['p99_ms_at_lowest_load'])} |"
        )
    return "\n".join(lines)


def _plain(ax: Any) -> None:
    """Log-scale y ticks as plain numbers (5, 20, 300), not powers of ten."""
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: ""))


def _plot_vs_load(runs: Sequence[Json], folder: Path) -> list[Path]:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for target, rs in _by_target(runs).items():
        xs = [_x(r) for r in rs]
        for q, style in (("p50", "-o"), ("p99", "--s")):
            ys = [r["latency_ms"].get(q, float("nan")) for r in rs]
            ax.plot(xs, ys, style, label=f"{target} {q}")
    ax.set(xlabel="offered load (jobs/s)", ylabel="latency (ms)", yscale="log")
    _plain(ax)
    ax.set_title("Latency vs offered load")
    lat = _save(fig, ax, folder / "latency_vs_load.png", "both")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = 1.0
    for target, rs in _by_target(runs).items():
        xs = [_x(r) for r in rs]
        top = max(top, *xs)
        ax.plot(xs, [r["throughput_per_s"] for r in rs], "-o", label=f"{target} throughput")
        ax.plot(xs, [r["goodput_per_s"] for r in rs], "--s", label=f"{target} goodput")
    ax.plot([0, top], [0, top], ":", color="grey", label="answered = offered")
    ax.set(xlabel="offered load (jobs/s)", ylabel="jobs/s")
    ax.set_title("Throughput and goodput (SLO) vs offered load")
    thr = _save(fig, ax, folder / "throughput_vs_load.png")
    return [lat, thr]


def _plot_cdf(runs: Sequence[Json], folder: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        points = [(ms, q) for ms, q in run["series"]["latency_cdf"] if q < 100]
        if points:
            # x = 1 / (1 - quantile) on a log axis: each decade is one more nine.
            ax.plot(
                [1 / (1 - q / 100) for _, q in points], [ms for ms, _ in points], label=_label(run)
            )
    ticks = [1, 10, 100, 1000, 10000, 100000]
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{100 * (1 - 1 / x):g}%"))
    ax.set(xlabel="percentile", ylabel="latency (ms)", yscale="log")
    _plain(ax)
    ax.set_title("Latency by percentile (from due time)")
    path = _save(fig, ax, folder / "latency_cdf.png", "both")
    return path


def _plot_series(runs: Sequence[Json], folder: Path) -> list[Path]:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        series = run["series"]["queue_depth"]
        if series:
            ax.plot([t for t, _ in series], [d for _, d in series], label=_label(run))
    ax.set(xlabel="seconds since start", ylabel="jobs waiting (lag + pending)")
    ax.set_title("Queue depth over time")
    depth = _save(fig, ax, folder / "queue_depth.png")

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for run in runs:
        tl = run["series"]["timeline"]
        ts = [p["t"] for p in tl]
        line = top.plot(ts, [p["answered_per_s"] for p in tl], label=f"{_label(run)} answered")
        top.plot(ts, [p["offered_per_s"] for p in tl], ":", color=line[0].get_color())
        bottom.plot(ts, [p.get("p99_ms", float("nan")) for p in tl], label=_label(run))
    top.set(ylabel="jobs/s (dotted: offered)")
    bottom.set(xlabel="seconds since start (due time)", ylabel="p99 latency (ms)", yscale="log")
    _plain(bottom)
    warmup = float(runs[0].get("warmup_s") or 0) if runs else 0.0
    for ax in (top, bottom):
        if warmup:
            ax.axvspan(0, warmup, color="grey", alpha=0.15, lw=0)  # not counted
    top.set_title("Per second")
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
    top.legend(fontsize=7)
    timeline = folder / "timeline.png"
    fig.savefig(timeline, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [depth, timeline]


def _plot_stages(runs: Sequence[Json], folder: Path) -> Path:
    """Where a job's time goes, per run: the median of each stage from the results' own
    timings, stacked (targets without timings, the peer, have no bar)."""
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.35 * max(1, len(runs))))
    labels = [_label(run) for run in runs]
    left = [0.0] * len(runs)
    for stage in STAGES:
        widths = [float(run["stages_ms"].get(stage, {}).get("p50", 0.0)) for run in runs]
        ax.barh(labels, widths, left=left, label=stage.removesuffix("_ms").replace("_", " "))
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.invert_yaxis()
    ax.set(xlabel="median ms per job (from the results' timings)")
    ax.set_title("Where the time goes: stage medians")
    return _save(fig, ax, folder / "stages.png", "major")


def write(folder: Path, report: Json) -> list[Path]:
    """Writes report.json, summary.md and the PNGs; returns their paths."""
    paths = [folder / "report.json", folder / "summary.md"]
    paths[0].write_text(json.dumps(report, indent=1) + "\n")
    paths[1].write_text(markdown(report))
    runs = report["runs"]
    paths += _plot_vs_load(runs, folder)
    paths.append(_plot_cdf(runs, folder))
    paths += _plot_series(runs, folder)
    paths.append(_plot_stages(runs, folder))
    return paths
