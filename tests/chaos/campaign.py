"""The chaos campaign: a seeded, randomized schedule of faults against a real local stack, then
the exactly-once verdict. `make chaos [MINUTES=5] [SEED=1]`, or:

    python -m tests.chaos --minutes 5 --seed 1 [--report chaos.json]

The stack: a redis-server with AOF `appendfsync always`; a fault proxy in front of it; three
replica processes (two embedding, one slow generation model) that reach Redis only through
the proxy; producers that reach Redis directly (valid jobs, malformed entries, resubmits of
answered ids, cancels, tight deadlines, long generation jobs); a pinger process sampling
Redis' PING latency. The schedule, one fault every 1.5-4 s (seeded):

- `replica_kill`: SIGKILL a replica, restart it 0.5-3 s later;
- `replica_freeze`: SIGSTOP a replica for 0.5-3 visibility timeouts, then SIGCONT (its
  entries are reclaimed meanwhile, and it must not answer them a second, different time);
- `proxy_reset`: cut every replica connection mid-flight;
- `proxy_latency`: 10-200 ms on every chunk through the proxy, for 1-5 s;
- `redis_kill`: kill -9 redis-server, restart it from its AOF 0.5-2 s later.

Then the faults stop, every replica runs, and the campaign waits for the queues to drain. It
prints one table (jobs, faults by kind, lost, answered twice, stuck, dead letters by reason,
PING p50/p99) and exits 1 unless lost, answered twice and stuck are 0 and PING p99 is under
50 ms.
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis

from sluice import tenants
from sluice.protocol import GROUP, dead_key, lane_keys, reply_key, result_key, tenant_dead_key
from sluice.stack import RedisServer, free_port
from tests.chaos.producers import (
    NO_ID_KEY,
    TENANT,
    TENANT_POISON_KEY,
    TENANT_REPLY,
    Producers,
    Reader,
    entered_key,
)
from tests.chaos.proxy import FaultProxy

log = logging.getLogger("chaos")

EMBED, GEN = "chaos-embed", "chaos-gen"
VISIBILITY_S = 2.0
QUEUE = {
    "visibility_timeout_s": VISIBILITY_S,
    "reclaim_interval_s": 0.5,
    "max_deliveries": 5,
    "block_ms": 200,
    "reply_maxlen": 1_000_000,  # the checker reads every push
    "trim_interval_s": 1.0,
}
PING_P99_MAX_MS = 50.0
FAULTS = ("replica_kill", "replica_freeze", "proxy_reset", "proxy_latency", "redis_kill")


@dataclass
class Replica:
    """One replica process, restartable."""

    name: str
    args: list[str]
    log_file: Path
    proc: subprocess.Popen[bytes] | None = None
    frozen: bool = False

    def start(self) -> None:
        out = self.log_file.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.chaos.replica",
                *self.args,
                "--consumer",
                f"{self.name}-{time.monotonic_ns()}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.frozen = False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.frozen:
            self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Stack:
    """Redis (AOF always), the proxy, the pinger and the replicas."""

    folder: Path
    models: dict[str, str]  # model -> folder
    redis: RedisServer = field(init=False)
    proxy: FaultProxy = field(init=False)
    replicas: list[Replica] = field(default_factory=list)
    pinger: subprocess.Popen[bytes] | None = None

    def start(self) -> Stack:
        self.redis = RedisServer(
            extra_args=("--appendonly", "yes", "--appendfsync", "always")
        ).start()
        self.proxy = FaultProxy(free_port(), self.redis.port).start()
        proxy_url = f"redis://127.0.0.1:{self.proxy.port}/0"
        queue = json.dumps(QUEUE)
        specs = [
            ("embed-a", EMBED, "embed", 0.0),
            ("embed-b", EMBED, "embed", 0.0),
            ("gen-a", GEN, "generate", 0.03),
        ]
        for name, model, task, delay in specs:
            args = [
                "--url",
                proxy_url,
                "--model",
                model,
                "--path",
                self.models[model],
                "--task",
                task,
                "--queue",
                queue,
                "--step-delay-s",
                str(delay),
            ]
            replica = Replica(name, args, self.folder / f"{name}.log")
            replica.start()
            self.replicas.append(replica)
        self.pinger = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.chaos.pinger",
                "--port",
                str(self.redis.port),
                "--out",
                str(self.folder / "ping.txt"),
            ],
        )
        return self

    def kill_redis(self) -> None:
        assert self.redis.proc is not None
        self.redis.proc.send_signal(signal.SIGKILL)
        self.redis.proc.wait(10)
        self.redis.proc = None

    def restart_redis(self) -> None:
        self.redis.start(timeout_s=30)

    def stop(self) -> None:
        for replica in self.replicas:
            replica.stop()
        if self.pinger is not None:
            self.pinger.terminate()
            self.pinger.wait(10)
        self.proxy.stop()
        self.redis.cleanup()


class Schedule:
    """Seeded faults, with their undo steps (restart, SIGCONT, latency off) kept in a heap."""

    def __init__(self, stack: Stack, rng: random.Random) -> None:
        self.stack = stack
        self.rng = rng
        self.counts: Counter[str] = Counter()
        self._undo: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self.redis_down_since: float | None = None
        self.down_windows: list[tuple[float, float]] = []  # unix s: Redis down or reloading

    def later(self, delay_s: float, action: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._undo, (time.monotonic() + delay_s, self._seq, action))

    def run_due(self, force: bool = False) -> None:
        while self._undo and (force or self._undo[0][0] <= time.monotonic()):
            _, _, action = heapq.heappop(self._undo)
            action()

    def inject(self) -> None:
        kind = self.rng.choice(FAULTS)
        if kind == "redis_kill" and self.redis_down_since is not None:
            kind = "proxy_reset"
        getattr(self, kind)()
        self.counts[kind] += 1

    def _live(self) -> list[Replica]:
        return [r for r in self.stack.replicas if r.alive() and not r.frozen]

    def replica_kill(self) -> None:
        live = self._live()
        if not live:
            return
        victim = self.rng.choice(live)
        victim.signal(signal.SIGKILL)
        self.later(self.rng.uniform(0.5, 3.0), victim.start)

    def replica_freeze(self) -> None:
        live = self._live()
        if not live:
            return
        victim = self.rng.choice(live)
        victim.signal(signal.SIGSTOP)
        victim.frozen = True

        def thaw() -> None:
            victim.signal(signal.SIGCONT)
            victim.frozen = False

        self.later(self.rng.uniform(0.5, 3.0) * VISIBILITY_S, thaw)

    def proxy_reset(self) -> None:
        self.stack.proxy.reset()

    def proxy_latency(self) -> None:
        self.stack.proxy.latency_s = self.rng.uniform(0.01, 0.2)

        def off() -> None:
            self.stack.proxy.latency_s = 0.0

        self.later(self.rng.uniform(1.0, 5.0), off)

    def redis_kill(self) -> None:
        self.stack.kill_redis()
        self.redis_down_since = time.time()

        def restart() -> None:
            self.stack.restart_redis()
            assert self.redis_down_since is not None
            # Samples taken while the AOF loads measure the restart, not Redis at work.
            self.down_windows.append((self.redis_down_since, time.time() + 0.5))
            self.redis_down_since = None

        self.later(self.rng.uniform(0.5, 2.0), restart)

    def settle(self) -> None:
        """Undoes every pending fault now; every replica runs again."""
        self.run_due(force=True)
        for replica in self.stack.replicas:
            if replica.frozen:
                replica.signal(signal.SIGCONT)
                replica.frozen = False
            if not replica.alive():
                replica.start()
        self.stack.proxy.latency_s = 0.0


@dataclass
class Verdict:
    """The campaign's table."""

    seed: int
    minutes: float
    jobs: dict[str, int]
    faults: dict[str, int]
    actions: dict[str, int]
    lost: list[str]
    answered_twice: list[str]
    stuck: int
    dead_letters: dict[str, int]
    ping_p50_ms: float
    ping_p99_ms: float
    ping_samples: int
    repeated_pushes: int
    unexpected_letters: list[str] = field(default_factory=list)
    results_read: int = 0  # results a client read during the run (the durability check)
    read_then_changed: list[str] = field(default_factory=list)  # of those: now gone or other

    @property
    def passed(self) -> bool:
        return (
            not self.lost
            and not self.answered_twice
            and not self.read_then_changed
            and not self.unexpected_letters
            and self.ping_samples > 0
            and self.stuck == 0
            and self.ping_p99_ms < PING_P99_MAX_MS
        )

    def table(self) -> str:
        rows = [
            ("seed", str(self.seed)),
            ("minutes", f"{self.minutes:g}"),
            ("jobs", ", ".join(f"{m}: {n}" for m, n in self.jobs.items())),
            ("producer actions", ", ".join(f"{k} {v}" for k, v in sorted(self.actions.items()))),
            ("faults", ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items()))),
            ("lost", f"{len(self.lost)} {self.lost[:3]}"),
            ("answered twice", f"{len(self.answered_twice)} {self.answered_twice[:3]}"),
            ("stuck", str(self.stuck)),
            (
                "unexpected dead letters",
                f"{len(self.unexpected_letters)} {self.unexpected_letters[:3]}",
            ),
            (
                "dead letters",
                ", ".join(f"{k} {v}" for k, v in sorted(self.dead_letters.items())) or "0",
            ),
            ("repeated pushes (same result)", str(self.repeated_pushes)),
            (
                "results read, then lost or replaced",
                f"{len(self.read_then_changed)} of {self.results_read} read",
            ),
            (
                "Redis PING p50 / p99",
                f"{self.ping_p50_ms:.2f} / {self.ping_p99_ms:.2f} ms ({self.ping_samples} samples)",
            ),
            ("verdict", "PASS" if self.passed else "FAIL"),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"| {'what':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
        lines += [f"| {k:<{width}} | {v} |" for k, v in rows]
        return "\n".join(lines)


def build_models(folder: Path) -> dict[str, str]:
    from tests.conftest import build_tiny_bert, build_tiny_generator

    return {
        EMBED: str(build_tiny_bert(folder / "bert")),
        GEN: str(build_tiny_generator(folder / "gen")),
    }


def run(minutes: float, seed: int, folder: Path, progress: bool = True) -> Verdict:
    """Runs the campaign; returns its verdict (the caller decides what fails)."""
    rng = random.Random(seed)
    stack = Stack(folder, build_models(folder)).start()
    replies = [reply_key(f"chaos-{i}") for i in range(4)]
    producers: Producers | None = None
    try:
        admin = redis.Redis(port=stack.redis.port, socket_timeout=5)
        _wait_ready(admin, [EMBED, GEN], 120)
        tenants.add(admin, TENANT, "chaos-tenant-password")
        replies.append(TENANT_REPLY)
        producers = Producers(stack.redis.url, EMBED, GEN, replies[:-1], seed).start()
        reader = Reader(stack.redis.url, EMBED, producers.ledger, seed).start()
        schedule = Schedule(stack, rng)
        end = time.monotonic() + minutes * 60
        bar = _bar(minutes * 60, progress)
        next_fault = time.monotonic() + rng.uniform(1.5, 4.0)
        while (now := time.monotonic()) < end:
            schedule.run_due()
            if now >= next_fault:
                schedule.inject()
                next_fault = now + rng.uniform(1.5, 4.0)
            time.sleep(0.05)
            bar(now, schedule.counts)
        producers.stop()
        schedule.settle()
        admin = redis.Redis(port=stack.redis.port, socket_timeout=5)
        verdict = judge(admin, producers, schedule, replies, seed, minutes, folder)
        reader.stop()
        verdict.read_then_changed = reader.changed()
        verdict.results_read = len(reader.seen)
        reader.r.close()
    finally:
        if producers is not None:
            producers.stop()
        stack.stop()
    return verdict


def _wait_ready(admin: redis.Redis, models: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(admin.exists(f"sluice:{{{m}}}:info") for m in models):
            return
        time.sleep(0.2)
    raise TimeoutError(f"the replicas did not register {models} in {timeout_s}s")


def _bar(total_s: float, enabled: bool) -> Callable[[float, Counter[str]], None]:
    if not enabled:
        return lambda now, counts: None
    from tqdm import tqdm

    start = time.monotonic()
    bar = tqdm(total=int(total_s), unit="s", desc="chaos", leave=True)

    def update(now: float, counts: Counter[str]) -> None:
        done = int(now - start)
        if done > bar.n:
            bar.set_postfix(faults=sum(counts.values()), refresh=False)
            bar.update(done - bar.n)

    return update


def judge(
    admin: redis.Redis,
    producers: Producers,
    schedule: Schedule,
    replies: list[str],
    seed: int,
    minutes: float,
    folder: Path,
    drain_s: float = 120.0,
) -> Verdict:
    """Waits for the queues to drain, then counts what a user would call a failure.

    What entered is read from the markers each submit set in its own MULTI (so a submit whose
    reply was lost to a `kill -9` is judged by what Redis kept). Lost: an id that entered with
    no final result, or whose entry named a reply stream that never got a push of it. Answered
    twice: a push that differs from the stored result, two dead letters for an id, or a dead
    letter beside another result. Unexpected letters: a letter of an entry deleted while
    pending (nothing deletes lanes here), or more or fewer letters of entries without an id
    than such entries entered."""
    ledger = producers.ledger
    ids: dict[str, list[str]] = {}
    must_push: set[str] = set()
    for model in (EMBED, GEN):
        candidates = list(
            dict.fromkeys(ledger.confirmed.get(model, []) + ledger.uncertain.get(model, []))
        )
        markers: list[Any] = []
        for start in range(0, len(candidates), 1000):
            chunk = candidates[start : start + 1000]
            markers += admin.mget([entered_key(model, i) for i in chunk])  # type: ignore[operator]
        ids[model] = [i for i, m in zip(candidates, markers, strict=True) if m is not None]
        must_push |= {i for i, m in zip(candidates, markers, strict=True) if m == b"1"}
        unconfirmed = set(ledger.confirmed.get(model, [])) - set(ids[model])
        assert not unconfirmed, f"confirmed submits without their marker: {sorted(unconfirmed)[:5]}"
    deadline = time.monotonic() + drain_s
    while time.monotonic() < deadline and (_unanswered(admin, ids) or _stuck(admin)):
        time.sleep(0.5)
    results = {m: _results(admin, m, ids[m]) for m in ids}
    dead = [f for m in ids for _, f in admin.xrange(dead_key(m))]
    reasons = Counter(_reason(f) for f in dead)
    pushes = Counter(
        orjson.loads(f[b"result"])["id"]
        for stream in replies
        for _, f in admin.xrange(stream)
        if b"result" in f  # not a generation's streamed text delta
    )
    lost = [f"{m}:{i}" for m in ids for i in ids[m] if results[m].get(i) is None]
    lost += [f"no push:{i}" for i in sorted(must_push) if not pushes[i]]
    twice = _answered_twice(admin, results, dead, replies)
    no_id_entered = int(admin.get(NO_ID_KEY) or 0)
    unexpected = [f"{n} deleted_while_pending" for n in [reasons["deleted_while_pending"]] if n]
    # The tenant's poison: each on its own dead stream, never on the shared one.
    tenant_letters = admin.xlen(tenant_dead_key(EMBED, TENANT))
    reasons["tenant poison (own dead stream)"] = tenant_letters
    if tenant_letters != int(admin.get(TENANT_POISON_KEY) or 0):
        unexpected.append(
            f"{tenant_letters} letters of the tenant's poison, "
            f"{int(admin.get(TENANT_POISON_KEY) or 0)} entered"
        )
    if reasons["malformed (no usable id)"] != no_id_entered:
        unexpected.append(
            f"{reasons['malformed (no usable id)']} letters of entries without an id, "
            f"{no_id_entered} entered"
        )
    p50, p99, n = _ping(folder / "ping.txt", schedule.down_windows)
    return Verdict(
        seed=seed,
        minutes=minutes,
        jobs={m: len(v) for m, v in ids.items()},
        faults=dict(schedule.counts),
        actions=dict(ledger.actions),
        lost=lost,
        answered_twice=twice,
        stuck=_stuck(admin),
        dead_letters=dict(reasons),
        ping_p50_ms=p50,
        ping_p99_ms=p99,
        ping_samples=n,
        repeated_pushes=sum(c - 1 for c in pushes.values() if c > 1),
        unexpected_letters=unexpected,
    )


def _results(admin: redis.Redis, model: str, ids: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for start in range(0, len(ids), 1000):
        chunk = ids[start : start + 1000]
        values: Any = admin.mget([result_key(model, i) for i in chunk])
        out.update(
            {i: (orjson.loads(v) if v else None) for i, v in zip(chunk, values, strict=True)}
        )
    return out


def _unanswered(admin: redis.Redis, ids: dict[str, list[str]]) -> int:
    return sum(1 for m, v in ids.items() for r in _results(admin, m, v).values() if r is None)


def _stuck(admin: redis.Redis) -> int:
    """Entries still pending, or not yet delivered, in any lane of either model.

    Undelivered entries are counted from the stream itself (those after the group's
    last-delivered-id), not from XINFO's `lag`: Redis 7.0 restores a group's `entries-read`
    from its last AOF rewrite on a restart, so after a `kill -9` its lag over-counts by every
    delivery since that rewrite (measured: 3 deliveries, lag 5 instead of 2)."""
    total = 0
    for model in (EMBED, GEN):
        for key in lane_keys(model):
            if not admin.exists(key):
                continue
            for group in admin.xinfo_groups(key):  # type: ignore[union-attr]
                if group["name"] not in (GROUP, GROUP.encode()):
                    continue
                last = group["last-delivered-id"]
                last = last.decode() if isinstance(last, bytes) else str(last)
                undelivered: Any = admin.xrange(key, min=f"({last}", max="+", count=100_000)
                total += int(group["pending"]) + len(undelivered)
    return total


def _reason(fields: dict[bytes, bytes]) -> str:
    reason = fields.get(b"reason", b"").decode("utf-8", "replace")
    if reason.startswith("delivered"):
        return "over max_deliveries"
    if "failed" in reason and "max_deliveries" in reason:
        return "retries exhausted"
    if reason == "deleted_while_pending":
        return reason
    if b"id" not in fields or reason.startswith(("`id` must match", "missing field `id`")):
        return "malformed (no usable id)"
    return f"other: {reason[:40]}"


def _answered_twice(
    admin: redis.Redis,
    results: dict[str, dict[str, Any]],
    dead: list[dict[bytes, bytes]],
    replies: list[str],
) -> list[str]:
    """Ids with a second, different answer: a push that differs from the stored result, a
    second dead letter, or a dead letter beside a result that is not its `dead_lettered`."""
    stored = {i: r for m in results.values() for i, r in m.items() if r is not None}
    twice = []
    for stream in replies:
        for _, f in admin.xrange(stream):
            if b"result" not in f:
                continue  # a generation's streamed text delta, not an answer
            pushed = orjson.loads(f[b"result"])
            if pushed["id"] in stored and pushed != stored[pushed["id"]]:
                twice.append(f"push:{pushed['id']}")
    # Letters of entries with no usable id (a bad id, or none) answer no job: not counted here.
    letters = Counter(
        job_id
        for f in dead
        if (job_id := f.get(b"id", b"").decode("utf-8", "replace")) and job_id in stored
    )
    for job_id, n in letters.items():
        res = stored.get(job_id)
        if n > 1:
            twice.append(f"dead x{n}:{job_id}")
        elif res is not None and (res.get("error") or {}).get("code") != "dead_lettered":
            twice.append(f"dead+{res['status']}:{job_id}")
    return twice


def _ping(path: Path, down: list[tuple[float, float]]) -> tuple[float, float, int]:
    samples = []
    for line in path.read_text().splitlines() if path.exists() else []:
        at_ms, latency = line.split()
        at_s = float(at_ms) / 1000
        if any(a <= at_s <= b for a, b in down):
            continue
        samples.append(float(latency))
    if not samples:
        return 0.0, 0.0, 0
    samples.sort()
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return statistics.median(samples), p99, len(samples)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tests.chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--minutes", type=float, default=5.0, help="how long faults run (default 5)")
    p.add_argument("--seed", type=int, default=1, help="the schedule's seed (default 1)")
    p.add_argument("--report", type=Path, help="also write the verdict as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the run's folder (logs, pings)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = Path(tempfile.mkdtemp(prefix="sluice-chaos-"))
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # cleanup runs in `finally`
    try:
        verdict = run(args.minutes, args.seed, folder)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(verdict.table())
    if args.report:
        body = {**verdict.__dict__, "passed": verdict.passed}
        args.report.write_text(json.dumps(body, indent=2))
    if args.keep:
        print(f"run folder: {folder}")
    else:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    return 0 if verdict.passed else 1
