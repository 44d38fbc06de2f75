"""A trainer stopped mid-run (SIGTERM, as on eviction or preemption) writes a checkpoint,
exits to be restarted, and the restarted trainer continues from that step; one killed outright
(SIGKILL) continues from its newest complete checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.trainer.conftest import cpu_job

pytestmark = pytest.mark.trainer

STEPS = 300


def start_trainer(spec_file: Path, workdir: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "KUBETUNE_SPEC": str(spec_file),
        "KUBETUNE_WORKDIR": str(workdir),
        "KUBETUNE_METRICS_PORT": "0",
        "KUBETUNE_TERMINATION_LOG": str(log.with_suffix(".termination-log")),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "kubetune_trainer"], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )


def wait_for(path: Path, process: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, "the trainer exited before writing a checkpoint"
        assert time.monotonic() < deadline, f"no {path} after {timeout}s"
        time.sleep(0.2)


def a_lora_spec(model: Path, data: Path, output: Path, steps: int, spec_file: Path) -> Path:
    """A LoRA job of `steps` steps with a checkpoint every 10, the newest two kept; written to `spec_file`."""
    manifest = cpu_job(
        model,
        data,
        output,
        training={"maxSteps": steps, "learningRate": 1e-3, "logEverySteps": 50},
        checkpoint={"everySteps": 10, "keep": 2},
        method={
            "type": "lora",
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targetModules": ["q_proj", "v_proj"]},
        },
    ).as_manifest()
    spec_file.write_text(json.dumps(manifest))
    return spec_file


def complete_checkpoints(checkpoints: Path) -> list[int]:
    """Steps of the checkpoints marked complete, oldest first."""
    return sorted(
        int(p.parent.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*/kubetune-checkpoint.json")
    )


def test_sigterm_checkpoints_and_the_restarted_trainer_resumes_from_that_step(
    tiny_llama_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    spec_file = a_lora_spec(tiny_llama_dir, data_dir / "alpaca.jsonl", output, STEPS, tmp_path / "spec.json")
    checkpoints = output / "checkpoints"

    first = start_trainer(spec_file, tmp_path / "pod-1", tmp_path / "pod-1.log")
    wait_for(checkpoints / "checkpoint-10" / "kubetune-checkpoint.json", first)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 143, (tmp_path / "pod-1.log").read_text()[-3000:]
    steps = complete_checkpoints(checkpoints)
    stopped_at = steps[-1]
    assert 10 <= stopped_at < STEPS and len(steps) <= 2  # keep: 2
    assert not (output / "kubetune-manifest.json").exists()  # nothing published by a preempted run

    # The restarted pod has a fresh node-local disk.
    second = start_trainer(spec_file, tmp_path / "pod-2", tmp_path / "pod-2.log")
    assert second.wait(timeout=300) == 0, (tmp_path / "pod-2.log").read_text()[-3000:]
    log = (tmp_path / "pod-2.log").read_text()
    assert f"resuming from file://{checkpoints}/checkpoint-{stopped_at}" in log
    assert f"training from step {stopped_at} of {STEPS}" in log
    published = json.loads((output / "kubetune-manifest.json").read_text())
    assert published["globalStep"] == STEPS


def test_sigkill_after_a_checkpoint_and_the_restarted_trainer_resumes_from_that_step(
    tiny_llama_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """SIGKILL (the kernel's OOM killer, a node dying) leaves no time to save: the newest checkpoint marked
    complete is where the next pod starts, and a folder a kill left half uploaded is passed over."""
    steps = 40
    output = tmp_path / "out"
    spec_file = a_lora_spec(tiny_llama_dir, data_dir / "alpaca.jsonl", output, steps, tmp_path / "spec.json")
    checkpoints = output / "checkpoints"

    first = start_trainer(spec_file, tmp_path / "pod-1", tmp_path / "pod-1.log")
    wait_for(checkpoints / "checkpoint-10" / "kubetune-checkpoint.json", first)
    first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=30) == -signal.SIGKILL
    killed_at = complete_checkpoints(checkpoints)[-1]
    assert 10 <= killed_at < steps, (tmp_path / "pod-1.log").read_text()[-3000:]
    # What a kill in the middle of an upload leaves: a newer folder with part of its files and no marker.
    partial = checkpoints / f"checkpoint-{steps - 1}"
    partial.mkdir(exist_ok=True)
    (partial / "adapter_model.safetensors").write_bytes(b"\0" * 16)

    second = start_trainer(spec_file, tmp_path / "pod-2", tmp_path / "pod-2.log")
    assert second.wait(timeout=300) == 0, (tmp_path / "pod-2.log").read_text()[-3000:]
    log = (tmp_path / "pod-2.log").read_text()
    assert f"resuming from file://{checkpoints}/checkpoint-{killed_at}" in log
    assert f"training from step {killed_at} of {steps}" in log
    published = (output / "kubetune-manifest.json").read_bytes()
    assert json.loads(published)["globalStep"] == steps
    # What the operator reads back as status.adapter: the manifest as published, in brief.
    summary = json.loads((tmp_path / "pod-2.termination-log").read_text())
    assert summary["uri"] == f"file://{output}" and summary["fileCount"] == len(summary["files"]) > 0
    assert summary["sha256"] == hashlib.sha256(published).hexdigest()
