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
from dataclasses import dataclass

from redis.exceptions import NoPermissionError, RedisError

from sluice import scripts
from sluice.connection import AsyncRedis, cluster_hint
from sluice.protocol import TENANT_RE, TENANTS_KEY, bell_key, inbox_key, lane_keys
from sluice.queue import Backoff
from sluice.settings import QueueSettings

log = logging.getLogger(__name__)

#: Elements moved from each inbox per script call: one call's cost stays O(this times the tenants).
PER_INBOX_COUNT = 64
#: Fields an element may carry (an entry of the protocol has at most six).
MAX_FIELDS = 64


@dataclass(slots=True)
class IntakeStats:
    moved: int = 0  # elements moved into the lanes
    refused_inboxes: int = 0  # inbox keys Redis refused (not a list): skipped, logged
    errors: int = 0  # Redis errors met (retried)


class Intake:
    """One model's inboxes → its lanes, for as long as `run` runs."""

    def __init__(self, redis: AsyncRedis, model: str, limits: QueueSettings) -> None:
        self.redis = redis
        self.model = model
        self.limits = limits
        self.stats = IntakeStats()
        self._admit = redis.register_script(scripts.ADMIT)
        self._bell = bell_key(model)
        self._lanes = lane_keys(model)
        # The most an element may weigh and still be decoded: a job's largest fields, plus
        # room for its id, deadline and reply stream.
        self._max_bytes = limits.max_input_bytes + limits.max_params_bytes + 4096

    async def tenants(self) -> list[str]:
        """The tenants, valid names only (any other would address keys outside the slot)."""
        with cluster_hint():
            names = await self.redis.smembers(TENANTS_KEY)
        decoded = (n.decode() if isinstance(n, bytes) else str(n) for n in names)
        return sorted(n for n in decoded if TENANT_RE.fullmatch(n))

    async def move(self, tenants: list[str]) -> tuple[int, int]:
        """One atomic pass over every tenant's inbox: (moved, inboxes still holding some)."""
        keys = [self._bell, *self._lanes, *(inbox_key(self.model, t) for t in tenants)]
        args: list[str | int] = [PER_INBOX_COUNT, self._max_bytes, MAX_FIELDS, *tenants]
        with cluster_hint():
            moved, left, refused = await self._admit(keys=keys, args=args)
        if refused:
            self.stats.refused_inboxes += int(refused)
            log.error("%d inboxes of %s are not lists: skipped", refused, self.model)
        self.stats.moved += int(moved)
        return int(moved), int(left)

    async def run(self, stopping: asyncio.Event) -> None:
        """Moves inboxes until `stopping` is set; waits on the bell while they are empty."""
        backoff = Backoff()
        wait_s = max(self.limits.block_ms / 1000, 0.1)
        while not stopping.is_set():
            try:
                tenants = await self.tenants()
                left = 0
                if tenants:
                    _, left = await self.move(tenants)
                if not left:
                    # Woken by the next submit's ring (or after wait_s, to see new tenants).
                    with cluster_hint():
                        await self.redis.blpop([self._bell], timeout=wait_s)
                backoff.reset()
            except NoPermissionError as exc:
                self.stats.errors += 1
                log.error("the intake of %s may not run (%s): tenants wait", self.model, exc)
                await asyncio.sleep(30)
            except (RedisError, OSError) as exc:
                self.stats.errors += 1
                log.warning("intake of %s failed (%r); backing off", self.model, exc)
                await backoff.sleep()
