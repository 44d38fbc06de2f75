"""Training runs that the trainer benchmarks time, each in a process of its own.

A run trains one LoRA (or QLoRA) on one model and dataset with one of the trainers compared:

- ``kubetune``: the kubetune trainer's Python entry (``kubetune_trainer.train.run``, what
  ``python -m kubetune_trainer`` calls) on a FineTuneJob spec, with its metrics exporter and
  callbacks as in a pod;
- ``kubetune-bare``: the same with kubetune's own callbacks and exporter taken out;
- ``transformers``: a plain ``transformers.Trainer`` + peft script;
- ``trl``: trl's ``SFTTrainer`` on the same rows as prompt/completion pairs.

A model that ships a chat template (the pretrained SmolLM2) has its rows rendered in it by
every trainer, as the kubetune trainer renders alpaca rows for such a model; the others get
the alpaca headers.

Every trainer gets the same :class:`StepClock`: at the end of each optimizer step it notes
the time and the Trainer's own count of non-padding input tokens
(``include_num_input_tokens_seen="non_padding"``, on in every run). Throughput is the
tokens between the end of the warm-up steps and the last step over the time between
them, so start-up, tokenizing, saving and publishing are left out the same way for all.
The parent reads each run's peak RSS from ``wait4`` (:func:`spawn`), so it is that
process's alone.

    python -m bench.training_runs assets SPEC.json ASSETS.json    # data, tokenizer, model
    python -m bench.training_runs KIND PLAN.json RESULT.json      # one timed run
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import REPO_DIR

BASE_TOKENIZER = REPO_DIR / "examples" / "quickstart" / "model"
"""The shipped byte-level BPE (Llama's special tokens); retrained on the generated rows."""
KUBETUNE_CALLBACK_MODULE = "kubetune_trainer"
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
INSTRUCTIONS = (
    "Summarize the notes below.",
    "Continue the story.",
    "Rewrite the text in plain words.",
    "Answer the question from the passage.",
    "List the steps in order.",
)


# ------------------------------------------------------------------------------------- plans


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What one run trains; the same plan goes to every trainer compared."""

    model_dir: str
    data_file: str
    max_seq_length: int
    batch_size: int
    steps: int
    """Optimizer steps timed, after the warm-up steps."""
    warmup_steps: int
    learning_rate: float = 2.0e-4
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("all-linear",)
    method: str = "lora"
    """lora, or qlora (4-bit NF4 base with double quantization; needs CUDA)."""
    precision: str = "fp32"
    packing: bool = False
    gradient_checkpointing: bool = False
    gpus: int = 0
    """0 trains on the CPU; 1 on one CUDA device."""
    threads: int | None = None
    """torch intra-op threads (OMP_NUM_THREADS); None leaves torch's default."""
    seed: int = 42
    log_every_steps: int = 10

    @property
    def max_steps(self) -> int:
        return self.warmup_steps + self.steps

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "target_modules": list(self.target_modules)}

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> RunPlan:
        return cls(**{**document, "target_modules": tuple(document["target_modules"])})


@dataclasses.dataclass(frozen=True)
class AssetSpec:
    """A generated dataset and the model that trains on it: a random-weight Llama built from ``model_config``
    with a tokenizer retrained on the rows, or, with ``model_dir``, a pretrained model as it is."""

    model_config: dict[str, Any]
    rows: int
    min_words: int
    max_words: int
    vocab_size: int = 1024
    seed: int = 7
    dtype: str = "float32"
    """Dtype the weights are saved in (bfloat16 for the GPU's 8B-shaped model: half the disk)."""
    model_dir: str | None = None
    """A pretrained model's directory, trained with its own tokenizer (``model_config``, ``vocab_size`` and
    ``dtype`` are then unused)."""

    def digest(self) -> str:
        # Unset fields are left out, so that a field added later keeps the older specs' cached assets.
        fields = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


# -------------------------------------------------------------------------- data (pure parts)


def pseudo_words(count: int, rng: random.Random) -> list[str]:
    """Distinct made-up words of one to three syllables, so the tokenizer has merges to learn."""
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))))
    return sorted(words)


def log_uniform_int(rng: random.Random, low: int, high: int) -> int:
    """An integer in [low, high] whose logarithm is uniform: many short values, a long tail."""
    return min(high, max(low, round(math.exp(rng.uniform(math.log(low), math.log(high))))))


def mixed_length_rows(count: int, min_words: int, max_words: int, seed: int = 7) -> list[dict[str, str]]:
    """Alpaca rows whose responses are ``min_words``-``max_words`` words long, log-uniformly.

    Instruction data has this shape (many short answers, a few long ones), which is what
    makes padding costly and packing worth it. With ``min_words == max_words`` every row
    has the same length.
    """
    rng = random.Random(seed)
    vocabulary = pseudo_words(400, rng)
    rows = []
    for _ in range(count):
        context = " ".join(rng.choices(vocabulary, k=rng.randint(0, 12)))
        response = " ".join(rng.choices(vocabulary, k=log_uniform_int(rng, min_words, max_words)))
        rows.append(
            {"instruction": rng.choice(INSTRUCTIONS), "input": context, "output": response.capitalize()}
        )
    return rows


def padding_efficiency(lengths: list[int], batch_size: int, multiple: int = 8, seed: int = 0) -> float:
    """Share of real tokens in padded batches of shuffled rows (each batch padded to its longest row,
    rounded up to ``multiple``): the most that packing can win back is its inverse."""
    order = list(lengths)
    random.Random(seed).shuffle(order)
    real = padded = 0
    for start in range(0, len(order) - batch_size + 1, batch_size):
        batch = order[start : start + batch_size]
        real += sum(batch)
        padded += batch_size * -(-max(batch) // multiple) * multiple
    return real / padded if padded else 1.0


def alpaca_text(row: dict[str, str]) -> tuple[str, str]:
    """Prompt and response of a row, in the template the kubetune trainer uses for alpaca rows."""
    from kubetune_trainer.data import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT

    context = row["input"].strip()
    template = ALPACA_PROMPT if context else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=row["instruction"].strip(), input=context), row["output"]


def chat_messages(row: dict[str, str]) -> list[dict[str, str]]:
    """A row as the user turn and the assistant turn the kubetune trainer makes of it for a chat model."""
    from kubetune.api.v1alpha1 import DatasetColumns
    from kubetune_trainer.data import alpaca_messages

    return alpaca_messages(row, DatasetColumns())


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the model ships a chat template, in which the kubetune trainer then renders alpaca rows."""
    from kubetune_trainer.data import own_chat_template

    return own_chat_template(tokenizer) is not None


def encode_row(row: dict[str, str], tokenizer: Any) -> tuple[list[int], int]:
    """A row's token ids, not yet cut to length, and how many of them are prompt, as a plain script makes them.

    A chat model's rows go through its template (which writes its own BOS and end of turn); other rows get
    the alpaca headers, the tokenizer's special tokens and an EOS. The prompt is tokenized alone to find its
    length: in both renderings it ends in a newline, on which the tokenizers here never merge across.
    """
    if has_chat_template(tokenizer):
        messages = chat_messages(row)
        prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        input_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return list(input_ids), len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    prompt, response = alpaca_text(row)
    input_ids = tokenizer(prompt + response)["input_ids"] + [tokenizer.eos_token_id]
    return list(input_ids), len(tokenizer(prompt)["input_ids"])


# ------------------------------------------------------------------------------------ assets


def build_assets(spec: AssetSpec, folder: Path) -> dict[str, Any]:
    """Write ``data.jsonl``, a tokenizer retrained on it and a random-weight Llama; idempotent."""
    done = folder / "assets.json"
    if done.exists():
        return dict(json.loads(done.read_text()))
    folder.mkdir(parents=True, exist_ok=True)
    rows = mixed_length_rows(spec.rows, spec.min_words, spec.max_words, spec.seed)
    data_file = folder / "data.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    model_dir, parameters, model_config, tokenizer = (
        _random_model(spec, rows, folder / "model")
        if spec.model_dir is None
        else _pretrained_model(spec.model_dir)
    )
    assets = {
        "modelDir": str(model_dir),
        "dataFile": str(data_file),
        "parameters": parameters,
        "modelConfig": model_config,
        "tokenLengths": [len(encode_row(row, tokenizer)[0]) for row in rows],
    }
    done.write_text(json.dumps(assets))
    return assets


PRETRAINED_CONFIG_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "max_position_embeddings", "tie_word_embeddings", "vocab_size",
)  # fmt: skip


def _pretrained_model(model_dir: str) -> tuple[Path, int, dict[str, Any], Any]:
    """(directory, parameters, config, tokenizer) of a pretrained model, used where it is."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = model.config.to_dict()
    parameters = sum(p.numel() for p in model.parameters())  # tied embeddings count once
    return (
        Path(model_dir),
        parameters,
        {k: config[k] for k in PRETRAINED_CONFIG_KEYS},
        AutoTokenizer.from_pretrained(model_dir),
    )


def _random_model(
    spec: AssetSpec, rows: list[dict[str, str]], model_dir: Path
) -> tuple[Path, int, dict[str, Any], Any]:
    """A tokenizer retrained on ``rows`` and a random-weight Llama of ``spec.model_config``, saved in ``model_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    texts = ["".join(alpaca_text(row)) for row in rows]
    tokenizer = AutoTokenizer.from_pretrained(BASE_TOKENIZER).train_new_from_iterator(
        texts, vocab_size=spec.vocab_size
    )
    tokenizer.save_pretrained(model_dir)
    config = LlamaConfig(
        **{"vocab_size": len(tokenizer), **spec.model_config},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(spec.seed)
    # Random init of a multi-billion-parameter model takes minutes on the CPU, seconds on a GPU.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, spec.dtype))  # type: ignore[no-untyped-call]
    model.save_pretrained(model_dir)
    parameters = sum(p.numel() for p in model.parameters())
    return model_dir, parameters, {**spec.model_config, "vocab_size": config.vocab_size}, tokenizer


# ---------------------------------------------------------------------- the clock, in a run


class CallbackTimer:
    """Wraps the event methods of callbacks so that the time spent in them adds up here."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self.by_callback: dict[str, float] = {}

    def instrument(self, callback: Any) -> None:
        name = type(callback).__name__
        events = {
            attribute
            for cls in type(callback).__mro__
            if cls.__module__.startswith(KUBETUNE_CALLBACK_MODULE)
            for attribute in vars(cls)
            if attribute.startswith("on_")
        }
        for event in events:
            setattr(callback, event, self._timed(name, getattr(callback, event)))

    def _timed(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                self.seconds += elapsed
                self.calls += 1
                self.by_callback[name] = self.by_callback.get(name, 0.0) + elapsed

        return timed


def make_step_clock(warmup_steps: int, callback_timer: CallbackTimer | None = None) -> Any:
    """The TrainerCallback that times every trainer the same way (see the module docstring)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[tuple[int, float, int, float]] = []
            """(step, perf_counter, non-padding tokens seen, seconds in timed callbacks so far)."""
            self.cpu_marks: list[tuple[int, float]] = []
            """(step, CPU seconds of the whole process so far): what a step cost, whatever else ran beside it."""
            self.losses: list[tuple[int, float]] = []
            self.gpu_peak_allocated = 0
            self.gpu_peak_reserved = 0

        def _mark(self, state: Any) -> None:
            spent = callback_timer.seconds if callback_timer is not None else 0.0
            self.marks.append(
                (state.global_step, time.perf_counter(), int(state.num_input_tokens_seen or 0), spent)
            )
            self.cpu_marks.append((state.global_step, time.process_time()))

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._mark(state)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._mark(state)
            if state.global_step == state.max_steps:
                import torch

                if torch.cuda.is_available():
                    self.gpu_peak_allocated = torch.cuda.max_memory_allocated()
                    self.gpu_peak_reserved = torch.cuda.max_memory_reserved()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                self.losses.append((state.global_step, float(logs["loss"])))

        def result(self) -> dict[str, Any]:
            return window_throughput(self.marks, warmup_steps) | {
                "stepCpuSeconds": step_cpu_seconds(self.cpu_marks, warmup_steps),
                "losses": self.losses,
                "gpuPeakAllocatedBytes": self.gpu_peak_allocated,
                "gpuPeakReservedBytes": self.gpu_peak_reserved,
            }

    return StepClock()


def window_throughput(marks: list[tuple[int, float, int, float]], warmup_steps: int) -> dict[str, Any]:
    """Tokens/s, step times and callback time over the steps after the warm-up (pure)."""
    steps = [mark for mark in marks if mark[0] >= warmup_steps]
    if len(steps) < 2:
        raise ValueError(f"need two step marks after {warmup_steps} warm-up steps, got {len(steps)}")
    (first_step, first_time, first_tokens, first_spent) = steps[0]
    (last_step, last_time, last_tokens, last_spent) = steps[-1]
    seconds = last_time - first_time
    step_seconds = [b[1] - a[1] for a, b in itertools.pairwise(steps)]
    step_tokens = [b[2] - a[2] for a, b in itertools.pairwise(steps)]
    return {
        "timedSteps": last_step - first_step,
        "windowSeconds": seconds,
        "windowTokens": last_tokens - first_tokens,
        "tokensPerSecond": (last_tokens - first_tokens) / seconds,
        "stepSeconds": step_seconds,
        "stepTokens": step_tokens,
        "callbackSeconds": last_spent - first_spent,
        "callbackShare": (last_spent - first_spent) / seconds,
        "allStepSeconds": [b[1] - a[1] for a, b in itertools.pairwise(marks)],
    }


def step_cpu_seconds(marks: list[tuple[int, float]], warmup_steps: int) -> list[float]:
    """CPU seconds the process spent in each step after the warm-up, all its threads together (pure).

    On a shared machine a step's wall time grows with whatever else runs; the CPU time it needed grows far
    less (with ``OMP_WAIT_POLICY=PASSIVE`` torch's threads do not spin while they wait for a core)."""
    steps = [mark for mark in marks if mark[0] >= warmup_steps]
    return [b[1] - a[1] for a, b in itertools.pairwise(steps)]


# ---------------------------------------------------------------------------- the trainers


def _threads(plan: RunPlan) -> None:
    import torch

    if plan.threads:
        torch.set_num_threads(plan.threads)


def _common_arguments(plan: RunPlan, output_dir: Path) -> dict[str, Any]:
    """The TrainingArguments the kubetune trainer derives from its spec, for the baselines."""
    import torch

    on_gpu = torch.cuda.is_available()
    return {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": plan.batch_size,
        "gradient_accumulation_steps": 1,
        "learning_rate": plan.learning_rate,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "optim": "adamw_torch",
        "max_grad_norm": 1.0,
        "max_steps": plan.max_steps,
        "bf16": plan.precision == "bf16",
        "fp16": plan.precision == "fp16",
        # Set explicitly: SFTConfig turns checkpointing on by default.
        "activation_checkpointing": plan.gradient_checkpointing,
        "activation_checkpointing_kwargs": {"use_reentrant": False} if plan.gradient_checkpointing else None,
        "seed": plan.seed,
        "data_seed": plan.seed,
        "logging_steps": plan.log_every_steps,
        "save_strategy": "no",
        "eval_strategy": "no",
        "include_num_input_tokens_seen": "non_padding",
        "report_to": [],
        "use_cpu": not on_gpu,
        "dataloader_pin_memory": on_gpu,
        "disable_tqdm": True,
        "log_level": "warning",
    }


def _lora_config(plan: RunPlan) -> Any:
    from peft import LoraConfig, TaskType

    targets = plan.target_modules
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=plan.lora_r,
        lora_alpha=plan.lora_alpha,
        lora_dropout=plan.lora_dropout,
        target_modules="all-linear" if targets == ("all-linear",) else list(targets),
    )


def _load_base(plan: RunPlan) -> Any:
    """The base model as a plain script loads it: fp32/bf16, or 4-bit NF4 for QLoRA (the usual recipe)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[plan.precision]
    if plan.method != "qlora":
        return AutoModelForCausalLM.from_pretrained(plan.model_dir, dtype=dtype)
    from peft import prepare_model_for_kbit_training

    quantization = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    model = AutoModelForCausalLM.from_pretrained(
        plan.model_dir,
        dtype=dtype,
        quantization_config=quantization,
        device_map={"": 0} if torch.cuda.is_available() else None,
    )
    return prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
        model,
        use_gradient_checkpointing=plan.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


def run_transformers(plan: RunPlan, workdir: Path) -> dict[str, Any]:
    """A plain transformers Trainer + peft script: tokenize prompt + response (in the model's chat template
    if it has one), mask the prompt, pad."""
    from datasets import load_dataset
    from peft import get_peft_model
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    _threads(plan)
    tokenizer = AutoTokenizer.from_pretrained(plan.model_dir)
    rows = load_dataset("json", data_files=plan.data_file, split="train")

    def encode(row: dict[str, str]) -> dict[str, list[int]]:
        all_ids, prompt_length = encode_row(row, tokenizer)
        input_ids = all_ids[: plan.max_seq_length]
        labels = [-100] * prompt_length + input_ids[prompt_length:]
        return {
            "input_ids": input_ids,
            "attention_mask": [1] * len(input_ids),
            "labels": labels[: len(input_ids)],
        }

    dataset = rows.map(encode, remove_columns=rows.column_names)
    model = get_peft_model(_load_base(plan), _lora_config(plan))
    clock = make_step_clock(plan.warmup_steps)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**_common_arguments(plan, workdir / "out")),
        train_dataset=dataset,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),  # to the longest row, as by default
        processing_class=tokenizer,
        callbacks=[clock],
    )
    trainer.train()
    return dict(clock.result())


def run_trl(plan: RunPlan, workdir: Path) -> dict[str, Any]:
    """trl's SFTTrainer on prompt/completion rows (it masks the prompt and appends EOS itself); for a chat
    model, conversational ones, which it renders in the model's template."""
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer  # type: ignore[attr-defined]  # lazily exported

    _threads(plan)
    tokenizer = AutoTokenizer.from_pretrained(plan.model_dir)
    rows = load_dataset("json", data_files=plan.data_file, split="train")

    chat = has_chat_template(tokenizer)

    def to_pair(row: dict[str, str]) -> dict[str, Any]:
        if chat:
            user, assistant = chat_messages(row)
            return {"prompt": [user], "completion": [assistant]}
        prompt, completion = alpaca_text(row)
        return {"prompt": prompt, "completion": completion}

    dataset = rows.map(to_pair, remove_columns=rows.column_names)
    arguments = _common_arguments(plan, workdir / "out")
    clock = make_step_clock(plan.warmup_steps)
    trainer = SFTTrainer(
        model=_load_base(plan),
        args=SFTConfig(**arguments, max_length=plan.max_seq_length, packing=plan.packing),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=_lora_config(plan),
        callbacks=[clock],
    )
    trainer.train()
    return dict(clock.result())


def kubetune_manifest(plan: RunPlan, output: Path) -> dict[str, Any]:
    """The FineTuneJob that asks the kubetune trainer for the same training as the baselines."""
    method: dict[str, Any] = {
        "type": plan.method,
        "lora": {
            "r": plan.lora_r,
            "alpha": plan.lora_alpha,
            "dropout": plan.lora_dropout,
            "targetModules": list(plan.target_modules),
        },
    }
    if plan.method == "qlora":
        compute = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[plan.precision]
        method["quantization"] = {"bits": 4, "type": "nf4", "doubleQuant": True, "computeDtype": compute}
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "bench", "namespace": "default"},
        "spec": {
            "model": {"source": f"file://{plan.model_dir}"},
            "dataset": {
                "source": f"file://{plan.data_file}",
                "format": "alpaca",
                "validationSplit": 0.0,
                "maxSeqLength": plan.max_seq_length,
                "packing": plan.packing,
            },
            "method": method,
            "training": {
                "maxSteps": plan.max_steps,
                "learningRate": plan.learning_rate,
                "scheduler": "constant",
                "warmupRatio": 0.0,
                "batchSizePerDevice": plan.batch_size,
                "precision": plan.precision,
                "gradientCheckpointing": plan.gradient_checkpointing,
                "logEverySteps": plan.log_every_steps,
                "seed": plan.seed,
            },
            "resources": {"nodes": 1, "gpusPerNode": plan.gpus},
            "output": {"uri": f"file://{output}"},
            "checkpoint": {"everySteps": 1_000_000, "keep": 1},
        },
    }


def estimate_memory(plan: RunPlan, workdir: Path) -> dict[str, Any]:
    """`kubetune estimate --format json` on the spec the kubetune run trains (the CLI hands over to this module)."""
    import yaml

    workdir.mkdir(parents=True, exist_ok=True)
    spec_file = workdir / "estimate.yaml"
    spec_file.write_text(yaml.safe_dump(kubetune_manifest(plan, workdir / "published")))
    out = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer.estimate", "-f", str(spec_file), "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_DIR,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return dict(json.loads(out.stdout))


def run_kubetune(plan: RunPlan, workdir: Path, callbacks: bool = True) -> dict[str, Any]:
    """The kubetune trainer's own entry on a spec file, as ``python -m kubetune_trainer --spec`` runs it.

    The clock joins the callbacks of the Trainer the pipeline builds; with ``callbacks`` off,
    kubetune's callbacks are removed from it and the exporter is not started.
    """
    import yaml

    os.environ.setdefault("KUBETUNE_METRICS_PORT", "0")  # a free port: served as in a pod, nobody scrapes
    os.environ.setdefault("KUBETUNE_TERMINATION_LOG", str(workdir / "termination-log"))
    _threads(plan)
    from kubetune_trainer import train as pipeline

    spec_file = workdir / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(kubetune_manifest(plan, workdir / "published")))
    timer = CallbackTimer()
    clock = make_step_clock(plan.warmup_steps, timer)
    build_trainer = pipeline.build_trainer

    def build_timed_trainer(*args: Any, **kwargs: Any) -> Any:
        trainer = build_trainer(*args, **kwargs)
        ours = [
            cb
            for cb in trainer.callback_handler.callbacks
            if type(cb).__module__.startswith(KUBETUNE_CALLBACK_MODULE)
        ]
        for callback in ours:
            if callbacks:
                timer.instrument(callback)
            else:
                trainer.remove_callback(callback)
        trainer.add_callback(clock)
        return trainer

    def metrics_without_exporter(job: Any) -> tuple[Any, None]:
        from kubetune_trainer.metrics import TrainingMetrics

        return TrainingMetrics(*pipeline.job_identity(job), job.spec.method.type.value), None

    pipeline.build_trainer = build_timed_trainer
    if not callbacks:
        pipeline.start_metrics = metrics_without_exporter
    job, digest = pipeline.load_job(spec_file)
    pipeline.run(job, digest, workdir / "work")
    return dict(clock.result()) | {"callbackSecondsByName": timer.by_callback, "callbackCalls": timer.calls}


def time_callbacks(plan: RunPlan, workdir: Path, steps: int = 20_000, scrapes: int = 2_000) -> dict[str, Any]:
    """kubetune's per-step callbacks called ``steps`` times with no model, and the exporter's
    exposition rendered ``scrapes`` times: microseconds each, free of training noise."""
    from prometheus_client import generate_latest
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from kubetune_trainer.checkpoint import PreemptionCallback
    from kubetune_trainer.metrics import MetricsCallback, TrainingMetrics
    from kubetune_trainer.train import SaveAtEndCallback

    metrics = TrainingMetrics("bench", "default", plan.method)
    callbacks = [MetricsCallback(metrics, plan.batch_size), SaveAtEndCallback(), PreemptionCallback()]
    args = TrainingArguments(output_dir=str(workdir / "out"), use_cpu=True, report_to=[])
    state, control = TrainerState(max_steps=steps + 1), TrainerControl()
    for callback in callbacks:
        callback.on_train_begin(args, state, control)
    tokens_per_step = plan.batch_size * plan.max_seq_length
    started = time.perf_counter()
    for step in range(1, steps + 1):
        state.global_step, state.epoch = step, step / 1000
        state.num_input_tokens_seen += tokens_per_step
        for callback in callbacks:
            callback.on_step_end(args, state, control)
        if step % plan.log_every_steps == 0:
            logs = {"loss": 1.0, "learning_rate": plan.learning_rate, "grad_norm": 0.5}
            for callback in callbacks:
                callback.on_log(args, state, control, logs=logs)
    per_step = (time.perf_counter() - started) / steps
    started = time.perf_counter()
    for _ in range(scrapes):
        exposition = generate_latest(metrics.registry)
    per_scrape = (time.perf_counter() - started) / scrapes
    return {
        "steps": steps,
        "callbackMicrosecondsPerStep": per_step * 1e6,
        "scrapes": scrapes,
        "exportMicrosecondsPerScrape": per_scrape * 1e6,
        "exportBytes": len(exposition),
    }


RUNNERS: dict[str, Callable[[RunPlan, Path], dict[str, Any]]] = {
    "kubetune": run_kubetune,
    "kubetune-bare": lambda plan, workdir: run_kubetune(plan, workdir, callbacks=False),
    "transformers": run_transformers,
    "trl": run_trl,
    "callbacks": time_callbacks,
}


# ------------------------------------------------------------------------------ the parent


class RunFailed(RuntimeError):
    """A run's process exited non-zero; the message ends with its log's tail."""


def child_environment(workdir: Path, threads: int | None) -> dict[str, str]:
    """Every cache and temp folder of the stack inside ``workdir``; no hub; the same threads for all."""
    env = dict(os.environ)
    for name, sub in (
        ("TMPDIR", "tmp"),
        ("HF_HOME", "hf"),
        ("HF_DATASETS_CACHE", "datasets"),
        ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
        ("KUBETUNE_CACHE_DIR", "kubetune-cache"),
    ):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
        env[name] = str(workdir / sub)
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def own_peak_rss_bytes() -> int:
    """This process's peak resident memory since its exec: VmHWM of /proc/self/status.

    Not ``ru_maxrss``: at exec the kernel folds the parent's high-water mark into it, so a child of a large
    process (pytest with torch loaded) reports at least its parent's peak, whatever it did itself.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def spawn(command: list[str], workdir: Path, env: dict[str, str], timeout: float) -> tuple[float, Any]:
    """Run ``command`` from the repository root; returns (wall seconds, its rusage from wait4)."""
    log_file = workdir / "run.log"
    with log_file.open("wb") as log:
        started = time.monotonic()
        process = subprocess.Popen(command, cwd=REPO_DIR, env=env, stdout=log, stderr=subprocess.STDOUT)
        watchdog = threading.Timer(timeout, process.kill)
        watchdog.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            watchdog.cancel()
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - started
    if process.returncode != 0:
        tail = log_file.read_text(errors="replace")[-3000:]
        raise RunFailed(f"{' '.join(command[2:4])} exited {process.returncode} after {wall:.0f} s:\n{tail}")
    return wall, usage


def measure(
    kind: str, plan: RunPlan, workdir: Path, timeout: float = 1800, profile_to: Path | None = None
) -> dict[str, Any]:
    """One timed run of ``kind`` in its own process, with its peak RSS and CPU time.

    With ``profile_to``, py-spy samples the run (raw collapsed stacks into that file); py-spy is then
    the direct child, so the RSS and CPU figures are not the run's: profiled runs are not measurements.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    plan_file, result_file = workdir / "plan.json", workdir / "result.json"
    plan_file.write_text(json.dumps(plan.to_json()))
    command = [sys.executable, "-m", "bench.training_runs", kind, str(plan_file), str(result_file)]
    if profile_to is not None:
        py_spy = str(Path(sys.executable).parent / "py-spy")
        command = [py_spy, "record", "--format", "raw", "--rate", "100", "--nonblocking",
                   "--output", str(profile_to), "--", *command]  # fmt: skip
    wall, usage = spawn(command, workdir, child_environment(workdir, plan.threads), timeout)
    result = dict(json.loads(result_file.read_text()))
    return result | {
        "kind": kind,
        # The run's own VmHWM, not the rusage's ru_maxrss (see own_peak_rss_bytes).
        "peakRssBytes": result["peakRssBytes"],
        "cpuSeconds": usage.ru_utime + usage.ru_stime,
        "wallSeconds": wall,
    }


def prepare_assets(spec: AssetSpec, cache: Path, timeout: float = 3600) -> dict[str, Any]:
    """Build (once, in a child process) and return the assets of ``spec``, cached by its digest."""
    folder = cache / spec.digest()
    if (folder / "assets.json").exists():
        return dict(json.loads((folder / "assets.json").read_text()))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.json").write_text(json.dumps(dataclasses.asdict(spec)))
    command = [sys.executable, "-m", "bench.training_runs", "assets", str(folder / "spec.json"), str(folder)]
    spawn(command, folder, child_environment(folder / "build", None), timeout)
    return dict(json.loads((folder / "assets.json").read_text()))


def main(argv: list[str] | None = None) -> int:
    kind, plan_file, target = argv if argv is not None else sys.argv[1:]
    if kind == "assets":
        build_assets(AssetSpec(**json.loads(Path(plan_file).read_text())), Path(target))
        return 0
    plan = RunPlan.from_json(json.loads(Path(plan_file).read_text()))
    result = RUNNERS[kind](plan, Path(target).parent)
    result["peakRssBytes"] = own_peak_rss_bytes()
    Path(target).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
