"""Redis Streams I/O for one model: pull, reclaim, result + ack, dead letters.

The only module that speaks Redis commands on the replica side. Redis errors leave it as
themselves (connection errors are retried by the caller's loop); a missing group is recreated
here, because a Redis restarted without persistence comes back with no group.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from sluice import lua
from sluice.protocol import GROUP, dead_key, jobs_key, result_key
from sluice.settings import QueueSettings

log = logging.getLogger(__name__)

RawFields = dict[bytes, bytes]


@dataclass(slots=True)
class Entry:
    """A stream entry as read: its id, raw fields and how many times it was delivered."""

    entry_id: str
    fields: RawFields
    deliveries: int = 1


@dataclass(slots=True)
class Outcome:
    """What the writer stores for one entry: the result JSON, acked in the same MULTI."""

    entry_id: str
    job_id: str
    result_json: bytes
    reply_to: str | None = None
    status: str = "ok"


@dataclass(slots=True)
class DeadLetter:
    """An entry that cannot be answered normally, and why."""

    entry_id: str
    fields: dict[str, str]
    reason: str
    deliveries: int
    outcome: Outcome | None = None  # an error result too, when the entry had a usable id


def connect(url: str, **kwargs: Any) -> aioredis.Redis:
    """An asyncio client with bytes replies (fields are decoded by the protocol module)."""
    options: dict[str, Any] = {
        "decode_responses": False,
        "socket_connect_timeout": 5,
        "socket_keepalive": True,
        "health_check_interval": 30,
    }
    options.update(kwargs)
    return aioredis.Redis.from_url(url, **options)


def _id(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


class StreamQueue:
    """One model's stream as seen by one consumer (one replica)."""

    def __init__(
        self, redis: aioredis.Redis, model: str, consumer: str, settings: QueueSettings
    ) -> None:
        self.redis = redis
        self.model = model
        self.consumer = consumer
        self.settings = settings
        self.jobs_key = jobs_key(model)
        self.dead_key = dead_key(model)
        self._push_reply = redis.register_script(lua.PUSH_REPLY)
        self._dead_letter = redis.register_script(lua.DEAD_LETTER)

    async def ensure_group(self) -> None:
        """Creates the group at id 0 (never `$`): jobs queued before any replica are served."""
        try:
            await self.redis.xgroup_create(self.jobs_key, GROUP, id="0", mkstream=True)
            log.info("created consumer group %s on %s", GROUP, self.jobs_key)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def pull(self, count: int, block_ms: int | None) -> list[Entry]:
        """New entries for this consumer; blocks up to `block_ms` when there are none."""
        try:
            reply: Any = await self.redis.xreadgroup(
                GROUP, self.consumer, {self.jobs_key: ">"}, count=count, block=block_ms
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_group()
            return []
        if not reply:
            return []
        # redis-py returns [[key, [(id, fields), ...]]] for RESP2.
        entries = reply[0][1]
        return [Entry(_id(eid), fields or {}) for eid, fields in entries]

    async def reclaim(self, count: int) -> list[Entry]:
        """Claims entries idle past the visibility timeout on any consumer (a dead replica's).

        XPENDING gives the delivery counts; XCLAIM with the same min-idle re-checks, so two
        replicas reclaiming at once cannot both win the same entry.
        """
        min_idle_ms = int(self.settings.visibility_timeout_s * 1000)
        try:
            pending: Any = await self.redis.xpending_range(
                self.jobs_key, GROUP, min="-", max="+", count=count, idle=min_idle_ms
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            return []
        if not pending:
            return []
        counts = {_id(p["message_id"]): int(p["times_delivered"]) for p in pending}
        claimed: Any = await self.redis.xclaim(
            self.jobs_key, GROUP, self.consumer, min_idle_ms, list(counts)
        )
        entries = []
        for eid, fields in claimed:
            entry_id = _id(eid)
            # XCLAIM counts this delivery too.
            entries.append(Entry(entry_id, fields or {}, counts.get(entry_id, 0) + 1))
        if entries:
            log.info("reclaimed %d stale entries on %s", len(entries), self.jobs_key)
        return entries

    async def finish(self, outcomes: Sequence[Outcome]) -> int:
        """Stores each result once (SET NX, first writer wins) and acks, in one MULTI.

        Then pushes to `reply_to` only the results this call actually stored, so a duplicate
        run after a crash never sends a second, different result. Returns how many it stored.
        """
        if not outcomes:
            return 0
        ttl = self.settings.result_ttl_s
        async with self.redis.pipeline(transaction=True) as tx:
            for o in outcomes:
                tx.set(result_key(self.model, o.job_id), o.result_json, nx=True, ex=ttl)
            tx.xack(self.jobs_key, GROUP, *[o.entry_id for o in outcomes])
            replies = await tx.execute()
        stored = [o for o, ok in zip(outcomes, replies[:-1], strict=True) if ok]
        lost = [o for o, ok in zip(outcomes, replies[:-1], strict=True) if not ok]
        if lost:
            # Either a duplicate run, or this very write retried after its EXEC reply was lost:
            # in that case the stored value is ours, byte for byte, and its push is still owed.
            current = await self.redis.mget([result_key(self.model, o.job_id) for o in lost])
            stored += [o for o, value in zip(lost, current, strict=True) if value == o.result_json]
        await self._push_replies(stored)
        return len(stored)

    async def _push_replies(self, stored: Sequence[Outcome]) -> None:
        pushes = [(o.reply_to, o) for o in stored if o.reply_to]
        if not pushes:
            return
        limits = (self.settings.reply_maxlen, self.settings.reply_ttl_s)
        async with self.redis.pipeline(transaction=False) as pipe:
            for reply_to, o in pushes:
                await self._push_reply(keys=[reply_to], args=[o.result_json, *limits], client=pipe)
            results = await pipe.execute(raise_on_error=False)
        for (reply_to, _), res in zip(pushes, results, strict=True):
            if res == 0 or isinstance(res, Exception):
                # The result is stored and acked either way: a bad reply_to costs only the push.
                log.warning("no reply pushed to %r: %s", reply_to, res or "not a stream")

    async def dead_letter(self, letters: Sequence[DeadLetter]) -> int:
        """Moves entries to the dead stream with their reason, stores any result, acks them.

        One script per entry (lua.DEAD_LETTER): idempotent under retries, a no-op for an entry
        already answered, and nothing is acked if the dead letter cannot be written. Returns
        how many entries it dead-lettered.
        """
        if not letters:
            return 0
        limits = (GROUP, self.settings.dead_maxlen)
        async with self.redis.pipeline(transaction=False) as pipe:
            for d in letters:
                result = d.outcome.result_json if d.outcome is not None else b""
                key = result_key(self.model, d.outcome.job_id) if d.outcome else self.dead_key
                fields = {**d.fields, "reason": d.reason, "deliveries": str(d.deliveries),
                          "entry_id": d.entry_id}  # fmt: skip
                pairs = [x for kv in fields.items() for x in kv]
                await self._dead_letter(
                    keys=[self.jobs_key, self.dead_key, key],
                    args=[d.entry_id, *limits, result, self.settings.result_ttl_s, *pairs],
                    client=pipe,
                )
            replies = await pipe.execute()
        stored = [d.outcome for d, r in zip(letters, replies, strict=True) if r == 2 and d.outcome]
        await self._push_replies(stored)
        done = sum(1 for r in replies if r)
        log.warning("dead-lettered %d entries on %s", done, self.dead_key)
        return done

    async def pending_count(self) -> int:
        """Entries delivered to this consumer and not yet acked."""
        rows = await self.redis.xpending_range(
            self.jobs_key, GROUP, min="-", max="+", count=1, consumername=self.consumer
        )
        return len(rows)

    async def leave(self) -> None:
        """Removes this consumer from the group, but only when it holds no pending entry.

        XGROUP DELCONSUMER drops the consumer's pending entries from the group, which would
        lose them: so it runs only after a clean drain.
        """
        if await self.pending_count() == 0:
            await self.redis.xgroup_delconsumer(self.jobs_key, GROUP, self.consumer)
