"""Sources: file://, pvc://, s3:// (against a real SeaweedFS) and hf:// error handling."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tests.support.seaweedfs import SeaweedFS

from kubetune_trainer.storage import SourceURI, parse_uri, resolve_source
from kubetune_trainer.termination import SourceError

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
