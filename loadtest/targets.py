"""The systems under test: Sluice (admitted submits or raw XADD) and the bare model in-process.

**Sluice** (`SluiceTarget`): jobs go in through the submit function (`mode="sdk"`: one
`FCALL sluice_submit` per job, pipelined per group, exactly the Redis work of the SDK's
`submit_many`, without its asyncio hop; a `rejected` answer is a refused id) or as raw XADDs
(`mode="xadd"`, what any producer in any language does). Every job names one reply stream of
this target's own (`sluice:reply:{loadtest-...}`, under `sluice:` for the ACL users), which
`poll` reads with XREAD BLOCK. A job's `done_s` is the **reply entry's id**, the Redis
server's clock (ms) when the replica pushed the answer: when it became visible to any reader,
not when this process got round to reading it, so a busy harness does not inflate latencies.
On one machine that is the harness's clock too; against a remote Redis the two clocks must
agree (NTP). Answers whose push was lost (a replica crash between store and push) are found by
reading the result keys after `recheck_s` of silence; those get `done_s` = the time of reading.

The result's own timings come through (`queue_ms`, `batch_wait_ms`, `compute_ms`, `total_ms`,
`batch_size`), plus `write_ms`: from the end of the forward pass to the reply entry (storing the
result, the ack, the push), measured from the job's own entry id.

**Bare** (`BareTarget`): the same `EmbedRunner` in this process behind a dynamic batcher
thread that takes whatever is queued, up to the batch size, and runs it (encode, collate, run,
finish): no Redis, no JSON, no Ray. The ceiling.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson
import redis

from loadtest.target import Completion, Target
from sluice import admission
from sluice.protocol import (
    GROUP,
    Job,
    encode_job_fields,
    entry_time_ms,
    jobs_key,
    lane_keys,
    reply_key,
    result_key,
)

if TYPE_CHECKING:
    from sluice.settings import ModelSettings

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 120.0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def status_of(result: dict[str, Any]) -> str:
    """`ok`, `expired`, `cancelled`, or the error's code."""
    if result["status"] == "error":
        return str((result.get("error") or {}).get("code", "error"))
    return str(result["status"])


class SluiceTarget(Target):
    """A running Sluice deployment of `model`, reached at `redis_url`."""

    def __init__(
        self,
        redis_url: str,
        model: str,
        *,
        mode: str = "sdk",
        encoding: str = "float",
        recheck_s: float = 2.0,
    ) -> None:
        if mode not in ("sdk", "xadd"):
            raise ValueError(f"mode must be 'sdk' or 'xadd', got {mode!r}")
        self.name = "sluice" if mode == "sdk" else "sluice-xadd"
        self.redis_url, self.model, self.mode = redis_url, model, mode
        self.params = {"encoding": encoding} if encoding != "float" else None
        self.recheck_s = recheck_s
        self.reply = reply_key(f"loadtest-{uuid.uuid4().hex[:12]}")
        self._last_id = "0-0"
        self._enqueued_ms: dict[str, int] = {}  # sent, not answered yet: id -> entry ms
        self._lock = threading.Lock()
        self._quiet_since = time.monotonic()
        self._sender: redis.Redis | None = None
        self._reader: redis.Redis | None = None
        self.recovered = 0  # answers found in result keys, their push missing

    def start(self) -> None:
        self._sender = redis.Redis.from_url(self.redis_url, socket_connect_timeout=5)
        self._reader = redis.Redis.from_url(self.redis_url, socket_connect_timeout=5)
        self._probe()

    def _probe(self) -> None:
        """A few jobs end to end: the model is served and warm before the clock starts."""
        ids = [f"probe-{uuid.uuid4().hex[:8]}-{i}" for i in range(4)]
        refused = self.send([(i, "a short probe sentence to warm the replica") for i in ids])
        if refused:
            raise RuntimeError(f"{self.model}: probe jobs refused (queue full?): {refused}")
        waiting, deadline = set(ids), time.monotonic() + PROBE_TIMEOUT_S
        while waiting:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no answer from model {self.model!r} in {PROBE_TIMEOUT_S:.0f} s: "
                    "is a replica serving it?"
                )
            waiting -= {c.job_id for c in self.poll(1.0)}

    def send(self, jobs: Sequence[tuple[str, str]]) -> list[str]:
        assert self._sender is not None, "start() first"
        pipe = self._sender.pipeline(transaction=False)
        for job_id, text in jobs:
            fields = encode_job_fields(
                job_id, {"text": text}, params=self.params, reply_to=self.reply
            )
            if self.mode == "sdk":
                keys = admission.submit_keys(self.model, "normal", job_id)
                pipe.fcall("sluice_submit", len(keys), *keys, *itertools.chain(*fields.items()))
            else:
                pipe.xadd(jobs_key(self.model), dict[Any, Any](fields))
        replies = pipe.execute()
        refused, sent = [], {}
        for (job_id, _), reply in zip(jobs, replies, strict=True):
            if self.mode == "xadd":
                sent[job_id] = entry_time_ms(_text(reply))
                continue
            status = _text(reply[0])
            if status == "unknown_model":
                raise RuntimeError(f"model {self.model!r} is not registered in this Redis")
            if status == "rejected":
                refused.append(job_id)
            else:
                sent[job_id] = entry_time_ms(_text(reply[1])) if len(reply) > 1 else 0
        with self._lock:
            self._enqueued_ms.update(sent)
        return refused

    def poll(self, timeout_s: float) -> list[Completion]:
        assert self._reader is not None, "start() first"
        got: Any = self._reader.xread(
            {self.reply: self._last_id}, count=1000, block=max(1, int(timeout_s * 1000))
        )
        out = []
        for _stream, entries in got or []:
            for entry_id, fields in entries:
                self._last_id = _text(entry_id)
                done = self._completion(fields[b"result"], entry_time_ms(self._last_id))
                if done is not None:
                    out.append(done)
        now = time.monotonic()
        if out:
            self._quiet_since = now
        elif now - self._quiet_since > self.recheck_s:
            self._quiet_since = now
            out = self._recheck()
        return out

    def _completion(self, raw: bytes, done_ms: float) -> Completion | None:
        result = orjson.loads(raw)
        with self._lock:
            enqueued = self._enqueued_ms.pop(result["id"], None)
        if enqueued is None:
            return None  # a duplicate push, or someone else's job
        timings = {k: float(v) for k, v in (result.get("timings") or {}).items()}
        if enqueued and "total_ms" in timings:
            timings["write_ms"] = max(0.0, done_ms - enqueued - timings["total_ms"])
        return Completion(result["id"], status_of(result), done_ms / 1000, timings)

    def _recheck(self) -> list[Completion]:
        """Reads the result keys of jobs unanswered for a while (their push may be lost)."""
        assert self._reader is not None
        with self._lock:
            ids = list(itertools.islice(self._enqueued_ms, 1000))
        if not ids:
            return []
        pipe = self._reader.pipeline(transaction=False)
        for job_id in ids:
            pipe.get(result_key(self.model, job_id))
        now_ms = time.time() * 1000
        out = [self._completion(raw, now_ms) for raw in pipe.execute() if raw is not None]
        found = [c for c in out if c is not None]
        self.recovered += len(found)
        return found

    def queue_depth(self) -> int | None:
        """Entries not yet pulled (lag) plus pulled and unacked (pending), over every lane."""
        if self._reader is None:
            return None
        depth = 0
        for key in lane_keys(self.model):
            try:
                groups: Any = self._reader.xinfo_groups(key)
            except redis.ResponseError:
                continue  # a lane nobody used yet
            for group in groups:
                if _text(group["name"]) != GROUP:
                    continue
                lag = group.get("lag")
                # Redis cannot tell the lag after some deletions: count the whole stream then.
                depth += int(group["pending"]) + (
                    int(lag) if lag is not None else int(self._reader.xlen(key))
                )
        return depth

    def outstanding(self) -> int:
        with self._lock:
            return len(self._enqueued_ms)

    def stop(self) -> None:
        for conn in (self._reader, self._sender):
            if conn is not None:
                try:
                    conn.delete(self.reply)
                except redis.RedisError:
                    pass
                conn.close()
        self._reader = self._sender = None


class BareTarget(Target):
    """The model in this process behind a dynamic batcher thread (no queue service at all)."""

    name = "bare"

    def __init__(self, settings: ModelSettings) -> None:
        self.settings = settings
        self._inbox: queue.SimpleQueue[tuple[str, str, float]] = queue.SimpleQueue()
        self._outbox: queue.SimpleQueue[Completion] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._waiting = 0  # sent and not yet pulled by the batcher
        self._count_lock = threading.Lock()

    def start(self) -> None:
        from sluice.runners.embed import EmbedRunner

        self.runner = EmbedRunner(self.settings)
        self.runner.load()
        warm = [(f"w{i}", "a short sentence to warm the model up") for i in range(8)]
        self._run_batch([(i, t, time.time()) for i, t in warm])  # first calls are slow
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="bare-batcher", daemon=True)
        self._thread.start()

    def send(self, jobs: Sequence[tuple[str, str]]) -> list[str]:
        now = time.time()
        with self._count_lock:
            self._waiting += len(jobs)
        for job_id, text in jobs:
            self._inbox.put((job_id, text, now))
        return []

    def _loop(self) -> None:
        size = self.settings.max_batch_size
        while not self._stop.is_set():
            try:
                batch = [self._inbox.get(timeout=0.1)]
            except queue.Empty:
                continue
            while len(batch) < size:
                try:
                    batch.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            with self._count_lock:
                self._waiting -= len(batch)
            for done in self._run_batch(batch):
                self._outbox.put(done)

    def _run_batch(self, batch: list[tuple[str, str, float]]) -> list[Completion]:
        from sluice.errors import SluiceError
        from sluice.runners.base import Encoded

        pulled = time.time()
        jobs = [Job("0-0", job_id, {"text": text}, {}) for job_id, text, _ in batch]
        encoded = self.runner.encode(jobs)
        items = [e for e in encoded if isinstance(e, Encoded)]
        status = {e.job.id: "ok" for e in items}
        for job, e in zip(jobs, encoded, strict=True):
            if isinstance(e, SluiceError):
                status[job.id] = e.code
        start = time.time()
        try:
            if items:
                self.runner.finish(self.runner.run(self.runner.collate(items)), items)
        except Exception:
            log.exception("bare batch of %d failed", len(items))
            status.update((e.job.id, "model_failure") for e in items)
        done = time.time()
        out = []
        for job_id, _, enqueued in batch:
            timings = {
                "queue_ms": 1000 * (pulled - enqueued),
                "batch_wait_ms": 1000 * (start - pulled),
                "compute_ms": 1000 * (done - start),
                "total_ms": 1000 * (done - enqueued),
                "batch_size": float(len(batch)),
            }
            out.append(Completion(job_id, status[job_id], done, timings))
        return out

    def poll(self, timeout_s: float) -> list[Completion]:
        try:
            out = [self._outbox.get(timeout=timeout_s)]
        except queue.Empty:
            return []
        while True:
            try:
                out.append(self._outbox.get_nowait())
            except queue.Empty:
                return out

    def queue_depth(self) -> int | None:
        with self._count_lock:
            return self._waiting

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
