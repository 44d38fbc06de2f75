"""Pure: pods that never start. A trainer image that cannot be pulled, or a pod no node can take, leaves a
PyTorchJob Created forever with nothing in its own conditions; the pods say why, so the status does too.

Neither is a failure: an image pushed late is pulled on the kubelet's next try, and GPUs freed by another
job let the scheduler place the pod. The job stays Pending with a reason a person can act on;
`spec.runPolicy.activeDeadlineSeconds` is how a user asks for a waiting job to fail instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kubetune.api.v1alpha1 import Reason
from kubetune.controller.conditions import parse_time
from kubetune.controller.failures import Failure, replica_order, shorten
from kubetune.controller.observed import Manifest
from kubetune.controller.pods import pod_name

IMAGE_PULL_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})


@dataclass(frozen=True)
class StartLimits:
    """How long a pod may wait before its status names why (the operator's configuration)."""

    image_pull_grace_seconds: float = 120.0
    """A pull that fails this long after the pod was created is reported (a registry hiccup is not)."""
    unschedulable_after_seconds: float = 300.0
    """A pod the scheduler has refused this long is reported (a cluster autoscaler may add a node first)."""


def _seconds_since(moment: str | None, now: str) -> float:
    """Seconds from ``moment`` to ``now``; 0 when either is missing or unreadable (no report yet)."""
    start, end = parse_time(moment), parse_time(now)
    return 0.0 if start is None or end is None else (end - start).total_seconds()


def _image_pull_failure(pod: Manifest, now: str, limits: StartLimits) -> Failure | None:
    status = pod.get("status") or {}
    created = (pod.get("metadata") or {}).get("creationTimestamp")
    if _seconds_since(created, now) < limits.image_pull_grace_seconds:
        return None
    for container in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in IMAGE_PULL_REASONS:
            kubelet = f": {waiting['message']}" if waiting.get("message") else ""
            return Failure(
                Reason.IMAGE_PULL_FAILED,
                shorten(
                    f"pod {pod_name(pod)} cannot pull image {container.get('image', '?')} "
                    f"({waiting['reason']}{kubelet}); fix the name or tag (spec.trainer.image, or the "
                    "operator's trainer image) or give the namespace an imagePullSecret that can read it"
                ),
            )
    return None


def _unschedulable(pod: Manifest, now: str, limits: StartLimits) -> Failure | None:
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") != "PodScheduled" or condition.get("status") != "False":
            continue
        if condition.get("reason") != "Unschedulable":
            return None
        waited = _seconds_since(condition.get("lastTransitionTime"), now)
        if waited < limits.unschedulable_after_seconds:
            return None
        return Failure(
            Reason.UNSCHEDULABLE,
            shorten(
                f"pod {pod_name(pod)} has waited {int(waited // 60)} min for a node: "
                f"{condition.get('message') or 'the scheduler found none'}; ask for fewer GPUs "
                "(spec.resources.gpusPerNode, spec.resources.nodes) or add capacity; set "
                "spec.runPolicy.activeDeadlineSeconds for a job that should fail instead of waiting"
            ),
        )
    return None


def stuck_start(pods: Iterable[Manifest], now: str, limits: StartLimits) -> Failure | None:
    """Why the job's pods have not started, once a pod has waited past its limit; the master's first."""
    for pod in sorted(pods, key=replica_order):
        if (pod.get("status") or {}).get("phase", "Pending") != "Pending":
            continue
        if found := _image_pull_failure(pod, now, limits) or _unschedulable(pod, now, limits):
            return found
    return None
