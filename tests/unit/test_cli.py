"""The CLI as a user types it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kubetune.cli import app
from tests.builders import a_job
from tests.conftest import EXAMPLES, INVALID, ROOT

runner = CliRunner()


def test_crd_prints_the_committed_file() -> None:
    result = runner.invoke(app, ["crd"])
    assert result.exit_code == 0
    assert result.stdout == (ROOT / "crds" / "kubetune.io_finetunejobs.yaml").read_text()


def test_reference_prints_the_committed_docs() -> None:
    result = runner.invoke(app, ["reference"])
    assert result.stdout == (ROOT / "docs" / "reference.md").read_text(), "run `make generate`"


def test_validate_passes_every_example_at_once() -> None:
    result = runner.invoke(app, ["validate", "-f", str(ROOT / "examples")])
    assert result.exit_code == 0, result.output
    # examples/ holds the per-method manifests plus the GitOps folder's jobs (found recursively).
    assert result.stdout.count("✓") >= len(EXAMPLES)
    assert "✗" not in result.output


def test_validate_fails_and_names_each_field() -> None:
    result = runner.invoke(app, ["validate", "-f", str(INVALID[0]), "-f", str(EXAMPLES[0])])
    assert result.exit_code == 1
    assert "✗" in result.output and "✓" in result.output


def test_validate_a_missing_file_is_a_usage_error() -> None:
    result = runner.invoke(app, ["validate", "-f", "/nonexistent.yaml"])
    assert result.exit_code == 2
    assert "no such file" in result.output


def test_render_prints_a_configmap_and_a_pytorchjob() -> None:
    result = runner.invoke(
        app, ["render", "-f", str(ROOT / "examples" / "lora.yaml"), "--image", "trainer:1"]
    )
    assert result.exit_code == 0, result.output
    kinds = [d["kind"] for d in yaml.safe_load_all(result.stdout)]
    assert kinds == ["ConfigMap", "PyTorchJob"]
    assert "trainer:1" in result.stdout


def test_render_refuses_an_invalid_job() -> None:
    result = runner.invoke(app, ["render", "-f", str(ROOT / "tests/data/invalid/lora-rank-zero.yaml")])
    assert result.exit_code == 1
    assert "spec.method.lora.r" in result.output


def test_control_plane_verbs_do_not_load_the_training_stack() -> None:
    """`kubetune validate` on a laptop without torch must work, and fast."""
    code = (
        "import sys; from kubetune.cli import app; "
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'deepspeed') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_local_mode_reads_pvc_claims_from_a_folder_of_this_machine(tmp_path: Path) -> None:
    from kubetune.cli import local_env
    from kubetune_trainer.storage import resolve_source

    (tmp_path / "claims" / "datasets" / "sft").mkdir(parents=True)
    (tmp_path / "claims" / "datasets" / "sft" / "train.jsonl").write_text("{}\n")
    job = a_job().with_spec(dataset={"source": "pvc://datasets/sft/train.jsonl"}).build()
    env = local_env(job, tmp_path / "work", tmp_path / "reports", tmp_path / "claims", {"PATH": "/bin"})
    assert env["OMP_WAIT_POLICY"] == "PASSIVE", "torch's threads sleep while waiting on a shared machine"
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        assert (
            resolve_source(job.spec.dataset.source)
            == tmp_path / "claims" / "datasets" / "sft" / "train.jsonl"
        )
