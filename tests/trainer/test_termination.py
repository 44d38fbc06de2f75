"""Fatal errors end as one line `Reason: message` in the termination log and a non-zero exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
