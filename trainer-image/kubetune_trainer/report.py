"""The local-mode report: a summary a person reads after `kubetune run`, and the loss curve as a PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SUMMARY_FILE = "summary.json"
LOSS_PLOT_FILE = "loss.png"


def summarize(
    log_history: list[dict[str, Any]], manifest: dict[str, Any], trainable: int, total: int
) -> dict[str, Any]:
    """Numbers from the Trainer's log history and the published manifest (pure, so it is testable)."""
    losses = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]
    evals = [entry["eval_loss"] for entry in log_history if "eval_loss" in entry]
    final: dict[str, Any] = next((e for e in reversed(log_history) if "train_runtime" in e), {})
    tokens = final.get("num_input_tokens_seen")
    runtime = final.get("train_runtime")
    if not final.get("train_steps_per_second"):
        # Resumed from a checkpoint of the last step: no step ran, and the token count is the earlier run's.
        tokens = None
    return {
        "trainableParams": trainable,
        "totalParams": total,
        "trainableShare": trainable / total if total else None,
        "steps": manifest.get("globalStep"),
        "lossFirst": losses[0][1] if losses else None,
        "lossLast": losses[-1][1] if losses else None,
        # The final evaluation runs after training and reaches the manifest, not always the history.
        "evalLoss": evals[-1] if evals else manifest.get("metrics", {}).get("eval_loss"),
        "tokensPerSecond": tokens / runtime if tokens and runtime else None,
        "adapterUri": manifest.get("uri"),
        # The checksum `sha256sum kubetune-manifest.json` gives, and the one status.adapter.sha256 holds on a cluster.
        "adapterSha256": manifest.get("manifestSha256", manifest.get("sha256")),
        "lossCurve": losses,
        # What the model answered to the spec's sample prompts, before and after training.
        "samples": manifest.get("samples", []),
        "exactMatch": manifest.get("metrics", {}).get("samples_exact_match"),
        "baseExactMatch": manifest.get("metrics", {}).get("samples_base_exact_match"),
    }


def plot_loss(losses: list[tuple[int, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display where this runs
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=120)
    axes.plot([s for s, _ in losses], [v for _, v in losses], marker="o", markersize=3)
    axes.set(xlabel="optimizer step", ylabel="training loss", title=title)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_report(
    folder: Path, log_history: list[dict[str, Any]], manifest: dict[str, Any], trainable: int, total: int
) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    summary = summarize(log_history, manifest, trainable, total)
    if summary["lossCurve"]:
        plot_loss(
            summary["lossCurve"], folder / LOSS_PLOT_FILE, f"{manifest.get('job', {}).get('name', '')} loss"
        )
        summary["lossPlot"] = str(folder / LOSS_PLOT_FILE)
    (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
