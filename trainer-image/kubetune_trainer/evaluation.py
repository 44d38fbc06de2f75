"""How a trained model is scored on the validation split: the Trainer's ``compute_metrics`` for
each task, and the final evaluation whose scores reach the exporter and the manifest."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from transformers import EvalPrediction, Trainer

from kubetune.api.v1alpha1 import Task

from .data import TaskData
from .metrics import TrainingMetrics

PUBLISHED_SCORES = ("eval_loss", "eval_perplexity", "eval_accuracy", "eval_f1")
"""The evaluation's keys that a run reports (the Trainer adds runtime and throughput keys)."""


def classification_metrics(task: Task) -> Callable[[EvalPrediction], dict[str, float]]:
    """compute_metrics for seq-cls, token-cls (accuracy and macro F1) and QA (exact span accuracy)."""

    def macro_f1(predictions: np.ndarray, labels: np.ndarray) -> float:
        scores = []
        for label in np.unique(np.concatenate([labels, predictions])):
            true_positive = np.sum((predictions == label) & (labels == label))
            precision_den, recall_den = np.sum(predictions == label), np.sum(labels == label)
            if precision_den == 0 or recall_den == 0 or true_positive == 0:
                scores.append(0.0)
                continue
            precision, recall = true_positive / precision_den, true_positive / recall_den
            scores.append(2 * precision * recall / (precision + recall))
        return float(np.mean(scores)) if scores else 0.0

    def compute(prediction: EvalPrediction) -> dict[str, float]:
        logits: Any = prediction.predictions
        labels: Any = prediction.label_ids
        if task == Task.QUESTION_ANSWERING:
            start_logits, end_logits = logits[0], logits[1]
            starts, ends = labels[0], labels[1]
            exact = (start_logits.argmax(-1) == starts) & (end_logits.argmax(-1) == ends)
            return {"accuracy": float(exact.mean())}
        logits = logits[0] if isinstance(logits, tuple) else logits
        predictions = logits.argmax(-1)
        if task == Task.TOKEN_CLS:
            keep = labels != -100
            predictions, labels = predictions[keep], labels[keep]
        return {"accuracy": float((predictions == labels).mean()), "f1": macro_f1(predictions, labels)}

    return compute


def evaluate(trainer: Trainer, data: TaskData, task: Task, metrics: TrainingMetrics) -> dict[str, float]:
    """The trained model's scores on the validation split (none without one), also set on the exporter."""
    if data.validation is None:
        return {}
    evaluation = trainer.evaluate()
    if task == Task.CAUSAL_LM and "eval_loss" in evaluation:
        evaluation["eval_perplexity"] = math.exp(min(evaluation["eval_loss"], 50.0))
    metrics.record_eval(evaluation)
    return {key: float(value) for key, value in evaluation.items() if key in PUBLISHED_SCORES}
