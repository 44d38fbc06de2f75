"""The labels and names every object kubetune creates carries, in one place."""

from __future__ import annotations

from kubetune.api.v1alpha1 import API_VERSION, KIND, FineTuneJob

MANAGED_BY = "app.kubernetes.io/managed-by"
JOB_NAME = "kubetune.io/job-name"
KUEUE_QUEUE_NAME = "kueue.x-k8s.io/queue-name"


RESERVED_DOMAINS = (
    "kubernetes.io",  # Kubernetes itself, kubectl (last-applied-configuration), app.kubernetes.io/*
    "k8s.io",
    "kubetune.io",  # ours: kopf's state, the spec hash and generation
    "kopf.zalando.org",  # kopf's default place for its state
    "training.kubeflow.org",  # the training operator's replica labels on the pods
    "argocd.argoproj.io",  # Argo CD's tracking: on a child, Argo CD would think it manages (and prunes) it
    "kustomize.toolkit.fluxcd.io",  # Flux's ownership labels, likewise
    "helm.toolkit.fluxcd.io",
    "meta.helm.sh",  # Helm's release annotations
)
"""Label and annotation prefixes a FineTuneJob's metadata does not pass to its children: the domain and
its subdomains. They belong to Kubernetes, to the operators that manage the children, or to the tools that
manage the FineTuneJob itself (app.kubernetes.io/instance is Argo CD's tracking label by default)."""

RESERVED_KEYS = frozenset({KUEUE_QUEUE_NAME})
"""Keys the operator sets from the spec (spec.scheduling.queueName), so the metadata cannot contradict it."""


def is_reserved(key: str) -> bool:
    """Whether a label or annotation key stays on the FineTuneJob instead of reaching its children."""
    prefix, slash, _ = key.partition("/")
    if key in RESERVED_KEYS:
        return True
    if not slash:
        return False
    return any(prefix == domain or prefix.endswith("." + domain) for domain in RESERVED_DOMAINS)


def propagated(metadata: dict[str, str]) -> dict[str, str]:
    """The labels or annotations of a FineTuneJob that its children carry too (cost allocation, team
    labels, Istio or Vault annotations): all but the reserved ones."""
    return {key: value for key, value in sorted(metadata.items()) if not is_reserved(key)}


def job_labels(job: FineTuneJob) -> dict[str, str]:
    """Labels on every child of a FineTuneJob; the operator selects children by them."""
    return {MANAGED_BY: "kubetune", JOB_NAME: job.name}


def child_labels(job: FineTuneJob) -> dict[str, str]:
    """The job's own propagated labels, then the operator's (which win)."""
    return {**propagated(job.metadata.labels), **job_labels(job)}


def child_annotations(job: FineTuneJob) -> dict[str, str]:
    return propagated(job.metadata.annotations)


def spec_configmap_name(job: FineTuneJob) -> str:
    return f"{job.name}-spec"


def pytorchjob_name(job: FineTuneJob) -> str:
    return job.name


def owner_references(job: FineTuneJob) -> list[dict[str, object]]:
    """The FineTuneJob as controlling owner, so deleting it garbage-collects the children.

    A job read from a file (no uid yet) gets none: the operator always has the uid.
    """
    if not job.metadata.uid:
        return []
    return [
        {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": job.name,
            "uid": job.metadata.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
