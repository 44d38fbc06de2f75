"""The labels and names every object kubetune creates carries, in one place."""

from __future__ import annotations

from kubetune.api.v1alpha1 import API_VERSION, KIND, FineTuneJob

MANAGED_BY = "app.kubernetes.io/managed-by"
JOB_NAME = "kubetune.io/job-name"
KUEUE_QUEUE_NAME = "kueue.x-k8s.io/queue-name"


def job_labels(job: FineTuneJob) -> dict[str, str]:
    """Labels on every child of a FineTuneJob; the operator selects children by them."""
    return {MANAGED_BY: "kubetune", JOB_NAME: job.name}


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
