"""The trainer benchmarks' pure parts: generated data, the step clock's arithmetic, the summary that
decides whether a target is met, the FLOP and MFU counts of the GPU benchmark, and the child-process
measurement that gives each run its own peak RSS."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from bench import common, gpu_throughput, trainer_throughput
from bench.gpu_throughput import (
    LLAMA3_8B,
    attention_flops_per_token,
    lora_parameters,
    matmul_parameters,
    mfu,
    peak_flops,
    training_flops_per_token,
)
from bench.trainer_throughput import dataset_summary, fastest_steps, render_markdown, summarize
from bench.training_runs import (
    RunFailed,
    RunPlan,
    kubetune_manifest,
    mixed_length_rows,
    padding_efficiency,
    spawn,
    window_throughput,
)

from kubetune.api.v1alpha1 import FineTuneJob
from tests.conftest import ROOT

# ------------------------------------------------------------------------------------------------- data


def test_generated_rows_are_mostly_short_with_a_long_tail_and_the_same_every_time() -> None:
    rows = mixed_length_rows(1000, min_words=2, max_words=200, seed=3)
    words = [len(row["output"].split()) for row in rows]
    assert min(words) >= 2 and max(words) <= 200
    assert statistics.median(words) < 40 < max(words) > 150  # log-uniform: median ~sqrt(2 * 200)
    assert statistics.mean(words) > statistics.median(words)
    assert mixed_length_rows(1000, 2, 200, seed=3) == rows


def test_rows_of_one_length_leave_nothing_for_packing_to_win() -> None:
    rows = mixed_length_rows(50, min_words=30, max_words=30)
    assert {len(row["output"].split()) for row in rows} == {30}
    assert padding_efficiency([64] * 50, batch_size=8) == 1.0


def test_padding_efficiency_counts_each_batch_padded_to_its_longest_row_rounded_to_eight() -> None:
    # One batch of two rows: 8 + 60 real tokens, padded to 2 x 64.
    assert padding_efficiency([8, 60], batch_size=2) == pytest.approx(68 / 128)


def test_the_dataset_summary_bounds_packing_by_the_padding_it_removes() -> None:
    summary = dataset_summary([10, 20, 300, 40], max_seq_length=256, batch_size=2)
    assert summary["maxTokens"] == 256
    assert summary["truncatedShare"] == 0.25
    assert summary["packingBound"] == pytest.approx(1 / summary["paddingEfficiency"], rel=1e-2)


# ---------------------------------------------------------------------------------------------- clock


def marks(step_seconds: list[float], step_tokens: list[int], callback_seconds: float = 0.0) -> list[Any]:
    """(step, time, tokens seen, seconds in callbacks) at train begin and after each step."""
    out = [(0, 100.0, 0, 0.0)]
    for step, (seconds, tokens) in enumerate(zip(step_seconds, step_tokens, strict=True), start=1):
        _, time, seen, spent = out[-1]
        out.append((step, time + seconds, seen + tokens, spent + callback_seconds))
    return out


def test_the_clock_leaves_the_warm_up_steps_out_of_the_throughput() -> None:
    # A slow first step (allocations) and then 4 steps of 500 tokens in 0.5 s each.
    result = window_throughput(marks([5.0, 0.5, 0.5, 0.5, 0.5], [500] * 5, callback_seconds=0.001), 1)
    assert result["timedSteps"] == 4
    assert result["tokensPerSecond"] == pytest.approx(1000.0)
    assert result["stepSeconds"] == pytest.approx([0.5] * 4)
    assert result["callbackShare"] == pytest.approx(0.002)


def test_a_run_too_short_for_its_warm_up_is_refused() -> None:
    with pytest.raises(ValueError, match="warm-up"):
        window_throughput(marks([1.0, 1.0], [10, 10]), warmup_steps=2)


def test_each_step_counts_at_its_fastest_repeat_when_the_repeats_trained_the_same_batches() -> None:
    first = {"stepSeconds": [1.0, 3.0], "stepTokens": [100, 200]}
    second = {"stepSeconds": [2.0, 1.5], "stepTokens": [100, 200]}
    assert fastest_steps([first, second]) == ([1.0, 1.5], [100, 200])
    other_batches = {"stepSeconds": [0.1, 0.1], "stepTokens": [100, 201]}
    assert fastest_steps([first, other_batches]) is None


# -------------------------------------------------------------------------------------------- summary


def a_run(
    variant: str, tokens_per_second: float, *, tokens: int = 600, rss: int = 1 << 30, **extra: Any
) -> dict[str, Any]:
    steps = 10
    seconds = tokens * steps / tokens_per_second
    return {
        "variant": variant,
        "repeat": 0,
        "tokensPerSecond": tokens_per_second,
        "windowSeconds": seconds,
        "windowTokens": tokens * steps,
        "timedSteps": steps,
        "stepSeconds": [seconds / steps] * steps,
        "stepTokens": [tokens] * steps,
        "peakRssBytes": rss,
        "callbackSeconds": 0.0,
        "callbackShare": 0.0,
        **extra,
    }


ALONE = {"callbackMicrosecondsPerStep": 20.0, "exportMicrosecondsPerScrape": 500.0, "exportBytes": 5000}


def five_variants(
    kubetune: float, packing: float = 1200.0, callback_share: float = 0.0001
) -> list[dict[str, Any]]:
    return [
        a_run(
            "kubetune",
            kubetune,
            callbackSeconds=callback_share * 6000 / kubetune * 10,
            callbackShare=callback_share,
        ),
        a_run("transformers", 480.0),
        a_run("trl", 500.0, rss=(1 << 30) + (1 << 28)),
        a_run("kubetune-no-callbacks", kubetune),
        a_run("kubetune-packing", packing, tokens=2000),
    ]


def test_a_trainer_as_fast_as_the_best_baseline_meets_the_throughput_target() -> None:
    results = summarize(five_variants(kubetune=510.0), ALONE)
    assert results["comparison"]["bestBaseline"] == "trl"
    assert results["comparison"]["throughputRatio"] == pytest.approx(1.02)
    assert results["comparison"]["peakRssRatio"]["trl"] == pytest.approx(0.8)
    assert [t["met"] for t in results["targets"]] == [True, True, True]


def test_a_slower_trainer_misses_the_target_by_its_ratio_and_the_report_says_so() -> None:
    results = summarize(five_variants(kubetune=450.0, packing=600.0), ALONE)
    throughput, _, packing = results["targets"]
    assert not throughput["met"] and throughput["measured"] == pytest.approx(0.9)
    assert not packing["met"] and packing["measured"] == pytest.approx(600 / 450, rel=1e-3)
    results |= fake_setup()
    results["findings"] = trainer_throughput.findings(results)
    text = render_markdown(results)
    assert "| kubetune tokens/s vs the best baseline (trl SFTTrainer) | >= 1.0x | 0.900x | missed |" in text
    assert "### What limits it" in text


def test_the_callback_share_adds_the_exporter_scrapes_to_the_time_in_callbacks() -> None:
    results = summarize(five_variants(kubetune=500.0, callback_share=0.002), ALONE)
    scrape = 500e-6 / trainer_throughput.SCRAPE_INTERVAL_SECONDS
    assert results["callbacks"]["share"] == pytest.approx(0.002 + scrape, rel=1e-3)
    assert results["callbacks"]["aloneShare"] == pytest.approx(20e-6 / 1.2, rel=1e-2)  # 1.2 s steps
    over = summarize(five_variants(kubetune=500.0, callback_share=0.02), ALONE)
    assert not over["targets"][1]["met"]


def fake_setup() -> dict[str, Any]:
    return {
        "machine": common.describe_machine([], argv=["python", "-m", "bench.trainer_throughput"]),
        "setup": {
            "model": {
                "parameters": 7_000_000,
                "config": {
                    "hidden_size": 384,
                    "num_hidden_layers": 4,
                    "num_attention_heads": 6,
                    "num_key_value_heads": 2,
                    "intermediate_size": 1024,
                    "vocab_size": 1024,
                },
            },
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targetModules": ["all-linear"]},
            "maxSeqLength": 256,
            "batchSize": 8,
            "precision": "fp32",
            "threads": 2,
            "warmupSteps": 5,
            "steps": 10,
            "repeats": 1,
            "dataset": dataset_summary([40, 80, 200, 20] * 10, 256, 8),
        },
    }


def test_the_profile_splits_the_training_loop_into_its_parts_and_leaves_start_up_out() -> None:
    loop = "main (x.py:1);Trainer.train (transformers/trainer.py:10);Trainer._run_epoch (transformers/trainer.py:20)"
    raw = "\n".join(
        [
            "<module> (x.py:1);_find_and_load (<frozen importlib._bootstrap>:1) 50",
            f"{loop};Trainer.training_step (t.py:1);Trainer.compute_loss (t.py:2);Module._call_impl (m.py:3) 40",
            f"{loop};Trainer.training_step (t.py:1);Accelerator.backward (a.py:4);Tensor.backward (b.py:5) 50",
            f"{loop};wrapper (s.py:1);AcceleratedOptimizer.step (a.py:9) 6",
            f"{loop};CallbackHandler.on_step_end (c.py:1);CallbackHandler.call_event (c.py:2) 1",
            f"{loop};Trainer.get_batch_samples (t.py:7);__next__ (d.py:1) 3",
        ]
    )
    found = trainer_throughput.loop_profile(raw)
    assert (found["processSamples"], found["loopSamples"]) == (150, 100)
    assert found["parts"]["forward and loss"] == 0.4 and found["parts"]["backward"] == 0.5
    assert found["parts"]["optimizer step"] == 0.06 and found["parts"]["callbacks"] == 0.01
    assert found["parts"]["next batch (data, collate)"] == 0.03 and found["parts"]["other"] == 0.0


# ------------------------------------------------------------------------------- the spec handed over


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_the_kubetune_run_gets_a_valid_finetunejob_asking_for_the_same_training(
    method: str, tmp_path: Path
) -> None:
    plan = RunPlan(
        model_dir="/models/tiny", data_file="/data/rows.jsonl", max_seq_length=256, batch_size=8,
        steps=60, warmup_steps=5, method=method, precision="bf16", packing=True, gpus=1,
    )  # fmt: skip
    spec = FineTuneJob.model_validate(kubetune_manifest(plan, tmp_path)).spec
    assert spec.training.max_steps == 65
    assert spec.training.batch_size_per_device == 8 and spec.training.precision == "bf16"
    assert spec.dataset.packing and spec.dataset.max_seq_length == 256 and spec.dataset.validation_split == 0
    lora = spec.method.effective_lora
    assert (lora.r, lora.alpha, lora.dropout, lora.target_modules) == (16, 32, 0.05, ["all-linear"])
    assert spec.method.type.value == method
    if method == "qlora":  # the baseline computes in the training precision too
        assert spec.method.effective_quantization.compute_dtype == "bfloat16"
    assert spec.resources.gpus_per_node == 1


# ------------------------------------------------------------------------------------ child processes


def test_each_run_reports_the_peak_rss_of_its_own_process_not_its_parents(tmp_path: Path) -> None:
    """The child's own high-water mark, whatever the size of the process that started it (a test run with
    torch loaded is well over 1 GiB, and the kernel folds that into a child's ru_maxrss at exec)."""
    report = "from bench.training_runs import own_peak_rss_bytes; print(own_peak_rss_bytes())"
    big = subprocess.run(
        [sys.executable, "-c", f"block = bytearray(300 * 2**20); {report}"],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert 300 * 2**20 < int(big.stdout) < 600 * 2**20
    small = subprocess.run(
        [sys.executable, "-c", report], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert int(small.stdout) < 100 * 2**20


def test_a_run_that_fails_raises_with_the_end_of_its_log(tmp_path: Path) -> None:
    with pytest.raises(RunFailed, match="exited 3"):
        spawn([sys.executable, "-c", "print('loading the model'); raise SystemExit(3)"], tmp_path, {}, 60)
    assert "loading the model" in (tmp_path / "run.log").read_text()


# ------------------------------------------------------------------------------------------ GPU counts


def test_the_matmul_weights_of_llama_3_8b_plus_embedding_and_norms_are_its_published_size() -> None:
    embedding = LLAMA3_8B["vocab_size"] * LLAMA3_8B["hidden_size"]
    norms = (2 * LLAMA3_8B["num_hidden_layers"] + 1) * LLAMA3_8B["hidden_size"]
    assert matmul_parameters(LLAMA3_8B) + embedding + norms == 8_030_261_248


def test_lora_r16_on_every_linear_layer_of_llama_3_8b_has_peft_s_parameter_count() -> None:
    assert lora_parameters(LLAMA3_8B, r=16) == 41_943_040


def test_lora_flops_skip_the_base_weight_gradients_and_full_training_does_not() -> None:
    n, adapters = matmul_parameters(LLAMA3_8B), lora_parameters(LLAMA3_8B, 16)
    attention = attention_flops_per_token(LLAMA3_8B, 2048)
    assert attention == 12 * 32 * 4096 * 2048
    assert training_flops_per_token(LLAMA3_8B, 2048, "full") == 6 * n + attention
    assert training_flops_per_token(LLAMA3_8B, 2048, "lora") == 4 * n + 6 * adapters + attention
    assert training_flops_per_token(LLAMA3_8B, 2048, "qlora") == training_flops_per_token(
        LLAMA3_8B, 2048, "lora"
    )
    with pytest.raises(ValueError):
        training_flops_per_token(LLAMA3_8B, 2048, "prefix")


def test_mfu_is_achieved_flops_over_the_gpu_s_dense_bf16_peak() -> None:
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("Tesla T4") is None
    # 10,000 tokens/s at 33.5 GFLOP per token on an H100 SXM is a third of its peak.
    assert mfu(10_000, 33.5e9, 989e12) == pytest.approx(0.3387, abs=1e-4)


def test_without_cuda_the_gpu_benchmark_writes_why_it_was_not_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs the real CUDA probe (a child process importing torch); on a GPU machine this would measure."""
    if gpu_throughput.probe_cuda()["available"]:
        pytest.skip("CUDA is available here: the benchmark would run for real")
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    assert gpu_throughput.main([]) == 0
    results = json.loads((tmp_path / "gpu_throughput.json").read_text())
    assert results["measured"] is False
    assert "torch.cuda.is_available() is False" in results["reason"]
    assert results["flopsPerToken"]["lora"] < results["flopsPerToken"]["full"]
    text = gpu_throughput.render_markdown(results)
    assert "**Not measured:**" in text and "machine" in text.lower()
