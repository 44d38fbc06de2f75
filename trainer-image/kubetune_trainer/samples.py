"""Sample answers: what the model says to the spec's prompts, before training and after it.

Each prompt is rendered as the job's training rows render a prompt (through the chat template
when they are), answered greedily (so one adapter always answers alike) with at most
``samples.maxNewTokens`` new tokens, and scored by exact match when the spec gives the answer
wanted. The answers reach the published manifest and the local report, beside the loss.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from kubetune.api.v1alpha1 import FineTuneJobSpec

from . import distributed
from .data import render_prompt

log = logging.getLogger(__name__)

GENERATION_BATCH = 32
"""Prompts answered together: bounds the memory of the padded batch and its KV cache."""


@dataclass(frozen=True)
class Sample:
    """One prompt with the trained model's answer, the base model's (None when not generated) and,
    when the spec says what is wanted, whether each matches it."""

    prompt: str
    answer: str
    base_answer: str | None = None
    expected: str | None = None

    @property
    def exact(self) -> bool | None:
        return None if self.expected is None else is_exact(self.answer, self.expected)

    @property
    def base_exact(self) -> bool | None:
        if self.expected is None or self.base_answer is None:
            return None
        return is_exact(self.base_answer, self.expected)

    def to_manifest(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"prompt": self.prompt, "answer": self.answer}
        if self.base_answer is not None:
            entry["baseAnswer"] = self.base_answer
        if self.expected is not None:
            entry["expected"] = self.expected
            entry["exactMatch"] = self.exact
            if self.base_exact is not None:
                entry["baseExactMatch"] = self.base_exact
        return entry


def normalize(answer: str) -> str:
    """What exact match compares: case, surrounding spaces and a final period do not count."""
    return answer.strip().removesuffix(".").strip().casefold()


def is_exact(answer: str, expected: str) -> bool:
    return normalize(answer) == normalize(expected)


def exact_match_metrics(samples: Sequence[Sample]) -> dict[str, float]:
    """The share of scored samples answered exactly, after training and (where generated) before."""
    scored = [s for s in samples if s.expected is not None]
    metrics: dict[str, float] = {}
    if scored:
        metrics["samples_exact_match"] = sum(bool(s.exact) for s in scored) / len(scored)
        if all(s.base_answer is not None for s in scored):
            metrics["samples_base_exact_match"] = sum(bool(s.base_exact) for s in scored) / len(scored)
    return metrics


@contextmanager
def _generating(model: Any, tokenizer: PreTrainedTokenizerBase) -> Iterator[None]:
    """Eval mode and left padding (a batch's answers then all start at its last column), undone after."""
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    try:
        with torch.no_grad():
            yield
    finally:
        tokenizer.padding_side = side
        model.train(was_training)


def generate_answers(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    spec: FineTuneJobSpec,
    *,
    synced_gpus: bool = False,
) -> list[str]:
    """The model's greedy answers to the spec's sample prompts, in order.

    ``synced_gpus`` keeps every rank of a ZeRO-3 job in each forward pass (each holds a
    shard of the weights), as transformers' generate does for DeepSpeed."""
    assert spec.samples is not None
    rendered = [render_prompt(p.prompt, tokenizer, spec.dataset) for p in spec.samples.prompts]
    device = next(model.parameters()).device
    eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    answers: list[str] = []
    with _generating(model, tokenizer):
        for start in range(0, len(rendered), GENERATION_BATCH):
            chunk = rendered[start : start + GENERATION_BATCH]
            # One render decides for the chunk: every prompt of a job is rendered the same way.
            batch = tokenizer(
                [text for text, _ in chunk],
                return_tensors="pt",
                padding=True,
                add_special_tokens=chunk[0][1],
            ).to(device)
            output = model.generate(
                **batch,
                max_new_tokens=spec.samples.max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos,
                synced_gpus=synced_gpus,
            )
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            for row in new_tokens:
                text = tokenizer.decode(row, skip_special_tokens=True)
                answers.append(str(text).strip())
    return answers


def collect(
    spec: FineTuneJobSpec, answers: Sequence[str], base_answers: Sequence[str] | None
) -> list[Sample]:
    """The samples of a run from its answers (and the base model's, when generated)."""
    assert spec.samples is not None
    return [
        Sample(
            prompt=p.prompt,
            answer=answer,
            base_answer=base_answers[index] if base_answers is not None else None,
            expected=p.expected,
        )
        for index, (p, answer) in enumerate(zip(spec.samples.prompts, answers, strict=True))
    ]


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
    """The trained model's answers (rank 0; under ZeRO-3 every rank takes part in each forward pass);
    none when the spec asks for no samples."""
    if spec.samples is None:
        return []
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
