"""Backlog-driven autoscaling: as many replicas as it takes to drain the queue in time.

Serve's default policy counts requests in flight at handles, which pulled jobs never are. This
policy runs in the Serve controller (`autoscaling_config.policy.policy_function:
sluice.autoscale:BacklogPolicy`) and decides from what matters for a queue:

- the backlog, read from Redis by a daemon thread every `poll_interval_s` (XINFO GROUPS lag +
  pending over every lane, the age of the oldest job: `backlog.read_backlog`), so the
  controller's event loop never waits on Redis, and so it works at zero replicas, when nobody
  reports anything;
- the arrival rate, from the group's counters (entries read + lag = entries ever added);
- each replica's service rate, which replicas report through Serve's
  `record_autoscaling_stats` (`ServiceMeter` below): the throughput they reach while jobs wait
  (so they are saturated) is what one replica can do.

    desired = ceil((arrival rate + backlog / target_drain_s) / (service rate * utilization))

Two limits then apply (scaling_limits.py): no replica is asked for that no node has the free
CPUs or GPUs to place (the replicas report what they reserve), and a replica that added no
throughput while jobs waited is not asked for again for a while. Serve then applies min/max
replicas and its up/down delays (`downscale_to_zero_delay_s` is the
idle period before zero); a job arriving at zero replicas starts one at once. docs/scaling.md
explains the choices and the figures.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

# Backlog and read_backlog live in backlog.py (the exporter reads them too); imported here,
# where the policy and its callers have always found them.
from sluice.backlog import Backlog, read_backlog
from sluice.connection import SyncRedis, connect_sync
from sluice.scaling_limits import GainCheck, Headroom
from sluice.settings import Settings

log = logging.getLogger(__name__)

#: How long after asking for replicas Ray's free resources may not show them placed yet.
VIEW_LAG_S = 5.0

#: A snapshot older than this many poll intervals is not trusted: hold the replica count.
STALE_POLLS = 10

Connect = Callable[[], SyncRedis]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the feed knows of one model: its backlog, arrivals, and for how long jobs have
    been waiting without a break (so: for how long the replicas have been saturated)."""

    backlog: Backlog
    arrival_rate: float
    backlogged_s: float


@dataclass(frozen=True, slots=True)
class Targets:
    """The policy's knobs (`policy_kwargs`), validated once."""

    target_drain_s: float = 10.0
    utilization: float = 0.8
    hysteresis: float = 0.25
    default_rate: float = 50.0

    def __post_init__(self) -> None:
        if self.target_drain_s <= 0 or self.default_rate <= 0:
            raise ValueError("target_drain_s and default_rate must be > 0")
        if not 0 < self.utilization <= 1:
            raise ValueError("utilization must be in (0, 1]")
        if self.hysteresis < 0:
            raise ValueError("hysteresis must be >= 0")


def desired_replicas(
    backlog: Backlog, arrival_rate: float, service_rate: float, current: int, t: Targets
) -> int:
    """Replicas that serve the arrivals and drain the backlog within `target_drain_s`.

    Up at once when the work needs more than `current`; down only when the work would fit
    with `hysteresis` replicas to spare, so a load near a boundary does not flap. Zero only
    when nothing waits, nothing runs and nothing arrives.
    """
    if backlog.total == 0 and arrival_rate < 1e-3:
        return 0
    work = arrival_rate + backlog.total / t.target_drain_s  # jobs/s to serve
    need = work / (service_rate * t.utilization)
    up = max(1, math.ceil(need))
    if up > current:
        return up
    if current > 0 and backlog.oldest_age_s > t.target_drain_s and backlog.waiting > 0:
        # Jobs already wait longer than the target: the rate estimate is optimistic.
        return current + 1
    return min(current, max(1, math.ceil(need + t.hysteresis)))


class RateWindow:
    """The slope of the `added` counter over the last `window_s`: jobs arriving per second."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._points: deque[tuple[float, int]] = deque()

    def add(self, at: float, added: int) -> None:
        if self._points and added < self._points[-1][1]:
            self._points.clear()  # the stream was recreated: its counter restarted
        self._points.append((at, added))
        while len(self._points) > 2 and at - self._points[1][0] >= self.window_s:
            self._points.popleft()

    def rate(self) -> float:
        if len(self._points) < 2:
            return 0.0
        (t0, a0), (t1, a1) = self._points[0], self._points[-1]
        return (a1 - a0) / (t1 - t0) if t1 > t0 else 0.0


class BacklogPolicy:
    """The Serve autoscaling policy: instantiated once per deployment with `policy_kwargs`,
    called every control-loop tick with an `AutoscalingContext`."""

    def __init__(
        self,
        model: str | None = None,
        redis_url: str | None = None,
        redis_cluster: bool = False,
        target_drain_s: float = 10.0,
        utilization: float = 0.8,
        hysteresis: float = 0.25,
        default_rate: float = 50.0,
        poll_interval_s: float = 0.5,
        limit_to_free_resources: bool = True,
    ) -> None:
        """`limit_to_free_resources`: ask only for replicas a node has the free CPUs/GPUs for
        (false on a cluster whose Ray autoscaler adds nodes for pending replicas)."""
        self.model = model
        self.redis_url = redis_url
        self.redis_cluster = redis_cluster
        self.targets = Targets(target_drain_s, utilization, hysteresis, default_rate)
        self.poll_interval_s = poll_interval_s
        self._rate = default_rate  # jobs/s per replica: the policy's current estimate
        self._measured = False  # whether _rate was measured on saturated replicas
        self._feed: BacklogFeed | None = None
        self.limit_to_free_resources = limit_to_free_resources
        self._headroom = Headroom()
        self._size: dict[str, float] | None = None  # what one replica reserves, once reported
        self._gain: GainCheck | None = None
        self._limited_by: str | None = "unset"  # so the first tick records the metric
        self._raised_at = -math.inf  # monotonic: when this policy last asked for more
        self._gauge: Any = None

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        state = dict(ctx.policy_state)
        if self._feed is None:
            connect = client_factory(self.redis_url, self.redis_cluster)
            self._feed = BacklogFeed(connect, self.model or ctx.app_name, self.poll_interval_s)
        snap = self._feed.latest()
        if snap is None:
            return ctx.target_num_replicas, state  # nothing fresh known: change nothing
        self._rate = self._capacity(ctx, snap)
        wish = desired_replicas(
            snap.backlog, snap.arrival_rate, self._rate, ctx.current_num_replicas, self.targets
        )
        desired = self._limit(ctx, snap, wish)
        state["sluice"] = {
            "backlog": snap.backlog.total,
            "waiting": snap.backlog.waiting,
            "arrival_rate": round(snap.arrival_rate, 2),
            "service_rate": round(self._rate, 2),
            "oldest_age_s": round(snap.backlog.oldest_age_s, 2),
            "desired": desired,
            "wished": wish,
            "limited_by": self._limited_by,
            "gain": self._gain.last_verdict if self._gain else None,
        }
        return desired, state

    def _limit(self, ctx: Any, snap: Snapshot, wish: int) -> int:
        """The wish, held to what the cluster can place and to replicas that paid off.
        Only increases are held: scaling down is never limited."""
        metrics = ctx.aggregated_metrics or {}
        current = ctx.current_num_replicas  # running ones
        # Replicas asked for and still starting hold their resources already.
        placed = max(current, ctx.target_num_replicas)
        look_back_s = float(ctx.config.look_back_period_s)
        if self._gain is None:
            # A new replica is judged once it has reported for two look-back windows.
            self._gain = GainCheck(settle_s=2 * look_back_s + 5)
        desired, limited_by = wish, None
        cap = self._gain.limit()
        if cap is not None and desired > cap:
            # Down to the count before the replica that added nothing: it is not kept.
            desired, limited_by = cap, "no_gain"
        size = self._replica_size(metrics)  # learnt on every tick, for the ticks at zero
        if self.limit_to_free_resources and desired > placed:
            if size is None and current == 0:
                # Nothing reported what a replica reserves yet: one, and learn it from that one.
                desired, limited_by = max(placed, 1), "no_free_resources"
            elif size is not None:
                room = self._headroom.room(size)
                if room is not None and time.monotonic() - self._raised_at < VIEW_LAG_S:
                    # Ray's view of free resources lags the replicas just asked for (they
                    # are not placed yet): count those still starting as taking room, or the
                    # next tick asks again for the room they are about to take, and a replica
                    # waits, pending, for a GPU share that never comes. Later, Ray's view
                    # has them, and subtracting them again would hold the count too low.
                    room = max(0, room - (placed - current))
                if room is not None and desired > placed + room:
                    # Never below one: at zero, a job waits for a replica however full the
                    # nodes are (pending, it shows in `serve status` what is missing).
                    desired, limited_by = max(placed + room, 1), "no_free_resources"
        if desired > placed:
            self._raised_at = time.monotonic()
        reports = metrics.get("throughput") or {}
        total = sum(v for v in reports.values() if v > 0)
        saturated = snap.backlogged_s >= look_back_s and snap.backlog.waiting > 0
        self._gain.observe(current, desired, total, saturated, reporting=len(reports))
        if limited_by != self._limited_by:
            if limited_by == "no_free_resources":
                log.warning(
                    "%s: holding at %d replicas, not %d: no node has the free resources "
                    "another replica reserves (%s)",
                    self.model,
                    desired,
                    wish,
                    self._size,
                )
            elif limited_by is None and self._limited_by != "unset":
                log.info("%s: the replica count is no longer held", self.model)
            self._limited_by = limited_by
            self._report_limit(limited_by)
        return desired

    def _replica_size(self, metrics: Mapping[str, Any]) -> dict[str, float] | None:
        """What one replica reserves ({"CPU": 2.0, ...}), as the replicas report it; the last
        report is remembered, for when none runs. None until one has reported."""
        size = {"CPU": _median(metrics.get("cpus")), "GPU": _median(metrics.get("gpus"))}
        if any(v is not None for v in size.values()):
            self._size = {r: v for r, v in size.items() if v is not None}
        return self._size

    def _report_limit(self, limited_by: str | None) -> None:
        """`sluice_autoscale_limited{model, reason}`: 1 while the policy holds the count."""
        try:
            if self._gauge is None:
                from ray.util.metrics import Gauge

                self._gauge = Gauge(
                    "sluice_autoscale_limited",
                    description="1 while the autoscaling policy holds the replica count below "
                    "its wish: no_free_resources, or no_gain (an added replica added nothing)",
                    tag_keys=("model", "reason"),
                )
            for reason in ("no_free_resources", "no_gain"):
                value = 1.0 if reason == limited_by else 0.0
                self._gauge.set(value, tags={"model": str(self.model), "reason": reason})
        except Exception as exc:  # a metric must never stop the policy
            log.debug("autoscale metric not recorded: %r", exc)

    def _capacity(self, ctx: Any, snap: Snapshot) -> float:
        """Jobs per second one replica can serve.

        What replicas did while jobs waited for the whole look-back window is what they can
        do: their throughput then (a mean over that window) is the measure. Until such a window
        has been seen, the default, capped by the model-time rate they report (which leaves
        out tokenizing and Redis, so it only bounds the capacity from above).
        """
        metrics = ctx.aggregated_metrics or {}
        if snap.backlogged_s >= ctx.config.look_back_period_s and ctx.current_num_replicas:
            if (seen := _median(metrics.get("throughput"))) is not None:
                self._measured = True
                return seen
        if self._measured:
            return self._rate
        model_rate = _median(metrics.get("service_rate"))
        default = self.targets.default_rate
        return min(default, model_rate) if model_rate is not None else default


def _median(per_replica: Mapping[Any, float] | None) -> float | None:
    """The median of the replicas' positive reports; None when none reported."""
    values = [v for v in (per_replica or {}).values() if v > 0]
    return statistics.median(values) if values else None


class BacklogFeed:
    """A daemon thread that keeps the latest backlog and arrival rate of one model.

    The thread holds only the shared slot, never the feed or the policy, so when the controller
    drops the policy (a config change) the finalizer stops the thread.
    """

    def __init__(self, connect: Connect, model: str, interval_s: float) -> None:
        self.model = model
        self.interval_s = interval_s
        self._slot = _Slot()
        threading.Thread(
            target=_poll,
            args=(self._slot, connect, model, interval_s),
            name=f"sluice-backlog-{model}",
            daemon=True,
        ).start()
        weakref.finalize(self, self._slot.stop.set)

    def latest(self) -> Snapshot | None:
        with self._slot.lock:
            latest = self._slot.latest
        stale = STALE_POLLS * self.interval_s
        if latest is None or time.monotonic() - latest.backlog.read_at > stale:
            return None
        return latest


class _Slot:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latest: Snapshot | None = None
        self.stop = threading.Event()


def _poll(slot: _Slot, connect: Connect, model: str, interval_s: float) -> None:
    window = RateWindow()
    client: SyncRedis | None = None
    failing = False
    waiting_since: float | None = None
    while not slot.stop.is_set():
        try:
            client = client or connect()
            backlog = read_backlog(client, model)
            window.add(backlog.read_at, backlog.added)
            if not backlog.waiting:
                waiting_since = None
            elif waiting_since is None:
                waiting_since = backlog.read_at
            backlogged_s = backlog.read_at - waiting_since if waiting_since is not None else 0.0
            with slot.lock:
                slot.latest = Snapshot(backlog, window.rate(), backlogged_s)
            if failing:
                log.info("backlog of %s readable again", model)
            failing = False
        except Exception as exc:  # a dead poller would freeze the replica count: never die
            if not failing:
                log.warning("cannot read the backlog of %s: %r", model, exc)
            failing, client = True, None
        slot.stop.wait(interval_s)
    if client is not None:
        client.close()


def client_factory(url: str | None, cluster: bool) -> Connect:
    """The URL and cluster flag given, else the controller's environment: the read-only
    scaler user's SLUICE_SCALER_REDIS_URL (docs/security.md), else the settings' (the
    replicas' SLUICE_REDIS_URL and SLUICE_REDIS_CLUSTER)."""
    settings = Settings()
    url = url or os.environ.get("SLUICE_SCALER_REDIS_URL") or settings.redis_url
    cluster = cluster or settings.redis_cluster
    return lambda: connect_sync(url, cluster=cluster, decode_responses=True, socket_timeout=5)


class ServiceMeter:
    """What a replica reports to the policy (Serve calls `report` every few seconds):

    - `throughput`: jobs answered per second since the last report;
    - `service_rate`: jobs per second of model time (an idle replica still reports what its
      model could do);
    - `utilization`: the share of the time the model was busy;
    - `cpus`, `gpus`: what Ray reserved for the replica (how much room another one needs).
    """

    def __init__(
        self, read: Callable[[], tuple[int, float]], cpus: float = 0.0, gpus: float = 0.0
    ) -> None:
        self._read = read
        self._size = {"cpus": cpus, "gpus": gpus}
        self._jobs, self._busy_s = read()
        self._at = time.monotonic()
        self.rate = 0.0

    def report(self) -> dict[str, float]:
        jobs, busy_s = self._read()
        now = time.monotonic()
        d_jobs, d_busy, d_wall = jobs - self._jobs, busy_s - self._busy_s, now - self._at
        self._jobs, self._busy_s, self._at = jobs, busy_s, now
        if d_jobs > 0 and d_busy > 0:
            rate = d_jobs / d_busy
            self.rate = rate if self.rate == 0 else 0.5 * self.rate + 0.5 * rate
        return {
            "throughput": d_jobs / d_wall if d_wall > 0 else 0.0,
            "service_rate": self.rate,
            "utilization": min(1.0, d_busy / d_wall) if d_wall > 0 else 0.0,
            **self._size,
        }
