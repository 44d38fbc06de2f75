"""The training pipeline: spec -> sources -> tokenizer and data -> model and method ->
Trainer (metrics, checkpoints, preemption, AdaLoRA) -> evaluation -> save -> publish.

Each phase is a plain function; :func:`run` strings them together. Every process of the
job runs the same code (torchrun starts them); rank 0 alone publishes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    EvalPrediction,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from kubetune.api.v1alpha1 import FineTuneJob, FineTuneJobSpec, LearningRateGroup, MethodType, Task

from . import distributed
from .checkpoint import CheckpointStore, CheckpointSyncCallback, PreemptionCallback, barrier
from .data import TaskData, build_task_data, collator_for, load_rows, save_tokenizer
from .deepspeed_config import build_deepspeed_config
from .estimate import GIB, estimate, num_layers
from .methods import (
    MethodContext,
    apply_method,
    check_combination,
    count_parameters,
    embedding_modules,
    expected_saved_fraction,
    method_for,
    quantization_config,
)
from .metrics import MetricsCallback, MetricsServer, TrainingMetrics
from .publish import check_adapter, publish
from .samples import Sample, collect, exact_match_metrics, generate_answers
from .storage import resolve_source
from .termination import DataError, InsufficientGPUMemory

log = logging.getLogger(__name__)

METRICS_PORT_ENV = "KUBETUNE_METRICS_PORT"
GPU_MEMORY_ENV = "KUBETUNE_GPU_MEMORY_BYTES"
MODEL_CLASSES: dict[Task, Any] = {
    Task.CAUSAL_LM: AutoModelForCausalLM,
    Task.SEQ_CLS: AutoModelForSequenceClassification,
    Task.TOKEN_CLS: AutoModelForTokenClassification,
    Task.QUESTION_ANSWERING: AutoModelForQuestionAnswering,
}
LABEL_NAMES = {
    Task.CAUSAL_LM: ["labels"],
    Task.SEQ_CLS: ["labels"],
    Task.TOKEN_CLS: ["labels"],
    Task.QUESTION_ANSWERING: ["start_positions", "end_positions"],
}
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class RunResult:
    """What a run produced; ``manifest`` is set on rank 0 when something was published."""

    global_step: int
    trainable_params: int
    total_params: int
    metrics: dict[str, float] = field(default_factory=dict)
    manifest: dict[str, Any] | None = None
    preempted: bool = False
    log_history: list[dict[str, Any]] = field(default_factory=list)
    model: Any = None
    """The trained model (for callers in the same process, such as tests and chained rounds)."""
    samples: list[Sample] = field(default_factory=list)
    """The answers to the spec's sample prompts (rank 0)."""


# ----------------------------------------------------------------------------------- spec


def load_job(path: Path) -> tuple[FineTuneJob, str]:
    """The job from the spec file (JSON from the ConfigMap, or YAML locally) and its sha256.

    The hash is over the file's bytes, which is how the operator hashes the ConfigMap's
    document, so a published manifest names the exact spec that made it.
    """
    raw = path.read_bytes()
    try:
        document = json.loads(raw)
    except json.JSONDecodeError:
        import yaml

        document = yaml.safe_load(raw)
    return FineTuneJob.model_validate(document), hashlib.sha256(raw).hexdigest()


def job_identity(job: FineTuneJob) -> tuple[str, str]:
    """Job name and namespace: the renderer's env wins over the spec's metadata."""
    return (
        os.environ.get("KUBETUNE_JOB_NAME") or job.name,
        os.environ.get("KUBETUNE_NAMESPACE") or job.namespace,
    )


def checkpoint_uri(spec: FineTuneJobSpec) -> str:
    return spec.checkpoint.uri or f"{spec.output.uri.rstrip('/')}/checkpoints"


# ------------------------------------------------------------------------------- pre-flight


def available_gpu_memory() -> int | None:
    """Bytes of one GPU (``KUBETUNE_GPU_MEMORY_BYTES`` overrides; None on a CPU-only machine)."""
    if os.environ.get(GPU_MEMORY_ENV):
        return int(os.environ[GPU_MEMORY_ENV])
    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    return None


def preflight(spec: FineTuneJobSpec, config: Any) -> None:
    """Refuse a job that cannot fit on its GPUs before any weight is loaded."""
    capacity = available_gpu_memory()
    if capacity is None:
        return
    needed = estimate(spec, config, world_size=distributed.world_size()).per_gpu_memory_bytes
    log.info("pre-flight: ~%.2f GiB per GPU of %.2f GiB", needed / GIB, capacity / GIB)
    if needed > capacity:
        raise InsufficientGPUMemory(
            f"needs ~{needed / GIB:.1f} GiB per GPU, has {capacity / GIB:.1f} GiB "
            "(try qlora, gradientCheckpointing, a smaller batchSizePerDevice or maxSeqLength, "
            "or deepspeed zeroStage 3 with CPU offload)"
        )


# ---------------------------------------------------------------------------- tokenizer, data


def load_tokenizer(model_dir: Path, spec: FineTuneJobSpec) -> tuple[PreTrainedTokenizerBase, tuple[int, ...]]:
    """The model's tokenizer with a pad token and the spec's added tokens; returns the new token ids."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=spec.model.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    new_ids: tuple[int, ...] = ()
    if spec.model.added_tokens:
        tokenizer.add_tokens(list(spec.model.added_tokens))
        new_ids = tuple(int(str(tokenizer.convert_tokens_to_ids(token))) for token in spec.model.added_tokens)
    return tokenizer, new_ids


def build_data(
    spec: FineTuneJobSpec, tokenizer: PreTrainedTokenizerBase, args: TrainingArguments
) -> TaskData:
    """Rank 0 of each node tokenizes first (and fills the datasets cache); the others then read it."""
    data_path = resolve_source(spec.dataset.source, hub_repo_type="dataset")
    with args.main_process_first(desc="tokenizing the dataset", local=True):
        rows = load_rows(data_path, file_type=spec.dataset.file_type)
        data = build_task_data(rows, tokenizer, spec.dataset, spec.model.task, seed=spec.training.seed)
    if (
        spec.model.num_labels is not None
        and data.num_labels is not None
        and data.num_labels > spec.model.num_labels
    ):
        raise DataError(
            f"the dataset has {data.num_labels} labels but model.numLabels is {spec.model.num_labels}"
        )
    log.info("dataset: %d training and %d validation examples", len(data.train), len(data.validation or []))
    return data


def total_steps(spec: FineTuneJobSpec, train_examples: int) -> int:
    """Optimizer steps of the whole run, as the Trainer will count them."""
    if spec.training.max_steps:
        return spec.training.max_steps
    per_process_batches = math.ceil(
        train_examples / (spec.training.batch_size_per_device * distributed.world_size())
    )
    per_epoch = max(per_process_batches // spec.training.gradient_accumulation_steps, 1)
    return max(math.ceil(spec.training.epochs * per_epoch), 1)


# --------------------------------------------------------------------------------- the model


def weights_dtype(spec: FineTuneJobSpec) -> torch.dtype:
    """Frozen weights in the training precision; full and freeze keep fp32 weights under autocast."""
    if method_for(spec).quantized:
        return getattr(torch, spec.method.effective_quantization.compute_dtype)  # type: ignore[no-any-return]
    if spec.method.type in (MethodType.FULL, MethodType.FREEZE):
        return torch.float32
    return TORCH_DTYPES[spec.training.precision]


def load_model(
    spec: FineTuneJobSpec, model_dir: Path, tokenizer: PreTrainedTokenizerBase, data: TaskData
) -> Any:
    """The base model for the task, quantized for QLoRA, with room for added tokens."""
    kwargs: dict[str, Any] = {"dtype": weights_dtype(spec), "trust_remote_code": spec.model.trust_remote_code}
    if spec.model.task in (Task.SEQ_CLS, Task.TOKEN_CLS):
        kwargs["num_labels"] = spec.model.num_labels or data.num_labels
        if data.id2label:
            kwargs["id2label"] = data.id2label
            kwargs["label2id"] = {label: index for index, label in data.id2label.items()}
    quantization = quantization_config(spec)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        if torch.cuda.is_available() and spec.deepspeed is None:
            kwargs["device_map"] = {"": distributed.local_rank()}
    model = MODEL_CLASSES[spec.model.task].from_pretrained(model_dir, **kwargs)
    if quantization is not None:
        keep_quantized_base_as_loaded(model)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if spec.model.added_tokens:
        model.resize_token_embeddings(len(tokenizer))
    return model


def keep_quantized_base_as_loaded(model: torch.nn.Module) -> None:
    """Turn off bitsandbytes' repacking of 4-bit layers for its AVX512-BF16 CPU kernel.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit layer at its first forward in eval mode
    without gradients (as every evaluation runs), rounding the block scales to bfloat16, and quantizes them
    again whenever the state dict is read (as every checkpoint does). Each eval-and-save cycle of a run on
    such a CPU then moved the frozen base a little; the reloaded adapter's logits no longer matched the
    trained model's. The repacking only speeds up CPU inference, so training goes without it.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010 (a bitsandbytes attribute)


# ----------------------------------------------------------------------------------- training


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


ADALORA_RANK_PATTERN_FILE = "kubetune-adalora-rank-pattern.json"


def adalora_config_of(model: Any) -> Any:
    """The AdaLoRA config of a peft model, or None for any other model."""
    from peft import AdaLoraConfig

    config = getattr(model, "peft_config", {}).get("default")
    return config if isinstance(config, AdaLoraConfig) else None


def restore_adalora_ranks(model: Any, checkpoint: Path) -> None:
    """Put back the rank pattern a resumed AdaLoRA run had reached (its masks continue from there)."""
    config = adalora_config_of(model)
    pattern_file = checkpoint / ADALORA_RANK_PATTERN_FILE
    if config is not None and pattern_file.exists():
        config.rank_pattern = json.loads(pattern_file.read_text())


class AdaLoraCallback(TrainerCallback):
    """AdaLoRA reallocates ranks from the gradients: after each optimizer step, before zero_grad."""

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = kwargs["model"]
        peft_model = getattr(model, "module", model)  # DDP wraps it
        peft_model.base_model.update_and_allocate(state.global_step)


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


def pad_multiple() -> int | None:
    """What batches are padded to a multiple of: 8 on a GPU, whose tensor cores want such shapes;
    on the CPU nothing gains from it, and it only adds padded tokens (1.8% more on the mixed-length
    set of bench/trainer_throughput), so there each batch is padded to its longest row."""
    return 8 if torch.cuda.is_available() else None


class SaveAtEndCallback(TrainerCallback):
    """Checkpoint the last step too: a pod lost while publishing (or between chain rounds)
    restarts straight into publishing instead of training again."""

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.global_step >= state.max_steps:
            control.should_save = True


def lora_deltas(model: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each LoRA layer's update as (A, scaling * B), by module name."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        layer: Any = module  # peft's layers are typed loosely
        if "default" in layer.lora_A:
            a = layer.lora_A["default"].weight.detach().float().cpu().clone()
            b = layer.lora_B["default"].weight.detach().float().cpu().clone() * layer.scaling["default"]
            deltas[name] = (a, b)
    return deltas


def save_stacked_lora(
    rounds: list[dict[str, tuple[torch.Tensor, torch.Tensor]]], model: Any, target: Path
) -> None:
    """The chain's rounds as one LoRA for the original base: sum_i B_i A_i = [B_1 .. B_R] [A_1; ..; A_R].

    Its rank is the sum of the rounds' ranks and its scaling 1 (the rounds' scalings are folded into B).
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    config = model.peft_config["default"]
    rank = sum(next(iter(deltas.values()))[0].shape[0] for deltas in rounds)
    tensors = {}
    for name in rounds[0]:
        tensors[f"{name}.lora_A.weight"] = torch.cat(
            [deltas[name][0] for deltas in rounds], dim=0
        ).contiguous()
        tensors[f"{name}.lora_B.weight"] = torch.cat(
            [deltas[name][1] for deltas in rounds], dim=1
        ).contiguous()
    target.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target / "adapter_model.safetensors"))
    stacked = LoraConfig(
        task_type=config.task_type,
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        target_modules=config.target_modules,
        bias=config.bias,
        fan_in_fan_out=config.fan_in_fan_out,
        base_model_name_or_path=config.base_model_name_or_path,
    )
    stacked.save_pretrained(str(target))


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


def classification_metrics(task: Task) -> Any:
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


# -------------------------------------------------------------------------------- saving


PEFT_SHAPE_WARNING = r"Adapter '.*': \d+ LoRA tensor\(s\) have invalid shape"
"""peft's warning on saving lora_A / lora_B tensors that are 1-D or have a zero dimension."""


@contextlib.contextmanager
def pruned_ranks_expected(spec: FineTuneJobSpec) -> Iterator[None]:
    """AdaLoRA's final save prunes each module to the ranks it kept, some to none: 2-D tensors with a zero
    dimension, which peft warns of as ZeRO-3 shards saved without gathering. That would send the user after a
    fault that is not there; the fault it means (1-D placeholders) is refused by `check_adapter` before
    anything is published, with a message of its own."""
    if spec.method.type != MethodType.ADALORA:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFT_SHAPE_WARNING, category=UserWarning)
        yield


def save_adapter(
    trainer: Trainer,
    spec: FineTuneJobSpec,
    tokenizer: PreTrainedTokenizerBase,
    target: Path,
    initial_adapter: Path | None,
) -> None:
    """Save what was trained (all ranks take part: ZeRO-3 gathers), plus the tokenizer."""
    if initial_adapter is not None:
        # PiSSA/OLoRA changed the base weights; converting gives a plain LoRA (rank 2r) for the original base.
        if distributed.is_main_process():
            trained: Any = trainer.model
            trained.save_pretrained(target, path_initial_model_for_weight_conversion=str(initial_adapter))
    else:
        with pruned_ranks_expected(spec):
            trainer.save_model(str(target))
    if distributed.is_main_process():
        save_tokenizer(tokenizer, spec.dataset, target)
        for leftover in ("training_args.bin",):
            (target / leftover).unlink(missing_ok=True)
    barrier()


def merge_into_base(
    spec: FineTuneJobSpec,
    model_dir: Path,
    adapter_dir: Path,
    target: Path,
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    """Rank 0: load the unquantized base and the adapter afresh, merge, save the whole model.

    Loading afresh (not merging the training model) works the same after ZeRO-3 and QLoRA:
    the merged weights are never partitioned or re-quantized.
    """
    from peft import PeftModel
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # type: ignore[no-untyped-call]  # otherwise from_pretrained would be a collective
    dtype = TORCH_DTYPES[spec.training.precision]
    base = MODEL_CLASSES[spec.model.task].from_pretrained(
        model_dir, dtype=dtype, trust_remote_code=spec.model.trust_remote_code
    )
    if spec.model.added_tokens:
        base.resize_token_embeddings(len(tokenizer))
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(target)
    save_tokenizer(tokenizer, spec.dataset, target)


# ----------------------------------------------------------------------------------- run


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
        linger = float(os.environ.get("KUBETUNE_METRICS_LINGER_SECONDS", "0"))
        if server is not None:
            if linger > 0:
                import time

                time.sleep(linger)  # one more scrape of the final values
            server.close()


def _run(
    job: FineTuneJob, spec: FineTuneJobSpec, spec_digest: str, workdir: Path, metrics: TrainingMetrics
) -> RunResult:
    model_dir = resolve_source(spec.model.source, spec.model.revision)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=spec.model.trust_remote_code)
    if distributed.is_main_process():
        preflight(spec, config)
    tokenizer, new_token_ids = load_tokenizer(model_dir, spec)
    # Created before the model loads: under ZeRO-3 the arguments make from_pretrained partition it.
    args = training_arguments(spec, workdir, has_validation=spec.dataset.validation_split > 0)
    if spec.deepspeed is not None:
        import deepspeed

        # zero.Init in from_pretrained sizes the partitions by the world size: the process
        # group must exist before the model loads (the Trainer would create it later).
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    data = build_data(spec, tokenizer, args)
    steps = total_steps(spec, len(data.train))

    model: Any = load_model(spec, model_dir, tokenizer, data)
    base_answers = base_sample_answers(spec, model, tokenizer)
    context = MethodContext(
        task=spec.model.task,
        total_steps=steps,
        tokenizer_path=str(model_dir),
        num_layers=num_layers(config),
        new_token_ids=new_token_ids,
        embedding_modules=embedding_modules(model, spec),
    )
    model = apply_method(model, spec, context)
    trainable, total = count_parameters(model)
    metrics.trainable_parameters.set(trainable)
    metrics.parameters.set(total)
    if distributed.is_main_process():
        print(
            f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100.0 * trainable / max(total, 1):.4f}",
            flush=True,
        )

    initial_adapter = None
    if spec.method.type in (MethodType.LORA, MethodType.DORA) and spec.method.effective_lora.init in (
        "pissa",
        "olora",
    ):
        initial_adapter = workdir / "initial-adapter"
        if distributed.is_main_process():
            model.peft_config["default"].init_lora_weights = True  # saved as a plain LoRA init
            model.save_pretrained(initial_adapter)
            model.peft_config["default"].init_lora_weights = spec.method.effective_lora.init
        barrier()

    rounds = spec.method.chain.rounds if spec.method.chain is not None else 1
    preemption = PreemptionCallback()
    chain_deltas: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
    history: list[dict[str, Any]] = []
    for round_index in range(rounds):
        if round_index > 0:
            # COLA: fold the finished LoRA into the base and start a fresh one on top.
            chain_deltas.append(lora_deltas(model))
            model = apply_method(model.merge_and_unload(), spec, context)
        round_uri = checkpoint_uri(spec) if rounds == 1 else f"{checkpoint_uri(spec)}/round-{round_index}"
        round_steps = None if rounds == 1 else math.ceil(steps / rounds)
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
    result = RunResult(
        trainer.state.global_step,
        trainable,
        total,
        preempted=preemption.stopped,
        log_history=history,
        model=model,
    )
    result.metrics["train_loss"] = float(train_output.training_loss)
    if preemption.stopped:
        return result

    if spec.samples is not None:
        result.samples = trained_samples(spec, model, tokenizer, base_answers)
        result.metrics.update(exact_match_metrics(result.samples))

    if data.validation is not None:
        evaluation = trainer.evaluate()
        if spec.model.task == Task.CAUSAL_LM and "eval_loss" in evaluation:
            evaluation["eval_perplexity"] = math.exp(min(evaluation["eval_loss"], 50.0))
        metrics.record_eval(evaluation)
        result.metrics.update(
            {
                k: float(v)
                for k, v in evaluation.items()
                if k in ("eval_loss", "eval_perplexity", "eval_accuracy", "eval_f1")
            }
        )

    adapter_dir = workdir / "adapter"
    if distributed.is_main_process() and adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    if chain_deltas:
        if distributed.is_main_process():
            if spec.method.type == MethodType.DORA:
                # DoRA rescales each weight by a learned magnitude: rounds do not add up to one
                # adapter, so a DoRA chain's result is the merged model.
                model.merge_and_unload().save_pretrained(adapter_dir)
            else:
                save_stacked_lora(chain_deltas, model, adapter_dir)
            save_tokenizer(tokenizer, spec.dataset, adapter_dir)
        barrier()
    else:
        save_adapter(trainer, spec, tokenizer, adapter_dir, initial_adapter)
    if distributed.is_main_process():
        result.manifest = publish_result(
            job, spec, spec_digest, model_dir, adapter_dir, tokenizer, result, workdir
        )
    barrier()
    return result


def zero3_partitioned(spec: FineTuneJobSpec) -> bool:
    """Whether each rank holds only a shard of the weights."""
    return spec.deepspeed is not None and spec.deepspeed.zero_stage == 3 and distributed.world_size() > 1


def base_sample_answers(
    spec: FineTuneJobSpec, model: Any, tokenizer: PreTrainedTokenizerBase
) -> list[str] | None:
    """Rank 0: the base model's answers to the sample prompts, before any method touches it.

    Under ZeRO-3 the freshly loaded shards are only gathered once DeepSpeed's engine runs the
    model, so a partitioned base gives no answers before training."""
    if spec.samples is None or not distributed.is_main_process():
        return None
    if zero3_partitioned(spec):
        log.info("samples: no base answers under ZeRO-3 (the base is partitioned before training)")
        return None
    return generate_answers(model, tokenizer, spec)


def trained_samples(
    spec: FineTuneJobSpec, model: Any, tokenizer: PreTrainedTokenizerBase, base_answers: list[str] | None
) -> list[Sample]:
    """The trained model's answers (rank 0; under ZeRO-3 every rank takes part in each forward pass)."""
    synced = zero3_partitioned(spec)
    if not (synced or distributed.is_main_process()):
        return []
    answers = generate_answers(model, tokenizer, spec, synced_gpus=synced)
    if not distributed.is_main_process():
        return []
    samples = collect(spec, answers, base_answers)
    for sample in samples:
        log.debug("sample %r -> %r (base %r)", sample.prompt, sample.answer, sample.base_answer)
    scores = exact_match_metrics(samples)
    log.info(
        "samples: %d answered%s",
        len(samples),
        "".join(f", {name} {value:.0%}" for name, value in scores.items()),
    )
    return samples


def publish_result(
    job: FineTuneJob,
    spec: FineTuneJobSpec,
    spec_digest: str,
    model_dir: Path,
    adapter_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    result: RunResult,
    workdir: Path,
) -> dict[str, Any]:
    """Rank 0: check the saved weights, merge them if asked, publish with the manifest last."""
    fraction = expected_saved_fraction(spec)
    merged_chain = spec.method.chain is not None and spec.method.type == MethodType.DORA
    adapter_methods = method_for(spec).peft_config is not None and not merged_chain
    expected = int(result.trainable_params * fraction) if fraction is not None and adapter_methods else None
    check_adapter(adapter_dir, expected if adapter_methods else result.total_params)
    published = adapter_dir
    if spec.output.merge_weights and adapter_methods:
        published = workdir / "merged"
        shutil.rmtree(published, ignore_errors=True)
        merge_into_base(spec, model_dir, adapter_dir, published, tokenizer)
        check_adapter(published, result.total_params)
    name, namespace = job_identity(job)
    return publish(
        published,
        spec.output.uri,
        metrics=result.metrics,
        spec_digest=spec_digest,
        extra={
            "job": {"name": name, "namespace": namespace},
            "method": spec.method.type.value,
            "task": spec.model.task.value,
            "baseModel": {"source": spec.model.source, "revision": spec.model.revision},
            "merged": published != adapter_dir or merged_chain,
            "trainableParams": result.trainable_params,
            "totalParams": result.total_params,
            "globalStep": result.global_step,
            **({"samples": [s.to_manifest() for s in result.samples]} if result.samples else {}),
        },
    )
