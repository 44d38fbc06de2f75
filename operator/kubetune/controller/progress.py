"""Pure: the trainer's Prometheus exposition text -> the FineTuneJob's status.progress."""

from __future__ import annotations

import math

from prometheus_client.parser import text_string_to_metric_families

from kubetune.api.v1alpha1 import Progress

# status.progress field <- the trainer's gauge (see kubetune_trainer.metrics).
GAUGES = {
    "step": "kubetune_train_step",
    "total_steps": "kubetune_train_total_steps",
    "epoch": "kubetune_train_epoch",
    "loss": "kubetune_train_loss",
    "eval_loss": "kubetune_train_eval_loss",
    "learning_rate": "kubetune_train_learning_rate",
    "tokens_per_second": "kubetune_train_tokens_per_second",
    "eta_seconds": "kubetune_train_eta_seconds",
}
INTEGER_FIELDS = ("step", "total_steps")
JOB_LABEL = "finetunejob"


def read_samples(exposition: str, job_name: str | None = None) -> dict[str, float]:
    """Sample values by metric name; with several series, the one labelled with this job wins."""
    values: dict[str, float] = {}
    wanted = set(GAUGES.values())
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name not in wanted or math.isnan(sample.value) or math.isinf(sample.value):
                continue
            ours = job_name is not None and sample.labels.get(JOB_LABEL) == job_name
            if sample.name not in values or ours:
                values[sample.name] = sample.value
    return values


def parse_progress(exposition: str, now: str, job_name: str | None = None) -> Progress | None:
    """Progress from one scrape, or None when the endpoint does not (yet) export a step."""
    samples = read_samples(exposition, job_name)
    if GAUGES["step"] not in samples:
        return None
    fields: dict[str, float | int] = {}
    for field, metric in GAUGES.items():
        if metric in samples:
            value = samples[metric]
            fields[field] = int(value) if field in INTEGER_FIELDS else value
    step, total = fields.get("step"), fields.get("total_steps")
    percent = None
    if step is not None and total:
        percent = max(0, min(100, int(step * 100 // total)))
    return Progress.model_validate({**fields, "percent": percent, "updated_at": now})
