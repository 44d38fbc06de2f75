"""Trainer throughput on the CPU: the kubetune trainer against plain baselines, its callbacks' cost, packing.

In one run, on one random-weight Llama (hidden 384, 4 layers, built from a config) and one generated alpaca
set of mixed lengths, the same LoRA (r 16, alpha 32, dropout 0.05, all linear layers; batch 8, sequences up to
256 tokens, fp32, AdamW, constant learning rate, the same threads) is trained by:

- the kubetune trainer, through its Python entry on a FineTuneJob spec (``bench.training_runs``);
- a plain ``transformers.Trainer`` + peft script, and trl's ``SFTTrainer``: the baselines;
- the kubetune trainer with its callbacks and metrics exporter taken out (what they cost);
- the kubetune trainer and trl with packing on (what packing wins on mixed lengths).

Each run is its own process; all count real (non-padding) tokens with the Trainer's own counter and time the
steps after a warm-up with the same callback. Every variant runs ``repeats`` times in a rotating order; a run
trains the same batches each time, so each step's fastest time over the repeats counts (other work on a shared
machine only ever slows a step down). Peak RSS is each process's own high-water mark (VmHWM). The callbacks are also timed alone, 20,000 steps with no model, and the exporter's
``/metrics`` rendering 2,000 times.

    python -m bench.trainer_throughput [--quick] [--threads N] [--repeats N] [--steps N] [--keep]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    describe_machine,
    finish_machine,
    machine_markdown,
    markdown_table,
    percentile,
    plot_path,
    write_results,
)
from bench.training_runs import AssetSpec, RunPlan, measure, padding_efficiency, prepare_assets

NAME = "trainer_throughput"
CACHE_DIR = Path.home() / ".cache" / "kubetune" / "bench" / NAME
PACKAGES = ["torch", "transformers", "peft", "trl", "accelerate", "datasets", "deepspeed"]
MODEL_CONFIG: dict[str, Any] = {
    "hidden_size": 384,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
ASSETS = AssetSpec(model_config=MODEL_CONFIG, rows=1200, min_words=2, max_words=230)
MAX_SEQ_LENGTH = 256
BATCH_SIZE = 8
SCRAPE_INTERVAL_SECONDS = 15.0
"""The chart's PodMonitor interval for trainer pods (charts/kubetune/values.yaml)."""
TARGETS = {"throughputRatio": 1.0, "callbackShare": 0.01, "packingSpeedup": 1.5}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One trainer configuration to time."""

    key: str
    kind: str
    """The runner in bench.training_runs."""
    title: str
    packing: bool = False
    precision: str = "fp32"


VARIANTS = (
    Variant("kubetune", "kubetune", "kubetune trainer"),
    Variant("transformers", "transformers", "transformers Trainer + peft"),
    Variant("trl", "trl", "trl SFTTrainer"),
    Variant("kubetune-no-callbacks", "kubetune-bare", "kubetune, callbacks and exporter off"),
    Variant("kubetune-packing", "kubetune", "kubetune, packing on", packing=True),
    Variant("trl-packing", "trl", "trl SFTTrainer, packing on", packing=True),
)
BASELINES = ("transformers", "trl")
TITLES = {v.key: v.title for v in VARIANTS}


@dataclasses.dataclass(frozen=True)
class Settings:
    warmup_steps: int
    steps: int
    repeats: int


FULL = Settings(warmup_steps=5, steps=40, repeats=2)
QUICK = Settings(warmup_steps=1, steps=4, repeats=1)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------------------ running


def plan_for(assets: dict[str, Any], settings: Settings, threads: int | None, packing: bool) -> RunPlan:
    return RunPlan(
        model_dir=assets["modelDir"],
        data_file=assets["dataFile"],
        max_seq_length=MAX_SEQ_LENGTH,
        batch_size=BATCH_SIZE,
        steps=settings.steps,
        warmup_steps=settings.warmup_steps,
        packing=packing,
        threads=threads,
    )


def rotation(variants: Sequence[Variant], repeat: int) -> list[Variant]:
    """The variants in a different order each repeat, so that a slow spell hits a different one."""
    shift = repeat % len(variants)
    return [*variants[shift:], *variants[:shift]]


def run_all(
    settings: Settings, threads: int | None, workdir: Path
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """Assets, the callbacks alone, then every variant ``repeats`` times; returns (assets, runs, callbacks)."""
    log(f"assets (cached under {CACHE_DIR})")
    assets = prepare_assets(ASSETS, CACHE_DIR)
    base_plan = plan_for(assets, settings, threads, packing=False)
    log("kubetune callbacks and exporter alone")
    alone = measure("callbacks", base_plan, workdir / "callbacks")
    return assets, run_variants(VARIANTS, base_plan, settings.repeats, workdir), alone


def run_variants(
    variants: Sequence[Variant], base_plan: RunPlan, repeats: int, workdir: Path
) -> list[dict[str, Any]]:
    """Every variant ``repeats`` times in a rotating order, each run with the load average around it."""
    runs = []
    for repeat in range(repeats):
        for variant in rotation(variants, repeat):
            plan = dataclasses.replace(base_plan, packing=variant.packing, precision=variant.precision)
            load_before = _load()
            log(f"{variant.key} (repeat {repeat + 1}/{repeats}, load {load_before:.2f})")
            result = measure(variant.kind, plan, workdir / f"{variant.key}-{repeat}")
            log(
                f"  {result['tokensPerSecond']:.0f} tokens/s, peak RSS {result['peakRssBytes'] / 2**20:.0f} MiB"
            )
            runs.append(
                result | {"variant": variant.key, "repeat": repeat, "loadAverage": [load_before, _load()]}
            )
    return runs


def _load() -> float:
    """The 1-minute load average, noted beside each run."""
    return round(os.getloadavg()[0], 2)


# Parts of the Trainer's loop, by a frame below `_run_epoch` (checked in this order).
LOOP_PARTS = (
    ("backward", "Accelerator.backward"),
    ("forward and loss", ".compute_loss"),
    ("optimizer step", "Optimizer.step"),
    ("next batch (data, collate)", ".get_batch_samples"),
    ("gradient clipping", "._clip_grad_norm"),
    ("callbacks", "CallbackHandler."),
    ("logging and saving", "._maybe_log_save_evaluate"),
    ("token counting", "._track_num_input_tokens"),
)


def loop_profile(raw: str) -> dict[str, Any]:
    """py-spy's raw stacks of a run -> the share of the training loop's samples in each part of it."""
    parts = dict.fromkeys([name for name, _ in LOOP_PARTS] + ["other"], 0)
    process = loop = 0
    for line in raw.splitlines():
        stack, _, number = line.rpartition(" ")
        if not number.isdigit():
            continue
        process += int(number)
        frames = [frame.split(" (")[0] for frame in stack.split(";")]
        start = next((i for i, name in enumerate(frames) if name.endswith("._run_epoch")), None)
        if start is None:
            continue
        loop += int(number)
        below = ";".join(frames[start + 1 :])
        part = next((name for name, needle in LOOP_PARTS if needle in below), "other")
        parts[part] += int(number)
    return {
        "processSamples": process,
        "loopSamples": loop,
        "parts": {name: round(count / loop, 4) if loop else 0.0 for name, count in parts.items()},
    }


def profile(plan: RunPlan, kinds: Sequence[str], workdir: Path) -> dict[str, Any]:
    """One run of each kind under py-spy (100 Hz); these runs are not timed."""
    found = {}
    for kind in kinds:
        log(f"profiling {kind} (load {_load():.2f})")
        raw = workdir / f"profile-{kind}.txt"
        measure(kind, plan, workdir / f"profile-{kind}", profile_to=raw)
        found[kind] = loop_profile(raw.read_text())
    return found


# ------------------------------------------------------------------------------------------ summarizing


def dataset_summary(lengths: Sequence[int], max_seq_length: int, batch_size: int) -> dict[str, Any]:
    """Token lengths of the rows as trained (cut at max_seq_length) and what padding wastes on them."""
    cut = [min(n, max_seq_length) for n in lengths]
    efficiency = padding_efficiency(cut, batch_size)
    return {
        "rows": len(cut),
        "meanTokens": round(sum(cut) / len(cut), 1),
        "p50Tokens": percentile(cut, 50),
        "p90Tokens": percentile(cut, 90),
        "maxTokens": max(cut),
        "truncatedShare": round(sum(n > max_seq_length for n in lengths) / len(lengths), 4),
        "paddingEfficiency": round(efficiency, 4),
        # What padding each batch to a multiple of 8 (tensor-core friendly) adds over padding to its longest row.
        "multipleOf8Overhead": round(padding_efficiency(cut, batch_size, multiple=1) / efficiency - 1, 4),
        "packingBound": round(1 / efficiency, 2),
    }


def fastest_steps(
    runs: Sequence[dict[str, Any]], times: str = "stepSeconds"
) -> tuple[list[float], list[int]] | None:
    """Each timed step's fastest time over the repeats, with its tokens; None unless every repeat
    trained the same batches (same tokens per step), which makes the steps comparable one by one.
    ``times`` names the runs' per-step times: wall seconds, or ``stepCpuSeconds``."""
    tokens = list(runs[0]["stepTokens"])
    if any(list(r["stepTokens"]) != tokens for r in runs):
        return None
    return [min(step) for step in zip(*(r[times] for r in runs), strict=True)], tokens


def variant_summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A variant's throughput from the fastest time of each step over its repeats (work beside a
    run only ever adds time to a step), with each run's own figure and its largest peak RSS."""
    best = max(runs, key=lambda r: r["tokensPerSecond"])
    speeds = [r["tokensPerSecond"] for r in runs]
    fastest = fastest_steps(runs)
    if fastest is not None:
        seconds, tokens = sum(fastest[0]), sum(fastest[1])
        steps = len(fastest[0])
    else:
        seconds, tokens, steps = best["windowSeconds"], best["windowTokens"], best["timedSteps"]
    losses = best.get("losses") or []
    return {
        "tokensPerSecond": round(tokens / seconds, 1),
        "estimate": "fastest of the repeats, step by step" if fastest is not None else "best run",
        "tokensPerSecondRuns": [round(s, 1) for s in speeds],
        "spread": round((max(speeds) - min(speeds)) / max(speeds), 4),
        "stepSeconds": round(seconds / steps, 4),
        "realTokensPerStep": round(tokens / steps, 1),
        "peakRssBytes": max(r["peakRssBytes"] for r in runs),
        "callbackShare": max(r.get("callbackShare", 0.0) for r in runs),
        "callbackMillisecondsPerStep": round(
            max(1000 * r.get("callbackSeconds", 0.0) / r["timedSteps"] for r in runs), 4
        ),
        "lossFirst": losses[0][1] if losses else None,
        "lossLast": losses[-1][1] if losses else None,
        "bestRun": {k: best[k] for k in ("repeat", "allStepSeconds", "loadAverage") if k in best},
    }


def packing_comparison(variants: dict[str, Any]) -> dict[str, Any]:
    """kubetune's and trl's packing-on variants against their packing-off ones, where both ran."""
    packing = {}
    for trainer, off, on in (("kubetune", "kubetune", "kubetune-packing"), ("trl", "trl", "trl-packing")):
        if off in variants and on in variants:
            packing[trainer] = {
                "offTokensPerSecond": variants[off]["tokensPerSecond"],
                "onTokensPerSecond": variants[on]["tokensPerSecond"],
                "speedup": round(variants[on]["tokensPerSecond"] / variants[off]["tokensPerSecond"], 3),
                "offRealTokensPerStep": variants[off]["realTokensPerStep"],
                "onRealTokensPerStep": variants[on]["realTokensPerStep"],
                "offStepSeconds": variants[off]["stepSeconds"],
                "onStepSeconds": variants[on]["stepSeconds"],
            }
    return packing


def summarize(runs: Sequence[dict[str, Any]], alone: dict[str, Any]) -> dict[str, Any]:
    """Runs -> per-variant numbers, the comparisons and the targets (pure)."""
    variants = {
        key: variant_summary([r for r in runs if r["variant"] == key])
        for key in TITLES
        if any(r["variant"] == key for r in runs)
    }
    ours = variants["kubetune"]
    best_baseline = max(BASELINES, key=lambda key: variants[key]["tokensPerSecond"])
    throughput_ratio = ours["tokensPerSecond"] / variants[best_baseline]["tokensPerSecond"]
    rss_ratios = {key: round(ours["peakRssBytes"] / variants[key]["peakRssBytes"], 3) for key in BASELINES}

    step_seconds = ours["stepSeconds"]
    alone_share = alone["callbackMicrosecondsPerStep"] / 1e6 / step_seconds
    scrape_share = alone["exportMicrosecondsPerScrape"] / 1e6 / SCRAPE_INTERVAL_SECONDS
    callback_share = ours["callbackShare"] + scrape_share
    bare = variants.get("kubetune-no-callbacks")
    callbacks = {
        "inRunShare": round(ours["callbackShare"], 9),
        "inRunMillisecondsPerStep": ours["callbackMillisecondsPerStep"],
        "aloneMicrosecondsPerStep": round(alone["callbackMicrosecondsPerStep"], 2),
        "aloneShare": round(alone_share, 9),
        "exportMicrosecondsPerScrape": round(alone["exportMicrosecondsPerScrape"], 1),
        "exportBytes": alone["exportBytes"],
        "scrapeIntervalSeconds": SCRAPE_INTERVAL_SECONDS,
        "scrapeShare": round(scrape_share, 9),
        "share": round(callback_share, 9),
        "onOffRatio": round(ours["tokensPerSecond"] / bare["tokensPerSecond"], 4) if bare else None,
    }
    packing = packing_comparison(variants)
    packing_speedup = packing["kubetune"]["speedup"] if "kubetune" in packing else None
    targets = [
        {
            "what": f"kubetune tokens/s vs the best baseline ({TITLES[best_baseline]})",
            "target": f">= {TARGETS['throughputRatio']:.1f}x",
            "measured": round(throughput_ratio, 3),
            "met": throughput_ratio >= TARGETS["throughputRatio"],
        },
        {
            "what": "kubetune callbacks + exporter, share of step time",
            "target": f"<= {TARGETS['callbackShare']:.0%}",
            "measured": round(callback_share, 9),
            "met": callback_share <= TARGETS["callbackShare"],
        },
        {
            "what": "packing on vs off, real tokens/s on the mixed-length set",
            "target": f">= {TARGETS['packingSpeedup']:.1f}x",
            "measured": packing_speedup,
            "met": packing_speedup is not None and packing_speedup >= TARGETS["packingSpeedup"],
        },
    ]
    return {
        "variants": variants,
        "comparison": {
            "bestBaseline": best_baseline,
            "throughputRatio": round(throughput_ratio, 4),
            "peakRssRatio": rss_ratios,
        },
        "callbacks": callbacks,
        "packing": packing,
        "targets": targets,
    }


# ------------------------------------------------------------------------------------------------ plots


def plot(results: dict[str, Any]) -> list[str]:
    """Tokens/s and peak RSS per variant, and step times over the run; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = results["variants"]
    keys = [key for key in TITLES if key in variants]
    labels = [TITLES[key] for key in keys]
    colors = ["tab:blue" if key.startswith("kubetune") else "tab:gray" for key in keys]
    names = []

    figure, axis = plt.subplots(figsize=(8, 3.6))
    axis.barh(labels, [variants[k]["tokensPerSecond"] for k in keys], color=colors)
    for row, key in enumerate(keys):
        axis.plot(
            variants[key]["tokensPerSecondRuns"], [row] * len(variants[key]["tokensPerSecondRuns"]), "k|"
        )
    axis.invert_yaxis()
    axis.set_xlabel("real (non-padding) tokens/s, fastest steps of the repeats; ticks: each run")
    axis.set_title("LoRA training throughput on the CPU (fp32)")
    figure.tight_layout()
    path = plot_path(NAME, "tokens")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    names.append(path.name)

    figure, axis = plt.subplots(figsize=(8, 3.6))
    axis.barh(labels, [variants[k]["peakRssBytes"] / 2**20 for k in keys], color=colors)
    axis.invert_yaxis()
    axis.set_xlabel("peak RSS of the training process (MiB)")
    figure.tight_layout()
    path = plot_path(NAME, "memory")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    names.append(path.name)

    figure, axis = plt.subplots(figsize=(8, 3.6))
    for key in keys:
        seconds = variants[key]["bestRun"].get("allStepSeconds") or []
        axis.plot(range(1, len(seconds) + 1), seconds, label=TITLES[key], linewidth=1)
    axis.axvline(results["setup"]["warmupSteps"] + 0.5, color="k", linestyle=":", linewidth=1)
    axis.set_xlabel("optimizer step (dotted: end of warm-up)")
    axis.set_ylabel("seconds")
    axis.set_title("Step times of the best run of each variant")
    axis.legend(fontsize=7)
    figure.tight_layout()
    path = plot_path(NAME, "steps")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    names.append(path.name)
    return names


# ---------------------------------------------------------------------------------------------- Markdown


def mib(value: float) -> str:
    return f"{value / 2**20:,.0f} MiB"


def _verdict(met: bool) -> str:
    return "met" if met else "missed"


def throughput_headers(baseline: str) -> list[str]:
    """The headers of ``throughput_cells``."""
    return ["trainer", "tokens/s", f"vs {baseline}", "every run", "step", "real tokens / step", "peak RSS"]


def throughput_cells(
    title: str, variant: dict[str, Any], baseline: dict[str, Any], digits: int = 0
) -> list[str]:
    """A variant's row of a throughput table, up to its peak RSS: tokens/s (to ``digits`` decimals), against the
    baseline, each run's, step time, real tokens per step."""
    return [
        title,
        f"{variant['tokensPerSecond']:,.{digits}f}",
        f"{variant['tokensPerSecond'] / baseline['tokensPerSecond']:.3f}x",
        ", ".join(f"{s:,.{digits}f}" for s in variant["tokensPerSecondRuns"]),
        f"{variant['stepSeconds']:.{3 - digits}f} s",
        f"{variant['realTokensPerStep']:,.0f}",
        mib(variant["peakRssBytes"]),
    ]


def render_markdown(results: dict[str, Any]) -> str:
    """The trainer-throughput section of docs/benchmarks.md."""
    setup, variants = results["setup"], results["variants"]
    comparison, callbacks, packing = results["comparison"], results["callbacks"], results["packing"]
    data = setup["dataset"]
    model = setup["model"]
    config = model["config"]
    baseline = comparison["bestBaseline"]

    throughput_rows = [
        [
            *throughput_cells(TITLES[key], v, variants[baseline]),
            f"{v['peakRssBytes'] / variants[baseline]['peakRssBytes']:.3f}x",
        ]
        for key, v in variants.items()
    ]
    callback_rows = [
        [
            "kubetune callbacks in the timed run",
            f"{callbacks['inRunMillisecondsPerStep']:.3f} ms per step",
            f"{callbacks['inRunShare']:.4%}",
        ],
        [
            "the same callbacks alone (20,000 steps, no model)",
            f"{callbacks['aloneMicrosecondsPerStep']:.1f} µs per step",
            f"{callbacks['aloneShare']:.4%}",
        ],
        [
            f"exporter: one `/metrics` render ({callbacks['exportBytes']:,} bytes) every "
            f"{callbacks['scrapeIntervalSeconds']:.0f} s",
            f"{callbacks['exportMicrosecondsPerScrape']:.0f} µs per scrape",
            f"{callbacks['scrapeShare']:.5%}",
        ],
        ["total (timed run + scrapes)", "", f"**{callbacks['share']:.4%}**"],
    ]
    if callbacks.get("onOffRatio") is not None:
        callback_rows.append(
            [
                "cross-check: whole runs with them on vs off",
                f"{callbacks['onOffRatio']:.3f}x tokens/s",
                f"(runs of one variant differ by up to {max(v['spread'] for v in variants.values()):.1%})",
            ]
        )
    target_rows = [
        [
            t["what"],
            t["target"],
            "—"
            if t["measured"] is None
            else (f"{t['measured']:.4%}" if "share" in t["what"] else f"{t['measured']:.3f}x"),
            _verdict(t["met"]),
        ]
        for t in results["targets"]
    ]
    findings = results.get("findings") or []
    images = "\n".join(f"![{name}](benchmarks/{name})" for name in results.get("plots", []))
    return "\n".join(
        [
            "## Trainer throughput on the CPU\n",
            f"`{results['machine']['command']}`: the same LoRA training by the kubetune trainer, a plain "
            "transformers `Trainer` + peft script and trl's `SFTTrainer`, each in its own process. Model: a "
            f"random-weight Llama built from a config ({model['parameters'] / 1e6:.1f} M parameters, hidden "
            f"{config['hidden_size']}, {config['num_hidden_layers']} layers, {config['num_attention_heads']} heads "
            f"({config['num_key_value_heads']} KV), MLP {config['intermediate_size']}, vocabulary "
            f"{config['vocab_size']}). LoRA r {setup['lora']['r']}, alpha {setup['lora']['alpha']}, dropout "
            f"{setup['lora']['dropout']} on all linear layers; batch {setup['batchSize']}, sequences up to "
            f"{setup['maxSeqLength']} tokens, {setup['precision']}, AdamW, constant learning rate, "
            f"{setup['threads']} torch threads. Data: {data['rows']:,} generated alpaca rows of mixed lengths "
            f"(tokens per row: mean {data['meanTokens']:.0f}, median {data['p50Tokens']:.0f}, p90 "
            f"{data['p90Tokens']:.0f}, max {data['maxTokens']}; {data['truncatedShare']:.1%} cut at "
            f"{setup['maxSeqLength']}); padded batches of shuffled rows are {data['paddingEfficiency']:.0%} real "
            f"tokens, so packing can win at most {data['packingBound']:.2f}x.\n",
            f"Throughput is real (non-padding) tokens per second, counted by the Trainer's own counter in every "
            f"run, over the {setup['steps']} steps after {setup['warmupSteps']} warm-up steps; every variant ran "
            f"{setup['repeats']} time(s) in a rotating order. Every run of a variant trains the same batches, so "
            "each step's fastest time over the repeats counts (work beside a run only ever slows a step down); "
            "each run's own figure is listed too. All runs without packing see the same batches. Peak RSS is the "
            "training process's own high-water mark (VmHWM; `ru_maxrss` would include its parent's).\n",
            "### Targets\n",
            markdown_table(["what", "target", "measured", ""], target_rows),
            *(["### What limits it\n\n" + "\n".join(f"- {f}" for f in findings) + "\n"] if findings else []),
            "### Throughput and memory\n",
            markdown_table(
                [*throughput_headers(TITLES[baseline]), "RSS vs baseline"],
                throughput_rows,
            ),
            throughput_notes(results),
            "\n### Cost of kubetune's callbacks and metrics exporter\n",
            markdown_table(["what", "cost", "share of a kubetune step"], callback_rows),
            "\n### Packing on the mixed-length set\n",
            packing_table(packing),
            profile_markdown(results),
            images + "\n" if images else "",
            "Machine:\n",
            machine_markdown(results["machine"]),
        ]
    )


def packing_table(packing: dict[str, Any], digits: int = 0) -> str:
    """The packing comparison (``packing_comparison``) as a Markdown table, tokens/s to ``digits`` decimals."""
    rows = [
        [
            trainer,
            f"{p['offTokensPerSecond']:,.{digits}f}",
            f"{p['onTokensPerSecond']:,.{digits}f}",
            f"**{p['speedup']:.2f}x**",
            f"{p['offRealTokensPerStep']:,.0f} → {p['onRealTokensPerStep']:,.0f}",
            f"{p['offStepSeconds']:.3f} s → {p['onStepSeconds']:.3f} s",
        ]
        for trainer, p in packing.items()
    ]
    headers = ["trainer", "tokens/s, packing off", "packing on", "speedup", "real tokens / step", "step time"]
    return markdown_table(headers, rows)


def throughput_notes(results: dict[str, Any], titles: dict[str, str] = TITLES) -> str:
    """The same losses (the trainers trained the same thing) and how far repeats of one variant drift."""
    variants = results["variants"]
    losses = {
        key: (v["lossFirst"], v["lossLast"])
        for key, v in variants.items()
        if key in ("kubetune", *BASELINES) and v.get("lossFirst") is not None
    }
    lines = []
    if losses:
        lines.append(
            "Logged training loss, first → last: "
            + "; ".join(f"{titles[k]} {first:.4f} → {last:.4f}" for k, (first, last) in losses.items())
            + ". Losses this close show that the three trained the same batches with the same response-only "
            "loss.\n"
        )
    spreads = {key: v["spread"] for key, v in variants.items() if len(v["tokensPerSecondRuns"]) > 1}
    if spreads:
        key = max(spreads, key=lambda k: spreads[k])
        lines.append(
            f"Runs of one variant differed by up to {spreads[key]:.0%} ({titles[key]}), with the load average "
            "beside each run in the JSON: on this shared machine a ratio closer to 1 than a few percent is a "
            "tie.\n"
        )
    return "\n".join(lines)


def profile_markdown(results: dict[str, Any]) -> str:
    """Where the training loop's time goes, by py-spy, for kubetune and the best baseline."""
    profiles = results.get("profile")
    if not profiles:
        return ""
    kinds = list(profiles)
    parts = list(next(iter(profiles.values()))["parts"])
    rows = [[part, *(f"{profiles[k]['parts'][part]:.1%}" for k in kinds)] for part in parts]
    rows.append(["samples in the loop (of the process)", *(
        f"{profiles[k]['loopSamples']:,} ({profiles[k]['loopSamples'] / profiles[k]['processSamples']:.0%})"
        for k in kinds
    )])  # fmt: skip
    return "\n".join(
        [
            "\n### Where the training loop's time goes (py-spy, 100 Hz)\n",
            "One more run of each, sampled by py-spy; shares of the samples inside the Trainer's loop (the rest of "
            "the process is imports, tokenizing, loading and saving).\n",
            markdown_table(["part of the loop", *(TITLES.get(k, k) for k in kinds)], rows),
        ]
    )


# -------------------------------------------------------------------------------------------------- main


def findings(results: dict[str, Any]) -> list[str]:
    """A line per missed target, with how far off it is, and what the profile says about the loop."""
    lines = []
    for target in results["targets"]:
        if target["met"] or target["measured"] is None:
            continue
        lines.append(f"{target['what']}: {target['measured']} against {target['target']}.")
    profiles = results.get("profile") or {}
    if lines and len(profiles) == 2:
        model_parts = ("forward and loss", "backward", "optimizer step")
        shares = {k: sum(p["parts"][part] for part in model_parts) for k, p in profiles.items()}
        ours, baseline = shares.pop("kubetune"), next(iter(shares.items()))
        lines.append(
            f"py-spy: forward, loss, backward and the optimizer take {ours:.1%} of kubetune's loop and "
            f"{baseline[1]:.1%} of {TITLES.get(baseline[0], baseline[0])}'s; everything else in the loop "
            "(data, callbacks, logging, token counting) is the rest."
        )
    return lines


def add_run_arguments(parser: argparse.ArgumentParser, quick: Settings) -> None:
    """The options of a trainer benchmark: --quick, --threads, --repeats, --steps, --keep."""
    parser.add_argument("--quick", action="store_true", help=f"{quick.steps} timed step(s), one repeat")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads in every run (default: all cores)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="runs of each variant (the best counts)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run")
    parser.add_argument("--keep", action="store_true", help="keep the runs' folders (logs, adapters)")


def chosen_settings(args: argparse.Namespace, full: Settings, quick: Settings) -> tuple[Settings, int]:
    """The settings and the torch threads that the options of ``add_run_arguments`` ask for."""
    settings = quick if args.quick else full
    settings = dataclasses.replace(
        settings, repeats=args.repeats or settings.repeats, steps=args.steps or settings.steps
    )
    return settings, args.threads or os.cpu_count() or 1


def lora_setup(plan: RunPlan) -> dict[str, Any]:
    """The LoRA of a plan, for a results' setup block."""
    return {
        "r": plan.lora_r,
        "alpha": plan.lora_alpha,
        "dropout": plan.lora_dropout,
        "targetModules": list(plan.target_modules),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.trainer_throughput", description=__doc__.split("\n\n")[0]
    )
    add_run_arguments(parser, QUICK)
    parser.add_argument(
        "--no-profile", action="store_true", help="skip the py-spy runs of kubetune and the best baseline"
    )
    args = parser.parse_args(argv)
    settings, threads = chosen_settings(args, FULL, QUICK)
    machine = describe_machine(PACKAGES)
    workdir = Path(tempfile.mkdtemp(prefix=f"{NAME}-"))
    try:
        assets, runs, alone = run_all(settings, threads, workdir)
        summary = summarize(runs, alone)
        profiles = None
        if not (args.quick or args.no_profile):
            kinds = ["kubetune", summary["comparison"]["bestBaseline"]]
            profiles = profile(plan_for(assets, settings, threads, packing=False), kinds, workdir)
    finally:
        if args.keep:
            log(f"runs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    dataset = dataset_summary(assets["tokenLengths"], MAX_SEQ_LENGTH, BATCH_SIZE)
    plan = plan_for(assets, settings, threads, packing=False)
    results: dict[str, Any] = {
        "benchmark": NAME,
        "quick": args.quick,
        "machine": finish_machine(machine),
        "setup": {
            "model": {"parameters": assets["parameters"], "config": assets["modelConfig"]},
            "lora": lora_setup(plan),
            "maxSeqLength": MAX_SEQ_LENGTH,
            "batchSize": BATCH_SIZE,
            "precision": plan.precision,
            "threads": threads,
            "warmupSteps": settings.warmup_steps,
            "steps": settings.steps,
            "repeats": settings.repeats,
            "dataset": dataset,
        },
        **summary,
        "profile": profiles,
        "runs": [{k: v for k, v in r.items() if k not in ("allStepSeconds", "stepTokens")} for r in runs],
    }
    results["findings"] = findings(results)
    results["plots"] = plot(results)
    path = write_results(NAME, results)
    for target in results["targets"]:
        log(f"{_verdict(target['met'])}: {target['what']} = {target['measured']} (target {target['target']})")
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
