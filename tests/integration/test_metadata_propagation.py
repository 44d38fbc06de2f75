"""A FineTuneJob's own labels and annotations reach its ConfigMap, its PyTorchJob and the pods the training
operator makes from it (cost allocation, team labels, Istio or Vault annotations), all but the reserved ones.

On the real control plane: the operator renders the children, the real training operator makes the pods.
"""

from __future__ import annotations

from typing import Any

import pytest
from cluster import Cluster, wait_for
from test_operator_lifecycle import Operator, a_manifest, create, operator, read_pytorchjob

pytestmark = pytest.mark.cluster

__all__ = ["operator"]  # the fixture, shared with the lifecycle tests

USER_LABELS = {"team": "nlp", "example.com/cost-center": "4711"}
USER_ANNOTATIONS = {"vault.hashicorp.com/agent-inject": "true", "sidecar.istio.io/inject": "false"}
RESERVED_LABELS = {
    "app.kubernetes.io/instance": "argocd-app",  # Argo CD's tracking label: on a child it would prune it
    "kueue.x-k8s.io/queue-name": "not-from-metadata",  # set from spec.scheduling.queueName only
}
RESERVED_ANNOTATIONS = {"kustomize.toolkit.fluxcd.io/reconcile": "disabled", "kubetune.io/anything": "x"}


def carries_ours_only(metadata: Any, what: str) -> None:
    labels, annotations = metadata.get("labels") or {}, metadata.get("annotations") or {}
    assert USER_LABELS.items() <= labels.items(), f"{what} labels: {labels}"
    assert USER_ANNOTATIONS.items() <= annotations.items(), f"{what} annotations: {annotations}"
    assert not RESERVED_LABELS.keys() & labels.keys(), f"{what} labels: {labels}"
    assert not RESERVED_ANNOTATIONS.keys() & annotations.keys(), f"{what} annotations: {annotations}"


def test_user_labels_and_annotations_reach_the_configmap_pytorchjob_and_pods_but_reserved_ones_do_not(
    cluster: Cluster, operator: Operator
) -> None:
    namespace, name = operator.namespace, "labelled"
    manifest = a_manifest(name, namespace)
    manifest["metadata"]["labels"] = {**USER_LABELS, **RESERVED_LABELS}
    manifest["metadata"]["annotations"] = {**USER_ANNOTATIONS, **RESERVED_ANNOTATIONS}
    create(cluster, manifest)

    pytorchjob = wait_for(
        lambda: read_pytorchjob(cluster, namespace, name), timeout=30, description=f"PyTorchJob {name}"
    )
    carries_ours_only(pytorchjob["metadata"], "PyTorchJob")
    for replica, spec in pytorchjob["spec"]["pytorchReplicaSpecs"].items():
        carries_ours_only(spec["template"]["metadata"], f"{replica} pod template")
    configmap = cluster.core.read_namespaced_config_map(f"{name}-spec", namespace).to_dict()["metadata"]
    carries_ours_only(configmap, "ConfigMap")

    pods = wait_for(
        lambda: (
            cluster.core.list_namespaced_pod(
                namespace, label_selector=f"training.kubeflow.org/job-name={name}"
            ).items
        ),
        timeout=60,
        description=f"{name}'s pods (made by the training operator)",
    )
    for pod in pods:
        carries_ours_only(pod.to_dict()["metadata"], f"pod {pod.metadata.name}")
