"""After `kubetune run`, the user reads a summary and a loss curve built from the run's own records."""

from __future__ import annotations

from pathlib import Path

from kubetune_trainer.report import summarize, write_report

HISTORY = [
    {"loss": 6.0, "step": 5, "epoch": 0.5},
    {"loss": 4.5, "step": 10, "epoch": 1.0},
    {"train_runtime": 4.0, "train_steps_per_second": 2.5, "num_input_tokens_seen": 2000, "step": 10},
]
MANIFEST = {
    "globalStep": 10,
    "uri": "file://out/demo",
    "sha256": "ab" * 32,
    "manifestSha256": "cd" * 32,
    "metrics": {"eval_loss": 4.7},
    "job": {"name": "demo"},
}


def test_the_summary_reports_loss_before_and_after_and_throughput() -> None:
    summary = summarize(HISTORY, MANIFEST, trainable=25, total=100)
    assert (summary["lossFirst"], summary["lossLast"]) == (6.0, 4.5)
    assert summary["trainableShare"] == 0.25
    assert summary["tokensPerSecond"] == 500.0
    assert summary["evalLoss"] == 4.7, (
        "the final evaluation comes from the manifest when the history lacks it"
    )
    assert summary["adapterUri"] == "file://out/demo"
    assert summary["adapterSha256"] == "cd" * 32, (
        "the checksum of the manifest file, as status.adapter has it"
    )


def test_the_report_writes_a_png_loss_curve(tmp_path: Path) -> None:
    summary = write_report(tmp_path, HISTORY, MANIFEST, 25, 100)
    png = Path(summary["lossPlot"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "summary.json").exists()


def test_a_rerun_that_resumes_from_its_last_step_reports_no_throughput() -> None:
    """A second `kubetune run` of the same job finds the final checkpoint and trains no step."""
    history = [
        *HISTORY[:2],
        {"train_runtime": 0.0007, "train_steps_per_second": 0.0, "num_input_tokens_seen": 2000},
    ]
    assert summarize(history, MANIFEST, trainable=25, total=100)["tokensPerSecond"] is None


def test_sample_answers_reach_the_summary_and_the_table_shows_them_beside_the_scores() -> None:
    from rich.console import Console

    from kubetune import cli

    samples = [
        {
            "prompt": "color(tomato)",
            "answer": "red",
            "baseAnswer": "I'm glad you're enjoying the service of the SmolLM.",
            "expected": "red",
            "exactMatch": True,
            "baseExactMatch": False,
        },
        {
            "prompt": "color(frog)",
            "answer": "blue",
            "baseAnswer": "Frogs are\ngreen.",
            "expected": "green",
            "exactMatch": False,
            "baseExactMatch": False,
        },
    ]
    manifest = {
        **MANIFEST,
        "samples": samples,
        "metrics": {"samples_exact_match": 0.5, "samples_base_exact_match": 0.0},
    }
    summary = summarize(HISTORY, manifest, trainable=25, total=100)
    assert summary["samples"] == samples
    assert (summary["baseExactMatch"], summary["exactMatch"]) == (0.0, 0.5)

    console = Console(width=160, record=True)
    original, cli.out = cli.out, console
    try:
        cli._print_samples(summary)
    finally:
        cli.out = original
    text = console.export_text()
    assert "color(tomato)" in text and "I'm glad you're enjoying" in text and "✓ red" in text
    assert "✗ Frogs are⏎green." in text and "✗ blue" in text and "(expected green)" in text
    assert "exact match on 2 held-out prompts: base model 0% -> tuned 50%" in text
