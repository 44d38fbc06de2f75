"""Pure: the PersistentVolumeClaims a FineTuneJob reads or writes (`pvc://claim/path`) as pod volumes.

The trainer resolves `pvc://claim/path` to `$KUBETUNE_PVC_ROOT/claim/path`; each claim is mounted at
`PVC_MOUNT_ROOT/<claim>`, read-only where the job only reads it (model, dataset) and writable where it
publishes the adapter or writes checkpoints. A claim named twice is one volume, writable if any use writes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from kubetune.api.v1alpha1 import FineTuneJob

PVC_MOUNT_ROOT = "/mnt/pvc"
"""Where claims are mounted; kubetune_trainer.storage.DEFAULT_PVC_ROOT (a unit test keeps them equal)."""
PVC_ROOT_ENV = "KUBETUNE_PVC_ROOT"
VOLUME_PREFIX = "pvc-"
MAX_VOLUME_NAME = 63


@dataclass(frozen=True)
class ClaimUse:
    """One claim and how the job uses it."""

    claim: str
    writable: bool
    fields: tuple[str, ...]
    """The spec fields that name it, for messages."""

    @property
    def mount_path(self) -> str:
        return f"{PVC_MOUNT_ROOT}/{self.claim}"

    @property
    def volume_name(self) -> str:
        """A DNS label: `pvc-<claim>`, or a shortened name with a hash when the claim's name is long."""
        name = VOLUME_PREFIX + self.claim
        if len(name) <= MAX_VOLUME_NAME:
            return name
        digest = hashlib.sha256(self.claim.encode()).hexdigest()[:8]
        return f"{name[: MAX_VOLUME_NAME - 9].rstrip('-')}-{digest}"


def claim_of(uri: str | None) -> str | None:
    """The claim of a `pvc://claim/path` URI, else None."""
    if not uri or not uri.startswith("pvc://"):
        return None
    return uri.removeprefix("pvc://").partition("/")[0] or None


def claim_uses(job: FineTuneJob) -> list[ClaimUse]:
    """Every claim the spec names, in the order first named."""
    spec = job.spec
    named = (
        ("spec.model.source", spec.model.source, False),
        ("spec.dataset.source", spec.dataset.source, False),
        ("spec.output.uri", spec.output.uri, True),
        ("spec.checkpoint.uri", spec.checkpoint.uri, True),
    )
    uses: dict[str, ClaimUse] = {}
    for field, uri, writes in named:
        claim = claim_of(uri)
        if claim is None:
            continue
        known = uses.get(claim)
        if known is None:
            uses[claim] = ClaimUse(claim, writes, (field,))
        else:
            uses[claim] = ClaimUse(claim, known.writable or writes, (*known.fields, field))
    return list(uses.values())


def claim_volumes(uses: list[ClaimUse]) -> list[dict[str, Any]]:
    return [
        {
            "name": use.volume_name,
            "persistentVolumeClaim": {"claimName": use.claim, "readOnly": not use.writable},
        }
        for use in uses
    ]


def claim_mounts(uses: list[ClaimUse]) -> list[dict[str, Any]]:
    return [
        {"name": use.volume_name, "mountPath": use.mount_path, "readOnly": not use.writable} for use in uses
    ]
