"""`kubetune estimate`: trainable counts equal peft's own on real models, memory follows
the method, precision and ZeRO stage, and the pre-flight check refuses a job that cannot fit."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.builders import a_job

from kubetune.api.v1alpha1 import FineTuneJobSpec

pytestmark = pytest.mark.trainer

SMALL = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
HEADS = {"num_attention_heads": 4, "num_key_value_heads": 2}
ARCHITECTURES = {
    "llama": ("LlamaConfig", {**SMALL, **HEADS}),
    "qwen2": ("Qwen2Config", {**SMALL, **HEADS}),
    "mistral": ("MistralConfig", {**SMALL, **HEADS}),
    "gpt2": ("GPT2Config", {"vocab_size": 256, "n_embd": 64, "n_layer": 2, "n_head": 4}),
}
LINEAR = {"gpt2": ["c_attn", "c_proj", "c_fc"]}
METHODS: dict[str, dict[str, Any]] = {
    "lora": {},
    "dora": {},
    "qlora": {},
    "adalora": {},
    "ia3": {},
    "loha": {},
    "lokr": {},
    "prefix": {"prefix": {"projection": True, "encoderHiddenSize": 32}},
    "prompt": {},
    "p-tuning": {},
    "llama-adapter": {"llamaAdapter": {"adapterLayers": 2}},
    "freeze": {"freeze": {"trainableLayers": 1}},
    "full": {},
}
# peft has LLaMA-Adapter only for some families, and no LoHa/LoKr for GPT-2's Conv1D layers.
UNSUPPORTED = {("qwen2", "llama-adapter"), ("gpt2", "loha"), ("gpt2", "lokr")}


def a_spec(method: str, arch: str, **fields: Any) -> FineTuneJobSpec:
    block = copy.deepcopy(METHODS[method])
    if arch == "gpt2" and method == "ia3":
        block = {"ia3": {"targetModules": ["c_attn", "c_fc"], "feedforwardModules": ["c_fc"]}}
    job = a_job().with_method(method, **block).with_spec(**fields).build()
    return job.spec


def config_for(arch: str) -> Any:
    import transformers

    class_name, values = ARCHITECTURES[arch]
    return getattr(transformers, class_name)(**values)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_estimated_trainable_parameters_equal_peft_count_on_real_weights(arch: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.estimate import estimate
    from kubetune_trainer.methods import MethodContext, apply_method, count_parameters

    checked = []
    for method in METHODS:
        if (arch, method) in UNSUPPORTED:
            continue
        spec = a_spec(method, arch)
        if method == "qlora":
            spec = spec.model_copy(update={"method": spec.method.model_copy(update={"type": "lora"})})
        estimated = estimate(spec, config_for(arch))
        torch.manual_seed(0)
        real = apply_method(
            AutoModelForCausalLM.from_config(config_for(arch)),
            spec,
            MethodContext(total_steps=1000, num_layers=2),
        )
        counted = (
            real.get_nb_trainable_parameters()
            if hasattr(real, "get_nb_trainable_parameters")
            else count_parameters(real)
        )
        assert (estimated.trainable_params, estimated.total_params) == counted, (arch, method)
        checked.append(method)
    assert len(checked) >= 11


def test_memory_estimate_follows_method_precision_and_zero_stage() -> None:
    from transformers import LlamaConfig

    from kubetune_trainer.estimate import estimate

    # A 7B-class shape, built on the meta device: no memory is used.
    config = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
    )

    def gib(method: str, **fields: Any) -> float:
        spec = a_job().with_method(method).with_spec(**fields).on(nodes=1, gpus=8).build().spec
        return estimate(spec, copy.deepcopy(config)).per_gpu_memory_bytes / 2**30

    checkpointing = {"gradientCheckpointing": True}
    lora, lora_checkpointed = gib("lora"), gib("lora", training=checkpointing)
    qlora_checkpointed = gib("qlora", training=checkpointing)
    assert 13 < lora_checkpointed < 20  # ~12.6 GiB of bf16 weights, little else
    assert lora > lora_checkpointed + 25  # 4 x 2048 tokens of activations in 32 layers
    assert qlora_checkpointed < lora_checkpointed / 1.8  # NF4 weights
    full = gib("full", training=checkpointing)
    full_zero3 = gib("full", training=checkpointing, deepspeed={"zeroStage": 3})
    full_offload = gib(
        "full",
        training=checkpointing,
        deepspeed={"zeroStage": 3, "offloadOptimizer": "cpu", "offloadParams": "cpu"},
    )
    assert full > 100  # fp32 weights + AdamW: 16 bytes per parameter
    assert full_offload < full_zero3 < full / 4


def test_estimate_cli_prints_json_for_scripts(tiny_llama_dir: Path, tmp_path: Path) -> None:
    manifest = (
        a_job().with_method("lora").with_spec(model={"source": f"file://{tiny_llama_dir}"}).as_manifest()
    )
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest))
    result = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer.estimate", "-f", str(path), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["trainableParams"] > 0 and printed["totalParams"] > printed["trainableParams"]
    assert printed["perGpuMemoryBytes"] > 2**30


def test_a_job_that_cannot_fit_ends_with_insufficient_gpu_memory(
    tiny_llama_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    from tests.trainer.conftest import cpu_job

    job = cpu_job(tiny_llama_dir, data_dir / "alpaca.jsonl", tmp_path / "out").as_manifest()
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(job))
    log = tmp_path / "termination-log"
    env = {
        **os.environ,
        "KUBETUNE_SPEC": str(spec_file),
        "KUBETUNE_TERMINATION_LOG": str(log),
        "KUBETUNE_GPU_MEMORY_BYTES": str(512 * 2**20),
        "KUBETUNE_METRICS_PORT": "0",
    }
    result = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer"], env=env, capture_output=True, timeout=180
    )
    assert result.returncode == 1
    message = log.read_text()
    assert message.startswith("InsufficientGPUMemory: needs ~1.0 GiB per GPU, has 0.5 GiB"), message
    assert not (tmp_path / "out").exists()
