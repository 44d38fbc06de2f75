"""The training pipeline: load the model and data, build the method, train (round by round for a
chain), evaluate, save, publish.

Each phase is a plain function in the module whose job it is; :func:`run` strings them together.
Every process of the job runs the same code (torchrun starts them); rank 0 alone publishes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import PreTrainedTokenizerBase, TrainingArguments

from kubetune.api.v1alpha1 import FineTuneJob, FineTuneJobSpec

from . import distributed
from .adalora import restore_adalora_ranks
from .adapters import LoraDeltas, lora_deltas, save_initial_adapter, save_trained
from .checkpoint import PreemptionCallback, barrier
from .data import TaskData, load_task_data
from .estimate import num_layers, preflight
from .evaluation import evaluate
from .job import checkpoint_uri, job_identity, load_job
from .methods import MethodContext, apply_method, check_combination, count_parameters, embedding_modules
from .metrics import TrainingMetrics, record_parameters, start_metrics, stop_metrics
from .models import load_model, load_tokenizer, resolve_model
from .output import RunResult, publish_result
from .samples import base_sample_answers, exact_match_metrics, trained_samples
from .trainer import (
    KubetuneTrainer,
    SaveAtEndCallback,
    build_trainer,
    start_deepspeed_process_group,
    total_steps,
    training_arguments,
)

# bench/training_runs.py drives the pipeline through this module: it replaces build_trainer and
# start_metrics here, where the pipeline looks them up, and takes the other names from here too.
__all__ = [
    "RunResult",
    "SaveAtEndCallback",
    "TrainedRounds",
    "build_trainer",
    "job_identity",
    "load_job",
    "run",
    "start_metrics",
    "train_rounds",
]


def run(job: FineTuneJob, spec_digest: str, workdir: Path) -> RunResult:
    """Train ``job`` in this process (one of the job's ranks) and, on rank 0, publish the result."""
    spec = job.spec
    # DeepSpeed guesses its accelerator from what it can import; on a CPU-only machine say it.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    transformers.set_seed(spec.training.seed)
    check_combination(spec)
    metrics, server = start_metrics(job)
    try:
        return _run(job, spec, spec_digest, workdir, metrics)
    finally:
        stop_metrics(server)


def _run(
    job: FineTuneJob, spec: FineTuneJobSpec, spec_digest: str, workdir: Path, metrics: TrainingMetrics
) -> RunResult:
    model_dir, model_config = resolve_model(spec)
    if distributed.is_main_process():
        preflight(spec, model_config)
    tokenizer, new_token_ids = load_tokenizer(model_dir, spec)
    # Created before the model loads: under ZeRO-3 the arguments make from_pretrained partition it.
    args = training_arguments(spec, workdir, has_validation=spec.dataset.validation_split > 0)
    start_deepspeed_process_group(spec)
    data = load_task_data(spec, tokenizer, args)

    model: Any = load_model(spec, model_dir, tokenizer, data)
    base_answers = base_sample_answers(spec, model, tokenizer)
    context = MethodContext(
        task=spec.model.task,
        total_steps=total_steps(spec, len(data.train)),
        tokenizer_path=str(model_dir),
        num_layers=num_layers(model_config),
        new_token_ids=new_token_ids,
        embedding_modules=embedding_modules(model, spec),
    )
    model = apply_method(model, spec, context)
    trainable, total = count_parameters(model)
    record_parameters(metrics, trainable, total)
    initial_adapter = save_initial_adapter(model, spec, workdir)

    trained = train_rounds(spec, spec_digest, model, context, args, data, tokenizer, metrics)
    result = RunResult(
        trained.trainer.state.global_step,
        trainable,
        total,
        metrics={"train_loss": trained.train_loss},
        preempted=trained.preempted,
        log_history=trained.log_history,
        model=trained.model,
    )
    if result.preempted:
        return result
    result.samples = trained_samples(spec, trained.model, tokenizer, base_answers)
    result.metrics.update(exact_match_metrics(result.samples))
    result.metrics.update(evaluate(trained.trainer, data, spec.model.task, metrics))

    adapter_dir = workdir / "adapter"
    save_trained(
        trained.trainer, trained.model, trained.chain_deltas, spec, tokenizer, adapter_dir, initial_adapter
    )
    if distributed.is_main_process():
        result.manifest = publish_result(job, spec_digest, model_dir, adapter_dir, tokenizer, result, workdir)
    barrier()
    return result


@dataclass
class TrainedRounds:
    """The last round's Trainer and model, with what every round logged; ``chain_deltas`` holds each
    finished round's LoRA update, to be stacked into one adapter (empty without a chain)."""

    trainer: KubetuneTrainer
    model: Any
    train_loss: float
    log_history: list[dict[str, Any]]
    preempted: bool
    chain_deltas: list[LoraDeltas]


def train_rounds(
    spec: FineTuneJobSpec,
    spec_digest: str,
    model: Any,
    context: MethodContext,
    args: TrainingArguments,
    data: TaskData,
    tokenizer: PreTrainedTokenizerBase,
    metrics: TrainingMetrics,
) -> TrainedRounds:
    """Train once, or once per round of a chain, each round from its own newest checkpoint.

    A chain (COLA) folds each finished LoRA into the base and trains a fresh one on top; the
    rounds share the run's steps."""
    rounds = spec.method.chain.rounds if spec.method.chain is not None else 1
    preemption = PreemptionCallback()
    chain_deltas: list[LoraDeltas] = []
    history: list[dict[str, Any]] = []
    for round_index in range(rounds):
        if round_index > 0:
            chain_deltas.append(lora_deltas(model))
            model = apply_method(model.merge_and_unload(), spec, context)
        round_uri = checkpoint_uri(spec) if rounds == 1 else f"{checkpoint_uri(spec)}/round-{round_index}"
        round_steps = None if rounds == 1 else math.ceil(context.total_steps / rounds)
        trainer = build_trainer(
            spec, spec_digest, model, args, data, tokenizer, metrics, preemption, round_uri, round_steps
        )
        resume = trainer.checkpoints.newest(spec_digest)
        if resume is not None:
            restore_adalora_ranks(trainer.model, resume)
        train_output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        model = trainer.model
        history.extend(trainer.state.log_history)
        if preemption.stopped:
            break
    if rounds > 1 and not preemption.stopped:
        chain_deltas.append(lora_deltas(model))
    return TrainedRounds(
        trainer, model, float(train_output.training_loss), history, preemption.stopped, chain_deltas
    )
