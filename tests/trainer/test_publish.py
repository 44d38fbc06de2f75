"""Atomic publishing: files first, the manifest last, retries through an S3 outage,
and no publishing of empty or partial adapters."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from tests.support.seaweedfs import SeaweedFS

from kubetune_trainer.publish import MANIFEST_NAME, RetryPolicy, check_adapter, publish
from kubetune_trainer.termination import PublishError

pytestmark = pytest.mark.trainer

FAST_RETRIES = RetryPolicy(max_attempts=30, deadline_seconds=60, initial_wait_seconds=0.2, max_wait_seconds=1)


def an_adapter(folder: Path, *, rank: int = 4, hidden: int = 64, empty: bool = False) -> Path:
    """A peft-shaped adapter folder: safetensors weights, a config and a tokenizer file."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    shape_a = (0,) if empty else (rank, hidden)
    shape_b = (0,) if empty else (hidden, rank)
    tensors = {
        f"base_model.model.layers.{i}.q_proj.lora_{name}.weight": torch.randn(shape)
        for i in range(2)
        for name, shape in (("A", shape_a), ("B", shape_b))
    }
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_check_adapter_counts_saved_elements_and_refuses_empty_or_partial_weights(tmp_path: Path) -> None:
    good = an_adapter(tmp_path / "good")
    (tmp_path / "nothing").mkdir()
    assert check_adapter(good, expected_params=2 * 2 * 4 * 64) == 2 * 2 * 4 * 64
    with pytest.raises(PublishError, match="is empty"):
        check_adapter(an_adapter(tmp_path / "empty", empty=True), expected_params=1024)
    with pytest.raises(PublishError, match="partial adapter"):
        check_adapter(good, expected_params=100 * 1024)
    with pytest.raises(PublishError, match=r"no \.safetensors"):
        check_adapter((tmp_path / "nothing").resolve(), expected_params=None)


def test_publish_to_a_folder_writes_files_then_a_manifest_with_sizes_and_hashes(tmp_path: Path) -> None:
    adapter = an_adapter(tmp_path / "adapter")
    target = tmp_path / "out"
    target.mkdir()
    (target / MANIFEST_NAME).write_text('{"stale": true}')
    manifest = publish(adapter, f"file://{target}", metrics={"eval_loss": 1.5}, spec_digest="0" * 64)

    on_disk = json.loads((target / MANIFEST_NAME).read_text())
    assert on_disk["files"] == manifest["files"]
    assert {f["path"] for f in on_disk["files"]} == {
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
    }
    for entry in on_disk["files"]:
        content = (target / entry["path"]).read_bytes()
        assert entry["size"] == len(content)
        assert entry["sha256"] == hashlib.sha256(content).hexdigest()
    assert on_disk["metrics"] == {"eval_loss": 1.5}
    assert on_disk["specHash"] == "0" * 64
    assert not list(target.glob("*.partial"))


def record_s3_calls(client: Any) -> list[tuple[str, str]]:
    """(operation, key) of every successful S3 call made through ``client``, in order."""
    calls: list[tuple[str, str]] = []

    def remember_key(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        context["test_key"] = params.get("Key", "")

    def after_call(model: Any, context: dict[str, Any], http_response: Any, **_: Any) -> None:
        if http_response.status_code < 300:
            calls.append((model.name, context.get("test_key", "")))

    client.meta.events.register("before-parameter-build.s3", remember_key)
    client.meta.events.register("after-call.s3", after_call)
    return calls


def test_s3_publish_round_trip(s3_env: SeaweedFS, tmp_path: Path) -> None:
    adapter = an_adapter(tmp_path / "adapter")
    bucket = s3_env.new_bucket("adapters")
    manifest = publish(adapter, f"s3://{bucket}/jobs/demo", metrics={"loss": 0.5}, spec_digest="abc")

    client = s3_env.client()
    stored = json.loads(client.get_object(Bucket=bucket, Key=f"jobs/demo/{MANIFEST_NAME}")["Body"].read())
    assert stored["sha256"] == manifest["sha256"]
    for entry in stored["files"]:
        body = client.get_object(Bucket=bucket, Key=f"jobs/demo/{entry['path']}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == entry["sha256"]


def test_s3_publish_retries_through_an_outage_and_writes_the_manifest_only_after_every_file(
    s3_env: SeaweedFS, tmp_path: Path
) -> None:
    adapter = an_adapter(tmp_path / "adapter")
    bucket = s3_env.new_bucket("outage")
    client = s3_env.client(max_attempts=1)
    calls = record_s3_calls(client)
    outage = threading.Event()
    restarted: list[threading.Thread] = []

    def stop_server_after_first_upload(model: Any, **_: Any) -> None:
        if model.name == "PutObject" and not outage.is_set():
            outage.set()
            s3_env.stop()  # connections are refused until the restart below finishes
            restarted.append(threading.Thread(target=s3_env.start))
            restarted[0].start()

    client.meta.events.register("after-call.s3.PutObject", stop_server_after_first_upload)
    publish(adapter, f"s3://{bucket}/demo", s3_client=client, policy=FAST_RETRIES)
    restarted[0].join()

    puts = [key for operation, key in calls if operation == "PutObject"]
    assert puts[-1] == f"demo/{MANIFEST_NAME}" and puts.count(f"demo/{MANIFEST_NAME}") == 1
    assert {f"demo/{p.name}" for p in adapter.iterdir()} <= set(puts[:-1])
    listed = {o["Key"] for o in s3_env.client().list_objects_v2(Bucket=bucket)["Contents"]}
    assert listed == {f"demo/{p.name}" for p in adapter.iterdir()} | {f"demo/{MANIFEST_NAME}"}


def test_s3_publish_that_cannot_finish_leaves_no_manifest(s3_env: SeaweedFS, tmp_path: Path) -> None:
    from botocore.exceptions import EndpointConnectionError

    adapter = an_adapter(tmp_path / "adapter")
    bucket = s3_env.new_bucket("down")
    client = s3_env.client(max_attempts=1)
    uploads = 0

    def network_gone_after_first_file(**_: Any) -> None:
        nonlocal uploads
        uploads += 1
        if uploads > 1:
            raise EndpointConnectionError(endpoint_url=s3_env.endpoint)

    client.meta.events.register("before-send.s3.PutObject", network_gone_after_first_file)
    policy = RetryPolicy(max_attempts=3, deadline_seconds=5, initial_wait_seconds=0.1, max_wait_seconds=0.2)
    with pytest.raises(PublishError, match="EndpointConnectionError"):
        publish(adapter, f"s3://{bucket}/demo", s3_client=client, policy=policy)
    listed = {o["Key"] for o in s3_env.client().list_objects_v2(Bucket=bucket).get("Contents", [])}
    assert len(listed) == 1 and f"demo/{MANIFEST_NAME}" not in listed


def test_s3_publish_to_a_missing_bucket_fails_without_retrying(s3_env: SeaweedFS, tmp_path: Path) -> None:
    adapter = an_adapter(tmp_path / "adapter")
    started = time.monotonic()
    with pytest.raises(PublishError, match="NoSuchBucket"):
        publish(adapter, "s3://no-such-bucket-kubetune/x", policy=FAST_RETRIES)
    assert time.monotonic() - started < 10
