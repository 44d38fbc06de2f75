"""Trainer throughput on a real model: SmolLM2-135M-Instruct on the CPU, kubetune against transformers + peft
and trl, packing, peak RSS against `kubetune estimate`, and bf16 autocast against fp32.

The model is the pretrained SmolLM2-135M-Instruct that ``python -m kubetune_trainer.pretrained`` (``make
model``) converts; its chat template renders the generated alpaca rows of mixed lengths in every trainer:
the kubetune trainer does it itself, the transformers + peft script through ``apply_chat_template`` and trl
from conversational prompt/completion rows. The same LoRA (r 16, alpha 32, dropout 0.05, all linear layers)
is trained by the runners of ``bench.training_runs``, as in ``bench.trainer_throughput``, with the same
clock and the same batches; kubetune and trl also with packing on, and kubetune with ``precision: bf16``
(bf16 frozen weights, fp32 adapters, the Trainer's bf16 autocast on the CPU). Every variant runs
``repeats`` times in a rotating order and each step counts at its fastest repeat. `kubetune estimate` is
asked for the memory of the same spec in each precision; each run's peak RSS is set against it.

Batch, sequence length and steps are chosen so that the whole run takes about 25 minutes on 2 shared cores
(see ``FULL``); docs/benchmarks.md says what they were and how long it took.

    python -m bench.trainer_real [--quick] [--threads N] [--repeats N] [--steps N] [--keep]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    REPO_DIR,
    describe_machine,
    finish_machine,
    machine_markdown,
    markdown_table,
    save_figure,
    write_results,
)
from bench.trainer_throughput import (
    PACKAGES,
    Settings,
    Variant,
    add_run_arguments,
    chosen_settings,
    dataset_summary,
    fastest_steps,
    log,
    lora_setup,
    mib,
    packing_comparison,
    packing_table,
    run_variants,
    throughput_cells,
    throughput_headers,
    throughput_notes,
    variant_summary,
)
from bench.trainer_throughput import plan_for as throughput_plan
from bench.training_runs import AssetSpec, RunPlan, child_environment, estimate_memory, prepare_assets

NAME = "trainer_real"
MODEL_NAME = "SmolLM2-135M-Instruct"
CACHE_DIR = Path.home() / ".cache" / "kubetune" / "bench" / NAME
MAX_SEQ_LENGTH = 256
BATCH_SIZE = 2
LEARNING_RATE = 1.0e-3
"""Higher than the tiny model's 2e-4, so that the loss falls visibly within a short run (bf16 against fp32)."""
ROWS = 600
MAX_WORDS = 80
"""Response words of the generated rows, log-uniform from 2. SmolLM2's chat template (with its default system
prompt) and the instruction make ~50 tokens of every row; up to 80 words on top reach 256 tokens with hardly a
row cut, and leave room for several short rows in a packed one."""

VARIANTS = (
    Variant("kubetune", "kubetune", "kubetune trainer"),
    Variant("transformers", "transformers", "transformers Trainer + peft"),
    Variant("trl", "trl", "trl SFTTrainer"),
    Variant("kubetune-packing", "kubetune", "kubetune, packing on", packing=True),
    Variant("trl-packing", "trl", "trl SFTTrainer, packing on", packing=True),
    Variant("kubetune-bf16", "kubetune", "kubetune, bf16 autocast", precision="bf16"),
)
BASELINES = ("transformers", "trl")
TITLES = {v.key: v.title for v in VARIANTS}
PRECISIONS = {v.key: v.precision for v in VARIANTS}
BF16_DROP_TOLERANCE = 0.2
"""bf16 trains correctly when its loss stays finite and falls from first to last step within this share of
fp32's fall on the same batches."""

FULL = Settings(warmup_steps=1, steps=3, repeats=2)
"""On 2 shared cores a fp32 step of batch 2 takes ~8 s and a bf16 one ~10x that: 12 runs of 4 steps, each with
~25 s of start-up, come to about 25 minutes, half of them in bf16."""
QUICK = Settings(warmup_steps=1, steps=1, repeats=1)


# ------------------------------------------------------------------------------------------------ running


def plan_for(assets: dict[str, Any], settings: Settings, threads: int | None) -> RunPlan:
    """The tiny-model benchmark's plan with this one's batch, sequence length and learning rate, and the loss
    logged at every step (a step takes seconds here; the bf16 verdict compares the losses step by step)."""
    plan = throughput_plan(assets, settings, threads, packing=False)
    return dataclasses.replace(
        plan,
        max_seq_length=MAX_SEQ_LENGTH,
        batch_size=BATCH_SIZE,
        learning_rate=LEARNING_RATE,
        log_every_steps=1,
    )


def startup_rss_bytes(workdir: Path) -> int:
    """Peak RSS of a process that only imports the training stack: what every run holds before any model."""
    code = (
        "import torch, transformers, peft, trl, kubetune_trainer.train\n"
        "from bench.training_runs import own_peak_rss_bytes\n"
        "print(own_peak_rss_bytes())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_DIR, env=child_environment(workdir, None),
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(out.stdout.split()[-1])


def cpu_bf16_instructions() -> list[str]:
    """The CPU's bf16 instruction sets (AVX-512 BF16, AMX), from /proc/cpuinfo; none means bf16 is emulated."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return sorted(flag for flag in line.split(":", 1)[1].split() if "bf16" in flag)
    return []


@dataclasses.dataclass
class Measured:
    assets: dict[str, Any]
    runs: list[dict[str, Any]]
    estimates: dict[str, dict[str, Any]]
    """`kubetune estimate --format json` per precision."""
    startup_rss_bytes: int


def run_all(settings: Settings, threads: int | None, workdir: Path) -> Measured:
    """The model (converted once), the assets, the estimates per precision, the start-up RSS, then every
    variant ``repeats`` times."""
    from kubetune_trainer.pretrained import ensure_model

    log("SmolLM2-135M-Instruct (converted once by kubetune_trainer.pretrained)")
    spec = AssetSpec(
        model_config={}, rows=ROWS, min_words=2, max_words=MAX_WORDS, model_dir=str(ensure_model())
    )
    log(f"assets (cached under {CACHE_DIR})")
    assets = prepare_assets(spec, CACHE_DIR)
    base_plan = plan_for(assets, settings, threads)
    estimates = {
        precision: estimate_memory(
            dataclasses.replace(base_plan, precision=precision), workdir / f"estimate-{precision}"
        )
        for precision in sorted(set(PRECISIONS.values()))
    }
    startup = startup_rss_bytes(workdir / "startup")
    return Measured(assets, run_variants(VARIANTS, base_plan, settings.repeats, workdir), estimates, startup)


# ------------------------------------------------------------------------------------------ summarizing


def first_run_losses(runs: Sequence[dict[str, Any]], variant: str) -> list[float]:
    """The logged loss at each step of a variant's first run (every repeat trains the same batches)."""
    run = min((r for r in runs if r["variant"] == variant), key=lambda r: r["repeat"])
    return [loss for _, loss in run.get("losses") or []]


def bf16_verdict(runs: Sequence[dict[str, Any]], variants: dict[str, Any]) -> dict[str, Any] | None:
    """Whether kubetune's bf16 run trains like its fp32 one on the same batches, and what it costs (pure)."""
    if "kubetune" not in variants or "kubetune-bf16" not in variants:
        return None
    fp32, bf16 = first_run_losses(runs, "kubetune"), first_run_losses(runs, "kubetune-bf16")
    finite = all(
        math.isfinite(loss) for run in runs if run["variant"] == "kubetune-bf16" for _, loss in run["losses"]
    )
    fp32_drop = fp32[0] - fp32[-1] if fp32 else 0.0
    bf16_drop = bf16[0] - bf16[-1] if finite and bf16 else None
    drop_ratio = bf16_drop / fp32_drop if bf16_drop is not None and fp32_drop > 0 else None
    deviation = (
        max(abs(b - f) / f for b, f in zip(bf16, fp32, strict=False)) if finite and bf16 and fp32 else None
    )
    # None: fp32's loss did not fall over these few steps (a quick run), so there is no fall to compare.
    trains = (
        None if finite and fp32_drop <= 0 else finite and abs((drop_ratio or 0) - 1) <= BF16_DROP_TOLERANCE
    )
    return {
        "finite": finite,
        "fp32Losses": fp32,
        "bf16Losses": bf16,
        "fp32Drop": round(fp32_drop, 4),
        "bf16Drop": round(bf16_drop, 4) if bf16_drop is not None else None,
        "dropRatio": round(drop_ratio, 3) if drop_ratio is not None else None,
        "maxStepDeviation": round(deviation, 4) if deviation is not None else None,
        "trainsLikeFp32": trains,
        "speedVsFp32": ratio(variants, "kubetune-bf16", "kubetune", "tokensPerSecond"),
        "cpuSpeedVsFp32": ratio(variants, "kubetune-bf16", "kubetune", "tokensPerCpuSecond"),
        "peakRssVsFp32": ratio(variants, "kubetune-bf16", "kubetune", "peakRssBytes"),
    }


def cpu_throughput(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A variant's real tokens per CPU-second of its process, each step at its least CPU time over the
    repeats: on a shared machine this moves far less with the other work than tokens per wall second (pure)."""
    fastest = fastest_steps(runs, "stepCpuSeconds")
    if fastest is None:
        raise ValueError("the repeats of a variant trained different batches")
    per_run = [sum(r["stepTokens"]) / sum(r["stepCpuSeconds"]) for r in runs]
    seconds, tokens = fastest
    return {
        "tokensPerCpuSecond": round(sum(tokens) / sum(seconds), 2),
        "tokensPerCpuSecondRuns": [round(speed, 2) for speed in per_run],
        "cpuSpread": round((max(per_run) - min(per_run)) / max(per_run), 4),
        "cpuSecondsPerStep": round(sum(seconds) / len(seconds), 3),
    }


def ratio(variants: dict[str, Any], ours: str, other: str, measure: str) -> float:
    """``measure`` of variant ``ours`` over that of ``other``."""
    return round(float(variants[ours][measure]) / float(variants[other][measure]), 4)


def summarize(
    runs: Sequence[dict[str, Any]], estimates: dict[str, dict[str, Any]], startup_rss: int
) -> dict[str, Any]:
    """Runs -> per-variant numbers with the estimate of their spec, kubetune against the baselines, packing,
    and the bf16 verdict (pure). ``startup_rss`` is the peak RSS of the imports alone."""
    variants = {}
    for key in TITLES:
        own = [r for r in runs if r["variant"] == key]
        if not own:
            continue
        summary = variant_summary(own) | cpu_throughput(own)
        estimate = estimates[PRECISIONS[key]]
        estimated, overhead = estimate["perGpuMemoryBytes"], estimate["breakdown"]["overheadBytes"]
        variants[key] = summary | {
            "precision": PRECISIONS[key],
            "estimatedBytes": estimated,
            "rssOverEstimate": round(summary["peakRssBytes"] / estimated, 3),
            # Training's own memory on both sides: the run's RSS above the imports' against the estimate's
            # terms without its fixed overhead (a CUDA context).
            "trainingRssOverEstimate": round(
                (summary["peakRssBytes"] - startup_rss) / (estimated - overhead), 3
            ),
        }
    # The baseline that did most per CPU-second: the measure that the other work on the machine moves least.
    best_baseline = max(BASELINES, key=lambda key: variants[key]["tokensPerCpuSecond"])
    packing = packing_comparison(variants)
    for trainer, numbers in packing.items():
        numbers["cpuSpeedup"] = ratio(variants, f"{trainer}-packing", trainer, "tokensPerCpuSecond")
    return {
        "variants": variants,
        "comparison": {
            "bestBaseline": best_baseline,
            **{
                name: {key: ratio(variants, "kubetune", key, measure) for key in BASELINES}
                for name, measure in (
                    ("throughputRatio", "tokensPerSecond"),
                    ("cpuThroughputRatio", "tokensPerCpuSecond"),
                    ("peakRssRatio", "peakRssBytes"),
                )
            },
        },
        "packing": packing,
        "bf16": bf16_verdict(runs, variants),
        "estimates": estimates,
        "startupRssBytes": startup_rss,
    }


# ------------------------------------------------------------------------------------------------ plots


def plot(results: dict[str, Any]) -> list[str]:
    """The loss at each step of the first run of every unpacked variant; returns the file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axis = plt.subplots(figsize=(8, 3.6))
    for key in ("kubetune", *BASELINES, "kubetune-bf16"):
        losses = first_run_losses(results["runs"], key) if key in results["variants"] else []
        if losses:
            axis.plot(range(1, len(losses) + 1), losses, label=TITLES[key], linewidth=1, marker=".")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss")
    axis.set_title("SmolLM2-135M-Instruct, LoRA on the CPU: the same batches in every trainer")
    axis.legend(fontsize=7)
    return [save_figure(figure, NAME, "loss")]


# ---------------------------------------------------------------------------------------------- Markdown


def render_markdown(results: dict[str, Any]) -> str:
    """The SmolLM2 section of docs/benchmarks.md."""
    setup, variants, comparison = results["setup"], results["variants"], results["comparison"]
    data, model, config = setup["dataset"], setup["model"], setup["model"]["config"]
    baseline = comparison["bestBaseline"]
    speed_rows = [
        [
            *throughput_cells(TITLES[key], v, variants[baseline], digits=1)[:-1],
            f"{v['tokensPerCpuSecond']:,.2f}",
            f"{v['tokensPerCpuSecond'] / variants[baseline]['tokensPerCpuSecond']:.3f}x",
            ", ".join(f"{speed:,.2f}" for speed in v["tokensPerCpuSecondRuns"]),
        ]
        for key, v in variants.items()
    ]
    memory_rows = [
        [
            TITLES[key],
            v["precision"],
            mib(v["peakRssBytes"]),
            mib(v["estimatedBytes"]),
            f"{v['rssOverEstimate']:.2f}",
            f"{v['trainingRssOverEstimate']:.2f}",
        ]
        for key, v in variants.items()
    ]
    machine = results["machine"]
    load = machine["loadAverage"]
    return "\n".join(
        [
            f"## Trainer throughput on {model['name']} (CPU)\n",
            f"`{machine['command']}`: the kubetune trainer, a plain transformers `Trainer` + peft script and "
            f"trl's `SFTTrainer` train the same LoRA on the pretrained {model['name']} "
            f"({model['parameters'] / 1e6:.1f} M parameters, {config['num_hidden_layers']} layers, hidden "
            f"{config['hidden_size']}, {config['num_attention_heads']} heads ({config['num_key_value_heads']} "
            f"KV), MLP {config['intermediate_size']}, vocabulary {config['vocab_size']:,}, tied embeddings: "
            f"{config['tie_word_embeddings']}), each run in its own process and timed by the same callback as "
            f"the tiny-model benchmark. LoRA r {setup['lora']['r']}, alpha {setup['lora']['alpha']}, dropout "
            f"{setup['lora']['dropout']} on all linear layers; batch {setup['batchSize']}, sequences up to "
            f"{setup['maxSeqLength']} tokens, AdamW at a constant {setup['learningRate']:g}, "
            f"{setup['threads']} torch threads (`OMP_WAIT_POLICY={machine.get('ompWaitPolicy')}`, as `kubetune run` "
            f"sets it); {setup['warmupSteps']} warm-up step(s), then {setup['steps']} timed steps; every variant "
            f"ran {setup['repeats']} time(s) in a rotating order, each step counted at its fastest repeat. Data: {data['rows']:,} generated alpaca rows of mixed lengths, which the "
            "kubetune trainer renders in SmolLM2's chat template (a user turn and an assistant turn); the "
            "script renders them with `apply_chat_template`, trl from conversational prompt/completion rows. "
            f"Tokens per row: mean {data['meanTokens']:.0f}, median {data['p50Tokens']:.0f}, p90 "
            f"{data['p90Tokens']:.0f}, max {data['maxTokens']} ({data['truncatedShare']:.1%} cut at "
            f"{setup['maxSeqLength']}); padded batches are {data['paddingEfficiency']:.0%} real tokens, so "
            f"packing can win at most {data['packingBound']:.2f}x.\n",
            f"**Why this small.** A kubetune step of this model took {variants['kubetune']['stepSeconds']:.1f} s "
            + (
                f"in fp32 and {variants['kubetune-bf16']['stepSeconds']:.1f} s in bf16 "
                if "kubetune-bf16" in variants
                else ""
            )
            + f"here. Batch {setup['batchSize']} x {setup['maxSeqLength']} tokens and {setup['warmupSteps']} + "
            f"{setup['steps']} steps per run are sized for about 25 minutes on 2 shared cores with every variant "
            f"run twice; this run took {results['wallSeconds'] / 60:.0f} minutes. **The 2 cores were shared** "
            f"with other work during it (load average {load['start'][0]:.2f} at the start, {load['end'][0]:.2f} "
            "at the end, each run's in the JSON). Counting each step at its fastest repeat removes some of "
            "that from tokens/s, not all of it; tokens per CPU-second are the steadier comparison here, and "
            "ratios within the spread of a variant's runs are ties.\n",
            "### Throughput\n",
            markdown_table(
                [
                    *throughput_headers(TITLES[baseline])[:-1],
                    "tokens / CPU-s",
                    "per CPU-s vs baseline",
                    "every run, per CPU-s",
                ],
                speed_rows,
            ),
            speed_notes(results),
            throughput_notes(results, TITLES),
            "### Peak RSS against `kubetune estimate`\n",
            markdown_table(
                [
                    "trainer",
                    "precision",
                    "peak RSS",
                    "`kubetune estimate`",
                    "RSS / estimate",
                    "RSS above the imports / estimate without its fixed term",
                ],
                memory_rows,
            ),
            estimate_notes(results),
            "### Packing on the mixed-length set\n",
            packing_table(results["packing"], digits=1),
            f"Padding left {1 - data['paddingEfficiency']:.0%} of the unpacked batches' tokens empty, so "
            f"{data['packingBound']:.2f}x is the most packing can win for the same work; per CPU-second it gave "
            + " and ".join(f"{trainer} {p['cpuSpeedup']:.2f}x" for trainer, p in results["packing"].items())
            + ". A wall-clock speedup beyond that bound is the load of the moment, not packing.\n",
            bf16_markdown(results),
            *(f"![{name}](benchmarks/{name})\n" for name in results.get("plots", [])),
            "Machine:\n",
            machine_markdown(machine),
        ]
    )


def cores_used(run: dict[str, Any]) -> float:
    """How many cores a run's process kept busy in its timed steps: CPU seconds over wall seconds."""
    return float(sum(run["stepCpuSeconds"]) / sum(run["stepSeconds"]))


def speed_notes(results: dict[str, Any]) -> str:
    """What the two throughput measures are, how much each moved between repeats, and why they can disagree."""
    variants = results["variants"]
    wall = max(v["spread"] for v in variants.values())
    cpu = max(v["cpuSpread"] for v in variants.values())
    busiest = max(results["runs"], key=cores_used)
    idlest = min(results["runs"], key=cores_used)
    return (
        "Tokens/s is real (non-padding) tokens over the timed steps' wall time, each step at its fastest "
        "repeat, as in the tiny-model benchmark. Tokens per CPU-second divide the same tokens by the CPU time "
        "the training process itself spent in those steps (all its threads, each step at its least over the "
        "repeats): other work on the machine lengthens a step's wall time, much less the CPU time it needs. "
        f"Between the runs of one variant, tokens/s moved by up to {wall:.0%} and tokens per CPU-second by up "
        f"to {cpu:.0%}; the baseline is the one with the most tokens per CPU-second. The two measures part "
        f"where a run found the cores free: its process kept {cores_used(idlest):.2f} to "
        f"{cores_used(busiest):.2f} of the {results['setup']['threads']} cores busy (CPU-s per wall-s), from "
        f"{TITLES[idlest['variant']]} (run {idlest['repeat'] + 1}, load {idlest['loadAverage'][0]:.2f} as it "
        f"started) to {TITLES[busiest['variant']]} (run {busiest['repeat'] + 1}, load "
        f"{busiest['loadAverage'][0]:.2f}); a run that got more of them is faster by the clock for the same "
        "work.\n"
    )


def estimate_notes(results: dict[str, Any]) -> str:
    """What the estimate counts, next to what the runs measured."""
    estimates, variants = results["estimates"], results["variants"]
    fp32 = estimates["fp32"]["breakdown"]
    ratios = [v["rssOverEstimate"] for v in variants.values()]
    training = [v["trainingRssOverEstimate"] for v in variants.values()]
    return (
        f"`kubetune estimate` of the kubetune spec in each precision (packing does not enter it); fp32: "
        f"{mib(estimates['fp32']['perGpuMemoryBytes'])} = weights {mib(fp32['weightsBytes'])} + trainable "
        f"state {mib(fp32['trainableStateBytes'])} + activations and logits {mib(fp32['activationsBytes'])} "
        f"+ a fixed {mib(fp32['overheadBytes'])} for a GPU's CUDA context and allocator slack. On the CPU a "
        f"process that only imports torch, transformers, peft, trl and the trainer peaks at "
        f"{mib(results['startupRssBytes'])}, which takes that fixed term's place. Peak RSS was "
        f"{min(ratios):.2f}-{max(ratios):.2f}x the estimate; the RSS above the imports' against the estimate "
        f"without its fixed term (the last column): {min(training):.2f}-{max(training):.2f}x.\n"
    )


def bf16_markdown(results: dict[str, Any]) -> str:
    """The bf16 verdict, with the losses and the costs it rests on."""
    bf16 = results.get("bf16")
    if not bf16:
        return ""
    if not bf16["finite"]:
        verdict = "**bf16 does not train correctly here: its loss became NaN or infinite**"
    elif bf16["trainsLikeFp32"] is None:
        verdict = (
            f"**Not judged**: fp32's loss did not fall over these {len(bf16['fp32Losses'])} steps, so there is "
            "no fall of bf16's to compare with it; bf16's loss stayed finite"
        )
    elif bf16["trainsLikeFp32"]:
        verdict = (
            f"**bf16 trains correctly here** (loss finite, its fall within {BF16_DROP_TOLERANCE:.0%} of "
            "fp32's on the same batches)"
        )
    else:
        verdict = (
            f"**bf16 does not train like fp32 here**: its loss fell {bf16['dropRatio']:.2f}x as far as fp32's "
            f"on the same batches (allowed: 1 ± {BF16_DROP_TOLERANCE:.1f})"
        )
    fp32_losses, bf16_losses = bf16["fp32Losses"], bf16["bf16Losses"]
    flags = results["machine"].get("cpuBf16Instructions")
    cpu = (
        f"This CPU ({results['machine']['cpu']}) has no bf16 instructions (no AVX-512 BF16, no AMX), so bf16 "
        "matmuls run through conversions to and from fp32."
        if flags == []
        else f"This CPU ({results['machine']['cpu']}) has {', '.join(flags or ['unknown'])}."
    )
    deviation = bf16["maxStepDeviation"]
    return "\n".join(
        [
            "\n### bf16 autocast on the CPU\n",
            f"{verdict}; it ran at {bf16['speedVsFp32']:.2f}x the tokens/s of fp32 ({bf16['cpuSpeedVsFp32']:.2f}x "
            f"per CPU-second) with {bf16['peakRssVsFp32']:.2f}x its peak RSS. `precision: bf16` loads the frozen weights in bf16, keeps the LoRA weights in fp32 "
            "and runs the Trainer's bf16 autocast on the CPU. Loss, first → last step: fp32 "
            f"{fp32_losses[0]:.4f} → {fp32_losses[-1]:.4f}, bf16 {bf16_losses[0]:.4f} → {bf16_losses[-1]:.4f}"
            + (f" (at most {deviation:.2%} apart at any one step)" if deviation is not None else "")
            + f". {cpu}"
            + (" Train in fp32 on such a CPU." if bf16["speedVsFp32"] < 1 else "")
            + "\n",
        ]
    )


# -------------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.trainer_real", description=__doc__.split("\n\n")[0]
    )
    add_run_arguments(parser, QUICK)
    args = parser.parse_args(argv)
    settings, threads = chosen_settings(args, FULL, QUICK)
    # As `kubetune run` does: on a shared machine torch's OpenMP threads sleep while they wait instead of
    # spinning on cores that the other work needs (the runs inherit it).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    machine = describe_machine(PACKAGES)
    machine["ompWaitPolicy"] = os.environ["OMP_WAIT_POLICY"]
    machine["cpuBf16Instructions"] = cpu_bf16_instructions()
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix=f"{NAME}-"))
    try:
        measured = run_all(settings, threads, workdir)
    finally:
        if args.keep:
            log(f"runs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    assets, runs = measured.assets, measured.runs
    plan = plan_for(assets, settings, threads)
    results: dict[str, Any] = {
        "benchmark": NAME,
        "quick": args.quick,
        "machine": finish_machine(machine),
        "wallSeconds": round(time.monotonic() - started),
        "setup": {
            "model": {
                "name": MODEL_NAME,
                "parameters": assets["parameters"],
                "config": assets["modelConfig"],
            },
            "lora": lora_setup(plan),
            "maxSeqLength": MAX_SEQ_LENGTH,
            "batchSize": BATCH_SIZE,
            "learningRate": LEARNING_RATE,
            "threads": threads,
            "warmupSteps": settings.warmup_steps,
            "steps": settings.steps,
            "repeats": settings.repeats,
            "dataset": dataset_summary(assets["tokenLengths"], MAX_SEQ_LENGTH, BATCH_SIZE),
        },
        **summarize(runs, measured.estimates, measured.startup_rss_bytes),
        "runs": [{k: v for k, v in r.items() if k not in ("allStepSeconds", "stepTokens")} for r in runs],
    }
    results["plots"] = plot(results)
    path = write_results(NAME, results)
    for key, variant in results["variants"].items():
        log(
            f"{key}: {variant['tokensPerSecond']:.1f} tokens/s, RSS {variant['rssOverEstimate']}x the estimate"
        )
    log(f"wrote {path} after {results['wallSeconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
