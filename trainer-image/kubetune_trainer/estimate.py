"""Trainable parameters and per-GPU memory of a job, from the model's config alone.

The model is built on the meta device (no weights, no memory) and the method applied
to it exactly as in training, so the trainable count is peft's own. Memory is the sum
of the usual terms per GPU:

- frozen base weights: 2 bytes per parameter in 16-bit, 4 in fp32, ~0.55 for 4-bit NF4
  with double quantization (quantized linear layers only), 1 for 8-bit; divided by the
  world size under ZeRO-3, a quantized base too (ZeRO-3 partitions it at load);
- trainable weights, gradients and AdamW state: 4 + 4 + 8 bytes per trainable parameter
  (fp32 master copy), ZeRO-1 shards the optimizer state, ZeRO-2 also the gradients,
  ZeRO-3 also the weights; CPU offload moves the optimizer state (and weights) off the GPU;
- activations: per layer and token ~``34 * hidden`` bytes in 16-bit (Korthikanti et al.
  2022, without the attention-score term that SDPA/flash attention do not store), ~``2 *
  hidden`` with gradient checkpointing; plus the logits in fp32;
- a fixed 1 GiB for the CUDA context, allocator slack and communication buffers.

The terms are `kubetune.fit.memory`, which the operator's check before the download uses too.
The trainer's pre-flight check (:func:`preflight`) refuses a job whose estimate exceeds its GPU
before any weight is loaded.

Run as ``python -m kubetune_trainer.estimate -f job.yaml [--format json]`` (the ``kubetune
estimate`` CLI does, so the operator package never imports torch).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.api.v1alpha1 import FineTuneJob, FineTuneJobSpec, MethodType, Task
from kubetune.fit import OVERHEAD_BYTES, memory

from . import distributed
from .termination import InsufficientGPUMemory, TrainerError

log = logging.getLogger(__name__)

GIB = 1024**3
GPU_MEMORY_ENV = "KUBETUNE_GPU_MEMORY_BYTES"


@dataclass(frozen=True)
class Estimate:
    trainable_params: int
    total_params: int
    per_gpu_memory_bytes: int
    weights_bytes: int
    trainable_state_bytes: int
    activations_bytes: int
    world_size: int

    def to_json(self) -> dict[str, Any]:
        """camelCase keys, like the API."""
        return {
            "trainableParams": self.trainable_params,
            "totalParams": self.total_params,
            "trainablePercent": round(100.0 * self.trainable_params / max(self.total_params, 1), 4),
            "perGpuMemoryBytes": self.per_gpu_memory_bytes,
            "perGpuMemoryGiB": round(self.per_gpu_memory_bytes / GIB, 2),
            "breakdown": {
                "weightsBytes": self.weights_bytes,
                "trainableStateBytes": self.trainable_state_bytes,
                "activationsBytes": self.activations_bytes,
                "overheadBytes": OVERHEAD_BYTES,
            },
            "worldSize": self.world_size,
        }


def _model_class(task: Task) -> Any:
    import transformers

    return {
        Task.CAUSAL_LM: transformers.AutoModelForCausalLM,
        Task.SEQ_CLS: transformers.AutoModelForSequenceClassification,
        Task.TOKEN_CLS: transformers.AutoModelForTokenClassification,
        Task.QUESTION_ANSWERING: transformers.AutoModelForQuestionAnswering,
    }[task]


def num_layers(config: Any) -> int:
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return 1


def meta_model(spec: FineTuneJobSpec, config: Any, total_steps: int = 1000) -> Any:
    """The model with the method applied, on the meta device (no memory, no weights)."""
    import torch

    from .methods import MethodContext, apply_method, embedding_modules

    if spec.model.num_labels:
        config.num_labels = spec.model.num_labels
    with torch.device("meta"):
        model = _model_class(spec.model.task).from_config(config)
    if spec.model.added_tokens:
        with torch.device("meta"):
            model.resize_token_embeddings(
                model.get_input_embeddings().num_embeddings + len(spec.model.added_tokens)
            )
    meta_spec = _without_weight_dependent_init(spec)
    context = MethodContext(
        task=spec.model.task,
        total_steps=total_steps,
        num_layers=num_layers(config),
        new_token_ids=tuple(range(len(spec.model.added_tokens))),
        embedding_modules=embedding_modules(model, spec),
    )
    with torch.device("meta"):
        return apply_method(model, meta_spec, context)


def _without_weight_dependent_init(spec: FineTuneJobSpec) -> FineTuneJobSpec:
    """Initialisations that read weights (PiSSA, OLoRA, text-initialised prompts) cannot run on meta
    tensors; they do not change the parameter count, so the estimate uses the default ones, and
    QLoRA is estimated as LoRA (quantization changes bytes, not counts)."""
    method = spec.method
    updates: dict[str, Any] = {}
    if method.lora is not None and method.lora.init in ("pissa", "olora"):
        updates["lora"] = method.lora.model_copy(update={"init": "default"})
    if method.prompt is not None and method.prompt.init_text:
        updates["prompt"] = method.prompt.model_copy(update={"init_text": None})
    if method.type == MethodType.QLORA:
        updates["type"] = MethodType.LORA
        updates["quantization"] = None
    if not updates:
        return spec
    return spec.model_copy(update={"method": method.model_copy(update=updates)})


def estimate(spec: FineTuneJobSpec, config: Any, world_size: int | None = None) -> Estimate:
    """Trainable/total parameters and the per-GPU memory of ``spec`` on a model with ``config``."""
    from .methods import count_parameters

    model = meta_model(spec, config)
    trainable, total = count_parameters(model)
    qlora = spec.method.type == MethodType.QLORA
    found = memory(
        spec,
        trainable=trainable,
        frozen=total - trainable,
        quantizable=_linear_parameters(model) if qlora else 0,
        hidden=int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 0),
        layers=num_layers(config),
        vocab_size=int(getattr(config, "vocab_size", 0)),
        world_size=world_size,
    )
    return Estimate(
        trainable,
        total,
        found.per_gpu,
        found.weights,
        found.trainable_state,
        found.activations,
        found.world_size,
    )


def _linear_parameters(model: Any) -> int:
    """Parameters in the frozen nn.Linear layers bitsandbytes would quantize (all but the output head)."""
    from torch import nn

    head = model.get_output_embeddings()
    return sum(
        module.weight.numel()
        for module in model.modules()
        if isinstance(module, nn.Linear) and module is not head and not module.weight.requires_grad
    )


def available_gpu_memory() -> int | None:
    """Bytes of one GPU (``KUBETUNE_GPU_MEMORY_BYTES`` overrides; None on a CPU-only machine)."""
    if os.environ.get(GPU_MEMORY_ENV):
        return int(os.environ[GPU_MEMORY_ENV])
    import torch

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


def read_job(path: Path) -> FineTuneJob:
    import yaml

    document = yaml.safe_load(path.read_text())
    return FineTuneJob.model_validate(document)


def model_config(spec: FineTuneJobSpec) -> Any:
    """The model's config, downloading only config.json for remote sources."""
    from transformers import AutoConfig

    from .storage import parse_uri, resolve_source

    source = parse_uri(spec.model.source)
    if source.scheme == "hf":
        from huggingface_hub import hf_hub_download

        repo = f"{source.authority}/{source.path.split('/', 1)[0]}"
        config_file = hf_hub_download(repo, "config.json", revision=spec.model.revision)
        return AutoConfig.from_pretrained(
            Path(config_file).parent, trust_remote_code=spec.model.trust_remote_code
        )
    if source.scheme == "s3":
        config_dir = resolve_source(
            f"{spec.model.source.rstrip('/')}/config.json", spec.model.revision
        ).parent
        return AutoConfig.from_pretrained(config_dir, trust_remote_code=spec.model.trust_remote_code)
    return AutoConfig.from_pretrained(
        resolve_source(spec.model.source), trust_remote_code=spec.model.trust_remote_code
    )


def format_text(job: FineTuneJob, result: Estimate) -> str:
    share = 100.0 * result.trainable_params / max(result.total_params, 1)
    return "\n".join(
        [
            f"job:               {job.name} ({job.spec.method.type.value}, {job.spec.training.precision}, "
            f"ZeRO-{job.spec.deepspeed.zero_stage if job.spec.deepspeed else 0}, {result.world_size} process(es))",
            f"trainable params:  {result.trainable_params:,} of {result.total_params:,} ({share:.4f}%)",
            f"per-GPU memory:    ~{result.per_gpu_memory_bytes / GIB:.2f} GiB",
            f"  weights          {result.weights_bytes / GIB:.2f} GiB",
            f"  trainable state  {result.trainable_state_bytes / GIB:.2f} GiB (weights, gradients, AdamW)",
            f"  activations      {result.activations_bytes / GIB:.2f} GiB",
            f"  overhead         {OVERHEAD_BYTES / GIB:.2f} GiB",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubetune_trainer.estimate", description=__doc__.splitlines()[0]
    )
    parser.add_argument("-f", "--file", required=True, type=Path, help="FineTuneJob manifest (YAML or JSON)")
    parser.add_argument("--format", choices=("table", "text", "json"), default="table")
    args = parser.parse_args(argv)
    try:
        job = read_job(args.file)
        result = estimate(job.spec, model_config(job.spec))
    except TrainerError as error:
        print(f"{error.reason}: {error}", file=sys.stderr)
        return 1
    if args.format == "json":
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(format_text(job, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
