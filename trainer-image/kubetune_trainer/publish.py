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
    weight_files = sorted(weights_dir.glob("*.safetensors"))
    if not weight_files:
        raise PublishError(f"no .safetensors weights in {weights_dir}")
    saved = 0
    for weight_file in weight_files:
        for name, shape in safetensors_shapes(weight_file).items():
            count = 1
            for dim in shape:
                count *= dim
            # ZeRO-3 leaves a 1-D, zero-sized placeholder where a partitioned weight was not
            # gathered. (A 2-D tensor with one zero dimension is AdaLoRA pruning a rank to 0.)
            if count == 0 and len(shape) <= 1:
                raise PublishError(
                    f"tensor {name} in {weight_file.name} is empty (shape {shape}): "
                    "the weights were saved without gathering ZeRO-3 partitions"
                )
            saved += count
    if saved == 0:
        raise PublishError(f"every tensor in {weights_dir} is empty")
    if expected_params and saved < min_fraction * expected_params:
        raise PublishError(
            f"saved weights hold {saved} elements but {expected_params} parameters were trained; "
            "refusing to publish a partial adapter"
        )
    return saved


class Destination:
    """A folder to write to: a local (or PVC-mounted) path, or an S3 prefix.

    Every S3 call goes through :func:`with_retries`; local writes go to a ``.partial``
    name first and are renamed, so a reader never sees half a file.
    """

    def __init__(
        self, uri: str, *, s3_client: S3Client | None = None, policy: RetryPolicy | None = None
    ) -> None:
        try:
            target = parse_uri(uri)
        except SourceError as error:
            raise PublishError(str(error)) from error
        self.uri = uri.rstrip("/")
        self.policy = policy or RetryPolicy()
        self.bucket = self.prefix = ""
        self.path: Path | None = None
        self._client = s3_client
        if target.scheme == "s3":
            self.bucket, self.prefix = target.authority, target.path
        elif target.scheme == "file":
            self.path = Path(target.path)
        elif target.scheme == "pvc":
            self.path = pvc_root() / target.authority / target.path
        else:
            raise PublishError(f"cannot write to {uri}: use s3://, pvc:// or file://")

    @property
    def client(self) -> S3Client:
        if self._client is None:
            self._client = make_s3_client()
        return self._client

    def _key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def put_file(self, local: Path, relative: str) -> None:
        if self.path is not None:
            destination = self.path / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            partial = destination.with_name(destination.name + ".partial")
            shutil.copyfile(local, partial)
            os.replace(partial, destination)
            return
        key, size = self._key(relative), local.stat().st_size

        def upload_and_check() -> None:
            self.client.upload_file(str(local), self.bucket, key)
            landed = self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"]
            if landed != size:
                raise ConnectionError(f"s3://{self.bucket}/{key} has {landed} bytes, expected {size}")

        with_retries(upload_and_check, f"uploading s3://{self.bucket}/{key}", self.policy)
        log.info("uploaded s3://%s/%s (%d bytes)", self.bucket, key, size)

    def put_json(self, relative: str, document: Mapping[str, Any]) -> bytes:
        """Write the document; return the bytes written (their sha256 is what a reader can check)."""
        body = (json.dumps(document, indent=2) + "\n").encode()
        if self.path is not None:
            target = self.path / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            partial.write_bytes(body)
            os.replace(partial, target)
            return body
        key = self._key(relative)
        with_retries(
            lambda: self.client.put_object(
                Bucket=self.bucket, Key=key, Body=body, ContentType="application/json"
            ),
            f"writing s3://{self.bucket}/{key}",
            self.policy,
        )
        return body

    def get_json(self, relative: str) -> Any:
        """The parsed document, or None when it does not exist."""
        if self.path is not None:
            target = self.path / relative
            return json.loads(target.read_text()) if target.exists() else None
        from botocore.exceptions import ClientError

        key = self._key(relative)

        def read() -> Any:
            try:
                return json.loads(self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read())
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise

        return with_retries(read, f"reading s3://{self.bucket}/{key}", self.policy)

    def delete(self, relative: str) -> None:
        """Delete one file, or everything under a folder when ``relative`` ends with '/'."""
        if self.path is not None:
            target = self.path / relative
            if relative.endswith("/"):
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
            return
        key = self._key(relative)
        if not relative.endswith("/"):
            with_retries(
                lambda: self.client.delete_object(Bucket=self.bucket, Key=key),
                f"deleting s3://{self.bucket}/{key}",
                self.policy,
            )
            return
        for sub in self._list_keys(key):
            self._delete_key(sub)

    def _delete_key(self, key: str) -> None:
        with_retries(
            lambda: self.client.delete_object(Bucket=self.bucket, Key=key),
            f"deleting s3://{self.bucket}/{key}",
            self.policy,
        )

    def _list_keys(self, prefix: str) -> list[str]:
        def listing() -> list[str]:
            keys: list[str] = []
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            ):
                keys.extend(o["Key"] for o in page.get("Contents", []))
            return keys

        return with_retries(listing, f"listing s3://{self.bucket}/{prefix}", self.policy)

    def folders(self) -> list[str]:
        """Names of the immediate sub-folders."""
        if self.path is not None:
            return sorted(p.name for p in self.path.iterdir() if p.is_dir()) if self.path.exists() else []
        base = self._key("")
        names = {
            key[len(base) :].split("/", 1)[0] for key in self._list_keys(base) if "/" in key[len(base) :]
        }
        return sorted(names)


def upload_folder(local_dir: Path, destination: Destination, under: str = "") -> list[Path]:
    """Copy every file under ``local_dir`` (the manifest excepted) to ``destination/under``."""
    files = _local_files(local_dir)
    for path in files:
        relative = path.relative_to(local_dir).as_posix()
        destination.put_file(path, f"{under.rstrip('/')}/{relative}" if under else relative)
    return files


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
    """Publish every file under ``local_dir`` to ``destination_uri``, the manifest last; return the manifest
    with ``uri`` and ``manifestSha256`` (of the manifest's bytes as published) added.

    An old manifest goes first, so that while files are being replaced no manifest
    vouches for a mix of old and new files.
    """
    manifest = build_manifest(local_dir, metrics=metrics, spec_digest=spec_digest, extra=extra)
    destination = Destination(destination_uri, s3_client=s3_client, policy=policy)
    destination.delete(MANIFEST_NAME)
    files = upload_folder(local_dir, destination)
    published = destination.put_json(MANIFEST_NAME, manifest)
    manifest["uri"] = destination_uri
    manifest["manifestSha256"] = hashlib.sha256(published).hexdigest()
    log.info("published %d files (%d bytes) to %s", len(files), manifest["sizeBytes"], destination_uri)
    return manifest
