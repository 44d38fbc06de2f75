"""Pure: a status change and what follows from it: whether it is one (`without_cost`), the merge patch that
writes it, and the events it deserves; the stored status and spec as the models read them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubetune.api.v1alpha1 import (
    ConditionType,
    FineTuneJobStatus,
    Phase,
    Reason,
)
from kubetune.controller.children import Manifest
from kubetune.controller.conditions import find_condition
from kubetune.controller.failures import describe_failure


def without_status(body: Mapping[str, Any]) -> Manifest:
    """The parts of a FineTuneJob the spec model validates."""
    return {key: body[key] for key in ("apiVersion", "kind", "metadata", "spec") if key in body}


def stored_status(body: Mapping[str, Any]) -> FineTuneJobStatus:
    """The status as stored; a status this version cannot read starts over rather than blocking the job."""
    try:
        return FineTuneJobStatus.model_validate(body.get("status") or {})
    except ValueError:
        return FineTuneJobStatus()


def status_patch(new: FineTuneJobStatus, current: FineTuneJobStatus) -> Manifest:
    """A merge patch that turns `current` into `new`: fields gone from `new` are set to null."""
    wire = new.to_wire()
    for key in current.to_wire():
        wire.setdefault(key, None)
    return wire


@dataclass(frozen=True)
class Transition:
    """What changed in one status write, for the events that follow it."""

    body: Manifest
    before: FineTuneJobStatus
    after: FineTuneJobStatus


def without_cost(status: FineTuneJobStatus) -> FineTuneJobStatus:
    """The status without the GPU seconds of running pods, which grow every second: they are written
    along with every other change (progress, a phase, a restart), never on their own."""
    return status.model_copy(update={"gpu_seconds": None})


def transition_events(change: Transition) -> list[tuple[str, str, str]]:
    """(type, reason, message) of the events a status change deserves: phase changes, restarts, new stalls.

    A new job's first phase, Pending, gets none: every job starts there, and the event would be one more
    API write per job for nothing `kubectl get` does not show.
    """
    before, after = change.before, change.after
    events: list[tuple[str, str, str]] = []
    last = after.last_failure
    if (after.restarts or 0) > (before.restarts or 0) and last is not None:
        events.append(
            ("Warning", last.reason, f"{describe_failure(last)}; replaced (restart {after.restarts})")
        )
    elif _cause_found(before, after) and last is not None:
        events.append(
            ("Warning", last.reason, f"{describe_failure(last)}: the cause of restart {after.restarts}")
        )
    stalled_before = find_condition(before.conditions, ConditionType.STALLED)
    stalled_after = find_condition(after.conditions, ConditionType.STALLED)
    if (
        stalled_after is not None
        and stalled_after.status == "True"
        and (
            stalled_before is None
            or stalled_before.status != "True"
            or stalled_before.reason != stalled_after.reason
        )
    ):
        events.append(("Warning", stalled_after.reason, stalled_after.message))
    if after.phase != before.phase and after.phase is not None:
        if after.phase is Phase.FAILED:
            failed = find_condition(after.conditions, ConditionType.FAILED)
            if not (stalled_after is not None and stalled_after.status == "True"):
                reason = failed.reason if failed else "Failed"
                events.append(("Warning", reason, after.message or ""))
        elif not (before.phase is None and after.phase is Phase.PENDING):
            events.append(("Normal", after.phase.value, after.message or ""))
    return events


def _cause_found(before: FineTuneJobStatus, after: FineTuneJobStatus) -> bool:
    """A restart announced as PeerLost (a survivor's failure, seen first) whose cause, another pod's
    failure, has just replaced it in lastFailure: `kubectl describe` should show the cause too."""
    old, new = before.last_failure, after.last_failure
    return (
        old is not None
        and new is not None
        and old.reason == Reason.PEER_LOST
        and new.reason != Reason.PEER_LOST
        and new.pod_uid != old.pod_uid
        and after.restarts == before.restarts
        and after.phase == before.phase
    )
