"""Progress from the trainer's /metrics text, and the operator's configuration and metrics."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from kubetune.controller.config import OperatorConfig
from kubetune.controller.metrics import REGISTRY, count_job_phases, reconcile
from kubetune.controller.progress import parse_progress

NOW = "2026-01-01T00:00:00Z"

EXPOSITION = """\
# HELP kubetune_train_step Optimizer steps completed (continues after a resume).
# TYPE kubetune_train_step gauge
kubetune_train_step{finetunejob="other",method="lora",namespace="ml"} 1.0
kubetune_train_step{finetunejob="demo",method="lora",namespace="ml"} 40.0
# TYPE kubetune_train_total_steps gauge
kubetune_train_total_steps{finetunejob="demo",method="lora",namespace="ml"} 160.0
# TYPE kubetune_train_epoch gauge
kubetune_train_epoch{finetunejob="demo",method="lora",namespace="ml"} 0.75
# TYPE kubetune_train_loss gauge
kubetune_train_loss{finetunejob="demo",method="lora",namespace="ml"} 1.25
# TYPE kubetune_train_eval_loss gauge
kubetune_train_eval_loss{finetunejob="demo",method="lora",namespace="ml"} NaN
# TYPE kubetune_train_learning_rate gauge
kubetune_train_learning_rate{finetunejob="demo",method="lora",namespace="ml"} 0.0002
# TYPE kubetune_train_tokens_per_second gauge
kubetune_train_tokens_per_second{finetunejob="demo",method="lora",namespace="ml"} 5120.5
# TYPE kubetune_train_eta_seconds gauge
kubetune_train_eta_seconds{finetunejob="demo",method="lora",namespace="ml"} 360.0
# TYPE kubetune_train_tokens_total counter
kubetune_train_tokens_total{finetunejob="demo",method="lora",namespace="ml"} 1e6
"""


def test_the_trainers_gauges_become_status_progress() -> None:
    progress = parse_progress(EXPOSITION, NOW, job_name="demo")
    assert progress is not None
    assert progress.step == 40 and progress.total_steps == 160 and progress.percent == 25
    assert progress.epoch == 0.75 and progress.loss == 1.25
    assert progress.learning_rate == 0.0002 and progress.tokens_per_second == 5120.5
    assert progress.eta_seconds == 360.0 and progress.updated_at == NOW
    assert progress.eval_loss is None, "NaN (no evaluation yet) is left out"


def test_an_endpoint_without_a_step_yet_gives_no_progress() -> None:
    assert (
        parse_progress("# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 1.0\n", NOW)
        is None
    )


def test_configuration_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_NAMESPACES", "ml, research,")
    monkeypatch.setenv("KUBETUNE_TRAINER_IMAGE", "registry.example/trainer:1")
    monkeypatch.setenv("KUBETUNE_PROGRESS_INTERVAL_SECONDS", "5")
    config = OperatorConfig()
    assert config.namespaces == ("ml", "research")
    assert config.render.trainer_image == "registry.example/trainer:1"
    assert config.progress_interval_seconds == 5
    assert config.metrics_port == 8080


def test_empty_namespaces_means_all(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_NAMESPACES", "")
    assert OperatorConfig().namespaces == ()


def test_operator_metrics_count_reconciles_errors_and_phases() -> None:
    with reconcile("FineTuneJob"):
        pass
    with pytest.raises(RuntimeError), reconcile("FineTuneJob"):
        raise RuntimeError("boom")
    count_job_phases(lambda: ["Running", "Running", None])
    text = generate_latest(REGISTRY).decode()
    assert 'kubetune_operator_reconciles_total{kind="FineTuneJob",result="success"}' in text
    assert 'kubetune_operator_reconcile_errors_total{kind="FineTuneJob",reason="RuntimeError"} 1.0' in text
    assert 'kubetune_operator_finetunejobs{phase="Running"} 2.0' in text
    assert 'kubetune_operator_finetunejobs{phase="Pending"} 1.0' in text
    assert "kubetune_operator_reconcile_duration_seconds_bucket" in text
