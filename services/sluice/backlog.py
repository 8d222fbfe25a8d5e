"""One model's backlog, read from Redis: what the autoscaling policy (autoscale.py) decides on
and what `sluice exporter` (exporter.py) shows.

Per lane: XINFO GROUPS (the group's lag, pending count and entries read), XPENDING (the oldest
pending entry) and XLEN, in one pipelined round trip; then, only where jobs wait undelivered,
one XRANGE each for the oldest of them; and, where tenants exist, one LLEN of each tenant's
inbox (its jobs not yet moved into the lanes: at zero replicas, all of them). All keys of one
model share its slot (cluster-safe), and every command is one the read-only `sluice-scaler`
user may run (docs/security.md).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.cluster import RedisCluster

from sluice.protocol import (
    GROUP,
    PRIORITIES,
    TENANTS_KEY,
    inbox_key,
    lane_keys,
    tenant_names,
)

#: Replies per lane that `queue_backlog_reads` queues: XINFO GROUPS, XPENDING, XLEN.
READS_PER_LANE = 3
#: Replies that `queue_backlog_reads` queues in all.
BACKLOG_READS = READS_PER_LANE * len(PRIORITIES)


@dataclass(frozen=True, slots=True)
class LaneBacklog:
    """One lane's share of the backlog."""

    waiting: int  # not yet delivered (the group's lag; every entry before any group exists)
    in_flight: int  # delivered, not yet acked (pending)
    length: int  # XLEN: acked entries that are not trimmed yet count too


@dataclass(frozen=True, slots=True)
class Backlog:
    """One model's queue at one moment, summed over its lanes."""

    waiting: int  # not yet delivered to any replica (the groups' lag)
    in_flight: int  # delivered, not yet acked (pending)
    added: int  # entries ever added (a counter: its slope is the arrival rate)
    oldest_age_s: float  # age of the oldest job waiting or in flight; 0 when none
    read_at: float  # time.monotonic() of the read
    lanes: tuple[LaneBacklog, ...] = ()  # per lane, most urgent first (as PRIORITIES)
    inbox: int = 0  # in tenants' inboxes, not yet moved into a lane (counted in `waiting`)

    @property
    def total(self) -> int:
        return self.waiting + self.in_flight


def _ms_of(entry_id: str | bytes | None) -> int | None:
    if not entry_id:
        return None
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0])


def queue_backlog_reads(pipe: Any, model: str) -> None:
    """Queues the backlog's first round trip on a pipeline: `BACKLOG_READS` replies."""
    for key in lane_keys(model):
        pipe.xinfo_groups(key)
        pipe.xpending(key, GROUP)
        pipe.xlen(key)


def read_backlog(
    client: redis.Redis | RedisCluster, model: str, replies: Sequence[Any] | None = None
) -> Backlog:
    """Reads one model's backlog: two round trips at most, keys of one slot (cluster-safe).

    `replies`: the replies to `queue_backlog_reads` (errors as exceptions, as
    `execute(raise_on_error=False)` gives them), when the caller queued those reads in a
    pipeline of its own, with reads of its own that so cost no round trip more. The client
    must decode responses.
    """
    lanes = lane_keys(model)
    if replies is None:
        with client.pipeline(transaction=False) as pipe:
            queue_backlog_reads(pipe, model)
            replies = pipe.execute(raise_on_error=False)
    total = _Lane()
    per_lane: list[LaneBacklog] = []
    after: list[tuple[str, str]] = []  # (lane, exclusive start) where undelivered jobs wait
    for i, key in enumerate(lanes):
        lane = _Lane.parse(*replies[READS_PER_LANE * i : READS_PER_LANE * (i + 1)])
        total.add(lane)
        per_lane.append(LaneBacklog(lane.waiting, lane.in_flight, lane.length))
        if lane.waiting and lane.start:
            after.append((key, lane.start))
    if after:
        with client.pipeline(transaction=False) as pipe:
            for key, start in after:
                pipe.xrange(key, min=start, max="+", count=1)
            for rows in pipe.execute(raise_on_error=False):
                if not isinstance(rows, Exception) and rows and (ms := _ms_of(rows[0][0])):
                    total.oldest.append(ms)
    oldest = min(total.oldest, default=None)
    age = max(0.0, time.time() - oldest / 1000) if oldest is not None else 0.0
    inbox = read_inboxes(client, model)
    return Backlog(
        waiting=total.waiting + inbox,
        in_flight=total.in_flight,
        added=total.added + inbox,
        oldest_age_s=age,
        read_at=time.monotonic(),
        lanes=tuple(per_lane),
        inbox=inbox,
    )


def read_inboxes(client: redis.Redis | RedisCluster, model: str) -> int:
    """Jobs in the tenants' inboxes of one model: SMEMBERS, then one LLEN each, pipelined."""
    names: Any = client.smembers(TENANTS_KEY)
    tenants = tenant_names(names)
    if not tenants:
        return 0
    with client.pipeline(transaction=False) as pipe:
        for tenant in tenants:
            pipe.llen(inbox_key(model, tenant))
        lengths = pipe.execute(raise_on_error=False)
    # An inbox Redis refuses (e.g. not a list) holds nothing the intake could move.
    return sum(int(n) for n in lengths if not isinstance(n, Exception))


class _Lane:
    """One lane's share of the backlog, from its XINFO GROUPS, XPENDING and XLEN replies."""

    def __init__(self) -> None:
        self.waiting = self.in_flight = self.added = self.length = 0
        self.oldest: list[int] = []  # ms of the oldest pending entry
        self.start = ""  # where XRANGE finds the oldest undelivered entry

    def add(self, other: _Lane) -> None:
        self.waiting += other.waiting
        self.in_flight += other.in_flight
        self.added += other.added
        self.length += other.length
        self.oldest += other.oldest

    @classmethod
    def parse(cls, groups: Any, pending: Any, length: Any) -> _Lane:
        lane = cls()
        if isinstance(groups, Exception):  # no stream yet: nothing queued on this lane
            return lane
        if isinstance(length, Exception):
            raise length  # e.g. NOPERM: the poller logs it and keeps trying
        lane.length = int(length or 0)
        group = next((g for g in groups if str(g["name"]) == GROUP), None)
        if group is None:  # no replica ever started: every entry waits
            lane.waiting = lane.added = lane.length
            lane.start = "-"
            return lane
        lag = group.get("lag")
        # Redis reports no lag after some deletions: XLEN minus pending bounds it from above.
        lane.waiting = int(lag) if lag is not None else max(0, lane.length - int(group["pending"]))
        lane.in_flight = int(group["pending"])
        lane.added = int(group.get("entries-read") or 0) + lane.waiting
        lane.start = f"({group['last-delivered-id']}"
        if not isinstance(pending, Exception) and (ms := _ms_of(pending.get("min"))):
            lane.oldest.append(ms)
        return lane
