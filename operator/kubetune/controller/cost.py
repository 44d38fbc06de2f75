"""Pure: GPU seconds of a job's pods (GPUs x the trainer container's wall time), running or ended."""

from __future__ import annotations

from collections.abc import Iterable

from kubetune.controller.conditions import (
    parse_time,
)
from kubetune.controller.observed import Manifest
from kubetune.controller.pods import (
    deletion_requested_at,
    trainer_status,
)


def _pod_gpus(pod: Manifest, resource_name: str) -> int:
    total = 0
    for container in (pod.get("spec") or {}).get("containers") or []:
        limits = (container.get("resources") or {}).get("limits") or {}
        try:
            total += int(str(limits.get(resource_name, 0)))
        except ValueError:
            continue
    return total


def pod_gpu_seconds(pod: Manifest, resource_name: str, now: str) -> float:
    """GPUs x seconds the pod's trainer container has run; a pod being deleted stops counting then."""
    gpus = _pod_gpus(pod, resource_name)
    state = (trainer_status(pod) or {}).get("state") or {}
    if not gpus:
        return 0.0
    if running := state.get("running"):
        start, end = parse_time(running.get("startedAt")), parse_time(now)
        deleted_at = deletion_requested_at(pod)
        if end is not None and deleted_at is not None:
            end = min(end, deleted_at)
    elif terminated := state.get("terminated"):
        start, end = parse_time(terminated.get("startedAt")), parse_time(terminated.get("finishedAt"))
    else:
        return 0.0
    if start and end and end > start:
        return gpus * (end - start).total_seconds()
    return 0.0


def gpu_seconds(pods: Iterable[Manifest], resource_name: str, now: str) -> float:
    """GPUs x seconds the pods' trainer containers have run."""
    return round(sum(pod_gpu_seconds(pod, resource_name, now) for pod in pods), 1)
