"""Under Kueue the operator never un-suspends a job, and a user's suspend and resume go through the Workload."""

from __future__ import annotations

from typing import Any

from kubetune.controller.queueing import (
    DEACTIVATED_BY_US,
    queue_writes,
    waiting_message,
    writes_need_workload,
)
from tests.builders import a_job


def job(suspend: bool = False, queue: str | None = "team-a") -> Any:
    scheduling = {"queueName": queue} if queue else {}
    return a_job().with_spec(scheduling=scheduling, runPolicy={"suspend": suspend}).build()


def ptj(suspend: bool, queue: str | None = None) -> dict[str, Any]:
    labels = {"kueue.x-k8s.io/queue-name": queue} if queue else {}
    return {"metadata": {"uid": "u1", "labels": labels}, "spec": {"runPolicy": {"suspend": suspend}}}


def workload(active: bool = True, ours: bool = False, **conditions: tuple[str, str]) -> dict[str, Any]:
    annotations = {DEACTIVATED_BY_US: "spec.runPolicy.suspend"} if ours else {}
    return {
        "metadata": {"name": "pytorchjob-demo-1", "annotations": annotations},
        "spec": {"active": active},
        "status": {
            "conditions": [{"type": k, "status": s, "message": m} for k, (s, m) in conditions.items()]
        },
    }


def test_a_job_kueue_holds_suspended_is_never_unsuspended_by_the_operator() -> None:
    writes = queue_writes(job(), ptj(True), workload())
    assert writes.pytorchjob_suspend is None and writes.workload_patch is None


def test_a_users_suspend_suspends_and_deactivates_the_workload_and_resume_reactivates_only_ours() -> None:
    suspend = queue_writes(job(suspend=True), ptj(False), workload())
    assert suspend.pytorchjob_suspend is True
    assert suspend.workload_patch is not None and suspend.workload_patch["spec"] == {"active": False}
    resume = queue_writes(job(), ptj(True), workload(active=False, ours=True))
    assert resume.pytorchjob_suspend is None
    assert resume.workload_patch is not None and resume.workload_patch["spec"] == {"active": True}
    assert queue_writes(job(), ptj(True), workload(active=False)).workload_patch is None


def test_a_job_created_suspended_joins_its_queue_on_its_first_resume() -> None:
    """Its PyTorchJob has no queue-name label, so Kueue cannot admit (and start) it while it is suspended."""
    assert queue_writes(job(suspend=True), ptj(True), None).pytorchjob_queue is None
    assert queue_writes(job(), ptj(True), None).pytorchjob_queue == "team-a"
    assert queue_writes(job(), ptj(True, queue="team-a"), None).pytorchjob_queue is None
    assert queue_writes(job(queue=None), ptj(True), None).pytorchjob_queue is None


def test_the_workload_is_read_only_when_a_write_to_it_could_follow() -> None:
    """A running queued job the user leaves alone costs no Workload read per reconcile."""
    assert not writes_need_workload(job(), ptj(False))
    assert writes_need_workload(job(suspend=True), ptj(False)), "to deactivate it"
    assert writes_need_workload(job(), ptj(True)), "it may be ours to re-activate"
    assert not writes_need_workload(job(queue=None, suspend=True), ptj(True)), "no queue, no Workload"


def test_without_a_queue_suspend_follows_the_spec_both_ways() -> None:
    assert queue_writes(job(queue=None), ptj(True), None).pytorchjob_suspend is False
    assert queue_writes(job(queue=None, suspend=True), ptj(False), None).pytorchjob_suspend is True


def test_the_queued_message_is_kueues_own() -> None:
    message = "couldn't assign flavors to pod set master: insufficient unused quota for nvidia.com/gpu"
    found = waiting_message(job(), workload(QuotaReserved=("False", message)))
    assert found is not None and message in found and "team-a" in found
    assert waiting_message(job(), workload(Admitted=("True", ""))) is None
