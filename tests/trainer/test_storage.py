"""Sources: file://, pvc://, s3:// (against a real SeaweedFS) and hf:// error handling."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support.faults import FaultyProxy, faulty_proxy
from tests.support.seaweedfs import SeaweedFS

from kubetune_trainer.storage import SourceURI, hub_error, parse_uri, resolve_source, with_retries
from kubetune_trainer.termination import (
    EXIT_TRANSIENT,
    SourceError,
    SourceNotFound,
    SourceTemporarilyUnavailable,
    reason_for,
)

pytestmark = pytest.mark.trainer


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/models/llama", SourceURI("s3", "bucket", "models/llama")),
        ("s3://bucket/", SourceURI("s3", "bucket", "")),
        ("pvc://models/llama/7b/", SourceURI("pvc", "models", "llama/7b")),
        ("hf://Qwen/Qwen2.5-0.5B", SourceURI("hf", "Qwen", "Qwen2.5-0.5B")),
        ("file:///data/train.jsonl", SourceURI("file", "", "/data/train.jsonl")),
    ],
)
def test_source_uris_parse_into_scheme_authority_and_path(uri: str, expected: SourceURI) -> None:
    assert parse_uri(uri) == expected


def test_relative_file_uris_are_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_uri("file://examples/model") == SourceURI("file", "", str(tmp_path / "examples" / "model"))


@pytest.mark.parametrize("uri", ["gs://bucket/x", "s3:///no-bucket"])
def test_unsupported_or_malformed_uris_are_refused_with_the_uri_in_the_message(uri: str) -> None:
    with pytest.raises(SourceError, match="URI"):
        parse_uri(uri)


def test_file_and_pvc_sources_resolve_to_local_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    assert resolve_source(f"file://{data}") == data
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path / "pvc"))
    (tmp_path / "pvc" / "claim" / "models").mkdir(parents=True)
    assert resolve_source("pvc://claim/models") == tmp_path / "pvc" / "claim" / "models"
    with pytest.raises(SourceError, match="does not exist"):
        resolve_source("pvc://claim/missing")


def test_hf_source_without_a_reachable_hub_fails_with_a_source_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError, match="hf://kubetune-test/no-such-model") as error:
        resolve_source("hf://kubetune-test/no-such-model", "main")
    assert error.value.reason == "SourceUnavailable"


def test_s3_prefix_and_single_object_download_once_and_refresh_when_changed(s3_env: SeaweedFS) -> None:
    client = s3_env.client()
    bucket = s3_env.new_bucket("models")
    client.put_object(Bucket=bucket, Key="tiny/config.json", Body=b'{"a": 1}')
    client.put_object(Bucket=bucket, Key="tiny/weights/part-0.bin", Body=b"0" * 1000)
    client.put_object(Bucket=bucket, Key="data/train.jsonl", Body=b'{"text": "x"}\n')

    model_dir = resolve_source(f"s3://{bucket}/tiny", "v1")
    assert (model_dir / "config.json").read_bytes() == b'{"a": 1}'
    assert (model_dir / "weights" / "part-0.bin").stat().st_size == 1000
    single = resolve_source(f"s3://{bucket}/data/train.jsonl")
    assert single.name == "train.jsonl" and single.read_text() == '{"text": "x"}\n'

    # Unchanged: served from the cache (same folder, not fetched again).
    marker = model_dir / "config.json"
    os.utime(marker, (1, 1))
    assert resolve_source(f"s3://{bucket}/tiny", "v1") == model_dir
    assert marker.stat().st_mtime == 1
    # Changed object: a new cache entry with the new content.
    client.put_object(Bucket=bucket, Key="tiny/config.json", Body=b'{"a": 2}')
    refreshed = resolve_source(f"s3://{bucket}/tiny", "v1")
    assert refreshed != model_dir and (refreshed / "config.json").read_bytes() == b'{"a": 2}'


def test_s3_missing_prefix_is_a_source_error(s3_env: SeaweedFS) -> None:
    bucket = s3_env.new_bucket("empty")
    with pytest.raises(SourceError, match="does not exist or is empty"):
        resolve_source(f"s3://{bucket}/nothing-here")


def test_processes_of_one_node_download_a_source_once(s3_env: SeaweedFS, tmp_path: Path) -> None:
    client = s3_env.client()
    bucket = s3_env.new_bucket("shared")
    for index in range(4):
        client.put_object(Bucket=bucket, Key=f"model/shard-{index}.bin", Body=os.urandom(200_000))
    script = textwrap.dedent(
        f"""
        import logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
        from kubetune_trainer.storage import resolve_source
        print("path", resolve_source("s3://{bucket}/model"))
        """
    )
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            env={**os.environ, "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(3)
    ]
    outputs = [process.communicate(timeout=120)[0] for process in ranks]
    assert all(process.returncode == 0 for process in ranks), outputs
    assert sum(output.count("downloading s3://") for output in outputs) == 1, outputs
    paths = {line for output in outputs for line in output.splitlines() if line.startswith("path ")}
    assert len(paths) == 1


def test_wrong_s3_credentials_fail_with_the_storage_auth_reason(
    s3_env: SeaweedFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = s3_env.new_bucket("auth")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(SourceError) as error:
        resolve_source(f"s3://{bucket}/model")
    assert error.value.reason == "StorageAuthFailed", str(error.value)


@pytest.fixture
def flaky_s3(s3_env: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[SeaweedFS, FaultyProxy]]:
    """The trainer's S3 endpoint pointed at a proxy in front of the real SeaweedFS that breaks on command."""
    with faulty_proxy(s3_env.endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        yield s3_env, proxy


def test_a_model_download_survives_dropped_connections_and_throttling(
    flaky_s3: tuple[SeaweedFS, FaultyProxy],
) -> None:
    s3, proxy = flaky_s3
    bucket = s3.new_bucket("flaky")
    s3.client().put_object(Bucket=bucket, Key="model/config.json", Body=b'{"a": 1}')
    proxy.reset(2)
    folder = resolve_source(f"s3://{bucket}/model")
    assert (folder / "config.json").read_bytes() == b'{"a": 1}'
    assert proxy.broken == 2
    proxy.unavailable(2)
    s3.client().put_object(Bucket=bucket, Key="model/config.json", Body=b'{"a": 2}')
    assert (resolve_source(f"s3://{bucket}/model") / "config.json").read_bytes() == b'{"a": 2}'
    assert proxy.broken == 4


@pytest.mark.parametrize("fault", ["reset", "unavailable"])
def test_an_s3_outage_that_outlasts_the_retries_exits_with_a_code_the_restart_policy_retries(
    flaky_s3: tuple[SeaweedFS, FaultyProxy], fault: str
) -> None:
    s3, proxy = flaky_s3
    bucket = s3.new_bucket("outage")
    s3.client().put_object(Bucket=bucket, Key="model/config.json", Body=b"{}")
    getattr(proxy, fault)(None)
    with pytest.raises(SourceTemporarilyUnavailable) as error:
        resolve_source(f"s3://{bucket}/model")
    assert error.value.reason == "SourceUnavailable"
    assert reason_for(error.value) == ("SourceUnavailable", EXIT_TRANSIENT)
    assert EXIT_TRANSIENT >= 128, "restartPolicy ExitCode retries 128 and up"
    assert proxy.broken >= 5, "retried: botocore standard mode makes up to 5 attempts per request"


def test_a_missing_object_or_bucket_fails_once_as_source_not_found(s3_env: SeaweedFS) -> None:
    bucket = s3_env.new_bucket("missing")
    for uri in (f"s3://{bucket}/no/such/model", f"s3://no-such-bucket-{bucket}/model"):
        with pytest.raises(SourceNotFound) as error:
            resolve_source(uri)
        assert reason_for(error.value)[1] == 1, "exit 1: the restart policy does not retry it"


def test_a_missing_claim_folder_is_source_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path))
    with pytest.raises(SourceNotFound, match="pvc://claim/model"):
        resolve_source("pvc://claim/model")


def test_the_hub_is_retried_with_backoff_while_unavailable_and_then_succeeds() -> None:
    calls: list[int] = []

    def attempt() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise SourceTemporarilyUnavailable("503")
        return "done"

    assert with_retries(attempt, "downloading hf://org/model", attempts=5, backoff=0.01) == "done"
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(SourceTemporarilyUnavailable, match="gave up after 2 attempts"):
        with_retries(lambda: attempt() and attempt(), "x", attempts=2, backoff=0.01)


def test_a_hub_error_is_classified_as_not_found_denied_or_transient() -> None:
    import httpx2 as httpx  # the HTTP client huggingface_hub 2 is built on
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    def http_error(kind: type[HfHubHTTPError], status: int) -> HfHubHTTPError:
        response = httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/api/models/x"))
        return kind(f"{status}", response=response)

    assert isinstance(hub_error("x", http_error(RepositoryNotFoundError, 404)), SourceNotFound)
    assert hub_error("x", http_error(HfHubHTTPError, 403)).reason == "StorageAuthFailed"
    assert isinstance(hub_error("x", http_error(HfHubHTTPError, 503)), SourceTemporarilyUnavailable)
    assert isinstance(hub_error("x", http_error(HfHubHTTPError, 429)), SourceTemporarilyUnavailable)
    assert isinstance(hub_error("x", ConnectionResetError("reset by peer")), SourceTemporarilyUnavailable)
    assert type(hub_error("x", ValueError("bad"))) is SourceError
