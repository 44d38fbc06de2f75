"""The main job (`make demo`, examples/quickstart.yaml) teaches SmolLM2-135M-Instruct a skill it lacked."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.conftest import ROOT

from kubetune.api.v1alpha1 import ModelSpec, OutputSpec
from kubetune.cli import load_job

pytestmark = [pytest.mark.trainer, pytest.mark.slow]


def test_the_quickstart_answers_held_out_prompts_with_the_record_the_base_model_never_gives(
    smollm2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job as shipped (8 LoRA steps), with the cached model and a private output folder.

    Measured: base 0/20, tuned 19/20 exact. The bound leaves three answers of room for another
    machine's arithmetic; the base never gives the one-line record, so its bound has none to spare.
    """
    from kubetune_trainer.train import run

    monkeypatch.setenv("KUBETUNE_METRICS_PORT", "0")
    shipped = load_job(ROOT / "examples" / "quickstart.yaml")
    spec = shipped.spec.model_copy(
        update={
            "model": ModelSpec(source=f"file://{smollm2_dir}"),
            "dataset": shipped.spec.dataset.model_copy(
                update={"source": f"file://{ROOT / 'examples' / 'data' / 'people' / 'train.jsonl'}"}
            ),
            "output": OutputSpec(uri=f"file://{tmp_path / 'out'}"),
        }
    )
    result = run(shipped.model_copy(update={"spec": spec}), "quickstart", tmp_path / "work")
    assert len(result.samples) == 20
    assert result.metrics["samples_base_exact_match"] <= 0.1
    assert result.metrics["samples_exact_match"] >= 0.8, [s.answer for s in result.samples if not s.exact]
