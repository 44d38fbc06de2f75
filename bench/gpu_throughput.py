"""Trainer throughput on one GPU: tokens/s and MFU of LoRA and QLoRA, against a plain baseline, and peak
memory against `kubetune estimate`.

The model is a Llama-3-8B-shaped Llama built from its config with random weights (no model can be
downloaded where this runs; throughput does not depend on weight values), saved in bf16. Data: generated
alpaca rows long enough that every sequence is cut at the sequence length, so no batch holds padding and
packing does not matter. The kubetune trainer (its Python entry on a FineTuneJob spec) and a plain
transformers ``Trainer`` + peft script (+ bitsandbytes for QLoRA) train the same LoRA (r 16, alpha 32, all
linear layers), bf16, batch 2 x 2,048 tokens, no activation checkpointing; every run is its own process and
is timed by the same callback as ``bench.trainer_throughput`` (``bench.training_runs``).

**How FLOPs are counted.** N is the number of weights that take part in a matmul per token: every linear
layer of the blocks plus the output head (the input embedding is a lookup, not a matmul). Full training
costs ~6N FLOPs per token (2N forward, 2N for the activation gradients, 2N for the weight gradients). With
a frozen base and LoRA the weight-gradient matmuls of the base are skipped: ~4N, plus 6 per LoRA weight.
Attention adds 12 x layers x (heads x head dim) x sequence length per token for the score and value
matmuls, forward and backward, with no causal halving (PaLM's convention, appendix B). QLoRA does the same
useful FLOPs (dequantizing is overhead, not counted), and recomputation under activation checkpointing is
not counted either: this is model FLOPs utilization (MFU), not hardware FLOPs. MFU = tokens/s x FLOPs per
token / the GPU's dense bf16 peak (989 TFLOP/s for H100 SXM and H200, 756 for H100 PCIe, 312 for A100).

Without CUDA it writes a result that says it was not measured and why.

    python -m bench.gpu_throughput [--quick] [--peak-tflops N]
    python -m bench.gpu_throughput --cpu-smoke OUT_DIR    # the whole pipeline on a tiny model, on the CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    REPO_DIR,
    describe_machine,
    finish_machine,
    machine_markdown,
    markdown_table,
    plot_path,
    write_results,
)
from bench.training_runs import AssetSpec, RunPlan, estimate_memory, measure, prepare_assets

NAME = "gpu_throughput"
CACHE_DIR = Path.home() / ".cache" / "kubetune" / "bench" / NAME
PACKAGES = ["torch", "transformers", "peft", "bitsandbytes", "accelerate", "deepspeed"]
LLAMA3_8B: dict[str, Any] = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}
TINY: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
# Dense bf16 tensor-core peaks, first match on the device name wins.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class Variant:
    key: str
    kind: str
    method: str
    title: str


VARIANTS = (
    Variant("kubetune-lora", "kubetune", "lora", "kubetune, LoRA"),
    Variant("transformers-lora", "transformers", "lora", "transformers + peft, LoRA"),
    Variant("kubetune-qlora", "kubetune", "qlora", "kubetune, QLoRA"),
    Variant("transformers-qlora", "transformers", "qlora", "transformers + peft + bitsandbytes, QLoRA"),
)
TITLES = {v.key: v.title for v in VARIANTS}


@dataclasses.dataclass(frozen=True)
class Settings:
    model_config: dict[str, Any]
    max_seq_length: int
    batch_size: int
    warmup_steps: int
    steps: int
    precision: str
    words_per_row: int


FULL = Settings(LLAMA3_8B, 2048, 2, warmup_steps=3, steps=20, precision="bf16", words_per_row=2500)
QUICK = dataclasses.replace(FULL, warmup_steps=2, steps=5)
CPU_SMOKE = Settings(TINY, 128, 2, warmup_steps=1, steps=2, precision="fp32", words_per_row=150)


# ----------------------------------------------------------------------------------- FLOPs (pure)


def _attention_width(config: Mapping[str, Any]) -> tuple[int, int]:
    """(heads x head dim, KV heads x head dim)."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    return config["num_attention_heads"] * head_dim, kv_heads * head_dim


def linear_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer of one Llama block, by module name."""
    hidden, intermediate = config["hidden_size"], config["intermediate_size"]
    query, key_value = _attention_width(config)
    return {
        "q_proj": (hidden, query),
        "k_proj": (hidden, key_value),
        "v_proj": (hidden, key_value),
        "o_proj": (query, hidden),
        "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate),
        "down_proj": (intermediate, hidden),
    }


def matmul_parameters(config: Mapping[str, Any]) -> int:
    """N: the weights each token multiplies through (block linears and the output head, not the embedding)."""
    block = sum(fan_in * fan_out for fan_in, fan_out in linear_shapes(config).values())
    return int(config["num_hidden_layers"] * block + config["hidden_size"] * config["vocab_size"])


def lora_parameters(config: Mapping[str, Any], r: int, targets: Sequence[str] = LORA_TARGETS) -> int:
    """Weights of the LoRA matrices A (r x in) and B (out x r) on ``targets`` of every block."""
    shapes = linear_shapes(config)
    return int(config["num_hidden_layers"] * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets))


def attention_flops_per_token(config: Mapping[str, Any], seq_length: int) -> int:
    """Scores and weighted values, forward and backward: 12 x layers x (heads x head dim) x sequence."""
    query, _ = _attention_width(config)
    return int(12 * config["num_hidden_layers"] * query * seq_length)


def training_flops_per_token(
    config: Mapping[str, Any], seq_length: int, method: str, lora_r: int = 16
) -> int:
    """Model FLOPs per trained token: 6N for full training; 4N + 6 per LoRA weight for LoRA and QLoRA."""
    base = matmul_parameters(config)
    attention = attention_flops_per_token(config, seq_length)
    if method == "full":
        return 6 * base + attention
    if method in ("lora", "qlora"):
        return 4 * base + 6 * lora_parameters(config, lora_r) + attention
    raise ValueError(f"no FLOP count for method {method!r}")


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilization: the share of the peak that the counted FLOPs use."""
    return tokens_per_second * flops_per_token / peak_flops


def peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name, or None for one not in the table."""
    return next((flops for needle, flops in PEAK_BF16_FLOPS if needle in device_name), None)


# ----------------------------------------------------------------------------------------------- running


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def probe_cuda() -> dict[str, Any]:
    """CUDA as a fresh process sees it (this one never touches the GPU, so it holds none of its memory)."""
    code = (
        "import json, torch\n"
        "ok = torch.cuda.is_available()\n"
        "p = torch.cuda.get_device_properties(0) if ok else None\n"
        "print(json.dumps({'available': ok, 'torch': torch.__version__, 'torchCuda': torch.version.cuda,"
        " 'name': p.name if p else None, 'memoryBytes': p.total_memory if p else None,"
        " 'count': torch.cuda.device_count() if ok else 0}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_DIR
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def plan_for(assets: dict[str, Any], settings: Settings, method: str, gpus: int) -> RunPlan:
    return RunPlan(
        model_dir=assets["modelDir"],
        data_file=assets["dataFile"],
        max_seq_length=settings.max_seq_length,
        batch_size=settings.batch_size,
        steps=settings.steps,
        warmup_steps=settings.warmup_steps,
        method=method,
        precision=settings.precision,
        target_modules=LORA_TARGETS,
        gpus=gpus,
        log_every_steps=1,
    )


def run_all(
    settings: Settings, workdir: Path, gpus: int
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    spec = AssetSpec(
        model_config=settings.model_config,
        rows=max(64, 4 * settings.batch_size * (settings.warmup_steps + settings.steps)),
        min_words=settings.words_per_row,
        max_words=settings.words_per_row,
        dtype="bfloat16" if settings.precision == "bf16" else "float32",
    )
    log(f"assets (cached under {CACHE_DIR})")
    assets = prepare_assets(spec, CACHE_DIR)
    runs, estimates = [], {}
    for variant in VARIANTS:
        plan = plan_for(assets, settings, variant.method, gpus)
        if variant.kind == "kubetune":
            estimates[variant.method] = estimate_memory(plan, workdir / f"estimate-{variant.method}")
        log(f"{variant.key}")
        result = measure(variant.kind, plan, workdir / variant.key)
        log(
            f"  {result['tokensPerSecond']:.0f} tokens/s, peak {result['gpuPeakReservedBytes'] / 2**30:.1f} GiB"
        )
        runs.append(result | {"variant": variant.key, "method": variant.method})
    return assets, runs, estimates


# --------------------------------------------------------------------------------------------- summarizing


def summarize(
    runs: Sequence[dict[str, Any]],
    estimates: Mapping[str, Mapping[str, Any]],
    config: Mapping[str, Any],
    seq_length: int,
    peak: float | None,
) -> dict[str, Any]:
    """Per variant: tokens/s, FLOPs per token, MFU, peak memory against the estimate; kubetune vs plain (pure)."""
    variants: dict[str, Any] = {}
    for run in runs:
        flops = training_flops_per_token(config, seq_length, run["method"])
        estimated = estimates.get(run["method"], {}).get("perGpuMemoryBytes")
        reserved = run["gpuPeakReservedBytes"]
        variants[run["variant"]] = {
            "method": run["method"],
            "tokensPerSecond": round(run["tokensPerSecond"], 1),
            "stepSeconds": round(run["windowSeconds"] / run["timedSteps"], 4),
            "flopsPerToken": flops,
            "achievedTflops": round(run["tokensPerSecond"] * flops / 1e12, 2),
            "mfu": round(mfu(run["tokensPerSecond"], flops, peak), 4) if peak else None,
            "gpuPeakAllocatedBytes": run["gpuPeakAllocatedBytes"],
            "gpuPeakReservedBytes": reserved,
            "estimatedBytes": estimated,
            "estimateOverMeasured": round(estimated / reserved, 3) if estimated and reserved else None,
            "peakRssBytes": run["peakRssBytes"],
            "losses": run.get("losses", []),
        }
    ratios = {
        method: round(
            variants[f"kubetune-{method}"]["tokensPerSecond"]
            / variants[f"transformers-{method}"]["tokensPerSecond"],
            4,
        )
        for method in ("lora", "qlora")
        if f"kubetune-{method}" in variants and f"transformers-{method}" in variants
    }
    return {"variants": variants, "kubetuneOverPlain": ratios}


def not_measured(reason: str, machine: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The result of a machine without CUDA: what would have run, and why it did not."""
    config = settings.model_config
    return {
        "benchmark": NAME,
        "measured": False,
        "reason": reason,
        "machine": finish_machine(machine),
        "setup": setup_block(settings, config, None),
        "flopsPerToken": {
            method: training_flops_per_token(config, settings.max_seq_length, method)
            for method in ("full", "lora", "qlora")
        },
    }


def setup_block(settings: Settings, config: Mapping[str, Any], peak: float | None) -> dict[str, Any]:
    """What was (or would have been) trained; ``config`` is the model's, with its vocabulary."""
    return {
        "model": "Llama-3-8B shape, random weights"
        if settings.model_config == LLAMA3_8B
        else "tiny Llama, random weights",
        "modelConfig": dict(config),
        "matmulParameters": matmul_parameters(config),
        "loraParameters": lora_parameters(config, 16),
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targetModules": list(LORA_TARGETS)},
        "maxSeqLength": settings.max_seq_length,
        "batchSize": settings.batch_size,
        "precision": settings.precision,
        "warmupSteps": settings.warmup_steps,
        "steps": settings.steps,
        "activationCheckpointing": False,
        "peakFlops": peak,
    }


# ---------------------------------------------------------------------------------------- plots, Markdown


def plot(results: dict[str, Any], folder: Path | None = None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = results["variants"]
    keys = [k for k in TITLES if k in variants]
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(10, 3.4))
    colors = ["tab:blue" if k.startswith("kubetune") else "tab:gray" for k in keys]
    speed.barh([TITLES[k] for k in keys], [variants[k]["tokensPerSecond"] for k in keys], color=colors)
    speed.invert_yaxis()
    speed.set_xlabel("tokens/s")
    measured = [variants[k]["gpuPeakReservedBytes"] / 2**30 for k in keys]
    estimated = [(variants[k]["estimatedBytes"] or 0) / 2**30 for k in keys]
    rows = range(len(keys))
    memory.barh([r - 0.2 for r in rows], measured, height=0.4, label="measured (reserved)", color=colors)
    memory.barh([r + 0.2 for r in rows], estimated, height=0.4, label="kubetune estimate", color="tab:orange")
    memory.set_yticks(list(rows), [""] * len(keys))
    memory.invert_yaxis()
    memory.set_xlabel("peak GPU memory (GiB)")
    memory.legend(fontsize=7)
    figure.tight_layout()
    path = (folder / f"{NAME}-throughput.png") if folder else plot_path(NAME, "throughput")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return [path.name]


def render_markdown(results: dict[str, Any]) -> str:
    """The GPU section of docs/benchmarks.md."""
    setup = results["setup"]
    method_note = (
        f"N = {setup['matmulParameters'] / 1e9:.2f} B matmul weights, {setup['loraParameters'] / 1e6:.1f} M LoRA "
        "weights. FLOPs per token: ~6N for full training, ~4N + 6 x LoRA weights for LoRA and QLoRA (the frozen "
        "base skips its weight-gradient matmuls), plus 12 x layers x attention width x sequence length for "
        "attention; dequantizing and recomputation are not counted (MFU, not hardware FLOPs)."
    )
    head = [
        "## Trainer throughput on one GPU\n",
        f"{setup['model']}, LoRA r {setup['lora']['r']} on {', '.join(setup['lora']['targetModules'])}, "
        f"{setup['precision']}, batch {setup['batchSize']} x {setup['maxSeqLength']} tokens without padding, no "
        f"activation checkpointing; {setup['steps']} timed steps after {setup['warmupSteps']} warm-up steps. "
        + method_note
        + "\n",
    ]
    if not results.get("measured"):
        flops = results.get("flopsPerToken", {})
        return "\n".join(
            [
                *head,
                f"**Not measured:** {results['reason']}\n",
                "FLOPs per token this run would count: "
                + ", ".join(f"{m} {v / 1e9:.1f} GFLOP" for m, v in flops.items())
                + ".\n",
                "Machine:\n",
                machine_markdown(results["machine"]),
            ]
        )
    variants = results["variants"]
    rows = [
        [
            TITLES[key],
            f"{v['tokensPerSecond']:,.0f}",
            f"{v['achievedTflops']:.0f}",
            "—" if v["mfu"] is None else f"{v['mfu']:.1%}",
            f"{v['gpuPeakReservedBytes'] / 2**30:.1f} GiB",
            "—" if v["estimatedBytes"] is None else f"{v['estimatedBytes'] / 2**30:.1f} GiB",
            "—" if v["estimateOverMeasured"] is None else f"{v['estimateOverMeasured']:.2f}x",
        ]
        for key, v in variants.items()
    ]
    ratios = results["kubetuneOverPlain"]
    peak = setup.get("peakFlops")
    images = "\n".join(f"![{name}](benchmarks/{name})" for name in results.get("plots", []))
    return "\n".join(
        [
            *head,
            f"Peak: {peak / 1e12:.0f} TFLOP/s dense bf16 ({results['gpu']['name']}).\n"
            if peak
            else f"No known peak for {results['gpu']['name']}: MFU not computed.\n",
            markdown_table(
                [
                    "trainer",
                    "tokens/s",
                    "TFLOP/s",
                    "MFU",
                    "peak memory",
                    "kubetune estimate",
                    "estimate / measured",
                ],
                rows,
            ),
            "kubetune over the plain baseline: "
            + ", ".join(f"{m} {r:.3f}x" for m, r in ratios.items())
            + ". Peak memory is `torch.cuda.max_memory_reserved()` at the last step; the estimate adds 1 GiB for "
            "the CUDA context, which the allocator does not see.\n",
            images + "\n" if images else "",
            "Machine:\n",
            machine_markdown(results["machine"]),
        ]
    )


# -------------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_throughput", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help=f"{QUICK.steps} timed steps")
    parser.add_argument(
        "--peak-tflops", type=float, help="the GPU's dense bf16 peak, when it is not in the table"
    )
    parser.add_argument(
        "--cpu-smoke", type=Path, metavar="OUT_DIR", help="a tiny model on the CPU; results to OUT_DIR"
    )
    args = parser.parse_args(argv)
    machine = describe_machine(PACKAGES)
    cuda = probe_cuda()
    machine["gpu"] = cuda
    smoke = args.cpu_smoke is not None
    settings = CPU_SMOKE if smoke else (QUICK if args.quick else FULL)
    if not cuda["available"] and not smoke:
        reason = (
            f"torch.cuda.is_available() is False on this machine (torch {cuda['torch']}, built for CUDA "
            f"{cuda['torchCuda']}): no GPU to run on."
        )
        path = write_results(NAME, not_measured(reason, machine, settings))
        log(f"not measured: {reason}\nwrote {path}")
        return 0
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(cuda["name"] or "")
    workdir = Path(tempfile.mkdtemp(prefix=f"{NAME}-"))
    assets, runs, estimates = run_all(settings, workdir, gpus=0 if smoke else 1)
    config = assets["modelConfig"]  # the settings' config with the tokenizer's vocabulary where it names none
    results: dict[str, Any] = {
        "benchmark": NAME,
        "measured": True,
        "quick": args.quick,
        "machine": finish_machine(machine),
        "gpu": cuda,
        "setup": setup_block(settings, config, peak),
        **summarize(runs, estimates, config, settings.max_seq_length, peak),
        "runs": [{k: v for k, v in r.items() if k not in ("allStepSeconds", "stepTokens")} for r in runs],
    }
    if smoke:
        args.cpu_smoke.mkdir(parents=True, exist_ok=True)
        results["plots"] = plot(results, args.cpu_smoke)
        target = args.cpu_smoke / f"{NAME}.json"
        target.write_text(json.dumps(results, indent=2) + "\n")
        (args.cpu_smoke / f"{NAME}.md").write_text(render_markdown(results))
    else:
        results["plots"] = plot(results)
        target = write_results(NAME, results)
    for key, variant in results["variants"].items():
        log(f"{key}: {variant['tokensPerSecond']:.0f} tokens/s, MFU {variant['mfu']}")
    log(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
