"""Every method trains on the CPU: the loss goes down on a learnable task, the frozen base
stays as it was, the trained weights move, and what is published reloads with the same logits."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.trainer.conftest import cpu_job, late_to_early, logged_losses

from kubetune_trainer.publish import safetensors_shapes

pytestmark = pytest.mark.trainer

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
METHODS: dict[str, dict[str, Any]] = {
    "lora": {"lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ATTENTION}},
    "dora": {"lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ATTENTION}},
    "qlora": {
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ATTENTION},
        "quantization": {"bits": 4, "type": "nf4", "doubleQuant": True, "computeDtype": "float32"},
    },
    "qlora-8bit": {
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ATTENTION},
        "quantization": {"bits": 8, "computeDtype": "float32"},
    },
    "adalora": {
        "adalora": {
            "initR": 8,
            "targetR": 4,
            "tinit": 2,
            "tfinal": 4,
            "deltaT": 2,
            "dropout": 0.0,
            "targetModules": ATTENTION,
        }
    },
    "ia3": {},
    "loha": {"loha": {"r": 4, "alpha": 8, "targetModules": ATTENTION}},
    "lokr": {"lokr": {"r": 4, "alpha": 8, "targetModules": ATTENTION}},
    "prefix": {"prefix": {"numVirtualTokens": 8, "projection": True, "encoderHiddenSize": 32}},
    "prompt": {"prompt": {"numVirtualTokens": 8, "initText": "### Instruction"}},
    "p-tuning": {"pTuning": {"numVirtualTokens": 8, "encoderHiddenSize": 32}},
    "llama-adapter": {"llamaAdapter": {"adapterLen": 4, "adapterLayers": 2}},
    "freeze": {"freeze": {"trainableLayers": 1}},
    "full": {},
}
LEARNING_RATES = {"full": 3e-3, "freeze": 3e-3, "ia3": 1e-1, "prompt": 1e-1, "llama-adapter": 3e-1}
STEPS = 20
# Loss-after / loss-before on the counting batch for every method, over 20 fresh initialisations and
# training seeds: `python -m tests.trainer.measure_spread --tier tiny --out tests/trainer/data/tiny-spread.json`.
SPREAD_FILE = Path(__file__).parent / "data" / "tiny-spread.json"


def spread(method: str) -> dict[str, Any]:
    measured: dict[str, Any] = json.loads(SPREAD_FILE.read_text())["methods"][method]
    return measured


def loss_ratio_threshold(method: str) -> float:
    """Half the smallest drop the method showed over the measured seeds: learning must show.

    A run passes with a loss ratio below ``1 - (1 - worst) / 2``. Measured over 20 initialisations
    and seeds, the worst ratios run from 0.077 (full) to 0.894 (p-tuning), the thresholds from 0.538
    to 0.947, and every threshold is at least 3.6 standard deviations above its method's mean
    (p-tuning: mean 0.805, sd 0.039).
    """
    return 1 - (1 - float(spread(method)["worst_ratio"])) / 2


def a_batch(tokenizer: Any) -> dict[str, torch.Tensor]:
    texts = [
        "### Instruction:\nWhat color is this?\n\n### Input:\nsky\n\n### Response:\n",
        "Count up from two.",
    ]
    return dict(tokenizer(texts, return_tensors="pt", padding=True))


def logits_of(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.float()


def reload_published(method: str, base_dir: Path, published: Path, spec: Any) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.methods import quantization_config
    from kubetune_trainer.models import keep_quantized_base_as_loaded, weights_dtype

    if method in ("freeze", "full"):
        return AutoModelForCausalLM.from_pretrained(published)
    # The base as training loaded it, and run on the same kernels: bitsandbytes' AVX512-BF16 CPU kernel
    # rounds the block scales to bfloat16, which moves logits by about 1e-4.
    base = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=weights_dtype(spec), quantization_config=quantization_config(spec)
    )
    keep_quantized_base_as_loaded(base)
    return PeftModel.from_pretrained(base, published)


def base_weights(model: Any) -> dict[str, torch.Tensor]:
    """The frozen base's tensors under their original names (peft wraps layers as base_layer)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = {}
    for name, tensor in base.state_dict().items():
        if any(part in name for part in ("lora_", "hada_", "lokr_", "ia3_", "adaption_", "trainable_tokens")):
            continue
        names[name.replace(".base_layer", "").replace("self_attn.model.", "self_attn.")] = tensor
    return names


def untrained_model(job: Any, model_dir: Path, steps: int) -> Any:
    """The model as the run built it before its first step: same seed, same pipeline functions."""
    import transformers

    from kubetune_trainer.data import TaskData
    from kubetune_trainer.estimate import num_layers
    from kubetune_trainer.methods import MethodContext, apply_method, embedding_modules
    from kubetune_trainer.models import load_model, load_tokenizer

    spec = job.build().spec
    transformers.set_seed(spec.training.seed)
    tokenizer, new_ids = load_tokenizer(model_dir, spec)
    model = load_model(spec, model_dir, tokenizer, TaskData(train=None, validation=None))  # type: ignore[arg-type]
    context = MethodContext(
        total_steps=steps,
        tokenizer_path=str(model_dir),
        num_layers=num_layers(model.config),
        new_token_ids=new_ids,
        embedding_modules=embedding_modules(model, spec),
    )
    return apply_method(model, spec, context)


def counting_batch(tokenizer: Any) -> dict[str, torch.Tensor]:
    """Two lines of the counting text, the fixed batch every method's loss is measured on."""
    return dict(
        tokenizer(["zero one two three four five", "two three four five six seven"], return_tensors="pt")
    )


def loss_on(model: Any, batch: dict[str, torch.Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(**batch, labels=batch["input_ids"]).loss)


def counting_job(
    model: Path, data_dir: Path, output: Path, method: dict[str, Any], rate: float, steps: int, seed: int = 7
) -> Any:
    """A job on the counting texts: a task even a random-weight base can learn in a few steps."""
    return cpu_job(
        model,
        data_dir / "text.jsonl",
        output,
        method=method,
        dataset={"format": "text"},
        training={"learningRate": rate, "maxSteps": steps, "seed": seed},
    )


def method_job(method: str, model: Path, data_dir: Path, output: Path, seed: int = 7) -> Any:
    """The method test's job for one entry of METHODS (``qlora-8bit`` is qlora with 8 bits)."""
    block = {"type": method.removesuffix("-8bit"), **copy.deepcopy(METHODS[method])}
    return counting_job(model, data_dir, output, block, LEARNING_RATES.get(method, 3e-2), STEPS, seed)


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_learns_keeps_the_base_and_reloads_with_the_same_logits(
    method: str, tiny_llama_dir: Path, data_dir: Path, tokenizer: Any, tmp_path: Path, run_job: Any
) -> None:
    from transformers import AutoModelForCausalLM

    output = tmp_path / "out"
    job = method_job(method, tiny_llama_dir, data_dir, output)
    before = untrained_model(job, tiny_llama_dir, STEPS)
    if method == "adalora":
        with warnings.catch_warnings(record=True) as warned:  # only here: other methods' warnings stay shown
            warnings.simplefilter("always")
            result = run_job(job)
        # A rank pruned to none is a 2-D tensor with a zero dimension, not an ungathered ZeRO-3 shard.
        shapes = safetensors_shapes(tmp_path / "work" / "adapter" / "adapter_model.safetensors")
        assert any(len(shape) == 2 and 0 in shape for shape in shapes.values()), "no rank was pruned to 0"
        assert not [w for w in warned if "have invalid shape" in str(w.message)]
    else:
        result = run_job(job)

    # Learning: the loss on a fixed batch of training text goes down, and every trained tensor moved.
    batch = counting_batch(tokenizer)
    ratio = loss_on(result.model, batch) / loss_on(before, batch)
    assert ratio < loss_ratio_threshold(method), (ratio, spread(method))
    initial = {n: p.detach().clone() for n, p in before.named_parameters() if p.requires_grad}
    trained = dict(result.model.named_parameters())
    unchanged = [n for n, tensor in initial.items() if torch.equal(tensor, trained[n].detach())]
    if method == "adalora":  # a layer whose whole rank budget was pruned keeps its zero singular values
        unchanged = [n for n in unchanged if not ("lora_E" in n and not trained[n].any())]
    assert initial and not unchanged, unchanged

    # The frozen base is untouched (freeze: only the last block moved; full: everything may).
    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    base = base_weights(result.model)
    if method == "freeze":
        assert torch.equal(
            base["model.layers.0.mlp.up_proj.weight"], original["model.layers.0.mlp.up_proj.weight"]
        )
        assert not torch.equal(
            base["model.layers.1.mlp.up_proj.weight"], original["model.layers.1.mlp.up_proj.weight"]
        )
    elif method not in (
        "full",
        "qlora",
        "qlora-8bit",
    ):  # a quantized base is checked through its reload below
        compared = [name for name in original if name in base]
        assert len(compared) >= len(original) - 1, sorted(set(original) - set(base))
        assert [name for name in compared if not torch.equal(base[name], original[name])] == []

    # What was published reloads onto a fresh base with the logits of the trained model.
    reloaded = reload_published(method, tiny_llama_dir, output, job.build().spec)
    torch.testing.assert_close(
        logits_of(reloaded, batch), logits_of(result.model, batch), rtol=1e-4, atol=1e-4
    )
    assert result.manifest is not None and result.manifest["trainableParams"] == result.trainable_params


def chain_job(model_dir: Path, data_dir: Path, output: Path, seed: int = 7) -> Any:
    """Three rounds of LoRA, each merged into the base before the next starts."""
    chain = {"type": "lora", **copy.deepcopy(METHODS["lora"]), "chain": {"rounds": 3}}
    return counting_job(model_dir, data_dir, output, chain, 3e-2, 30, seed)


def test_chain_of_lora_publishes_its_rounds_as_one_adapter_for_the_original_base(
    tiny_llama_dir: Path, data_dir: Path, tokenizer: Any, tmp_path: Path, run_job: Any
) -> None:
    import json

    """Over 20 initialisations and seeds the late/early loss ratio was at worst 0.544 (mean 0.432,
    sd 0.046; ``measure_spread --tier checks``): the test asks for half that drop, below 0.77."""
    output = tmp_path / "out"
    job = chain_job(tiny_llama_dir, data_dir, output)
    result = run_job(job)
    assert len(logged_losses(result.log_history)) == 30
    assert late_to_early(result.log_history, 5) < 0.77
    assert json.loads((output / "adapter_config.json").read_text())["r"] == 3 * 8
    # Original base + the stacked adapter == the last round's model (a base with two rounds merged in, plus a LoRA).
    batch = a_batch(tokenizer)
    reloaded = reload_published("lora", tiny_llama_dir, output, job.build().spec)
    # Merged rounds were rounded into fp32 weights; the stacked adapter computes them factorised.
    torch.testing.assert_close(
        logits_of(reloaded, batch), logits_of(result.model, batch), rtol=1e-3, atol=1e-3
    )
    rounds = sorted(p.name for p in (output / "checkpoints").iterdir())
    assert rounds == ["round-0", "round-1", "round-2"]
