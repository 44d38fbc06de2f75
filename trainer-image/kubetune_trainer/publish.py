"""Publish a trained adapter (or merged model) so that a reader never sees half of it.

Order: remove any old manifest, upload every file, check each landed with its size,
then write ``kubetune-manifest.json`` (files, sizes, sha256, metrics, spec hash) last.
A reader that waits for the manifest and checks the hashes gets a whole adapter or none.

Retries: botocore's ``standard`` mode already retries one request a few times over a
few seconds (throttling, 5xx, dropped connections). A restarting S3 server or a flaky
network is down for longer than that, so each file upload is also wrapped in a
tenacity loop with exponential backoff, jitter and a deadline. Errors that retrying
cannot fix (403, a missing bucket) fail at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tenacity import (
    Retrying,
    before_sleep_log,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from .storage import S3Client, make_s3_client, parse_uri, pvc_root
from .termination import PublishError, SourceError, storage_reason

log = logging.getLogger(__name__)

MANIFEST_NAME = "kubetune-manifest.json"
MANIFEST_FORMAT = 1
PUBLISH_TIMEOUT_ENV = "KUBETUNE_PUBLISH_TIMEOUT_SECONDS"
# An adapter whose tensors hold fewer elements than this share of the trainable
# parameter count is refused. AdaLoRA prunes ranks on save and PiSSA conversion doubles
# them, so the bound is loose; the failure it catches (ZeRO-3 saving ungathered,
# zero-sized shards) is off by orders of magnitude.
MIN_SAVED_FRACTION = 0.25

T = TypeVar("T")

_NON_RETRYABLE_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "NoSuchBucket",
    "InvalidBucketName",
    "403",
    "400",
    "404",
}


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep trying one S3 operation."""

    max_attempts: int = 12
    deadline_seconds: float = field(default_factory=lambda: float(os.environ.get(PUBLISH_TIMEOUT_ENV, "600")))
    initial_wait_seconds: float = 1.0
    max_wait_seconds: float = 30.0


def _retryable(error: BaseException) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        return code not in _NON_RETRYABLE_CODES
    # s3transfer wraps upload failures in S3UploadFailedError; retry when the cause is transient.
    if type(error).__name__ == "S3UploadFailedError":
        return not any(code in str(error) for code in ("AccessDenied", "NoSuchBucket", "InvalidAccessKeyId"))
    return isinstance(error, (BotoCoreError, ConnectionError, TimeoutError))


def with_retries(operation: Callable[[], T], description: str, policy: RetryPolicy) -> T:
    """Run ``operation`` until it succeeds, a non-retryable error, or the policy runs out."""
    retrying = Retrying(
        stop=stop_after_attempt(policy.max_attempts) | stop_after_delay(policy.deadline_seconds),
        wait=wait_exponential(multiplier=policy.initial_wait_seconds, max=policy.max_wait_seconds)
        + wait_random(0, policy.initial_wait_seconds),
        retry=retry_if_exception(_retryable),
        before_sleep=before_sleep_log(log, logging.WARNING),
        reraise=True,
    )
    try:
        return retrying(operation)
    except Exception as error:
        raise PublishError(
            f"{description} failed: {type(error).__name__}: {error}",
            reason=storage_reason(error, PublishError.reason),
        ) from error


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _local_files(local_dir: Path) -> list[Path]:
    files = sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    if not files:
        raise PublishError(f"nothing to publish in {local_dir}")
    return files


def build_manifest(
    local_dir: Path,
    *,
    metrics: Mapping[str, float] | None = None,
    spec_digest: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest for the files under ``local_dir`` (paths relative, sorted)."""
    files = [
        {"path": p.relative_to(local_dir).as_posix(), "size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in _local_files(local_dir)
    ]
    return {
        "format": MANIFEST_FORMAT,
        "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
        "sizeBytes": sum(f["size"] for f in files),
        # One digest for the whole adapter: over the sorted "path sha256" lines.
        "sha256": hashlib.sha256("".join(f"{f['path']} {f['sha256']}\n" for f in files).encode()).hexdigest(),
        "metrics": dict(metrics or {}),
        "specHash": spec_digest,
        **dict(extra or {}),
    }


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header, without loading the tensors (or torch)."""
    with path.open("rb") as handle:
        (header_length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_length))
    return {name: info["shape"] for name, info in header.items() if name != "__metadata__"}


def check_adapter(
    weights_dir: Path, expected_params: int | None, min_fraction: float = MIN_SAVED_FRACTION
) -> int:
    """Refuse weights that are empty or far smaller than the trainable parameter count implies.

    Returns the number of saved elements. ``expected_params`` is the count of trainable
    parameters the run reported (gathered across ZeRO-3 partitions).
    """
    weight_files = sorted(weights_dir.rglob("*.safetensors"))
    if not weight_files:
        raise PublishError(f"no .safetensors weights in {weights_dir}")
    saved = 0
    for weight_file in weight_files:
        for name, shape in safetensors_shapes(weight_file).items():
            count = 1
            for dim in shape:
                count *= dim
            if count == 0:
                raise PublishError(
                    f"tensor {name} in {weight_file.name} is empty (shape {shape}): "
                    "the weights were saved without gathering ZeRO-3 partitions"
                )
            saved += count
    if expected_params and saved < min_fraction * expected_params:
        raise PublishError(
            f"saved weights hold {saved} elements but {expected_params} parameters were trained; "
            "refusing to publish a partial adapter"
        )
    return saved


def _publish_local(files: list[Path], local_dir: Path, target: Path, manifest: dict[str, Any]) -> None:
    target.mkdir(parents=True, exist_ok=True)
    (target / MANIFEST_NAME).unlink(missing_ok=True)
    for path in files:
        destination = target / path.relative_to(local_dir)
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_name(destination.name + ".partial")
        shutil.copyfile(path, partial)
        os.replace(partial, destination)
    partial_manifest = target / (MANIFEST_NAME + ".partial")
    partial_manifest.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(partial_manifest, target / MANIFEST_NAME)


def _publish_s3(
    files: list[Path],
    local_dir: Path,
    bucket: str,
    prefix: str,
    manifest: dict[str, Any],
    client: S3Client,
    policy: RetryPolicy,
) -> None:
    def key_for(relative: str) -> str:
        return f"{prefix}/{relative}" if prefix else relative

    manifest_key = key_for(MANIFEST_NAME)
    with_retries(
        lambda: client.delete_object(Bucket=bucket, Key=manifest_key),
        f"removing the old manifest s3://{bucket}/{manifest_key}",
        policy,
    )
    for path in files:
        key = key_for(path.relative_to(local_dir).as_posix())
        size = path.stat().st_size

        def upload_and_check(path: Path = path, key: str = key, size: int = size) -> None:
            client.upload_file(str(path), bucket, key)
            landed = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
            if landed != size:
                raise ConnectionError(f"s3://{bucket}/{key} has {landed} bytes, expected {size}")

        with_retries(upload_and_check, f"uploading s3://{bucket}/{key}", policy)
        log.info("uploaded s3://%s/%s (%d bytes)", bucket, key, size)
    body = (json.dumps(manifest, indent=2) + "\n").encode()
    with_retries(
        lambda: client.put_object(Bucket=bucket, Key=manifest_key, Body=body, ContentType="application/json"),
        f"writing the manifest s3://{bucket}/{manifest_key}",
        policy,
    )


def publish(
    local_dir: Path,
    destination_uri: str,
    *,
    metrics: Mapping[str, float] | None = None,
    spec_digest: str | None = None,
    extra: Mapping[str, Any] | None = None,
    s3_client: S3Client | None = None,
    policy: RetryPolicy | None = None,
) -> dict[str, Any]:
    """Publish every file under ``local_dir`` to ``destination_uri``, the manifest last; return the manifest."""
    policy = policy or RetryPolicy()
    files = _local_files(local_dir)
    manifest = build_manifest(local_dir, metrics=metrics, spec_digest=spec_digest, extra=extra)
    try:
        target = parse_uri(destination_uri)
    except SourceError as error:
        raise PublishError(str(error)) from error
    if target.scheme == "s3":
        _publish_s3(
            files, local_dir, target.authority, target.path, manifest, s3_client or make_s3_client(), policy
        )
    elif target.scheme == "file":
        _publish_local(files, local_dir, Path(target.path), manifest)
    elif target.scheme == "pvc":
        _publish_local(files, local_dir, pvc_root() / target.authority / target.path, manifest)
    else:
        raise PublishError(f"cannot publish to {destination_uri}: use s3://, pvc:// or file://")
    manifest["uri"] = destination_uri
    log.info("published %d files (%d bytes) to %s", len(files), manifest["sizeBytes"], destination_uri)
    return manifest
