"""Pure: why a job's pods failed, from their terminations, conditions and nodes; and the failures the status
keeps across restarts (`lastFailure`, `restarts`), because the training operator deletes a failed pod to
restart it, and with it the evidence. One lost node is one restart (see `record_failures`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import timedelta

from kubetune.api.v1alpha1 import (
    FineTuneJobStatus,
    LastFailure,
    Reason,
)
from kubetune.controller.conditions import (
    parse_time,
    rfc3339,
)
from kubetune.controller.observed import (
    Manifest,
    Observed,
    condition_message,
)
from kubetune.controller.pods import (
    REPLICA_TYPE_LABEL,
    deletion_requested_at,
    pod_name,
    pod_uid,
    stopped_by_deletion,
    trainer_status,
)
from kubetune.render.pytorchjob import (
    CONTAINER_NAME,
)

MAX_MESSAGE = 4096


@dataclass(frozen=True)
class Failure:
    """Why a job failed, as a stable reason users can alert on and a message for people."""

    reason: Reason
    message: str


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
PEER_LOST_EXIT = 200
"""The trainer's exit code when another node of the job went away (kubetune_trainer.termination.EXIT_PEER_LOST;
the control plane does not import the trainer, a unit test keeps the two equal). Only that code is 200: a signal
gives at most 128 + 64."""


TRAINER_REASONS = frozenset(
    {
        Reason.INSUFFICIENT_GPU_MEMORY,
        Reason.STORAGE_AUTH_FAILED,
        Reason.NCCL_TIMEOUT,
        Reason.OUT_OF_MEMORY,
        Reason.SOURCE_NOT_FOUND,
        Reason.SOURCE_UNAVAILABLE,
    }
)
"""Reason words of the trainer's termination message (kubetune_trainer.termination) taken as they are."""


def classify_termination(exit_code: int | None, reason: str, message: str) -> Reason:
    """The failure reason of one terminated container from its exit code, reason and termination message.

    The trainer writes `Reason: message` lines; a reason word it shares with the API is taken as it is.
    `PeerLost` goes by the exit code alone: a pod whose own process was killed (137) may still hold a
    `PeerLost:` line that another of its processes wrote first (the launcher writes one too, when the
    rendezvous with the other nodes fails).
    """
    word = message.split(":", 1)[0].strip() if ":" in message else ""
    if word in TRAINER_REASONS:
        if word == Reason.SOURCE_UNAVAILABLE and STORAGE_AUTH.search(message):
            return Reason.STORAGE_AUTH_FAILED  # how trainers before StorageAuthFailed said it
        return Reason(word)
    if reason == "OOMKilled":
        return Reason.OOM_KILLED
    if exit_code == PEER_LOST_EXIT:
        return Reason.PEER_LOST
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


def replica_order(pod: Manifest) -> tuple[int, str]:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    is_master = str(labels.get(REPLICA_TYPE_LABEL, "")).lower() == "master"
    return (0 if is_master else 1, str((pod.get("metadata") or {}).get("name", "")))


def failed_terminations(pods: Iterable[Manifest]) -> list[Termination]:
    """Every non-zero container exit of the pods (current and previous runs), the master's first."""
    found: list[Termination] = []
    for pod in sorted(pods, key=replica_order):
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


def shorten(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 3] + "..."


# ------------------------------------------------------------------------------- failures across restarts


@dataclass(frozen=True)
class PodFailure:
    """One failed trainer pod, in the terms status.lastFailure keeps."""

    pod: str
    uid: str
    reason: Reason
    message: str
    exit_code: int | None
    time: str
    retryable: bool
    """Whether the training operator replaces the pod (restartPolicy ExitCode: exit codes 128 and up, or
    no exit code at all, as for an evicted pod)."""
    down_since: str = ""
    """When the pod stopped working, if before `time`: its Ready condition turned False. A pod on a lost
    node is evicted minutes after its node stopped answering (the taint's 300 s toleration), and the other
    nodes exited PeerLost when it stopped, not when it was evicted."""

    @property
    def peer_lost(self) -> bool:
        """The pod exited because another node of the job went away: a consequence, not a cause."""
        return self.reason is Reason.PEER_LOST

    def key(self) -> tuple[str, str]:
        """Failures are counted in this order, each once (RFC 3339 in UTC sorts as text)."""
        return (self.time, self.uid)

    def as_status(self) -> LastFailure:
        return LastFailure(
            reason=self.reason,
            message=shorten(self.message),
            pod=self.pod,
            pod_uid=self.uid or None,
            exit_code=self.exit_code,
            time=self.time,
        )


RETRYABLE_EXIT = 128


def event_time(value: object, default: str) -> str:
    """A timestamp as Kubernetes writes it (…Z): a pod read through the client library says +00:00, the same
    pod in a watch event says Z, and both must compare equal."""
    moment = parse_time(str(value)) if value else None
    return rfc3339(moment) if moment is not None else default


def _not_ready_since(pod: Manifest) -> str | None:
    """When the pod's Ready condition turned False, if it is False."""
    for item in (pod.get("status") or {}).get("conditions") or []:
        if item.get("type") == "Ready" and item.get("status") == "False" and item.get("lastTransitionTime"):
            return event_time(item["lastTransitionTime"], "")
    return None


def pod_failure(pod: Manifest, now: str) -> PodFailure | None:
    """How the pod failed, or None when it did not (a pod stopped because it was deleted did not fail)."""
    failure = _pod_failure(pod, now)
    if failure is None:
        return None
    not_ready = _not_ready_since(pod)
    down_since = min(not_ready, failure.time) if not_ready else failure.time  # RFC 3339 in UTC sorts as text
    return replace(failure, down_since=down_since)


def _pod_failure(pod: Manifest, now: str) -> PodFailure | None:
    name, uid = pod_name(pod), pod_uid(pod)
    container = trainer_status(pod) or {}
    terminated = (container.get("state") or {}).get("terminated") or {}
    exit_code = terminated.get("exitCode") if isinstance(terminated.get("exitCode"), int) else None
    if disrupted := _disrupted(pod):
        when = next(
            (
                event_time(c.get("lastTransitionTime"), now)
                for c in (pod.get("status") or {}).get("conditions") or []
                if c.get("type") == "DisruptionTarget" and c.get("lastTransitionTime")
            ),
            event_time(terminated.get("finishedAt"), now),
        )
        return PodFailure(name, uid, Reason.PREEMPTED, disrupted, exit_code, when, retryable=True)
    if exit_code not in (0, None):
        finished = event_time(terminated.get("finishedAt"), now)
        if stopped_by_deletion(pod, parse_time(finished)):
            return None
        message = str(terminated.get("message") or "").strip()
        reason = classify_termination(exit_code, str(terminated.get("reason") or ""), message)
        retryable = exit_code is not None and exit_code >= RETRYABLE_EXIT
        return PodFailure(name, uid, reason, message, exit_code, finished, retryable)
    status = pod.get("status") or {}
    if status.get("phase") == "Failed" and exit_code is None and deletion_requested_at(pod) is None:
        detail = str(status.get("message") or status.get("reason") or "the pod failed")
        # The newest condition change is when it failed: a time that stays the same on every reconcile.
        changes = [
            str(c.get("lastTransitionTime"))
            for c in status.get("conditions") or []
            if c.get("lastTransitionTime")
        ]
        when = max((event_time(change, now) for change in changes), default=now)
        return PodFailure(name, uid, Reason.TRAINER_ERROR, detail, None, when, retryable=True)
    return None


@dataclass(frozen=True)
class FailureRecord:
    """What status keeps of the failures seen so far, and whether the backoff limit ends the job now."""

    restarts: int
    last: LastFailure | None
    backoff_exhausted: bool = False


INCIDENT_WINDOW = timedelta(seconds=120)
"""How far apart, by failure time, a PeerLost and the failure that caused it may lie."""


def _within_incident(moment: str, since: str, until: str) -> bool:
    """Whether `moment` lies within INCIDENT_WINDOW of the span [since, until] of one pod's failure."""
    at, start, end = parse_time(moment), parse_time(since), parse_time(until)
    if at is None or start is None or end is None:
        return False
    return start - INCIDENT_WINDOW <= at <= end + INCIDENT_WINDOW


def _is_peer_lost(failure: LastFailure) -> bool:
    return failure.reason == Reason.PEER_LOST


def record_failures(
    current: FineTuneJobStatus, pods: Iterable[Manifest], backoff_limit: int, restartable: bool, now: str
) -> FailureRecord:
    """Count each new pod failure once, oldest first, against spec.runPolicy.backoffLimit; one lost node
    costs one restart.

    A failure is new when it is later than status.lastFailure (by time, then pod UID) and not of the same
    pod (a pod fails once: the training operator replaces it), so a failed pod seen again on the next
    reconcile is not counted twice. A retryable failure within the limit is a restart; one past it
    exhausts the limit. The training operator (v1.9) counts restarts only from container restart counts,
    which stay 0 for the pods it deletes and recreates under restartPolicy ExitCode, so without this count
    an OOM-killed trainer would be restarted forever.

    When one node of an N-node job goes away, the trainers on the other nodes exit PeerLost (200): their
    collective or rendezvous failed because of it. The whole gang restarts once, so that is one restart:

    - A PeerLost whose failure time lies within INCIDENT_WINDOW (either side) of status.lastFailure, a
      failure of another pod, is its consequence: it is not counted, and lastFailure keeps the cause, the
      reason users and the Warning event see. It is judged the same way on every reconcile (lastFailure does
      not move for it), and one past the window counts again.
    - A PeerLost with no such failure in sight counts like any other failure and becomes lastFailure:
      a flapping network restarts the job at most backoffLimit times. Further PeerLosts of other pods within
      the window of it are part of the same restart.
    - A failure other than PeerLost whose span (from when its pod stopped being ready to when it failed)
      lies within the window of a PeerLost recorded as lastFailure is the cause of that restart: it
      replaces lastFailure and is not counted again. It may fail before the PeerLost and be seen after it,
      or fail minutes after it (a lost node's pod turns not-ready some 40 s after its node stopped
      answering and is evicted 300 s later, while the other nodes exit PeerLost at once).

    Why it stays a count of each failure once: lastFailure (its time and pod UID) is the mark that every
    reconcile judges the same pods against, and it moves only when a failure is counted or replaces a
    PeerLost as its cause; an absorbed PeerLost leaves it where it is, and is absorbed again next time.
    Two failures that are not PeerLost always count twice (two pods OOM-killed together), and only a
    counted PeerLost is replaced by its cause, so every restart stays paid for. What it costs: a real
    failure of another pod within the window of a counted PeerLost is taken for its cause (one restart
    fewer); and when a PeerLost is recorded before a cause that failed earlier, a second PeerLost between
    the window of the first and the window of the cause is counted once the cause is seen.
    """
    restarts, last = current.restarts or 0, current.last_failure
    seen = (last.time or "", last.pod_uid or "") if last is not None else None
    exhausted = False
    failures = sorted((f for pod in pods if (f := pod_failure(pod, now)) is not None), key=PodFailure.key)
    for failure in failures:
        if last is not None and failure.uid == last.pod_uid:
            continue
        cause_of_last = (
            last is not None
            and last.time is not None
            and _is_peer_lost(last)
            and not failure.peer_lost
            and _within_incident(last.time, failure.down_since or failure.time, failure.time)
        )
        if cause_of_last:
            last, seen = failure.as_status(), failure.key()  # the restart was counted for its PeerLost
            continue
        if seen is not None and failure.key() <= seen:
            continue
        if (
            failure.peer_lost
            and last is not None
            and last.time is not None
            and _within_incident(failure.time, last.time, last.time)
        ):
            continue  # a consequence of the failure recorded: no restart, lastFailure keeps the cause
        if failure.retryable and restartable:
            if restarts < backoff_limit:
                restarts += 1
            else:
                exhausted = True
        last, seen = failure.as_status(), failure.key()
    return FailureRecord(restarts, last, exhausted)


def as_reason(text: str) -> Reason:
    """A stored reason back as a Reason (a status edited by hand may hold anything)."""
    try:
        return Reason(text)
    except ValueError:
        return Reason.TRAINER_ERROR


def describe_failure(last: LastFailure) -> str:
    code = f", exit code {last.exit_code}" if last.exit_code is not None else ""
    detail = f": {last.message}" if last.message else ""
    return f"pod {last.pod} failed with {last.reason}{code}{detail}"


def backoff_message(record: FailureRecord, backoff_limit: int) -> str:
    assert record.last is not None
    return shorten(
        f"{describe_failure(record.last)}; backoff limit reached after {record.restarts} restart(s) "
        f"(spec.runPolicy.backoffLimit {backoff_limit})"
    )


def classify_failure(observed: Observed, last: LastFailure | None = None) -> Failure:
    """Why a failed PyTorchJob failed, from the most specific evidence to the least.

    Pods still there speak first (a pod that exited PeerLost only after the others: it names the node that
    went away, not why); then `last`, the failure status kept from a pod already replaced; a bare
    backoff-limit message from the training operator is the last resort.
    """
    job_message = condition_message(observed.pytorchjob, "Failed")
    backoff = "backoff limit" in job_message.lower()
    if "deadline" in job_message.lower():
        return Failure(Reason.DEADLINE_EXCEEDED, job_message)
    pods = [*observed.pods, *observed.deleted_pods]
    for pod in pods:
        if disrupted := _disrupted(pod):
            return Failure(Reason.PREEMPTED, disrupted)
    if lost := lost_pods(observed):
        return Failure(Reason.NODE_LOST, "; ".join(lost))
    classified = [
        (t, classify_termination(t.exit_code, t.reason, t.message)) for t in failed_terminations(pods)
    ]
    if classified:
        first, reason = next(
            ((t, reason) for t, reason in classified if reason is not Reason.PEER_LOST), classified[0]
        )
        detail = first.message or first.reason or "no termination message"
        message = f"{detail} (pod {first.pod}, exit code {first.exit_code})"
        if backoff:
            message += "; backoff limit reached"
        return Failure(reason, shorten(message))
    if last is not None:
        suffix = "; backoff limit reached" if backoff else ""
        return Failure(as_reason(last.reason), shorten(describe_failure(last) + suffix))
    if backoff:
        return Failure(Reason.BACKOFF_LIMIT_EXCEEDED, job_message)
    return Failure(Reason.TRAINER_ERROR, job_message or "the PyTorchJob failed")
