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


def deletion_requested_at(pod: Manifest) -> datetime | None:
    """When someone asked to delete the pod (deletionTimestamp is that moment plus the grace period)."""
    metadata = pod.get("metadata") or {}
    deadline = parse_time(metadata.get("deletionTimestamp"))
    if deadline is None:
        return None
    grace = metadata.get("deletionGracePeriodSeconds")
    return deadline - timedelta(seconds=grace if isinstance(grace, int) and grace > 0 else 0)
