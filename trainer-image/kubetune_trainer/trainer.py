"""The Hugging Face Trainer as a job runs it: its arguments from the spec, the subclass with
per-group learning rates, CPU Adam and whole AdaLoRA checkpoints, and the callbacks wired in."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from kubetune.api.v1alpha1 import FineTuneJobSpec, LearningRateGroup, MethodType, Task

from . import distributed
from .adalora import ADALORA_RANK_PATTERN_FILE, AdaLoraCallback, adalora_config_of
from .checkpoint import CheckpointStore, CheckpointSyncCallback, PreemptionCallback
from .data import TaskData, collator_for
from .deepspeed_config import build_deepspeed_config
from .evaluation import classification_metrics
from .metrics import MetricsCallback, TrainingMetrics

log = logging.getLogger(__name__)

LABEL_NAMES = {
    Task.CAUSAL_LM: ["labels"],
    Task.SEQ_CLS: ["labels"],
    Task.TOKEN_CLS: ["labels"],
    Task.QUESTION_ANSWERING: ["start_positions", "end_positions"],
}


def total_steps(spec: FineTuneJobSpec, train_examples: int) -> int:
    """Optimizer steps of the whole run, as the Trainer will count them."""
    if spec.training.max_steps:
        return spec.training.max_steps
    per_process_batches = math.ceil(
        train_examples / (spec.training.batch_size_per_device * distributed.world_size())
    )
    per_epoch = max(per_process_batches // spec.training.gradient_accumulation_steps, 1)
    return max(math.ceil(spec.training.epochs * per_epoch), 1)


def checkpointing_arguments(enabled: bool) -> dict[str, Any]:
    """Activation checkpointing under the name this transformers uses (renamed in 5.x; the old name
    still works, with a warning, until 6)."""
    if not enabled:
        return {}
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    # Non-reentrant checkpointing needs no input gradients, so frozen embeddings under peft work as they are.
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}}


def training_arguments(spec: FineTuneJobSpec, workdir: Path, has_validation: bool) -> TrainingArguments:
    """The Trainer's arguments from the spec. Creating them also sets up torch.distributed."""
    training = spec.training
    evaluate_during = has_validation and training.eval_every_steps is not None
    on_gpu = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(workdir / "checkpoints"),
        per_device_train_batch_size=training.batch_size_per_device,
        per_device_eval_batch_size=training.batch_size_per_device,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.scheduler,
        warmup_steps=training.warmup_ratio,
        weight_decay=training.weight_decay,
        optim=training.optimizer,
        max_grad_norm=training.max_grad_norm,
        num_train_epochs=training.epochs,
        max_steps=training.max_steps or -1,
        bf16=training.precision == "bf16",
        fp16=training.precision == "fp16",
        **checkpointing_arguments(training.gradient_checkpointing),
        seed=training.seed,
        data_seed=training.seed,
        logging_steps=training.log_every_steps,
        eval_strategy="steps" if evaluate_during else "no",
        eval_steps=training.eval_every_steps if evaluate_during else None,
        save_strategy="steps",
        save_steps=spec.checkpoint.every_steps,
        save_total_limit=spec.checkpoint.keep,
        deepspeed=build_deepspeed_config(spec),
        ddp_find_unused_parameters=False,
        include_num_input_tokens_seen="non_padding",
        label_names=LABEL_NAMES[spec.model.task],
        remove_unused_columns=False,
        report_to=[],
        use_cpu=not on_gpu,
        dataloader_pin_memory=on_gpu,
        disable_tqdm=not sys.stderr.isatty(),
        log_level="warning",
        log_level_replica="warning",
    )


def start_deepspeed_process_group(spec: FineTuneJobSpec) -> None:
    """Under DeepSpeed, create the process group before the model loads: zero.Init in
    from_pretrained sizes the partitions by the world size (the Trainer would create it later)."""
    if spec.deepspeed is None:
        return
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def pad_multiple() -> int | None:
    """What batches are padded to a multiple of: 8 on a GPU, whose tensor cores want such shapes;
    on the CPU nothing gains from it, and it only adds padded tokens (1.8% more on the mixed-length
    set of bench/trainer_throughput), so there each batch is padded to its longest row."""
    return 8 if torch.cuda.is_available() else None


class KubetuneTrainer(Trainer):
    """The Trainer with per-group learning rates and DeepSpeed's CPU Adam for offloaded optimizer state."""

    checkpoints: CheckpointStore
    """Where this run's checkpoints are kept (set by build_trainer)."""

    def __init__(
        self,
        *args: Any,
        learning_rate_groups: Sequence[LearningRateGroup] = (),
        cpu_adam: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.learning_rate_groups = [(re.compile(g.match), g) for g in learning_rate_groups]
        self.cpu_adam = cpu_adam

    def parameter_groups(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        """One group per (learning rate, weight decay); a parameter joins the first matching spec group."""
        decay = set(self.get_decay_parameter_names(model))
        groups: dict[tuple[str, float, float], list[torch.nn.Parameter]] = {}
        for name, parameter in model.named_parameters():
            if not parameter.requires_grad:
                continue
            match = next((g for pattern, g in self.learning_rate_groups if pattern.search(name)), None)
            label = match.name if match else "default"
            rate = match.learning_rate if match else self.args.learning_rate
            weight_decay = (
                match.weight_decay if match and match.weight_decay is not None else self.args.weight_decay
            )
            groups.setdefault((label, rate, weight_decay if name in decay else 0.0), []).append(parameter)
        return [
            {"params": params, "lr": rate, "weight_decay": wd, "group_name": label}
            for (label, rate, wd), params in groups.items()
        ]

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """AdaLoRA checkpoints keep whole (unpruned) tensors, so that resuming can load them and
        their optimizer state; the rank pattern reached so far is saved beside them."""
        config = adalora_config_of(self.model)
        if config is None:
            super()._save_checkpoint(model, trial)
            return
        pattern = config.rank_pattern
        config.rank_pattern = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            config.rank_pattern = pattern
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        if pattern is not None and self.args.should_save:
            (folder / ADALORA_RANK_PATTERN_FILE).write_text(json.dumps(pattern))

    def create_optimizer(self, model: Any = None) -> Any:
        if self.optimizer is not None or not (self.learning_rate_groups or self.cpu_adam):
            return super().create_optimizer(model) if self.optimizer is None else self.optimizer
        trained: Any = self.model if model is None else model
        groups = self.parameter_groups(trained)
        for group in groups:
            log.info(
                "parameter group %s: %d tensors, lr %g",
                group["group_name"],
                len(group["params"]),
                group["lr"],
            )
        if self.cpu_adam:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            self.optimizer = DeepSpeedCPUAdam(
                groups,
                lr=self.args.learning_rate,
                betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon,
                weight_decay=self.args.weight_decay,
                adamw_mode=True,
            )
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, trained)
            optimizer_kwargs.pop("lr", None)
            self.optimizer = optimizer_cls(groups, lr=self.args.learning_rate, **optimizer_kwargs)
        return self.optimizer


class SaveAtEndCallback(TrainerCallback):
    """Checkpoint the last step too: a pod lost while publishing (or between chain rounds)
    restarts straight into publishing instead of training again."""

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.global_step >= state.max_steps:
            control.should_save = True


def build_trainer(
    spec: FineTuneJobSpec,
    spec_digest: str,
    model: Any,
    args: TrainingArguments,
    data: TaskData,
    tokenizer: PreTrainedTokenizerBase,
    metrics: TrainingMetrics,
    preemption: PreemptionCallback,
    checkpoints_uri: str,
    max_steps: int | None = None,
) -> KubetuneTrainer:
    """The Trainer for one run (or one chain round) with every callback wired in."""
    if max_steps is not None:
        args = dataclasses.replace(args, max_steps=max_steps)
    store = CheckpointStore(checkpoints_uri)
    samples_per_step = spec.training.batch_size_per_device * spec.training.gradient_accumulation_steps
    callbacks: list[TrainerCallback] = [
        MetricsCallback(metrics, samples_per_step * distributed.world_size()),
        SaveAtEndCallback(),
        CheckpointSyncCallback(store, spec.checkpoint.keep, spec_digest, metrics),
        preemption,
    ]
    if spec.method.type == MethodType.ADALORA:
        callbacks.append(AdaLoraCallback())
    trainer = KubetuneTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.validation,
        data_collator=collator_for(spec.model.task, tokenizer, pad_multiple()),
        processing_class=tokenizer,
        compute_metrics=None
        if spec.model.task == Task.CAUSAL_LM
        else classification_metrics(spec.model.task),
        callbacks=callbacks,
        learning_rate_groups=spec.training.learning_rate_groups,
        cpu_adam=spec.deepspeed is not None and spec.deepspeed.offload_optimizer == "cpu",
    )
    trainer.checkpoints = store
    return trainer
