"""monitoring/ checked the way Prometheus and Grafana will read it, with no Redis and no Ray.

- promtool accepts prometheus.yml and alerts.yml, and alerts_test.yml's unit tests of every
  alert (firing, and not firing) pass.
- The Grafana dashboard is well formed (unique ids, a grid position, a datasource and a PromQL
  target on every panel, the `model` variable), every expression parses, and every metric and
  label it or the alerts use belongs to the metric contract (tests/metric_contract.py): a typo
  fails here, not on a blank panel in production.
- A real Prometheus, run on the shipped config with its targets pointed at two stand-in
  endpoints that serve the contract's metrics the way Ray and `sluice exporter` format them,
  renames Ray's `ray_sluice_*` series, drops the otel_scope labels, loads the rules, and answers
  every panel's query with data for one CPU replica (GPU panels through their fallback).
- docs/metrics.md names every metric and every alert.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import wait_for
from tests.metric_contract import METRICS, PROMETHEUS_SERIES, SERIES, Metric
from tests.prometheus import (
    ALERTS,
    ALERTS_TEST,
    DASHBOARD,
    MONITORING,
    PROMETHEUS_CONFIG,
    ROOT,
    PrometheusServer,
    annotation_queries,
    grouping_labels,
    load_dashboard,
    metric_names,
    metric_selectors,
    panel_queries,
    panels_of,
    running,
    substitute,
    with_targets,
)

DOC = ROOT / "docs" / "metrics.md"
PROVISIONING = MONITORING / "grafana" / "provisioning"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
GRAFANA_SCHEMA_VERSION = 39  # Grafana 11.0 writes this; docs/metrics.md says so
MODEL = "minilm"
Json = dict[str, Any]


def promtool(*args: str) -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("no `promtool`: `make system-deps` installs Debian's prometheus package")
    done = subprocess.run(
        [binary, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def load_yaml(path: Path) -> Json:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} is not a YAML mapping"
    return data


@pytest.fixture(scope="module")
def dashboard() -> Json:
    return load_dashboard()


def alert_rules() -> list[Json]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


# --- promtool ---------------------------------------------------------------------------------


def test_promtool_accepts_the_prometheus_config() -> None:
    # Checks the rule files it names, too.
    assert "SUCCESS" in promtool("check", "config", str(PROMETHEUS_CONFIG.relative_to(ROOT)))


def test_promtool_accepts_the_rules() -> None:
    assert "SUCCESS" in promtool("check", "rules", str(ALERTS.relative_to(ROOT)))


def test_the_alert_unit_tests_pass() -> None:
    assert "SUCCESS" in promtool("test", "rules", str(ALERTS_TEST.relative_to(ROOT)))


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    tests = load_yaml(ALERTS_TEST)["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    alerts = {rule["alert"] for rule in alert_rules() if "alert" in rule}
    fired = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert alerts == fired, f"alerts never tested firing: {alerts - fired}"
    assert alerts == quiet, f"alerts never tested not firing: {alerts - quiet}"


def test_the_ray_job_renames_and_drops_what_the_contract_says() -> None:
    jobs = {job["job_name"]: job for job in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]}
    assert set(jobs) == {"sluice-exporter", "ray"}
    # The live test rewrites targets in a copy: one static target list per job.
    for job in jobs.values():
        assert len(job["static_configs"]) == 1 and job["static_configs"][0]["targets"]
    relabels = jobs["ray"]["metric_relabel_configs"]
    assert {"action": "labeldrop", "regex": "otel_scope_.*"} in relabels
    assert not any("WorkerId" in json.dumps(r) for r in relabels), "WorkerId must be kept"


# --- The dashboard's shape --------------------------------------------------------------------


def test_the_dashboard_is_for_grafana_11(dashboard: Json) -> None:
    assert dashboard["schemaVersion"] == GRAFANA_SCHEMA_VERSION
    assert dashboard["uid"] == "sluice"
    assert str(GRAFANA_SCHEMA_VERSION) in DOC.read_text(), "docs/metrics.md: schema version"


def test_panel_ids_are_unique(dashboard: Json) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    ids += [p["id"] for row in dashboard["panels"] for p in row.get("panels", [])]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"


def test_every_panel_has_a_place_on_the_grid(dashboard: Json) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in "hwxy"), panel["title"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                other = cells.setdefault((x, y), panel["title"])
                assert other == panel["title"], f"{panel['title']!r} overlaps {other!r}"


def test_every_panel_queries_prometheus_through_the_variable(dashboard: Json) -> None:
    panels = list(panels_of(dashboard))
    assert len(panels) >= 15
    for panel in panels:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        targets = panel["targets"]
        assert targets, f"{panel['title']!r} has no target"
        for target in targets:
            assert target["expr"].strip(), f"{panel['title']!r} {target['refId']}: no expr"
            assert target["datasource"] == DATASOURCE, panel["title"]
            # Several models selected become `(a|b)`: only a regex matcher takes that.
            expr = target["expr"]
            assert expr.count("$model") == expr.count('=~"$model"'), panel["title"]
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), f"{panel['title']!r}: duplicate refIds"


def variables(dashboard: Json) -> dict[str, Json]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def variable_query(variable: Json) -> str:
    query = variable["query"]
    return str(query["query"] if isinstance(query, dict) else query)


def label_values_selector(dashboard: Json) -> str:
    """The series selector of the `model` variable's `label_values(selector, model)`."""
    match = re.fullmatch(
        r"label_values\((.+),\s*model\)", variable_query(variables(dashboard)["model"])
    )
    assert match, "the model variable is no label_values(..., model) query"
    return match.group(1)


def test_the_variables_pick_a_datasource_and_models(dashboard: Json) -> None:
    found = variables(dashboard)
    assert found["datasource"]["type"] == "datasource"
    assert found["datasource"]["query"] == "prometheus"
    model = found["model"]
    assert model["type"] == "query" and model["datasource"] == DATASOURCE
    assert variable_query(model) == "label_values(sluice_model_registered, model)"
    assert model["multi"] is True and model["includeAll"] is True


def test_the_panels_cover_what_the_issue_asks(dashboard: Json) -> None:
    exprs = " ".join(q.expr for q in panel_queries(dashboard, MODEL))
    for needed in [
        'sluice_jobs_finished_total{model=~"minilm"}',  # throughput by status
        "histogram_quantile(0.99, sum by (model, le) (rate(sluice_job_latency_seconds_bucket",
        "histogram_quantile(0.5, sum by (model, le) (rate(sluice_compute_seconds_bucket",
        "sluice_queue_waiting",
        "sluice_queue_pending",
        "sluice_queue_oldest_job_age_seconds",
        "histogram_quantile(0.9, sum by (model, le) (rate(sluice_batch_size_bucket",
        'status!="ok"',  # errors and dead letters by code
        "sluice_dead_letters",
        "sluice_queue_consumers",
        "count by (model) (sluice_replica_info",
        "ray_serve_autoscaling_desired_replicas",
        "sluice_rejections_total",
        "sluice_gpu_memory_used_bytes",
        "sluice_gpu_utilization_ratio",
    ]:
        assert needed in exprs, f"no panel queries {needed}"


# --- Expressions: they parse, and they use the contract ---------------------------------------


def test_every_dashboard_expression_parses(dashboard: Json, tmp_path: Path) -> None:
    # promtool has no parse-only command: one recording rule per expression does it.
    exprs = [q.expr for q in panel_queries(dashboard, MODEL)]
    exprs += annotation_queries(dashboard, MODEL)
    exprs.append(label_values_selector(dashboard))
    rules = [{"record": f"dashboard:expr_{i}", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert f"SUCCESS: {len(rules)} rules found" in promtool("check", "rules", str(path))


#: Every label a series of the contract can have.
ALL_LABELS = frozenset().union(*(m.allowed_labels(s) for s, m in SERIES.items()))


def check_selectors(expr: str, where: str, recorded: frozenset[str] = frozenset()) -> None:
    """Fails unless every metric `expr` selects is in the contract (or recorded by a rule, or
    Prometheus' own), matched only on labels it has, and grouped only by labels that exist."""
    for name, labels in metric_selectors(expr):
        if name in recorded or name in PROMETHEUS_SERIES:
            continue
        assert name in SERIES, f"{where}: {name!r} is not in the metric contract"
        unknown = labels - SERIES[name].allowed_labels(name)
        assert not unknown, f"{where}: {name} has no label {sorted(unknown)}"
    unknown_groups = grouping_labels(expr) - ALL_LABELS
    assert not unknown_groups, f"{where}: no metric has label(s) {sorted(unknown_groups)}"


def test_the_dashboard_uses_only_contract_metrics_and_labels(dashboard: Json) -> None:
    for query in panel_queries(dashboard, MODEL):
        check_selectors(query.expr, f"panel {query.title!r} {query.ref_id}")
    for expr in annotation_queries(dashboard, MODEL):
        check_selectors(expr, "annotation")
    check_selectors(label_values_selector(dashboard), "the model variable")


def test_the_rules_use_only_contract_metrics_and_labels() -> None:
    rules = alert_rules()
    recorded = frozenset(rule["record"] for rule in rules if "record" in rule)
    for rule in rules:
        check_selectors(rule["expr"], rule.get("alert") or rule["record"], recorded)


def test_every_contract_metric_is_on_the_dashboard(dashboard: Json) -> None:
    used = {name for q in panel_queries(dashboard, MODEL) for name in metric_names(q.expr)}
    used |= metric_names(label_values_selector(dashboard))
    shown = {SERIES[name].name for name in used if name in SERIES}
    assert set(METRICS) - shown == set()


def test_a_typo_would_be_caught() -> None:
    with pytest.raises(AssertionError, match="not in the metric contract"):
        check_selectors('rate(sluice_job_finished_total{model="m"}[1m])', "typo")
    with pytest.raises(AssertionError, match="has no label"):
        check_selectors('sluice_queue_waiting{modle="m"}', "typo")
    with pytest.raises(AssertionError, match="no metric has label"):
        check_selectors("sum by (modle) (sluice_queue_waiting)", "typo")


# --- The extraction helpers (tests/prometheus.py) ---------------------------------------------


def test_substitute_fills_grafana_variables_for_one_model() -> None:
    expr = 'x{model=~"$model", a="${model}", b="${model:regex}", c="[[model]]"}[$__rate_interval]'
    assert substitute(expr, "m1", "20s") == 'x{model=~"m1", a="m1", b="m1", c="m1"}[20s]'
    # label_replace's back-references are not Grafana variables.
    assert substitute('label_replace(x, "a", "$1", "b", "(.*)")', "m") == (
        'label_replace(x, "a", "$1", "b", "(.*)")'
    )
    with pytest.raises(ValueError, match="unknown Grafana variable"):
        substitute('x{node=~"$node"}', "m")


def test_panel_queries_reads_every_target_of_every_panel_rows_included() -> None:
    dashboard = {
        "panels": [
            {"type": "row", "id": 1, "title": "open row", "panels": []},
            {
                "type": "timeseries",
                "id": 2,
                "title": "two",
                "targets": [
                    {"refId": "A", "expr": 'a{model=~"$model"}'},
                    {"refId": "B", "expr": "rate(b[$__rate_interval])"},
                ],
            },
            {
                "type": "row",
                "id": 3,
                "title": "collapsed",
                "collapsed": True,
                "panels": [
                    {
                        "type": "stat",
                        "id": 4,
                        "title": "inside",
                        "targets": [{"refId": "A", "expr": 'c{model="$model"}'}],
                    },
                ],
            },
            {"type": "text", "id": 5, "title": "no query", "targets": [{"refId": "A"}]},
        ]
    }
    queries = panel_queries(dashboard, "m", "1m")
    assert [(q.panel_id, q.ref_id, q.expr) for q in queries] == [
        (2, "A", 'a{model=~"m"}'),
        (2, "B", "rate(b[1m])"),
        (4, "A", 'c{model="m"}'),
    ]


def test_the_shipped_dashboard_substitutes_completely(dashboard: Json) -> None:
    queries = panel_queries(dashboard, "some-model")
    assert len(queries) >= 25
    for query in queries:
        assert not re.search(r"\$(?!\d)", query.expr), query
    assert sum('"some-model"' in q.expr for q in queries) >= len(queries) - 2  # exporter panel


def test_metric_selectors_finds_names_and_matched_labels() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (model, le) (rate(a_bucket{model=~"x", le!="1"}[5m])))'
        " / on (model) group_left sum without (lane) (b offset 15s) > bool 1e3"
        ' or label_replace(c:rec:rate5m, "m", "$1", "up", "(.*)") and on() vector(0)'
        ' unless sum_over_time((d - d offset 1m)[10m:15s]) or up{job="e"} == inf'
    )
    assert metric_selectors(expr) == [
        ("a_bucket", frozenset({"model", "le"})),
        ("b", frozenset()),
        ("c:rec:rate5m", frozenset()),
        ("d", frozenset()),
        ("d", frozenset()),
        ("up", frozenset({"job"})),
    ]
    assert grouping_labels(expr) == {"model", "le", "lane"}


def test_with_targets_rewrites_only_the_named_jobs() -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    changed = with_targets(config, {"ray": ["10.0.0.1:9109", "10.0.0.2:9109"]})
    jobs = {j["job_name"]: j for j in changed["scrape_configs"]}
    assert jobs["ray"]["static_configs"] == [{"targets": ["10.0.0.1:9109", "10.0.0.2:9109"]}]
    assert jobs["ray"]["metric_relabel_configs"]  # the rest of the job stays
    assert jobs["sluice-exporter"]["static_configs"] == [{"targets": ["localhost:9108"]}]
    assert config == load_yaml(PROMETHEUS_CONFIG), "the original must not change"
    with pytest.raises(ValueError, match="no scrape job"):
        with_targets(config, {"rey": ["x:1"]})


# --- Grafana provisioning ---------------------------------------------------------------------


def test_grafana_provisioning_points_at_the_dashboard_and_the_datasource() -> None:
    datasources = load_yaml(PROVISIONING / "datasources" / "prometheus.yml")["datasources"]
    assert [(d["type"], d["uid"]) for d in datasources] == [("prometheus", "prometheus")]
    assert variables(load_dashboard())["datasource"]["current"]["value"] == "prometheus"
    providers = load_yaml(PROVISIONING / "dashboards" / "sluice.yml")["providers"]
    assert [p["type"] for p in providers] == ["file"]
    assert providers[0]["options"]["path"].endswith("/dashboards")
    assert sorted(p.name for p in DASHBOARD.parent.glob("*.json")) == ["sluice.json"]


# --- docs/metrics.md --------------------------------------------------------------------------


def test_the_docs_name_every_metric_and_alert() -> None:
    text = DOC.read_text()
    missing = [name for name in METRICS if f"`{name}" not in text]
    assert not missing, f"docs/metrics.md does not describe {missing}"
    alerts = [rule["alert"] for rule in alert_rules() if "alert" in rule]
    assert not [a for a in alerts if f"`{a}`" not in text], "docs/metrics.md: an alert is missing"


# --- A real Prometheus on stand-in endpoints --------------------------------------------------

RAY_COMMON = (
    'Component="core_worker",NodeAddress="127.0.0.1",SessionName="session_t",Version="2.60.0"'
)
OTEL = 'otel_scope_name="ray",otel_scope_schema_url="",otel_scope_version=""'
#: An observation per metric for the stand-in replicas: (value, buckets).
OBSERVED: dict[str, tuple[float, tuple[float, ...]]] = {
    "sluice_job_latency_seconds": (0.2, (0.1, 0.25, 1.0)),
    "sluice_queue_wait_seconds": (0.05, (0.01, 0.1, 1.0)),
    "sluice_batch_wait_seconds": (0.004, (0.001, 0.005, 0.01)),
    "sluice_compute_seconds": (0.1, (0.05, 0.25, 1.0)),
    "sluice_batch_size": (32.0, (16.0, 32.0, 64.0)),
    "sluice_batch_tokens": (900.0, (256.0, 1024.0, 2048.0)),
}
#: The stand-in replicas' other series: (extra labels, value, True for a counter: the value
#: per scrape); none where Ray would export no series yet (nothing reclaimed, no GPU).
SCALARS: dict[str, list[tuple[str, float, bool]]] = {
    "sluice_jobs_finished_total": [('status="ok",code=""', 10, True)],
    "sluice_jobs_pulled_total": [("", 10, True)],
    "sluice_reclaims_total": [],
    "sluice_retries_total": [],
    "sluice_duplicates_total": [],
    "sluice_deleted_while_pending_total": [],
    "sluice_leases_lost_total": [],
    "sluice_write_failures_total": [],
    "sluice_model_load_seconds": [("", 1.9, False)],
    "sluice_replica_info": [('task="embed",dtype="fp32",device="cpu"', 1, False)],
    "sluice_gpu_memory_used_bytes": [],
    "sluice_gpu_utilization_ratio": [],
}


def replica_lines(metric: Metric, worker: str, n: int) -> list[str]:
    """What Ray's export port shows of one replica metric after `n` batches of 10 jobs: a CPU
    replica, so no GPU metric; every job ok."""
    base = f'{RAY_COMMON},WorkerId="{worker}",model="{MODEL}",{OTEL}'
    name = metric.name.replace("sluice_", "ray_sluice_", 1)
    if metric.kind == "histogram":
        value, buckets = OBSERVED[metric.name]
        count = 10 * n
        lines = [
            f'{name}_bucket{{{base},le="{le}"}} {count if value <= le else 0}' for le in buckets
        ]
        lines.append(f'{name}_bucket{{{base},le="+Inf"}} {count}')
        lines.append(f"{name}_sum{{{base}}} {count * value}")
        lines.append(f"{name}_count{{{base}}} {count}")
        return lines
    return [
        f"{name}{{{base}{',' + extra if extra else ''}}} {value * n if counter else value}"
        for extra, value, counter in SCALARS[metric.name]
    ]


def ray_payload(n: int) -> str:
    lines = ['ray_node_cpu_percentage{NodeAddress="127.0.0.1",SessionName="session_t"} 50']
    for metric in METRICS.values():
        if metric.source == "replica":
            for worker in ("w1", "w2"):  # two replicas on one node: their series must not clash
                lines += replica_lines(metric, worker, n)
    return "\n".join(lines) + "\n"


def exporter_payload(n: int) -> str:
    lines = []
    for lane, waiting in (("high", 0), ("normal", 40), ("low", 0)):
        labels = f'lane="{lane}",model="{MODEL}"'
        lines += [
            f"sluice_queue_waiting{{{labels}}} {waiting}",
            f"sluice_queue_pending{{{labels}}} {min(waiting, 20)}",
            f"sluice_queue_length{{{labels}}} {waiting + 100}",
        ]
    model = f'model="{MODEL}"'
    lines += [
        f"sluice_queue_oldest_job_age_seconds{{{model}}} 0.8",
        f"sluice_queue_consumers{{{model}}} 2",
        f"sluice_dead_letters{{{model}}} 0",
        f"sluice_model_registered{{{model}}} 1",
        f"sluice_jobs_submitted_total{{{model}}} {20 * n}",
        f"sluice_rejections_total{{{model}}} 0",
        "sluice_exporter_redis_errors_total 0",
        "sluice_exporter_scrape_duration_seconds 0.002",
    ]
    return "\n".join(lines) + "\n"


@contextmanager
def stand_in(payload: Callable[[int], str]) -> Iterator[str]:
    """An HTTP endpoint (its "host:port") whose body is `payload(n)` on the n-th request."""
    scrapes = itertools.count(1)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with lock:
                body = payload(next(scrapes)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    """One Prometheus for the tests below (it takes ~5 s to start scraping)."""
    if shutil.which("prometheus") is None:
        pytest.fail("no `prometheus`: `make system-deps` installs Debian's prometheus package")
    workdir = tmp_path_factory.mktemp("prometheus")
    with stand_in(ray_payload) as ray, stand_in(exporter_payload) as exporter:
        targets = {"ray": [ray], "sluice-exporter": [exporter]}
        with running(targets, workdir, scrape_interval="1s") as server:
            wait_for(
                lambda: len(server.targets_up()) == 2 and all(server.targets_up().values()),
                timeout_s=30,
                what="both targets up",
            )
            yield server


def test_prometheus_stores_ray_metrics_under_the_contract_names(
    prometheus: PrometheusServer,
) -> None:
    finished = prometheus.wait_for(f'sluice_jobs_finished_total{{model="{MODEL}"}}')
    assert {labels["WorkerId"] for labels, _ in finished} == {"w1", "w2"}
    for labels, _ in finished:
        assert labels["job"] == "ray" and labels["status"] == "ok"
        assert not [k for k in labels if k.startswith("otel_scope")], labels
    assert prometheus.query('{__name__=~"ray_sluice_.*"}') == []
    assert prometheus.query("ray_node_cpu_percentage"), "Ray's own metrics keep their names"
    assert prometheus.label_values("model", "sluice_model_registered") == [MODEL]


def test_every_panel_returns_data_for_one_cpu_replica(
    prometheus: PrometheusServer, dashboard: Json
) -> None:
    # Counters need a few scrapes (1 s apart) for a rate over the 5 s window.
    for query in panel_queries(dashboard, MODEL, rate_interval="5s"):
        result = prometheus.wait_for(query.expr, timeout_s=20)
        assert all(math.isfinite(v) for _, v in result), (query.title, query.ref_id, result)


def test_prometheus_loads_and_evaluates_every_rule(prometheus: PrometheusServer) -> None:
    names = {r.get("alert") or r["record"] for r in alert_rules()}

    def healthy() -> bool:
        rules = [r for g in prometheus.rule_groups() for r in g["rules"]]
        return {r["name"] for r in rules} == names and all(r["health"] == "ok" for r in rules)

    wait_for(healthy, timeout_s=20, what="every rule evaluated without error")
