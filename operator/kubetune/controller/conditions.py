"""Pure helpers for kstatus-style conditions: one place decides when lastTransitionTime moves."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Literal

from kubetune.api.v1alpha1 import Condition, ConditionType

ConditionStatus = Literal["True", "False", "Unknown"]


def rfc3339(moment: datetime) -> str:
    """A UTC timestamp as Kubernetes writes it: 2026-01-02T03:04:05Z."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def utc_now() -> str:
    return rfc3339(datetime.now(UTC))


def parse_time(value: str | None) -> datetime | None:
    """An RFC 3339 timestamp from the API server, or None when absent or unreadable."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def find_condition(conditions: Sequence[Condition], condition_type: str) -> Condition | None:
    return next((c for c in conditions if c.type == condition_type), None)


def is_true(conditions: Sequence[Condition], condition_type: str) -> bool:
    found = find_condition(conditions, condition_type)
    return found is not None and found.status == "True"


def set_condition(
    conditions: Sequence[Condition],
    condition_type: ConditionType | str,
    status: ConditionStatus,
    reason: str,
    message: str,
    generation: int | None,
    now: str,
) -> list[Condition]:
    """The conditions with `condition_type` set; its lastTransitionTime moves only when its status moves.

    Order is kept (a replaced condition stays where it was, a new one goes last) so that an unchanged
    status compares equal and is not written again.
    """
    previous = find_condition(conditions, condition_type)
    transition = previous.last_transition_time if previous and previous.status == status else now
    updated = Condition(
        type=str(condition_type),
        status=status,
        reason=reason,
        message=message,
        last_transition_time=transition,
        observed_generation=generation,
    )
    if previous is None:
        return [*conditions, updated]
    return [updated if c.type == previous.type else c for c in conditions]
