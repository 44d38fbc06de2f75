"""What the real-model tier trains SmolLM2-135M-Instruct on, and how it scores a run.

The task is a notation the base model has never seen, ``color(apple) = red; ...``:
learning it lowers the loss on held-out lines about objects the training lines never
name, so the drop measures learning the pattern, not memorising rows. The tier's tests
and the spread measurement (``python -m tests.trainer.measure_spread``) share this module.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import torch

TRAIN_COLORS = {
    "apple": "red",
    "banana": "yellow",
    "grass": "green",
    "sky": "blue",
    "snow": "white",
    "coal": "black",
    "cherry": "red",
    "lemon": "yellow",
    "leaf": "green",
    "ocean": "blue",
    "milk": "white",
    "crow": "black",
    "strawberry": "red",
    "corn": "yellow",
    "lime": "green",
    "sapphire": "blue",
    "cloud": "white",
    "ink": "black",
}
HELD_OUT_COLORS = {
    "tomato": "red",
    "sun": "yellow",
    "frog": "green",
    "blueberry": "blue",
    "sugar": "white",
    "night": "black",
    "ruby": "red",
    "butter": "yellow",
}
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ATTENTION}
# method name -> (the spec's method block, learning rate); one row per entry of the registry.
METHODS: dict[str, tuple[dict[str, Any], float]] = {
    "lora": ({"type": "lora", "lora": LORA}, 2e-3),
    "dora": ({"type": "dora", "lora": LORA}, 2e-3),
    "qlora": (
        {
            "type": "qlora",
            "lora": LORA,
            "quantization": {"bits": 4, "type": "nf4", "doubleQuant": True, "computeDtype": "float32"},
        },
        2e-3,
    ),
    "adalora": (
        {
            "type": "adalora",
            "adalora": {
                "initR": 8,
                "targetR": 4,
                "tinit": 2,
                "tfinal": 2,
                "deltaT": 2,
                "dropout": 0.0,
                "targetModules": ATTENTION,
            },
        },
        5e-3,
    ),
    "ia3": ({"type": "ia3"}, 2e-2),
    "loha": ({"type": "loha", "loha": {"r": 4, "alpha": 8, "targetModules": ATTENTION}}, 5e-3),
    "lokr": ({"type": "lokr", "lokr": {"r": 4, "alpha": 8, "targetModules": ATTENTION}}, 5e-3),
    "prefix": ({"type": "prefix", "prefix": {"numVirtualTokens": 8}}, 1e-2),
    "prompt": ({"type": "prompt", "prompt": {"numVirtualTokens": 8, "initText": "color(apple) = red"}}, 3e-2),
    "p-tuning": ({"type": "p-tuning", "pTuning": {"numVirtualTokens": 8, "encoderHiddenSize": 128}}, 1e-2),
    "llama-adapter": ({"type": "llama-adapter", "llamaAdapter": {"adapterLen": 8, "adapterLayers": 8}}, 3e-2),
    "freeze": ({"type": "freeze", "freeze": {"trainableLayers": 2}}, 1e-4),
    "full": ({"type": "full"}, 2e-5),
}
STEPS = 8
BATCH = 8


def lines(colors: dict[str, str], count: int, seed: int) -> list[str]:
    """``count`` lines of three ``color(object) = color`` pairs drawn from ``colors``."""
    chooser = random.Random(seed)
    names = sorted(colors)
    return ["; ".join(f"color({n}) = {colors[n]}" for n in chooser.sample(names, 3)) for _ in range(count)]


def write_training_data(target: Path) -> Path:
    path = target / "colors.jsonl"
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines(TRAIN_COLORS, 64, seed=0)))
    return path


def held_out_batch(tokenizer: Any) -> dict[str, torch.Tensor]:
    """Lines about the held-out objects only, with the padding left out of the loss."""
    texts = lines(HELD_OUT_COLORS, 8, seed=1)
    batch = dict(tokenizer(texts, return_tensors="pt", padding=True))
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    batch["labels"] = labels
    return batch


def held_out_loss(model: Any, batch: dict[str, torch.Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(**batch).loss)


def job_for(method: str, model_dir: Path, data: Path, output: Path, seed: int = 7) -> Any:
    """A short fp32 run of ``method`` on the color lines, through the whole trainer pipeline."""
    from tests.trainer.conftest import cpu_job

    block, rate = METHODS[method]
    return cpu_job(
        model_dir,
        data,
        output,
        name=f"smollm2-{method}",
        method=copy.deepcopy(block),
        dataset={"format": "text", "validationSplit": 0.0, "maxSeqLength": 64},
        training={"maxSteps": STEPS, "learningRate": rate, "batchSizePerDevice": BATCH, "seed": seed},
    )
