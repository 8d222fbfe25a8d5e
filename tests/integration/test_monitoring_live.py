"""The proof of monitoring/: a real Prometheus, on the shipped config (targets pointed at this
session's Ray node and a `sluice exporter`), scrapes a real replica under load; then every
query of every dashboard panel returns data, and every alerting and recording rule loads and
evaluates. (promtool's config, rules and unit tests run in tests/unit/test_monitoring_files.py.)
"""

from __future__ import annotations

import threading
from urllib.parse import urlparse

import pytest

from sluice.exporter import QueueCollector, redis_connector, serve
from tests.helpers import xadd_jobs
from tests.prometheus import load_dashboard, panel_queries, running

pytestmark = pytest.mark.integration


def test_every_panel_returns_data_from_a_real_run(
    r, deploy, tiny_bert, model_name, scaler_url, ray_metrics_url, tmp_path
):
    deploy(model_name, tiny_bert, max_batch_size=16)
    exporter, thread = serve(
        QueueCollector(redis_connector(scaler_url), [model_name]), 0, "127.0.0.1"
    )
    ray_target = urlparse(ray_metrics_url).netloc
    targets = {"ray": [ray_target], "sluice-exporter": [f"127.0.0.1:{exporter.server_port}"]}
    stop = threading.Event()

    def load() -> None:
        # Steady load, a bad job among them, until the queries are done: rates need a window
        # of samples, and live consumers are those that read in the last 10 s.
        k = 0
        while not stop.wait(0.2):
            xadd_jobs(r, model_name, [f"load {k} {i}" for i in range(20)], prefix=f"l{k}")
            r.xadd(f"sluice:{{{model_name}}}:jobs", {"id": f"bad{k}", "input": "not json"})
            k += 1

    feeder = threading.Thread(target=load, daemon=True)
    feeder.start()
    try:
        with running(targets, tmp_path, scrape_interval="1s") as prometheus:
            prometheus.wait_for(f'sluice_jobs_finished_total{{model="{model_name}"}}', 90)
            up = prometheus.targets_up()  # scrape URL -> healthy
            assert len(up) == 2 and all(up.values()), up
            empty = []
            for query in panel_queries(load_dashboard(), model_name, rate_interval="30s"):
                try:  # a series with a finite value
                    prometheus.wait_for(query.expr, timeout_s=60)
                except AssertionError:
                    empty.append(f"{query.title} [{query.ref_id}]: {query.expr}")
            assert not empty, "panels without data:\n" + "\n".join(empty)
            groups = prometheus.rule_groups()
            rules = [rule for group in groups for rule in group["rules"]]
            assert rules and all(rule["health"] == "ok" for rule in rules), rules
    finally:
        stop.set()
        feeder.join()
        exporter.shutdown()
        thread.join(timeout=5)
