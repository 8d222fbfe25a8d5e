"""The replica's intake: moves the tenants' inboxes into the lanes.

A tenant (docs/security.md, "Tenants") may push to its own inbox and to the model's bell, and
to nothing else that replicas read: `RPUSH` can neither trim a list nor choose ids, so no
tenant can trim, flood with maximal ids, or read the lanes. Each replica runs one intake task
beside its pull loop. It reads the tenants (`sluice:tenants`), moves up to `per_inbox_count`
elements of each inbox into the lanes in one atomic script (`admit-n.lua`, which scopes ids
and marks each entry with its tenant), and, once every inbox is empty, waits on the bell
(`BLPOP`), which a tenant's submit rings: so a job waits in an inbox for one round trip, not
for a poll. From the lanes on, a tenant's job is a job like any other: pulled, leased,
reclaimed, answered once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass

from redis.exceptions import NoPermissionError, RedisError

from sluice import scripts
from sluice.connection import AsyncRedis, cluster_hint
from sluice.protocol import (
    TENANTS_KEY,
    bell_key,
    inbox_key,
    info_key,
    lane_keys,
    max_element_bytes,
    tenant_names,
)
from sluice.queue import Backoff
from sluice.settings import QueueSettings

log = logging.getLogger(__name__)

#: Elements moved from each inbox per script call: one call's cost stays O(this times the tenants).
PER_INBOX_COUNT = 64
#: Fields an element may carry (an entry of the protocol has at most six).
MAX_FIELDS = 64
#: Bytes one script call may handle, over all inboxes, each element costing 1 KiB more than
#: its size (so at most 1,024 elements): what bounds its time whatever the tenants push.
BYTE_BUDGET = 1 << 20
#: How long to wait before moving more while the queue is at `max_queue_depth`.
FULL_WAIT_S = 0.05
#: Inboxes one script call reads: its cost stays bounded however many tenants there are.
MAX_TENANTS_PER_PASS = 128
#: How often the tenants are read again (a new tenant's jobs move within this).
TENANTS_REFRESH_S = 1.0
#: The least time between two sweeps that found nothing (a tenant may ring at will).
EMPTY_SWEEP_GAP_S = 0.05


@dataclass(slots=True)
class IntakeStats:
    moved: int = 0  # elements moved into the lanes
    dropped: int = 0  # ids answered or moved already: their one result answers them
    dead: int = 0  # elements that could not be answered: on their tenant's dead stream
    refused_inboxes: int = 0  # inbox keys Redis refused (not a list): skipped, logged
    errors: int = 0  # Redis errors met (retried)


@dataclass(frozen=True, slots=True)
class Moved:
    """What one pass, or one sweep of passes, did."""

    moved: int
    left: int  # inboxes still holding elements
    full: bool  # the queue bound stopped it
    handled: int = 0  # elements taken out of inboxes: moved, dropped or dead-lettered

    def __add__(self, other: Moved) -> Moved:
        return Moved(
            moved=self.moved + other.moved,
            left=self.left + other.left,
            full=self.full or other.full,
            handled=self.handled + other.handled,
        )


NOTHING = Moved(0, 0, False)


class Intake:
    """One model's inboxes → its lanes, for as long as `run` runs."""

    def __init__(self, redis: AsyncRedis, model: str, limits: QueueSettings) -> None:
        self.redis = redis
        self.model = model
        self.limits = limits
        self.stats = IntakeStats()
        self._admit = redis.register_script(scripts.ADMIT)
        self._keys = [bell_key(model), *lane_keys(model), info_key(model)]
        self._args: list[str | int] = [
            PER_INBOX_COUNT,
            max_element_bytes(limits),
            MAX_FIELDS,
            BYTE_BUDGET,
            limits.dead_maxlen,
        ]
        self._turn = 0  # whose inbox goes first: each tenant in turn, so none always waits
        self._tenants: list[str] = []
        self._tenants_read_at = -math.inf

    async def tenants(self) -> list[str]:
        """The tenants, valid names only (any other would address keys outside the slot);
        read again every `TENANTS_REFRESH_S`, not on every pass."""
        now = time.monotonic()
        if now - self._tenants_read_at >= TENANTS_REFRESH_S:
            with cluster_hint():
                names = await self.redis.smembers(TENANTS_KEY)
            self._tenants = tenant_names(names)
            self._tenants_read_at = now
        return self._tenants

    async def sweep(self, tenants: list[str]) -> Moved:
        """Every tenant's inbox once, `MAX_TENANTS_PER_PASS` of them per script call (so a call's
        cost is bounded however many tenants there are), starting with another tenant each
        time. The first call clears the bell, so a submit that rings during the sweep wakes
        the next one."""
        self._turn = (self._turn + 1) % max(len(tenants), 1)
        order = tenants[self._turn :] + tenants[: self._turn]
        done = NOTHING
        for start in range(0, len(order), MAX_TENANTS_PER_PASS):
            done += await self.move(order[start : start + MAX_TENANTS_PER_PASS], first=start == 0)
            if done.full:
                break
        return done

    async def move(self, tenants: list[str], *, first: bool = True) -> Moved:
        """One atomic pass over these tenants' inboxes (admit-n.lua)."""
        keys = [*self._keys, *(inbox_key(self.model, t) for t in tenants)]
        args = [*self._args, int(first), *tenants]
        with cluster_hint():
            reply = await self._admit(keys=keys, args=args)
        moved, left, refused, dropped, dead, full = (int(x) for x in reply)
        if refused:
            self.stats.refused_inboxes += refused
            log.error("%d inboxes of %s are not lists: skipped", refused, self.model)
        if dead:
            log.warning(
                "%d inbox elements of %s could not be answered: dead-lettered on their "
                "tenants' dead streams",
                dead,
                self.model,
            )
        self.stats.moved += moved
        self.stats.dropped += dropped
        self.stats.dead += dead
        return Moved(moved, left, bool(full), moved + dropped + dead)

    async def run(self, stopping: asyncio.Event) -> None:
        """Moves inboxes until `stopping` is set; waits on the bell while they are empty."""
        backoff = Backoff()
        wait_s = max(self.limits.block_ms / 1000, 0.1)
        while not stopping.is_set():
            try:
                tenants = await self.tenants()
                swept = await self.sweep(tenants) if tenants else NOTHING
                if swept.full:
                    # The queue is at max_queue_depth: the inboxes wait while replicas work.
                    await asyncio.sleep(FULL_WAIT_S)
                elif not swept.left:
                    if not swept.handled:
                        # A ring that found nothing (anyone may ring): so at most one empty
                        # sweep per EMPTY_SWEEP_GAP_S, however often the bell rings.
                        await asyncio.sleep(EMPTY_SWEEP_GAP_S)
                    # Woken by the next submit's ring (or after wait_s, to see new tenants).
                    with cluster_hint():
                        await self.redis.blpop([self._keys[0]], timeout=wait_s)
                backoff.reset()
            except NoPermissionError as exc:
                self.stats.errors += 1
                log.error("the intake of %s may not run (%s): tenants wait", self.model, exc)
                await asyncio.sleep(30)
            except (RedisError, OSError) as exc:
                self.stats.errors += 1
                name = type(exc).__name__
                log.warning("intake of %s failed (%s: %s); backing off", self.model, name, exc)
                await backoff.sleep()
