"""The campaign's producers: a steady stream of valid jobs, and storms of what hostile or
careless producers send (malformed entries, resubmits of answered ids, cancels, deadlines,
long generation jobs), all raw `XADD`s and `SET NX`s, as any language would send them; and a
tenant's submits, raw `RPUSH`es into its inbox (valid ones and poison), as the tenant's own
Redis user would send them (docs/security.md, "Tenants"), moved into the lanes by the replicas.

Every submit goes in one MULTI with a marker per job, `chaos:entered:<model>:<id>` (`1` when
the entry names a usable `reply_to`, which must then get a push), and a count of entries with
no usable id: so after the run, the markers say exactly what entered, even of submits whose
reply was lost when Redis was killed mid-call (`uncertain` in the ledger).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis

from sluice.errors import JobCancelled
from sluice.protocol import (
    bell_key,
    error_result,
    inbox_key,
    jobs_key,
    reply_key,
    result_key,
    scoped_id,
)

log = logging.getLogger(__name__)

#: Malformed entries that carry a usable id: each must get one `error` result.
MALFORMED_WITH_ID: list[dict[str, Any]] = [
    {"input": "{not json"},
    {},
    {"input": "[1, 2]"},
    {"input": '{"text": 42}'},
    {"input": b'{"text": "\xff\xfe"}'},
    {"input": '{"text": "a"}', "params": "{nope"},
    {"input": '{"text": "a"}', "deadline_ms": "soon"},
    {"input": '{"text": "a"}', "reply_to": "has space"},
]
#: Entries with no usable id: each can only be dead-lettered.
MALFORMED_WITHOUT_ID: list[dict[str, Any]] = [
    {"input": '{"text": "a"}'},
    {"id": "bad id!", "input": '{"text": "a"}'},
    {"id": b"\xff\xfe", "input": '{"text": "a"}'},
    {"garbage": "\x00\x01" * 100},
]


#: The campaign's tenant, and its reply stream.
TENANT = "chaos-t"
TENANT_REPLY = reply_key("chaos", TENANT)
#: Inbox elements that can only be dead-lettered, on the tenant's own dead stream (no valid
#: id, not an object); counted in their submit's MULTI.
POISON_ELEMENTS: list[bytes] = [b"not json", b"[1, 2]", b'{"id": 7}', b"\xff\x00", b"{}"]

TENANT_POISON_KEY = "chaos:tenant-poison"
#: Counts the entries with no usable id that entered (in the submit's own MULTI).
NO_ID_KEY = "chaos:entered-without-id"


def entered_key(model: str, job_id: str) -> str:
    """The marker a submit sets with its XADD, in one MULTI: the job entered."""
    return f"chaos:entered:{model}:{job_id}"


@dataclass
class Ledger:
    """What the producers did, per model: thread-safe."""

    confirmed: dict[str, list[str]] = field(default_factory=dict)  # model -> ids that entered
    uncertain: dict[str, list[str]] = field(default_factory=dict)  # model -> ids maybe entered
    no_id_sent: int = 0  # malformed entries without an id that Redis confirmed
    actions: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def entered(self, model: str, ids: list[str]) -> None:
        with self.lock:
            self.confirmed.setdefault(model, []).extend(ids)

    def maybe(self, model: str, ids: list[str]) -> None:
        with self.lock:
            self.uncertain.setdefault(model, []).extend(ids)

    def recent(self, model: str, rng: random.Random, n: int) -> list[str]:
        with self.lock:
            ids = self.confirmed.get(model, [])[-500:]
            return rng.sample(ids, min(n, len(ids)))


class Producers:
    """One thread, many behaviours: each step picks one at random (seeded)."""

    def __init__(
        self,
        url: str,
        embed_model: str,
        gen_model: str,
        reply_streams: list[str],
        seed: int,
        rate_per_s: float = 60.0,
    ) -> None:
        self.r = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
        self.embed_model = embed_model
        self.gen_model = gen_model
        self.replies = reply_streams
        self.rng = random.Random(seed)
        self.rate_per_s = rate_per_s
        self.ledger = Ledger()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-producers", daemon=True)
        self._n = 0

    def start(self) -> Producers:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self.r.close()

    def _next_id(self, kind: str) -> str:
        self._n += 1
        return f"{kind}-{self._n}"

    def _run(self) -> None:
        steps = [
            (0.70, self._valid_batch),
            (0.08, self._tenant_batch),
            (0.05, self._malformed_storm),
            (0.06, self._resubmit_storm),
            (0.06, self._cancel_storm),
            (0.05, self._long_generation),
        ]
        weights = [w for w, _ in steps]
        while not self._stop.is_set():
            ((_, step),) = self.rng.choices(steps, weights)
            try:
                step()
            except (redis.RedisError, OSError) as exc:
                self.ledger.actions["redis_errors"] += 1
                log.debug("producer step failed: %r", exc)
                time.sleep(0.2)
            time.sleep(5 / self.rate_per_s)  # a valid batch is 5 jobs

    def _xadd_all(self, model: str, entries: list[tuple[str | None, dict[str, Any]]]) -> None:
        ids = [job_id for job_id, _ in entries if job_id is not None]
        try:
            with self.r.pipeline(transaction=True) as pipe:
                for job_id, fields in entries:
                    pipe.xadd(jobs_key(model), {**({"id": job_id} if job_id else {}), **fields})
                    if job_id is None:
                        pipe.incr(NO_ID_KEY)
                    else:
                        replied = "1" if fields.get("reply_to") in self.replies else "0"
                        pipe.set(entered_key(model, job_id), replied)
                pipe.execute()
        except (redis.RedisError, OSError):
            self.ledger.maybe(model, ids)
            raise
        self.ledger.entered(model, ids)

    def _valid_batch(self) -> None:
        now_ms = time.time() * 1000
        entries: list[tuple[str | None, dict[str, Any]]] = []
        for _ in range(5):
            fields: dict[str, Any] = {
                "input": orjson.dumps({"text": f"chaos job {self.rng.random():.6f}"}),
                "reply_to": self.rng.choice(self.replies),
            }
            if self.rng.random() < 0.1:  # a tight deadline: ok or expired, never both
                fields["deadline_ms"] = str(int(now_ms + self.rng.uniform(-100, 400)))
            entries.append((self._next_id("ok"), fields))
        self._xadd_all(self.embed_model, entries)
        self.ledger.actions["valid"] += len(entries)

    def _tenant_batch(self) -> None:
        """Four jobs of the tenant, and sometimes a poison element, RPUSHed into its inbox
        with the bell rung, in one MULTI with their markers (ids as the lanes scope them)."""
        elements: list[tuple[str | None, bytes]] = []
        for _ in range(4):
            job_id = self._next_id("t")
            text = orjson.dumps({"text": f"tenant {job_id}"}).decode()  # JSON text, as on a lane
            job = {"id": job_id, "input": text, "reply_to": TENANT_REPLY}
            if self.rng.random() < 0.1:  # an object where text belongs: answered invalid_input
                job["input"] = {"text": "an object"}
            elements.append((scoped_id(TENANT, job_id), orjson.dumps(job)))
        if self.rng.random() < 0.3:
            elements.append((None, self.rng.choice(POISON_ELEMENTS)))
        ids = [i for i, _ in elements if i is not None]
        try:
            with self.r.pipeline(transaction=True) as pipe:
                for scoped, element in elements:
                    pipe.rpush(inbox_key(self.embed_model, TENANT), element)
                    if scoped is None:
                        pipe.incr(TENANT_POISON_KEY)
                    else:
                        pipe.set(entered_key(self.embed_model, scoped), "1")
                pipe.rpush(bell_key(self.embed_model), "1")
                pipe.execute()
        except (redis.RedisError, OSError):
            self.ledger.maybe(self.embed_model, ids)
            raise
        self.ledger.entered(self.embed_model, ids)
        self.ledger.actions["tenant"] += len(elements)

    def _malformed_storm(self) -> None:
        with_id = [
            (self._next_id("bad"), {**fields, "reply_to": self.rng.choice(self.replies)})
            if "reply_to" not in fields
            else (self._next_id("bad"), fields)
            for fields in self.rng.sample(MALFORMED_WITH_ID, 4)
        ]
        without: list[tuple[str | None, dict[str, Any]]] = [
            (None, fields) for fields in self.rng.sample(MALFORMED_WITHOUT_ID, 2)
        ]
        self._xadd_all(self.embed_model, [*with_id, *without])
        with self.ledger.lock:
            self.ledger.no_id_sent += len(without)
        self.ledger.actions["malformed"] += len(with_id) + len(without)

    def _resubmit_storm(self) -> None:
        """Raw XADDs reusing ids already answered: one result each still, pushed again. Only
        answered ones, so that a resubmit can never stand in for an entry that was lost."""
        ids = [i for i in self.ledger.recent(self.embed_model, self.rng, 10) if i.startswith("ok-")]
        if not ids:
            return
        answered: Any = self.r.mget([result_key(self.embed_model, i) for i in ids])
        entries: list[tuple[str | None, dict[str, Any]]] = [
            (i, {"input": '{"text": "again"}', "reply_to": self.rng.choice(self.replies)})
            for i, value in zip(ids, answered, strict=True)
            if value is not None
        ]
        if entries:
            with self.r.pipeline(transaction=False) as pipe:
                for job_id, fields in entries:
                    pipe.xadd(jobs_key(self.embed_model), {"id": job_id, **fields})
                pipe.execute()
            self.ledger.actions["resubmits"] += len(entries)

    def _cancel_storm(self) -> None:
        """Cancels as the SDK does: SET NX of a `cancelled` result (a finished job stays)."""
        ids = self.ledger.recent(self.embed_model, self.rng, 5)
        with self.r.pipeline(transaction=False) as pipe:
            for job_id in ids:
                res = error_result(self.embed_model, job_id, JobCancelled("cancelled by chaos"))
                pipe.set(result_key(self.embed_model, job_id), res.to_json(), nx=True, ex=86400)
            pipe.execute()
        self.ledger.actions["cancels"] += len(ids)

    def _long_generation(self) -> None:
        fields = {
            "input": '{"prompt": "a stream of"}',
            "params": orjson.dumps({"max_new_tokens": self.rng.randint(60, 200)}),
            "reply_to": self.rng.choice(self.replies),
        }
        self._xadd_all(self.gen_model, [(self._next_id("gen"), fields)])
        self.ledger.actions["generations"] += 1


class Reader:
    """A client that reads results as they appear (GET of recent ids, directly from Redis) and
    remembers the first bytes it read of each: with `appendfsync always`, no result a client
    has read may ever be replaced or lost, kill -9 of redis-server included."""

    def __init__(self, url: str, model: str, ledger: Ledger, seed: int) -> None:
        self.r = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
        self.model = model
        self.ledger = ledger
        self.rng = random.Random(seed)
        self.seen: dict[str, bytes] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-reader", daemon=True)

    def start(self) -> Reader:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            ids = self.ledger.recent(self.model, self.rng, 20)
            try:
                values: Any = self.r.mget([result_key(self.model, i) for i in ids])
            except (redis.RedisError, OSError):
                continue
            for job_id, value in zip(ids, values, strict=True):
                if value is not None:
                    self.seen.setdefault(job_id, value)

    def changed(self) -> list[str]:
        """Ids whose result, once read, is now gone or different."""
        ids = list(self.seen)
        out = []
        for start in range(0, len(ids), 1000):
            chunk = ids[start : start + 1000]
            values: Any = self.r.mget([result_key(self.model, i) for i in chunk])
            out += [i for i, v in zip(chunk, values, strict=True) if v != self.seen[i]]
        return out
