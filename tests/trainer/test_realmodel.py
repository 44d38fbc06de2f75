"""Every method of the registry teaches the real SmolLM2-135M-Instruct a notation it has never
seen (``color(apple) = red; ...``): the loss on lines about held-out objects falls below what
the run started from (the base, or the base behind untrained virtual tokens), the frozen
base keeps its weights, and what is published reloads onto a fresh base with the same logits.

Marked ``realmodel`` (and ``slow``): CI runs it; ``make test-fast`` or ``-m 'not realmodel'``
skips it. Thresholds come from ``tests/trainer/data/real-spread.json``
(``python -m tests.trainer.measure_spread --tier real``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.trainer.realmodel import (
    METHODS,
    STEPS,
    held_out_batch,
    held_out_loss,
    job_for,
    write_training_data,
)
from tests.trainer.test_methods import base_weights, logits_of, reload_published, untrained_model

pytestmark = [pytest.mark.trainer, pytest.mark.realmodel, pytest.mark.slow]

SPREAD_FILE = Path(__file__).parent / "data" / "real-spread.json"


def loss_ratio_threshold(method: str) -> float:
    """Half the smallest held-out drop the method showed over its measured seeds.

    Measured over 2 seeds so far (each run ~60 s here): worst ratios 0.495 (LoRA) to 0.888
    (AdaLoRA), thresholds 0.75 to 0.94; the spread between seeds was at most 0.17 (prefix).
    """
    worst = float(json.loads(SPREAD_FILE.read_text())["methods"][method]["worst_ratio"])
    return 1 - (1 - worst) / 2


@pytest.fixture(scope="module")
def held_out(smollm2_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    return held_out_batch(AutoTokenizer.from_pretrained(smollm2_dir))


@pytest.fixture(scope="module")
def original_weights(smollm2_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(smollm2_dir / "model.safetensors")


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_teaches_smollm2_keeps_its_base_and_reloads_with_the_same_logits(
    method: str,
    smollm2_dir: Path,
    held_out: dict[str, torch.Tensor],
    original_weights: dict[str, torch.Tensor],
    tmp_path: Path,
    run_job: Any,
) -> None:
    batch = held_out
    job = job_for(method, smollm2_dir, write_training_data(tmp_path), tmp_path / "out")
    before = held_out_loss(untrained_model(job, smollm2_dir, STEPS), batch)
    result = run_job(job)

    ratio = held_out_loss(result.model, batch) / before
    assert ratio < loss_ratio_threshold(method), (ratio, before)

    base = base_weights(result.model)
    if method == "freeze":  # the last two blocks train; the first stays as it was
        assert torch.equal(
            base["model.layers.0.mlp.up_proj.weight"], original_weights["model.layers.0.mlp.up_proj.weight"]
        )
    elif method not in ("full", "qlora"):  # a quantized base is checked through its reload below
        compared = [name for name in original_weights if name in base]
        assert len(compared) >= len(original_weights) - 1, sorted(set(original_weights) - set(base))
        assert [name for name in compared if not torch.equal(base[name], original_weights[name])] == []

    # Without labels: a reloaded AdaLoRA model is for inference and has no orthogonality loss to add.
    inputs = {name: value for name, value in batch.items() if name != "labels"}
    reloaded = reload_published(method, smollm2_dir, tmp_path / "out", job.build().spec)
    torch.testing.assert_close(
        logits_of(reloaded, inputs), logits_of(result.model, inputs), rtol=1e-4, atol=1e-4
    )
