"""A real Prometheus for tests, and the dashboard's queries as Grafana would send them.

- `PrometheusServer.start(targets, workdir)` runs the `prometheus` binary on a copy of
  monitoring/prometheus.yml (and its alerts.yml) whose scrape targets are replaced per job, on a
  free port, and `query(expr)` asks its HTTP API (`/api/v1/query`).
- `panel_queries(dashboard, model)` lists every panel target's PromQL of
  monitoring/grafana/dashboards/sluice.json with the Grafana variables substituted for one
  model, so that a test can check that each returns data.
- `metric_selectors(expr)` finds the metric names (and matched label names) of an expression,
  so that a test can hold the dashboard and the alerts to the contract (tests/metric_contract.py).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sluice.stack import free_port

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "monitoring"
PROMETHEUS_CONFIG = MONITORING / "prometheus.yml"
ALERTS = MONITORING / "alerts.yml"
ALERTS_TEST = MONITORING / "alerts_test.yml"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "sluice.json"

Json = dict[str, Any]

# --- The dashboard's queries ------------------------------------------------------------------

#: Grafana's variable forms: ${name}, ${name:format}, [[name]], [[name:format]], $name.
_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::\w+)?\]\]|\$(\w+)")


@dataclass(frozen=True, slots=True)
class PanelQuery:
    """One panel target's PromQL, with the dashboard's variables substituted."""

    panel_id: int
    title: str
    ref_id: str
    expr: str


def load_dashboard(path: Path = DASHBOARD) -> Json:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data


def substitute(expr: str, model: str, rate_interval: str = "30s") -> str:
    """`expr` as Grafana would send it for one selected `model`.

    `$__rate_interval` (and `$__interval`, `$__range`) become `rate_interval`: in Grafana it is
    at least 4 scrape intervals (20 s at prometheus.yml's 5 s). `$1`-style back-references of
    `label_replace` are left alone, as Grafana leaves them. Any other variable is an error: the
    dashboard would use one that this function does not know how to fill."""
    values = {
        "model": model,
        "__rate_interval": rate_interval,
        "__interval": rate_interval,
        "__range": rate_interval,
    }

    def fill(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g is not None)
        if name.isdigit():
            return match.group(0)
        if name not in values:
            raise ValueError(f"unknown Grafana variable {match.group(0)!r} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(fill, expr)


def panels_of(dashboard: Json) -> Iterator[Json]:
    """Every panel, those inside collapsed rows included; rows themselves not."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def panel_queries(dashboard: Json, model: str, rate_interval: str = "30s") -> list[PanelQuery]:
    """Every panel target's expression, substituted for `model` (see `substitute`)."""
    return [
        PanelQuery(
            panel_id=int(panel["id"]),
            title=str(panel.get("title", "")),
            ref_id=str(target.get("refId", "")),
            expr=substitute(str(target["expr"]), model, rate_interval),
        )
        for panel in panels_of(dashboard)
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def annotation_queries(dashboard: Json, model: str, rate_interval: str = "30s") -> list[str]:
    """The PromQL of the dashboard's Prometheus annotations (the built-in one has none)."""
    return [
        substitute(str(a["expr"]), model, rate_interval)
        for a in dashboard.get("annotations", {}).get("list", [])
        if a.get("expr")
    ]


# --- What an expression selects ---------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NAME = re.compile(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(\s*\{[^}]*\})?")
_MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
    | {"group_left", "group_right", "inf", "nan", "atan2"}
)


def metric_selectors(expr: str) -> list[tuple[str, frozenset[str]]]:
    """(metric name, label names it matches on) for every vector selector of a PromQL `expr`.

    A small scan rather than a parser: strings, ranges, subqueries and grouping clauses are
    blanked, function names are recognised by their `(`. Selectors written as `{__name__=...}`
    are not supported (the dashboard and the rules do not use them)."""
    blank = _STRING.sub('""', expr)
    blank = re.sub(r"\[[^\]]*\]", "", blank)
    blank = _GROUPING.sub("", blank)
    found: list[tuple[str, frozenset[str]]] = []
    for match in _NAME.finditer(blank):
        name, braces = match.group(1), match.group(2)
        rest = blank[match.end() :].lstrip()
        if name.lower() in _KEYWORDS or (not braces and rest.startswith("(")):
            continue  # a keyword, or a function call
        found.append((name, frozenset(_MATCHER.findall(braces or ""))))
    return found


def metric_names(expr: str) -> set[str]:
    return {name for name, _ in metric_selectors(expr)}


def grouping_labels(expr: str) -> set[str]:
    """Label names of every `by`, `without`, `on`, `ignoring` and `group_*` clause."""
    clauses = _GROUPING.findall(_STRING.sub('""', expr))
    inside = (clause[clause.index("(") + 1 : -1] for clause in clauses)
    return {label.strip() for labels in inside for label in labels.split(",") if label.strip()}


# --- A real Prometheus ------------------------------------------------------------------------


def with_targets(config: Json, targets: Mapping[str, Sequence[str]]) -> Json:
    """A copy of a Prometheus config whose jobs named in `targets` scrape those addresses."""
    config = json.loads(json.dumps(config))  # a deep copy of plain YAML data
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    unknown = set(targets) - set(jobs)
    if unknown:
        raise ValueError(f"no scrape job {sorted(unknown)} in the config; it has {sorted(jobs)}")
    for name, addresses in targets.items():
        jobs[name]["static_configs"] = [{"targets": list(addresses)}]
    return config


class PrometheusServer:
    """One `prometheus` process on 127.0.0.1; `stop()` (or the `running` context) ends it."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
        self.process = process
        self.url = url
        self.log_path = log_path

    @classmethod
    def start(
        cls,
        targets: Mapping[str, Sequence[str]],
        workdir: Path,
        scrape_interval: str | None = None,
        config_path: Path = PROMETHEUS_CONFIG,
        timeout_s: float = 30.0,
    ) -> PrometheusServer:
        """Starts Prometheus on a copy of `config_path` (and the rule files next to it) in
        `workdir`, scraping `targets` ({job name: ["host:port", ...]}), and waits until it is
        ready. `scrape_interval` overrides the global one (and the rule evaluation interval)."""
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("no `prometheus` binary: install Debian's prometheus package")
        config = with_targets(yaml.safe_load(config_path.read_text()), targets)
        if scrape_interval is not None:
            config["global"].update(
                scrape_interval=scrape_interval,
                evaluation_interval=scrape_interval,
                scrape_timeout=scrape_interval,
            )
        workdir.mkdir(parents=True, exist_ok=True)
        for rule_file in config.get("rule_files", []):
            shutil.copy(config_path.parent / rule_file, workdir / rule_file)
        config_copy = workdir / "prometheus.yml"
        config_copy.write_text(yaml.safe_dump(config, sort_keys=False))
        port = free_port()
        log_path = workdir / "prometheus.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_copy}",
                    f"--storage.tsdb.path={workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        server = cls(process, f"http://127.0.0.1:{port}", log_path)
        try:
            server._wait_ready(timeout_s)
        except BaseException:
            server.stop()
            raise
        return server

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def api(self, path: str, **params: str) -> Any:
        """GET `/api/v1/<path>`; its `data`, or an AssertionError with Prometheus' error."""
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as exc:  # 400/422 carry the error in JSON
            body = json.load(exc)
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """An instant query: (labels, value) per series of the resulting vector."""
        data = self.api("query", query=expr)
        if data["resultType"] != "vector":
            raise AssertionError(f"{expr!r} gives a {data['resultType']}, not a vector")
        return [(row["metric"], float(row["value"][1])) for row in data["result"]]

    def label_values(self, label: str, match: str) -> list[str]:
        """What Grafana's `label_values(match, label)` lists."""
        return list(self.api(f"label/{label}/values", **{"match[]": match}))

    def targets_up(self) -> dict[str, bool]:
        """Scrape URL -> whether its last scrape succeeded."""
        active = self.api("targets")["activeTargets"]
        return {t["scrapeUrl"]: t["health"] == "up" for t in active}

    def rule_groups(self) -> list[Json]:
        return list(self.api("rules")["groups"])

    def wait_for(self, expr: str, timeout_s: float = 30.0) -> list[tuple[dict[str, str], float]]:
        """Polls `expr` until it returns a series with a finite value."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(expr)
            if any(math.isfinite(value) for _, value in result):
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"no data for {expr!r} after {timeout_s}s: {result}")
            time.sleep(0.5)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass  # not listening yet, or 503 while it starts
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready after {timeout_s}s at {self.url}")
            time.sleep(0.2)


@contextmanager
def running(
    targets: Mapping[str, Sequence[str]], workdir: Path, scrape_interval: str | None = None
) -> Iterator[PrometheusServer]:
    """`PrometheusServer.start(...)`, stopped on exit."""
    server = PrometheusServer.start(targets, workdir, scrape_interval)
    try:
        yield server
    finally:
        server.stop()
