"""The test control plane is the real thing: the training operator runs PyTorchJobs on kwok's fake GPU nodes,
garbage collection deletes owned objects, and the API server itself judges FineTuneJobs against the generated CRD.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster import REPO_DIR, Cluster, condition, exists, wait_for, wait_for_condition
from kubernetes import client
from kubernetes.client.exceptions import ApiException

pytestmark = pytest.mark.cluster

KUBETUNE_CRD = REPO_DIR / "crds" / "kubetune.io_finetunejobs.yaml"
EXAMPLES = sorted((REPO_DIR / "examples").glob("*.yaml"))
INVALID = sorted((REPO_DIR / "tests" / "data" / "invalid").glob("*.yaml"))
PYTORCHJOB_CRD = "pytorchjobs.kubeflow.org"


def versions() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in (REPO_DIR / "hack" / "versions.env").read_text().splitlines())
    return {
        key.strip(): value.strip()
        for key, value in (p for p in pairs if len(p) == 2 and not p[0].startswith("#"))
    }


def a_pytorchjob(
    name: str, container: str = "pytorch", annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    """A minimal PyTorchJob, one Master and one Worker, each asking for 8 GPUs."""

    def replica() -> dict[str, Any]:
        return {
            "replicas": 1,
            "restartPolicy": "Never",
            "template": {
                "metadata": {"annotations": annotations or {}},
                "spec": {
                    "containers": [
                        {
                            "name": container,
                            "image": "docker.io/library/python:3.11-slim",
                            "command": ["python", "-c", "print('trained')"],
                            "resources": {
                                "limits": {"nvidia.com/gpu": "8"},
                                "requests": {"nvidia.com/gpu": "8"},
                            },
                        }
                    ]
                },
            },
        }

    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name},
        "spec": {"pytorchReplicaSpecs": {"Master": replica(), "Worker": replica()}},
    }


@pytest.fixture
def training_operator(cluster: Cluster) -> Cluster:
    if not cluster.has_crd(PYTORCHJOB_CRD):
        pytest.skip(f"this cluster has no {PYTORCHJOB_CRD} (the Kubeflow training operator is not installed)")
    return cluster


@pytest.fixture
def kwok_gpu_nodes(training_operator: Cluster) -> Cluster:
    """The training operator plus kwok's fake GPU nodes, whose pods end as their annotations say."""
    if not training_operator.core.list_node(label_selector="type=kwok").items:
        pytest.skip("this cluster has no kwok nodes (label type=kwok) to run pods without real GPUs")
    return training_operator


# ---------------------------------------------------------------------------------------------- the cluster


def test_the_control_plane_runs_the_pinned_kubernetes_release(cluster: Cluster) -> None:
    if cluster.external:
        pytest.skip("an existing cluster runs whatever release it runs")
    assert cluster.version.get_code().git_version == versions()["KUBERNETES_VERSION"]


def test_kwok_runs_ready_fake_nodes_with_eight_gpus_each(cluster: Cluster) -> None:
    if cluster.external:
        pytest.skip("only the local control plane has kwok nodes")
    nodes = cluster.core.list_node(label_selector="type=kwok").items
    assert len(nodes) == 4
    for node in nodes:
        assert node.status.allocatable["nvidia.com/gpu"] == "8"
        assert condition(node.to_dict(), "Ready")["status"] == "True"


def test_kubectl_from_the_venv_talks_to_the_cluster(cluster: Cluster) -> None:
    result = cluster.kubectl("get", "namespaces", "-o", "json")
    names = {item["metadata"]["name"] for item in json.loads(result.stdout)["items"]}
    assert {"default", "kube-system"} <= names


# ------------------------------------------------------------------------------------------------ PyTorchJob


def test_a_minimal_pytorchjob_runs_on_fake_gpu_nodes_until_it_succeeds(
    kwok_gpu_nodes: Cluster, namespace: str
) -> None:
    cluster = kwok_gpu_nodes
    cluster.custom.create_namespaced_custom_object(
        "kubeflow.org", "v1", namespace, "pytorchjobs", a_pytorchjob("minimal")
    )

    def read_job() -> dict[str, Any]:
        return cluster.custom.get_namespaced_custom_object(
            "kubeflow.org", "v1", namespace, "pytorchjobs", "minimal"
        )

    job = wait_for_condition(read_job, "Succeeded", timeout=120, fail_on=("Failed",))

    assert job["status"]["replicaStatuses"]["Master"].get("succeeded") == 1
    pods = cluster.core.list_namespaced_pod(
        namespace, label_selector="training.kubeflow.org/job-name=minimal"
    ).items
    roles = sorted(pod.metadata.labels["training.kubeflow.org/replica-type"] for pod in pods)
    assert roles == ["master", "worker"]
    for pod in pods:
        # scheduled by kube-scheduler onto a kwok node, wired up for torch.distributed by the training operator
        assert pod.spec.node_name.startswith("kwok-gpu-node-")
        env = {e.name: e.value for e in pod.spec.containers[0].env}
        assert env["WORLD_SIZE"] == "2"
        assert env["MASTER_ADDR"] == "minimal-master-0"
        assert pod.status.phase == "Succeeded"
    assert len({pod.spec.node_name for pod in pods}) == 2, "two 8-GPU pods cannot share one 8-GPU node"


def test_a_pytorchjob_whose_pod_fails_ends_failed_with_the_pods_reason(
    kwok_gpu_nodes: Cluster, namespace: str
) -> None:
    cluster = kwok_gpu_nodes
    failing = a_pytorchjob(
        "oom",
        annotations={
            "kwok.kubetune.io/outcome": "fail",
            "kwok.kubetune.io/exit-code": "137",
            "kwok.kubetune.io/reason": "OOMKilled",
        },
    )
    cluster.custom.create_namespaced_custom_object("kubeflow.org", "v1", namespace, "pytorchjobs", failing)

    def read_job() -> dict[str, Any]:
        return cluster.custom.get_namespaced_custom_object(
            "kubeflow.org", "v1", namespace, "pytorchjobs", "oom"
        )

    wait_for_condition(read_job, "Failed", timeout=120, fail_on=("Succeeded",))
    master = cluster.core.read_namespaced_pod("oom-master-0", namespace)
    terminated = master.status.container_statuses[0].state.terminated
    assert (master.status.phase, terminated.reason, terminated.exit_code) == ("Failed", "OOMKilled", 137)


def test_the_training_operator_webhook_refuses_a_pytorchjob_without_a_pytorch_container(
    training_operator: Cluster, namespace: str
) -> None:
    with pytest.raises(ApiException) as refused:
        training_operator.custom.create_namespaced_custom_object(
            "kubeflow.org", "v1", namespace, "pytorchjobs", a_pytorchjob("unnamed", container="trainer")
        )
    message = json.loads(refused.value.body)["message"]
    assert (
        'admission webhook "validator.pytorchjob.training-operator.kubeflow.org" denied the request'
        in message
    )
    assert "must have at least one container with name pytorch" in message


# ------------------------------------------------------------------------------------------ garbage collection


def test_deleting_an_owner_deletes_what_it_owns(cluster: Cluster, namespace: str) -> None:
    owner = cluster.core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner"), data={"role": "owner"})
    )
    reference = client.V1OwnerReference(
        api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid
    )
    cluster.core.create_namespaced_config_map(
        namespace,
        client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name="owned", owner_references=[reference]), data={"role": "owned"}
        ),
    )
    cluster.core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="bystander"), data={"role": "none"})
    )

    cluster.core.delete_namespaced_config_map("owner", namespace)

    def owned_is_gone() -> bool:
        return not exists(lambda: cluster.core.read_namespaced_config_map("owned", namespace))

    wait_for(owned_is_gone, timeout=60, description="the garbage collector to delete ConfigMap 'owned'")
    assert exists(lambda: cluster.core.read_namespaced_config_map("bystander", namespace))


# ------------------------------------------------------------------------------------------ the kubetune CRD


def test_the_kubetune_crd_installs_and_becomes_established(
    cluster: Cluster, kubetune_crd: dict[str, Any]
) -> None:
    installed = cluster.apiextensions.read_custom_resource_definition(
        kubetune_crd["metadata"]["name"]
    ).to_dict()
    assert condition(installed, "Established")["status"] == "True"
    assert condition(installed, "NamesAccepted")["status"] == "True"
    assert installed["spec"]["names"]["kind"] == "FineTuneJob"


def finetunejobs_in(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc and doc.get("kind") == "FineTuneJob"]


def resource_of(crd: dict[str, Any], manifest: dict[str, Any]) -> tuple[str, str, str]:
    """(group, version, plural): where the API server serves `manifest`'s kind."""
    group, _, version = manifest["apiVersion"].partition("/")
    return group, version, crd["spec"]["names"]["plural"]


def create_dry_run(
    cluster: Cluster, crd: dict[str, Any], manifest: dict[str, Any], namespace: str
) -> dict[str, Any]:
    """Creates `manifest` with a server-side dry run and strict field validation, as `kubectl apply` does."""
    manifest = {**manifest, "metadata": {**manifest.get("metadata", {}), "namespace": namespace}}
    group, version, plural = resource_of(crd, manifest)
    return cluster.custom.create_namespaced_custom_object(
        group,
        version,
        namespace,
        plural,
        manifest,
        dry_run="All",
        field_validation="Strict",
    )


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_the_api_server_accepts_every_example(
    cluster: Cluster, kubetune_crd: dict[str, Any], namespace: str, example: Path
) -> None:
    jobs = finetunejobs_in(example)
    assert jobs, f"{example.name} holds no FineTuneJob"
    for job in jobs:
        created = create_dry_run(cluster, kubetune_crd, job, namespace)
        assert created["metadata"]["name"] == job["metadata"]["name"]


def expectation(path: Path) -> tuple[str, bool]:
    """The `# field: <path>` an invalid manifest's error must name, and whether the API server can judge it."""
    text = path.read_text()
    found = re.search(r"^#\s*field:\s*(\S+)\s*$", text, re.MULTILINE)
    assert found, f"{path.name} has no '# field: <path>' comment"
    operator_only = re.search(r"^#\s*server:\s*no\s*$", text, re.MULTILINE) is not None
    return found.group(1), not operator_only


def invalid_cases() -> list[Any]:
    cases = []
    for path in INVALID:
        field_path, server_judges = expectation(path)
        marks = (
            []
            if server_judges
            else [pytest.mark.skip(reason=f"'# server: no': only the operator judges {field_path}")]
        )
        cases.append(pytest.param(path, field_path, id=path.stem, marks=marks))
    return cases


@pytest.mark.parametrize(("manifest", "field_path"), invalid_cases())
def test_the_api_server_refuses_an_invalid_finetunejob_naming_the_field(
    cluster: Cluster, kubetune_crd: dict[str, Any], namespace: str, manifest: Path, field_path: str
) -> None:
    (job,) = finetunejobs_in(manifest)
    with pytest.raises(ApiException) as refused:
        create_dry_run(cluster, kubetune_crd, job, namespace)
    assert refused.value.status in (400, 422), refused.value.body
    status = json.loads(refused.value.body)
    causes = [
        cause.get("field", "") + ": " + cause.get("message", "")
        for cause in status.get("details", {}).get("causes", [])
    ]
    assert field_path in status["message"], (
        f"{field_path} not named in: {status['message']}\n  causes: {causes}"
    )


QUICKSTART = REPO_DIR / "examples" / "quickstart.yaml"
REFUSED_CHANGES = {
    "spec.training": {"training": {"epochs": 5}},
    "spec.model": {"model": {"source": "file://elsewhere"}},
    "spec.method": {"method": None},  # removed, the API server defaults it: a different method all the same
    "spec.deepspeed": {"deepspeed": {"zeroStage": 2}},  # absent at creation
    "spec.runPolicy.backoffLimit": {"runPolicy": {"backoffLimit": 7}},
    "spec.runPolicy.activeDeadlineSeconds": {
        "runPolicy": {"activeDeadlineSeconds": 60}
    },  # absent at creation
}


def create_quickstart(cluster: Cluster, crd: dict[str, Any], namespace: str) -> dict[str, Any]:
    (job,) = finetunejobs_in(QUICKSTART)
    group, version, plural = resource_of(crd, job)
    created: dict[str, Any] = cluster.custom.create_namespaced_custom_object(
        group, version, namespace, plural, job
    )
    return created


def merge_patch(
    cluster: Cluster, crd: dict[str, Any], job: dict[str, Any], patch: dict[str, Any], status: bool = False
) -> dict[str, Any]:
    """A merge patch of `job` (or of its status), as `kubectl patch --type merge` sends it."""
    group, version, plural = resource_of(crd, job)
    call = (
        cluster.custom.patch_namespaced_custom_object_status
        if status
        else cluster.custom.patch_namespaced_custom_object
    )
    patched: dict[str, Any] = call(
        group,
        version,
        job["metadata"]["namespace"],
        plural,
        job["metadata"]["name"],
        patch,
        _content_type="application/merge-patch+json",
    )
    return patched


@pytest.mark.parametrize("field_path", REFUSED_CHANGES)
def test_the_api_server_refuses_to_change_a_created_job_naming_the_field(
    cluster: Cluster, kubetune_crd: dict[str, Any], namespace: str, field_path: str
) -> None:
    job = create_quickstart(cluster, kubetune_crd, namespace)
    with pytest.raises(ApiException) as refused:
        merge_patch(cluster, kubetune_crd, job, {"spec": REFUSED_CHANGES[field_path]})
    assert refused.value.status == 422, refused.value.body
    message = json.loads(refused.value.body)["message"]
    assert f"{field_path}:" in message and "create a new FineTuneJob instead" in message, message
    group, version, plural = resource_of(kubetune_crd, job)
    stored = cluster.custom.get_namespaced_custom_object(
        group, version, namespace, plural, job["metadata"]["name"]
    )
    assert stored["spec"] == job["spec"]


def test_a_created_job_can_be_suspended_and_its_status_written(
    cluster: Cluster, kubetune_crd: dict[str, Any], namespace: str
) -> None:
    job = create_quickstart(cluster, kubetune_crd, namespace)
    suspended = merge_patch(cluster, kubetune_crd, job, {"spec": {"runPolicy": {"suspend": True}}})
    assert suspended["spec"]["runPolicy"]["suspend"] is True
    assert suspended["metadata"]["generation"] == job["metadata"]["generation"] + 1
    written = merge_patch(cluster, kubetune_crd, job, {"status": {"phase": "Suspended"}}, status=True)
    assert written["status"]["phase"] == "Suspended"
    assert {**written["spec"], "runPolicy": job["spec"]["runPolicy"]} == job["spec"]
