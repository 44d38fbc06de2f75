"""Pure: what the operator saw of one job's children, and where its PyTorchJob is from its conditions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from kubetune.api.v1alpha1 import (
    Phase,
)

Manifest = Mapping[str, Any]

TERMINAL_PHASES = (Phase.SUCCEEDED, Phase.FAILED)


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
    deleted_pods: Sequence[Manifest] = ()
    """Pods a watch reported deleted, in their final state: their GPU time is banked in the status."""
    workload: Manifest | None = None
    """Kueue's Workload of the PyTorchJob, for a job with spec.scheduling.queueName."""


def true_conditions(obj: Manifest | None) -> set[str]:
    conditions = ((obj or {}).get("status") or {}).get("conditions") or []
    return {c.get("type", "") for c in conditions if c.get("status") == "True"}


def condition_message(obj: Manifest | None, condition_type: str) -> str:
    for item in ((obj or {}).get("status") or {}).get("conditions") or []:
        if item.get("type") == condition_type:
            return str(item.get("message") or "")
    return ""


def pytorchjob_state(pytorchjob: Manifest | None) -> JobState:
    """The PyTorchJob's state; terminal conditions win over the rest."""
    if pytorchjob is None:
        return JobState.ABSENT
    true = true_conditions(pytorchjob)
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
