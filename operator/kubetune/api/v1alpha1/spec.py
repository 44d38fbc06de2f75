"""The FineTuneJob spec: what a user asks for. The CRD schema, defaults and docs derive from here."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, StringConstraints, field_validator

from kubetune.api.base import ApiModel, Rule

# --- shared field types ------------------------------------------------------------------------

# Kubernetes' own quantity grammar (resource.Quantity), so "16", "200Gi" and "500m" pass and "lots" fails.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
Quantity = Annotated[
    str,
    # YAML reads `cpu: 16` as an int; Kubernetes accepts both, so do we.
    BeforeValidator(
        lambda value: str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    ),
    StringConstraints(pattern=QUANTITY_PATTERN, max_length=64),
    # The API server keeps no `pattern` on an int-or-string field; its CEL quantity library judges instead.
    Field(
        json_schema_extra={
            "x-kubernetes-int-or-string": True,
            "x-kubernetes-validations": [
                {
                    "rule": "type(self) == int || isQuantity(self)",
                    "message": "must be a Kubernetes quantity such as 16, 500m or 64Gi",
                }
            ],
        }
    ),
]
Name = Annotated[str, StringConstraints(min_length=1, max_length=253)]
ModulePattern = Annotated[str, StringConstraints(min_length=1, max_length=256)]

MODEL_URI_PATTERN = r"^(hf://[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?|s3://[a-z0-9][a-z0-9.\-]{1,62}(/.*)?|pvc://[a-z0-9][a-z0-9\-]*(/.*)?|file://.+)$"
OUTPUT_URI_PATTERN = r"^(s3://[a-z0-9][a-z0-9.\-]{1,62}(/.*)?|pvc://[a-z0-9][a-z0-9\-]*(/.*)?|file://.+)$"
ModelUri = Annotated[str, StringConstraints(pattern=MODEL_URI_PATTERN, max_length=1024)]
DataUri = Annotated[
    str,
    StringConstraints(
        pattern=OUTPUT_URI_PATTERN.replace("^(", "^(hf://[A-Za-z0-9][\\w.\\-]*(/[\\w.\\-]+)?|"),
        max_length=1024,
    ),
]
OutputUri = Annotated[str, StringConstraints(pattern=OUTPUT_URI_PATTERN, max_length=1024)]

# A job's spec cannot change once the job exists, except spec.runPolicy.suspend. This is the idiom of the
# Kubernetes docs: `self == oldSelf` on each field, and on the parent of an optional field without a default,
# a rule that the field is neither added nor removed (a field's own rule only runs where it holds a value;
# fields with a default are always present). The API server evaluates every transition rule on each status
# write too: on the fields, the rules cost it less CPU per write than on the spec (docs/architecture.md).
FIXED_MESSAGE = (
    "cannot change once the job exists: create a new FineTuneJob instead "
    "(only spec.runPolicy.suspend can change)"
)
Immutable = Field(
    json_schema_extra={"x-kubernetes-validations": [{"rule": "self == oldSelf", "message": FIXED_MESSAGE}]}
)


def _pinned(field: str, path: str) -> Rule:
    """The transition rule, on the parent, that an optional field without a default keeps its presence."""
    return Rule(
        cel=f"has(self.{field}) == has(oldSelf.{field})",
        message=f"{path} cannot be added or removed once the job exists: create a new FineTuneJob instead",
        field=f".{field}",
    )


def _absent_or(value: object, *allowed: object) -> bool:
    return value is None or value in allowed


# --- model and data ----------------------------------------------------------------------------


class Task(StrEnum):
    CAUSAL_LM = "causal-lm"
    SEQ_CLS = "seq-cls"
    TOKEN_CLS = "token-cls"
    QUESTION_ANSWERING = "question-answering"


class ModelSpec(ApiModel):
    """The base model to fine-tune."""

    source: ModelUri
    """Where the weights are: `hf://org/name` (Hugging Face Hub), `s3://bucket/prefix`, `pvc://claim/path` or `file:///path` (`file://relative/path` in local mode)."""
    revision: Annotated[str, StringConstraints(min_length=1, max_length=128)] = "main"
    """Hub branch, tag or commit; also the cache key for other sources."""
    task: Task = Task.CAUSAL_LM
    """The head to train: causal-lm (SFT), seq-cls, token-cls or question-answering."""
    num_labels: Annotated[int, Field(ge=2, le=100_000)] | None = None
    """Number of classes; required for seq-cls and token-cls."""
    added_tokens: Annotated[
        list[Annotated[str, StringConstraints(min_length=1, max_length=128)]], Field(max_length=1024)
    ] = []
    """Tokens to add to the vocabulary; the embeddings are resized and trained."""
    trust_remote_code: bool = False
    """Run Python code shipped with the model. Only for sources you trust."""

    rules = (
        Rule(
            cel="!(self.task in ['seq-cls', 'token-cls']) || has(self.numLabels)",
            message="numLabels is required when task is seq-cls or token-cls: set model.numLabels to the number of classes",
            field=".numLabels",
            check=lambda m: m.task not in (Task.SEQ_CLS, Task.TOKEN_CLS) or m.num_labels is not None,
        ),
    )


class DatasetFormat(StrEnum):
    ALPACA = "alpaca"
    CHAT = "chat"
    COMPLETION = "completion"
    TEXT = "text"


class DatasetColumns(ApiModel):
    """Column names in the data files, when they differ from the format's usual ones."""

    instruction: Name = "instruction"
    """alpaca: the instruction."""
    input: Name = "input"
    """alpaca: the optional input."""
    output: Name = "output"
    """alpaca: the response."""
    prompt: Name = "prompt"
    """completion: the prompt."""
    completion: Name = "completion"
    """completion: the response."""
    messages: Name = "messages"
    """chat: the list of {role, content} messages."""
    text: Name = "text"
    """text, seq-cls, token-cls: the text (for token-cls, a list of words)."""
    label: Name = "label"
    """seq-cls: the class; token-cls: one label per word."""
    question: Name = "question"
    """question-answering: the question."""
    context: Name = "context"
    """question-answering: the passage holding the answer."""
    answers: Name = "answers"
    """question-answering: {text: [...], answer_start: [...]}."""


class DatasetSpec(ApiModel):
    """The training data."""

    source: DataUri
    """A file or folder: `s3://`, `pvc://`, `file:///` or `hf://` (a Hub dataset)."""
    format: DatasetFormat = DatasetFormat.ALPACA
    """How rows are turned into text: alpaca (instruction/input/output), chat (messages + chat template), completion (prompt/completion) or text."""
    file_type: Literal["jsonl", "json", "parquet", "csv"] | None = None
    """File type; taken from the file extension when unset."""
    columns: DatasetColumns = DatasetColumns()
    """Column names, when they differ from the defaults."""
    validation_split: Annotated[float, Field(ge=0.0, le=0.5)] = 0.05
    """Share of rows held out for evaluation (0 disables evaluation)."""
    max_seq_length: Annotated[int, Field(ge=8, le=1_048_576)] = 2048
    """Longest sequence in tokens; longer samples are truncated."""
    packing: bool = False
    """Pack several short samples into one sequence of maxSeqLength to waste no compute on padding."""
    train_on_prompt: bool = False
    """Compute the loss on prompt tokens too. By default (SFT) only response tokens carry loss."""


# --- methods -----------------------------------------------------------------------------------


class MethodType(StrEnum):
    LORA = "lora"
    QLORA = "qlora"
    DORA = "dora"
    ADALORA = "adalora"
    IA3 = "ia3"
    LOHA = "loha"
    LOKR = "lokr"
    PREFIX = "prefix"
    PROMPT = "prompt"
    P_TUNING = "p-tuning"
    LLAMA_ADAPTER = "llama-adapter"
    FREEZE = "freeze"
    FULL = "full"


PROMPT_LEARNING_METHODS = (
    MethodType.PREFIX,
    MethodType.PROMPT,
    MethodType.P_TUNING,
    MethodType.LLAMA_ADAPTER,
)
TargetModules = Annotated[list[ModulePattern], Field(min_length=1, max_length=64)]


class LoraSpec(ApiModel):
    """LoRA, QLoRA and DoRA: low-rank updates of chosen linear layers."""

    r: Annotated[int, Field(ge=1, le=1024)] = 16
    """Rank of the update matrices."""
    alpha: Annotated[int, Field(ge=1, le=4096)] = 32
    """Scaling: the update is multiplied by alpha/r (alpha/sqrt(r) with rsLora)."""
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    """Dropout on the LoRA input."""
    target_modules: TargetModules = ["all-linear"]
    """Module names (suffixes) to adapt, e.g. [q_proj, v_proj]; `all-linear` adapts every linear layer but the output head."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases to train."""
    fan_in_fan_out: bool = False
    """Set for layers that store weights as (in, out), like GPT-2's Conv1D."""
    init: Literal["default", "gaussian", "pissa", "olora"] = "default"
    """Initialisation of the LoRA matrices: default (B=0), gaussian, PiSSA (principal singular vectors) or OLoRA (QR)."""
    modules_to_save: Annotated[list[ModulePattern], Field(max_length=64)] = []
    """Modules trained in full and saved with the adapter, e.g. [lm_head] or a classifier head."""
    rs_lora: bool = False
    """Rank-stabilised scaling alpha/sqrt(r)."""

    rules = (
        Rule(
            cel="!has(self.targetModules) || !('all-linear' in self.targetModules) || size(self.targetModules) == 1",
            message="'all-linear' must be the only entry of targetModules: use [all-linear] or list module names",
            field=".targetModules",
            check=lambda m: "all-linear" not in m.target_modules or len(m.target_modules) == 1,
        ),
    )


class ChainSpec(ApiModel):
    """Chain of LoRA (COLA): train a LoRA, merge it into the base, start a fresh one; repeat."""

    rounds: Annotated[int, Field(ge=2, le=16)] = 3
    """Number of train-merge rounds; the training budget is split evenly between them."""


class QuantizationSpec(ApiModel):
    """QLoRA: the frozen base is quantized with bitsandbytes."""

    bits: Literal[4, 8] = 4
    """4 (NF4/FP4) or 8 (LLM.int8)."""
    type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type: nf4 (NormalFloat, the QLoRA paper) or fp4."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves ~0.4 bits per parameter)."""
    compute_dtype: Literal["float32", "float16", "bfloat16"] = "bfloat16"
    """Dtype of the matmuls on dequantized weights."""


class AdaLoraSpec(ApiModel):
    """AdaLoRA: LoRA whose rank budget is reallocated between layers during training."""

    init_r: Annotated[int, Field(ge=1, le=1024)] = 12
    """Starting rank of every layer."""
    target_r: Annotated[int, Field(ge=1, le=1024)] = 8
    """Average rank left after pruning."""
    tinit: Annotated[int, Field(ge=0)] = 0
    """Steps of warm-up before pruning starts."""
    tfinal: Annotated[int, Field(ge=0)] = 0
    """Steps at the end with the budget fixed."""
    delta_t: Annotated[int, Field(ge=1)] = 1
    """Steps between two budget reallocations."""
    beta1: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.85
    """EMA factor of the sensitivity smoothing."""
    beta2: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.85
    """EMA factor of the uncertainty quantification."""
    orth_reg_weight: Annotated[float, Field(ge=0.0)] = 0.5
    """Weight of the orthogonality regulariser."""
    alpha: Annotated[int, Field(ge=1, le=4096)] = 32
    """Scaling of the update."""
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    """Dropout on the adapter input."""
    target_modules: TargetModules = ["all-linear"]
    """Module names to adapt, or `all-linear`."""

    rules = (
        Rule(
            cel="!has(self.targetR) || !has(self.initR) || self.targetR <= self.initR",
            message="targetR must not exceed initR: AdaLoRA only prunes ranks",
            field=".targetR",
            check=lambda m: m.target_r <= m.init_r,
        ),
    )


class IA3Spec(ApiModel):
    """IA3: learned rescaling vectors on keys, values and feed-forward activations."""

    target_modules: TargetModules = ["k_proj", "v_proj", "down_proj"]
    """Modules whose activations are rescaled."""
    feedforward_modules: Annotated[list[ModulePattern], Field(max_length=64)] = ["down_proj"]
    """Which of targetModules are feed-forward layers (their input, not output, is scaled)."""

    rules = (
        Rule(
            cel="!has(self.feedforwardModules) || !has(self.targetModules) || self.feedforwardModules.all(m, m in self.targetModules)",
            message="every feedforwardModules entry must also be in targetModules",
            field=".feedforwardModules",
            check=lambda m: set(m.feedforward_modules) <= set(m.target_modules),
        ),
    )


class LoHaSpec(ApiModel):
    """LoHa: low-rank Hadamard product updates."""

    r: Annotated[int, Field(ge=1, le=1024)] = 8
    """Rank of each factor."""
    alpha: Annotated[int, Field(ge=1, le=4096)] = 16
    """Scaling of the update."""
    rank_dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    """Dropout on ranks during training."""
    module_dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    """Probability of skipping a whole adapted module during training."""
    target_modules: TargetModules = ["all-linear"]
    """Module names to adapt, or `all-linear`."""


class LoKrSpec(ApiModel):
    """LoKr: low-rank Kronecker product updates."""

    r: Annotated[int, Field(ge=1, le=1024)] = 8
    """Rank of the decomposed factor."""
    alpha: Annotated[int, Field(ge=1, le=4096)] = 16
    """Scaling of the update."""
    rank_dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    """Dropout on ranks during training."""
    module_dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    """Probability of skipping a whole adapted module during training."""
    decompose_both: bool = False
    """Low-rank decompose the left Kronecker factor too."""
    decompose_factor: int = -1
    """Kronecker factor size; -1 picks the most square split."""
    target_modules: TargetModules = ["all-linear"]
    """Module names to adapt, or `all-linear`."""


class PrefixSpec(ApiModel):
    """Prefix tuning: trained key/value prefixes in every layer. With projection it is P-tuning v2 style."""

    num_virtual_tokens: Annotated[int, Field(ge=1, le=1024)] = 20
    """Length of the prefix."""
    projection: bool = False
    """Reparameterise the prefix through an MLP (prefix projection) while training."""
    encoder_hidden_size: Annotated[int, Field(ge=1, le=65536)] = 512
    """Hidden size of the projection MLP."""


class PromptSpec(ApiModel):
    """Prompt tuning: trained soft-prompt embeddings at the input only."""

    num_virtual_tokens: Annotated[int, Field(ge=1, le=1024)] = 20
    """Length of the soft prompt."""
    init_text: Annotated[str, StringConstraints(min_length=1, max_length=4096)] | None = None
    """Initialise the soft prompt from the embeddings of this text (random when unset)."""


class PTuningSpec(ApiModel):
    """P-tuning (v1): virtual tokens produced by a small prompt encoder."""

    num_virtual_tokens: Annotated[int, Field(ge=1, le=1024)] = 20
    """Number of virtual tokens."""
    encoder_type: Literal["MLP", "LSTM"] = "MLP"
    """The prompt encoder."""
    encoder_hidden_size: Annotated[int, Field(ge=1, le=65536)] = 128
    """Hidden size of the prompt encoder."""
    encoder_num_layers: Annotated[int, Field(ge=1, le=8)] = 2
    """Layers of the prompt encoder."""
    encoder_dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    """Dropout in the prompt encoder."""


class LlamaAdapterSpec(ApiModel):
    """LLaMA-Adapter (adaption prompt): gated prompts in the top layers of a Llama-family model."""

    adapter_len: Annotated[int, Field(ge=1, le=1024)] = 10
    """Number of adaption prompt tokens per layer."""
    adapter_layers: Annotated[int, Field(ge=1, le=1024)] = 30
    """Number of top layers with an adaption prompt (at most the model's layer count)."""


class FreezeSpec(ApiModel):
    """Freeze tuning: the base stays frozen except the chosen layers, trained in full."""

    trainable_layers: Annotated[int, Field(ge=1, le=1024)] | None = 2
    """Train the last N transformer blocks."""
    trainable_modules: Annotated[list[ModulePattern], Field(max_length=64)] = []
    """Also train parameters whose name matches one of these regular expressions (e.g. `embed_tokens`)."""


# Which method types each block belongs to. The CRD rules and the Python checks are generated from
# this one table, so a new method needs one row here.
METHOD_BLOCKS: dict[str, tuple[MethodType, ...]] = {
    "lora": (MethodType.LORA, MethodType.QLORA, MethodType.DORA),
    "chain": (MethodType.LORA, MethodType.DORA),
    "quantization": (MethodType.QLORA,),
    "adalora": (MethodType.ADALORA,),
    "ia3": (MethodType.IA3,),
    "loha": (MethodType.LOHA,),
    "lokr": (MethodType.LOKR,),
    "prefix": (MethodType.PREFIX,),
    "prompt": (MethodType.PROMPT,),
    "pTuning": (MethodType.P_TUNING,),
    "llamaAdapter": (MethodType.LLAMA_ADAPTER,),
    "freeze": (MethodType.FREEZE,),
}


def _block_rule(block: str, types: tuple[MethodType, ...]) -> Rule:
    names = ", ".join(t.value for t in types)
    cel_types = ", ".join(f"'{t.value}'" for t in types)
    attribute = re.sub(r"([A-Z])", r"_\1", block).lower()  # pTuning -> p_tuning; ia3 stays ia3

    def check(method: MethodSpec) -> bool:
        return getattr(method, attribute) is None or method.type in types

    return Rule(
        cel=f"!has(self.{block}) || self.type in [{cel_types}]",
        message=f"method.{block} only applies to method.type {names}: remove it or change method.type",
        field=f".{block}",
        check=check,
    )


class MethodSpec(ApiModel):
    """The fine-tuning method and its knobs. Set only the block that belongs to `type`."""

    type: MethodType = MethodType.LORA
    """lora, qlora, dora, adalora, ia3, loha, lokr, prefix, prompt, p-tuning, llama-adapter, freeze or full."""
    lora: LoraSpec | None = None
    """LoRA knobs for lora, qlora and dora (defaults when unset)."""
    chain: ChainSpec | None = None
    """Chain of LoRA rounds (lora, dora)."""
    quantization: QuantizationSpec | None = None
    """Quantization of the frozen base for qlora (4-bit NF4 with double quantization when unset)."""
    adalora: AdaLoraSpec | None = None
    """AdaLoRA knobs."""
    ia3: IA3Spec | None = None
    """IA3 knobs."""
    loha: LoHaSpec | None = None
    """LoHa knobs."""
    lokr: LoKrSpec | None = None
    """LoKr knobs."""
    prefix: PrefixSpec | None = None
    """Prefix tuning knobs."""
    prompt: PromptSpec | None = None
    """Prompt tuning knobs."""
    p_tuning: PTuningSpec | None = None
    """P-tuning knobs."""
    llama_adapter: LlamaAdapterSpec | None = None
    """LLaMA-Adapter knobs."""
    freeze: FreezeSpec | None = None
    """Freeze tuning knobs."""

    rules = tuple(_block_rule(block, types) for block, types in METHOD_BLOCKS.items())

    @property
    def effective_lora(self) -> LoraSpec:
        return self.lora or LoraSpec()

    @property
    def effective_quantization(self) -> QuantizationSpec:
        return self.quantization or QuantizationSpec()


# --- training ----------------------------------------------------------------------------------


class LearningRateGroup(ApiModel):
    """A learning rate for the parameters whose name matches `match`."""

    name: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9\-]*$", max_length=63)]
    """A label for logs and metrics."""
    match: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    """Python regular expression searched in each trainable parameter's name."""
    learning_rate: Annotated[float, Field(gt=0.0, le=1.0)]
    """Learning rate of this group."""
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    """Weight decay of this group (training.weightDecay when unset)."""

    @field_validator("match")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"not a valid regular expression: {error}") from error
        return pattern


class TrainingSpec(ApiModel):
    """The optimisation loop."""

    epochs: Annotated[float, Field(gt=0.0, le=1000.0)] = 3.0
    """Passes over the training data (fractions allowed)."""
    max_steps: Annotated[int, Field(ge=1)] | None = None
    """Stop after this many optimizer steps (overrides epochs)."""
    learning_rate: Annotated[float, Field(gt=0.0, le=1.0)] = 2.0e-4
    """Peak learning rate of the adapter (or of all weights for full fine-tuning)."""
    learning_rate_groups: Annotated[list[LearningRateGroup], Field(max_length=16)] = []
    """Other learning rates for matching parameters, e.g. a smaller one for unfrozen base weights; first match wins."""
    scheduler: Literal[
        "linear",
        "cosine",
        "cosine_with_restarts",
        "polynomial",
        "constant",
        "constant_with_warmup",
        "inverse_sqrt",
    ] = "cosine"
    """Learning-rate schedule."""
    warmup_ratio: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.03
    """Share of steps with a linear warm-up."""
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    """AdamW weight decay."""
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "adamw_bnb_8bit", "sgd"] = (
        "adamw_torch"
    )
    """Optimizer (paged/8-bit ones come from bitsandbytes)."""
    max_grad_norm: Annotated[float, Field(ge=0.0)] = 1.0
    """Gradient clipping (0 disables)."""
    batch_size_per_device: Annotated[int, Field(ge=1, le=4096)] = 4
    """Sequences per GPU per micro-step."""
    gradient_accumulation_steps: Annotated[int, Field(ge=1, le=4096)] = 1
    """Micro-steps per optimizer step."""
    precision: Literal["fp32", "fp16", "bf16"] = "bf16"
    """Mixed precision of the forward and backward passes."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, ~30% more compute."""
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 42
    """Seed of initialisation, shuffling and dropout."""
    eval_every_steps: Annotated[int, Field(ge=1)] | None = None
    """Evaluate every N steps (only at the end when unset)."""
    log_every_steps: Annotated[int, Field(ge=1)] = 10
    """Log and export metrics every N steps."""


# --- where and how it runs ---------------------------------------------------------------------


class ResourcesSpec(ApiModel):
    """The shape of the job: nodes x GPUs, and what each pod requests."""

    nodes: Annotated[int, Field(ge=1, le=1024)] = 1
    """Pods (one per node): 1 master and nodes-1 workers."""
    gpus_per_node: Annotated[int, Field(ge=0, le=64)] = 1
    """GPUs per pod, one training process each. 0 runs one CPU process per pod."""
    gpu_resource_name: Annotated[
        str, StringConstraints(pattern=r"^[a-z0-9.\-]+/[a-z0-9.\-]+$", max_length=253)
    ] = "nvidia.com/gpu"
    """Extended resource name of the GPUs."""
    requests: Annotated[
        dict[Literal["cpu", "memory", "ephemeral-storage"], Quantity], Field(max_length=3)
    ] = {}
    """CPU, memory and ephemeral-storage requests of each pod (also used as limits for memory)."""
    shared_memory: Quantity = "8Gi"
    """Size of the memory-backed /dev/shm (NCCL and data loaders need more than the container default)."""

    @property
    def processes_per_node(self) -> int:
        return max(self.gpus_per_node, 1)


class DeepSpeedSpec(ApiModel):
    """DeepSpeed ZeRO. Without this block training uses plain DDP."""

    zero_stage: Literal[0, 1, 2, 3] = 3
    """ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """Keep optimizer state in CPU memory (ZeRO-Offload)."""
    offload_params: Literal["none", "cpu"] = "none"
    """Keep parameters in CPU memory (ZeRO-3 only)."""

    rules = (
        Rule(
            cel="!has(self.offloadParams) || self.offloadParams == 'none' || (has(self.zeroStage) && self.zeroStage == 3)",
            message="offloadParams: cpu needs zeroStage: 3",
            field=".offloadParams",
            check=lambda d: d.offload_params == "none" or d.zero_stage == 3,
        ),
        Rule(
            cel="!has(self.offloadOptimizer) || self.offloadOptimizer == 'none' || (has(self.zeroStage) && self.zeroStage >= 1)",
            message="offloadOptimizer: cpu needs zeroStage 1, 2 or 3",
            field=".offloadOptimizer",
            check=lambda d: d.offload_optimizer == "none" or d.zero_stage >= 1,
        ),
    )


class OutputSpec(ApiModel):
    """Where the trained adapter (or merged model) is published."""

    uri: OutputUri
    """Destination folder: `s3://bucket/prefix/`, `pvc://claim/path` or `file:///path` (`file://relative/path` in local mode)."""
    merge_weights: bool = False
    """Publish the base with the adapter merged in instead of the adapter alone."""


class CheckpointSpec(ApiModel):
    """Checkpoints for resuming after a pod or node failure."""

    every_steps: Annotated[int, Field(ge=1)] = 200
    """Save every N optimizer steps (a lost pod costs at most N steps)."""
    keep: Annotated[int, Field(ge=1, le=100)] = 2
    """Complete checkpoints kept; older ones are deleted."""
    uri: OutputUri | None = None
    """Where checkpoints go; `<output.uri>/checkpoints/` when unset."""


class S3Spec(ApiModel):
    """An S3 or S3-compatible object store."""

    endpoint: Annotated[str, StringConstraints(pattern=r"^(https?://[^\s]+)?$", max_length=1024)] = ""
    """Endpoint URL for S3-compatible stores (MinIO, SeaweedFS, Ceph); empty for AWS."""
    region: Annotated[str, StringConstraints(pattern=r"^[a-z0-9\-]*$", max_length=64)] = "us-east-1"
    """Region of the buckets."""
    credentials_secret: (
        Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([a-z0-9.\-]*[a-z0-9])?$", max_length=253)] | None
    ) = None
    """Secret with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; unset uses the pod's identity (IRSA, workload identity)."""


class HubSpec(ApiModel):
    """The Hugging Face Hub."""

    token_secret: (
        Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([a-z0-9.\-]*[a-z0-9])?$", max_length=253)] | None
    ) = None
    """Secret with key HF_TOKEN, for gated or private models."""


class StorageSpec(ApiModel):
    """Credentials and endpoints of the stores named by the URIs. Credentials only ever come from Secrets."""

    s3: S3Spec = S3Spec()
    """S3 settings for every s3:// URI of this job."""
    hub: HubSpec = HubSpec()
    """Hub settings for hf:// URIs."""


class RunPolicySpec(ApiModel):
    """Retries, deadlines, clean-up and suspension (passed to the PyTorchJob)."""

    backoff_limit: Annotated[int, Field(ge=0, le=100), Immutable] = 3
    """Restarts after retryable failures (OOM-kill, preemption, a lost node) before the job fails; one lost node is one restart, however many nodes the job has."""
    active_deadline_seconds: Annotated[Annotated[int, Field(ge=1)] | None, Immutable] = None
    """Fail the job when it runs longer than this."""
    ttl_seconds_after_finished: Annotated[Annotated[int, Field(ge=0)] | None, Immutable] = None
    """Delete the PyTorchJob this long after it finished (the FineTuneJob stays)."""
    suspend: bool = False
    """Stop the pods and keep the job; set back to false to resume from the last checkpoint."""
    clean_pod_policy: Annotated[Literal["None", "Running", "All"], Immutable] = "Running"
    """Which pods to delete when the job finishes."""

    rules = (
        _pinned("activeDeadlineSeconds", "spec.runPolicy.activeDeadlineSeconds"),
        _pinned("ttlSecondsAfterFinished", "spec.runPolicy.ttlSecondsAfterFinished"),
    )


class MetricsSpec(ApiModel):
    """The trainer's Prometheus endpoint."""

    port: Annotated[int, Field(ge=1024, le=65535)] = 9090
    """Port of the trainer's /metrics endpoint."""


class Toleration(ApiModel):
    """A Kubernetes toleration."""

    key: Annotated[str, StringConstraints(max_length=316)] | None = None
    """Taint key; empty with operator Exists matches all taints."""
    operator: Literal["Exists", "Equal"] | None = None
    """Exists or Equal."""
    value: Annotated[str, StringConstraints(max_length=63)] | None = None
    """Taint value for Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to tolerate; all when unset."""
    toleration_seconds: int | None = None
    """How long a NoExecute taint is tolerated."""


class SchedulingSpec(ApiModel):
    """Where the pods may run, passed through to the pod template."""

    node_selector: Annotated[
        dict[
            Annotated[str, StringConstraints(max_length=316)],
            Annotated[str, StringConstraints(max_length=63)],
        ],
        Field(max_length=32),
    ] = {}
    """Node labels the pods require."""
    tolerations: Annotated[list[Toleration], Field(max_length=32)] = []
    """Taints the pods tolerate (e.g. nvidia.com/gpu)."""
    affinity: dict[str, Any] | None = Field(
        default=None, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}
    )
    """A Kubernetes affinity object."""
    priority_class_name: Annotated[str, StringConstraints(max_length=253)] | None = None
    """PriorityClass of the pods."""
    scheduler_name: Annotated[str, StringConstraints(max_length=253)] | None = None
    """Scheduler of the pods (e.g. volcano)."""
    queue_name: Annotated[str, StringConstraints(max_length=253)] | None = None
    """Kueue LocalQueue; sets the kueue.x-k8s.io/queue-name label on the PyTorchJob."""


class EnvVar(ApiModel):
    """A plain environment variable for the trainer (secrets belong in storage.*Secret)."""

    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=256)]
    """Variable name."""
    value: Annotated[str, StringConstraints(max_length=4096)] = ""
    """Variable value."""


class TrainerSpec(ApiModel):
    """The trainer container."""

    image: Annotated[str, StringConstraints(min_length=1, max_length=1024)] | None = None
    """Trainer image; the operator's default when unset."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    """Image pull policy."""
    image_pull_secrets: Annotated[
        list[Annotated[str, StringConstraints(max_length=253)]], Field(max_length=8)
    ] = []
    """Secrets for a private registry."""
    env: Annotated[list[EnvVar], Field(max_length=64)] = []
    """Extra environment, e.g. NCCL_DEBUG=INFO."""

    rules = (
        Rule(
            cel="!has(self.env) || self.env.all(e, !(e.name in ['AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'HF_TOKEN']))",
            message="credentials must not be plain env: put them in a Secret and name it in storage.s3.credentialsSecret or storage.hub.tokenSecret",
            field=".env",
            check=lambda t: all(
                e.name not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN") for e in t.env
            ),
        ),
    )


MAX_SAMPLE_NEW_TOKENS = 512
"""The most tokens a sample answer may have: generating is serial, one forward pass per token."""


class SamplePrompt(ApiModel):
    """One prompt, answered by the base model and by the trained one."""

    prompt: Annotated[str, StringConstraints(min_length=1, max_length=4096)]
    """The user's message; rendered through the model's chat template when it has one, as training rows are."""
    expected: Annotated[str, StringConstraints(max_length=4096)] | None = None
    """The answer wanted, if there is one: the sample is then scored by exact match (case, surrounding spaces and a final period aside)."""


class SamplesSpec(ApiModel):
    """Prompts answered by the base model before training and by the trained model after it (causal-lm).

    The answers (greedy, at most maxNewTokens tokens each) go into the published manifest's `samples` and the
    local run's report, so a reader of the adapter sees what it does."""

    prompts: Annotated[list[SamplePrompt], Field(min_length=1, max_length=64)]
    """The prompts, answered in this order."""
    max_new_tokens: Annotated[int, Field(ge=1, le=MAX_SAMPLE_NEW_TOKENS)] = 64
    """The longest answer in tokens; generation stops earlier at the end of the turn."""


# --- the spec ----------------------------------------------------------------------------------

PROMPT_LEARNING_CEL = ", ".join(f"'{t.value}'" for t in PROMPT_LEARNING_METHODS)


class FineTuneJobSpec(ApiModel):
    """A fine-tuning run: which model, which data, which method, on what."""

    model: Annotated[ModelSpec, Immutable]
    """The base model."""
    dataset: Annotated[DatasetSpec, Immutable]
    """The training data."""
    method: Annotated[MethodSpec, Immutable] = MethodSpec()
    """The fine-tuning method."""
    training: Annotated[TrainingSpec, Immutable] = TrainingSpec()
    """The optimisation loop."""
    resources: Annotated[ResourcesSpec, Immutable] = ResourcesSpec()
    """Nodes, GPUs and pod resources."""
    deepspeed: Annotated[DeepSpeedSpec | None, Immutable] = None
    """DeepSpeed ZeRO settings; plain DDP when unset."""
    output: Annotated[OutputSpec, Immutable]
    """Where the adapter goes."""
    checkpoint: Annotated[CheckpointSpec, Immutable] = CheckpointSpec()
    """Checkpointing for resume."""
    storage: Annotated[StorageSpec, Immutable] = StorageSpec()
    """Endpoints and credential Secrets."""
    run_policy: RunPolicySpec = RunPolicySpec()
    """Retries, deadlines, suspension."""
    metrics: Annotated[MetricsSpec, Immutable] = MetricsSpec()
    """The trainer's metrics endpoint."""
    scheduling: Annotated[SchedulingSpec, Immutable] = SchedulingSpec()
    """Node selection and queueing."""
    trainer: Annotated[TrainerSpec, Immutable] = TrainerSpec()
    """The trainer container."""
    samples: Annotated[SamplesSpec | None, Immutable] = None
    """Prompts answered before and after training, to show what the adapter does."""

    rules = (
        Rule(
            cel=f"!self.output.mergeWeights || !(self.method.type in [{PROMPT_LEARNING_CEL}])",
            message="output.mergeWeights is not possible for prefix, prompt, p-tuning or llama-adapter: virtual tokens cannot be merged into weights",
            field=".output.mergeWeights",
            check=lambda s: not s.output.merge_weights or s.method.type not in PROMPT_LEARNING_METHODS,
        ),
        Rule(
            cel="self.method.type != 'llama-adapter' || self.model.task == 'causal-lm'",
            message="method.type llama-adapter needs model.task causal-lm",
            field=".model.task",
            check=lambda s: s.method.type != MethodType.LLAMA_ADAPTER or s.model.task == Task.CAUSAL_LM,
        ),
        Rule(
            cel="self.model.task == 'causal-lm' || self.dataset.format == 'text'",
            message="dataset.format alpaca, chat and completion are SFT formats: they need model.task causal-lm (use format: text for classification and QA data)",
            field=".dataset.format",
            check=lambda s: s.model.task == Task.CAUSAL_LM or s.dataset.format == DatasetFormat.TEXT,
        ),
        Rule(
            cel="!has(self.deepspeed) || self.deepspeed.zeroStage < 3 || !(self.method.type in ['adalora', 'llama-adapter'])",
            message="adalora and llama-adapter do not work under ZeRO-3 (their rank reallocation and gates need whole weights): use deepspeed.zeroStage 2 or less",
            field=".deepspeed.zeroStage",
            check=lambda s: (
                s.deepspeed is None
                or s.deepspeed.zero_stage < 3
                or s.method.type not in (MethodType.ADALORA, MethodType.LLAMA_ADAPTER)
            ),
        ),
        Rule(
            cel="self.training.precision != 'fp16' || self.method.type != 'qlora' || !has(self.method.quantization) || self.method.quantization.computeDtype != 'bfloat16'",
            message="precision fp16 with a bfloat16 QLoRA compute dtype mixes two half types: set method.quantization.computeDtype float16 or training.precision bf16",
            field=".training.precision",
            check=lambda s: (
                not (
                    s.training.precision == "fp16"
                    and s.method.type == MethodType.QLORA
                    and s.method.quantization is not None
                    and s.method.quantization.compute_dtype == "bfloat16"
                )
            ),
        ),
        Rule(
            cel="!has(self.samples) || self.model.task == 'causal-lm'",
            message="samples need model.task causal-lm: only a language model answers prompts",
            field=".samples",
            check=lambda s: s.samples is None or s.model.task == Task.CAUSAL_LM,
        ),
        _pinned("deepspeed", "spec.deepspeed"),
        _pinned("samples", "spec.samples"),
    )
