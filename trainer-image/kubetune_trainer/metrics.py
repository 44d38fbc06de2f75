"""Prometheus metrics of a training run, the Trainer callback that keeps them current, and the
exporter's lifetime: started before the model loads, stopped after the last scrape.

Every series carries ``finetunejob``, ``namespace`` and ``method`` labels. The job label
is not called ``job``: Prometheus sets ``job`` (and the Prometheus Operator
``namespace``, ``pod``) on every scraped target, and a clashing exposed label would be
renamed ``exported_job``. ``namespace`` has the pod's value either way, so it keeps its name.
Names follow the Prometheus conventions: ``kubetune_train_`` prefix, base units
(seconds, bytes), ``_total`` on counters, ``_ratio`` on fractions.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from kubetune.api.v1alpha1 import FineTuneJob

from . import distributed
from .job import job_identity

log = logging.getLogger(__name__)

LABELS = ("finetunejob", "namespace", "method")
METRICS_PORT_ENV = "KUBETUNE_METRICS_PORT"
METRICS_LINGER_ENV = "KUBETUNE_METRICS_LINGER_SECONDS"


@dataclass
class MetricsServer:
    """A running exporter; ``close()`` stops it (tests, and the end of a run)."""

    port: int
    _server: Any
    _thread: Any

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class TrainingMetrics:
    """The exporter's series, bound to one job's labels."""

    def __init__(
        self, job: str, namespace: str, method: str, registry: CollectorRegistry | None = None
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        values = (job, namespace, method)

        def gauge(name: str, documentation: str) -> Any:
            return Gauge(name, documentation, LABELS, registry=self.registry).labels(*values)

        def counter(name: str, documentation: str) -> Any:
            return Counter(name, documentation, LABELS, registry=self.registry).labels(*values)

        self.loss = gauge("kubetune_train_loss", "Training loss averaged over the latest logging window.")
        self.eval_loss = gauge(
            "kubetune_train_eval_loss", "Loss on the validation split at the latest evaluation."
        )
        self.eval_perplexity = gauge("kubetune_train_eval_perplexity", "exp(eval loss) for causal-lm jobs.")
        self.eval_accuracy = gauge(
            "kubetune_train_eval_accuracy_ratio", "Accuracy on the validation split (0-1)."
        )
        self.eval_f1 = gauge("kubetune_train_eval_f1_ratio", "Macro F1 on the validation split (0-1).")
        self.learning_rate = gauge(
            "kubetune_train_learning_rate", "Learning rate of the first parameter group."
        )
        self.grad_norm = gauge("kubetune_train_grad_norm", "Gradient norm before clipping at the latest log.")
        self.step = gauge("kubetune_train_step", "Optimizer steps completed (continues after a resume).")
        self.total_steps = gauge("kubetune_train_total_steps", "Optimizer steps the run will take in all.")
        self.epoch = gauge("kubetune_train_epoch", "Fractional epoch reached.")
        self.tokens_per_second = gauge(
            "kubetune_train_tokens_per_second", "Input tokens per second over all processes, latest window."
        )
        self.samples_per_second = gauge(
            "kubetune_train_samples_per_second",
            "Training samples per second over all processes, latest window.",
        )
        self.eta_seconds = gauge("kubetune_train_eta_seconds", "Estimated seconds until the last step.")
        self.trainable_parameters = gauge("kubetune_train_trainable_parameters", "Parameters being trained.")
        self.parameters = gauge("kubetune_train_parameters", "Parameters of the model, trainable or not.")
        self.last_update = gauge(
            "kubetune_train_last_update_timestamp_seconds", "Unix time of the latest update of these metrics."
        )
        self.checkpoint_timestamp = gauge(
            "kubetune_train_last_checkpoint_timestamp_seconds", "Unix time of the latest complete checkpoint."
        )
        self.tokens = counter(
            "kubetune_train_tokens", "Input tokens processed by all processes since this start."
        )
        self.samples = counter("kubetune_train_samples", "Training samples processed since this start.")
        self.checkpoints = counter("kubetune_train_checkpoints", "Checkpoints written since this start.")
        gpu_labels = (*LABELS, "device")
        self._gpu_allocated = Gauge(
            "kubetune_train_gpu_memory_allocated_bytes",
            "GPU memory held by tensors, per local device.",
            gpu_labels,
            registry=self.registry,
        )
        self._gpu_reserved = Gauge(
            "kubetune_train_gpu_memory_reserved_bytes",
            "GPU memory reserved by the caching allocator, per local device.",
            gpu_labels,
            registry=self.registry,
        )
        self._values = values

    def touch(self) -> None:
        self.last_update.set(time.time())

    def record_gpu_memory(self) -> None:
        import torch

        if not torch.cuda.is_available():
            return
        device = torch.cuda.current_device()
        labels = (*self._values, str(device))
        self._gpu_allocated.labels(*labels).set(torch.cuda.memory_allocated(device))
        self._gpu_reserved.labels(*labels).set(torch.cuda.memory_reserved(device))

    def record_eval(self, eval_metrics: Mapping[str, float]) -> None:
        """Set the eval gauges from Trainer-style keys (``eval_loss``, ``eval_accuracy``...)."""
        if "eval_loss" in eval_metrics:
            loss = float(eval_metrics["eval_loss"])
            self.eval_loss.set(loss)
            if "eval_perplexity" not in eval_metrics:
                self.eval_perplexity.set(math.exp(min(loss, 50.0)))
        if "eval_perplexity" in eval_metrics:
            self.eval_perplexity.set(float(eval_metrics["eval_perplexity"]))
        if "eval_accuracy" in eval_metrics:
            self.eval_accuracy.set(float(eval_metrics["eval_accuracy"]))
        if "eval_f1" in eval_metrics:
            self.eval_f1.set(float(eval_metrics["eval_f1"]))
        self.touch()

    def serve(self, port: int, addr: str = "0.0.0.0") -> MetricsServer:
        """Expose ``/metrics`` on ``port`` (0 picks a free one) in a background thread."""
        server, thread = start_http_server(port, addr=addr, registry=self.registry)
        return MetricsServer(port=server.server_address[1], _server=server, _thread=thread)


class MetricsCallback(TrainerCallback):
    """Feeds :class:`TrainingMetrics` from the Trainer's events.

    Throughput is measured between logging events from the step counter and the
    Trainer's own count of input tokens (``include_num_input_tokens_seen``), which is
    already summed over processes.
    """

    def __init__(self, metrics: TrainingMetrics, samples_per_step: int) -> None:
        self.metrics = metrics
        self.samples_per_step = samples_per_step
        self._window_start: tuple[float, int, int] | None = None
        self._seconds_per_step: float | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.metrics.total_steps.set(state.max_steps)
        self.metrics.step.set(state.global_step)
        if state.is_world_process_zero:
            log.info("training from step %d of %d", state.global_step, state.max_steps)
        self._window_start = (time.monotonic(), state.global_step, int(state.num_input_tokens_seen or 0))
        self.metrics.touch()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        now = time.monotonic()
        tokens_seen = int(state.num_input_tokens_seen or 0)
        self.metrics.step.set(state.global_step)
        self.metrics.epoch.set(state.epoch or 0.0)
        self.metrics.samples.inc(self.samples_per_step)
        if self._window_start is not None:
            started, start_step, start_tokens = self._window_start
            elapsed, steps = now - started, state.global_step - start_step
            if elapsed > 0 and steps > 0:
                per_step = elapsed / steps
                # An exponential average so one slow step (a checkpoint) does not swing the ETA.
                self._seconds_per_step = (
                    per_step
                    if self._seconds_per_step is None
                    else 0.7 * self._seconds_per_step + 0.3 * per_step
                )
                self.metrics.samples_per_second.set(steps * self.samples_per_step / elapsed)
                if tokens_seen > start_tokens:
                    self.metrics.tokens_per_second.set((tokens_seen - start_tokens) / elapsed)
                    self.metrics.tokens.inc(tokens_seen - start_tokens)
        if self._seconds_per_step is not None:
            self.metrics.eta_seconds.set(max(state.max_steps - state.global_step, 0) * self._seconds_per_step)
        self._window_start = (now, state.global_step, tokens_seen)
        self.metrics.record_gpu_memory()
        self.metrics.touch()

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        logs = logs or {}
        if "loss" in logs:
            self.metrics.loss.set(float(logs["loss"]))
        if "learning_rate" in logs:
            self.metrics.learning_rate.set(float(logs["learning_rate"]))
        if logs.get("grad_norm") is not None:
            self.metrics.grad_norm.set(float(logs["grad_norm"]))
        self.metrics.record_eval(logs)

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        self.metrics.record_eval(metrics or {})

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.metrics.step.set(state.global_step)
        self.metrics.eta_seconds.set(0)
        self.metrics.touch()


def start_metrics(job: FineTuneJob) -> tuple[TrainingMetrics, MetricsServer | None]:
    """The exporter; served by each node's local rank 0 (one endpoint per pod)."""
    name, namespace = job_identity(job)
    metrics = TrainingMetrics(name, namespace, job.spec.method.type.value)
    server = None
    if distributed.is_local_main_process():
        port = int(os.environ.get(METRICS_PORT_ENV, job.spec.metrics.port))
        try:
            server = metrics.serve(port)
            log.info("metrics on :%d/metrics", server.port)
        except OSError as error:
            log.warning("metrics endpoint not started on port %d: %s", port, error)
    return metrics, server


def stop_metrics(server: MetricsServer | None) -> None:
    """Stop the exporter, ``KUBETUNE_METRICS_LINGER_SECONDS`` after the run for one more scrape
    of the final values."""
    linger = float(os.environ.get(METRICS_LINGER_ENV, "0"))
    if server is not None:
        if linger > 0:
            time.sleep(linger)
        server.close()


def record_parameters(metrics: TrainingMetrics, trainable: int, total: int) -> None:
    """Export the parameter counts; rank 0 also prints them, in the line peft prints."""
    metrics.trainable_parameters.set(trainable)
    metrics.parameters.set(total)
    if distributed.is_main_process():
        print(
            f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100.0 * trainable / max(total, 1):.4f}",
            flush=True,
        )
