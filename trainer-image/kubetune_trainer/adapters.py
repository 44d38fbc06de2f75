"""What was trained, as files for the original base: the adapter (PiSSA and OLoRA converted back to
a plain LoRA), a chain's rounds stacked into one LoRA, and the base with an adapter merged in."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, Trainer

from kubetune.api.v1alpha1 import FineTuneJobSpec, MethodType

from . import distributed
from .adalora import pruned_ranks_expected
from .checkpoint import barrier
from .data import save_tokenizer
from .models import MODEL_CLASSES, TORCH_DTYPES

LoraDeltas = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Each LoRA layer's update as (A, scaling * B), by module name."""


def save_initial_adapter(model: Any, spec: FineTuneJobSpec, workdir: Path) -> Path | None:
    """PiSSA and OLoRA start from weights taken out of the base: save that starting adapter, which
    converts the trained one back to a LoRA for the original base (None for every other init)."""
    lora = spec.method.type in (MethodType.LORA, MethodType.DORA)
    if not (lora and spec.method.effective_lora.init in ("pissa", "olora")):
        return None
    initial_adapter = workdir / "initial-adapter"
    if distributed.is_main_process():
        model.peft_config["default"].init_lora_weights = True  # saved as a plain LoRA init
        model.save_pretrained(initial_adapter)
        model.peft_config["default"].init_lora_weights = spec.method.effective_lora.init
    barrier()
    return initial_adapter


def save_trained(
    trainer: Trainer,
    model: Any,
    chain_deltas: list[LoraDeltas],
    spec: FineTuneJobSpec,
    tokenizer: PreTrainedTokenizerBase,
    target: Path,
    initial_adapter: Path | None,
) -> None:
    """Save what the run trained into ``target``, replacing what an earlier attempt left there:
    a chain's rounds (``chain_deltas``) as one adapter, else the adapter the Trainer holds."""
    if distributed.is_main_process() and target.exists():
        shutil.rmtree(target)
    if chain_deltas:
        save_chain(chain_deltas, model, spec, tokenizer, target)
    else:
        save_adapter(trainer, spec, tokenizer, target, initial_adapter)


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


def save_chain(
    rounds: list[LoraDeltas],
    model: Any,
    spec: FineTuneJobSpec,
    tokenizer: PreTrainedTokenizerBase,
    target: Path,
) -> None:
    """Rank 0: a chain's rounds as one LoRA for the original base (a DoRA chain as the merged
    model), plus the tokenizer."""
    if distributed.is_main_process():
        if spec.method.type == MethodType.DORA:
            # DoRA rescales each weight by a learned magnitude: rounds do not add up to one
            # adapter, so a DoRA chain's result is the merged model.
            model.merge_and_unload().save_pretrained(target)
        else:
            save_stacked_lora(rounds, model, target)
        save_tokenizer(tokenizer, spec.dataset, target)
    barrier()


def lora_deltas(model: Any) -> LoraDeltas:
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


def save_stacked_lora(rounds: list[LoraDeltas], model: Any, target: Path) -> None:
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
