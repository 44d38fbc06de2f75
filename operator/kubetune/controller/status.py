"""Pure: what the PyTorchJob and its pods say -> the FineTuneJob's phase, conditions and failure reason.

Nothing here talks to the API server. The handlers read the PyTorchJob and the pods, call
`compute_status`, and write the result only when it differs from what is stored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from kubetune.api.v1alpha1 import (
    AdapterStatus,
    ConditionType,
    FineTuneJob,
    FineTuneJobStatus,
    Phase,
    Progress,
    Reason,
)
from kubetune.api.validation import FieldError
from kubetune.controller.conditions import ConditionStatus, parse_time, set_condition
from kubetune.render.labels import pytorchjob_name
from kubetune.render.pytorchjob import CONTAINER_NAME, SPEC_HASH_ANNOTATION, spec_hash

Manifest = Mapping[str, Any]

REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
REPLICA_INDEX_LABEL = "training.kubeflow.org/replica-index"
MAX_MESSAGE = 4096


class JobState(StrEnum):
    """Where the PyTorchJob is, from its conditions."""

    ABSENT = "Absent"
    CREATED = "Created"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


@dataclass(frozen=True)
class Observed:
    """What the operator saw of one job's children at one moment."""

    pytorchjob: Manifest | None = None
    pods: Sequence[Manifest] = ()
    lost_nodes: frozenset[str] = field(default_factory=frozenset)
    """Nodes whose Ready condition is not True (a pod there is not really running)."""


@dataclass(frozen=True)
class Failure:
    """Why a job failed, as a stable reason users can alert on and a message for people."""

    reason: Reason
    message: str


def _true_conditions(obj: Manifest | None) -> set[str]:
    conditions = ((obj or {}).get("status") or {}).get("conditions") or []
    return {c.get("type", "") for c in conditions if c.get("status") == "True"}


def _condition_message(obj: Manifest | None, condition_type: str) -> str:
    for item in ((obj or {}).get("status") or {}).get("conditions") or []:
        if item.get("type") == condition_type:
            return str(item.get("message") or "")
    return ""


def pytorchjob_state(pytorchjob: Manifest | None) -> JobState:
    """The PyTorchJob's state; terminal conditions win over the rest."""
    if pytorchjob is None:
        return JobState.ABSENT
    true = _true_conditions(pytorchjob)
    for state in (
        JobState.SUCCEEDED,
        JobState.FAILED,
        JobState.SUSPENDED,
        JobState.RESTARTING,
        JobState.RUNNING,
    ):
        if state.value in true:
            return state
    return JobState.CREATED


# ----------------------------------------------------------------------------------------- failure reasons

NCCL_TIMEOUT = re.compile(
    r"NCCL[^\n]*(time[ds]?[ -]?out)|Watchdog caught collective operation timeout|ProcessGroupNCCL[^\n]*Timeout",
    re.IGNORECASE,
)
SHARED_MEMORY = re.compile(
    r"/dev/shm|shared memory|shm_open|unable to (write|mmap)[^\n]*torch_|\bBus error\b", re.IGNORECASE
)
STORAGE_AUTH = re.compile(
    r"AccessDenied|InvalidAccessKeyId|SignatureDoesNotMatch|ExpiredToken|InvalidToken|NoCredentialsError|"
    r"Unable to locate credentials|\b403\b[^\n]*Forbidden|\b401\b[^\n]*Unauthorized",
    re.IGNORECASE,
)
SIGKILL_EXIT = 137
SIGBUS_EXIT = 135


def classify_termination(exit_code: int | None, reason: str, message: str) -> Reason:
    """The failure reason of one terminated container from its exit code, reason and termination message.

    The trainer writes `Reason: message` lines; a reason word it shares with the API is taken as it is.
    """
    word = message.split(":", 1)[0].strip() if ":" in message else ""
    if word in (Reason.INSUFFICIENT_GPU_MEMORY, Reason.STORAGE_AUTH_FAILED, Reason.NCCL_TIMEOUT):
        return Reason(word)
    if reason == "OOMKilled":
        return Reason.OOM_KILLED
    if NCCL_TIMEOUT.search(message):
        return Reason.NCCL_TIMEOUT
    if STORAGE_AUTH.search(message):
        return Reason.STORAGE_AUTH_FAILED
    if exit_code == SIGBUS_EXIT or SHARED_MEMORY.search(message):
        return Reason.SHARED_MEMORY_EXHAUSTED
    if exit_code == SIGKILL_EXIT:
        # The kernel's OOM killer is the usual SIGKILL of a training process; preemption is told apart
        # by the pod's DisruptionTarget condition before we get here.
        return Reason.OOM_KILLED
    return Reason.TRAINER_ERROR


@dataclass(frozen=True)
class Termination:
    pod: str
    container: str
    exit_code: int | None
    reason: str
    message: str


def _replica_order(pod: Manifest) -> tuple[int, str]:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    is_master = str(labels.get(REPLICA_TYPE_LABEL, "")).lower() == "master"
    return (0 if is_master else 1, str((pod.get("metadata") or {}).get("name", "")))


def failed_terminations(pods: Iterable[Manifest]) -> list[Termination]:
    """Every non-zero container exit of the pods (current and previous runs), the master's first."""
    found: list[Termination] = []
    for pod in sorted(pods, key=_replica_order):
        name = str((pod.get("metadata") or {}).get("name", ""))
        statuses = (pod.get("status") or {}).get("containerStatuses") or []
        for container in sorted(statuses, key=lambda c: c.get("name") != CONTAINER_NAME):
            for state in (container.get("state") or {}, container.get("lastState") or {}):
                terminated = state.get("terminated")
                if not terminated or terminated.get("exitCode") in (0, None):
                    continue
                found.append(
                    Termination(
                        pod=name,
                        container=str(container.get("name", "")),
                        exit_code=terminated.get("exitCode"),
                        reason=str(terminated.get("reason") or ""),
                        message=str(terminated.get("message") or "").strip(),
                    )
                )
    return found


def _disrupted(pod: Manifest) -> str | None:
    """A message when the pod was evicted or preempted, else None."""
    status = pod.get("status") or {}
    name = (pod.get("metadata") or {}).get("name", "")
    if status.get("reason") in ("Evicted", "Preempting", "Preempted"):
        return f"pod {name} was {str(status['reason']).lower()}: {status.get('message') or ''}".strip(": ")
    for item in status.get("conditions") or []:
        if item.get("type") == "DisruptionTarget" and item.get("status") == "True":
            detail = item.get("message") or item.get("reason") or "disrupted"
            return f"pod {name} was disrupted: {detail}"
    return None


def lost_pods(observed: Observed) -> list[str]:
    """Messages for pods that sit on a node that stopped reporting."""
    messages = []
    for pod in observed.pods:
        status = pod.get("status") or {}
        if status.get("phase") not in ("Running", "Pending"):
            continue
        name = (pod.get("metadata") or {}).get("name", "")
        node = (pod.get("spec") or {}).get("nodeName")
        unready = any(
            c.get("type") == "Ready"
            and c.get("status") != "True"
            and c.get("reason") in ("NodeLost", "NodeNotReady")
            for c in status.get("conditions") or []
        )
        if status.get("reason") == "NodeLost" or unready or (node and node in observed.lost_nodes):
            messages.append(f"pod {name} is on node {node}, which stopped reporting")
    return messages


def _shorten(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 3] + "..."


def classify_failure(observed: Observed) -> Failure:
    """Why a failed PyTorchJob failed, from the most specific evidence to the least."""
    job_message = _condition_message(observed.pytorchjob, "Failed")
    if "deadline" in job_message.lower():
        return Failure(Reason.DEADLINE_EXCEEDED, job_message)
    for pod in observed.pods:
        if disrupted := _disrupted(pod):
            return Failure(Reason.PREEMPTED, disrupted)
    if lost := lost_pods(observed):
        return Failure(Reason.NODE_LOST, "; ".join(lost))
    terminations = failed_terminations(observed.pods)
    if terminations:
        first = terminations[0]
        reason = classify_termination(first.exit_code, first.reason, first.message)
        detail = first.message or first.reason or "no termination message"
        message = f"{detail} (pod {first.pod}, exit code {first.exit_code})"
        if "backoff limit" in job_message.lower():
            message += "; backoff limit reached"
        return Failure(reason, _shorten(message))
    if "backoff limit" in job_message.lower():
        return Failure(Reason.BACKOFF_LIMIT_EXCEEDED, job_message)
    return Failure(Reason.TRAINER_ERROR, job_message or "the PyTorchJob failed")


# ------------------------------------------------------------------------------------------- GPU seconds


def _pod_gpus(pod: Manifest, resource_name: str) -> int:
    total = 0
    for container in (pod.get("spec") or {}).get("containers") or []:
        limits = (container.get("resources") or {}).get("limits") or {}
        try:
            total += int(str(limits.get(resource_name, 0)))
        except ValueError:
            continue
    return total


def gpu_seconds(pods: Iterable[Manifest], resource_name: str, now: str) -> float:
    """GPUs x seconds the pods' trainer containers have run (current runs of the pods that still exist)."""
    end_of_now = parse_time(now)
    total = 0.0
    for pod in pods:
        gpus = _pod_gpus(pod, resource_name)
        if not gpus:
            continue
        for container in (pod.get("status") or {}).get("containerStatuses") or []:
            if container.get("name") != CONTAINER_NAME:
                continue
            state = container.get("state") or {}
            if running := state.get("running"):
                start, end = parse_time(running.get("startedAt")), end_of_now
            elif terminated := state.get("terminated"):
                start, end = parse_time(terminated.get("startedAt")), parse_time(terminated.get("finishedAt"))
            else:
                continue
            if start and end and end > start:
                total += gpus * (end - start).total_seconds()
    return round(total, 1)


def _earliest_start(pods: Iterable[Manifest]) -> str | None:
    starts = []
    for pod in pods:
        for container in (pod.get("status") or {}).get("containerStatuses") or []:
            state = container.get("state") or {}
            started = (state.get("running") or state.get("terminated") or {}).get("startedAt")
            if started:
                starts.append(str(started))
    return min(starts) if starts else None  # RFC 3339 in UTC sorts as text


# ------------------------------------------------------------------------------------------ the status


@dataclass(frozen=True)
class Summary:
    """Phase and the three kstatus conditions for one state."""

    phase: Phase
    ready: tuple[ConditionStatus, Reason, str]
    reconciling: tuple[ConditionStatus, Reason, str]
    message: str


def _summary(
    phase: Phase, ready: ConditionStatus, reconciling: ConditionStatus, reason: Reason, text: str
) -> Summary:
    return Summary(phase, (ready, reason, text), (reconciling, reason, text), text)


def _summarise(job: FineTuneJob, state: JobState, observed: Observed) -> tuple[Summary, Failure | None]:
    nodes, gpus = job.spec.resources.nodes, job.spec.resources.gpus_per_node
    if state is JobState.ABSENT:
        return _summary(Phase.PENDING, "False", "True", Reason.CREATED, "creating the PyTorchJob"), None
    if state is JobState.CREATED:
        text = f"PyTorchJob {pytorchjob_name(job)} created; waiting for {nodes} pod(s) to run"
        return _summary(Phase.PENDING, "False", "True", Reason.CREATED, text), None
    if state is JobState.SUSPENDED:
        text = "suspended: the pods are stopped; set spec.runPolicy.suspend to false to resume from the newest checkpoint"
        return _summary(Phase.SUSPENDED, "False", "False", Reason.SUSPENDED, text), None
    if state is JobState.SUCCEEDED:
        text = f"training finished; the adapter is published to {job.spec.output.uri}"
        return _summary(Phase.SUCCEEDED, "True", "False", Reason.SUCCEEDED, text), None
    if state is JobState.FAILED:
        failure = classify_failure(observed)
        return _summary(Phase.FAILED, "False", "False", failure.reason, failure.message), failure
    if state is JobState.RESTARTING:
        text = _condition_message(observed.pytorchjob, "Restarting") or "restarting failed pods"
        return _summary(Phase.RUNNING, "False", "True", Reason.RESTARTING, text), None
    if lost := lost_pods(observed):
        text = "; ".join(lost) + ": waiting for the pods to be evicted and recreated elsewhere"
        return _summary(Phase.RUNNING, "False", "True", Reason.NODE_LOST, text), None
    text = f"training on {nodes} node(s) x {gpus} GPU(s)"
    return _summary(Phase.RUNNING, "True", "False", Reason.RUNNING, text), None


def spec_changed_message(job: FineTuneJob, pytorchjob: Manifest | None) -> str | None:
    """Set when the spec differs from the one the PyTorchJob was made from (the CRD should have refused it)."""
    if pytorchjob is None:
        return None
    annotations = (pytorchjob.get("metadata") or {}).get("annotations") or {}
    made_from = annotations.get(SPEC_HASH_ANNOTATION)
    if made_from is None or made_from == spec_hash(job):
        return None
    return (
        "the spec changed after the PyTorchJob was created and the change is not applied: only "
        "spec.runPolicy.suspend can change; create a new FineTuneJob for a different run"
    )


def compute_status(
    job: FineTuneJob,
    current: FineTuneJobStatus,
    observed: Observed,
    now: str,
    progress: Progress | None = None,
) -> FineTuneJobStatus:
    """The status a job should have now. `progress` replaces the stored progress when given."""
    generation = job.metadata.generation
    state = pytorchjob_state(observed.pytorchjob)
    summary, failure = _summarise(job, state, observed)
    conditions = list(current.conditions)

    def put(kind: ConditionType, values: tuple[ConditionStatus, Reason | str, str]) -> None:
        nonlocal conditions
        status, reason, message = values
        conditions = set_condition(conditions, kind, status, str(reason), message, generation, now)

    put(ConditionType.READY, summary.ready)
    put(ConditionType.RECONCILING, summary.reconciling)
    if changed := spec_changed_message(job, observed.pytorchjob):
        put(ConditionType.STALLED, ("True", Reason.SPEC_CHANGED, changed))
    else:
        put(ConditionType.STALLED, ("False", summary.ready[1], ""))
    succeeded = state is JobState.SUCCEEDED
    put(
        ConditionType.SUCCEEDED,
        ("True" if succeeded else "False", summary.ready[1], summary.message if succeeded else ""),
    )
    put(
        ConditionType.FAILED,
        ("True", failure.reason, failure.message) if failure else ("False", summary.ready[1], ""),
    )

    terminal = summary.phase in (Phase.SUCCEEDED, Phase.FAILED)
    start_time = current.start_time
    if start_time is None and summary.phase in (Phase.RUNNING, Phase.SUCCEEDED, Phase.FAILED):
        start_time = _earliest_start(observed.pods) or (now if summary.phase is Phase.RUNNING else None)
    completion_time = current.completion_time
    if terminal and completion_time is None:
        completion_time = str(((observed.pytorchjob or {}).get("status") or {}).get("completionTime") or now)
    if not terminal:
        completion_time = None
    cost = gpu_seconds(observed.pods, job.spec.resources.gpu_resource_name, now)
    adapter = current.adapter
    if succeeded and adapter is None:
        adapter = AdapterStatus(uri=job.spec.output.uri)
    return current.model_copy(
        update={
            "phase": summary.phase,
            "observed_generation": generation,
            "conditions": conditions,
            "pytorch_job": pytorchjob_name(job) if observed.pytorchjob is not None else current.pytorch_job,
            "progress": progress if progress is not None else current.progress,
            "adapter": adapter,
            "gpu_seconds": max(cost, current.gpu_seconds or 0.0) if (cost or current.gpu_seconds) else None,
            "start_time": start_time,
            "completion_time": completion_time,
            "message": summary.message,
        }
    )


def invalid_status(
    current: FineTuneJobStatus, generation: int | None, errors: Sequence[FieldError], now: str
) -> FineTuneJobStatus:
    """A spec only the operator can judge is wrong: Stalled, Failed, nothing created."""
    message = _shorten("invalid spec: " + "; ".join(str(e) for e in errors))
    conditions = list(current.conditions)
    settings: tuple[tuple[ConditionType, ConditionStatus], ...] = (
        (ConditionType.READY, "False"),
        (ConditionType.RECONCILING, "False"),
        (ConditionType.STALLED, "True"),
        (ConditionType.SUCCEEDED, "False"),
        (ConditionType.FAILED, "True"),
    )
    for kind, status in settings:
        conditions = set_condition(
            conditions,
            kind,
            status,
            Reason.INVALID_SPEC,
            message if status == "True" or kind is ConditionType.READY else "",
            generation,
            now,
        )
    return current.model_copy(
        update={
            "phase": Phase.FAILED,
            "observed_generation": generation,
            "conditions": conditions,
            "message": message,
            "completion_time": current.completion_time or now,
        }
    )
