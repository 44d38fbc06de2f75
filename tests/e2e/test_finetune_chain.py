"""The whole chain as a platform team and an ML engineer meet it.

helm installs the operator; `kubectl apply` of a FineTuneJob makes the operator create a PyTorchJob; the
Kubeflow training operator creates its pods with its env (PET_*, MASTER_ADDR); the scheduler binds them to two
nodes; there torchrun and the kubetune trainer really run (two "nodes" of one CPU process each, DeepSpeed ZeRO-3
over gloo), read the model and data from S3 (SeaweedFS), train, publish the adapter and kubetune-manifest.json;
Prometheus scrapes the trainer; the operator reads the master's termination message and fills status.adapter.

The nodes are stand-in kubelets (tests/support/kubelet.py): no container runtime can run here, so each pod's
container command runs as local processes, everything else (API server, scheduler, controllers, RBAC, the
training operator, torchrun, the trainer, S3, Prometheus) is the real thing. The test prints each hop with a
timestamp (`pytest -s` shows them as they happen, a failure shows them all).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.chain import Platform, Story, a_finetunejob
from tests.support.kubelet import pod_address
from tests.support.operator_chart import GROUP, PLURAL, VERSION, PhaseHistory, say
from tests.support.seaweedfs import free_port

wait_for = pytest.importorskip("tests.integration.cluster", reason="needs the control plane").wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PTJ = ("kubeflow.org", "v1", "pytorchjobs")


def apply(platform: Platform, manifest: dict[str, Any], work: Path) -> None:
    path = work / f"{manifest['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    say(f"kubectl apply -n {platform.namespace} -f {path.name}")
    platform.cluster.kubectl("apply", "-n", platform.namespace, "-f", str(path))


def report(platform: Platform, job: dict[str, Any]) -> str:
    """What to read when the chain broke: the job's status and every log of the nodes."""
    return (
        f"status: {json.dumps(job.get('status'), indent=1)}\n"
        f"{platform.nodes.logs(platform.namespace)[-20000:]}\n"
        f"===== operator\n{platform.operator.log()[-6000:]}"
    )


def wait_for_end(platform: Platform, name: str, timeout: float) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        job: dict[str, Any] = platform.cluster.custom.get_namespaced_custom_object(
            GROUP, VERSION, platform.namespace, PLURAL, name
        )
        return job if job.get("status", {}).get("phase") in ("Succeeded", "Failed") else None

    try:
        result: dict[str, Any] = wait_for(ended, timeout=timeout, description=f"FineTuneJob {name} to end")
    except AssertionError as error:
        job = platform.cluster.custom.get_namespaced_custom_object(
            GROUP, VERSION, platform.namespace, PLURAL, name
        )
        raise AssertionError(f"{error}\n{report(platform, job)}") from None
    return result


def succeeded(
    platform: Platform, name: str, started: float, history: PhaseHistory, story: Story
) -> tuple[dict[str, Any], float]:
    """Wait for the job to end; it must have succeeded. Returns it and the seconds since `started`."""
    job = wait_for_end(platform, name, timeout=600)
    took = time.monotonic() - started
    story.stop()
    history.stop()
    say(f"FineTuneJob {name} {job['status']['phase']} {took:.0f} s after kubectl apply")
    assert job["status"]["phase"] == "Succeeded", report(platform, job)
    return job, took


def s3_object(platform: Platform, key: str) -> bytes:
    body: bytes = platform.s3.client().get_object(Bucket=platform.bucket, Key=key)["Body"].read()
    return body


def assert_adapter_published_and_reported(platform: Platform, job: dict[str, Any], max_steps: int) -> None:
    """The adapter is in S3 as its manifest lists it, and status.adapter names it with the manifest's sha256."""
    name = job["metadata"]["name"]
    prefix = f"adapters/{name}/"
    manifest_bytes = s3_object(platform, prefix + "kubetune-manifest.json")
    manifest = json.loads(manifest_bytes)
    assert manifest["globalStep"] == max_steps
    listing = platform.s3.client().list_objects_v2(Bucket=platform.bucket, Prefix=prefix)["Contents"]
    sizes = {item["Key"][len(prefix) :]: item["Size"] for item in listing}
    for entry in manifest["files"]:
        assert sizes.get(entry["path"]) == entry["size"], (entry, sizes)
    assert any(entry["path"].startswith("adapter_model") for entry in manifest["files"])

    adapter = job["status"].get("adapter")
    assert adapter, f"status.adapter is empty: {job['status']}"
    assert adapter["uri"].rstrip("/") == f"s3://{platform.bucket}/{prefix}".rstrip("/")
    assert adapter["sha256"] == hashlib.sha256(manifest_bytes).hexdigest()
    assert adapter["sizeBytes"] == sum(entry["size"] for entry in manifest["files"])
    say(f"status.adapter: {adapter['uri']} sha256 {adapter['sha256'][:12]}... = sha256 of the manifest in S3")


def running_pods(platform: Platform, name: str) -> dict[str, Any]:
    """The job's pods by name once both run (the worker may be gone once the job ended: cleanPodPolicy)."""
    pods = platform.cluster.core.list_namespaced_pod(
        platform.namespace, label_selector=f"kubetune.io/job-name={name}"
    ).items
    running = {pod.metadata.name: pod for pod in pods if pod.status.phase == "Running"}
    return running if len(running) == 2 else {}


def loss_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("{'loss'")]


def test_a_two_node_zero3_job_trains_from_s3_publishes_its_adapter_and_reports_it(
    platform: Platform, prometheus_factory: Any, tmp_path: Path
) -> None:
    name, max_steps, metrics_port = "chain", 30, free_port()
    namespace = platform.namespace
    # Pod IPs on the stand-in nodes follow from the pod's name, so Prometheus can be told its target now.
    target = f"{pod_address(namespace, f'{name}-master-0')}:{metrics_port}"
    prometheus = prometheus_factory([target])
    say(f"Prometheus scrapes {target} (the master pod's address) every second")
    history = PhaseHistory(platform.cluster, namespace, name)
    story = Story(platform, name)
    started = time.monotonic()

    apply(platform, a_finetunejob(platform, name, max_steps, metrics_port), tmp_path)

    # The operator made the PyTorchJob; the training operator made its two pods, one on each node.
    pods = wait_for(lambda: running_pods(platform, name), timeout=120, description="both pods Running")
    assert sorted(pods) == [f"{name}-master-0", f"{name}-worker-0"]
    assert len({pod.spec.node_name for pod in pods.values()}) == 2, "one pod per node"
    assert {pod.spec.node_name for pod in pods.values()} <= {k.node_name for k in platform.nodes.kubelets}
    worker_env = {e.name: e.value for e in pods[f"{name}-worker-0"].spec.containers[0].env}
    assert worker_env["PET_NNODES"] == "2" and worker_env["PET_NODE_RANK"] == "1"
    assert worker_env["MASTER_ADDR"] == f"{name}-master-0", "a Service, which the stand-in resolves"

    job, took = succeeded(platform, name, started, history, story)
    pytorchjob = platform.cluster.custom.get_namespaced_custom_object(*PTJ[:2], namespace, PTJ[2], name)
    assert any(c["type"] == "Succeeded" and c["status"] == "True" for c in pytorchjob["status"]["conditions"])

    # The trainer trained across both: rank 0 logged every 5th step and published.
    master_log = platform.nodes.log_files(namespace, f"{name}-master-0")[-1].read_text(errors="replace")
    assert len(loss_lines(master_log)) == max_steps // 5, master_log[-3000:]
    assert "published s3://" in master_log

    assert_adapter_published_and_reported(platform, job, max_steps)

    # Prometheus scraped the trainer; PromQL has its loss and its last step.
    loss = prometheus.wait_for(f'last_over_time(kubetune_train_loss{{finetunejob="{name}"}}[10m])')
    value = float(loss[0]["value"][1])
    assert math.isfinite(value) and value > 0
    steps = prometheus.wait_for(f'max_over_time(kubetune_train_step{{finetunejob="{name}"}}[10m])')
    assert float(steps[0]["value"][1]) == max_steps
    say(f"PromQL kubetune_train_loss{{finetunejob={name!r}}} = {value:.3f}; last step scraped {max_steps}")

    # The operator followed it: phases in order and progress read from the master's /metrics at its pod IP.
    assert history.phases[0] == "Pending" and history.phases[-2:] == ["Running", "Succeeded"], history.phases
    progress = [s["progress"] for s in history.statuses if s.get("phase") == "Running" and s.get("progress")]
    assert any(p.get("step", 0) > 0 for p in progress), history.statuses[-3:]
    say(f"e2e {name}: {took:.0f} s from kubectl apply to Succeeded")


def test_a_job_whose_worker_is_oom_killed_resumes_from_its_checkpoint_and_still_succeeds(
    platform: Platform, tmp_path: Path
) -> None:
    """One of the two nodes dies mid-run. The survivor's collective fails (PeerLost, a retryable exit), both
    pods are re-created, meet again, resume from the newest complete checkpoint and finish the job. That is
    one restart, and the status names the worker's OOM kill, not the master's PeerLost."""
    name, max_steps = "resume", 60
    namespace = platform.namespace
    history = PhaseHistory(platform.cluster, namespace, name)
    story = Story(platform, name)
    started = time.monotonic()
    apply(platform, a_finetunejob(platform, name, max_steps, free_port()), tmp_path)

    first = f"adapters/{name}/checkpoints/checkpoint-10/kubetune-checkpoint.json"
    wait_for(lambda: s3_object(platform, first), timeout=400, interval=0.25, description=f"s3://.../{first}")
    say(f"checkpoint-10 complete in S3; SIGKILL every process of {name}-worker-0, as the OOM killer would")
    platform.nodes.kill(namespace, f"{name}-worker-0")

    job, took = succeeded(platform, name, started, history, story)
    say(f"status.restarts {job['status'].get('restarts')}, lastFailure {job['status'].get('lastFailure')}")
    # One lost node, one restart: the master's PeerLost is a consequence of the worker's failure.
    last_failure = job["status"].get("lastFailure") or {}
    assert job["status"].get("restarts") == 1, job["status"]
    assert last_failure.get("reason") == "OOMKilled", job["status"]
    assert last_failure.get("pod") == f"{name}-worker-0", job["status"]

    # The master saw its peer go and exited with the retryable PeerLost code instead of failing the job.
    master_runs = [
        p.read_text(errors="replace") for p in platform.nodes.log_files(namespace, f"{name}-master-0")
    ]
    assert len(master_runs) >= 2, "the master pod was re-created"
    assert "PeerLost" in master_runs[0] and "exiting 200" in master_runs[0], master_runs[0][-3000:]

    # The last run resumed from a checkpoint and counted on from there, not from step 0.
    last = master_runs[-1]
    resumed = re.search(r"resuming from s3://\S+/checkpoint-(\d+)", last)
    assert resumed, last[-3000:]
    resumed_at = int(resumed.group(1))
    assert resumed_at >= 10
    assert len(loss_lines(last)) == (max_steps - resumed_at) // 5, last[-3000:]
    say(f"resumed at step {resumed_at}; the last run trained steps {resumed_at + 1}..{max_steps}")

    assert_adapter_published_and_reported(platform, job, max_steps)
    assert history.phases[-1] == "Succeeded" and "Failed" not in history.phases, history.phases
    say(f"e2e {name}: {took:.0f} s from kubectl apply to Succeeded, one node lost on the way")
