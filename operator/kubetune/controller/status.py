"""Pure: what the PyTorchJob and its pods say -> the FineTuneJob's phase, conditions and message.

Nothing here talks to the API server. The reconciler reads the PyTorchJob and the pods, calls
`compute_status`, and writes the result only when it differs from what is stored. The evidence is read by
observed.py (the PyTorchJob's state), failures.py (why pods failed, across restarts) and cost.py (GPU seconds).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

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
from kubetune.controller.adapter import reported_adapter
from kubetune.controller.conditions import (
    ConditionStatus,
    find_condition,
    set_condition,
)
from kubetune.controller.cost import gpu_seconds
from kubetune.controller.failures import (
    Failure,
    FailureRecord,
    as_reason,
    backoff_message,
    classify_failure,
    describe_failure,
    event_time,
    lost_pods,
    record_failures,
    shorten,
)
from kubetune.controller.observed import (
    TERMINAL_PHASES,
    JobState,
    Manifest,
    Observed,
    condition_message,
    pytorchjob_state,
)
from kubetune.controller.pods import (
    pod_uid,
)
from kubetune.controller.queueing import waiting_message
from kubetune.controller.startup import StartLimits, stuck_start
from kubetune.render.labels import pytorchjob_name
from kubetune.render.pytorchjob import (
    SPEC_GENERATION_ANNOTATION,
    SPEC_HASH_ANNOTATION,
    spec_hash,
)


def _earliest_start(pods: Iterable[Manifest]) -> str | None:
    starts = []
    for pod in pods:
        for container in (pod.get("status") or {}).get("containerStatuses") or []:
            state = container.get("state") or {}
            started = (state.get("running") or state.get("terminated") or {}).get("startedAt")
            if started:
                starts.append(event_time(started, str(started)))
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


def _published(adapter: AdapterStatus | None, uri: str) -> str:
    text = f"training finished; the adapter is published to {uri}"
    if adapter is None or adapter.sha256 is None:
        return text
    return (
        f"{text} ({adapter.file_count} files, {adapter.size_bytes} bytes; "
        f"sha256 of kubetune-manifest.json {adapter.sha256})"
    )


def _summarise(
    job: FineTuneJob,
    state: JobState,
    observed: Observed,
    failures: FailureRecord,
    adapter: AdapterStatus | None,
    now: str,
    limits: StartLimits,
) -> tuple[Summary, Failure | None]:
    nodes, gpus = job.spec.resources.nodes, job.spec.resources.gpus_per_node
    if failures.backoff_exhausted and failures.last is not None:
        limit = job.spec.run_policy.backoff_limit
        failure = Failure(as_reason(failures.last.reason), backoff_message(failures, limit))
        return _summary(Phase.FAILED, "False", "False", failure.reason, failure.message), failure
    if state is JobState.ABSENT:
        return _summary(Phase.PENDING, "False", "True", Reason.CREATED, "creating the PyTorchJob"), None
    if state in (JobState.CREATED, JobState.RUNNING) and (stuck := stuck_start(observed.pods, now, limits)):
        # Waiting, not failed (an image pushed late or a freed GPU lets it start): Reconciling stays True,
        # so kstatus readers keep seeing InProgress.
        return _summary(Phase.PENDING, "False", "True", stuck.reason, stuck.message), None
    if state in (JobState.SUSPENDED, JobState.CREATED) and (
        queued := waiting_message(job, observed.workload)
    ):
        # Kueue holds the job (its PyTorchJob is suspended until admitted): waiting, not stopped.
        return _summary(Phase.PENDING, "False", "True", Reason.QUEUED, shorten(queued)), None
    if state is JobState.CREATED:
        text = f"PyTorchJob {pytorchjob_name(job)} created; waiting for {nodes} pod(s) to run"
        return _summary(Phase.PENDING, "False", "True", Reason.CREATED, text), None
    if state is JobState.SUSPENDED:
        text = "suspended: the pods are stopped; set spec.runPolicy.suspend to false to resume from the newest checkpoint"
        return _summary(Phase.SUSPENDED, "False", "False", Reason.SUSPENDED, text), None
    if state is JobState.SUCCEEDED:
        text = _published(adapter, job.spec.output.uri)
        return _summary(Phase.SUCCEEDED, "True", "False", Reason.SUCCEEDED, text), None
    if state is JobState.FAILED:
        failure = classify_failure(observed, failures.last)
        return _summary(Phase.FAILED, "False", "False", failure.reason, failure.message), failure
    if state is JobState.RESTARTING:
        text = condition_message(observed.pytorchjob, "Restarting") or "restarting failed pods"
        if failures.last is not None:
            text = f"{text} ({describe_failure(failures.last)})"
        return _summary(Phase.RUNNING, "False", "True", Reason.RESTARTING, shorten(text)), None
    if lost := lost_pods(observed):
        text = "; ".join(lost) + ": waiting for the pods to be evicted and recreated elsewhere"
        return _summary(Phase.RUNNING, "False", "True", Reason.NODE_LOST, text), None
    # Ready means the job reached what it was asked for (a published adapter): kstatus readers (Flux,
    # `kubectl wait`) see a training job as InProgress, not Current.
    text = f"training on {nodes} node(s) x {gpus} GPU(s)"
    return _summary(Phase.RUNNING, "False", "True", Reason.RUNNING, text), None


def made_from_this_generation(job: FineTuneJob, pytorchjob: Manifest) -> bool:
    """Whether this job, at its current generation, rendered the PyTorchJob: then the spec is unchanged."""
    metadata = pytorchjob.get("metadata") or {}
    generation = (metadata.get("annotations") or {}).get(SPEC_GENERATION_ANNOTATION)
    if job.metadata.generation is None or generation != str(job.metadata.generation):
        return False
    owners = metadata.get("ownerReferences") or []
    return any(o.get("controller") and o.get("uid") == job.metadata.uid for o in owners)


def spec_changed_message(
    job: FineTuneJob, pytorchjob: Manifest | None, digest: Callable[[], str] | None = None
) -> str | None:
    """Set when the spec differs from the one the PyTorchJob was made from (the CRD should have refused it).

    The spec hashes are compared only when the generations differ (a suspend or resume moves the generation
    and not the spec document), or the PyTorchJob predates its generation annotation. `digest` gives
    `spec_hash(job)` for a caller that keeps it: it renders the whole spec document.
    """
    if pytorchjob is None or made_from_this_generation(job, pytorchjob):
        return None
    annotations = (pytorchjob.get("metadata") or {}).get("annotations") or {}
    made_from = annotations.get(SPEC_HASH_ANNOTATION)
    if made_from is None or made_from == (digest() if digest is not None else spec_hash(job)):
        return None
    return (
        "the spec changed after the PyTorchJob was created and the change is not applied: only "
        "spec.runPolicy.suspend can change; create a new FineTuneJob for a different run"
    )


def has_ended(current: FineTuneJobStatus, state: JobState) -> bool:
    """The job ended earlier and its PyTorchJob no longer says so: it was stopped by the operator (backoff
    limit) or removed (ttlSecondsAfterFinished). An ended job stays ended."""
    return current.phase in TERMINAL_PHASES and state not in (JobState.SUCCEEDED, JobState.FAILED)


DEFAULT_START_LIMITS = StartLimits()


def compute_status(
    job: FineTuneJob,
    current: FineTuneJobStatus,
    observed: Observed,
    now: str,
    progress: Progress | None = None,
    digest: Callable[[], str] | None = None,
    limits: StartLimits = DEFAULT_START_LIMITS,
) -> FineTuneJobStatus:
    """The status a job should have now. `progress` replaces the stored progress when given; `digest` gives
    `spec_hash(job)`, for a caller that keeps it per generation."""
    generation = job.metadata.generation
    state = pytorchjob_state(observed.pytorchjob)
    ended = has_ended(current, state)
    gone = {pod_uid(pod) for pod in observed.deleted_pods}
    live = [pod for pod in observed.pods if pod_uid(pod) not in gone]
    every_pod = [*live, *observed.deleted_pods]
    restartable = not ended and state in (JobState.CREATED, JobState.RUNNING, JobState.RESTARTING)
    failures = record_failures(current, every_pod, job.spec.run_policy.backoff_limit, restartable, now)

    adapter = current.adapter
    succeeded = state is JobState.SUCCEEDED or (ended and current.phase is Phase.SUCCEEDED)
    if succeeded:
        adapter = (
            reported_adapter(every_pod, job.spec.output.uri)
            or adapter
            or AdapterStatus(uri=job.spec.output.uri)
        )

    conditions = list(current.conditions)

    def put(kind: ConditionType | str, values: tuple[ConditionStatus, Reason | str, str]) -> None:
        nonlocal conditions
        status, reason, message = values
        conditions = set_condition(conditions, kind, status, str(reason), message, generation, now)

    if ended:
        # Nothing moves any more; the conditions only take the current generation (kstatus readers
        # judge a status by it). A failure recorded before failures stalled the job is stalled now.
        for condition in current.conditions:
            put(condition.type, (condition.status, condition.reason, condition.message))
        failed = find_condition(current.conditions, ConditionType.FAILED)
        if current.phase is Phase.FAILED and failed is not None and failed.status == "True":
            put(ConditionType.STALLED, ("True", failed.reason, failed.message))
        phase, message = current.phase, current.message
    else:
        summary, failure = _summarise(job, state, observed, failures, adapter, now, limits)
        put(ConditionType.READY, summary.ready)
        put(ConditionType.RECONCILING, summary.reconciling)
        if failure is not None:
            # Terminal: kstatus reads Stalled=True as Failed, so a GitOps pipeline fails at once.
            put(ConditionType.STALLED, ("True", failure.reason, failure.message))
        elif changed := spec_changed_message(job, observed.pytorchjob, digest):
            # The operator will not apply the change: nothing is being reconciled towards it.
            put(ConditionType.RECONCILING, ("False", Reason.SPEC_CHANGED, changed))
            put(ConditionType.STALLED, ("True", Reason.SPEC_CHANGED, changed))
        else:
            put(ConditionType.STALLED, ("False", summary.ready[1], ""))
        done = summary.phase is Phase.SUCCEEDED
        put(
            ConditionType.SUCCEEDED,
            ("True" if done else "False", summary.ready[1], summary.message if done else ""),
        )
        put(
            ConditionType.FAILED,
            ("True", failure.reason, failure.message) if failure else ("False", summary.ready[1], ""),
        )
        phase, message = summary.phase, summary.message

    terminal = phase in TERMINAL_PHASES
    start_time = current.start_time
    if start_time is None and phase in (Phase.RUNNING, Phase.SUCCEEDED, Phase.FAILED):
        start_time = _earliest_start(every_pod) or (now if phase is Phase.RUNNING else None)
    completion_time = current.completion_time
    if terminal and completion_time is None:
        completion_time = str(((observed.pytorchjob or {}).get("status") or {}).get("completionTime") or now)
        if failures.backoff_exhausted:
            completion_time = now  # the PyTorchJob never completes: the operator stops it
    if not terminal:
        completion_time = None

    resource = job.spec.resources.gpu_resource_name
    banked = (current.gpu_seconds_of_deleted_pods or 0.0) + gpu_seconds(observed.deleted_pods, resource, now)
    cost = max(round(banked + gpu_seconds(live, resource, now), 1), current.gpu_seconds or 0.0)
    return current.model_copy(
        update={
            "phase": phase,
            "observed_generation": generation,
            "conditions": conditions,
            "pytorch_job": pytorchjob_name(job) if observed.pytorchjob is not None else current.pytorch_job,
            "progress": progress if progress is not None else current.progress,
            "adapter": adapter,
            "gpu_seconds": cost or None,
            "gpu_seconds_of_deleted_pods": round(banked, 1) or None,
            "restarts": failures.restarts,
            "last_failure": failures.last,
            "start_time": start_time,
            "completion_time": completion_time,
            "message": message,
        }
    )


def invalid_status(
    current: FineTuneJobStatus, generation: int | None, errors: Sequence[FieldError], now: str
) -> FineTuneJobStatus:
    """A spec only the operator can judge is wrong: Stalled, Failed, nothing created."""
    message = "invalid spec: " + "; ".join(str(e) for e in errors)
    return refused_status(current, generation, Reason.INVALID_SPEC, message, now)


def refused_status(
    current: FineTuneJobStatus, generation: int | None, reason: Reason, message: str, now: str
) -> FineTuneJobStatus:
    """The operator refuses the job before it creates anything (an invalid spec, a model that cannot fit
    its GPUs): Stalled, Failed, with the reason and what to change."""
    message = shorten(message)
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
            reason,
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
