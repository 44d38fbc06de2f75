"""Pure: what the operator writes to a queued job's PyTorchJob and Kueue Workload, and what its status says.

Kueue admits a job by un-suspending it (`spec.runPolicy.suspend` false) once its Workload fits a
ClusterQueue's quota, and suspends it again to preempt it. So with `spec.scheduling.queueName` the PyTorchJob
is created suspended and the operator never un-suspends it. A user's own suspend goes through the Workload:
Kueue would un-suspend an admitted job whose PyTorchJob alone was suspended, so the operator also sets the
Workload's `spec.active` to false (Kueue evicts it and frees its quota), and back to true on resume (Kueue
queues it again and un-suspends it when admitted). The operator marks a Workload it deactivated, and
re-activates only those: one Kueue deactivated itself (e.g. after too many evictions) stays as Kueue left it.
A job created suspended gets its PyTorchJob without the queue-name label, so Kueue makes no Workload that it
could admit before the operator deactivated it; the label comes with the first resume.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.render.labels import KUEUE_QUEUE_NAME

Manifest = Mapping[str, Any]

WORKLOAD_GROUP = "kueue.x-k8s.io"
WORKLOAD_VERSION = "v1beta2"
WORKLOAD_PLURAL = "workloads"
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
"""The label Kueue puts on a job's Workload: the job's uid."""
DEACTIVATED_BY_US = "kubetune.io/deactivated-by"
"""On a Workload the operator deactivated for spec.runPolicy.suspend."""


@dataclass(frozen=True)
class QueueWrites:
    """What to write; None leaves a field as it is."""

    pytorchjob_suspend: bool | None = None
    pytorchjob_queue: str | None = None
    """The queue-name label to put on a suspended PyTorchJob that has none yet: Kueue takes the job then."""
    workload_patch: Mapping[str, Any] | None = None
    workload: Manifest | None = None
    """The Workload the patch is for."""


def is_queued(job: FineTuneJob) -> bool:
    return bool(job.spec.scheduling.queue_name)


def _suspended(pytorchjob: Manifest) -> bool:
    return bool(((pytorchjob.get("spec") or {}).get("runPolicy") or {}).get("suspend", False))


def _queue_label(pytorchjob: Manifest) -> str | None:
    labels = (pytorchjob.get("metadata") or {}).get("labels") or {}
    return labels.get(KUEUE_QUEUE_NAME)


def _active(workload: Manifest) -> bool:
    return (workload.get("spec") or {}).get("active") is not False


def _deactivated_by_us(workload: Manifest) -> bool:
    return DEACTIVATED_BY_US in ((workload.get("metadata") or {}).get("annotations") or {})


def writes_need_workload(job: FineTuneJob, pytorchjob: Manifest) -> bool:
    """Whether `queue_writes` could write to the Workload: to suspend a queued job, or to resume one whose
    PyTorchJob is suspended (it may be ours to re-activate). A running job left alone needs no read."""
    return is_queued(job) and (job.spec.run_policy.suspend or _suspended(pytorchjob))


def queue_writes(job: FineTuneJob, pytorchjob: Manifest, workload: Manifest | None) -> QueueWrites:
    """What one reconcile writes so that suspend follows the spec without fighting Kueue."""
    wanted = job.spec.run_policy.suspend
    if not is_queued(job):
        return QueueWrites(pytorchjob_suspend=wanted if _suspended(pytorchjob) != wanted else None)
    writes_suspend = True if wanted and not _suspended(pytorchjob) else None  # un-suspending is Kueue's
    joins = job.spec.scheduling.queue_name if not wanted and _queue_label(pytorchjob) is None else None
    patch: dict[str, Any] | None = None
    if workload is not None and wanted and _active(workload):
        patch = {
            "metadata": {"annotations": {DEACTIVATED_BY_US: "spec.runPolicy.suspend"}},
            "spec": {"active": False},
        }
    elif workload is not None and not wanted and not _active(workload) and _deactivated_by_us(workload):
        patch = {"metadata": {"annotations": {DEACTIVATED_BY_US: None}}, "spec": {"active": True}}
    return QueueWrites(
        pytorchjob_suspend=writes_suspend, pytorchjob_queue=joins, workload_patch=patch, workload=workload
    )


def workload_of(pytorchjob: Manifest, workloads: list[Manifest]) -> Manifest | None:
    """The Workload Kueue made for this PyTorchJob (it carries the job's uid), if any."""
    uid = (pytorchjob.get("metadata") or {}).get("uid")
    for workload in workloads:
        if uid and ((workload.get("metadata") or {}).get("labels") or {}).get(JOB_UID_LABEL) == uid:
            return workload
    return None


def _condition(workload: Manifest, kind: str) -> Mapping[str, Any] | None:
    for item in (workload.get("status") or {}).get("conditions") or []:
        if item.get("type") == kind:
            found: Mapping[str, Any] = item
            return found
    return None


def waiting_message(job: FineTuneJob, workload: Manifest | None) -> str | None:
    """When the job waits for Kueue, why, in Kueue's own words; None when it does not wait.

    Kueue explains a Workload without quota in its QuotaReserved=False condition ("couldn't assign flavors
    to pod set master: insufficient unused quota for nvidia.com/gpu in flavor default-flavor, 8 more
    needed"); before it has looked at the Workload there is none yet.
    """
    if not is_queued(job) or job.spec.run_policy.suspend:
        return None
    queue = job.spec.scheduling.queue_name
    if workload is None:
        return f"queued in LocalQueue {queue}: waiting for Kueue to make its Workload"
    admitted = _condition(workload, "Admitted")
    if admitted is not None and admitted.get("status") == "True":
        return None
    name = (workload.get("metadata") or {}).get("name", "")
    for kind in ("QuotaReserved", "Evicted", "Admitted"):
        found = _condition(workload, kind)
        if (
            found is not None
            and found.get("message")
            and (kind != "Evicted" or found.get("status") == "True")
        ):
            return f"queued in LocalQueue {queue} (Workload {name}): {found['message']}"
    return f"queued in LocalQueue {queue} (Workload {name}): waiting for Kueue to admit it"
