"""`sluice exporter`: the queues' side for Prometheus, read from Redis on each scrape.

Replicas export what they do (metrics.py); when none runs, nobody says what waits for them.
This exporter reads every registered model (`SMEMBERS sluice:models`, or the models named with
`--model`) from Redis on each scrape, one pipelined round trip a model (one more while jobs wait
undelivered: the oldest one's age), so a queue that fills at zero replicas shows. The read-only
`sluice-scaler` user of docs/security.md is all it needs.

Metrics (`lane` is `high`, `normal` or `low`):

- `sluice_queue_waiting{model,lane}` gauge: entries not yet delivered to any replica (the
  group's lag; before any replica created the group, every entry).
- `sluice_queue_pending{model,lane}` gauge: delivered to a replica, not yet acked (running, or
  left by a dead replica until reclaimed).
- `sluice_queue_length{model,lane}` gauge: XLEN, acked entries not yet trimmed included.
- `sluice_queue_oldest_job_age_seconds{model}` gauge: age of the oldest job waiting or pending;
  0 when none.
- `sluice_queue_consumers{model}` gauge: consumers of the normal lane's group seen in the last
  10 s (XINFO CONSUMERS idle < 10 s): the live replicas. Redis 7.0 counts a consumer's idle time
  from the last entry delivered to it (7.2+: from its last read), so on 7.0 a replica idle on an
  empty queue drops out of this count after 10 s, and one that never got an entry is not listed.
- `sluice_jobs_submitted_total{model}` counter: entries ever added, over all lanes (the groups'
  entries-read + lag; XLEN for a lane no replica read yet).
- `sluice_dead_letters{model}` gauge: entries on `sluice:{M}:dead`.
- `sluice_rejections_total{model}` counter: submits that admission refused because the queue
  was full (`sluice_submit` counts them in `sluice:{M}:stats`, field `rejected`).
- `sluice_model_registered{model}` gauge: 1 while the model's registration `sluice:{M}:info`
  exists (admission accepts its submits), else 0.
- `sluice_exporter_redis_errors_total` counter: Redis errors met while scraping. A scrape that
  meets one still answers, with every model it could read.
- `sluice_exporter_scrape_duration_seconds` gauge: how long this scrape's reads took.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from sluice.backlog import BACKLOG_READS, Backlog, queue_backlog_reads, read_backlog
from sluice.connection import SyncRedis, connect_sync
from sluice.errors import Unavailable
from sluice.protocol import (
    GROUP,
    MODELS_KEY,
    PRIORITIES,
    TENANTS_KEY,
    dead_key,
    info_key,
    jobs_key,
    stats_key,
    tenant_names,
    tenant_stats_key,
)
from sluice.settings import MODEL_NAME_RE, Settings

log = logging.getLogger(__name__)

DEFAULT_PORT = 9108
#: A consumer that read less than this long ago is a live replica.
LIVE_IDLE_MS = 10_000

Connect = Callable[[], SyncRedis]


@dataclass(frozen=True, slots=True)
class ModelReading:
    """What one scrape read of one model."""

    model: str
    backlog: Backlog
    consumers: int  # live ones, on the normal lane
    dead_letters: int
    rejections: int
    registered: bool


def _absent(reply: Any) -> bool:
    """A reply that says a lane or its group does not exist yet: nothing queued, not an error."""
    text = str(reply)
    return isinstance(reply, ResponseError) and text.startswith(("no such key", "NOGROUP"))


def read_model(client: SyncRedis, model: str, live_idle_ms: int = LIVE_IDLE_MS) -> ModelReading:
    """Reads one model: one round trip, two while jobs wait undelivered (`read_backlog`)."""
    with client.pipeline(transaction=False) as pipe:
        queue_backlog_reads(pipe, model)
        pipe.xinfo_consumers(jobs_key(model), GROUP)
        pipe.xlen(dead_key(model))
        pipe.hget(stats_key(model), "rejected")
        pipe.exists(info_key(model))
        replies: list[Any] = pipe.execute(raise_on_error=False)
    for reply in replies:
        if isinstance(reply, Exception) and not _absent(reply):
            raise reply  # e.g. NOPERM or WRONGTYPE: this model's figures would be wrong
    consumers, dead, rejected, registered = replies[BACKLOG_READS:]
    live = 0 if _absent(consumers) else sum(int(c["idle"]) < live_idle_ms for c in consumers)
    return ModelReading(
        model=model,
        backlog=read_backlog(client, model, replies[:BACKLOG_READS]),
        consumers=live,
        dead_letters=int(dead),
        rejections=int(rejected or 0) + _tenant_rejections(client, model),
        registered=bool(registered),
    )


def _tenant_rejections(client: SyncRedis, model: str) -> int:
    """The tenants' refused submits: each tenant counts its own (`sluice:{M}:stats:<t>`), as
    it may not write the model's shared counters."""
    names: Any = client.smembers(TENANTS_KEY)
    tenants = tenant_names(names)
    if not tenants:
        return 0
    with client.pipeline(transaction=False) as pipe:
        for tenant in tenants:
            pipe.hget(tenant_stats_key(model, tenant), "rejected")
        counts = pipe.execute(raise_on_error=False)
    # Floored at 0: a tenant may write its own counter, and must not hide another's.
    return sum(max(0, int(c)) for c in counts if c is not None and not isinstance(c, Exception))


class QueueCollector:
    """A prometheus-client collector: reads Redis on each `collect` (each scrape).

    Scrapes may run at once (the HTTP server answers each on a thread of its own): they share
    the client, which is thread-safe, and the error count, under a lock."""

    def __init__(
        self, connect: Connect, models: Sequence[str] = (), live_idle_ms: int = LIVE_IDLE_MS
    ) -> None:
        self.models = tuple(models)
        self.live_idle_ms = live_idle_ms
        self._connect = connect
        self._client: SyncRedis | None = None
        self._lock = threading.Lock()
        self._errors = 0
        self._failing = False

    def describe(self) -> list[Metric]:
        """The metric names, without reading Redis (the registry checks them for clashes)."""
        return [*_families([]), *self._own(0.0)]

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        readings = self.read()
        yield from _families(readings)
        yield from self._own(time.perf_counter() - started)

    def read(self) -> list[ModelReading]:
        """Every model it can read now. A Redis error is counted and skips only what it
        broke: one model, or, when Redis cannot be reached, the rest of the scrape."""
        readings: list[ModelReading] = []
        clean = True
        try:
            client = self._client = self._client or self._connect()
            models = self.models or _registered(client)
            for model in models:
                try:
                    readings.append(read_model(client, model, self.live_idle_ms))
                except (RedisConnectionError, RedisTimeoutError):
                    raise  # the next model would wait for the same dead server
                except RedisError as exc:
                    clean = self._count(exc, model)
        except (RedisError, RedisClusterException) as exc:
            clean = self._count(exc, "redis")
        if clean and self._failing:
            log.info("reading Redis again")
            self._failing = False
        return readings

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def _count(self, exc: Exception, what: str) -> bool:
        """Counts and logs one error; False, for `clean`."""
        with self._lock:
            self._errors += 1
        # Once per outage at WARNING: Prometheus scrapes every few seconds.
        level = logging.DEBUG if self._failing else logging.WARNING
        log.log(level, "cannot read %s for the metrics: %r", what, exc)
        self._failing = True
        return False

    def _own(self, duration_s: float) -> list[Metric]:
        with self._lock:
            errors = self._errors
        return [
            CounterMetricFamily(
                "sluice_exporter_redis_errors_total",
                "Redis errors met while scraping",
                value=errors,
            ),
            GaugeMetricFamily(
                "sluice_exporter_scrape_duration_seconds",
                "How long this scrape's reads took",
                value=duration_s,
            ),
        ]


def _registered(client: SyncRedis) -> list[str]:
    names: Any = client.smembers(MODELS_KEY)
    # A name that is no model name would address keys outside its model's slot: not ours.
    return sorted(n for n in names if MODEL_NAME_RE.fullmatch(n))


def _families(readings: Sequence[ModelReading]) -> list[Metric]:
    lane, model = ["model", "lane"], ["model"]
    waiting = GaugeMetricFamily(
        "sluice_queue_waiting", "Jobs not yet delivered to any replica", labels=lane
    )
    pending = GaugeMetricFamily(
        "sluice_queue_pending", "Jobs delivered to a replica, not yet acked", labels=lane
    )
    length = GaugeMetricFamily(
        "sluice_queue_length",
        "Entries on the lane (XLEN), acked ones not yet trimmed included",
        labels=lane,
    )
    oldest = GaugeMetricFamily(
        "sluice_queue_oldest_job_age_seconds",
        "Age of the oldest job waiting or pending (0: none)",
        labels=model,
    )
    consumers = GaugeMetricFamily(
        "sluice_queue_consumers",
        "Replicas that read the normal lane in the last 10 s",
        labels=model,
    )
    submitted = CounterMetricFamily(
        "sluice_jobs_submitted_total", "Jobs ever added, over all lanes", labels=model
    )
    dead = GaugeMetricFamily("sluice_dead_letters", "Entries on sluice:{M}:dead", labels=model)
    rejected = CounterMetricFamily(
        "sluice_rejections_total", "Submits refused by admission, queue full", labels=model
    )
    registered = GaugeMetricFamily(
        "sluice_model_registered",
        "1 while the model is registered (admission accepts it)",
        labels=model,
    )
    for r in readings:
        for name, figures in zip(PRIORITIES, r.backlog.lanes, strict=True):
            waiting.add_metric([r.model, name], figures.waiting)
            pending.add_metric([r.model, name], figures.in_flight)
            length.add_metric([r.model, name], figures.length)
        waiting.add_metric([r.model, "inbox"], r.backlog.inbox)
        oldest.add_metric([r.model], r.backlog.oldest_age_s)
        consumers.add_metric([r.model], r.consumers)
        submitted.add_metric([r.model], r.backlog.added)
        dead.add_metric([r.model], r.dead_letters)
        rejected.add_metric([r.model], r.rejections)
        registered.add_metric([r.model], int(r.registered))
    return [waiting, pending, length, oldest, consumers, submitted, dead, rejected, registered]


def redis_connector(url: str, cluster: bool = False) -> Connect:
    """Makes the exporter's client: decoded replies, short timeouts."""
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": 5,
        "socket_connect_timeout": 2,
    }
    if not cluster:
        # No retries: redis-py's default backoff holds a scrape for seconds when Redis is
        # down, past Prometheus' scrape timeout; the next scrape is the retry. (A cluster
        # client keeps its own, which also follow slots that moved.)
        options["retry"] = Retry(NoBackoff(), 0)
    return lambda: connect_sync(url, cluster=cluster, **options)


def serve(
    collector: QueueCollector, port: int = DEFAULT_PORT, address: str = "0.0.0.0"
) -> tuple[WSGIServer, threading.Thread]:
    """Serves `collector` alone on http://address:port/metrics from a daemon thread;
    `server.shutdown()` stops it. Port 0: a free port (`server.server_port`)."""
    registry = CollectorRegistry()
    registry.register(collector)
    return start_http_server(port, addr=address, registry=registry)


# ---------------------------------------------------------------------------------------------
# The `sluice exporter` command


def add_command(sub: Any) -> None:
    """Adds `sluice exporter` to the CLI's subcommands."""
    p = sub.add_parser(
        "exporter",
        help="serve Prometheus metrics of the queues, read from Redis",
        description="Serves /metrics: each model's queue as Redis holds it (waiting, pending, "
        "oldest job's age, live replicas, submitted, dead letters, rejections), read on each "
        "scrape, so it shows at zero replicas too. The read-only sluice-scaler Redis user "
        "suffices (docs/security.md); the metrics are listed in sluice/exporter.py.",
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"HTTP port ({DEFAULT_PORT})")
    p.add_argument("--address", default="0.0.0.0", help="address to listen on (0.0.0.0: all)")
    p.add_argument(
        "--redis-url",
        help="default: SLUICE_REDIS_URL or redis://127.0.0.1:6379/0 (a Redis Cluster with "
        "SLUICE_REDIS_CLUSTER=true)",
    )
    p.add_argument(
        "--model",
        action="extend",
        nargs="+",
        dest="models",
        type=_model_name,
        metavar="M",
        help="only these models (default: every registered model, from sluice:models)",
    )
    p.set_defaults(func=run)


def _model_name(text: str) -> str:
    if not MODEL_NAME_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"not a model name ({MODEL_NAME_RE.pattern}): {text!r}")
    return text


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Serves until SIGTERM or Ctrl-C."""
    url = args.redis_url or settings.redis_url
    collector = QueueCollector(redis_connector(url, settings.redis_cluster), args.models or ())
    try:
        server, _ = serve(collector, args.port, args.address)
    except OSError as exc:
        raise Unavailable(f"cannot listen on {args.address}:{args.port}: {exc}") from exc
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    where = urlsplit(url)  # never the password into a log
    log.info(
        "serving http://%s:%d/metrics, reading Redis at %s:%s, models: %s",
        args.address,
        server.server_port,
        where.hostname,
        where.port or 6379,
        ", ".join(collector.models) or "every registered",
    )
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
        collector.close()
    return 0
