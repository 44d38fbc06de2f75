"""Pods that never start: a trainer image that cannot be pulled and a pod no node can take leave the job
Pending with a reason naming the cause and the fix, once they have waited past the operator's limits."""

from __future__ import annotations

from typing import Any

from kubetune.api.v1alpha1 import FineTuneJobStatus, Phase, Reason
from kubetune.controller.observed import Observed
from kubetune.controller.startup import StartLimits, stuck_start
from kubetune.controller.status import compute_status
from tests.unit.test_controller_status import a_pytorchjob, conditions_of, job

CREATED = "2026-01-01T00:00:00Z"
IMAGE = "ghcr.io/acme/kubetune-trainer:0.1.0-typo"
SCHEDULER = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available"


def a_pending_pod(
    name: str = "demo-master-0",
    replica: str = "master",
    waiting: str | None = None,
    unschedulable_since: str | None = None,
) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": "Pending", "conditions": []}
    if waiting:
        state = {"waiting": {"reason": waiting, "message": f'Back-off pulling image "{IMAGE}"'}}
        status["containerStatuses"] = [{"name": "pytorch", "image": IMAGE, "state": state}]
        status["conditions"].append({"type": "PodScheduled", "status": "True"})
    if unschedulable_since:
        status["conditions"].append(
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": SCHEDULER,
                "lastTransitionTime": unschedulable_since,
            }
        )
    labels = {"training.kubeflow.org/replica-type": replica}
    return {"metadata": {"name": name, "labels": labels, "creationTimestamp": CREATED}, "status": status}


def test_an_image_that_cannot_be_pulled_is_named_after_the_grace_period_and_the_job_stays_pending() -> None:
    observed = Observed(a_pytorchjob("Created"), [a_pending_pod(waiting="ImagePullBackOff")])

    early = compute_status(job(), FineTuneJobStatus(), observed, "2026-01-01T00:01:00Z")
    assert conditions_of(early)["Ready"] == ("False", Reason.CREATED)

    late = compute_status(job(), FineTuneJobStatus(), observed, "2026-01-01T00:02:30Z")
    assert late.phase is Phase.PENDING
    assert conditions_of(late)["Ready"] == ("False", Reason.IMAGE_PULL_FAILED)
    # Waiting, not failed: kstatus keeps reading InProgress, and nothing is stopped.
    assert conditions_of(late)["Reconciling"] == ("True", Reason.IMAGE_PULL_FAILED)
    assert conditions_of(late)["Stalled"][0] == "False"
    assert (
        IMAGE in late.message and "spec.trainer.image" in late.message and "imagePullSecret" in late.message
    )


def test_a_pod_the_scheduler_refuses_carries_the_schedulers_message_after_the_limit() -> None:
    observed = Observed(a_pytorchjob("Created"), [a_pending_pod(unschedulable_since="2026-01-01T00:00:05Z")])

    early = compute_status(job(), FineTuneJobStatus(), observed, "2026-01-01T00:04:00Z")
    assert conditions_of(early)["Ready"] == ("False", Reason.CREATED)

    late = compute_status(job(), FineTuneJobStatus(), observed, "2026-01-01T00:07:05Z")
    assert late.phase is Phase.PENDING
    assert conditions_of(late)["Ready"] == ("False", Reason.UNSCHEDULABLE)
    assert SCHEDULER in late.message and "waited 7 min" in late.message
    assert "spec.resources.gpusPerNode" in late.message and "activeDeadlineSeconds" in late.message


def test_the_limits_are_the_operators_to_set() -> None:
    observed = [a_pending_pod(unschedulable_since="2026-01-01T00:00:00Z")]
    quick = StartLimits(image_pull_grace_seconds=10, unschedulable_after_seconds=30)
    assert stuck_start(observed, "2026-01-01T00:00:31Z", quick) is not None
    assert stuck_start(observed, "2026-01-01T00:00:31Z", StartLimits()) is None


def test_the_master_is_reported_before_a_worker_and_a_running_pod_is_never_stuck() -> None:
    worker = a_pending_pod("demo-worker-0", "worker", unschedulable_since=CREATED)
    master = a_pending_pod(waiting="ErrImagePull")
    found = stuck_start([worker, master], "2026-01-01T01:00:00Z", StartLimits())
    assert found is not None and found.reason is Reason.IMAGE_PULL_FAILED and "demo-master-0" in found.message

    running = {**master, "status": {**master["status"], "phase": "Running"}}
    assert stuck_start([running], "2026-01-01T01:00:00Z", StartLimits()) is None


def test_a_pod_that_is_only_waiting_to_be_scheduled_for_other_reasons_is_left_alone() -> None:
    gated = a_pending_pod()
    gated["status"]["conditions"] = [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "SchedulingGated",
            "lastTransitionTime": CREATED,
        }
    ]
    assert stuck_start([gated], "2026-01-01T01:00:00Z", StartLimits()) is None
