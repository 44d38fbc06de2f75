"""The pretrained model and its tokenizer for a job: the model class of its task, the dtype of the
frozen weights, the quantized base of QLoRA, room for the tokens the spec adds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from kubetune.api.v1alpha1 import FineTuneJobSpec, MethodType, Task

from . import distributed
from .data import TaskData
from .methods import method_for, quantization_config
from .storage import resolve_source

MODEL_CLASSES: dict[Task, Any] = {
    Task.CAUSAL_LM: AutoModelForCausalLM,
    Task.SEQ_CLS: AutoModelForSequenceClassification,
    Task.TOKEN_CLS: AutoModelForTokenClassification,
    Task.QUESTION_ANSWERING: AutoModelForQuestionAnswering,
}
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_model(spec: FineTuneJobSpec) -> tuple[Path, Any]:
    """The model's local folder (fetched first from a remote source) and its config."""
    model_dir = resolve_source(spec.model.source, spec.model.revision)
    return model_dir, AutoConfig.from_pretrained(model_dir, trust_remote_code=spec.model.trust_remote_code)


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
