"""The trainer's failures reach the FineTuneJob as reasons a person can act on, retried only when it helps."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.api.v1alpha1 import FineTuneJobStatus, Phase, Reason
from kubetune.controller.conditions import find_condition
from kubetune.controller.failures import RETRYABLE_EXIT, classify_termination
from kubetune.controller.observed import Observed
from kubetune.controller.status import compute_status
from kubetune_trainer.termination import (
    EXIT_TRANSIENT,
    OOM_HINT,
    SourceNotFound,
    SourceTemporarilyUnavailable,
    format_termination_message,
    reason_for,
)
from tests.builders import a_job

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z"


def trainer_line(error: Exception) -> tuple[int, str]:
    """The exit code and termination message the trainer gives for `error`."""
    reason, code = reason_for(error)
    extra = OOM_HINT if reason == "OutOfMemory" else ""
    return code, format_termination_message(reason, str(error) + extra)


class OutOfMemoryError(RuntimeError):
    """torch.cuda.OutOfMemoryError's name, as the trainer tells it without importing torch."""


@pytest.mark.parametrize(
    ("error", "reason", "retried"),
    [
        (OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), Reason.OUT_OF_MEMORY, False),
        (RuntimeError("[Rank 1] Watchdog caught collective operation timeout"), Reason.NCCL_TIMEOUT, True),
        (SourceNotFound("s3://data/train.jsonl does not exist or is empty"), Reason.SOURCE_NOT_FOUND, False),
        (SourceTemporarilyUnavailable("cannot list s3://data/: SlowDown"), Reason.SOURCE_UNAVAILABLE, True),
        (
            SourceTemporarilyUnavailable("cannot list s3://d/: Connection was closed"),
            Reason.SOURCE_UNAVAILABLE,
            True,
        ),
    ],
)
def test_each_trainer_failure_has_its_reason_and_only_transient_ones_are_retried(
    error: Exception, reason: Reason, retried: bool
) -> None:
    code, line = trainer_line(error)
    assert classify_termination(code, "Error", line) is reason
    assert (code >= RETRYABLE_EXIT) is retried


def test_an_s3_access_denied_is_storage_auth_failed_and_fails_once() -> None:
    assert classify_termination(1, "Error", "SourceUnavailable: cannot list s3://d/: AccessDenied") is (
        Reason.STORAGE_AUTH_FAILED
    )
    assert (
        classify_termination(1, "Error", "StorageAuthFailed: cannot list s3://d/")
        is Reason.STORAGE_AUTH_FAILED
    )


def test_the_trainers_transient_exit_code_is_one_the_restart_policy_retries_and_no_signal() -> None:
    assert EXIT_TRANSIENT >= RETRYABLE_EXIT and EXIT_TRANSIENT > 128 + 64


def failed_pod(code: int, message: str) -> dict[str, Any]:
    terminated = {"exitCode": code, "reason": "Error", "message": message, "startedAt": T0, "finishedAt": T1}
    return {
        "metadata": {
            "name": "demo-master-0",
            "uid": "u0",
            "labels": {"training.kubeflow.org/replica-type": "master"},
        },
        "spec": {"nodeName": "n0", "containers": [{"name": "pytorch"}]},
        "status": {
            "phase": "Failed",
            "containerStatuses": [{"name": "pytorch", "state": {"terminated": terminated}}],
        },
    }


def test_a_job_whose_trainer_runs_out_of_gpu_memory_ends_failed_with_reason_out_of_memory_and_the_hint() -> (
    None
):
    code, line = trainer_line(OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    pytorchjob = {
        "metadata": {"name": "demo", "annotations": {}},
        "status": {"conditions": [{"type": "Failed", "status": "True"}], "completionTime": T1},
    }
    status = compute_status(
        a_job().with_uid().build(), FineTuneJobStatus(), Observed(pytorchjob, [failed_pod(code, line)]), T1
    )
    assert status.phase is Phase.FAILED
    failed = find_condition(status.conditions, "Failed")
    assert failed is not None and failed.reason == Reason.OUT_OF_MEMORY
    assert "batchSizePerDevice" in failed.message and "qlora" in failed.message
