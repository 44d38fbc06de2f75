"""Turn a source URI (``hf://``, ``s3://``, ``pvc://``, ``file://``) into a local path.

Remote sources are downloaded once per node into a cache keyed by the source, its
revision and (for S3) the listing's ETags, so a changed object is fetched again while an
unchanged one is not. Every process of a node calls :func:`resolve_source`; a file lock
makes the first one download while the others wait, then all read the same files.
A lock rather than "local rank 0 downloads, the rest poll a marker" because it also
serialises two jobs sharing a node's cache, and a rank that dies mid-download releases
the lock with its process instead of leaving the others polling until a timeout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from .termination import SourceError, SourceNotFound, SourceTemporarilyUnavailable, storage_reason

# boto3 builds its client classes at run time; there is no static type to name here.
S3Client = Any

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "KUBETUNE_CACHE_DIR"
PVC_ROOT_ENV = "KUBETUNE_PVC_ROOT"
DEFAULT_PVC_ROOT = "/mnt/pvc"
DOWNLOAD_TIMEOUT_ENV = "KUBETUNE_DOWNLOAD_TIMEOUT_SECONDS"
COMPLETE_MARKER = ".kubetune-complete"
SCHEMES = ("hf", "s3", "pvc", "file")


@dataclass(frozen=True)
class SourceURI:
    """A parsed source: ``scheme://authority/path``.

    ``authority`` is the bucket (s3), the claim (pvc), the org (hf); empty for file.
    """

    scheme: str
    authority: str
    path: str

    @property
    def uri(self) -> str:
        if self.scheme == "file":
            return f"file://{self.path}"
        tail = f"/{self.path}" if self.path else ""
        return f"{self.scheme}://{self.authority}{tail}"


def parse_uri(uri: str) -> SourceURI:
    """Split a source URI; a bare path counts as ``file://``."""
    if "://" not in uri:
        return SourceURI("file", "", str(Path(uri).expanduser().absolute()))
    scheme, rest = uri.split("://", 1)
    if scheme not in SCHEMES:
        raise SourceError(f"unsupported URI scheme {scheme!r} in {uri!r}; use one of {', '.join(SCHEMES)}")
    if scheme == "file":
        # file://relative/path (local mode) is relative to the working directory.
        return SourceURI("file", "", str(Path(rest).absolute()))
    authority, _, path = rest.partition("/")
    if not authority:
        raise SourceError(f"URI {uri!r} has no {'bucket' if scheme == 's3' else 'name'}")
    return SourceURI(scheme, authority, path.strip("/"))


def cache_root() -> Path:
    configured = os.environ.get(CACHE_DIR_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "kubetune"


def pvc_root() -> Path:
    return Path(os.environ.get(PVC_ROOT_ENV, DEFAULT_PVC_ROOT))


def make_s3_client(
    endpoint: str | None = None,
    region: str | None = None,
    *,
    max_attempts: int = 5,
    connect_timeout: float = 10.0,
) -> S3Client:
    """A boto3 S3 client for AWS or any S3-compatible server.

    Endpoint and region default to ``AWS_ENDPOINT_URL_S3`` / ``AWS_REGION``; credentials come
    from boto3's own chain (the env the Secret fills). Path-style addressing works with
    every S3-compatible server; botocore's ``standard`` retry mode retries throttling,
    5xx and dropped connections per request.
    """
    import boto3
    from botocore.config import Config

    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    config = Config(
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=connect_timeout,
        read_timeout=60,
        s3={"addressing_style": "path"},
    )
    # A new session, not boto3's process-wide default one, which caches the credentials it first found.
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, config=config)


HUB_ATTEMPTS_ENV = "KUBETUNE_HUB_ATTEMPTS"
HUB_BACKOFF_SECONDS = 2.0
_NOT_FOUND_CODES = ("404", "NoSuchKey", "NoSuchBucket", "NotFound")
_TRANSIENT_CODES = (
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "ServiceUnavailable",
    "InternalError",
    "RequestLimitExceeded",
    "TooManyRequests",
)


def s3_error(message: str, error: Exception) -> SourceError:
    """The SourceError for a boto3 error that outlasted botocore's own retries (standard mode): not found,
    denied (StorageAuthFailed), still unreachable (retryable by the pod's restart policy), or other."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    text = f"{message}: {error}"
    if isinstance(error, ClientError):
        details = error.response.get("Error", {})
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        code = str(details.get("Code", ""))
        if code in _NOT_FOUND_CODES or status == 404:
            return SourceNotFound(text)
        if code in _TRANSIENT_CODES or status == 429 or status >= 500:
            return SourceTemporarilyUnavailable(text)
    elif isinstance(error, ConnectionError | HTTPClientError):
        # Connection refused, reset or closed, read timeouts: what botocore itself retries.
        return SourceTemporarilyUnavailable(text)
    return SourceError(text, reason=storage_reason(error, SourceError.reason))


def hub_error(message: str, error: Exception) -> SourceError:
    """The SourceError for a hub client error: a missing repository, revision or file is not found, a gated
    or unauthorised one is StorageAuthFailed, 5xx, 429 and dropped connections are transient."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    text = f"{message}: {type(error).__name__}: {error}"
    if isinstance(error, LocalEntryNotFoundError | OfflineModeIsEnabled):
        return SourceError(text)  # offline (HF_HUB_OFFLINE) and not in the cache: a setting, not an outage
    if isinstance(error, GatedRepoError):
        return SourceError(text, reason="StorageAuthFailed")
    if isinstance(error, RepositoryNotFoundError | RevisionNotFoundError | EntryNotFoundError):
        return SourceNotFound(text)
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, HfHubHTTPError) and status in (401, 403):
        return SourceError(text, reason="StorageAuthFailed")
    if isinstance(error, HfHubHTTPError) and isinstance(status, int) and (status == 429 or status >= 500):
        return SourceTemporarilyUnavailable(text)
    if isinstance(error, ConnectionError | TimeoutError) or type(error).__name__ in (
        "ConnectError",
        "ReadTimeout",
        "ConnectTimeout",
        "RemoteProtocolError",
        "ReadError",
    ):
        return SourceTemporarilyUnavailable(text)
    return SourceError(text, reason=storage_reason(error, SourceError.reason))


def with_retries(attempt: Any, describe: str, attempts: int, backoff: float = HUB_BACKOFF_SECONDS) -> Any:
    """`attempt()`, again after 2, 4, 8... seconds while it raises SourceTemporarilyUnavailable.

    For the hub: its client retries single requests on some errors, not a whole snapshot; boto3's standard
    retry mode does this per request for S3.
    """
    for number in range(1, attempts):
        try:
            return attempt()
        except SourceTemporarilyUnavailable as error:
            delay = backoff * 2 ** (number - 1)
            log.warning(
                "%s failed (attempt %d of %d), retrying in %.0f s: %s",
                describe,
                number,
                attempts,
                delay,
                error,
            )
            time.sleep(delay)
    try:
        return attempt()
    except SourceTemporarilyUnavailable as error:
        raise SourceTemporarilyUnavailable(f"{error} (gave up after {attempts} attempts)") from error


def _download_timeout() -> float:
    return float(os.environ.get(DOWNLOAD_TIMEOUT_ENV, str(4 * 3600)))


def _cache_entry(key_material: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()[:24]
    return cache_root() / "sources" / digest


def _fill_once(entry: Path, fill: Any, description: str) -> Path:
    """Run ``fill(tmp_dir)`` unless ``entry`` is complete; one process per node does it.

    The files land in a temporary folder first and are renamed into place, so a crash
    mid-download never leaves a cache entry that looks complete.
    """
    data_dir = entry / "data"
    if (entry / COMPLETE_MARKER).exists():
        return data_dir
    entry.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(entry) + ".lock")
    try:
        with lock.acquire(timeout=_download_timeout()):
            if (entry / COMPLETE_MARKER).exists():
                log.info("using cached %s", description)
                return data_dir
            log.info("downloading %s", description)
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=entry.parent))
            try:
                fill(staging)
                if entry.exists():
                    shutil.rmtree(entry)
                entry.mkdir(parents=True)
                staging.rename(data_dir)
                (entry / COMPLETE_MARKER).write_text(description + "\n")
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except Timeout as error:
        raise SourceError(f"timed out waiting for another process to download {description}") from error
    return data_dir


def _s3_listing(client: S3Client, bucket: str, key: str) -> tuple[bool, list[dict[str, Any]]]:
    """(is_single_object, objects) for ``s3://bucket/key``: the object itself or everything under ``key/``."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        if key and not key.endswith("/"):
            try:
                head = client.head_object(Bucket=bucket, Key=key)
                return True, [{"Key": key, "Size": head["ContentLength"], "ETag": head.get("ETag", "")}]
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                    raise
        prefix = f"{key.rstrip('/')}/" if key else ""
        objects: list[dict[str, Any]] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            objects.extend(o for o in page.get("Contents", []) if not o["Key"].endswith("/"))
    except (BotoCoreError, ClientError) as error:
        raise s3_error(f"cannot list s3://{bucket}/{key}", error) from error
    if not objects:
        raise SourceNotFound(f"s3://{bucket}/{key} does not exist or is empty")
    return False, objects


def _resolve_s3(source: SourceURI, revision: str | None, client: S3Client | None) -> Path:
    from botocore.exceptions import BotoCoreError, ClientError

    client = client or make_s3_client()
    single, objects = _s3_listing(client, source.authority, source.path)
    listing = sorted((o["Key"], o.get("ETag", ""), o["Size"]) for o in objects)
    entry = _cache_entry({"uri": source.uri, "revision": revision, "listing": listing})
    prefix = "" if single else (f"{source.path.rstrip('/')}/" if source.path else "")

    def fill(target: Path) -> None:
        for obj in objects:
            relative = Path(obj["Key"]).name if single else obj["Key"][len(prefix) :]
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            try:
                client.download_file(source.authority, obj["Key"], str(destination))
            except (BotoCoreError, ClientError) as error:
                raise s3_error(f"cannot download s3://{source.authority}/{obj['Key']}", error) from error

    data_dir = _fill_once(entry, fill, source.uri)
    return data_dir / Path(source.path).name if single else data_dir


def _resolve_hf(source: SourceURI, revision: str | None, repo_type: str) -> Path:
    """``hf://org/name[/subfolder]`` through the hub client (honours HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE)."""
    parts = source.path.split("/", 1)
    if not parts[0]:
        raise SourceError(f"hf URI needs org/name: {source.uri!r}")
    repo_id = f"{source.authority}/{parts[0]}"
    subfolder = parts[1] if len(parts) > 1 else ""
    entry = _cache_entry({"uri": f"hf://{repo_id}", "revision": revision or "main", "type": repo_type})

    def download(target: Path) -> None:
        from huggingface_hub import snapshot_download

        try:
            snapshot_download(
                repo_id=repo_id, repo_type=repo_type, revision=revision or None, local_dir=str(target)
            )
        except Exception as error:  # the hub client raises many unrelated types
            raise hub_error(f"cannot download {source.uri}", error) from error

    def fill(target: Path) -> None:
        attempts = int(os.environ.get(HUB_ATTEMPTS_ENV, "5"))
        with_retries(lambda: download(target), f"downloading {source.uri}", attempts)

    data_dir = _fill_once(entry, fill, f"{source.uri}@{revision or 'main'}")
    return data_dir / subfolder if subfolder else data_dir


def resolve_source(
    uri: str, revision: str | None = None, *, s3_client: S3Client | None = None, hub_repo_type: str = "model"
) -> Path:
    """Return a local path holding what ``uri`` names, downloading it (once per node) if needed.

    ``hub_repo_type`` tells the Hub whether an ``hf://`` URI names a model or a dataset.
    """
    source = parse_uri(uri)
    if source.scheme == "file":
        path = Path(source.path)
    elif source.scheme == "pvc":
        path = pvc_root() / source.authority / source.path
    elif source.scheme == "s3":
        path = _resolve_s3(source, revision, s3_client)
    else:
        path = _resolve_hf(source, revision, hub_repo_type)
    if not path.exists():
        raise SourceNotFound(f"{uri} resolves to {path}, which does not exist")
    return path
