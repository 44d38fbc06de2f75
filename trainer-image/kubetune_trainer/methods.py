"""The fine-tuning methods: one registry entry per ``method.type``.

An entry says how to build the method's peft config from the spec, whether the base is
quantized, and how to choose trainable parameters for the methods peft does not wrap
(freeze, full). Adding a method is adding a row to :data:`METHODS`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import (
    AdaLoraConfig,
    AdaptionPromptConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
    prepare_model_for_kbit_training,
)
from torch import nn

from kubetune.api.v1alpha1 import FineTuneJobSpec, LoHaSpec, LoKrSpec, MethodSpec, MethodType, Task

from .termination import SpecError

log = logging.getLogger(__name__)

PEFT_TASK_TYPES = {
    Task.CAUSAL_LM: TaskType.CAUSAL_LM,
    Task.SEQ_CLS: TaskType.SEQ_CLS,
    Task.TOKEN_CLS: TaskType.TOKEN_CLS,
    Task.QUESTION_ANSWERING: TaskType.QUESTION_ANS,
}
# Heads that transformers puts on top of a base model for each task; always trained.
HEAD_PATTERN = re.compile(r"(^|\.)(score|classifier|qa_outputs)\.")


@dataclass(frozen=True)
class MethodContext:
    """What a method needs besides its spec block: facts about the run and the model."""

    task: Task = Task.CAUSAL_LM
    total_steps: int = 1
    tokenizer_path: str | None = None
    num_layers: int = 1
    new_token_ids: tuple[int, ...] = ()
    embedding_modules: tuple[str, ...] = ()
    """Names of the input (and untied output) embedding modules, trained when tokens were added."""

    @property
    def peft_task(self) -> TaskType:
        return PEFT_TASK_TYPES[self.task]


PeftBuilder = Callable[[MethodSpec, MethodContext], PeftConfig]
Preparer = Callable[[nn.Module, MethodSpec, MethodContext], None]


@dataclass(frozen=True)
class Method:
    """How one ``method.type`` is applied to a loaded model."""

    peft_config: PeftBuilder | None = None
    """Builds the peft config; None for methods that train base weights directly."""
    prepare: Preparer | None = None
    """Sets ``requires_grad`` for methods without a peft wrapper."""
    quantized: bool = False
    """The base is loaded through bitsandbytes (QLoRA)."""
    prompt_learning: bool = False
    """Virtual tokens: nothing to merge, no added-token training."""
    notes: tuple[str, ...] = field(default_factory=tuple)


def _targets(modules: list[str]) -> list[str] | str:
    return "all-linear" if modules == ["all-linear"] else list(modules)


def _saved_modules(extra: list[str], context: MethodContext) -> list[str] | None:
    modules = [*extra, *context.embedding_modules]
    return modules or None


def lora_config(method: MethodSpec, context: MethodContext) -> PeftConfig:
    lora = method.effective_lora
    init: Any = True if lora.init == "default" else lora.init
    return LoraConfig(
        task_type=context.peft_task,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=_targets(lora.target_modules),
        bias=lora.bias,
        fan_in_fan_out=lora.fan_in_fan_out,
        init_lora_weights=init,
        modules_to_save=list(lora.modules_to_save) or None,
        use_rslora=lora.rs_lora,
        use_dora=method.type == MethodType.DORA,
        # Only the rows of added tokens are trained and saved, not the whole embedding.
        trainable_token_indices=list(context.new_token_ids) or None,
    )


def adalora_config(method: MethodSpec, context: MethodContext) -> PeftConfig:
    from kubetune.api.v1alpha1 import AdaLoraSpec

    ada = method.adalora or AdaLoraSpec()
    if ada.tinit >= context.total_steps - ada.tfinal:
        raise SpecError(
            f"method.adalora: tinit ({ada.tinit}) must be below the total steps ({context.total_steps}) "
            f"minus tfinal ({ada.tfinal}) so that ranks get reallocated at all"
        )
    return AdaLoraConfig(
        task_type=context.peft_task,
        init_r=ada.init_r,
        target_r=ada.target_r,
        tinit=ada.tinit,
        tfinal=ada.tfinal,
        deltaT=ada.delta_t,
        beta1=ada.beta1,
        beta2=ada.beta2,
        orth_reg_weight=ada.orth_reg_weight,
        lora_alpha=ada.alpha,
        lora_dropout=ada.dropout,
        target_modules=_targets(ada.target_modules),
        total_step=context.total_steps,
        modules_to_save=_saved_modules([], context),
    )


def ia3_config(method: MethodSpec, context: MethodContext) -> PeftConfig:
    from kubetune.api.v1alpha1 import IA3Spec

    ia3 = method.ia3 or IA3Spec()
    return IA3Config(
        task_type=context.peft_task,
        target_modules=list(ia3.target_modules),
        feedforward_modules=list(ia3.feedforward_modules),
        modules_to_save=_saved_modules([], context),
    )


def _lycoris_kwargs(block: LoHaSpec | LoKrSpec, context: MethodContext) -> dict[str, Any]:
    """What LoHa and LoKr (both from the LyCORIS family) share."""
    return {
        "task_type": context.peft_task,
        "r": block.r,
        "alpha": block.alpha,
        "rank_dropout": block.rank_dropout,
        "module_dropout": block.module_dropout,
        "target_modules": _targets(block.target_modules),
        "modules_to_save": _saved_modules([], context),
    }


def loha_config(method: MethodSpec, context: MethodContext) -> PeftConfig:
    return LoHaConfig(**_lycoris_kwargs(method.loha or LoHaSpec(), context))


def lokr_config(method: MethodSpec, context: MethodContext) -> PeftConfig:
    lokr = method.lokr or LoKrSpec()
    return LoKrConfig(
        **_lycoris_kwargs(lokr, context),
        decompose_both=lokr.decompose_both,
        decompose_factor=lokr.decompose_factor,
    )


def prefix_config(method: MethodSpec, context: MethodContext) -> PeftConfig:
    from kubetune.api.v1alpha1 import PrefixSpec

    prefix = method.prefix or PrefixSpec()
    return PrefixTuningConfig(
        task_type=context.peft_task,
        num_virtual_tokens=prefix.num_virtual_tokens,
        prefix_projection=prefix.projection,
        encoder_hidden_size=prefix.encoder_hidden_size,
    )


def prompt_config(method: MethodSpec, context: MethodContext) -> PeftConfig:
    from kubetune.api.v1alpha1 import PromptSpec

    prompt = method.prompt or PromptSpec()
    if prompt.init_text:
        return PromptTuningConfig(
            task_type=context.peft_task,
            num_virtual_tokens=prompt.num_virtual_tokens,
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text=prompt.init_text,
            tokenizer_name_or_path=context.tokenizer_path,
        )
    return PromptTuningConfig(task_type=context.peft_task, num_virtual_tokens=prompt.num_virtual_tokens)


def p_tuning_config(method: MethodSpec, context: MethodContext) -> PeftConfig:
    from kubetune.api.v1alpha1 import PTuningSpec

    p_tuning = method.p_tuning or PTuningSpec()
    return PromptEncoderConfig(
        task_type=context.peft_task,
        num_virtual_tokens=p_tuning.num_virtual_tokens,
        encoder_reparameterization_type=p_tuning.encoder_type,
        encoder_hidden_size=p_tuning.encoder_hidden_size,
        encoder_num_layers=p_tuning.encoder_num_layers,
        encoder_dropout=p_tuning.encoder_dropout,
    )


def llama_adapter_config(method: MethodSpec, context: MethodContext) -> PeftConfig:
    from kubetune.api.v1alpha1 import LlamaAdapterSpec

    adapter = method.llama_adapter or LlamaAdapterSpec()
    layers = adapter.adapter_layers
    if layers > context.num_layers:
        log.warning(
            "llamaAdapter.adapterLayers %d > the model's %d layers: using all", layers, context.num_layers
        )
        layers = context.num_layers
    return AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=adapter.adapter_len, adapter_layers=layers)


def _layer_container(model: nn.Module, num_layers: int) -> str:
    """The dotted name of the ModuleList holding the transformer blocks."""
    candidates = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and name
    ]
    if not candidates:
        raise SpecError(
            f"cannot find the {num_layers} transformer blocks to unfreeze in {type(model).__name__}"
        )
    return str(min(candidates, key=len))


def freeze_layers(model: nn.Module, method: MethodSpec, context: MethodContext) -> None:
    """Train only the last N blocks, the parameters matching trainableModules, task heads and added-token embeddings."""
    from kubetune.api.v1alpha1 import FreezeSpec

    freeze = method.freeze or FreezeSpec()
    patterns = [re.compile(p) for p in freeze.trainable_modules]
    prefixes: list[str] = []
    if freeze.trainable_layers:
        container = _layer_container(model, context.num_layers)
        first = max(context.num_layers - freeze.trainable_layers, 0)
        prefixes = [f"{container}.{index}." for index in range(first, context.num_layers)]
    prefixes.extend(f"{name}." for name in context.embedding_modules)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = (
            any(name.startswith(prefix) for prefix in prefixes)
            or any(pattern.search(name) for pattern in patterns)
            or bool(HEAD_PATTERN.search(name))
        )


def train_everything(model: nn.Module, method: MethodSpec, context: MethodContext) -> None:
    for parameter in model.parameters():
        parameter.requires_grad = True


METHODS: dict[MethodType, Method] = {
    MethodType.LORA: Method(peft_config=lora_config),
    MethodType.QLORA: Method(peft_config=lora_config, quantized=True),
    MethodType.DORA: Method(peft_config=lora_config),
    MethodType.ADALORA: Method(peft_config=adalora_config),
    MethodType.IA3: Method(peft_config=ia3_config),
    MethodType.LOHA: Method(peft_config=loha_config),
    MethodType.LOKR: Method(peft_config=lokr_config),
    MethodType.PREFIX: Method(peft_config=prefix_config, prompt_learning=True),
    MethodType.PROMPT: Method(peft_config=prompt_config, prompt_learning=True),
    MethodType.P_TUNING: Method(peft_config=p_tuning_config, prompt_learning=True),
    MethodType.LLAMA_ADAPTER: Method(peft_config=llama_adapter_config, prompt_learning=True),
    MethodType.FREEZE: Method(prepare=freeze_layers),
    MethodType.FULL: Method(prepare=train_everything),
}


def method_for(spec: FineTuneJobSpec) -> Method:
    return METHODS[spec.method.type]


def check_combination(spec: FineTuneJobSpec) -> None:
    """Refuse what the schema cannot see but the trainer cannot run, before any weights load."""
    method = method_for(spec)
    if method.prompt_learning and spec.model.added_tokens:
        raise SpecError(
            "model.addedTokens needs a method that trains weights; prompt-learning methods cannot"
        )
    lora_init = spec.method.effective_lora.init
    if spec.method.type in (MethodType.LORA, MethodType.QLORA, MethodType.DORA) and lora_init in (
        "pissa",
        "olora",
    ):
        if method.quantized:
            raise SpecError(f"lora.init {lora_init} needs the unquantized base weights: use method.type lora")
        if spec.deepspeed is not None and spec.deepspeed.zero_stage == 3:
            raise SpecError(f"lora.init {lora_init} needs whole weights: use deepspeed.zeroStage 2 or less")
    if spec.method.chain is not None and spec.deepspeed is not None and spec.deepspeed.zero_stage == 3:
        raise SpecError(
            "method.chain merges each round into the base, which needs whole weights: use zeroStage 2 or less"
        )


def quantization_config(spec: FineTuneJobSpec) -> Any:
    """The BitsAndBytesConfig for QLoRA, or None."""
    if not method_for(spec).quantized:
        return None
    from transformers import BitsAndBytesConfig

    quantization = spec.method.effective_quantization
    zero3 = spec.deepspeed is not None and spec.deepspeed.zero_stage == 3
    if quantization.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]
    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.type,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, quantization.compute_dtype),
        # ZeRO-3 partitions parameters by dtype: the packed 4-bit weights must be stored in the
        # float type the other weights have. Elsewhere the default uint8 storage is the compact one.
        **({"bnb_4bit_quant_storage": getattr(torch, quantization.compute_dtype)} if zero3 else {}),
    )


def apply_method(model: nn.Module, spec: FineTuneJobSpec, context: MethodContext) -> nn.Module:
    """Wrap or freeze ``model`` as ``spec.method`` says; return the model to train."""
    method = method_for(spec)
    if method.quantized:
        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model,
            use_gradient_checkpointing=spec.training.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if method.peft_config is not None:
        try:
            model = get_peft_model(model, method.peft_config(spec.method, context))
        except (ValueError, TypeError, KeyError, NotImplementedError) as error:
            raise SpecError(
                f"method {spec.method.type.value} cannot be applied to this model: {error}"
            ) from error
    if method.prepare is not None:
        method.prepare(model, spec.method, context)
    return model


def embedding_modules(model: nn.Module, spec: FineTuneJobSpec) -> tuple[str, ...]:
    """Full names of the embedding modules to train in full when tokens are added.

    Not for the LoRA family, which trains just the new rows (``trainable_token_indices``).
    """
    if not spec.model.added_tokens or spec.method.type in (
        MethodType.LORA,
        MethodType.QLORA,
        MethodType.DORA,
    ):
        return ()
    names = {module: name for name, module in model.named_modules()}
    embeddings = model.get_input_embeddings()  # type: ignore[operator]
    found = [names[embeddings]]
    output = model.get_output_embeddings()  # type: ignore[operator]
    if output is not None and output.weight is not embeddings.weight:
        found.append(names[output])
    return tuple(found)


def parameter_count(parameter: torch.Tensor) -> int:
    """Elements of a parameter, also when ZeRO-3 partitioned it or bitsandbytes packed it."""
    count = int(getattr(parameter, "ds_numel", 0) or parameter.numel())
    if type(parameter).__name__ == "Params4bit":
        # Two 4-bit values per byte of the packed storage (as peft counts them).
        count *= 2 * max(getattr(parameter, "element_size", lambda: 1)(), 1)
    return count


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = total = 0
    for parameter in model.parameters():
        count = parameter_count(parameter)
        total += count
        if parameter.requires_grad:
            trainable += count
    return trainable, total


def expected_saved_fraction(spec: FineTuneJobSpec) -> float | None:
    """The share of the trainable parameters that the saved adapter holds (None: not predictable).

    AdaLoRA prunes ranks from initR to targetR on save; a prefix with projection and P-tuning
    save the virtual tokens their encoder computes, not the encoder that is trained.
    """
    if spec.method.type == MethodType.ADALORA:
        from kubetune.api.v1alpha1 import AdaLoraSpec

        ada = spec.method.adalora or AdaLoraSpec()
        return ada.target_r / ada.init_r
    if spec.method.type == MethodType.P_TUNING:
        return None
    if (
        spec.method.type == MethodType.PREFIX
        and spec.method.prefix is not None
        and spec.method.prefix.projection
    ):
        return None
    return 1.0
