"""What a FineTuneJob's children are, from what kopf's indexes hold: which object belongs to which job,
which of two states of one object is the later, which pods are the current PyTorchJob's.

Pure: the handlers (handlers.py) fill kopf's indexes; the reconciler reads them through these functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubetune.render.labels import JOB_NAME

Manifest = dict[str, Any]
JobKey = tuple[str, str]
"""(namespace, name) of a FineTuneJob."""


def job_key(obj: Mapping[str, Any]) -> JobKey:
    metadata = obj.get("metadata") or {}
    return (str(metadata.get("namespace") or ""), str(metadata.get("name") or ""))


def owner_key(obj: Mapping[str, Any]) -> JobKey | None:
    """The FineTuneJob a child of ours belongs to, by its job-name label."""
    metadata = obj.get("metadata") or {}
    name = (metadata.get("labels") or {}).get(JOB_NAME)
    return (str(metadata.get("namespace") or ""), str(name)) if name else None


def trimmed(obj: Mapping[str, Any]) -> Manifest:
    """The object without metadata.managedFields, which nothing here reads and which is often half its size."""
    metadata = obj.get("metadata") or {}
    if "managedFields" not in metadata:
        return dict(obj)
    return {**obj, "metadata": {k: v for k, v in metadata.items() if k != "managedFields"}}


def is_newer(candidate: Mapping[str, Any], held: Mapping[str, Any] | None) -> bool:
    """Whether `candidate` is a later state of the object than `held`.

    resourceVersions are opaque by contract, but every API server backed by etcd issues them as increasing
    integers; comparing them keeps a late watch event from undoing a write whose response came first. The
    same version is the same state: the watch event of our own write, whose answer is already here, is not
    news. A version that is not an integer, or another object with the same name (a new UID), always wins.
    """
    if held is None:
        return True
    new_meta, old_meta = candidate.get("metadata") or {}, held.get("metadata") or {}
    if new_meta.get("uid") != old_meta.get("uid"):
        return True
    try:
        return int(str(new_meta.get("resourceVersion"))) > int(str(old_meta.get("resourceVersion")))
    except (TypeError, ValueError):
        return True


def controller_uid(obj: Mapping[str, Any]) -> str | None:
    """The UID of the object's controlling owner (a pod's PyTorchJob), if it names one."""
    for owner in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if owner.get("controller"):
            return str(owner.get("uid") or "") or None
    return None


def belongs_to(pod: Mapping[str, Any], pytorchjob: Mapping[str, Any] | None) -> bool:
    """Whether a pod labelled with the job's name is the current PyTorchJob's.

    A job deleted and created again under the same name has the same label on its predecessor's pods
    while the garbage collector removes them; their failures are not the new job's. A pod with no
    controlling owner, or seen while the PyTorchJob is not (yet) known, cannot be judged and is kept.
    """
    owner = controller_uid(pod)
    current = ((pytorchjob or {}).get("metadata") or {}).get("uid")
    return owner is None or not current or owner == current


@dataclass(frozen=True)
class Children:
    """One job's children as last seen."""

    pytorchjob: Manifest | None
    pods: tuple[Manifest, ...]
    deleted_pods: tuple[Manifest, ...]
    """Pods whose deletion no reconcile has accounted for yet, in their final state."""


def later(a: Manifest | None, b: Manifest | None) -> Manifest | None:
    """The later of two states of one object (either may be missing)."""
    if a is None or b is None:
        return a if b is None else b
    return a if is_newer(a, b) else b
