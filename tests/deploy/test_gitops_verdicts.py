"""What GitOps tools conclude from the status the operator computes, judged by their own code.

Each FineTuneJob below gets its status from `compute_status` (or `invalid_status`), the operator's pure status
computation, from the PyTorchJob and pods of one story. Its object is then judged by:

- the real kstatus library (`sigs.k8s.io/cli-utils/pkg/kstatus/status.Compute`, built from hack/kstatus by
  hack/install-tools.sh): what Flux's kustomize-controller with `wait: true` and kstatus-based waits compute;
- the chart's Argo CD health check (docs/argocd/health.lua = charts/kubetune/files/argocd-health.lua).

A training job is InProgress until its adapter is published (Current); a failure is Failed at once, so a
pipeline fails instead of waiting for its timeout. A suspended job is InProgress: kstatus documents that a
resource whose Ready condition is False is "in the process of reconciling" (its README, "The Ready Condition"),
and a suspended job has not reached what it was asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from kubetune.api.v1alpha1 import FineTuneJob, FineTuneJobStatus, Phase, Reason, parse_job
from kubetune.api.validation import FieldError
from kubetune.controller.conditions import find_condition
from kubetune.controller.observed import Observed
from kubetune.controller.status import compute_status, invalid_status
from kubetune.render.pytorchjob import SPEC_HASH_ANNOTATION
from tests.builders import a_job
from tests.support.argocd import INTERPRETERS, argocd_health
from tests.support.kstatus import kstatus_verdicts as kstatus_verdicts_of

T0 = "2026-01-01T00:00:00Z"
T1 = "2026-01-01T00:01:00Z"
T2 = "2026-01-01T00:02:00Z"


def the_job(generation: int = 1) -> FineTuneJob:
    manifest = a_job().with_uid().on(nodes=1, gpus=8).as_manifest()
    manifest["metadata"]["generation"] = generation
    return parse_job(manifest)


def a_pytorchjob(*true_conditions: str, message: str = "", annotations: dict[str, str] | None = None) -> Any:
    conditions = [
        {"type": kind, "status": "True", "reason": f"PyTorchJob{kind}", "message": message}
        for kind in true_conditions
    ]
    status: dict[str, Any] = {"conditions": conditions}
    if "Succeeded" in true_conditions or "Failed" in true_conditions:
        status["completionTime"] = T2
    return {"metadata": {"name": "demo", "annotations": annotations or {}}, "status": status}


def a_trainer_pod(phase: str = "Running", terminated: dict[str, Any] | None = None) -> dict[str, Any]:
    state: dict[str, Any] = {"running": {"startedAt": T0}}
    if terminated is not None:
        state = {"terminated": {"startedAt": T0, "finishedAt": T1, **terminated}}
    return {
        "metadata": {
            "name": "demo-master-0",
            "uid": "uid-master-0",
            "labels": {"training.kubeflow.org/replica-type": "master"},
        },
        "spec": {"nodeName": "gpu-0", "containers": [{"name": "pytorch"}]},
        "status": {"phase": phase, "containerStatuses": [{"name": "pytorch", "state": state}]},
    }


def computed(observed: Observed, generation: int = 1) -> tuple[FineTuneJob, FineTuneJobStatus]:
    """The job and the status the operator computes for it from what it observed."""
    job = the_job(generation)
    return job, compute_status(job, FineTuneJobStatus(), observed, T2)


@dataclass(frozen=True)
class Story:
    make: Callable[[], tuple[FineTuneJob, FineTuneJobStatus]]
    kstatus: str
    argocd: str
    reason: str


def failed_before_stalled_was_set() -> tuple[FineTuneJob, FineTuneJobStatus]:
    """A job that failed under an operator that left Stalled False, seen again once its PyTorchJob is gone."""
    job, failed = computed(
        Observed(a_pytorchjob("Created", "Failed"), [a_trainer_pod("Failed", {"exitCode": 137})])
    )
    old_style = [
        c.model_copy(update={"status": "False", "message": ""}) if c.type == "Stalled" else c
        for c in failed.conditions
    ]
    recorded = failed.model_copy(update={"conditions": old_style})
    return job, compute_status(job, recorded, Observed(), T2)


def spec_changed() -> tuple[FineTuneJob, FineTuneJobStatus]:
    pytorchjob = a_pytorchjob("Created", "Running", annotations={SPEC_HASH_ANNOTATION: "another-spec"})
    return computed(Observed(pytorchjob, [a_trainer_pod()]), generation=2)


def older_generation() -> tuple[FineTuneJob, FineTuneJobStatus]:
    _, status = computed(Observed(a_pytorchjob("Created", "Running"), [a_trainer_pod()]))
    return the_job(generation=2), status


STORIES: dict[str, Story] = {
    "the PyTorchJob is created and its pods wait for GPUs": Story(
        lambda: computed(Observed(a_pytorchjob("Created"))), "InProgress", "Progressing", Reason.CREATED
    ),
    "training": Story(
        lambda: computed(Observed(a_pytorchjob("Created", "Running"), [a_trainer_pod()])),
        "InProgress",
        "Progressing",
        Reason.RUNNING,
    ),
    "a pod is being restarted": Story(
        lambda: computed(Observed(a_pytorchjob("Created", "Restarting"))),
        "InProgress",
        "Progressing",
        Reason.RESTARTING,
    ),
    "suspended by spec.runPolicy.suspend": Story(
        lambda: computed(Observed(a_pytorchjob("Created", "Suspended"))),
        "InProgress",
        "Suspended",
        Reason.SUSPENDED,
    ),
    "the adapter is published": Story(
        lambda: computed(
            Observed(
                a_pytorchjob("Created", "Succeeded"),
                [a_trainer_pod("Succeeded", {"exitCode": 0, "reason": "Completed"})],
            )
        ),
        "Current",
        "Healthy",
        Reason.SUCCEEDED,
    ),
    "the trainer is OOM-killed": Story(
        lambda: computed(
            Observed(
                a_pytorchjob("Created", "Failed"),
                [a_trainer_pod("Failed", {"exitCode": 137, "reason": "OOMKilled"})],
            )
        ),
        "Failed",
        "Degraded",
        Reason.OOM_KILLED,
    ),
    "the trainer fails on its data": Story(
        lambda: computed(
            Observed(
                a_pytorchjob("Created", "Failed"),
                [a_trainer_pod("Failed", {"exitCode": 1, "message": "InvalidDataset: no rows"})],
            )
        ),
        "Failed",
        "Degraded",
        Reason.TRAINER_ERROR,
    ),
    "the deadline passed": Story(
        lambda: computed(
            Observed(
                a_pytorchjob("Created", "Failed", message="job was active longer than specified deadline")
            )
        ),
        "Failed",
        "Degraded",
        Reason.DEADLINE_EXCEEDED,
    ),
    "a failure recorded before failures were stalled": Story(
        failed_before_stalled_was_set, "Failed", "Degraded", Reason.OOM_KILLED
    ),
    "an invalid spec only the operator can judge": Story(
        lambda: (
            the_job(),
            invalid_status(
                FineTuneJobStatus(), 1, [FieldError("spec.model.source", "pvc://gone: no such claim")], T0
            ),
        ),
        "Failed",
        "Degraded",
        Reason.INVALID_SPEC,
    ),
    "the spec changed after the PyTorchJob was made": Story(
        spec_changed, "Failed", "Degraded", Reason.SPEC_CHANGED
    ),
    "a new generation the operator has not seen yet": Story(
        older_generation, "InProgress", "Progressing", Reason.RUNNING
    ),
}


def as_object(job: FineTuneJob, status: FineTuneJobStatus) -> dict[str, Any]:
    """The object as `kubectl get -o yaml` shows it after the operator's status write."""
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": job.metadata.name, "namespace": "ml", "generation": job.metadata.generation},
        "status": status.to_wire(),
    }


OBJECTS = {story: as_object(*STORIES[story].make()) for story in STORIES}


@pytest.fixture(scope="module")
def kstatus_verdicts() -> dict[str, str]:
    """kstatus's verdict on each story's object."""
    verdicts = kstatus_verdicts_of(list(OBJECTS.values()))
    return {story: status for story, (status, _) in zip(STORIES, verdicts, strict=True)}


@pytest.mark.parametrize("story", STORIES)
def test_kstatus_reads_each_state_as_a_gitops_pipeline_needs(
    story: str, kstatus_verdicts: dict[str, str]
) -> None:
    assert kstatus_verdicts[story] == STORIES[story].kstatus


@pytest.mark.parametrize("interpreter", INTERPRETERS)
def test_the_argocd_health_check_reads_the_same_states(interpreter: str) -> None:
    health = argocd_health(interpreter, list(OBJECTS.values()))
    assert {story: status for story, (status, _) in zip(STORIES, health, strict=True)} == {
        story: expected.argocd for story, expected in STORIES.items()
    }


@pytest.mark.parametrize("story", [s for s, expected in STORIES.items() if expected.kstatus == "Failed"])
def test_a_failed_job_is_stalled_with_its_reason_and_neither_ready_nor_reconciling(story: str) -> None:
    _, status = STORIES[story].make()
    assert status.phase is Phase.FAILED or story.startswith("the spec changed")
    stalled = find_condition(status.conditions, "Stalled")
    assert stalled is not None and stalled.status == "True"
    assert stalled.reason == STORIES[story].reason and stalled.message
    for kind in ("Ready", "Reconciling"):
        condition = find_condition(status.conditions, kind)
        assert condition is not None and condition.status == "False", kind


def test_only_a_published_adapter_makes_a_job_ready() -> None:
    ready = {
        story
        for story, expected in STORIES.items()
        if (c := find_condition(expected.make()[1].conditions, "Ready")) is not None and c.status == "True"
    }
    assert ready == {"the adapter is published"}
