"""status.adapter comes from the trainer's termination message, which whatever runs in the pod controls."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubetune.api.v1alpha1 import FineTuneJobStatus, Phase
from kubetune.controller.adapter import MAX_SUMMARY_BYTES, parse_adapter_summary, reported_adapter
from kubetune.controller.observed import Observed
from kubetune.controller.status import compute_status
from tests.unit.test_controller_status import T1, T2, a_pod, a_pytorchjob, job

URI = "s3://adapters/demo/"
SHA = "a" * 64


def a_summary(**fields: Any) -> str:
    summary = {
        "uri": URI,
        "files": ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json"],
        "fileCount": 3,
        "sizeBytes": 123456,
        "sha256": SHA,
        **fields,
    }
    return json.dumps({k: v for k, v in summary.items() if v is not None}, separators=(",", ":"))


def test_a_well_formed_summary_becomes_the_adapter_status() -> None:
    adapter = parse_adapter_summary(a_summary(), URI)
    assert adapter is not None
    assert adapter.uri == URI and adapter.sha256 == SHA
    assert adapter.files == ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json"]
    assert (adapter.file_count, adapter.size_bytes) == (3, 123456)


def test_a_summary_whose_file_list_did_not_fit_keeps_the_count_and_checksum() -> None:
    adapter = parse_adapter_summary(a_summary(files=[], fileCount=5000), URI)
    assert adapter is not None and adapter.files == [] and adapter.file_count == 5000


@pytest.mark.parametrize(
    "message",
    [
        "",
        "InvalidDataset: no rows",
        "{not json",
        "[1, 2, 3]",
        a_summary(sizeBytes="123456"),
        a_summary(sizeBytes=True),
        a_summary(sizeBytes=-1),
        a_summary(fileCount=1.5),
        a_summary(files="adapter_model.safetensors"),
        a_summary(files=[1, 2]),
        a_summary(files=["x" * 2000], fileCount=1),
        a_summary(files=["a", "a"], fileCount=2),
        a_summary(fileCount=1),
        a_summary(sha256="not-a-checksum"),
        a_summary(sha256=SHA.upper()),
        a_summary(sha256=None),
        a_summary(uri="s3://someone-elses-bucket/"),
        a_summary(uri=None),
        a_summary(owner="me"),
        a_summary(files=[f"shard-{i}.safetensors" for i in range(300)], fileCount=300),  # over 4096 bytes
        '{"uri":' * 2000,
    ],
    ids=lambda message: message[:40] or "empty",
)
def test_a_malformed_or_hostile_message_is_ignored(message: str) -> None:
    assert parse_adapter_summary(message, URI) is None


def test_the_uri_may_differ_only_by_its_trailing_slash() -> None:
    assert parse_adapter_summary(a_summary(uri=URI.rstrip("/")), URI) is not None


def test_the_oversize_limit_is_what_the_kubelet_keeps() -> None:
    padded = a_summary()
    assert parse_adapter_summary(padded + " " * (MAX_SUMMARY_BYTES - len(padded)), URI) is not None
    assert parse_adapter_summary(padded + " " * (MAX_SUMMARY_BYTES + 1 - len(padded)), URI) is None


def succeeded(message: str, replica: str = "master", exit_code: int = 0) -> dict[str, Any]:
    return a_pod(
        f"demo-{replica}-0",
        replica,
        "Succeeded",
        terminated={"exitCode": exit_code, "reason": "Completed", "message": message},
    )


def test_only_the_master_pods_clean_exit_reports_the_adapter() -> None:
    assert reported_adapter([succeeded(a_summary(), replica="worker")], URI) is None
    assert reported_adapter([succeeded(a_summary(), exit_code=1)], URI) is None
    assert (
        reported_adapter([succeeded(a_summary(), replica="worker"), succeeded(a_summary())], URI) is not None
    )


def test_a_succeeded_job_reports_the_published_adapter_in_its_status() -> None:
    done = Observed(a_pytorchjob("Created", "Succeeded", completion=T2), [succeeded(a_summary())])
    status = compute_status(job(), FineTuneJobStatus(), done, T2)
    assert status.phase is Phase.SUCCEEDED
    assert status.adapter is not None and status.adapter.sha256 == SHA and status.adapter.file_count == 3
    assert SHA in (status.message or "") and "3 files" in (status.message or "")


def test_the_adapter_is_read_from_a_master_pod_already_deleted() -> None:
    """cleanPodPolicy All deletes the pods once the job succeeded; the watch hands over their final state."""
    done = Observed(
        a_pytorchjob("Created", "Succeeded", completion=T2), deleted_pods=[succeeded(a_summary())]
    )
    status = compute_status(job(), FineTuneJobStatus(), done, T2)
    assert status.adapter is not None and status.adapter.sha256 == SHA


def test_without_a_valid_summary_the_adapter_is_only_its_uri() -> None:
    done = Observed(
        a_pytorchjob("Created", "Succeeded", completion=T2), [succeeded(a_summary(uri="s3://x/"))]
    )
    status = compute_status(job(), FineTuneJobStatus(), done, T2)
    assert status.adapter is not None and status.adapter.uri == URI and status.adapter.sha256 is None


def test_the_adapter_is_not_reported_before_the_job_succeeds() -> None:
    running = Observed(a_pytorchjob("Created", "Running"), [succeeded(a_summary())])
    assert compute_status(job(), FineTuneJobStatus(), running, T1).adapter is None
