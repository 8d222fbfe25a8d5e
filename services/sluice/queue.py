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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import NoPermissionError, RedisError, ResponseError

from sluice import scripts
from sluice.admission import load_library
from sluice.connection import AsyncRedis, cluster_hint
from sluice.connection import connect as connect
from sluice.protocol import (
    BEATING_MARK,
    GROUP,
    MODELS_KEY,
    NORMAL,
    PRIORITIES,
    Job,
    alive_key,
    beating,
    dead_key,
    info_key,
    lane_keys,
    max_element_bytes,
    result_key,
)
from sluice.settings import QueueSettings
from sluice.wire import ScriptCall, pack_set_nx_get, run_scripts, send_many

log = logging.getLogger(__name__)

RawFields = dict[bytes, bytes]
#: A lane number and an entry id: what a replica holds a lease on.
Held = tuple[int, str]
#: Original fields a dead letter keeps at most (the rest are cut, and it is marked).
DEAD_MAX_FIELDS = 64
#: Reply pushes and renewals per script call at most (each one is O(its ids)).
_CHUNK = 500


@dataclass(slots=True)
class Entry:
    """A stream entry as read: its id, raw fields, delivery count and priority lane.

    `repeated` names the fields the entry gave more than once (XADD allows it; a dict keeps
    only the last), so an ambiguous entry can be refused rather than guessed at.
    """

    entry_id: str
    fields: RawFields
    deliveries: int = 1
    lane: int = NORMAL
    repeated: frozenset[str] = frozenset()


def entry_of(entry_id: Any, flat: Sequence[Any] | None, lane: int, deliveries: int = 1) -> Entry:
    """An `Entry` from a raw reply row: its fields as the flat [name, value, ...] list."""
    items = list(flat or [])
    fields: RawFields = dict(zip(items[0::2], items[1::2], strict=False))
    if 2 * len(fields) >= len(items):  # no name given twice: the common case, in C
        return Entry(_id(entry_id), fields, deliveries, lane)
    fields = {}
    repeated: set[str] = set()
    for name, value in zip(items[0::2], items[1::2], strict=False):
        if name in fields:
            repeated.add(_id(name))
        fields[name] = value
    return Entry(_id(entry_id), fields, deliveries, lane, frozenset(repeated))


@dataclass(slots=True)
class Outcome:
    """What the writer stores for one entry: the result JSON, pushed to `reply_to`, then acked."""

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


@dataclass(slots=True)
class Reclaimed:
    """What one reclaim pass found: entries taken over from replicas that stopped renewing,
    and entries deleted while pending (each recorded as a dead letter by the same script)."""

    entries: list[Entry]
    deleted: list[Held]
    errors: list[Exception] = field(default_factory=list)  # lanes that failed (others ran)


@dataclass(slots=True)
class Renewed:
    """What one lease renewal found: how many leases it renewed, and the entries another
    consumer holds now (this replica stopped renewing long enough to be reclaimed)."""

    renewed: int
    taken: list[Held]
    deleted: list[Held] = field(default_factory=list)  # held, deleted from the lane meanwhile


def _id(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _raw_stream_reply(response: Any, **_: Any) -> Any:
    """XREADGROUP's reply as Redis sent it, [[key, [[id, [name, value, ...]], ...]], ...]:
    redis-py's own parser turns each entry's fields into a dict, which hides repeated names."""
    return response


def _cut(text: str, max_bytes: int) -> str:
    raw = text.encode()
    return text if len(raw) <= max_bytes else raw[:max_bytes].decode("utf-8", "ignore")


def bounded_fields(
    original: Mapping[str, str], added: Mapping[str, str], max_bytes: int
) -> list[str]:
    """A dead letter's field/value pairs: `added` (reason, deliveries...) whole, then as much
    of the original entry as fits in `max_bytes` and `DEAD_MAX_FIELDS`, in order. When
    anything was cut, the letter says so (`truncated: 1`), and `sluice dlq replay` refuses it:
    a poison entry of any size costs the dead stream a bounded number of bytes."""
    pairs: list[str] = []
    budget = max_bytes
    cut = False
    for name, value in original.items():
        if name in added:
            continue  # ours win a name clash
        if len(pairs) // 2 >= DEAD_MAX_FIELDS or budget <= 0:
            cut = True
            break
        name_part = _cut(name, min(256, budget))
        budget -= len(name_part.encode())
        value_part = _cut(value, max(0, budget))
        budget -= len(value_part.encode())
        cut = cut or name_part != name or value_part != value
        pairs += [name_part, value_part]
    # Ours are bounded too: a reason quotes an exception's message, which can be any size.
    tail = [x for k, v in added.items() for x in (k, _cut(v, 1024))]
    return pairs + tail + (["truncated", "1"] if cut else [])


class StreamQueue:
    """One model's lanes as seen by one consumer (one replica).

    It also keeps the replica's lease book: every entry pulled or reclaimed is held until it
    is acked (answered, dead-lettered) or handed back, and `renew` resets the idle time of all
    of them, so that reclaimers only take the entries of replicas that stopped renewing.
    """

    def __init__(
        self, redis: AsyncRedis, model: str, consumer: str, settings: QueueSettings
    ) -> None:
        self.redis = redis
        self.model = model
        self.consumer = beating(consumer)
        self.settings = settings
        self.lanes = lane_keys(model)
        self.jobs_key = self.lanes[NORMAL]
        self.dead_key = dead_key(model)
        # The blocking read's entries keep their raw field lists (see entry_of).
        redis.set_response_callback("XREADGROUP", _raw_stream_reply)
        self._push_reply = redis.register_script(scripts.PUSH_REPLY)
        self._dead_letter = redis.register_script(scripts.DEAD_LETTER)
        self._push_token = redis.register_script(scripts.PUSH_TOKEN)
        self._pull = redis.register_script(scripts.PULL)
        self._trim = redis.register_script(scripts.TRIM)
        self._reclaim = redis.register_script(scripts.RECLAIM)
        self._renew = redis.register_script(scripts.RENEW)
        self._heartbeat = redis.register_script(scripts.HEARTBEAT)
        self._held: set[Held] = set()
        # This replica's heartbeat (`heartbeat`, every heartbeat_interval_s): while it lives, other
        # replicas leave our entries to the leases; once it lapses, they take them at once.
        self._alive = alive_key(model, self.consumer)
        self._alive_ms = int(settings.heartbeat_ttl_s * 1000)
        # The longest gap between two beats of one run (heartbeat-1.lua): a late beat or two
        # (a busy event loop), never so long that a lapse of the others' could hide in it.
        gap_s = min(3 * settings.heartbeat_interval_s, settings.heartbeat_ttl_s / 2)
        self._max_gap_ms = int(gap_s * 1000)
        self._left = False
        self._cursors = ["-"] * len(self.lanes)  # where each lane's next reclaim scan starts

    @property
    def held(self) -> int:
        """Entries this consumer holds a lease on (pulled, not yet acked or handed back)."""
        return len(self._held)

    async def heartbeat(self) -> int:
        """Says that this replica is alive, for `heartbeat_ttl_s` (heartbeat-1.lua); how long
        its unbroken run of beats has lasted, in ms of Redis's time. After `leave`, a no-op
        (0)."""
        if self._left:
            return 0
        return int(
            await self._heartbeat(keys=[self._alive], args=[self._alive_ms, self._max_gap_ms])
        )

    async def ensure_group(self) -> None:
        """Creates the group on every lane at id 0 (never `$`): jobs queued before any
        replica existed are served. A lane Redis refuses (its key holds another type) is
        logged and skipped, so that one bad lane cannot stop the others; a lost connection
        raises."""
        for key in self.lanes:
            try:
                with cluster_hint():
                    await self.redis.xgroup_create(key, GROUP, id="0", mkstream=True)
                log.info("created consumer group %s on %s", GROUP, key)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    log.error("cannot serve lane %s: %s", key, exc)

    async def register(self, info: Mapping[str, str | int | float]) -> None:
        """Marks the model as served (admission refuses unregistered models), with the
        limits admission reads, and loads the submit library for producers."""
        fields: dict[Any, Any] = {
            **info,
            "max_queue_depth": self.settings.max_queue_depth,
            "result_ttl_s": self.settings.result_ttl_s,
            # sluice_enqueue refuses larger: the intake would not decode it (no id to answer).
            "max_element_bytes": max_element_bytes(self.settings),
        }
        # The library first: once the model is registered, submits are admitted (readiness
        # says so too), and each goes through the library's function.
        await load_library(self.redis)
        # Not one MULTI: the models set is in a slot of its own on a cluster.
        with cluster_hint():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hset(info_key(self.model), mapping=fields)
                pipe.sadd(MODELS_KEY, self.model)
                await pipe.execute()

    async def pull(self, count: int, block_ms: int | None) -> list[Entry]:
        """Up to `count` new entries, the most urgent lane first; blocks up to `block_ms`
        when every lane is empty. Each one is held (leased) until acked or handed back."""
        try:
            (reply,) = await run_scripts(
                self.redis, [ScriptCall(self._pull, self.lanes, [GROUP, self.consumer, count])]
            )
            if isinstance(reply, Exception):
                raise reply
            entries = [
                entry_of(eid, flat, int(lane))
                for lane, rows in reply
                if int(lane) >= 0
                for eid, flat in rows
            ]
            if any(int(lane) < 0 for lane, _ in reply):
                # The entries read are delivered already: they go on whatever happens here.
                self._hold(entries)
                try:
                    await self.ensure_group()
                except (RedisError, OSError) as exc:
                    log.warning("could not recreate the group (%r); retried next pull", exc)
                return entries
            if not entries and block_ms:
                # Nothing anywhere: wait on all lanes at once (whichever fills first wakes us).
                streams: dict[Any, Any] = dict.fromkeys(self.lanes, ">")
                reply = await self.redis.xreadgroup(
                    GROUP, self.consumer, streams, count=count, block=block_ms
                )
                # RESP3 answers a map of streams, RESP2 a list of [key, rows] pairs.
                streams_rows = reply.items() if isinstance(reply, dict) else reply or []
                entries = [
                    entry_of(eid, flat, self.lanes.index(_id(key)))
                    for key, rows in streams_rows
                    for eid, flat in rows
                ]
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_group()
            return []
        self._hold(entries)
        return entries

    async def reclaim(self, count: int) -> Reclaimed:
        """Takes over entries whose replica is gone: idle past the visibility timeout (it
        stopped renewing its lease: it died, or froze), or held by a replica whose heartbeat
        lapsed (killed, its node lost), once our own heartbeat has beaten unbroken for a TTL.
        One script per lane (`reclaim-2.lua`) reads a bounded page of the pending list from
        where the last pass stopped, so a pass costs O(count) whatever the list's length, and
        claims only the stale rows in the same atomic step (two replicas reclaiming at once
        cannot both win one). Stale entries deleted while pending are recorded as dead letters
        by the same script. A lane that fails is reported in `errors`; what the others claimed
        is returned all the same."""
        min_idle_ms = int(self.settings.visibility_timeout_s * 1000)
        found = Reclaimed([], [])
        for lane, key in enumerate(self.lanes):
            try:
                reply: Any = await self._reclaim(
                    keys=[key, self.dead_key],
                    args=[
                        GROUP,
                        self.consumer,
                        min_idle_ms,
                        self._cursors[lane],
                        count,
                        self.settings.dead_maxlen,
                        PRIORITIES[lane],
                        alive_key(self.model, ""),
                        self._alive_ms,
                        self._max_gap_ms,
                        BEATING_MARK,
                    ],
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    found.errors.append(exc)
                continue
            except (RedisError, OSError) as exc:
                # What earlier lanes claimed is delivered to this consumer already: return it
                # (it would sit pending, unrenewed, for a whole timeout otherwise).
                found.errors.append(exc)
                continue
            cursor, claimed, deleted = reply
            self._cursors[lane] = _id(cursor)
            found.entries += [entry_of(eid, flat, lane, int(n)) for eid, flat, n in claimed]
            found.deleted += [(lane, _id(eid)) for eid in deleted]
        self._hold(found.entries)
        if found.entries:
            log.info("reclaimed %d stale entries of %s", len(found.entries), self.model)
        if found.deleted:
            log.warning(
                "%d entries of %s were deleted while pending (trimmed or XDELed before they "
                "were answered, and their replica is gone); recorded as dead letters, reason "
                "deleted_while_pending: %s",
                len(found.deleted),
                self.model,
                found.deleted[:5],
            )
        return found

    async def renew(self) -> Renewed:
        """Renews this consumer's lease on every entry it holds (one script per lane and
        chunk); forgets those acked meanwhile and those another consumer took over."""
        by_lane: dict[int, list[str]] = {}
        for lane, entry_id in self._held:
            by_lane.setdefault(lane, []).append(entry_id)
        calls = [
            (lane, ids[i : i + _CHUNK])
            for lane, ids in by_lane.items()
            for i in range(0, len(ids), _CHUNK)
        ]
        replies = await run_scripts(
            self.redis,
            [
                ScriptCall(
                    self._renew,
                    [self.lanes[lane]],
                    [GROUP, self.consumer, "", *ids],
                )
                for lane, ids in calls
            ],
        )
        renewed, taken, deleted = 0, [], []
        for (lane, ids), reply in zip(calls, replies, strict=True):
            if isinstance(reply, Exception):
                raise reply
            gone, other, removed = ({_id(i) for i in part} for part in reply)
            self._held.difference_update((lane, i) for i in gone | other)
            taken += [(lane, i) for i in other]
            deleted += [(lane, i) for i in removed]
            renewed += len(ids) - len(gone) - len(other) - len(removed)
        if taken:
            log.warning(
                "%d entries of %s were reclaimed by another replica (this one did not renew "
                "its lease in time); whichever answers first wins",
                len(taken),
                self.model,
            )
        if deleted:
            log.warning(
                "%d entries of %s this replica holds were deleted from their lane; their jobs "
                "are answered by id all the same",
                len(deleted),
                self.model,
            )
        return Renewed(renewed, taken, deleted)

    async def keep(self, lane: int, entry_id: str, deliveries: int) -> bool:
        """Keeps an entry this consumer is retrying: renews its lease and records the delivery
        count a reclaimer would see. False if it is no longer this consumer's (answered, or
        taken over meanwhile)."""
        reply: Any = await self._renew(
            keys=[self.lanes[lane]],
            args=[GROUP, self.consumer, deliveries, entry_id],
        )
        gone, taken, _ = reply
        if gone or taken:
            self._held.discard((lane, entry_id))
            return False
        return True

    def release(self, entries: Iterable[Outcome | DeadLetter | Job]) -> None:
        """Stops renewing these entries: left pending, they are reclaimed after the visibility
        timeout (a write Redis keeps refusing, or a stop that could not finish them)."""
        self._held.difference_update((e.lane, e.entry_id) for e in entries)

    def _hold(self, entries: Iterable[Entry]) -> None:
        self._held.update((e.lane, e.entry_id) for e in entries)

    async def existing_results(self, job_ids: Sequence[str]) -> list[bytes | None]:
        """The stored result of each id, if it has one already (cancelled, or a reused id)."""
        if not job_ids:
            return []
        (values,) = await send_many(
            self.redis, [("MGET", *[result_key(self.model, i) for i in job_ids])]
        )
        if isinstance(values, Exception):
            raise values
        return list(values)

    async def finish(self, outcomes: Sequence[Outcome]) -> list[bool]:
        """Stores each result once (SET NX GET: the first writer wins), pushes each job's one
        stored result to its `reply_to`, then acks: three steps, a pipeline each.

        Every push carries the result that is stored, whoever stored it: this write, an
        earlier attempt of it (retried after a lost reply), a cancel, or another replica's
        run. An entry is acked only after its push succeeded, so a crash or an error anywhere
        leaves it pending and its reclaimer (or this write, retried) pushes the stored result
        again: every final outcome reaches `reply_to` at least once, and never a result other
        than the stored one. Repeats carry the job id and readers drop them. A job whose
        result key holds another type (a producer wrote it) can never be answered: it is
        dead-lettered. Returns, per outcome, whether its result is the stored one (this write,
        or an earlier attempt of it), as opposed to another writer's. O(batch).
        """
        if not outcomes:
            return []
        ttl = self.settings.result_ttl_s
        # Plain SETs, not a script: a result passes through no Lua VM (a script's arguments
        # are copied in and out of it, which doubled Redis' CPU per job for MiniLM-sized
        # results), and each SET is atomic on its own. A key of another type fails its own
        # SET only (WRONGTYPE), not the batch.
        keys = [result_key(self.model, o.job_id) for o in outcomes]
        values = [o.result_json for o in outcomes]
        reply = await send_many(
            self.redis,
            [
                ("SET", key, value, "NX", "GET", "EX", ttl)
                for key, value in zip(keys, values, strict=True)
            ],
            packed=pack_set_nx_get(keys, values, ttl),
        )
        for before in reply:
            if isinstance(before, Exception) and "WRONGTYPE" not in str(before):
                raise before  # OOM, LOADING...: retried whole, nothing acked
        answered: list[tuple[Outcome, bytes]] = []
        blocked: list[DeadLetter] = []
        won = []
        for o, before in zip(outcomes, reply, strict=True):
            if isinstance(before, Exception):
                reason = f"the result key of {o.job_id!r} holds another type: no result is possible"
                blocked.append(DeadLetter(o.entry_id, {"id": o.job_id}, reason, 0, None, o.lane))
                won.append(False)
                continue
            stored = o.result_json if before is None else before
            answered.append((o, stored))
            won.append(stored == o.result_json)
        await self._push([(o.reply_to, o.job_id, body) for o, body in answered])
        await self._ack([o for o, _ in answered])
        if blocked:
            await self.dead_letter(blocked)
        return won

    async def _push(self, owed: Sequence[tuple[str | None, str, bytes]]) -> None:
        """Pushes each (reply_to, job id, result) in one pipeline (its own slot each, on a
        cluster). Raises unless every push landed or was refused for good: a refusal of that
        one key (NOPERM, or not a stream) costs only its push, and is logged; anything else
        (a lost connection, OOM, LOADING) raises, so the caller retries the whole write before
        it acks anything."""
        pushes = [(reply_to, job_id, body) for reply_to, job_id, body in owed if reply_to]
        if not pushes:
            return
        limits = (self.settings.reply_maxlen, self.settings.reply_ttl_s)
        results = await run_scripts(
            self.redis,
            [
                ScriptCall(self._push_reply, [reply_to], [job_id, body, *limits])
                for reply_to, job_id, body in pushes
            ],
        )
        for res in results:
            if isinstance(res, Exception) and not isinstance(res, NoPermissionError):
                raise res
        for (reply_to, _, _), res in zip(pushes, results, strict=True):
            if res == 0 or isinstance(res, Exception):
                log.warning("no reply pushed to %r: %s", reply_to, res or "not a stream")

    async def _ack(self, entries: Sequence[Outcome | DeadLetter]) -> None:
        """Acks the entries (one XACK per lane) and stops renewing them."""
        by_lane: dict[int, list[str]] = {}
        for entry in entries:
            by_lane.setdefault(entry.lane, []).append(entry.entry_id)
        if by_lane:
            replies = await send_many(
                self.redis,
                [("XACK", self.lanes[lane], GROUP, *ids) for lane, ids in by_lane.items()],
            )
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
        self.release(entries)

    async def push_tokens(self, deltas: Sequence[tuple[str, str, int, str, int]]) -> int:
        """Appends streamed text deltas, (reply_to, job id, seq, text, attempt) each, to their
        reply streams; returns how many it pushed. Best effort: the final result, pushed
        after them by `finish`, is the one answer that counts."""
        if not deltas:
            return 0
        limits = (self.settings.reply_maxlen, self.settings.reply_ttl_s)
        results = await run_scripts(
            self.redis,
            [
                ScriptCall(self._push_token, [reply_to], [job_id, seq, text, attempt, *limits])
                for reply_to, job_id, seq, text, attempt in deltas
            ],
        )
        return sum(1 for res in results if res == 1)

    async def dead_letter(self, letters: Sequence[DeadLetter]) -> int:
        """Moves entries to the dead stream with their reason, stores any result, acks them.

        One script per entry (`dead_letter-3.lua`): idempotent under retries, and a job that
        has a final result already (a cancel, another replica's answer) gets no dead letter:
        its entry is acked and that result pushed, so every job ends once. Nothing is acked if
        the dead letter cannot be written. Returns how many entries it dead-lettered.
        """
        if not letters:
            return 0
        calls = []
        for d in letters:
            result = d.outcome.result_json if d.outcome is not None else b""
            key = result_key(self.model, d.outcome.job_id) if d.outcome else self.dead_key
            added = {
                "reason": d.reason,
                "deliveries": str(d.deliveries),
                "entry_id": d.entry_id,
                "lane": PRIORITIES[d.lane],
            }
            pairs = bounded_fields(d.fields, added, self.settings.dead_entry_max_bytes)
            calls.append(
                ScriptCall(
                    self._dead_letter,
                    [self.lanes[d.lane], self.dead_key, key],
                    [
                        d.entry_id,
                        GROUP,
                        self.settings.dead_maxlen,
                        result,
                        self.settings.result_ttl_s,
                        *pairs,
                    ],
                )
            )
        replies = await run_scripts(self.redis, calls)
        # Each letter on its own: one the dead stream refused must not keep the others (done
        # already, their results stored) from their pushes and acks.
        done = [
            (d, reply)
            for d, reply in zip(letters, replies, strict=True)
            if not isinstance(reply, Exception)
        ]
        owed = [
            (d.outcome.reply_to, d.outcome.job_id, body)
            for d, (_, body) in done
            if d.outcome is not None and body
        ]
        await self._push(owed)
        # Letters with an id are acked after their push; those without, by the script.
        await self._ack([d for d, _ in done if d.outcome is not None])
        self.release([d for d, _ in done])
        count = sum(int(flag) for _, (flag, _) in done)
        if count:
            log.warning("dead-lettered %d entries on %s", count, self.dead_key)
        refused = [reply for reply in replies if isinstance(reply, Exception)]
        if refused:
            raise refused[0]  # the worker retries the rest (the script is idempotent)
        return count

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
        """Ends this replica's heartbeat, so that whatever it still holds (a stop that could
        not finish) is reclaimed at once; then removes this consumer from the group, but only
        when it holds no pending entry.

        XGROUP DELCONSUMER drops the consumer's pending entries from the group, which would
        lose them: so it runs only after a clean drain. (EXPIRE 0 deletes the key with the
        worker's rights, which have no DEL.)
        """
        self._left = True
        await self.redis.expire(self._alive, 0)
        if await self.pending_count() == 0:
            for key in self.lanes:
                with contextlib.suppress(ResponseError):
                    await self.redis.xgroup_delconsumer(key, GROUP, self.consumer)


class Backoff:
    """Exponential backoff with jitter, for Redis outages."""

    def __init__(self, first_s: float = 0.1, max_s: float = 5.0) -> None:
        self._first_s, self._max_s, self._next_s = first_s, max_s, first_s

    def reset(self) -> None:
        self._next_s = self._first_s

    async def sleep(self) -> None:
        await asyncio.sleep(self._next_s * random.uniform(0.5, 1.0))
        self._next_s = min(self._next_s * 2, self._max_s)
