"""The chart's PrometheusRule: off by default, and every alert checked by `promtool test rules` against the rules
`helm template` renders (so the tested rules are the chart's)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.helm import find, one, render

TESTS = Path(__file__).parent / "data" / "alert-rules-test.yaml"
ALERTS = {
    "KubetuneJobStalled",
    "KubetuneLossNotFinite",
    "KubetuneTrainerOOMRestarts",
    "KubetuneOperatorDown",
    "KubetuneReconcileErrors",
}


def rendered_rule() -> dict[str, Any]:
    return one(render(set_values=["monitoring.prometheusRule.enabled=true"]), "PrometheusRule")


def test_the_rule_renders_only_when_enabled() -> None:
    assert find(render(), "PrometheusRule") == []
    rule = rendered_rule()
    alerts = {r["alert"] for group in rule["spec"]["groups"] for r in group["rules"]}
    assert alerts == ALERTS


def test_the_rule_takes_labels_and_thresholds_from_values() -> None:
    rule = one(
        render(
            set_values=[
                "monitoring.prometheusRule.enabled=true",
                "monitoring.prometheusRule.labels.release=prom",
                "monitoring.prometheusRule.stalledMinutes=42",
            ]
        ),
        "PrometheusRule",
    )
    assert rule["metadata"]["labels"]["release"] == "prom"
    stalled = next(
        r for g in rule["spec"]["groups"] for r in g["rules"] if r["alert"] == "KubetuneJobStalled"
    )
    assert "[42m]" in stalled["expr"]


def test_every_alert_passes_its_promtool_unit_test(tmp_path: Path) -> None:
    """Annotations are prose with templated values; promtool compares them verbatim, so the rules file keeps the
    chart's expressions, durations and labels and drops only the annotations."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: run `make system-deps` (Debian package prometheus)"
    groups = rendered_rule()["spec"]["groups"]
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    cases = yaml.safe_load(TESTS.read_text())
    cases["rule_files"] = ["rules.yaml"]
    tested = {t["alertname"] for test in cases["tests"] for t in test["alert_rule_test"]}
    assert tested == ALERTS
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(cases))
    check = subprocess.run(
        [promtool, "check", "rules", "rules.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    result = subprocess.run(
        [promtool, "test", "rules", "tests.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
