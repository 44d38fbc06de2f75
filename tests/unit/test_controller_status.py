"""The status state machine: PyTorchJob conditions and pod terminations -> phase, conditions, failure reason."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from kubetune.api.v1alpha1 import FineTuneJob, FineTuneJobStatus, Phase, Progress, Reason, parse_job
from kubetune.api.validation import FieldError
from kubetune.controller.changes import without_cost
from kubetune.controller.conditions import find_condition, set_condition
from kubetune.controller.cost import gpu_seconds
from kubetune.controller.failures import PEER_LOST_EXIT, classify_failure, classify_termination
from kubetune.controller.observed import Observed
from kubetune.controller.status import compute_status, invalid_status
from kubetune.render import RenderConfig
from kubetune.render.pytorchjob import (
    SPEC_GENERATION_ANNOTATION,
    SPEC_HASH_ANNOTATION,
    build_pytorchjob,
    spec_hash,
)
from kubetune_trainer.termination import EXIT_PEER_LOST
from tests.builders import a_job

T0 = "2026-01-01T00:00:00Z"
T1 = "2026-01-01T00:01:00Z"
T2 = "2026-01-01T00:02:00Z"


def a_pytorchjob(*true_conditions: str, message: str = "", completion: str | None = None) -> dict[str, Any]:
    conditions = [
        {"type": kind, "status": "True", "reason": f"PyTorchJob{kind}", "message": message}
        for kind in true_conditions
    ]
    status: dict[str, Any] = {"conditions": conditions}
    if completion:
        status["completionTime"] = completion
    return {"metadata": {"name": "demo", "annotations": {}}, "status": status}


def a_pod(
    name: str = "demo-master-0",
    replica: str = "master",
    phase: str = "Running",
    gpus: int = 8,
    running_since: str | None = T0,
    terminated: dict[str, Any] | None = None,
    last_terminated: dict[str, Any] | None = None,
    conditions: list[dict[str, Any]] | None = None,
    reason: str | None = None,
    node: str = "node-0",
    uid: str | None = None,
    deletion: str | None = None,
    grace: int = 300,
) -> dict[str, Any]:
    state: dict[str, Any] = {}
    if terminated is not None:
        state["terminated"] = {"startedAt": T0, "finishedAt": T1, **terminated}
    elif running_since:
        state["running"] = {"startedAt": running_since}
    container_status: dict[str, Any] = {"name": "pytorch", "state": state}
    if last_terminated:
        container_status["lastState"] = {"terminated": last_terminated}
    status: dict[str, Any] = {
        "phase": phase,
        "containerStatuses": [container_status],
        "conditions": conditions or [],
    }
    if reason:
        status["reason"] = reason
    metadata: dict[str, Any] = {
        "name": name,
        "uid": uid or f"uid-{name}",
        "labels": {"training.kubeflow.org/replica-type": replica, "training.kubeflow.org/replica-index": "0"},
    }
    if deletion:
        # `deletion` is when the delete was asked for; the API server sets deletionTimestamp to that plus the
        # grace period, which is 0 for a pod that has already ended.
        requested = datetime.fromisoformat(deletion.replace("Z", "+00:00"))
        metadata["deletionTimestamp"] = (requested + timedelta(seconds=grace)).strftime("%Y-%m-%dT%H:%M:%SZ")
        metadata["deletionGracePeriodSeconds"] = grace
    return {
        "metadata": metadata,
        "spec": {
            "nodeName": node,
            "containers": [{"name": "pytorch", "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}],
        },
        "status": status,
    }


def job(generation: int = 1) -> FineTuneJob:
    manifest = a_job().with_uid().as_manifest()
    manifest["metadata"]["generation"] = generation
    return parse_job(manifest)


def conditions_of(status: FineTuneJobStatus) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in status.conditions}


# --------------------------------------------------------------------------------------------- conditions


def test_last_transition_time_moves_only_when_the_status_moves() -> None:
    first = set_condition([], "Ready", "False", "Created", "waiting", 1, T0)
    same = set_condition(first, "Ready", "False", "Created", "still waiting", 2, T1)
    flipped = set_condition(same, "Ready", "True", "Running", "training", 2, T2)

    assert first[0].last_transition_time == T0
    assert same[0].last_transition_time == T0
    assert same[0].message == "still waiting" and same[0].observed_generation == 2
    assert flipped[0].last_transition_time == T2


def test_set_condition_keeps_the_order_and_appends_new_types() -> None:
    conditions = set_condition([], "Ready", "False", "A", "", 1, T0)
    conditions = set_condition(conditions, "Stalled", "False", "A", "", 1, T0)
    conditions = set_condition(conditions, "Ready", "True", "B", "", 1, T1)
    assert [c.type for c in conditions] == ["Ready", "Stalled"]


# ------------------------------------------------------------------------------------------ the lifecycle


def test_a_job_goes_pending_running_succeeded_with_observed_generation_on_every_condition() -> None:
    the_job = job(generation=3)
    status = FineTuneJobStatus()

    status = compute_status(the_job, status, Observed(), T0)
    assert status.phase is Phase.PENDING
    assert conditions_of(status)["Reconciling"] == ("True", Reason.CREATED)

    status = compute_status(the_job, status, Observed(a_pytorchjob("Created")), T0)
    assert status.phase is Phase.PENDING and status.pytorch_job == "demo"

    running = Observed(a_pytorchjob("Created", "Running"), [a_pod(running_since=T0)])
    status = compute_status(the_job, status, running, T1)
    assert status.phase is Phase.RUNNING
    assert conditions_of(status)["Ready"] == ("False", Reason.RUNNING)
    assert conditions_of(status)["Reconciling"] == ("True", Reason.RUNNING)
    assert status.start_time == T0
    assert status.gpu_seconds == 8 * 60

    done = Observed(
        a_pytorchjob("Created", "Succeeded", completion=T2),
        [a_pod(phase="Succeeded", terminated={"exitCode": 0, "reason": "Completed"})],
    )
    status = compute_status(the_job, status, done, T2)
    assert status.phase is Phase.SUCCEEDED
    assert conditions_of(status)["Ready"] == ("True", Reason.SUCCEEDED)
    assert conditions_of(status)["Reconciling"][0] == "False"
    assert conditions_of(status)["Succeeded"] == ("True", Reason.SUCCEEDED)
    assert conditions_of(status)["Failed"][0] == "False"
    assert status.completion_time == T2
    assert status.adapter is not None and status.adapter.uri == "s3://adapters/demo/"
    assert all(c.observed_generation == 3 for c in status.conditions)
    assert status.observed_generation == 3


def test_recomputing_an_unchanged_job_gives_an_equal_status_so_nothing_is_written() -> None:
    the_job = job()
    observed = Observed(a_pytorchjob("Created", "Running"), [a_pod(running_since=T0)])
    first = compute_status(the_job, FineTuneJobStatus(), observed, T1)
    again = compute_status(the_job, first, observed, T1)
    assert again == first


IDEMPOTENCE_CASES = {
    "pending": lambda: (job(), Observed(a_pytorchjob("Created"))),
    "running": lambda: (job(), Observed(a_pytorchjob("Created", "Running"), [a_pod(running_since=T0)])),
    "oom-killed, restarting": lambda: (
        job_with_backoff(3),
        Observed(
            a_pytorchjob("Created", "Restarting"),
            [a_pod(uid="second", running_since=T2)],
            deleted_pods=[a_pod(uid="first", phase="Failed", terminated={**OOM, "finishedAt": T1})],
        ),
    ),
    "backoff limit reached": lambda: (
        job_with_backoff(0),
        Observed(
            a_pytorchjob("Created", "Running"),
            [a_pod(uid="only", phase="Failed", running_since=None, terminated={**OOM, "finishedAt": T1})],
        ),
    ),
    "a lost node, peers exit PeerLost": lambda: (three_node_job(), running(*node_loss(1, T1))),
    "succeeded": lambda: (
        job(),
        Observed(
            a_pytorchjob("Created", "Succeeded", completion=T2),
            [a_pod(phase="Succeeded", terminated={"exitCode": 0, "reason": "Completed"})],
        ),
    ),
}


@pytest.mark.parametrize("case", IDEMPOTENCE_CASES)
def test_the_status_computed_from_a_written_status_is_the_same_status(case: str) -> None:
    """The operator does not reconcile the watch event of its own status write (the store already holds
    it): that is sound only because a second compute from the same children changes nothing. The deleted
    pods a write banked are gone from the store after it, as they are here."""
    the_job, observed = IDEMPOTENCE_CASES[case]()
    first = compute_status(the_job, FineTuneJobStatus(), observed, T2)
    after_write = Observed(observed.pytorchjob, observed.pods, observed.lost_nodes)
    again = compute_status(the_job, first, after_write, T3)
    assert without_cost(again) == without_cost(first)


def test_a_suspended_pytorchjob_makes_the_job_suspended_and_resuming_runs_it_again() -> None:
    the_job = job()
    status = compute_status(the_job, FineTuneJobStatus(), Observed(a_pytorchjob("Created", "Suspended")), T0)
    assert status.phase is Phase.SUSPENDED
    assert conditions_of(status)["Ready"] == ("False", Reason.SUSPENDED)
    status = compute_status(the_job, status, Observed(a_pytorchjob("Created", "Running"), [a_pod()]), T1)
    assert status.phase is Phase.RUNNING


def test_a_restarting_pytorchjob_keeps_the_job_running_but_not_ready() -> None:
    status = compute_status(
        job(),
        FineTuneJobStatus(),
        Observed(a_pytorchjob("Created", "Restarting", message="pod restarted")),
        T0,
    )
    assert status.phase is Phase.RUNNING
    assert conditions_of(status)["Ready"] == ("False", Reason.RESTARTING)
    assert status.message == "pod restarted"


def test_progress_given_replaces_the_stored_progress_and_is_kept_otherwise() -> None:
    observed = Observed(a_pytorchjob("Created", "Running"), [a_pod()])
    progress = Progress(step=5, total_steps=10, percent=50, updated_at=T1)
    status = compute_status(job(), FineTuneJobStatus(), observed, T1, progress=progress)
    assert status.progress == progress
    assert compute_status(job(), status, observed, T2).progress == progress


def test_a_pod_on_a_lost_node_does_not_leave_the_job_ready() -> None:
    observed = Observed(
        a_pytorchjob("Created", "Running"), [a_pod(node="gone")], lost_nodes=frozenset({"gone"})
    )
    status = compute_status(job(), FineTuneJobStatus(), observed, T1)
    assert conditions_of(status)["Ready"] == ("False", Reason.NODE_LOST)
    assert "gone" in (status.message or "")


def test_a_spec_changed_after_creation_is_reported_as_stalled() -> None:
    the_job = job()
    pytorchjob = a_pytorchjob("Created", "Running")
    pytorchjob["metadata"]["annotations"][SPEC_HASH_ANNOTATION] = "0" * 64
    status = compute_status(the_job, FineTuneJobStatus(), Observed(pytorchjob), T0)
    assert conditions_of(status)["Stalled"] == ("True", Reason.SPEC_CHANGED)

    pytorchjob["metadata"]["annotations"][SPEC_HASH_ANNOTATION] = spec_hash(the_job)
    status = compute_status(the_job, status, Observed(pytorchjob), T0)
    assert conditions_of(status)["Stalled"][0] == "False"


def test_a_spec_hash_kept_per_generation_judges_the_same_as_a_fresh_one() -> None:
    the_job = job()
    pytorchjob = a_pytorchjob("Created", "Running")
    pytorchjob["metadata"]["annotations"][SPEC_HASH_ANNOTATION] = spec_hash(the_job)
    kept = compute_status(
        the_job, FineTuneJobStatus(), Observed(pytorchjob), T0, digest=lambda: spec_hash(the_job)
    )
    assert kept == compute_status(the_job, FineTuneJobStatus(), Observed(pytorchjob), T0)
    stale = compute_status(the_job, FineTuneJobStatus(), Observed(pytorchjob), T0, digest=lambda: "1" * 64)
    assert conditions_of(stale)["Stalled"] == ("True", Reason.SPEC_CHANGED)


def the_pytorchjob_of(the_job: FineTuneJob) -> dict[str, Any]:
    """The PyTorchJob as the operator renders it for `the_job`, with the status the training operator gives."""
    pytorchjob = build_pytorchjob(the_job, RenderConfig())
    pytorchjob["status"] = a_pytorchjob("Created", "Running")["status"]
    return pytorchjob


def no_render() -> str:
    raise AssertionError("the spec document was rendered")


def test_a_pytorchjob_made_at_the_jobs_generation_needs_no_spec_render_to_be_judged_unchanged() -> None:
    the_job = job(generation=3)
    pytorchjob = the_pytorchjob_of(the_job)
    assert pytorchjob["metadata"]["annotations"][SPEC_GENERATION_ANNOTATION] == "3"

    status = compute_status(the_job, FineTuneJobStatus(), Observed(pytorchjob), T0, digest=no_render)
    assert conditions_of(status)["Stalled"][0] == "False"


def test_after_a_suspend_moved_the_generation_the_spec_hashes_decide() -> None:
    made = job(generation=1)
    pytorchjob = the_pytorchjob_of(made)
    resumed = job(generation=2)  # the same spec document: runPolicy is not in it
    status = compute_status(resumed, FineTuneJobStatus(), Observed(pytorchjob), T0)
    assert conditions_of(status)["Stalled"][0] == "False"

    pytorchjob["metadata"]["annotations"][SPEC_HASH_ANNOTATION] = "0" * 64  # as if the spec had moved
    status = compute_status(resumed, FineTuneJobStatus(), Observed(pytorchjob), T0)
    assert conditions_of(status)["Stalled"] == ("True", Reason.SPEC_CHANGED)


def test_a_pytorchjob_of_an_earlier_job_of_the_same_name_and_generation_is_judged_by_its_hash() -> None:
    manifest = a_job().with_uid("uid-of-an-earlier-job").as_manifest()
    manifest["metadata"]["generation"] = 1
    earlier = parse_job(manifest)
    pytorchjob = the_pytorchjob_of(earlier)
    pytorchjob["metadata"]["annotations"][SPEC_HASH_ANNOTATION] = "0" * 64
    status = compute_status(job(generation=1), FineTuneJobStatus(), Observed(pytorchjob), T0)
    assert conditions_of(status)["Stalled"] == ("True", Reason.SPEC_CHANGED)


def test_an_invalid_spec_is_stalled_and_failed_with_the_field_named() -> None:
    status = invalid_status(
        FineTuneJobStatus(), 2, [FieldError("spec.training.learningRateGroups[0].match", "bad regex")], T0
    )
    assert status.phase is Phase.FAILED
    assert conditions_of(status)["Stalled"] == ("True", Reason.INVALID_SPEC)
    stalled = find_condition(status.conditions, "Stalled")
    assert stalled is not None and "spec.training.learningRateGroups[0].match" in stalled.message
    assert stalled.observed_generation == 2


# ----------------------------------------------------------------------------------------- failure reasons


def failed_with(*pods: dict[str, Any], message: str = "") -> Observed:
    return Observed(a_pytorchjob("Created", "Failed", message=message, completion=T2), list(pods))


@pytest.mark.parametrize(
    ("exit_code", "reason", "message", "expected"),
    [
        (137, "OOMKilled", "", Reason.OOM_KILLED),
        (137, "Error", "", Reason.OOM_KILLED),
        (
            1,
            "Error",
            "InsufficientGPUMemory: needs 90 GiB per GPU, has 80 GiB",
            Reason.INSUFFICIENT_GPU_MEMORY,
        ),
        (
            1,
            "Error",
            "[Rank 3] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=12, OpType=ALLREDUCE)",
            Reason.NCCL_TIMEOUT,
        ),
        (1, "Error", "RuntimeError: NCCL communicator was aborted: timed out", Reason.NCCL_TIMEOUT),
        (
            1,
            "Error",
            "RuntimeError: unable to write to file </torch_123_456>: No space left on device",
            Reason.SHARED_MEMORY_EXHAUSTED,
        ),
        (135, "Error", "", Reason.SHARED_MEMORY_EXHAUSTED),
        (
            1,
            "Error",
            "SourceUnavailable: s3://data/train.jsonl: An error occurred (InvalidAccessKeyId)",
            Reason.STORAGE_AUTH_FAILED,
        ),
        (1, "Error", "SourceUnavailable: AccessDenied", Reason.STORAGE_AUTH_FAILED),
        (2, "Error", "ValueError: the dataset has no column 'output'", Reason.TRAINER_ERROR),
    ],
)
def test_a_terminated_trainer_is_classified_by_exit_code_reason_and_message(
    exit_code: int, reason: str, message: str, expected: Reason
) -> None:
    assert classify_termination(exit_code, reason, message) is expected


def test_a_qlora_job_whose_pod_is_oom_killed_ends_failed_with_reason_oom_killed() -> None:
    pod = a_pod(phase="Failed", terminated={"exitCode": 137, "reason": "OOMKilled"})
    status = compute_status(job(), FineTuneJobStatus(), failed_with(pod), T2)
    assert status.phase is Phase.FAILED
    assert conditions_of(status)["Failed"] == ("True", Reason.OOM_KILLED)
    assert status.completion_time == T2


def test_a_failing_trainer_puts_its_termination_message_in_the_status() -> None:
    pod = a_pod(
        phase="Failed", terminated={"exitCode": 1, "reason": "Error", "message": "InvalidDataset: no rows"}
    )
    status = compute_status(job(), FineTuneJobStatus(), failed_with(pod), T2)
    assert conditions_of(status)["Failed"] == ("True", Reason.TRAINER_ERROR)
    assert "InvalidDataset: no rows" in (status.message or "")
    failed = find_condition(status.conditions, "Failed")
    assert failed is not None and "InvalidDataset: no rows" in failed.message


def test_the_master_pod_explains_the_failure_before_the_workers() -> None:
    worker = a_pod("demo-worker-0", "worker", "Failed", terminated={"exitCode": 1, "message": "worker noise"})
    master = a_pod("demo-master-0", "master", "Failed", terminated={"exitCode": 137, "reason": "OOMKilled"})
    assert classify_failure(failed_with(worker, master)).reason is Reason.OOM_KILLED


def test_an_oom_kill_from_an_earlier_restart_is_found_in_the_last_state() -> None:
    pod = a_pod(last_terminated={"exitCode": 137, "reason": "OOMKilled"})
    failure = classify_failure(
        failed_with(
            pod, message="PyTorchJob demo has failed because it has reached the specified backoff limit"
        )
    )
    assert failure.reason is Reason.OOM_KILLED
    assert "backoff limit" in failure.message


def test_an_evicted_pod_means_preempted() -> None:
    pod = a_pod(
        phase="Failed",
        terminated={"exitCode": 137},
        conditions=[{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}],
    )
    assert classify_failure(failed_with(pod)).reason is Reason.PREEMPTED
    assert classify_failure(failed_with(a_pod(phase="Failed", reason="Evicted"))).reason is Reason.PREEMPTED


def test_job_level_failures_without_pod_evidence() -> None:
    deadline = failed_with(
        message="PyTorchJob demo has failed because it was active longer than specified deadline"
    )
    assert classify_failure(deadline).reason is Reason.DEADLINE_EXCEEDED
    backoff = failed_with(
        message="PyTorchJob demo has failed because it has reached the specified backoff limit"
    )
    assert classify_failure(backoff).reason is Reason.BACKOFF_LIMIT_EXCEEDED
    assert classify_failure(failed_with(message="something else")).reason is Reason.TRAINER_ERROR


def test_gpu_seconds_count_gpus_times_wall_time_of_running_and_finished_pods() -> None:
    running = a_pod(gpus=8, running_since=T0)
    finished = a_pod("demo-worker-0", "worker", gpus=4, terminated={"exitCode": 0})
    assert gpu_seconds([running, finished], "nvidia.com/gpu", T2) == 8 * 120 + 4 * 60


# ------------------------------------------------------------------------------ failures across restarts

T3 = "2026-01-01T00:03:00Z"
T4 = "2026-01-01T00:04:00Z"
OOM = {"exitCode": 137, "reason": "OOMKilled"}


def job_with_backoff(limit: int) -> FineTuneJob:
    manifest = a_job().with_uid().with_spec(runPolicy={"backoffLimit": limit}).as_manifest()
    manifest["metadata"]["generation"] = 1
    return parse_job(manifest)


def test_an_oom_killed_pod_retried_until_the_backoff_limit_ends_failed_with_reason_oom_killed() -> None:
    """The training operator recreates the pod under restartPolicy ExitCode and never counts it; the
    status keeps the cause after the pod is gone and ends the job at spec.runPolicy.backoffLimit."""
    the_job = job_with_backoff(1)
    first = a_pod(uid="first", phase="Failed", terminated={**OOM, "finishedAt": T1})
    status = compute_status(
        the_job, FineTuneJobStatus(), Observed(a_pytorchjob("Created", "Running"), [first]), T1
    )
    assert status.phase is Phase.RUNNING and status.restarts == 1
    assert status.last_failure is not None
    assert (status.last_failure.reason, status.last_failure.exit_code) == ("OOMKilled", 137)
    assert (status.last_failure.pod, status.last_failure.pod_uid) == ("demo-master-0", "first")

    # The pod is deleted and recreated: the cause stays in the status.
    second = a_pod(uid="second", running_since=T2)
    restarting = Observed(
        a_pytorchjob("Created", "Restarting", message="job demo is restarting"),
        [second],
        deleted_pods=[first],
    )
    status = compute_status(the_job, status, restarting, T2)
    assert status.phase is Phase.RUNNING and status.restarts == 1
    assert conditions_of(status)["Ready"] == ("False", Reason.RESTARTING)
    assert "OOMKilled" in (status.message or "")

    # Killed again: the backoff limit is reached, although the PyTorchJob would restart it forever.
    second_dead = a_pod(
        uid="second", phase="Failed", running_since=None, terminated={**OOM, "finishedAt": T3}
    )
    status = compute_status(the_job, status, Observed(a_pytorchjob("Created", "Running"), [second_dead]), T3)
    assert status.phase is Phase.FAILED
    assert conditions_of(status)["Failed"] == ("True", Reason.OOM_KILLED)
    failed = find_condition(status.conditions, "Failed")
    assert failed is not None
    assert "backoff limit reached after 1 restart(s)" in failed.message and "exit code 137" in failed.message
    assert (
        status.restarts == 1 and status.last_failure is not None and status.last_failure.pod_uid == "second"
    )
    assert status.completion_time == T3

    # The operator then suspends the PyTorchJob to stop the pods: the job stays Failed.
    stopped = compute_status(the_job, status, Observed(a_pytorchjob("Created", "Suspended")), T4)
    assert stopped.phase is Phase.FAILED and stopped.conditions == status.conditions
    assert stopped.completion_time == T3


def test_a_failed_pod_seen_again_is_counted_once() -> None:
    the_job = job_with_backoff(3)
    dead = a_pod(uid="a", phase="Failed", terminated={**OOM, "finishedAt": T1})
    observed = Observed(a_pytorchjob("Created", "Running"), [dead])
    status = compute_status(the_job, FineTuneJobStatus(), observed, T1)
    for _ in range(3):
        status = compute_status(the_job, status, observed, T2)
    assert status.restarts == 1


def test_a_failed_pod_read_from_the_list_and_then_from_its_deleted_event_is_one_failure() -> None:
    """The client library writes +00:00 where the watch event says Z; the same failure must compare equal."""
    the_job = job_with_backoff(1)
    listed = a_pod(uid="a", phase="Failed", terminated={**OOM, "finishedAt": "2026-01-01T00:01:00+00:00"})
    status = compute_status(
        the_job, FineTuneJobStatus(), Observed(a_pytorchjob("Created", "Running"), [listed]), T1
    )
    deleted = a_pod(uid="a", phase="Failed", terminated={**OOM, "finishedAt": T1}, deletion=T1, grace=0)
    status = compute_status(
        the_job, status, Observed(a_pytorchjob("Created", "Restarting"), deleted_pods=[deleted]), T2
    )
    assert status.phase is Phase.RUNNING and status.restarts == 1
    assert status.last_failure is not None and status.last_failure.time == T1


def test_a_pod_failed_without_a_container_exit_is_one_failure_however_often_it_is_seen() -> None:
    lost = a_pod(
        uid="a",
        phase="Failed",
        running_since=None,
        conditions=[{"type": "Ready", "status": "False", "lastTransitionTime": T1}],
    )
    lost["status"]["message"] = "the node was shut down"
    status = FineTuneJobStatus()
    for now in (T1, T2, T3):
        status = compute_status(
            job_with_backoff(3),
            status,
            Observed(a_pytorchjob("Created", "Running"), [lost, a_pod(uid="b")]),
            now,
        )
    assert status.restarts == 1
    assert status.last_failure is not None and status.last_failure.time == T1


def test_two_pods_failing_together_are_two_restarts() -> None:
    master = a_pod(uid="m", phase="Failed", terminated={**OOM, "finishedAt": T1})
    worker = a_pod("demo-worker-0", "worker", "Failed", uid="w", terminated={**OOM, "finishedAt": T1})
    status = compute_status(
        job_with_backoff(3),
        FineTuneJobStatus(),
        Observed(a_pytorchjob("Created", "Running"), [master, worker]),
        T1,
    )
    assert status.restarts == 2


def test_a_pod_stopped_by_a_suspend_did_not_fail() -> None:
    """SIGTERM on deletion: the trainer checkpoints and exits 143 after the delete was asked for."""
    later = a_pod(uid="a", phase="Failed", terminated={"exitCode": 143, "finishedAt": T2}, deletion=T1)
    at_once = a_pod(uid="b", phase="Failed", terminated={"exitCode": 143, "finishedAt": T1}, deletion=T1)
    status = compute_status(
        job(), FineTuneJobStatus(), Observed(a_pytorchjob("Created", "Suspended"), [later, at_once]), T2
    )
    assert status.restarts == 0 and status.last_failure is None


def test_a_pod_deleted_in_the_second_it_failed_did_fail() -> None:
    """The training operator deletes a failed pod at once; timestamps have whole seconds."""
    dead = a_pod(uid="a", phase="Failed", terminated={**OOM, "finishedAt": T1}, deletion=T1, grace=0)
    status = compute_status(
        job(), FineTuneJobStatus(), Observed(a_pytorchjob("Created", "Running"), deleted_pods=[dead]), T1
    )
    assert status.restarts == 1 and status.last_failure is not None


def test_a_non_retryable_failure_is_kept_but_is_no_restart() -> None:
    bad = a_pod(uid="a", phase="Failed", terminated={"exitCode": 1, "message": "InvalidDataset: no rows"})
    status = compute_status(job(), FineTuneJobStatus(), failed_with(bad), T2)
    assert status.restarts == 0
    assert status.last_failure is not None and status.last_failure.message == "InvalidDataset: no rows"


def test_a_backoff_failure_after_the_pods_are_gone_names_the_last_failure() -> None:
    the_job = job_with_backoff(1)
    dead = a_pod(uid="a", phase="Failed", terminated={**OOM, "finishedAt": T1})
    status = compute_status(
        the_job, FineTuneJobStatus(), Observed(a_pytorchjob("Created", "Running"), [dead]), T1
    )
    backoff = failed_with(
        message="PyTorchJob demo has failed because it has reached the specified backoff limit"
    )
    status = compute_status(the_job, status, backoff, T2)
    assert conditions_of(status)["Failed"] == ("True", Reason.OOM_KILLED)
    assert "pod demo-master-0 failed with OOMKilled" in (status.message or "")
    assert "backoff limit reached" in (status.message or "")


def test_a_succeeded_job_whose_pytorchjob_was_removed_stays_succeeded() -> None:
    """ttlSecondsAfterFinished deletes the PyTorchJob; the job must not look Pending (or be started again)."""
    done = Observed(
        a_pytorchjob("Created", "Succeeded", completion=T2),
        [a_pod(phase="Succeeded", terminated={"exitCode": 0, "reason": "Completed"})],
    )
    status = compute_status(job(), FineTuneJobStatus(), done, T2)
    later = compute_status(job(generation=2), status, Observed(), T3)
    assert later.phase is Phase.SUCCEEDED and later.completion_time == T2
    assert all(c.observed_generation == 2 for c in later.conditions)
    assert [c.last_transition_time for c in later.conditions] == [
        c.last_transition_time for c in status.conditions
    ]


# ----------------------------------------------------------------------------------- GPU seconds of pods


def test_gpu_seconds_keep_the_time_of_pods_replaced_on_a_restart() -> None:
    the_job = job_with_backoff(3)
    first = a_pod(uid="first", gpus=8, phase="Failed", terminated={**OOM, "startedAt": T0, "finishedAt": T1})
    status = compute_status(
        the_job, FineTuneJobStatus(), Observed(a_pytorchjob("Created", "Running"), [first]), T1
    )
    assert status.gpu_seconds == 8 * 60

    # The training operator deletes it and starts a new one; the watch hands over its final state.
    second = a_pod(uid="second", gpus=8, running_since=T2)
    status = compute_status(
        the_job, status, Observed(a_pytorchjob("Created", "Running"), [second], deleted_pods=[first]), T2
    )
    assert status.gpu_seconds_of_deleted_pods == 8 * 60
    assert status.gpu_seconds == 8 * 60

    # A minute later, from the list alone: both pods' time.
    status = compute_status(the_job, status, Observed(a_pytorchjob("Created", "Running"), [second]), T3)
    assert status.gpu_seconds == 8 * 60 + 8 * 60
    assert status.gpu_seconds_of_deleted_pods == 8 * 60


def test_a_pod_deleted_while_running_counts_until_its_deletion() -> None:
    running = a_pod(uid="a", gpus=2, running_since=T0, deletion=T1)
    status = compute_status(
        job(), FineTuneJobStatus(), Observed(a_pytorchjob("Created", "Suspended"), deleted_pods=[running]), T3
    )
    assert status.gpu_seconds == status.gpu_seconds_of_deleted_pods == 2 * 60


def test_gpu_seconds_never_go_down_when_a_pod_vanishes_unseen() -> None:
    running = Observed(a_pytorchjob("Created", "Running"), [a_pod(gpus=1, running_since=T0)])
    status = compute_status(job(), FineTuneJobStatus(), running, T2)
    status = compute_status(job(), status, Observed(a_pytorchjob("Created", "Running")), T3)
    assert status.gpu_seconds == 120


def test_a_restart_is_announced_with_the_failures_reason_and_the_end_with_the_same_reason() -> None:
    from kubetune.controller.changes import Transition, transition_events

    the_job = job_with_backoff(1)
    dead = a_pod(uid="a", phase="Failed", terminated={**OOM, "finishedAt": T1})
    running = compute_status(
        the_job, FineTuneJobStatus(), Observed(a_pytorchjob("Created", "Running"), [a_pod()]), T0
    )
    restarted = compute_status(the_job, running, Observed(a_pytorchjob("Created", "Running"), [dead]), T1)
    again = a_pod(uid="b", phase="Failed", terminated={**OOM, "finishedAt": T2})
    failed = compute_status(the_job, restarted, Observed(a_pytorchjob("Created", "Running"), [again]), T2)

    restart_events = transition_events(Transition(body={}, before=running, after=restarted))
    assert restart_events == [
        (
            "Warning",
            "OOMKilled",
            "pod demo-master-0 failed with OOMKilled, exit code 137; replaced (restart 1)",
        )
    ]
    end_events = transition_events(Transition(body={}, before=restarted, after=failed))
    assert [(kind, reason) for kind, reason, _ in end_events] == [("Warning", "OOMKilled")]


# ------------------------------------------------------------------------- one lost node, one restart

GLOO_PEER_GONE = "PeerLost: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:29500"


def seconds_after(moment: str, seconds: int) -> str:
    start = datetime.fromisoformat(moment.replace("Z", "+00:00"))
    return (start + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def three_node_job(backoff_limit: int = 3) -> FineTuneJob:
    manifest = (
        a_job()
        .with_uid()
        .on(nodes=3, gpus=8)
        .with_spec(runPolicy={"backoffLimit": backoff_limit})
        .as_manifest()
    )
    manifest["metadata"]["generation"] = 1
    return parse_job(manifest)


def failed(name: str, uid: str, terminated: dict[str, Any], **pod: Any) -> dict[str, Any]:
    """A failed pod of a replica, by name: demo-master-0, demo-worker-1..."""
    return a_pod(name, name.split("-")[1], "Failed", uid=uid, terminated=terminated, **pod)


def oom_killed(name: str, uid: str, at: str) -> dict[str, Any]:
    not_ready = [{"type": "Ready", "status": "False", "lastTransitionTime": at}]
    return failed(name, uid, {**OOM, "finishedAt": at}, conditions=not_ready)


def peer_lost(name: str, uid: str, at: str) -> dict[str, Any]:
    """A survivor whose collective failed because another node went away: the launcher exits 200."""
    return failed(
        name, uid, {"exitCode": 200, "reason": "Error", "message": GLOO_PEER_GONE, "finishedAt": at}
    )


def running(*pods: dict[str, Any], deleted: tuple[dict[str, Any], ...] = ()) -> Observed:
    return Observed(a_pytorchjob("Created", "Running"), list(pods), deleted_pods=list(deleted))


def node_loss(round_: int, at: str) -> list[dict[str, Any]]:
    """worker-0 OOM-killed at `at`, the master and worker-1 exit PeerLost seconds later (new pods each round)."""
    return [
        oom_killed("demo-worker-0", f"w0-{round_}", at),
        peer_lost("demo-master-0", f"m-{round_}", seconds_after(at, 3)),
        peer_lost("demo-worker-1", f"w1-{round_}", seconds_after(at, 5)),
    ]


@pytest.mark.parametrize(
    ("exit_code", "reason", "message"),
    [
        (200, "Error", GLOO_PEER_GONE),
        (200, "Error", "PeerLost: NCCL communicator was aborted on rank 3: timed out"),
        # The launcher's own exit when the rendezvous fails writes no line: the message is its log's tail.
        (200, "Error", "rendezvous with the other nodes failed (DistStoreError: ...); exiting 200"),
    ],
)
def test_a_trainer_that_exits_200_lost_a_peer(exit_code: int, reason: str, message: str) -> None:
    assert classify_termination(exit_code, reason, message) is Reason.PEER_LOST


def test_a_pod_whose_own_process_was_killed_is_oom_killed_even_if_another_of_its_processes_wrote_peer_lost() -> (
    None
):
    assert classify_termination(137, "Error", GLOO_PEER_GONE) is Reason.OOM_KILLED


def test_the_operator_reads_peer_lost_by_the_trainers_own_exit_code() -> None:
    assert PEER_LOST_EXIT == EXIT_PEER_LOST


def test_a_3_node_job_whose_worker_is_oom_killed_and_whose_peers_exit_peer_lost_counts_one_restart() -> None:
    """The gang restarts once; users see the worker's OOMKilled (the restart's Warning event names
    lastFailure), not the master's PeerLost."""
    status = compute_status(three_node_job(), FineTuneJobStatus(), running(*node_loss(1, T1)), T1)

    assert status.phase is Phase.RUNNING and status.restarts == 1
    assert status.last_failure is not None
    assert (status.last_failure.reason, status.last_failure.pod) == ("OOMKilled", "demo-worker-0")

    restarting = Observed(a_pytorchjob("Created", "Restarting"), node_loss(1, T1))
    status = compute_status(three_node_job(), status, restarting, T2)
    assert "demo-worker-0 failed with OOMKilled" in (status.message or "")


def test_the_same_failed_pods_seen_on_later_reconciles_count_nothing_new() -> None:
    the_job = three_node_job()
    pods = node_loss(1, T1)
    status = compute_status(the_job, FineTuneJobStatus(), running(*pods), T1)
    first = status
    for now in (T2, T3):
        status = compute_status(the_job, status, running(*pods), now)
    assert status.restarts == 1 and status.last_failure == first.last_failure

    # The training operator deletes them and creates the next round; the watch hands over their final state.
    fresh = [a_pod("demo-master-0", uid="m-2"), a_pod("demo-worker-0", "worker", uid="w0-2")]
    status = compute_status(the_job, status, running(*fresh, deleted=tuple(pods)), T4)
    assert status.restarts == 1 and status.last_failure == first.last_failure


def test_a_peer_lost_seen_before_its_cause_is_one_restart_and_the_cause_replaces_it() -> None:
    """The master's failure is seen first; the OOM-killed worker's a moment later."""
    the_job = three_node_job()
    worker, master, other = node_loss(1, T1)
    status = compute_status(the_job, FineTuneJobStatus(), running(master), T1)
    assert status.restarts == 1 and status.last_failure is not None
    assert status.last_failure.reason == "PeerLost"

    status = compute_status(the_job, status, running(master, worker, other), T2)
    assert status.restarts == 1
    assert status.last_failure is not None
    assert (status.last_failure.reason, status.last_failure.pod) == ("OOMKilled", "demo-worker-0")
    assert compute_status(the_job, status, running(master, worker, other), T3) == status


def test_the_cause_that_replaces_a_peer_lost_gets_an_event_of_its_own() -> None:
    """The restart's Warning named PeerLost, the first failure seen; when the OOM-killed worker shows up,
    `kubectl describe` says so too, once."""
    from kubetune.controller.changes import Transition, transition_events

    the_job = three_node_job()
    worker, master, other = node_loss(1, T1)
    announced = compute_status(the_job, FineTuneJobStatus(), running(master), T1)
    explained = compute_status(the_job, announced, running(master, worker, other), T2)

    events = transition_events(Transition(body={}, before=announced, after=explained))
    assert events == [
        (
            "Warning",
            "OOMKilled",
            "pod demo-worker-0 failed with OOMKilled, exit code 137: the cause of restart 1",
        )
    ]
    settled = compute_status(the_job, explained, running(master, worker, other), T3)
    assert transition_events(Transition(body={}, before=explained, after=settled)) == []


def test_a_lost_node_whose_pod_is_evicted_minutes_after_its_peers_exited_is_one_restart() -> None:
    """The node stops answering at T1; its pod turns not-ready 40 s later and the taint evicts it 300 s after
    that, while the master exited PeerLost at once and was already replaced."""
    the_job = three_node_job()
    master = peer_lost("demo-master-0", "m-1", seconds_after(T1, 2))
    status = compute_status(
        the_job, FineTuneJobStatus(), running(master, a_pod("demo-worker-0", "worker", uid="w0-1")), T1
    )
    assert status.restarts == 1

    not_ready, evicted = seconds_after(T1, 40), seconds_after(T1, 340)
    gone = a_pod(
        "demo-worker-0",
        "worker",
        uid="w0-1",
        conditions=[
            {"type": "Ready", "status": "False", "lastTransitionTime": not_ready},
            {
                "type": "DisruptionTarget",
                "status": "True",
                "reason": "DeletionByTaintManager",
                "message": "Taint manager: deleting due to NoExecute taint",
                "lastTransitionTime": evicted,
            },
        ],
    )
    new_master = a_pod("demo-master-0", uid="m-2")
    status = compute_status(the_job, status, running(new_master, gone), seconds_after(T1, 341))
    assert status.restarts == 1
    assert status.last_failure is not None
    assert (status.last_failure.reason, status.last_failure.pod) == ("Preempted", "demo-worker-0")
    again = compute_status(the_job, status, running(new_master, gone), seconds_after(T1, 350))
    assert (again.restarts, again.last_failure) == (status.restarts, status.last_failure)


def test_a_peer_lost_alone_still_counts_so_a_flapping_network_cannot_restart_a_job_forever() -> None:
    """The master exits PeerLost every five minutes and no other pod is seen failing."""
    the_job = three_node_job(backoff_limit=2)
    status = FineTuneJobStatus()
    for round_, at in enumerate((seconds_after(T1, 300 * n) for n in range(3)), start=1):
        master = peer_lost("demo-master-0", f"m-{round_}", at)
        status = compute_status(
            the_job, status, running(master, a_pod("demo-worker-0", "worker", uid="w0")), at
        )

    assert status.phase is Phase.FAILED
    assert conditions_of(status)["Failed"] == ("True", Reason.PEER_LOST)
    assert "backoff limit reached after 2 restart(s)" in (status.message or "")


def test_peers_that_exit_peer_lost_together_with_no_cause_in_sight_are_one_restart() -> None:
    pods = [peer_lost("demo-master-0", "m", T1), peer_lost("demo-worker-1", "w1", seconds_after(T1, 4))]
    status = compute_status(three_node_job(), FineTuneJobStatus(), running(*pods), T1)
    assert status.restarts == 1
    assert status.last_failure is not None and status.last_failure.pod == "demo-master-0"


def test_a_peer_lost_long_after_the_last_failure_is_a_new_restart() -> None:
    pods = [oom_killed("demo-worker-0", "w0", T1), peer_lost("demo-master-0", "m", T4)]
    status = compute_status(three_node_job(), FineTuneJobStatus(), running(*pods), T4)
    assert status.restarts == 2
    assert status.last_failure is not None and status.last_failure.reason == "PeerLost"


def test_a_3_node_job_with_the_default_backoff_limit_survives_three_lost_nodes_and_fails_on_the_fourth() -> (
    None
):
    """Counting every pod, the first lost node would have cost three restarts and the second ended the job.
    A node is lost every ten minutes."""
    the_job = three_node_job()
    status = FineTuneJobStatus()
    losses = [seconds_after(T1, 600 * n) for n in range(4)]
    for round_, at in enumerate(losses[:3], start=1):
        status = compute_status(the_job, status, running(*node_loss(round_, at)), at)
        assert status.phase is Phase.RUNNING and status.restarts == round_

    status = compute_status(the_job, status, running(*node_loss(4, losses[3])), losses[3])
    assert status.phase is Phase.FAILED and status.restarts == 3
    assert conditions_of(status)["Failed"] == ("True", Reason.OOM_KILLED)
    ended = find_condition(status.conditions, "Failed")
    assert ended is not None and "pod demo-worker-0 failed with OOMKilled" in ended.message
    assert "backoff limit reached after 3 restart(s)" in ended.message
    assert status.last_failure is not None and status.last_failure.pod_uid == "w0-4"


def test_a_failed_job_names_the_workers_error_not_the_masters_peer_lost() -> None:
    master = peer_lost("demo-master-0", "m", seconds_after(T1, 3))
    bad_row = {"exitCode": 1, "message": "InvalidDataset: row 7 has no 'output'", "finishedAt": T1}
    worker = failed("demo-worker-0", "w0", bad_row)
    failure = classify_failure(failed_with(master, worker))
    assert failure.reason is Reason.TRAINER_ERROR and "InvalidDataset" in failure.message
    assert classify_failure(failed_with(master)).reason is Reason.PEER_LOST
