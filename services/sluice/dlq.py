"""Dead letters, for operators: list, show, replay, purge (`sluice dlq ...`).

A dead letter is the original entry's fields plus `reason`, `deliveries`, `entry_id` (its id
on the lane) and `lane`. Replay puts the original fields back on their lane in one script
(scripts.REPLAY): the job's `dead_lettered` result is removed so the replay can be answered, and a
job that has some other final result is left alone. An entry without a usable id cannot be
replayed (it would only be dead-lettered again): fix it and XADD it yourself.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sluice import scripts
from sluice.connection import SyncRedis
from sluice.protocol import (
    JOB_ID_RE,
    PRIORITIES,
    dead_key,
    entry_time_ms,
    job_key,
    jobs_key,
    result_key,
)

# The fields a replica adds to a dead letter; the rest are the original entry's.
# `truncated`: the original fields were cut to fit `dead_entry_max_bytes` (a poison entry).
ADDED = ("reason", "deliveries", "entry_id", "lane", "truncated")


@dataclass(slots=True)
class DeadEntry:
    """One dead letter as stored."""

    dead_id: str
    fields: dict[str, str]
    original: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.original = {k: v for k, v in self.fields.items() if k not in ADDED}

    @property
    def job_id(self) -> str | None:
        value = self.fields.get("id")
        return value if value is not None and JOB_ID_RE.fullmatch(value) else None

    @property
    def lane(self) -> str:
        lane = self.fields.get("lane", "normal")
        return lane if lane in PRIORITIES else "normal"

    def summary(self) -> dict[str, Any]:
        return {
            "dead_id": self.dead_id,
            "id": self.fields.get("id"),
            "lane": self.lane,
            "deliveries": self.fields.get("deliveries"),
            "reason": self.fields.get("reason", ""),
            "dead_at_ms": entry_time_ms(self.dead_id),
        }


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _entry(dead_id: Any, fields: dict[Any, Any]) -> DeadEntry:
    return DeadEntry(_text(dead_id), {_text(k): _text(v) for k, v in fields.items()})


def count(client: SyncRedis, model: str) -> int:
    return int(client.xlen(dead_key(model)))


def list_entries(client: SyncRedis, model: str, limit: int = 50) -> list[DeadEntry]:
    """The newest `limit` dead letters, newest first."""
    rows: Any = client.xrevrange(dead_key(model), count=limit)
    return [_entry(dead_id, fields) for dead_id, fields in rows]


def get(client: SyncRedis, model: str, dead_id: str) -> DeadEntry | None:
    rows: Any = client.xrange(dead_key(model), min=dead_id, max=dead_id)
    return _entry(*rows[0]) if rows else None


def all_ids(client: SyncRedis, model: str) -> list[str]:
    ids: list[str] = []
    for dead_id, _ in client.xrange(dead_key(model)):  # type: ignore[union-attr]
        ids.append(_text(dead_id))
    return ids


def replay(client: SyncRedis, model: str, dead_ids: Iterable[str]) -> dict[str, str]:
    """Re-queues dead letters; returns what happened to each: `replayed <new entry id>`,
    `missing`, `answered <status>`, `no usable id` or `truncated`."""
    script = client.register_script(scripts.REPLAY)
    out: dict[str, str] = {}
    for dead_id in dead_ids:
        entry = get(client, model, dead_id)
        if entry is None:
            out[dead_id] = "missing"
            continue
        if entry.job_id is None:
            out[dead_id] = "no usable id"
            continue
        if entry.fields.get("truncated"):
            # Its fields were cut to bound the dead stream: replaying them would run
            # something other than what was sent.
            out[dead_id] = "truncated"
            continue
        keys = [
            dead_key(model),
            jobs_key(model, entry.lane),
            result_key(model, entry.job_id),
            job_key(model, entry.job_id),
        ]
        pairs = [x for kv in entry.original.items() for x in kv]
        reply: Any = script(keys=keys, args=[dead_id, *pairs])
        out[dead_id] = " ".join(_text(part) for part in reply)
    return out


def purge(client: SyncRedis, model: str, dead_ids: Iterable[str] | None = None) -> int:
    """Deletes the given dead letters, or all of them; returns how many went."""
    if dead_ids is None:
        gone = count(client, model)
        client.delete(dead_key(model))
        return gone
    ids = list(dead_ids)
    return int(client.xdel(dead_key(model), *ids)) if ids else 0
