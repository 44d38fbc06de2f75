"""The Grafana dashboard shows only what exists: every PromQL expression in it names metrics that a real scrape of
the operator's and of a trainer's exporter returns, each expression parses, and the JSON is a dashboard model
Grafana loads (panels with a data source and targets, `namespace` and `job` variables).

Both exporters are the real ones, started in-process on a loopback port and scraped over HTTP: the operator's
registry (kubetune.controller.metrics, the one `kubetune operator` serves on KUBETUNE_METRICS_PORT) after a
few reconciles, and the trainer's TrainingMetrics (kubetune_trainer.metrics) after a few updates.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import start_http_server
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT

DASHBOARD_PATH = ROOT / "docs" / "grafana" / "kubetune-dashboard.json"
DASHBOARD: dict[str, Any] = json.loads(DASHBOARD_PATH.read_text())
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# PromQL words that look like metric names but are not (functions are found by their "(").
PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "and",
    "or",
    "unless",
    "inf",
    "nan",
}


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def exposed_names(exposition: str) -> set[str]:
    """Every series name a query can use: sample names (`_total`, `_bucket`...) and the family names."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def fresh_operator_metrics() -> Any:
    """A private copy of kubetune.controller.metrics: the same code with its own registry, so the reconciles
    counted here never show in the module the operator's own tests read."""
    spec = importlib.util.find_spec("kubetune.controller.metrics")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reconcile_once_well_and_once_badly(metrics: Any) -> None:
    """Count one successful FineTuneJob reconcile and one that raised, as the handlers do."""
    for result in ("success", "error"):
        try:
            with metrics.reconcile("FineTuneJob"):
                if result == "error":
                    raise RuntimeError("conflict")
        except RuntimeError:
            pass


@pytest.fixture(scope="module")
def operator_exposition() -> Iterator[str]:
    metrics = fresh_operator_metrics()
    reconcile_once_well_and_once_badly(metrics)
    metrics.count_job_phases(lambda: ["Running", "Succeeded", None])
    for kind in ("FineTuneJob", "PyTorchJob", "Pod"):
        metrics.WATCH_EVENTS.labels(kind=kind).inc()
    server, thread = start_http_server(0, addr="127.0.0.1", registry=metrics.REGISTRY)
    try:
        yield scrape(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def trainer_exposition() -> Iterator[str]:
    from kubetune_trainer.metrics import TrainingMetrics

    training = TrainingMetrics(job="qwen-support", namespace="ml", method="qlora")
    training.total_steps.set(400)
    training.step.set(120)
    training.loss.set(1.42)
    training.record_eval({"eval_loss": 1.51, "eval_accuracy": 0.8, "eval_f1": 0.75})
    training.samples.inc(480)
    server = training.serve(0, addr="127.0.0.1")
    try:
        yield scrape(server.port)
    finally:
        server.close()


def all_targets() -> Iterator[tuple[str, dict[str, Any]]]:
    for panel in DASHBOARD["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target


def expressions() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    found = [(f"panel {title!r} target {target['refId']}", target["expr"]) for title, target in all_targets()]
    for variable in DASHBOARD["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            selector = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            assert selector, (
                f"variable {variable['name']}: expected label_values(<selector>, <label>), got {query}"
            )
            found.append((f"variable {variable['name']}", selector.group(1)))
    return found


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels, keywords or Grafana variables)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values
    text = re.sub(r"\$\{?\w+\}?", "0", text)  # Grafana variables ($__rate_interval, ${job})
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        follows = text[match.end() :].lstrip()
        if word.lower() in PROMQL_KEYWORDS or follows.startswith("("):
            continue
        names.add(word)
    return names


def test_metric_name_extraction_sees_through_functions_labels_and_variables() -> None:
    expr = 'histogram_quantile(0.95, sum by (le, kind) (rate(a_seconds_bucket{x=~"$job", y="b c"}[$__rate_interval]))) / on (kind) group_left b_total'
    assert metric_names(expr) == {"a_seconds_bucket", "b_total"}


def test_every_query_names_only_metrics_that_a_real_scrape_exposes(
    operator_exposition: str, trainer_exposition: str
) -> None:
    exposed = exposed_names(operator_exposition) | exposed_names(trainer_exposition)
    problems = []
    for where, expr in expressions():
        names = metric_names(expr)
        if not names:
            problems.append(f"{where}: names no metric: {expr}")
        problems += [f"{where}: {name} is not exposed" for name in sorted(names - exposed)]
    assert not problems, "\n".join(problems)


def test_the_dashboard_shows_what_platform_and_ml_engineers_look_for() -> None:
    used = set().union(*(metric_names(expr) for _, expr in expressions()))
    wanted = {
        "kubetune_train_loss",
        "kubetune_train_eval_loss",
        "kubetune_train_learning_rate",
        "kubetune_train_tokens_per_second",
        "kubetune_train_step",
        "kubetune_train_total_steps",
        "kubetune_train_eta_seconds",
        "kubetune_train_gpu_memory_allocated_bytes",
        "kubetune_train_samples_total",  # restarts: the per-process sample counter resets
        "kubetune_operator_finetunejobs",
        "kubetune_operator_reconcile_errors_total",
        "kubetune_operator_queue_depth",  # a backlog at 3 a.m.: too few workers or a slow API server
        "kubetune_operator_queue_wait_seconds_bucket",  # how long new jobs wait for their PyTorchJob
    }
    assert wanted <= used, f"not on the dashboard: {sorted(wanted - used)}"


def test_every_expression_parses_as_promql(tmp_path: Path) -> None:
    """`promtool check rules` parses each expression (Grafana's variables replaced by values Prometheus accepts)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install -y prometheus)")
    substitutions = {"$__rate_interval": "1m", "$__range": "1h", "$namespace": ".*", "$job": ".*"}
    rules = []
    for index, (_, expr) in enumerate(expressions()):
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"unknown Grafana variable in {expr}"
        rules.append({"record": f"kubetune:dashboard_check:{index}", "expr": expr})
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_is_a_grafana_model_with_namespace_and_job_variables() -> None:
    for key in ("title", "uid", "schemaVersion", "panels", "templating", "time"):
        assert key in DASHBOARD, key
    assert isinstance(DASHBOARD["schemaVersion"], int) and DASHBOARD["schemaVersion"] >= 30

    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    for name, label in (("namespace", "namespace"), ("job", "finetunejob")):
        variable = variables[name]
        assert variable["type"] == "query" and variable["datasource"] == DATASOURCE
        assert variable["query"]["query"].endswith(f", {label})"), variable["query"]
        assert variable["multi"] and variable["includeAll"]

    ids = [panel["id"] for panel in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    occupied: set[tuple[int, int]] = set()
    for panel in DASHBOARD["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"panel {panel['title']!r} overlaps another"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"timeseries", "stat", "bargauge", "gauge", "table"}, panel["type"]
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel.get("description"), f"panel {panel['title']!r} needs a description"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE and target["expr"].strip(), panel["title"]


def test_per_job_panels_follow_the_namespace_and_job_variables() -> None:
    """Every kubetune_train_* selector on a per-job panel filters by both variables (the fleet row is exempt)."""
    rows = [p for p in DASHBOARD["panels"] if p["type"] == "row"]
    jobs_row_y = next(row["gridPos"]["y"] for row in rows if row["title"].startswith("Jobs"))
    for panel in DASHBOARD["panels"]:
        if panel["type"] == "row" or panel["gridPos"]["y"] < jobs_row_y:
            continue
        for target in panel["targets"]:
            for selector in re.findall(r"kubetune_train_\w+(\{[^}]*\})?", target["expr"]):
                assert 'namespace=~"$namespace"' in selector and 'finetunejob=~"$job"' in selector, target[
                    "expr"
                ]


def test_every_operator_panel_returns_series_from_a_real_prometheus(prometheus_factory: Any) -> None:
    """The operator's panels, with Grafana's variables filled in, return series from a real Prometheus
    scraping the operator's real exporter (its metrics module, counting reconciles, errors, watch events
    and queue waits as the kopf handlers do). The trainer's panels are checked the same way against a
    real training run in tests/trainer/test_pipeline.py."""
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (apt-get install -y prometheus)")
    metrics = fresh_operator_metrics()
    server, thread = start_http_server(0, addr="127.0.0.1", registry=metrics.REGISTRY)
    try:
        prometheus = prometheus_factory([f"127.0.0.1:{server.server_address[1]}"])
        metrics.count_job_phases(lambda: ["Running", "Succeeded", None])
        for round_ in range(4):  # several scrapes apart, so rate() and increase() have samples to span
            reconcile_once_well_and_once_badly(metrics)
            metrics.WATCH_EVENTS.labels(kind="Pod").inc()
            metrics.queue_waited(round_ == 0, 0.01)
            prometheus.wait_for(f"kubetune_operator_watch_events_total >= {round_ + 1}", timeout=30)
        empty, checked = [], 0
        for title, target in all_targets():
            expr = target["expr"]
            if "kubetune_operator_" not in expr:
                continue
            expr = expr.replace("$__rate_interval", "1m").replace("$__range", "10m")
            checked += 1
            if not prometheus.query(expr):
                empty.append(f"{title}: {expr}")
        assert checked >= 8 and empty == [], (checked, empty)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
