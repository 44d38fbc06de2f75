"""The trainer's Prometheus exporter: names that pass promtool, values from Trainer
events, and a real Prometheus that scrapes it."""

from __future__ import annotations

import urllib.request
from typing import Any

import pytest
from tests.support.prometheus import promtool_check_metrics

from kubetune_trainer.metrics import MetricsCallback, TrainingMetrics

pytestmark = pytest.mark.trainer


def drive_a_short_run(metrics: TrainingMetrics) -> None:
    """Feed the callback the events the Trainer sends during 10 steps with one log and one eval."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(output_dir="unused", report_to=[])
    state = TrainerState(max_steps=100, global_step=0, num_input_tokens_seen=0)
    control = TrainerControl()
    callback = MetricsCallback(metrics, samples_per_step=8)
    callback.on_train_begin(args, state, control)
    for step in range(1, 11):
        state.global_step, state.epoch, state.num_input_tokens_seen = step, step / 50, step * 1024
        callback.on_step_end(args, state, control)
    callback.on_log(args, state, control, logs={"loss": 2.5, "learning_rate": 1e-4, "grad_norm": 0.75})
    callback.on_evaluate(args, state, control, metrics={"eval_loss": 2.0, "eval_accuracy": 0.5})


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def sample(text: str, name: str) -> float:
    lines = [line for line in text.splitlines() if line.startswith(name + "{")]
    assert len(lines) == 1, (name, lines)
    assert 'finetunejob="demo"' in lines[0] and 'namespace="ml"' in lines[0] and 'method="lora"' in lines[0]
    return float(lines[0].rsplit(" ", 1)[1])


def test_exporter_serves_training_progress_with_job_labels_and_passes_promtool() -> None:
    metrics = TrainingMetrics("demo", "ml", "lora")
    drive_a_short_run(metrics)
    server = metrics.serve(0, addr="127.0.0.1")
    try:
        text = scrape(server.port)
    finally:
        server.close()
    assert sample(text, "kubetune_train_loss") == 2.5
    assert sample(text, "kubetune_train_learning_rate") == 1e-4
    assert sample(text, "kubetune_train_grad_norm") == 0.75
    assert sample(text, "kubetune_train_step") == 10
    assert sample(text, "kubetune_train_total_steps") == 100
    assert sample(text, "kubetune_train_epoch") == pytest.approx(0.2)
    assert sample(text, "kubetune_train_eval_loss") == 2.0
    assert sample(text, "kubetune_train_eval_perplexity") == pytest.approx(7.389, rel=1e-3)
    assert sample(text, "kubetune_train_eval_accuracy_ratio") == 0.5
    assert sample(text, "kubetune_train_samples_total") == 80
    assert sample(text, "kubetune_train_tokens_per_second") > 0
    assert sample(text, "kubetune_train_eta_seconds") >= 0
    lint = promtool_check_metrics(text)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_a_real_prometheus_scrapes_the_exporter_and_answers_promql(prometheus_factory: Any) -> None:
    metrics = TrainingMetrics("demo", "ml", "lora")
    drive_a_short_run(metrics)
    server = metrics.serve(0, addr="127.0.0.1")
    try:
        prometheus = prometheus_factory([f"127.0.0.1:{server.port}"])
        result = prometheus.wait_for('kubetune_train_loss{finetunejob="demo", namespace="ml"}')
    finally:
        server.close()
    assert float(result[0]["value"][1]) == 2.5
    assert result[0]["metric"]["method"] == "lora"
    assert result[0]["metric"]["job"] == "kubetune-trainer"  # Prometheus' own job label is left alone
