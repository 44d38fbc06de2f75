"""Fit before download: the operator's estimate from config.json alone, checked against a hand computation."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.fit import GIB, OVERHEAD_BYTES, ModelShape, does_not_fit, estimate
from tests.builders import a_job
from tests.model_configs import LLAMA_3_1_8B


def qlora_zero3_on_16_gpus() -> Any:
    return (
        a_job()
        .with_method("qlora", lora={"r": 16})
        .on(nodes=2, gpus=8)
        .with_spec(
            training={"batchSizePerDevice": 4, "precision": "bf16", "gradientCheckpointing": True},
            dataset={"source": "s3://data/train.jsonl", "maxSeqLength": 2048},
            deepspeed={"zeroStage": 3},
        )
        .build()
        .spec
    )


def test_llama_3_1_8b_has_the_parameters_its_model_card_gives() -> None:
    shape = ModelShape.from_config(LLAMA_3_1_8B)
    assert shape is not None
    assert shape.total_params == 8_030_261_248
    assert shape.linear_params == 32 * 218_103_808


def test_qlora_under_zero3_shards_the_quantized_base_across_the_world() -> None:
    """By hand, Llama-3.1-8B, QLoRA NF4 r=16 on all linear layers, ZeRO-3 on 2 x 8 GPUs, bf16, batch 4 x 2048
    tokens, gradient checkpointing:

    - LoRA: 32 layers x 16 x (2x(4096+4096) + 2x(4096+1024) + 3x(4096+14336)) = 41,943,040 trainable
    - weights: linear 6,979,321,856 x 0.55 + the rest 1,050,939,392 x 2 bytes = 5,940,505,804, / 16 GPUs
      = 371,281,612
    - trainable state: 16 bytes x 41,943,040 / 16 = 41,943,040
    - activations: 8192 tokens x 32 layers x 2 x 4096 x 2 bytes / 2 = 2,147,483,648, plus logits
      2 x 8192 x 128256 x 4 = 8,405,385,216
    - overhead 1 GiB: per GPU 12,039,835,340 bytes = 11.2 GiB (16.4 GiB if each GPU held the whole base).
    """
    found = estimate(qlora_zero3_on_16_gpus(), LLAMA_3_1_8B)
    assert found is not None
    assert found.trainable_params == 41_943_040
    assert found.weights == 371_281_612
    assert found.trainable_state == 41_943_040
    assert found.activations == 2_147_483_648 + 8_405_385_216
    assert found.per_gpu == 371_281_612 + 41_943_040 + 10_552_868_864 + OVERHEAD_BYTES == 12_039_835_340
    assert does_not_fit(found, 16 * GIB) is None, "fits a 16 GiB GPU once the base is sharded"


def test_a_job_that_cannot_fit_is_told_the_estimate_and_what_to_change() -> None:
    spec = (
        a_job()
        .with_method("lora")
        .on(nodes=1, gpus=1)
        .with_spec(
            training={"batchSizePerDevice": 8, "precision": "bf16"},
            dataset={"source": "s3://data/train.jsonl", "maxSeqLength": 4096},
        )
        .build()
        .spec
    )
    found = estimate(spec, LLAMA_3_1_8B)
    assert found is not None and found.per_gpu > 80 * GIB
    message = does_not_fit(found, 80 * GIB)
    assert message is not None
    assert "per GPU" in message and "80.0 GiB" in message
    for fix in ("batchSizePerDevice", "gradientCheckpointing", "qlora"):
        assert fix in message


@pytest.mark.parametrize(
    "config",
    [{"model_type": "gpt2", "n_embd": 64}, {"model_type": "llama", "hidden_size": 64}],
    ids=["another family", "an incomplete config"],
)
def test_a_config_this_module_cannot_count_leaves_the_judgement_to_the_pod(config: dict[str, Any]) -> None:
    assert estimate(qlora_zero3_on_16_gpus(), config) is None


def test_methods_it_cannot_count_leave_the_judgement_to_the_pod() -> None:
    prefix = a_job().with_method("prefix").build().spec
    regex = a_job().with_method("lora", lora={"targetModules": [".*attn.*"]}).build().spec
    assert estimate(prefix, LLAMA_3_1_8B) is None
    assert estimate(regex, LLAMA_3_1_8B) is None


SMALL_LLAMA = {
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": False,
}


@pytest.mark.trainer
@pytest.mark.parametrize("method", ["lora", "qlora", "dora", "full"])
@pytest.mark.parametrize("zero_stage", [None, 2, 3])
def test_the_operators_estimate_equals_the_trainers_in_pod_estimate(
    method: str, zero_stage: int | None
) -> None:
    """Both sides judge the same job the same: the operator before the download, from config.json; the pod
    after it, on the meta-device model with peft's own parameter count."""
    import transformers

    from kubetune_trainer.estimate import estimate as in_pod_estimate

    fields: dict[str, Any] = {"training": {"precision": "bf16", "batchSizePerDevice": 2}}
    if zero_stage is not None:
        fields["deepspeed"] = {"zeroStage": zero_stage}
    spec = a_job().with_method(method).on(nodes=2, gpus=4).with_spec(**fields).build().spec
    config = transformers.LlamaConfig(**{k: v for k, v in SMALL_LLAMA.items() if k != "model_type"})
    in_pod = in_pod_estimate(spec, config)
    found = estimate(spec, SMALL_LLAMA)
    assert found is not None
    assert (found.trainable_params, found.total_params) == (in_pod.trainable_params, in_pod.total_params)
    assert found.per_gpu == in_pod.per_gpu_memory_bytes
