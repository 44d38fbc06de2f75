"""Pure: small readers of the training operator's pods, shared by the status machine and the adapter reader."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from kubetune.controller.conditions import parse_time
from kubetune.render.pytorchjob import CONTAINER_NAME

Manifest = Mapping[str, Any]

REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
REPLICA_INDEX_LABEL = "training.kubeflow.org/replica-index"


def pod_name(pod: Manifest) -> str:
    return str((pod.get("metadata") or {}).get("name", ""))


def pod_uid(pod: Manifest) -> str:
    """The pod's UID; a pod replaced on a restart keeps its name and gets a new UID."""
    return str((pod.get("metadata") or {}).get("uid") or "")


def is_master(pod: Manifest) -> bool:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return (
        str(labels.get(REPLICA_TYPE_LABEL, "")).lower() == "master"
        and str(labels.get(REPLICA_INDEX_LABEL, "0")) == "0"
    )


def trainer_status(pod: Manifest) -> Mapping[str, Any] | None:
    """The status of the pod's trainer container, if the pod has one yet."""
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        if container.get("name") == CONTAINER_NAME:
            return dict(container)
    return None


def _grace_seconds(pod: Manifest) -> int:
    grace = (pod.get("metadata") or {}).get("deletionGracePeriodSeconds")
    return grace if isinstance(grace, int) and grace > 0 else 0


def deletion_requested_at(pod: Manifest) -> datetime | None:
    """When someone asked to delete the pod (deletionTimestamp is that moment plus the grace period)."""
    deadline = parse_time((pod.get("metadata") or {}).get("deletionTimestamp"))
    return None if deadline is None else deadline - timedelta(seconds=_grace_seconds(pod))


def stopped_by_deletion(pod: Manifest, finished_at: datetime | None) -> bool:
    """Whether the trainer ended because the pod was deleted (a suspend, the job's clean-up), not before.

    Timestamps have whole seconds, and the training operator deletes a failed pod within the second it
    failed. The grace period tells the two apart then: the API server deletes a pod that has already
    ended with a grace period of 0, a running one with its terminationGracePeriodSeconds.
    """
    requested = deletion_requested_at(pod)
    if requested is None or finished_at is None:
        return False
    return finished_at > requested or (finished_at == requested and _grace_seconds(pod) > 0)
