"""`sluice exporter` against a real redis-server: every metric of a model arranged key by key,
refused submits counted by the submit function itself, and a Redis that is down, comes up and
goes away again while the exporter keeps answering. Scraped over HTTP, as Prometheus does."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from sluice import admission
from sluice.exporter import QueueCollector, redis_connector, serve
from sluice.protocol import (
    GROUP,
    MODELS_KEY,
    dead_key,
    encode_job_fields,
    info_key,
    jobs_key,
    stats_key,
)
from sluice.queue import StreamQueue, connect
from sluice.settings import QueueSettings
from sluice.stack import RedisServer, free_port
from tests.acl_docs import SCALER
from tests.conftest import PASSWORDS
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

LANES = ("high", "normal", "low")
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@contextmanager
def exporter(url: str, models: Sequence[str] = (), **options: Any) -> Iterator[str]:
    """The exporter's HTTP server on a free port, in this process; yields its /metrics URL."""
    collector = QueueCollector(redis_connector(url), models, **options)
    server, thread = serve(collector, port=0, address="127.0.0.1")
    try:
        yield f"http://127.0.0.1:{server.server_port}/metrics"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        collector.close()


def scrape(url: str) -> Samples:
    """Every sample of one scrape: (name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.status == 200
        body = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def of_model(samples: Samples, model: str) -> dict[str, float]:
    """One model's samples, named `metric` or `metric/lane`."""
    out = {}
    for (name, labels), value in samples.items():
        tags = dict(labels)
        if tags.get("model") == model:
            out[f"{name}/{tags['lane']}" if "lane" in tags else name] = value
    return out


def expected(**figures: Any) -> dict[str, float]:
    """A model's samples: `waiting`, `pending`, `length` as per-lane dicts, the rest as is."""
    out = {}
    for metric in ("waiting", "pending", "length"):
        for lane in LANES:
            out[f"sluice_queue_{metric}/{lane}"] = figures[metric].get(lane, 0)
    out["sluice_queue_waiting/inbox"] = figures["waiting"].get("inbox", 0)  # tenants' inboxes
    out.update(
        {
            "sluice_queue_consumers": figures.get("consumers", 0),
            "sluice_jobs_submitted_total": figures.get("submitted", 0),
            "sluice_dead_letters": figures.get("dead", 0),
            "sluice_rejections_total": figures.get("rejected", 0),
            "sluice_model_registered": figures.get("registered", 1),
        }
    )
    return out


def register(admin_url: str, model: str, max_queue_depth: int) -> None:
    """Registers the model as a replica does (its info hash, sluice:models, the library)."""

    async def run() -> None:
        client = connect(admin_url)
        queue = StreamQueue(client, model, "c0", QueueSettings(max_queue_depth=max_queue_depth))
        await queue.register({"task": "embed", "model_path": "none", "registered_ms": 1})
        await client.aclose()

    asyncio.run(run())


def submit(url: str, model: str, ids: Sequence[str]) -> list[str]:
    """Admitted submits through `admission.submit`; each job's status."""

    async def run() -> list[str]:
        client = connect(url)
        jobs = [(i, encode_job_fields(i, {"text": i})) for i in ids]
        admitted = await admission.submit(client, model, jobs)
        await client.aclose()
        return [a.status for a in admitted]

    return asyncio.run(run())


def test_every_metric_of_a_model_as_the_read_only_user(
    r, redis_url, scaler_url, producer_url, model_name
):
    r.acl_log_reset()
    register(redis_url, model_name, max_queue_depth=7)
    normal, high, low = (jobs_key(model_name, p) for p in ("normal", "high", "low"))
    base_ms = int(time.time() * 1000)
    # Entries with ids of our choosing (a few seconds old): the oldest job's age is then known.
    r.xgroup_create(normal, GROUP, id="0", mkstream=True)
    r.xgroup_create(high, GROUP, id="0", mkstream=True)
    for i in range(5):
        r.xadd(normal, {"id": f"n{i}", "input": "{}"}, id=f"{base_ms - 5000 + 1000 * i}-0")
    first_id = r.xreadgroup(GROUP, "c1", {normal: ">"}, count=2)[0][1][0][0]
    r.xreadgroup(GROUP, "c2", {normal: ">"}, count=1)
    r.xack(normal, GROUP, first_id)  # acked, not trimmed: the oldest job now is n1
    r.xadd(high, {"id": "h0", "input": "{}"}, id=f"{base_ms - 2000}-0")
    for i in range(2):  # no group on the low lane: no replica ever read it
        r.xadd(low, {"id": f"l{i}", "input": "{}"}, id=f"{base_ms - 1000 + i}-0")
    for i in range(2):
        r.xadd(dead_key(model_name), {"id": f"d{i}", "reason": "model_failure"})
    # 7 jobs not yet acked (2 waiting + 2 pending normal, 1 high, 2 low): the queue is full.
    assert submit(producer_url, model_name, ["refused"]) == ["rejected"]

    with exporter(scaler_url) as url:
        before = time.time()
        samples = scrape(url)
        after = time.time()
    mine = of_model(samples, model_name)
    age = mine.pop("sluice_queue_oldest_job_age_seconds")
    oldest_s = (base_ms - 4000) / 1000  # n1, delivered to c1 and pending
    assert before - oldest_s - 0.002 <= age <= after - oldest_s + 0.002
    assert mine == expected(
        waiting={"normal": 2, "high": 1, "low": 2},
        pending={"normal": 2},
        length={"normal": 5, "high": 1, "low": 2},
        consumers=2,
        submitted=5 + 1 + 2,
        dead=2,
        rejected=1,
    )
    assert samples[("sluice_exporter_redis_errors_total", ())] == 0
    assert 0 < samples[("sluice_exporter_scrape_duration_seconds", ())] < 5
    # The scaler's rights of docs/security.md were enough: Redis refused it nothing.
    assert not [e for e in r.acl_log() if e["username"] == SCALER]

    # Replicas that stop reading drop out of the live count (here after 0.2 s, not 10 s).
    with exporter(scaler_url, live_idle_ms=200) as url:
        wait_for(
            lambda: of_model(scrape(url), model_name)["sluice_queue_consumers"] == 0,
            5,
            what="c1 and c2 no longer live",
        )


def test_models_named_are_read_registered_or_not(r, scaler_url, model_name):
    unregistered = f"{model_name}-none"
    r.xadd(jobs_key(unregistered), {"id": "j", "input": "{}"})
    with exporter(scaler_url, [unregistered]) as url:
        samples = scrape(url)
    assert of_model(samples, unregistered) == {
        **expected(
            waiting={"normal": 1}, pending={}, length={"normal": 1}, submitted=1, registered=0
        ),
        "sluice_queue_oldest_job_age_seconds": pytest.approx(0, abs=5),
    }
    assert {dict(labels).get("model") for _, labels in samples} <= {unregistered, None}
    # Read from sluice:models instead, a model nobody registered is not listed.
    with exporter(scaler_url) as url:
        assert not of_model(scrape(url), unregistered)


def test_refused_submits_are_counted_by_the_submit_function(
    r, redis_url, scaler_url, producer_url, model_name
):
    register(redis_url, model_name, max_queue_depth=2)
    with exporter(scaler_url, [model_name]) as url:
        assert of_model(scrape(url), model_name)["sluice_rejections_total"] == 0
        statuses = submit(producer_url, model_name, [f"j{i}" for i in range(5)])
        assert statuses == ["queued"] * 2 + ["rejected"] * 3
        # A refused id submitted again is refused, and counted, again; a duplicate is not.
        assert submit(producer_url, model_name, ["j4", "j0"]) == ["rejected", "duplicate"]
        assert r.hget(stats_key(model_name), "rejected") == b"4"
        # A caller that passes library v1's seven keys (no stats key) is refused uncounted.
        keys = admission.submit_keys(model_name, "normal", "old")[:7]
        reply = r.fcall("sluice_submit", len(keys), *keys, "id", "old", "input", "{}")
        assert reply[0] == b"rejected"
        mine = of_model(scrape(url), model_name)
    assert mine["sluice_rejections_total"] == 4
    assert mine["sluice_jobs_submitted_total"] == 2
    assert mine["sluice_queue_waiting/normal"] == 2


def test_the_exporter_answers_while_redis_is_down_and_recovers(model_name):
    port = free_port()
    server = RedisServer(port=port)
    url = server.url
    try:
        with exporter(url, [model_name, f"{model_name}-2"]) as metrics:
            # Down: each scrape answers, with the exporter's own metrics and one error more
            # (the second model is not tried against a server that does not answer).
            for errors in (1, 2):
                samples = scrape(metrics)
                assert samples[("sluice_exporter_redis_errors_total", ())] == errors
                assert not [key for key in samples if dict(key[1]).get("model")]
            server.start()
            admin = redis.Redis.from_url(url)
            admin.hset(info_key(model_name), "task", "embed")
            admin.sadd(MODELS_KEY, model_name)
            admin.xadd(jobs_key(model_name), {"id": "j", "input": "{}"})
            up = of_model(scrape(metrics), model_name)
            assert up["sluice_model_registered"] == 1 and up["sluice_queue_waiting/normal"] == 1
            # Down again, under a client that was connected: counted, still answering.
            admin.close()
            server.stop()
            samples = scrape(metrics)
            assert samples[("sluice_exporter_redis_errors_total", ())] == 3
            assert not of_model(samples, model_name)
    finally:
        server.cleanup()


def test_sluice_exporter_command(r, scaler_url, model_name):
    r.hset(info_key(model_name), "task", "embed")
    r.xadd(jobs_key(model_name, "high"), {"id": "j", "input": "{}"})
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "sluice.cli",
        "exporter",
        "--port",
        str(port),
        "--address",
        "127.0.0.1",
        "--redis-url",
        scaler_url,
        "--model",
        model_name,
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:

        def answered() -> Samples | None:
            try:
                return scrape(f"http://127.0.0.1:{port}/metrics")
            except OSError:
                assert proc.poll() is None, proc.communicate()[0]
                return None

        samples = wait_for(answered, 30, 0.1, "sluice exporter to answer")
        mine = of_model(samples, model_name)
        assert mine["sluice_model_registered"] == 1
        assert mine["sluice_queue_waiting/high"] == 1
        assert {dict(labels).get("model") for _, labels in samples} == {model_name, None}
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=10)[0]
    assert proc.returncode == 0, output
    assert "serving http://127.0.0.1" in output
    assert PASSWORDS[SCALER] not in output  # the URL is logged without its password


def test_a_model_whose_keys_are_broken_hides_no_other(r, scaler_url, model_name):
    broken = f"{model_name}-broken"
    r.set(dead_key(broken), "not a stream")  # XLEN answers WRONGTYPE
    r.xadd(jobs_key(model_name), {"id": "j", "input": "{}"})
    with exporter(scaler_url, [broken, model_name]) as url:
        samples = scrape(url)
    assert samples[("sluice_exporter_redis_errors_total", ())] == 1
    assert not of_model(samples, broken)
    assert of_model(samples, model_name)["sluice_queue_waiting/normal"] == 1
