"""Turn a fatal error into one line in the pod's termination log and a non-zero exit.

Kubernetes copies the termination log into the container status; the operator reads it
back as the FineTuneJob's failure reason, so the line has the form ``Reason: message``
(``Reason`` is a CamelCase word the controller can put in a condition as it is).
On success, rank 0 writes a JSON summary of the published adapter there instead.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

TERMINATION_LOG_ENV = "KUBETUNE_TERMINATION_LOG"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
# The kubelet keeps at most 4096 bytes of a termination message.
MAX_MESSAGE_BYTES = 4096
# Exit codes: 1 for errors the user can fix in the spec or the data, 2 for the rest. Both are below 128,
# so the PyTorchJob (restartPolicy ExitCode) fails at once instead of restarting the pod.
EXIT_USER_ERROR = 1
EXIT_INTERNAL_ERROR = 2
# A collective failed because another rank went away (its pod was killed or its node lost). Retryable
# (128 and up), and above 128 + 64 so it never reads as a signal: the pod is re-created, meets the
# replacement of the lost one and resumes from the checkpoint.
EXIT_PEER_LOST = 200
# A source stayed unreachable through every retry (connection reset, 5xx, throttling): retryable, so the
# training operator re-creates the pod, which tries again; spec.runPolicy.backoffLimit bounds the attempts.
EXIT_TRANSIENT = 201

OOM_HINT = (
    "; to fit, lower spec.training.batchSizePerDevice (raise gradientAccumulationSteps to keep the batch), "
    "turn on spec.training.gradientCheckpointing, use method qlora, or offload with "
    "spec.deepspeed.offloadOptimizer/offloadParams: cpu"
)

_NCCL_TIMEOUT = re.compile(
    r"Watchdog caught collective operation timeout|NCCL[^\n]*(timed out|timeout)", re.IGNORECASE
)

# How gloo and NCCL say that the other end of a collective is gone.
_PEER_LOST = re.compile(
    r"Connection (reset|closed) by (remote )?peer|Broken pipe|gloo/transport/|"
    r"NCCL communicator was aborted|remote process exited",
    re.IGNORECASE,
)

_SECRET_ENV_NAMES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN", "AWS_ACCESS_KEY_ID")


class TrainerError(Exception):
    """An error with a reason the operator can show as it is.

    ``reason`` is a CamelCase word (``SourceUnavailable``, ``InsufficientGPUMemory``...).
    """

    reason = "TrainerError"
    exit_code = EXIT_USER_ERROR

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class SourceError(TrainerError):
    """A model or dataset source cannot be read."""

    reason = "SourceUnavailable"


class SourceNotFound(SourceError):
    """The source does not exist (404, no such key, bucket, repository or folder): retrying cannot help."""

    reason = "SourceNotFound"


class SourceTemporarilyUnavailable(SourceError):
    """The source stayed unreachable through every retry; the pod is retried (EXIT_TRANSIENT)."""

    reason = "SourceUnavailable"
    exit_code = EXIT_TRANSIENT


class DataError(TrainerError):
    """The dataset does not have the shape its format promises."""

    reason = "InvalidDataset"


class SpecError(TrainerError):
    """The spec asks for a combination the trainer cannot run."""

    reason = "InvalidSpec"


class PublishError(TrainerError):
    """The adapter could not be published, or it is not worth publishing."""

    reason = "PublishFailed"
    exit_code = EXIT_INTERNAL_ERROR


class InsufficientGPUMemory(TrainerError):
    """The pre-flight estimate says the job cannot fit on its GPUs."""

    reason = "InsufficientGPUMemory"


_AUTH_CODES = (
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "NoCredentialsError",
)


def storage_reason(error: BaseException, default: str) -> str:
    """``StorageAuthFailed`` for credential errors of S3 (or the hub), else ``default``."""
    text = f"{type(error).__name__} {error}"
    if any(code in text for code in _AUTH_CODES) or "401" in text or "403" in text:
        return "StorageAuthFailed"
    return default


def _redact(text: str) -> str:
    """Remove the values of credential variables, in case a library echoed one."""
    for name in _SECRET_ENV_NAMES:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def format_termination_message(reason: str, message: str) -> str:
    """One line, ``Reason: message``, credentials removed, within the kubelet's limit."""
    reason = re.sub(r"[^A-Za-z0-9]", "", reason) or "Error"
    flat = " ".join(_redact(message).split())
    line = f"{reason}: {flat}" if flat else reason
    encoded = line.encode("utf-8")[:MAX_MESSAGE_BYTES]
    return encoded.decode("utf-8", errors="ignore")


def termination_log_path() -> Path:
    return Path(os.environ.get(TERMINATION_LOG_ENV, DEFAULT_TERMINATION_LOG))


def _write_first(line: str, path: Path | None) -> None:
    """Write the line unless the log already holds one; a missing or read-only log is not an error."""
    target = path or termination_log_path()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("a", encoding="utf-8") as log:
            if log.tell() == 0:
                log.write(line + "\n")
    except OSError:
        pass


def write_termination_message(reason: str, message: str, path: Path | None = None) -> str:
    """Write the line to the termination log (and stderr); return it.

    The first failure wins: every process of a pod shares the log, and the rank that failed
    first holds the cause, while the others often fail after it only because it went away.
    A missing or read-only log (a laptop has no /dev/termination-log) is not an error.
    """
    line = format_termination_message(reason, message)
    _write_first(line, path)
    print(line, file=sys.stderr, flush=True)
    return line


def reason_for(error: BaseException) -> tuple[str, int]:
    """The reason word and exit code for any exception."""
    if isinstance(error, TrainerError):
        return error.reason, error.exit_code
    if isinstance(error, MemoryError):
        return "OutOfMemory", EXIT_INTERNAL_ERROR
    name = type(error).__name__
    if name == "OutOfMemoryError" or "CUDA out of memory" in str(error):
        # torch.cuda.OutOfMemoryError, told without importing torch
        return "OutOfMemory", EXIT_INTERNAL_ERROR
    if _NCCL_TIMEOUT.search(str(error)):
        # A rank hung or its network stalled: the pods are retried and resume from the newest checkpoint.
        return "NCCLTimeout", EXIT_TRANSIENT
    if is_peer_lost(error):
        return "PeerLost", EXIT_PEER_LOST
    return name, EXIT_INTERNAL_ERROR


def is_peer_lost(error: BaseException) -> bool:
    """True when a collective or the store failed because another rank or node went away.

    torch raises the network and store errors as ``DistNetworkError`` / ``DistStoreError``; gloo's lost
    connections arrive as a plain RuntimeError, recognised by their message (checked without importing torch).
    """
    kinds = {cls.__name__ for cls in type(error).__mro__}
    return bool(kinds & {"DistNetworkError", "DistStoreError"}) or bool(_PEER_LOST.search(str(error)))


def fail(error: BaseException, path: Path | None = None) -> NoReturn:
    """Record ``error`` in the termination log and exit non-zero."""
    reason, code = reason_for(error)
    message = str(error) or type(error).__name__
    if reason == "OutOfMemory":
        message += OOM_HINT
    write_termination_message(reason, message, path)
    sys.exit(code)


def adapter_summary(manifest: Mapping[str, Any]) -> str | None:
    """The published manifest in brief, as compact JSON of kubetune's ``AdapterStatus``.

    ``uri``, ``files``, ``fileCount``, ``sizeBytes`` and ``sha256`` (of kubetune-manifest.json as
    published). When the file list would take the message past what the kubelet keeps, it is left
    out and ``fileCount`` says how many there are. None when not even that fits.
    """
    from pydantic import ValidationError

    from kubetune.api.v1alpha1 import AdapterStatus

    files = [str(entry["path"]) for entry in manifest["files"]]
    for listed in (files, []):
        try:
            summary = AdapterStatus(
                uri=str(manifest["uri"]),
                files=listed,
                file_count=len(files),
                size_bytes=int(manifest["sizeBytes"]),
                sha256=str(manifest["manifestSha256"]),
            )
        except ValidationError:
            continue
        text = json.dumps(summary.to_wire(), separators=(",", ":"))
        if len(text.encode("utf-8")) <= MAX_MESSAGE_BYTES:
            return text
    return None


def write_adapter_summary(manifest: Mapping[str, Any], path: Path | None = None) -> str | None:
    """Global rank 0, after publishing: the summary becomes the container's termination message.

    The operator holds no storage credentials; it fills the FineTuneJob's status.adapter from this
    message when the job succeeds.
    """
    summary = adapter_summary(manifest)
    if summary is not None:
        _write_first(summary, path)
    return summary
