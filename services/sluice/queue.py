"""Redis Streams I/O for one model: pull, reclaim, result + ack, dead letters, trimming.

The only module that speaks Redis commands on the replica side. Redis errors leave it as
themselves (connection errors are retried by the caller's loop); a missing group is recreated
here, because a Redis restarted without persistence comes back with no group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from sluice import scripts
from sluice.admission import load_library
from sluice.connection import AsyncRedis, ScriptCall, cluster_hint, is_cluster, run_scripts
from sluice.connection import connect as connect
from sluice.protocol import (
    GROUP,
    MODELS_KEY,
    NORMAL,
    PRIORITIES,
    dead_key,
    info_key,
    lane_keys,
    result_key,
)
from sluice.settings import QueueSettings

log = logging.getLogger(__name__)

RawFields = dict[bytes, bytes]


@dataclass(slots=True)
class Entry:
    """A stream entry as read: its id, raw fields, delivery count and priority lane."""

    entry_id: str
    fields: RawFields
    deliveries: int = 1
    lane: int = NORMAL


@dataclass(slots=True)
class Outcome:
    """What the writer stores for one entry: the result JSON, acked in the same MULTI."""

    entry_id: str
    job_id: str
    result_json: bytes
    reply_to: str | None = None
    status: str = "ok"
    lane: int = NORMAL
    # For metrics only (never written): the error code, when the job was enqueued (ms), and
    # the result's timings.
    code: str = ""
    enqueued_ms: float = 0.0
    timings: dict[str, float] | None = None


@dataclass(slots=True)
class DeadLetter:
    """An entry that cannot be answered normally, and why."""

    entry_id: str
    fields: dict[str, str]
    reason: str
    deliveries: int
    outcome: Outcome | None = None  # an error result too, when the entry had a usable id
    lane: int = NORMAL


def _id(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


class StreamQueue:
    """One model's lanes as seen by one consumer (one replica)."""

    def __init__(
        self, redis: AsyncRedis, model: str, consumer: str, settings: QueueSettings
    ) -> None:
        self.redis = redis
        self.model = model
        self.consumer = consumer
        self.settings = settings
        self.lanes = lane_keys(model)
        self.jobs_key = self.lanes[NORMAL]
        self.dead_key = dead_key(model)
        self._push_reply = redis.register_script(scripts.PUSH_REPLY)
        self._dead_letter = redis.register_script(scripts.DEAD_LETTER)
        self._push_token = redis.register_script(scripts.PUSH_TOKEN)
        self._pull = redis.register_script(scripts.PULL)
        self._trim = redis.register_script(scripts.TRIM)
        self._finish = redis.register_script(scripts.FINISH)

    async def ensure_group(self) -> None:
        """Creates the group on every lane at id 0 (never `$`): jobs queued before any
        replica existed are served."""
        for key in self.lanes:
            try:
                with cluster_hint():
                    await self.redis.xgroup_create(key, GROUP, id="0", mkstream=True)
                log.info("created consumer group %s on %s", GROUP, key)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def register(self, info: Mapping[str, str | int | float]) -> None:
        """Marks the model as served (admission refuses unregistered models), with the
        limits admission reads, and loads the submit library for producers."""
        fields: dict[Any, Any] = {**info, "max_queue_depth": self.settings.max_queue_depth,
                  "result_ttl_s": self.settings.result_ttl_s}  # fmt: skip
        # Not one MULTI: the models set is in a slot of its own on a cluster.
        with cluster_hint():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hset(info_key(self.model), mapping=fields)
                pipe.sadd(MODELS_KEY, self.model)
                await pipe.execute()
        await load_library(self.redis)

    async def pull(self, count: int, block_ms: int | None) -> list[Entry]:
        """Up to `count` new entries, the most urgent lane first; blocks up to `block_ms`
        when every lane is empty."""
        try:
            reply: Any = await self._pull(keys=self.lanes, args=[GROUP, self.consumer, count])
            # A script's reply carries each entry's fields as a flat [name, value, ...] list.
            entries = [
                Entry(_id(eid), dict(zip(flat[0::2], flat[1::2], strict=True)), lane=int(lane))
                for lane, rows in reply
                for eid, flat in rows
            ]
            if entries or not block_ms:
                return entries
            # Nothing anywhere: wait on all lanes at once (whichever fills first wakes us).
            streams: dict[Any, Any] = dict.fromkeys(self.lanes, ">")
            reply = await self.redis.xreadgroup(
                GROUP, self.consumer, streams, count=count, block=block_ms
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_group()
            return []
        # redis-py returns [[key, [(id, fields), ...]], ...] for RESP2.
        return [
            Entry(_id(eid), fields or {}, lane=self.lanes.index(_id(key)))
            for key, rows in reply or []
            for eid, fields in rows
        ]

    async def reclaim(self, count: int) -> list[Entry]:
        """Claims entries idle past the visibility timeout on any consumer (a dead replica's).

        XPENDING gives the delivery counts; XCLAIM with the same min-idle re-checks, so two
        replicas reclaiming at once cannot both win the same entry.
        """
        min_idle_ms = int(self.settings.visibility_timeout_s * 1000)
        entries: list[Entry] = []
        for lane, key in enumerate(self.lanes):
            try:
                pending: Any = await self.redis.xpending_range(
                    key, GROUP, min="-", max="+", count=count, idle=min_idle_ms
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                continue
            if not pending:
                continue
            counts = {_id(p["message_id"]): int(p["times_delivered"]) for p in pending}
            claimed: Any = await self.redis.xclaim(
                key, GROUP, self.consumer, min_idle_ms, list(counts)
            )
            # XCLAIM counts this delivery too.
            entries += [
                Entry(_id(eid), fields or {}, counts.get(_id(eid), 0) + 1, lane)
                for eid, fields in claimed
            ]
        if entries:
            log.info("reclaimed %d stale entries of %s", len(entries), self.model)
        return entries

    async def keep(self, lane: int, entry_id: str, deliveries: int) -> bool:
        """Keeps an entry this consumer is retrying: resets its idle time (so nobody
        reclaims it during the backoff) and records the delivery count a reclaimer would
        see. False if the entry is no longer pending (answered meanwhile)."""
        claimed: Any = await self.redis.xclaim(
            self.lanes[lane], GROUP, self.consumer, 0, [entry_id],
            retrycount=deliveries, justid=True,
        )  # fmt: skip
        return bool(claimed)

    async def existing_results(self, job_ids: Sequence[str]) -> list[bytes | None]:
        """The stored result of each id, if it has one already (cancelled, or a reused id)."""
        if not job_ids:
            return []
        values: Any = await self.redis.mget([result_key(self.model, i) for i in job_ids])
        return list(values)

    async def finish(self, outcomes: Sequence[Outcome], since_ms: float | None = None) -> int:
        """Stores each result once (SET NX, first writer wins) and acks, in one MULTI.

        Then pushes to `reply_to` exactly what the job's one result is, once per entry:
        this call's result when it won; the stored one when another writer won but this
        entry was still unanswered (a cancel, or the same id queued twice); nothing for a
        duplicate run of an entry that was answered already. Returns how many it stored.
        `since_ms`: when the first attempt of this write began, for a retry (see PUSH_REPLY).
        """
        if not outcomes:
            return 0
        replies = await self._store_and_ack(outcomes)
        won = replies[0::2]
        acked = replies[1::2]
        pushes = [
            (o.reply_to, o.result_json, "") for o, ok in zip(outcomes, won, strict=True) if ok
        ]
        lost = [(o, ack) for o, ok, ack in zip(outcomes, won, acked, strict=True) if not ok]
        stored = len(pushes)
        if lost:
            keys = [result_key(self.model, o.job_id) for o, _ in lost]
            current: Any = await self.redis.mget(keys)
            for (o, ack), value in zip(lost, current, strict=True):
                if value is None:
                    continue  # the result expired already: nothing to say
                if value == o.result_json:
                    # This very write, retried after Redis failed mid-way: the push is owed,
                    # unless the failed attempt got as far as pushing (look back from then).
                    stored += 1
                    pushes.append((o.reply_to, value, _look_back_id(since_ms)))
                elif ack:
                    pushes.append((o.reply_to, value, ""))
        await self._push_replies(pushes)
        return stored

    async def _store_and_ack(self, outcomes: Sequence[Outcome]) -> list[Any]:
        """[stored, acked] for each outcome, flattened, from one MULTI or its script twin."""
        ttl = self.settings.result_ttl_s
        results = [result_key(self.model, o.job_id) for o in outcomes]
        if is_cluster(self.redis):
            args = [x for o in outcomes for x in (o.lane, o.entry_id, o.result_json)]
            reply: Any = await self._finish(keys=[*self.lanes, *results], args=[GROUP, ttl, *args])
            return list(reply)
        async with self.redis.pipeline(transaction=True) as tx:
            for o, key in zip(outcomes, results, strict=True):
                tx.set(key, o.result_json, nx=True, ex=ttl)
                tx.xack(self.lanes[o.lane], GROUP, o.entry_id)
            return list(await tx.execute())

    async def _push_replies(self, owed: Sequence[tuple[str | None, bytes, str]]) -> None:
        pushes = [(reply_to, body, since) for reply_to, body, since in owed if reply_to]
        if not pushes:
            return
        limits = (self.settings.reply_maxlen, self.settings.reply_ttl_s)
        results = await run_scripts(self.redis, [
            ScriptCall(self._push_reply, [reply_to], [body, *limits, since])
            for reply_to, body, since in pushes
        ])  # fmt: skip
        for (reply_to, _, _), res in zip(pushes, results, strict=True):
            if res == 0 or isinstance(res, Exception):
                # The result is stored and acked either way: a bad reply_to costs only the push.
                log.warning("no reply pushed to %r: %s", reply_to, res or "not a stream")

    async def push_tokens(self, deltas: Sequence[tuple[str, str, int, str, int]]) -> int:
        """Appends streamed text deltas, (reply_to, job id, seq, text, attempt) each, to their
        reply streams; returns how many it pushed. Best effort: the final result, pushed
        after them by `finish`, is the one answer that counts."""
        if not deltas:
            return 0
        limits = (self.settings.reply_maxlen, self.settings.reply_ttl_s)
        results = await run_scripts(self.redis, [
            ScriptCall(self._push_token, [reply_to], [job_id, seq, text, attempt, *limits])
            for reply_to, job_id, seq, text, attempt in deltas
        ])  # fmt: skip
        return sum(1 for res in results if res == 1)

    async def dead_letter(self, letters: Sequence[DeadLetter]) -> int:
        """Moves entries to the dead stream with their reason, stores any result, acks them.

        One script per entry (scripts.DEAD_LETTER): idempotent under retries, a no-op for an entry
        already answered, and nothing is acked if the dead letter cannot be written. Returns
        how many entries it dead-lettered.
        """
        if not letters:
            return 0
        limits = (GROUP, self.settings.dead_maxlen)
        calls = []
        for d in letters:
            result = d.outcome.result_json if d.outcome is not None else b""
            key = result_key(self.model, d.outcome.job_id) if d.outcome else self.dead_key
            # The original fields first; ours after, so they win a name clash.
            fields = {**d.fields, "reason": d.reason, "deliveries": str(d.deliveries),
                      "entry_id": d.entry_id, "lane": PRIORITIES[d.lane]}  # fmt: skip
            pairs = [x for kv in fields.items() for x in kv]
            calls.append(ScriptCall(
                self._dead_letter, [self.lanes[d.lane], self.dead_key, key],
                [d.entry_id, *limits, result, self.settings.result_ttl_s, *pairs],
            ))  # fmt: skip
        replies = await run_scripts(self.redis, calls)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply  # the worker retries the write (DEAD_LETTER is idempotent)
        stored = [
            (d.outcome.reply_to, d.outcome.result_json, "")
            for d, r in zip(letters, replies, strict=True)
            if r == 2 and d.outcome
        ]
        await self._push_replies(stored)
        done = sum(1 for r in replies if r)
        log.warning("dead-lettered %d entries on %s", done, self.dead_key)
        return done

    async def trim(self) -> int:
        """Drops acked entries from every lane (never one still pending or undelivered)."""
        removed = 0
        for key in self.lanes:
            removed += int(await self._trim(keys=[key]))
        return removed

    async def pending_count(self) -> int:
        """Entries delivered to this consumer and not yet acked, over all lanes."""
        total = 0
        for key in self.lanes:
            try:
                rows = await self.redis.xpending_range(
                    key, GROUP, min="-", max="+", count=1, consumername=self.consumer
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                continue
            total += len(rows)
        return total

    async def leave(self) -> None:
        """Removes this consumer from the group, but only when it holds no pending entry.

        XGROUP DELCONSUMER drops the consumer's pending entries from the group, which would
        lose them: so it runs only after a clean drain.
        """
        if await self.pending_count() == 0:
            for key in self.lanes:
                with contextlib.suppress(ResponseError):
                    await self.redis.xgroup_delconsumer(key, GROUP, self.consumer)


def _look_back_id(since_ms: float | None) -> str:
    """Where a retried push looks for an earlier attempt's entry: from a minute before that
    attempt began (reply entry ids are Redis's clock, the attempt's time is ours)."""
    if since_ms is None:
        return "0-0"
    return f"{max(0, int(since_ms) - 60_000)}-0"


class Backoff:
    """Exponential backoff with jitter, for Redis outages."""

    def __init__(self, first_s: float = 0.1, max_s: float = 5.0) -> None:
        self._first_s, self._max_s, self._next_s = first_s, max_s, first_s

    def reset(self) -> None:
        self._next_s = self._first_s

    async def sleep(self) -> None:
        await asyncio.sleep(self._next_s * random.uniform(0.5, 1.0))
        self._next_s = min(self._next_s * 2, self._max_s)
