"""Pure: whether a job fits its GPUs, from the model's config.json alone, without torch.

The operator reads only the config (a few KiB from the hub, S3 or a claim) and can refuse a job that cannot
fit before any pod exists or any weight is downloaded. The terms are those of the trainer's in-pod check
(kubetune_trainer.estimate, which builds the model on the meta device): weights, trainable state (fp32 master
copy, gradients, AdamW: 16 bytes per trainable parameter, sharded by the ZeRO stage), activations and a fixed
overhead. Parameters are counted from the config for the decoder families whose shape it fully describes
(Llama, Mistral, Qwen2 and their kin: q/k/v/o attention with grouped KV heads, gated MLP, RMSNorm); for any
other architecture or method, `estimate` returns None and only the in-pod check judges.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubetune.api.v1alpha1 import FineTuneJobSpec, MethodType, Task

GIB = 1024**3
OVERHEAD_BYTES = GIB
QUANTIZED_BYTES_PER_PARAM = {4: 0.55, 8: 1.0}
"""NF4 with double quantization stores ~0.55 bytes per weight (4 bits plus its scales); 8-bit 1 byte."""
PRECISION_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
GATED_MLP_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3", "granite", "olmo2"})
ADAPTER_METHODS = frozenset({MethodType.LORA, MethodType.QLORA, MethodType.DORA})
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """What config.json says of a gated-MLP decoder."""

    vocab_size: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied_embeddings: bool

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape | None:
        """The shape, or None when the config is not of a family counted here."""
        if str(config.get("model_type", "")) not in GATED_MLP_FAMILIES:
            return None
        try:
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            return cls(
                vocab_size=int(config["vocab_size"]),
                hidden=hidden,
                intermediate=int(config["intermediate_size"]),
                layers=int(config["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def linear_layers(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (self.hidden, q),
            "k_proj": (self.hidden, kv),
            "v_proj": (self.hidden, kv),
            "o_proj": (q, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }

    @property
    def linear_params(self) -> int:
        """Weights in the decoder layers' linear layers: what bitsandbytes quantizes (not the output head)."""
        return self.layers * sum(i * o for i, o in self.linear_layers().values())

    @property
    def total_params(self) -> int:
        embeddings = self.vocab_size * self.hidden * (1 if self.tied_embeddings else 2)
        norms = self.layers * 2 * self.hidden + self.hidden
        return self.linear_params + embeddings + norms


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU, by term."""

    weights: int
    trainable_state: int
    activations: int
    trainable_params: int
    total_params: int
    world_size: int

    @property
    def per_gpu(self) -> int:
        return self.weights + self.trainable_state + self.activations + OVERHEAD_BYTES

    def describe(self) -> str:
        def gib(value: int) -> str:
            return f"{value / GIB:.1f} GiB"

        return (
            f"~{gib(self.per_gpu)} per GPU (weights {gib(self.weights)}, trainable state "
            f"{gib(self.trainable_state)}, activations {gib(self.activations)}, overhead {gib(OVERHEAD_BYTES)}; "
            f"{self.trainable_params:,} of {self.total_params:,} parameters trained, {self.world_size} GPU(s))"
        )


def _targets(spec: FineTuneJobSpec) -> tuple[str, ...] | None:
    lora = spec.method.lora
    modules = list(lora.target_modules) if lora is not None else ["all-linear"]
    if modules == ["all-linear"]:
        return (*ATTENTION, *MLP)
    if all(module in (*ATTENTION, *MLP) for module in modules):
        return tuple(modules)
    return None  # regular expressions or other module names: peft's own matching decides


def trainable_params(spec: FineTuneJobSpec, shape: ModelShape) -> int | None:
    """Parameters the method trains, or None when this module cannot count them."""
    method = spec.method
    if method.type is MethodType.FULL:
        return shape.total_params
    if method.type not in ADAPTER_METHODS:
        return None
    lora = method.lora
    if lora is not None and (lora.bias != "none" or lora.modules_to_save):
        return None
    targets = _targets(spec)
    if targets is None:
        return None
    rank = lora.r if lora is not None else 16
    layers = shape.linear_layers()
    per_layer = sum(rank * (layers[t][0] + layers[t][1]) for t in targets)
    if method.type is MethodType.DORA:
        per_layer += sum(layers[t][1] for t in targets)  # the magnitude vector of each adapted layer
    return shape.layers * per_layer


def estimate(spec: FineTuneJobSpec, config: Mapping[str, Any]) -> MemoryEstimate | None:
    """Bytes per GPU of `spec` on the model of `config`, or None where only the in-pod check can tell."""
    shape = ModelShape.from_config(config)
    if shape is None:
        return None
    trainable = trainable_params(spec, shape)
    if trainable is None:
        return None
    full = spec.method.type is MethodType.FULL
    return memory(
        spec,
        trainable=trainable,
        frozen=0 if full else shape.total_params,  # an adapter's parameters come on top of the base
        quantizable=shape.linear_params,
        hidden=shape.hidden,
        layers=shape.layers,
        vocab_size=shape.vocab_size,
    )


def memory(
    spec: FineTuneJobSpec,
    *,
    trainable: int,
    frozen: int,
    quantizable: int,
    hidden: int,
    layers: int,
    vocab_size: int,
    world_size: int | None = None,
) -> MemoryEstimate:
    """The per-GPU terms for a model of these counts; `quantizable` are the frozen weights QLoRA quantizes.
    The trainer's in-pod check calls this too, with the counts of its meta-device model."""
    world = world_size or spec.resources.nodes * spec.resources.processes_per_node
    deepspeed = spec.deepspeed
    stage = deepspeed.zero_stage if deepspeed is not None else 0
    precision = PRECISION_BYTES[spec.training.precision]
    qlora = spec.method.type is MethodType.QLORA

    if qlora:
        bits = spec.method.effective_quantization.bits
        weights = int(quantizable * QUANTIZED_BYTES_PER_PARAM[bits] + (frozen - quantizable) * precision)
    else:
        # Frozen weights of adapter methods are loaded in the training precision; full and freeze keep
        # fp32 weights and run the forward pass in autocast.
        weights = frozen * (4 if spec.method.type in (MethodType.FULL, MethodType.FREEZE) else precision)
    if stage == 3:
        weights //= world  # ZeRO-3 partitions the frozen base at load, a quantized one too
    if deepspeed is not None and deepspeed.offload_params == "cpu" and not qlora:
        weights = 0

    params, grads, optimizer = 4 * trainable, 4 * trainable, 8 * trainable
    if stage >= 1:
        optimizer //= world
    if stage >= 2:
        grads //= world
    if stage == 3:
        params //= world
    if deepspeed is not None and deepspeed.offload_optimizer == "cpu":
        optimizer = 0
    if deepspeed is not None and deepspeed.offload_params == "cpu":
        params = 0

    tokens = spec.training.batch_size_per_device * spec.dataset.max_seq_length
    per_token_layer = 2 * hidden if spec.training.gradient_checkpointing else 34 * hidden
    activations = tokens * layers * per_token_layer * precision // 2
    if spec.model.task is Task.CAUSAL_LM:
        activations += 2 * tokens * vocab_size * 4  # the logits and their gradient, in fp32
    return MemoryEstimate(
        weights=int(weights),
        trainable_state=params + grads + optimizer,
        activations=int(activations),
        trainable_params=trainable,
        total_params=frozen + trainable,
        world_size=world,
    )


def does_not_fit(found: MemoryEstimate, gpu_memory_bytes: int) -> str | None:
    """The DoesNotFit message when the estimate exceeds the GPU's memory, else None."""
    if found.per_gpu <= gpu_memory_bytes:
        return None
    return (
        f"needs {found.describe()}, the GPUs have {gpu_memory_bytes / GIB:.1f} GiB: lower "
        "spec.training.batchSizePerDevice or dataset.maxSeqLength, turn on training.gradientCheckpointing, "
        "use method qlora, deepspeed.zeroStage 3 on more GPUs, or offload to the CPU"
    )
