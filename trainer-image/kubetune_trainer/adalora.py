"""What AdaLoRA needs beyond its peft config: the Trainer does not drive its rank reallocation,
a resumed run must get back the ranks reached so far, and its final save prunes ranks in a
way peft warns about for no fault of ours."""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from kubetune.api.v1alpha1 import FineTuneJobSpec, MethodType

ADALORA_RANK_PATTERN_FILE = "kubetune-adalora-rank-pattern.json"
"""Beside each AdaLoRA checkpoint: the rank pattern reached at its step."""

PEFT_SHAPE_WARNING = r"Adapter '.*': \d+ LoRA tensor\(s\) have invalid shape"
"""peft's warning on saving lora_A / lora_B tensors that are 1-D or have a zero dimension."""


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
