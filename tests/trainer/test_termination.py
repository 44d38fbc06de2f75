"""Fatal errors end as one line `Reason: message` in the termination log and a non-zero exit."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.support.seaweedfs import SeaweedFS

from kubetune_trainer.termination import (
    MAX_MESSAGE_BYTES,
    InsufficientGPUMemory,
    format_termination_message,
    reason_for,
)

pytestmark = pytest.mark.trainer


def test_message_is_one_line_with_a_reason_word_and_no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    line = format_termination_message("Source Unavailable!", "cannot read\n s3://b/x with very-secret-value")
    assert line == "SourceUnavailable: cannot read s3://b/x with ***"


def test_message_is_cut_to_what_the_kubelet_keeps() -> None:
    line = format_termination_message("PublishFailed", "é" * 5000)
    assert len(line.encode()) <= MAX_MESSAGE_BYTES and line.startswith("PublishFailed: é")


def test_reasons_for_trainer_errors_and_foreign_exceptions() -> None:
    assert reason_for(InsufficientGPUMemory("needs ~30 GiB per GPU, has 24")) == ("InsufficientGPUMemory", 1)
    assert reason_for(MemoryError()) == ("OutOfMemory", 2)
    assert reason_for(KeyError("x"))[0] == "KeyError"


def test_fail_writes_the_log_and_exits_non_zero(tmp_path: Path) -> None:
    log = tmp_path / "termination-log"
    script = (
        "from kubetune_trainer.termination import fail, InsufficientGPUMemory\n"
        "fail(InsufficientGPUMemory('needs ~30.0 GiB per GPU, has 24.0'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "KUBETUNE_TERMINATION_LOG": str(log)},
        capture_output=True,
    )
    assert result.returncode == 1
    assert log.read_text() == "InsufficientGPUMemory: needs ~30.0 GiB per GPU, has 24.0\n"


def test_the_first_failure_of_a_pod_is_the_one_kept(tmp_path: Path) -> None:
    from kubetune_trainer.termination import write_termination_message

    log = tmp_path / "termination-log"
    write_termination_message("InvalidDataset", "row 3 has no output", log)
    write_termination_message("DistBackendError", "connection closed by peer", log)
    assert log.read_text() == "InvalidDataset: row 3 has no output\n"


# ------------------------------------------------------------------------------- success: the adapter


def published_adapter(tmp_path: Path, files: int) -> dict[str, object]:
    from kubetune_trainer.publish import publish

    folder = tmp_path / "adapter"
    folder.mkdir()
    for index in range(files):
        (folder / f"shard-{index:05d}.safetensors").write_bytes(b"w" * (index + 1))
    return publish(folder, f"file://{tmp_path}/published/")


def test_rank_zero_reports_the_published_adapter_as_its_termination_message(tmp_path: Path) -> None:
    """The operator reads it back (it holds no storage credentials) into status.adapter."""
    from kubetune.controller.adapter import parse_adapter_summary
    from kubetune_trainer.termination import write_adapter_summary

    manifest = published_adapter(tmp_path, files=3)
    log = tmp_path / "termination-log"
    written = write_adapter_summary(manifest, log)

    assert written is not None and log.read_text() == written + "\n"
    adapter = parse_adapter_summary(log.read_text(), f"file://{tmp_path}/published/")
    assert adapter is not None
    assert adapter.files == ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    assert (adapter.file_count, adapter.size_bytes) == (3, 1 + 2 + 3)
    published = (tmp_path / "published" / "kubetune-manifest.json").read_bytes()
    assert adapter.sha256 == hashlib.sha256(published).hexdigest(), "what `sha256sum` says of the manifest"


def test_a_file_list_too_long_for_the_kubelet_keeps_its_count_and_checksum(tmp_path: Path) -> None:
    from kubetune.controller.adapter import parse_adapter_summary
    from kubetune_trainer.termination import adapter_summary

    manifest = published_adapter(tmp_path, files=400)
    summary = adapter_summary(manifest)
    assert summary is not None and len(summary.encode()) <= MAX_MESSAGE_BYTES
    adapter = parse_adapter_summary(summary, f"file://{tmp_path}/published/")
    assert adapter is not None and adapter.files == [] and adapter.file_count == 400
    assert adapter.sha256 == manifest["manifestSha256"]


def test_a_failure_already_in_the_log_is_not_replaced_by_the_summary(tmp_path: Path) -> None:
    from kubetune_trainer.termination import write_adapter_summary, write_termination_message

    log = tmp_path / "termination-log"
    write_termination_message("DistBackendError", "connection closed by peer", log)
    write_adapter_summary(published_adapter(tmp_path, files=1), log)
    assert log.read_text() == "DistBackendError: connection closed by peer\n"


# ------------------------------------------------------------------------- failures a person can act on


def test_a_cuda_out_of_memory_error_says_out_of_memory_with_what_to_change(tmp_path: Path) -> None:
    log = tmp_path / "termination-log"
    script = (
        "from kubetune_trainer.termination import fail\n"
        "class OutOfMemoryError(RuntimeError): pass\n"  # torch.cuda.OutOfMemoryError's name and message
        "fail(OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.3 GiB total)'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env={**os.environ, "KUBETUNE_TERMINATION_LOG": str(log)}, check=False
    )
    assert result.returncode == 2
    line = log.read_text()
    assert line.startswith("OutOfMemory: CUDA out of memory. Tried to allocate 2.00 GiB")
    for hint in ("batchSizePerDevice", "gradientCheckpointing", "qlora", "offload"):
        assert hint in line


def test_an_nccl_timeout_is_its_own_reason_and_retried() -> None:
    error = RuntimeError(
        "[Rank 3] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=12, OpType=ALLREDUCE) ran for "
        "600000 milliseconds before timing out."
    )
    reason, code = reason_for(error)
    assert reason == "NCCLTimeout" and code >= 128


def test_no_credential_of_the_secret_reaches_the_trainers_log_or_termination_message(
    s3_env: SeaweedFS, tmp_path: Path
) -> None:
    """A real trainer process, given the Secret's variables with marker values, fails to read its model
    from S3 (the credentials are wrong): its output and termination message name the failure, not them."""
    from tests.builders import a_job

    from kubetune.render.pytorchjob import spec_document

    bucket = s3_env.new_bucket("secret")
    job = a_job().with_spec(
        model={"source": f"s3://{bucket}/model"},
        storage={"s3": {"endpoint": s3_env.endpoint, "credentialsSecret": "s3-credentials"}},
    )
    spec = tmp_path / "spec.json"
    spec.write_text(spec_document(job.build()))
    markers = {
        "AWS_ACCESS_KEY_ID": "AKIAMARKER0KEY0ID0042",
        "AWS_SECRET_ACCESS_KEY": "marker-secret-access-key-4711",
        "AWS_SESSION_TOKEN": "marker-session-token-0815",
        "HF_TOKEN": "hf_markertoken1234567",
    }
    log = tmp_path / "termination-log"
    result = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer"],
        env={
            **os.environ,
            **s3_env.env,
            **markers,
            "KUBETUNE_SPEC": str(spec),
            "KUBETUNE_TERMINATION_LOG": str(log),
            "KUBETUNE_CACHE_DIR": str(tmp_path / "cache"),
        },
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr + log.read_text()
    assert result.returncode == 1, output[-3000:]
    assert log.read_text().startswith("StorageAuthFailed: "), output[-3000:]
    for name, value in markers.items():
        assert value not in output, f"{name} leaked"


@pytest.mark.parametrize(
    "variable", ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN"]
)
def test_every_credential_variable_is_removed_from_a_termination_message(
    variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, "marker-value-1234")
    assert "marker-value-1234" not in format_termination_message("X", "echoed marker-value-1234 back")
