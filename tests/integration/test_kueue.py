"""Kueue on the real control plane decides which queued FineTuneJob runs, and the operator never overrules it.

hack/cluster runs Kueue's own manager (built from its Go module) with its webhooks and CRD conversion,
managing the PyTorchJobs that name a LocalQueue, as on a GPU cluster that queues its batch work. Each test
gets a ClusterQueue of 8 GPUs for its namespace, created held (`stopPolicy: Hold`) so that the test can tell
kwok how the pods end before Kueue admits anything, then released. The pods run on kwok's fake 8-GPU nodes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
from cluster import Cluster, condition, wait_for
from kubernetes.client.exceptions import ApiException
from test_operator_lifecycle import (
    PTJ,
    Operator,
    a_manifest,
    create,
    operator,
    read,
    read_pytorchjob,
    set_suspend,
    wait_for_phase,
)

pytestmark = pytest.mark.cluster

__all__ = ["operator"]  # the fixture, shared with the lifecycle tests

KUEUE, KUEUE_VERSION = "kueue.x-k8s.io", "v1beta2"
QUEUE = "gpus"
QUOTA_GPUS = 8
DEACTIVATED_BY_US = "kubetune.io/deactivated-by"


@pytest.fixture
def gpu_queue(cluster: Cluster, namespace: str) -> Iterator[str]:
    """A LocalQueue `gpus` in the test's namespace, feeding a held ClusterQueue with 8 GPUs of quota (CPU
    and memory plenty); yields the ClusterQueue's name."""
    if not cluster.has_crd("clusterqueues.kueue.x-k8s.io"):
        pytest.skip("this cluster runs no Kueue")
    flavor = {
        "apiVersion": f"{KUEUE}/{KUEUE_VERSION}",
        "kind": "ResourceFlavor",
        "metadata": {"name": namespace},
    }
    quota = {"cpu": "1000", "memory": "10Ti", "nvidia.com/gpu": str(QUOTA_GPUS)}
    cluster_queue = {
        "apiVersion": f"{KUEUE}/{KUEUE_VERSION}",
        "kind": "ClusterQueue",
        "metadata": {"name": namespace},
        "spec": {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
            "stopPolicy": "Hold",
            "resourceGroups": [
                {
                    "coveredResources": list(quota),
                    "flavors": [
                        {
                            "name": namespace,
                            "resources": [
                                {"name": name, "nominalQuota": value} for name, value in quota.items()
                            ],
                        }
                    ],
                }
            ],
        },
    }
    local_queue = {
        "apiVersion": f"{KUEUE}/{KUEUE_VERSION}",
        "kind": "LocalQueue",
        "metadata": {"name": QUEUE, "namespace": namespace},
        "spec": {"clusterQueue": namespace},
    }
    cluster.custom.create_cluster_custom_object(KUEUE, KUEUE_VERSION, "resourceflavors", flavor)
    cluster.custom.create_cluster_custom_object(KUEUE, KUEUE_VERSION, "clusterqueues", cluster_queue)
    cluster.custom.create_namespaced_custom_object(
        KUEUE, KUEUE_VERSION, namespace, "localqueues", local_queue
    )
    try:
        yield namespace
    finally:
        for plural, name in (("clusterqueues", namespace), ("resourceflavors", namespace)):
            with contextlib.suppress(ApiException):
                cluster.custom.delete_cluster_custom_object(KUEUE, KUEUE_VERSION, plural, name)


def release(cluster: Cluster, cluster_queue: str) -> None:
    """Lets Kueue admit the held ClusterQueue's Workloads."""
    cluster.custom.patch_cluster_custom_object(
        KUEUE, KUEUE_VERSION, "clusterqueues", cluster_queue, {"spec": {"stopPolicy": "None"}}
    )


def queued_job(cluster: Cluster, namespace: str, name: str, pod_annotations: dict[str, str]) -> None:
    """An 8-GPU job (2 nodes x 4 GPUs) in LocalQueue `gpus`; its pods will end as `pod_annotations` tell kwok.

    The annotations go on the PyTorchJob's pod templates while it is suspended: the ClusterQueue is held, so
    Kueue has admitted nothing yet.
    """
    manifest = a_manifest(name, namespace, scheduling={"queueName": QUEUE})
    manifest["spec"]["resources"]["gpusPerNode"] = QUOTA_GPUS // 2
    create(cluster, manifest)
    pytorchjob = wait_for(
        lambda: read_pytorchjob(cluster, namespace, name), timeout=30, description=f"PyTorchJob {name}"
    )
    assert pytorchjob["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == QUEUE
    assert pytorchjob["spec"]["runPolicy"]["suspend"] is True, "a queued job's PyTorchJob starts suspended"
    patch = {
        "spec": {
            "pytorchReplicaSpecs": {
                replica: {"template": {"metadata": {"annotations": pod_annotations}}}
                for replica in pytorchjob["spec"]["pytorchReplicaSpecs"]
            }
        }
    }
    cluster.custom.patch_namespaced_custom_object(*PTJ[:2], namespace, PTJ[2], name, patch)


def workload_of(cluster: Cluster, namespace: str, name: str) -> dict[str, Any] | None:
    uid = read_pytorchjob(cluster, namespace, name)["metadata"]["uid"]
    items: list[dict[str, Any]] = cluster.custom.list_namespaced_custom_object(
        KUEUE, KUEUE_VERSION, namespace, "workloads", label_selector=f"kueue.x-k8s.io/job-uid={uid}"
    )["items"]
    return items[0] if items else None


def pods_of(cluster: Cluster, namespace: str, name: str) -> list[Any]:
    return list(
        cluster.core.list_namespaced_pod(
            namespace, label_selector=f"training.kubeflow.org/job-name={name}"
        ).items
    )


def wait_for_message(cluster: Cluster, namespace: str, name: str, text: str) -> dict[str, Any]:
    """The job once its status message says `text`; on timeout the error shows the status and Workload."""
    last: dict[str, Any] = {}

    def says() -> bool:
        nonlocal last
        last = read(cluster, namespace, name)
        return text in (last.get("status") or {}).get("message", "")

    try:
        wait_for(says, timeout=30, description=f"{name}'s status message to say {text!r}")
    except AssertionError as error:
        workload = workload_of(cluster, namespace, name)
        raise AssertionError(f"{error}\n  status: {last.get('status')}\n  Workload: {workload}") from None
    return last


def test_a_clusterqueue_of_8_gpus_runs_one_8_gpu_job_and_queues_the_other_until_the_first_finishes(
    cluster: Cluster, operator: Operator, gpu_queue: str
) -> None:
    """Which of the two Kueue admits first is its choice (its queue orders Workloads, which it may remake
    when a job's template changes); the test follows whichever runs."""
    namespace, names = operator.namespace, ("one", "two")
    for name in names:
        queued_job(cluster, namespace, name, {"kwok.kubetune.io/run-duration": "12s"})
    for name in names:
        held = wait_for_message(cluster, namespace, name, "queued in LocalQueue gpus")
        assert (condition(held, "Ready") or {}).get("reason") == "Queued", held["status"]

    release(cluster, gpu_queue)
    running = wait_for(
        lambda: next((n for n in names if phase_of(cluster, namespace, n) == "Running"), None),
        timeout=60,
        description="one of the two jobs Running",
    )
    (queued,) = set(names) - {running}
    waiting = wait_for_message(cluster, namespace, queued, "insufficient unused quota for nvidia.com/gpu")
    assert waiting["status"]["phase"] == "Pending"
    assert (condition(waiting, "Ready") or {}).get("reason") == "Queued"
    assert (condition(waiting, "Reconciling") or {}).get("status") == "True", "waiting, not stalled"
    assert read_pytorchjob(cluster, namespace, queued)["spec"]["runPolicy"]["suspend"] is True
    assert not pods_of(cluster, namespace, queued), (
        "the queued job has no pods while the other holds the GPUs"
    )

    done = wait_for_phase(cluster, namespace, running, "Succeeded", timeout=120)
    later = wait_for_phase(cluster, namespace, queued, "Succeeded", timeout=120)
    assert later["status"]["startTime"] >= done["status"]["completionTime"], "8 GPUs of quota: one at a time"
    workload = workload_of(cluster, namespace, queued)
    assert workload is not None
    assert (condition(workload, "Admitted") or {}).get("status") == "True", workload.get("status")


def phase_of(cluster: Cluster, namespace: str, name: str) -> str | None:
    phase: str | None = (read(cluster, namespace, name).get("status") or {}).get("phase")
    return phase


def test_a_user_suspends_a_job_kueue_admitted_and_resumes_it_through_the_queue(
    cluster: Cluster, operator: Operator, gpu_queue: str
) -> None:
    namespace, name = operator.namespace, "paused"
    queued_job(cluster, namespace, name, {"kwok.kubetune.io/outcome": "run"})
    release(cluster, gpu_queue)
    wait_for_phase(cluster, namespace, name, "Running")

    set_suspend(cluster, namespace, name, True)
    suspended = wait_for_phase(cluster, namespace, name, "Suspended")
    assert (condition(suspended, "Ready") or {}).get("reason") == "Suspended"
    workload = workload_of(cluster, namespace, name)
    assert workload is not None
    assert workload["spec"]["active"] is False, "the operator deactivates the Workload: Kueue frees its quota"
    assert workload["metadata"]["annotations"][DEACTIVATED_BY_US] == "spec.runPolicy.suspend"
    wait_for(lambda: not pods_of(cluster, namespace, name), timeout=60, description=f"{name}'s pods to go")
    assert read_pytorchjob(cluster, namespace, name)["spec"]["runPolicy"]["suspend"] is True

    set_suspend(cluster, namespace, name, False)
    wait_for_phase(cluster, namespace, name, "Running")
    workload = workload_of(cluster, namespace, name)
    assert workload is not None
    assert workload["spec"].get("active", True) is True
    assert DEACTIVATED_BY_US not in (workload["metadata"].get("annotations") or {})


def test_a_queued_job_created_suspended_gets_no_workload_and_no_pod_until_its_user_resumes_it(
    cluster: Cluster, operator: Operator, gpu_queue: str
) -> None:
    """With quota free Kueue admits a Workload within a second; a job created suspended has none to admit
    (its PyTorchJob joins the queue on resume), so no pod starts and stops again on the GPUs."""
    namespace, name = operator.namespace, "created-paused"
    release(cluster, gpu_queue)
    create(cluster, a_manifest(name, namespace, suspend=True, scheduling={"queueName": QUEUE}))
    wait_for_phase(cluster, namespace, name, "Suspended")
    time.sleep(3)  # several times what Kueue takes to admit a Workload that fits
    assert workload_of(cluster, namespace, name) is None
    assert not pods_of(cluster, namespace, name)

    set_suspend(cluster, namespace, name, False)
    wait_for_phase(cluster, namespace, name, "Running")
    pytorchjob = read_pytorchjob(cluster, namespace, name)
    assert pytorchjob["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == QUEUE
    workload = workload_of(cluster, namespace, name)
    assert workload is not None and (condition(workload, "Admitted") or {}).get("status") == "True"
