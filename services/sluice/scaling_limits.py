"""The two limits on the autoscaling policy's wish: room to place a replica, and a replica that
pays for itself.

- **Room** (`Headroom`): a replica is only asked for where a node has the CPUs and GPUs it
  reserves free (Ray's free resources per node, read at most once a second). Asking for more
  would leave Serve with a replica it cannot place, or, with replicas that use more cores
  than they reserve, one that only slows the others.
- **Gain** (`GainCheck`): after the policy adds a replica while jobs wait, it compares the
  model's total throughput, as the replicas report it, once the new replica has had a full
  look-back window to show its worth. If the total did not rise by at least half a replica's
  share, the replica added nothing (a bound elsewhere: cores, memory bandwidth, Redis), and the
  policy holds the count below it for `hold_s`, saying so in its log, its state and a metric.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: Free resources per node: {node: {"CPU": 1.0, "GPU": 0.5, ...}}.
FreeResources = Callable[[], Mapping[str, Mapping[str, float]]]


def ray_free_resources() -> Mapping[str, Mapping[str, float]]:
    """What each node of the Ray cluster has free right now (the controller is a Ray actor)."""
    import ray
    from ray._private.state import state

    try:
        per_node: Mapping[str, Mapping[str, float]] = state.available_resources_per_node()  # type: ignore[no-untyped-call]
        return per_node
    except Exception:  # the per-node view is internal to Ray: the cluster's total instead,
        # which may overstate the room (a replica needs it all on one node), never understate
        return {"cluster": ray.available_resources()}  # type: ignore[no-untyped-call]


class Headroom:
    """How many more replicas of a given size fit on the cluster's nodes."""

    def __init__(self, free: FreeResources = ray_free_resources, refresh_s: float = 1.0) -> None:
        self._free = free
        self._refresh_s = refresh_s
        self._read_at = -math.inf
        self._nodes: list[Mapping[str, float]] = []

    def room(self, need: Mapping[str, float]) -> int | None:
        """Replicas that `need` (e.g. {"CPU": 2.0}) still fits; None when it needs nothing
        Ray counts (then there is no limit to tell)."""
        need = {r: n for r, n in need.items() if n > 0}
        if not need:
            return None
        now = time.monotonic()
        if now - self._read_at >= self._refresh_s:
            self._nodes = list(self._free().values())
            self._read_at = now
        return sum(
            min(math.floor(node.get(r, 0.0) / n + 1e-9) for r, n in need.items())
            for node in self._nodes
        )


@dataclass
class _Trial:
    replicas: int  # the count before the added replica
    before: float  # the model's total throughput then, jobs/s
    started: float  # monotonic: when the policy asked for it
    joined: float | None = None  # monotonic: when it was first running and reporting


class GainCheck:
    """Holds the count below a replica that added no throughput."""

    def __init__(self, settle_s: float, hold_s: float = 600.0, min_share: float = 0.5) -> None:
        self.settle_s = settle_s  # how long a joined replica reports before it is judged
        self.hold_s = hold_s
        self.min_share = min_share
        self._trial: _Trial | None = None
        self.cap: int | None = None
        self._cap_until = 0.0
        self.last_verdict: str | None = None

    def limit(self, now: float | None = None) -> int | None:
        """The most replicas the policy may ask for (None: no limit now)."""
        now = time.monotonic() if now is None else now
        if self.cap is not None and now >= self._cap_until:
            log.info("the hold at %d replicas ends: adding replicas may be tried again", self.cap)
            self.cap = None
        return self.cap

    def observe(
        self,
        running: int,
        desired: int,
        total: float,
        saturated: bool,
        now: float | None = None,
        reporting: int | None = None,
    ) -> None:
        """Called every tick with the policy's final answer `desired`: `total` is the running
        replicas' summed throughput, `reporting` how many of them reported it (default:
        `running`), `saturated` whether jobs waited through the whole look-back window (so
        the total is what they can do). The new replica is judged `settle_s` after it first
        runs and reports, never on the time it took to start."""
        now = time.monotonic() if now is None else now
        reporting = running if reporting is None else reporting
        trial = self._trial
        if trial is None:
            if saturated and desired > running >= 1 and total > 0 and self.cap is None:
                self._trial = _Trial(running, total, now)
            return
        if trial.joined is None:
            if running >= trial.replicas + 1 and reporting >= trial.replicas + 1:
                trial.joined = now
            elif now - trial.started > 10 * self.settle_s or desired <= trial.replicas:
                self._trial = None  # it never came, or is no longer wanted: nothing to judge
            return
        if not saturated or running < trial.replicas + 1:
            self._trial = None  # the queue emptied, or a replica went: no fair measure
            return
        if now - trial.joined < self.settle_s:
            return
        self._trial = None
        share = trial.before / trial.replicas
        gain = total - trial.before
        if gain >= self.min_share * share:
            self.last_verdict = f"replica {trial.replicas + 1} added {gain:.1f} jobs/s"
            return
        self.cap = trial.replicas
        self._cap_until = now + self.hold_s
        self.last_verdict = (
            f"replica {trial.replicas + 1} added no throughput ({trial.before:.1f} -> "
            f"{total:.1f} jobs/s, one replica's share {share:.1f}): holding at "
            f"{trial.replicas} for {self.hold_s:.0f} s"
        )
        log.warning("%s", self.last_verdict)
