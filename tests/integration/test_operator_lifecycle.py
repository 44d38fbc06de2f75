"""The operator against the real control plane: `kubetune operator` runs as a subprocess, watching one test
namespace, while the training operator runs the PyTorchJobs on kwok's fake GPU nodes.

kwok decides how a pod ends from annotations on the pod template (hack/kwok/stages.yaml). A FineTuneJob has no
field for pod annotations, so a test that needs a particular ending starts its job suspended, puts the
annotations on the PyTorchJob's pod templates, and resumes it (`start_with_pod_annotations`).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster import REPO_DIR, Cluster, condition, exists, wait_for
from kubernetes import watch
from kubernetes.client.exceptions import ApiException
from tests.builders import a_job
from tests.support.kstatus import kstatus_verdicts

from kubetune.api.v1alpha1 import parse_job
from kubetune.render import build_spec_configmap

pytestmark = pytest.mark.cluster

GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
PTJ = ("kubeflow.org", "v1", "pytorchjobs")
KUBETUNE = REPO_DIR / ".venv" / "bin" / "kubetune"
CHILDREN = "app.kubernetes.io/managed-by=kubetune"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# ------------------------------------------------------------------------------------------ the operator


@dataclass
class Operator:
    """One `kubetune operator` process watching one namespace; it can be killed and started again."""

    cluster: Cluster
    namespace: str
    log: Path
    metrics_port: int
    health_port: int
    process: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    def start(self) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.cluster.kubeconfig),
            "KUBETUNE_NAMESPACES": self.namespace,
            "KUBETUNE_METRICS_PORT": str(self.metrics_port),
            "KUBETUNE_HEALTH_PORT": str(self.health_port),
            "KUBETUNE_PROGRESS_INTERVAL_SECONDS": "1",
            # Stand-in for the pod network: kwok's pod IPs lead nowhere, so progress is read from 127.0.0.1
            # on the job's spec.metrics.port, where a test serves the trainer's /metrics.
            "KUBETUNE_PROGRESS_HOST": "127.0.0.1",
            **self.extra_env,
        }
        with self.log.open("ab") as log:
            self.process = subprocess.Popen([str(KUBETUNE), "operator"], env=env, stdout=log, stderr=log)
        wait_for(self._live, timeout=60, description=f"the operator's liveness endpoint (log: {self.log})")

    def _live(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(
                f"the operator exited {self.process.returncode}:\n{self.log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.health_port}/healthz", timeout=1
            ) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, as when a node dies under the operator."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return str(response.read().decode())


@pytest.fixture
def operator(cluster: Cluster, namespace: str, kubetune_crd: None, tmp_path: Path) -> Iterator[Operator]:
    if not cluster.has_crd("pytorchjobs.kubeflow.org"):
        pytest.skip("this cluster has no Kubeflow training operator")
    running = Operator(cluster, namespace, tmp_path / "operator.log", free_port(), free_port())
    running.start()
    try:
        yield running
    finally:
        # Delete the jobs while the operator runs, so it lifts its finalizer and the namespace can go.
        with contextlib.suppress(ApiException):
            cluster.custom.delete_collection_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        with contextlib.suppress(AssertionError):
            wait_for(
                lambda: not jobs_in(cluster, namespace), timeout=20, description="the jobs to be deleted"
            )
        running.stop()


# ------------------------------------------------------------------------------------------------ helpers


def jobs_in(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cluster.custom.list_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL
    )["items"]
    return items


def a_manifest(name: str, namespace: str, suspend: bool = False, **spec: Any) -> dict[str, Any]:
    manifest = a_job(name).on(nodes=2, gpus=1).with_spec(**spec).as_manifest()
    manifest["metadata"]["namespace"] = namespace
    manifest["spec"].setdefault("runPolicy", {})["suspend"] = suspend
    return manifest


def create(cluster: Cluster, manifest: dict[str, Any]) -> dict[str, Any]:
    created: dict[str, Any] = cluster.custom.create_namespaced_custom_object(
        GROUP, VERSION, manifest["metadata"]["namespace"], PLURAL, manifest
    )
    return created


def read(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    job: dict[str, Any] = cluster.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    return job


def read_pytorchjob(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = cluster.custom.get_namespaced_custom_object(*PTJ[:2], namespace, PTJ[2], name)
    return found


def pytorchjobs(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cluster.custom.list_namespaced_custom_object(
        *PTJ[:2], namespace, PTJ[2], label_selector=CHILDREN
    )["items"]
    return items


def set_suspend(cluster: Cluster, namespace: str, name: str, suspend: bool) -> None:
    cluster.custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name, {"spec": {"runPolicy": {"suspend": suspend}}}
    )


def wait_for_phase(
    cluster: Cluster, namespace: str, name: str, phase: str, timeout: float = 90
) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def reached() -> bool:
        nonlocal last
        last = read(cluster, namespace, name)
        return (last.get("status") or {}).get("phase") == phase

    try:
        wait_for(reached, timeout=timeout, description=f"{namespace}/{name} phase {phase}")
    except AssertionError as error:
        raise AssertionError(f"{error}\n  status now: {json.dumps(last.get('status'), indent=1)}") from None
    return last


def events_of(cluster: Cluster, namespace: str, name: str) -> list[Any]:
    return list(
        cluster.core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.name={name},involvedObject.kind=FineTuneJob"
        ).items
    )


def start_with_pod_annotations(
    cluster: Cluster, manifest: dict[str, Any], annotations: dict[str, str]
) -> None:
    """Creates the job suspended, tells kwok through pod-template annotations how its pods end, resumes it."""
    namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    manifest["spec"].setdefault("runPolicy", {})["suspend"] = True
    create(cluster, manifest)
    pytorchjob = wait_for(
        lambda: read_pytorchjob(cluster, namespace, name), timeout=30, description=f"PyTorchJob {name}"
    )
    replicas = pytorchjob["spec"]["pytorchReplicaSpecs"]
    patch = {
        "spec": {
            "pytorchReplicaSpecs": {
                replica: {"template": {"metadata": {"annotations": annotations}}} for replica in replicas
            }
        }
    }
    cluster.custom.patch_namespaced_custom_object(*PTJ[:2], namespace, PTJ[2], name, patch)
    set_suspend(cluster, namespace, name, False)


class StatusHistory:
    """Every status the API server stored for one job, seen through a watch (no write is missed)."""

    def __init__(self, cluster: Cluster, namespace: str, name: str) -> None:
        self.statuses: list[dict[str, Any]] = []
        self._watch = watch.Watch()
        # The watch starts from a resourceVersion read now, before the job exists, so the writes the
        # operator makes while the thread is still connecting are replayed rather than folded into one
        # ADDED event of the object as it stands by then.
        listed = cluster.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        since = listed["metadata"]["resourceVersion"]
        self._thread = threading.Thread(target=self._run, args=(cluster, namespace, name, since), daemon=True)
        self._thread.start()

    def _run(self, cluster: Cluster, namespace: str, name: str, since: str) -> None:
        with contextlib.suppress(Exception):
            for event in self._watch.stream(
                cluster.custom.list_namespaced_custom_object,
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                field_selector=f"metadata.name={name}",
                resource_version=since,
                timeout_seconds=300,
            ):
                status = event["object"].get("status")
                if status and (not self.statuses or self.statuses[-1] != status):
                    self.statuses.append(status)

    def phases(self) -> list[str]:
        seen: list[str] = []
        for status in self.statuses:
            phase = status.get("phase")
            if phase and (not seen or seen[-1] != phase):
                seen.append(phase)
        return seen

    def stop(self) -> None:
        self._watch.stop()


def status_condition(job: dict[str, Any], kind: str) -> dict[str, Any]:
    found = condition(job, kind)
    assert found is not None, f"no {kind} condition in {job.get('status')}"
    return dict(found)


# -------------------------------------------------------------------------------------------------- tests


def test_a_job_goes_pending_running_succeeded_with_conditions_and_events(
    cluster: Cluster, operator: Operator
) -> None:
    namespace, name = operator.namespace, "lifecycle"
    history = StatusHistory(cluster, namespace, name)
    create(cluster, a_manifest(name, namespace, suspend=True))
    suspended = wait_for_phase(cluster, namespace, name, "Suspended")
    configmap = cluster.core.read_namespaced_config_map(f"{name}-spec", namespace)
    assert configmap.metadata.owner_references[0].uid == suspended["metadata"]["uid"]
    pytorchjob = read_pytorchjob(cluster, namespace, name)
    assert pytorchjob["metadata"]["ownerReferences"][0]["uid"] == suspended["metadata"]["uid"]
    assert pytorchjob["metadata"]["labels"]["kubetune.io/job-name"] == name
    patch = {"kwok.kubetune.io/run-duration": "4s"}
    cluster.custom.patch_namespaced_custom_object(
        *PTJ[:2],
        namespace,
        PTJ[2],
        name,
        {
            "spec": {
                "pytorchReplicaSpecs": {
                    r: {"template": {"metadata": {"annotations": patch}}} for r in ("Master", "Worker")
                }
            }
        },
    )
    set_suspend(cluster, namespace, name, False)

    running = wait_for_phase(cluster, namespace, name, "Running")
    generation = running["metadata"]["generation"]
    assert generation == 2, "suspend and resume are the only spec changes"
    assert status_condition(running, "Ready")["status"] == "False", "Ready means the adapter is published"
    assert status_condition(running, "Reconciling")["status"] == "True"
    assert running["status"]["startTime"]
    assert running["status"]["pytorchJob"] == name

    done = wait_for_phase(cluster, namespace, name, "Succeeded")
    wait_for(
        lambda: history.phases()[-1:] == ["Succeeded"], timeout=10, description="the watch to see Succeeded"
    )
    history.stop()
    assert status_condition(done, "Succeeded")["status"] == "True"
    assert status_condition(done, "Ready")["status"] == "True"
    assert status_condition(done, "Failed")["status"] == "False"
    assert status_condition(done, "Stalled")["status"] == "False"
    assert all(c["observedGeneration"] == generation for c in done["status"]["conditions"])
    assert done["status"]["observedGeneration"] == generation
    assert done["status"]["completionTime"]
    assert done["status"]["gpuSeconds"] > 0

    phases = history.phases()
    assert phases[0] == "Pending", phases
    assert phases[-2:] == ["Running", "Succeeded"], phases

    reasons = {event.reason for event in events_of(cluster, namespace, name)}
    assert {"Suspended", "Running", "Succeeded"} <= reasons


def test_a_failing_trainer_ends_failed_with_its_termination_message(
    cluster: Cluster, operator: Operator
) -> None:
    namespace, name = operator.namespace, "bad-data"
    start_with_pod_annotations(
        cluster,
        a_manifest(name, namespace),
        {
            "kwok.kubetune.io/outcome": "fail",
            "kwok.kubetune.io/exit-code": "1",
            "kwok.kubetune.io/message": "InvalidDataset: the dataset has no column 'output'",
        },
    )
    failed = wait_for_phase(cluster, namespace, name, "Failed")
    assert "InvalidDataset: the dataset has no column 'output'" in failed["status"]["message"]
    assert status_condition(failed, "Failed")["reason"] == "TrainerError"
    assert "no column 'output'" in status_condition(failed, "Failed")["message"]
    stalled = status_condition(failed, "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "TrainerError"
    assert kstatus_verdicts([failed])[0][0] == "Failed", "Flux and kstatus waits fail at once"
    assert failed["status"]["completionTime"]
    # Events are posted after the status write they describe, so the status can be seen first.
    wait_for(
        lambda: any(
            e.type == "Warning" and e.reason == "TrainerError" for e in events_of(cluster, namespace, name)
        ),
        timeout=15,
        description="a Warning event TrainerError",
    )


def test_a_succeeded_job_reports_the_adapter_its_trainer_published(
    cluster: Cluster, operator: Operator, tmp_path: Path
) -> None:
    """The trainer's own summary (kubetune_trainer.termination) of a real publish, set by kwok as the
    termination message of the pods that succeed; the operator never reads storage."""
    from kubetune_trainer.publish import publish
    from kubetune_trainer.termination import adapter_summary

    namespace, name = operator.namespace, "published"
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    (adapter_dir / "adapter_config.json").write_text('{"r": 8}')
    (adapter_dir / "adapter_model.safetensors").write_bytes(b"\0" * 4096)
    uri = f"file://{tmp_path}/published/"
    manifest = publish(adapter_dir, uri)
    summary = adapter_summary(manifest)
    assert summary is not None

    start_with_pod_annotations(
        cluster,
        a_manifest(name, namespace, output={"uri": uri}),
        {"kwok.kubetune.io/outcome": "succeed", "kwok.kubetune.io/message": summary},
    )
    done = wait_for_phase(cluster, namespace, name, "Succeeded")
    published = (tmp_path / "published" / "kubetune-manifest.json").read_bytes()
    assert done["status"]["adapter"] == {
        "uri": uri,
        "files": ["adapter_config.json", "adapter_model.safetensors"],
        "fileCount": 2,
        "sizeBytes": 8 + 4096,
        "sha256": hashlib.sha256(published).hexdigest(),
    }
    assert hashlib.sha256(published).hexdigest() in done["status"]["message"]


def test_an_oom_killed_pod_retried_until_its_backoff_limit_ends_failed_with_reason_oom_killed(
    cluster: Cluster, operator: Operator
) -> None:
    """The training operator deletes and recreates an OOM-killed pod (restartPolicy ExitCode) and, counting
    only container restarts, would do so forever; the operator counts the failures it sees, ends the job
    at spec.runPolicy.backoffLimit with the cause, and stops the pods."""
    namespace, name = operator.namespace, "oom"
    history = StatusHistory(cluster, namespace, name)
    manifest = a_manifest(
        name, namespace, resources={"nodes": 1, "gpusPerNode": 1}, runPolicy={"backoffLimit": 1}
    )
    start_with_pod_annotations(
        cluster,
        manifest,
        {
            "kwok.kubetune.io/outcome": "fail",
            "kwok.kubetune.io/exit-code": "137",
            "kwok.kubetune.io/reason": "OOMKilled",
        },
    )
    failed = wait_for_phase(cluster, namespace, name, "Failed", timeout=120)
    history.stop()
    status = failed["status"]
    assert status_condition(failed, "Failed")["reason"] == "OOMKilled"
    message = status_condition(failed, "Failed")["message"]
    assert f"pod {name}-master-0 failed with OOMKilled, exit code 137" in message
    assert "backoff limit reached after 1 restart(s) (spec.runPolicy.backoffLimit 1)" in message
    assert status["restarts"] == 1
    header, row = cluster.kubectl("-n", namespace, "get", "finetunejob", name).stdout.splitlines()[:2]
    assert row[header.index("RESTARTS") :].split()[0] == "1", "kubectl get shows restarts, as for pods"
    last = status["lastFailure"]
    assert (last["reason"], last["exitCode"], last["pod"]) == ("OOMKilled", 137, f"{name}-master-0")
    assert any(s.get("restarts") == 1 and s.get("phase") == "Running" for s in history.statuses), (
        "the first kill was a restart, seen while the job ran"
    )

    # Then (after the status that says why) the pods are stopped; the PyTorchJob stays, suspended.
    wait_for(
        lambda: read_pytorchjob(cluster, namespace, name)["spec"]["runPolicy"].get("suspend") is True,
        timeout=15,
        description="the PyTorchJob to be suspended",
    )
    wait_for(
        lambda: not cluster.core.list_namespaced_pod(namespace, label_selector=CHILDREN).items,
        timeout=60,
        description="the pods to be stopped",
    )
    # Both pods ran ~1 s on 1 GPU; the first one's time outlives it.
    job = wait_for(
        lambda: (j := read(cluster, namespace, name))["status"].get("gpuSeconds", 0) >= 2 and j,
        timeout=30,
        description="gpuSeconds of both pods",
    )
    assert job["status"]["gpuSecondsOfDeletedPods"] >= 1
    wait_for(
        lambda: (
            [e.reason for e in events_of(cluster, namespace, name) if e.type == "Warning"].count("OOMKilled")
            >= 2
        ),
        timeout=15,
        description="Warning events OOMKilled: one for the restart, one for the failure",
    )

    # A restarted operator resumes every job: this one stays ended.
    operator.kill()
    operator.start()
    time.sleep(3)
    again = read(cluster, namespace, name)
    assert again["status"]["phase"] == "Failed" and again["status"]["restarts"] == 1
    assert read_pytorchjob(cluster, namespace, name)["spec"]["runPolicy"]["suspend"] is True


def test_an_invalid_spec_past_the_schema_ends_stalled_naming_the_field_and_creates_nothing(
    cluster: Cluster, operator: Operator
) -> None:
    namespace = operator.namespace
    manifest = yaml.safe_load(
        (REPO_DIR / "tests" / "data" / "invalid" / "invalid-group-regex.yaml").read_text()
    )
    manifest["metadata"]["namespace"] = namespace
    name = manifest["metadata"]["name"]
    create(cluster, manifest)

    failed = wait_for_phase(cluster, namespace, name, "Failed")
    stalled = status_condition(failed, "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "InvalidSpec"
    assert "spec.training.learningRateGroups[0].match" in stalled["message"]
    wait_for(
        lambda: any(
            e.type == "Warning" and e.reason == "InvalidSpec" for e in events_of(cluster, namespace, name)
        ),
        timeout=15,
        description="a Warning event InvalidSpec",
    )
    time.sleep(2)  # room for a wrong create to show up
    assert not pytorchjobs(cluster, namespace)
    assert not cluster.core.list_namespaced_config_map(namespace, label_selector=CHILDREN).items


def test_suspend_stops_the_pods_and_resume_runs_them_again(cluster: Cluster, operator: Operator) -> None:
    namespace, name = operator.namespace, "pausable"
    start_with_pod_annotations(cluster, a_manifest(name, namespace), {"kwok.kubetune.io/outcome": "run"})
    wait_for_phase(cluster, namespace, name, "Running")

    set_suspend(cluster, namespace, name, True)
    wait_for_phase(cluster, namespace, name, "Suspended")
    assert read_pytorchjob(cluster, namespace, name)["spec"]["runPolicy"]["suspend"] is True
    wait_for(
        lambda: not cluster.core.list_namespaced_pod(namespace, label_selector=CHILDREN).items,
        timeout=60,
        description="the pods to be stopped",
    )

    set_suspend(cluster, namespace, name, False)
    wait_for_phase(cluster, namespace, name, "Running")
    assert read_pytorchjob(cluster, namespace, name)["spec"]["runPolicy"]["suspend"] is False


def test_a_burst_of_new_jobs_gets_every_pytorchjob_before_any_pending_status(
    cluster: Cluster, operator: Operator
) -> None:
    """Four jobs wait when a one-worker operator starts: it creates all their children first, then writes
    their statuses. Orders the API server's writes by resourceVersion, which the test control plane's one
    etcd numbers in sequence."""
    namespace = operator.namespace
    operator.stop()
    operator.extra_env["KUBETUNE_WORKERS"] = "1"
    names = [f"burst-{index}" for index in range(4)]
    for name in names:
        create(cluster, a_manifest(name, namespace, suspend=True))
    listed = cluster.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
    operator.start()
    for name in names:
        wait_for_phase(cluster, namespace, name, "Suspended")

    def revisions(
        group: str, version: str, plural: str, first: Callable[[dict[str, Any]], bool]
    ) -> dict[str, int]:
        """Per object, the resourceVersion of the first event since `listed` for which `first` holds."""
        found: dict[str, int] = {}
        for event in watch.Watch().stream(
            cluster.custom.list_namespaced_custom_object,
            group,
            version,
            namespace,
            plural,
            resource_version=listed["metadata"]["resourceVersion"],
            timeout_seconds=2,
        ):
            if first(event["object"]):
                metadata = event["object"]["metadata"]
                found.setdefault(metadata["name"], int(metadata["resourceVersion"]))
        return found

    first_status = revisions(GROUP, VERSION, PLURAL, lambda job: bool((job.get("status") or {}).get("phase")))
    children = revisions(*PTJ, lambda pytorchjob: True)
    assert sorted(first_status) == sorted(children) == names
    assert max(children.values()) < min(first_status.values()), (
        f"PyTorchJobs created at {children}, first statuses at {first_status}: a status came first"
    )


def test_deleting_the_job_removes_its_pytorchjob_and_configmap(cluster: Cluster, operator: Operator) -> None:
    namespace, name = operator.namespace, "short-lived"
    create(cluster, a_manifest(name, namespace, suspend=True))
    wait_for_phase(cluster, namespace, name, "Suspended")
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    wait_for(
        lambda: (
            not exists(lambda: read_pytorchjob(cluster, namespace, name))
            and not exists(lambda: cluster.core.read_namespaced_config_map(f"{name}-spec", namespace))
        ),
        timeout=60,
        description="the garbage collector to remove the PyTorchJob and the ConfigMap",
    )
    assert not exists(lambda: read(cluster, namespace, name))


def test_a_spec_configmap_left_without_an_owner_is_adopted(cluster: Cluster, operator: Operator) -> None:
    """A crash between creating the ConfigMap and the owner it should carry (or a `kubectl apply` of it) leaves
    one with our labels and no owner: the job adopts it with a merge patch rather than failing on the 409."""
    namespace, name = operator.namespace, "adopts-its-configmap"
    manifest = a_manifest(name, namespace, suspend=True)
    ownerless = build_spec_configmap(parse_job(manifest))  # no uid yet, so no owner reference
    assert "ownerReferences" not in ownerless["metadata"]
    cluster.core.create_namespaced_config_map(namespace, ownerless)
    created = create(cluster, manifest)
    wait_for_phase(cluster, namespace, name, "Suspended")
    owners = cluster.core.read_namespaced_config_map(
        ownerless["metadata"]["name"], namespace
    ).metadata.owner_references
    assert [(o.kind, o.name, o.uid, o.controller) for o in owners or []] == [
        ("FineTuneJob", name, created["metadata"]["uid"], True)
    ]


def test_the_operator_leaves_no_finalizer_and_lifts_the_one_earlier_versions_left(
    cluster: Cluster, operator: Operator
) -> None:
    """A job from before the upgrade carries `kubetune.io/finalizer`; nothing needs it now, and a job whose
    finalizer nobody lifts could never be deleted."""
    namespace = operator.namespace
    create(cluster, a_manifest("new-job", namespace, suspend=True))
    fresh = wait_for_phase(cluster, namespace, "new-job", "Suspended")
    assert not fresh["metadata"].get("finalizers"), fresh["metadata"]
    assert not [key for key in fresh["metadata"].get("annotations") or {} if key.startswith("kubetune.io/")]

    old = a_manifest("from-before", namespace, suspend=True)
    old["metadata"]["finalizers"] = ["kubetune.io/finalizer"]
    create(cluster, old)
    wait_for(
        lambda: not read(cluster, namespace, "from-before")["metadata"].get("finalizers"),
        timeout=30,
        description="the old finalizer to be lifted",
    )
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "from-before")
    wait_for(
        lambda: not exists(lambda: read(cluster, namespace, "from-before")),
        timeout=30,
        description="the job to be deleted",
    )


def test_no_secret_value_reaches_any_object_event_or_log(cluster: Cluster, operator: Operator) -> None:
    namespace, name = operator.namespace, "with-credentials"
    secret_value = "kt-" + os.urandom(12).hex()
    cluster.core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "s3-credentials"},
            "stringData": {
                "AWS_ACCESS_KEY_ID": "access-" + secret_value,
                "AWS_SECRET_ACCESS_KEY": secret_value,
            },
        },
    )
    manifest = a_manifest(name, namespace, storage={"s3": {"credentialsSecret": "s3-credentials"}})
    start_with_pod_annotations(
        cluster,
        manifest,
        {"kwok.kubetune.io/outcome": "fail", "kwok.kubetune.io/message": "SourceUnavailable: AccessDenied"},
    )
    failed = wait_for_phase(cluster, namespace, name, "Failed")
    assert status_condition(failed, "Failed")["reason"] == "StorageAuthFailed"

    serialise = cluster.api_client.sanitize_for_serialization
    texts = {
        "FineTuneJob": json.dumps(failed),
        "PyTorchJob": json.dumps(read_pytorchjob(cluster, namespace, name)),
        "ConfigMap": json.dumps(
            serialise(cluster.core.read_namespaced_config_map(f"{name}-spec", namespace))
        ),
        "pods": json.dumps(serialise(cluster.core.list_namespaced_pod(namespace, label_selector=CHILDREN))),
        "events": json.dumps(serialise(cluster.core.list_namespaced_event(namespace))),
        "operator log": operator.log.read_text(),
    }
    for where, text in texts.items():
        assert secret_value not in text, f"the Secret's value leaked into the {where}"
    assert "s3-credentials" in texts["PyTorchJob"], "the PyTorchJob refers to the Secret by name"


class FakeTrainerMetrics(http.server.BaseHTTPRequestHandler):
    """Serves what the trainer's exporter serves mid-run."""

    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *_: Any) -> None:
        pass


def test_progress_appears_in_status_while_running(cluster: Cluster, operator: Operator) -> None:
    namespace, name = operator.namespace, "progressing"
    labels = f'finetunejob="{name}",method="lora",namespace="{namespace}"'
    FakeTrainerMetrics.body = "\n".join(
        [
            f"kubetune_train_step{{{labels}}} 42",
            f"kubetune_train_total_steps{{{labels}}} 168",
            f"kubetune_train_epoch{{{labels}}} 0.5",
            f"kubetune_train_loss{{{labels}}} 1.5",
            f"kubetune_train_eval_loss{{{labels}}} 1.75",
            f"kubetune_train_learning_rate{{{labels}}} 0.0002",
            f"kubetune_train_tokens_per_second{{{labels}}} 2048",
            f"kubetune_train_eta_seconds{{{labels}}} 600",
            "",
        ]
    ).encode()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeTrainerMetrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        manifest = a_manifest(name, namespace, metrics={"port": server.server_address[1]})
        start_with_pod_annotations(cluster, manifest, {"kwok.kubetune.io/outcome": "run"})
        wait_for_phase(cluster, namespace, name, "Running")
        job = wait_for(
            lambda: (j := read(cluster, namespace, name))["status"].get("progress") and j,
            timeout=30,
            description="status.progress",
        )
    finally:
        server.shutdown()
        server.server_close()
    progress = job["status"]["progress"]
    assert progress["step"] == 42 and progress["totalSteps"] == 168 and progress["percent"] == 25
    assert progress["loss"] == 1.5 and progress["evalLoss"] == 1.75
    assert progress["tokensPerSecond"] == 2048 and progress["etaSeconds"] == 600
    assert progress["learningRate"] == 0.0002 and progress["epoch"] == 0.5
    assert progress["updatedAt"]
    metrics = operator.metrics()
    assert 'kubetune_operator_finetunejobs{phase="Running"} 1.0' in metrics
    assert "kubetune_operator_reconciles_total" in metrics


# ------------------------------------------------------------------------------------------ restart safety


def test_sigkill_at_random_points_leaves_exactly_one_pytorchjob_per_job(
    cluster: Cluster, operator: Operator
) -> None:
    """20 rounds: create jobs, SIGKILL the operator a random moment later, start it again.

    Each round also leaves one job in exactly the state a kill between the two creates leaves: its ConfigMap
    made (as the operator makes it), its PyTorchJob not.
    """
    namespace = operator.namespace
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    names: list[str] = []
    for round_ in range(20):
        batch = [f"chaos-{round_}-{index}" for index in range(2)]
        for name in batch:
            create(cluster, a_manifest(name, namespace, suspend=True))
        time.sleep(rng.uniform(0.0, 0.8))
        operator.kill()
        half_done = f"chaos-{round_}-cm-only"
        created = create(cluster, a_manifest(half_done, namespace, suspend=True))
        cluster.core.create_namespaced_config_map(namespace, build_spec_configmap(parse_job(created)))
        operator.start()
        names += [*batch, half_done]

    for name in names:
        wait_for_phase(cluster, namespace, name, "Suspended", timeout=60)
    owners = sorted(p["metadata"]["labels"]["kubetune.io/job-name"] for p in pytorchjobs(cluster, namespace))
    assert owners == sorted(names), f"seed {seed}: expected one PyTorchJob per job"
    configmaps = cluster.core.list_namespaced_config_map(namespace, label_selector=CHILDREN).items
    assert len(configmaps) == len(names), f"seed {seed}"
    for job in jobs_in(cluster, namespace):
        uid = job["metadata"]["uid"]
        pytorchjob = read_pytorchjob(cluster, namespace, job["metadata"]["name"])
        assert [o["uid"] for o in pytorchjob["metadata"]["ownerReferences"]] == [uid], f"seed {seed}"


# --------------------------------------------------------------------------------------------- API writes


def written_versions(cluster: Cluster, namespace: str) -> dict[str, str]:
    """kind/name -> resourceVersion of everything in the namespace the operator writes: the jobs (and their
    status), the PyTorchJobs, the ConfigMaps, the Events on FineTuneJobs."""
    serialise = cluster.api_client.sanitize_for_serialization
    found: dict[str, str] = {}
    for kind, items in (
        ("FineTuneJob", jobs_in(cluster, namespace)),
        ("PyTorchJob", pytorchjobs(cluster, namespace)),
        ("ConfigMap", serialise(cluster.core.list_namespaced_config_map(namespace).items)),
        (
            "Event",
            serialise(
                cluster.core.list_namespaced_event(
                    namespace, field_selector="involvedObject.kind=FineTuneJob"
                ).items
            ),
        ),
    ):
        for item in items:
            found[f"{kind}/{item['metadata']['name']}"] = item["metadata"]["resourceVersion"]
    return found


def test_a_resync_or_a_restart_that_finds_nothing_changed_writes_nothing(
    cluster: Cluster, operator: Operator
) -> None:
    """Settled (suspended) jobs through resyncs every second and a SIGKILL restart: not one object the
    operator writes changes, no event is posted, and kopf leaves no state of its own on a job."""
    namespace = operator.namespace
    for index in range(3):
        create(cluster, a_manifest(f"settled-{index}", namespace, suspend=True))
    for index in range(3):
        wait_for_phase(cluster, namespace, f"settled-{index}", "Suspended")
    time.sleep(2)  # the events of the Suspended transition go out after the status
    before = written_versions(cluster, namespace)
    assert sum(key.startswith("Event/") for key in before) == 3, before
    time.sleep(4)  # four resyncs at KUBETUNE_PROGRESS_INTERVAL_SECONDS=1
    assert written_versions(cluster, namespace) == before, "a resync wrote"
    operator.kill()
    operator.start()
    time.sleep(4)  # the relist, every job reconciled once, and resyncs after it
    assert written_versions(cluster, namespace) == before, "a restart wrote"
    for job in jobs_in(cluster, namespace):
        assert not job["metadata"].get("finalizers"), job["metadata"]
        assert not job["metadata"].get("annotations"), job["metadata"]


def test_a_job_asking_for_more_gpus_than_any_node_has_says_so_in_the_schedulers_words(
    cluster: Cluster, operator: Operator
) -> None:
    """The real kube-scheduler refuses a 16-GPU pod on the test cluster's 8-GPU nodes; after the operator's
    limit (2 s here, 300 s by default) the job is Pending with reason Unschedulable and the scheduler's
    message, and still Reconciling (waiting, not failed)."""
    operator.stop()
    operator.extra_env["KUBETUNE_UNSCHEDULABLE_AFTER_SECONDS"] = "2"
    operator.start()
    namespace, name = operator.namespace, "too-big"
    manifest = a_job(name).on(nodes=1, gpus=16).as_manifest()
    manifest["metadata"]["namespace"] = namespace
    create(cluster, manifest)

    def unschedulable() -> bool:
        ready = condition(read(cluster, namespace, name), "Ready") or {}
        return ready.get("reason") == "Unschedulable"

    wait_for(unschedulable, timeout=90, description=f"{name}'s Ready reason Unschedulable")
    job = read(cluster, namespace, name)
    assert job["status"]["phase"] == "Pending"
    assert "Insufficient nvidia.com/gpu" in job["status"]["message"], job["status"]["message"]
    assert "spec.resources.gpusPerNode" in job["status"]["message"]
    assert status_condition(job, "Reconciling")["status"] == "True"
    assert status_condition(job, "Stalled")["status"] == "False"
