"""The SmolLM2 trainer benchmark's pure parts: each run against the estimate of its spec, the bf16 verdict,
and the section of docs/benchmarks.md with the rows against transformers + peft and trl."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any

import pytest
from bench import common, trainer_real
from bench.trainer_real import bf16_verdict, render_markdown, summarize
from bench.trainer_throughput import dataset_summary
from bench.training_runs import AssetSpec, step_cpu_seconds

from tests.unit.test_bench_trainer import a_run

GIB = 1 << 30
STARTUP_RSS = GIB // 2


def an_estimate(total: int, overhead: int = GIB) -> dict[str, Any]:
    return {
        "perGpuMemoryBytes": total,
        "breakdown": {
            "weightsBytes": total - overhead - GIB // 4,
            "trainableStateBytes": GIB // 8,
            "activationsBytes": GIB // 8,
            "overheadBytes": overhead,
        },
    }


ESTIMATES = {"fp32": an_estimate(2 * GIB), "bf16": an_estimate(GIB + GIB // 2)}
FALLING = [(step, 3.0 - 0.1 * step) for step in range(1, 11)]


def a_timed_run(variant: str, tokens_per_second: float, **extra: Any) -> dict[str, Any]:
    """A run whose two threads were busy all the time: two CPU-seconds per wall second."""
    run = a_run(variant, tokens_per_second, **extra)
    return run | {
        "stepCpuSeconds": [2 * seconds for seconds in run["stepSeconds"]],
        "loadAverage": [2.0, 2.0],
    }


def six_variants(bf16_losses: list[tuple[int, float]] = FALLING, bf16_speed: float = 25.0) -> list[Any]:
    return [
        a_timed_run("kubetune", 100.0, rss=3 * GIB, losses=FALLING),
        a_timed_run("transformers", 95.0, rss=3 * GIB, losses=FALLING),
        a_timed_run("trl", 90.0, rss=3 * GIB + GIB // 4, losses=FALLING),
        a_timed_run("kubetune-packing", 180.0, tokens=1000, rss=3 * GIB, losses=FALLING),
        a_timed_run("trl-packing", 150.0, tokens=1000, rss=3 * GIB, losses=FALLING),
        a_timed_run("kubetune-bf16", bf16_speed, rss=2 * GIB, losses=bf16_losses),
    ]


def test_each_run_is_set_against_the_estimate_of_its_own_precision_with_and_without_the_fixed_terms() -> None:
    results = summarize(six_variants(), ESTIMATES, STARTUP_RSS)
    kubetune, bf16 = results["variants"]["kubetune"], results["variants"]["kubetune-bf16"]
    assert kubetune["rssOverEstimate"] == 1.5 and bf16["rssOverEstimate"] == pytest.approx(4 / 3, abs=1e-3)
    # (3 GiB - 0.5 GiB of imports) / (2 GiB - 1 GiB of CUDA context)
    assert kubetune["trainingRssOverEstimate"] == 2.5
    assert results["comparison"]["bestBaseline"] == "transformers"
    assert results["comparison"]["throughputRatio"] == {"transformers": pytest.approx(1.0526), "trl": 1.1111}
    assert results["packing"]["kubetune"]["speedup"] == 1.8 and results["packing"]["trl"]["speedup"] == 1.667
    assert results["packing"]["kubetune"]["cpuSpeedup"] == 1.8


def test_a_baseline_run_in_a_quiet_spell_is_fast_by_the_clock_but_not_per_cpu_second() -> None:
    """The wall clock favours whichever run the other work left alone; the CPU time a step needed does not."""
    runs = six_variants()
    lucky = dict(runs[1]) | {"repeat": 1, "stepSeconds": [s / 2 for s in runs[1]["stepSeconds"]]}
    lucky["tokensPerSecond"] = 2 * runs[1]["tokensPerSecond"]
    results = summarize([*runs, lucky], ESTIMATES, STARTUP_RSS)
    transformers = results["variants"]["transformers"]
    assert transformers["tokensPerSecond"] == 190.0 and transformers["spread"] == 0.5
    assert transformers["tokensPerCpuSecond"] == 47.5 and transformers["cpuSpread"] == 0.0
    assert results["comparison"]["throughputRatio"]["transformers"] == pytest.approx(0.5263)
    assert results["comparison"]["cpuThroughputRatio"]["transformers"] == pytest.approx(1.0526)


def test_a_steps_cpu_time_is_counted_from_the_end_of_the_warm_up() -> None:
    assert step_cpu_seconds([(0, 1.0), (1, 9.0), (2, 11.0), (3, 14.0)], warmup_steps=1) == [2.0, 3.0]


def test_bf16_whose_loss_falls_as_fp32_s_trains_correctly_and_its_cost_is_reported() -> None:
    slightly_off = [(step, loss * 1.01) for step, loss in FALLING]
    results = summarize(six_variants(slightly_off), ESTIMATES, STARTUP_RSS)
    verdict = results["bf16"]
    assert verdict["finite"] and verdict["trainsLikeFp32"]
    assert verdict["dropRatio"] == pytest.approx(1.01) and verdict["maxStepDeviation"] == pytest.approx(0.01)
    assert verdict["speedVsFp32"] == 0.25 and verdict["cpuSpeedVsFp32"] == 0.25
    assert verdict["peakRssVsFp32"] == pytest.approx(0.667, abs=1e-3)


def test_bf16_whose_loss_turns_nan_or_stalls_does_not_train_correctly() -> None:
    with_nan = [*FALLING[:5], (6, math.nan), *FALLING[6:]]
    nan = bf16_verdict(six_variants(with_nan), summarize(six_variants(), ESTIMATES, STARTUP_RSS)["variants"])
    assert nan is not None and not nan["finite"] and not nan["trainsLikeFp32"] and nan["dropRatio"] is None
    stalled = [(step, 3.0 - 0.01 * step) for step in range(1, 11)]
    verdict = summarize(six_variants(stalled), ESTIMATES, STARTUP_RSS)["bf16"]
    assert verdict["finite"] and not verdict["trainsLikeFp32"] and verdict["dropRatio"] == pytest.approx(0.1)


def test_a_run_too_short_for_fp32_s_loss_to_fall_leaves_bf16_unjudged_and_says_so() -> None:
    rising = [(1, 2.0), (2, 2.2)]
    runs = [
        {**run, "losses": rising} if run["variant"] in ("kubetune", "kubetune-bf16") else run
        for run in six_variants()
    ]
    verdict = summarize(runs, ESTIMATES, STARTUP_RSS)["bf16"]
    assert verdict["finite"] and verdict["trainsLikeFp32"] is None and verdict["dropRatio"] is None
    results = fake_results() | {"bf16": verdict}
    assert "**Not judged**: fp32's loss did not fall over these 2 steps" in render_markdown(results)


def fake_results(bf16_losses: list[tuple[int, float]] = FALLING) -> dict[str, Any]:
    runs = six_variants(bf16_losses)
    machine = common.describe_machine([], argv=["python", "-m", "bench.trainer_real"])
    machine["cpuBf16Instructions"] = []
    return {
        "machine": common.finish_machine(machine),
        "wallSeconds": 1200,
        "setup": {
            "model": {
                "name": "SmolLM2-135M-Instruct",
                "parameters": 134_515_008,
                "config": {
                    "hidden_size": 576,
                    "intermediate_size": 1536,
                    "num_hidden_layers": 30,
                    "num_attention_heads": 9,
                    "num_key_value_heads": 3,
                    "vocab_size": 49152,
                    "tie_word_embeddings": True,
                },
            },
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targetModules": ["all-linear"]},
            "maxSeqLength": 128,
            "batchSize": 4,
            "learningRate": 1e-3,
            "threads": 2,
            "warmupSteps": 2,
            "steps": 8,
            "repeats": 2,
            "dataset": dataset_summary([40, 80, 200, 20] * 10, 128, 4),
        },
        **summarize(runs, ESTIMATES, STARTUP_RSS),
        "runs": runs,
    }


def table_rows(section: str) -> dict[str, list[str]]:
    """The rows of a section's Markdown table: the first cell -> the others."""
    cells = [line.strip("| ").split(" | ") for line in section.splitlines() if line.startswith("| ")]
    return {row[0]: row[1:] for row in cells}


def test_the_section_has_the_smollm2_rows_against_transformers_and_trl_and_the_bf16_verdict() -> None:
    text = render_markdown(fake_results())
    assert text.startswith("## Trainer throughput on SmolLM2-135M-Instruct (CPU)")
    speed, memory = (table_rows(section) for section in text.split("\n### ")[1:3])
    assert speed["kubetune trainer"][:2] == ["100.0", "1.053x"] and speed["kubetune trainer"][5:7] == [
        "50.00",
        "1.053x",
    ]
    assert speed["transformers Trainer + peft"][:2] == ["95.0", "1.000x"]
    assert speed["trl SFTTrainer"][:2] == ["90.0", "0.947x"]
    assert memory["kubetune trainer"] == ["fp32", "3,072 MiB", "2,048 MiB", "1.50", "2.50"]
    assert "**bf16 trains correctly here**" in text and "no bf16 instructions" in text
    assert "Train in fp32 on such a CPU." in text
    assert "kept 2.00 to 2.00 of the 2 cores busy" in text
    assert "**The 2 cores were shared**" in text and "this run took 20 minutes" in text


def test_the_section_says_bf16_failed_when_its_loss_turned_nan() -> None:
    text = render_markdown(fake_results([*FALLING[:5], (6, math.nan), *FALLING[6:]]))
    assert "**bf16 does not train correctly here: its loss became NaN or infinite**" in text


def test_a_random_models_asset_spec_keeps_the_digest_it_had_before_pretrained_models_were_added() -> None:
    spec = AssetSpec(model_config={"hidden_size": 384}, rows=1200, min_words=2, max_words=230)
    before = {k: v for k, v in dataclasses.asdict(spec).items() if k != "model_dir"}
    assert spec.digest() == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:12]
    assert dataclasses.replace(spec, model_dir="/models/smollm2").digest() != spec.digest()


def test_the_benchmark_times_every_variant_it_compares() -> None:
    assert set(trainer_real.TITLES) == {
        "kubetune", "transformers", "trl", "kubetune-packing", "trl-packing", "kubetune-bf16",
    }  # fmt: skip
    assert trainer_real.PRECISIONS["kubetune-bf16"] == "bf16"
