"""Pure: the trainer's termination message on success -> the FineTuneJob's status.adapter.

After the adapter is published, the trainer's global rank 0 writes a compact JSON form of
`AdapterStatus` (uri, files, fileCount, sizeBytes, sha256 of kubetune-manifest.json) as its container's
termination message. The operator holds no storage credentials, so this message is how it learns what
was published. The message is written by whatever runs in the pod, so it is read as untrusted input:
bounded in size, strict JSON types, no unknown keys, and the uri must be the job's own spec.output.uri.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from kubetune.api.v1alpha1 import AdapterStatus
from kubetune.controller.pods import is_master, trainer_status

Manifest = Mapping[str, Any]

MAX_SUMMARY_BYTES = 4096
"""What the kubelet keeps of a termination message; anything longer did not come from a kubelet."""


def _same_folder(left: str, right: str) -> bool:
    return left.rstrip("/") == right.rstrip("/")


def parse_adapter_summary(message: str, expected_uri: str) -> AdapterStatus | None:
    """The adapter the message describes, or None when the message is not a well-formed summary for this job."""
    if not message or len(message.encode("utf-8", errors="replace")) > MAX_SUMMARY_BYTES:
        return None
    try:
        adapter = AdapterStatus.model_validate_json(message.strip(), strict=True)
    except ValidationError:
        return None
    if adapter.uri is None or not _same_folder(adapter.uri, expected_uri):
        return None
    if adapter.sha256 is None or adapter.file_count is None or adapter.size_bytes is None:
        return None
    if len(adapter.files) > adapter.file_count or len(set(adapter.files)) != len(adapter.files):
        return None
    return adapter


def success_message(pod: Manifest) -> str | None:
    """The termination message of the pod's trainer container when it exited 0, else None."""
    terminated = ((trainer_status(pod) or {}).get("state") or {}).get("terminated") or {}
    message = terminated.get("message")
    return message if terminated.get("exitCode") == 0 and isinstance(message, str) else None


def reported_adapter(pods: Iterable[Manifest], expected_uri: str) -> AdapterStatus | None:
    """The adapter the master pod's trainer reported when it exited 0, if it reported a valid one."""
    for pod in pods:
        if not is_master(pod):
            continue
        message = success_message(pod)
        if message is not None and (adapter := parse_adapter_summary(message, expected_uri)) is not None:
            return adapter
    return None
