"""Measure how far each method's SmolLM2 run lowers the held-out loss, over many seeds.

``python -m tests.trainer.measure_spread [--seeds 20] [--methods lora,qlora] [--out FILE]``
runs the real-model tier's job for every method once per seed, through the same pipeline
as the tests, and prints (and writes as JSON) the base's held-out loss, each run's loss,
and the worst and mean ratio per method: the numbers the tier's thresholds stand on.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--methods", default="")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="kubetune-spread-"))
    for name in ("TMPDIR", "HF_HOME", "HF_DATASETS_CACHE", "KUBETUNE_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        (root / name).mkdir()
        os.environ[name] = str(root / name)
    os.environ.update(
        {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "KUBETUNE_METRICS_PORT": "0"}
    )
    os.environ["KUBETUNE_TERMINATION_LOG"] = str(root / "termination-log")
    tempfile.tempdir = str(root / "TMPDIR")

    from tests.trainer.realmodel import METHODS, held_out_batch, held_out_loss, job_for, write_training_data
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune_trainer.pretrained import ensure_model
    from kubetune_trainer.train import run

    model_dir = ensure_model()
    data = write_training_data(root)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = held_out_batch(tokenizer)
    base_loss = held_out_loss(AutoModelForCausalLM.from_pretrained(model_dir), batch)
    print(f"base held-out loss {base_loss:.4f}", flush=True)
    methods = [m for m in args.methods.split(",") if m] or list(METHODS)
    report: dict[str, Any] = {"base_loss": base_loss, "methods": {}}
    for method in methods:
        losses, seconds = [], []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            started = time.monotonic()
            work = Path(tempfile.mkdtemp(dir=root))
            result = run(
                job_for(method, model_dir, data, work / "out", seed=seed).build(), "spread", work / "w"
            )
            losses.append(held_out_loss(result.model, batch))
            seconds.append(time.monotonic() - started)
            del result
            print(f"{method} seed {seed}: {losses[-1]:.4f} ({seconds[-1]:.1f} s)", flush=True)
        ratios = [loss / base_loss for loss in losses]
        report["methods"][method] = {
            "losses": losses,
            "worst_ratio": max(ratios),
            "best_ratio": min(ratios),
            "mean_ratio": statistics.fmean(ratios),
            "stdev_ratio": statistics.stdev(ratios) if len(ratios) > 1 else 0.0,
            "mean_seconds": statistics.fmean(seconds),
        }
        summary = report["methods"][method]
        print(
            f"== {method}: worst {summary['worst_ratio']:.3f} best {summary['best_ratio']:.3f} "
            f"mean {summary['mean_ratio']:.3f} sd {summary['stdev_ratio']:.3f} of base, "
            f"{summary['mean_seconds']:.1f} s a run",
            flush=True,
        )
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
