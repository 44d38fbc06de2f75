"""What the watches last said: FineTuneJobs, and the PyTorchJobs and pods of each, by job.

The status of a job is computed from this store, not from fresh reads: the watches already deliver every
object, and re-reading a job's children on each event cost four API calls per event (the operator's main
cost at scale). Writes of our own (a created PyTorchJob, a status patch) go in as soon as the API server
answers, so the next reconcile does not act on the older state its watch event has not brought yet.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from kubetune.controller.pods import pod_uid
from kubetune.render.labels import JOB_NAME

Manifest = dict[str, Any]
JobKey = tuple[str, str]
"""(namespace, name) of a FineTuneJob."""
K = TypeVar("K")


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


def keep_if_newer(held: dict[K, Manifest], key: K, body: Mapping[str, Any]) -> bool:
    """Hold `body` under `key` if it is a later state than the one held there; returns whether it was."""
    if not is_newer(body, held.get(key)):
        return False
    held[key] = trimmed(body)
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


class Store:
    """Thread-safe: the watch handlers write, the workers read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[JobKey, Manifest] = {}
        self._pytorchjobs: dict[JobKey, Manifest] = {}
        self._pods: dict[JobKey, dict[str, Manifest]] = {}
        self._deleted: dict[JobKey, dict[str, Manifest]] = {}

    # ------------------------------------------------------------------------------------------ jobs

    def put_job(self, body: Mapping[str, Any]) -> bool:
        """Keep the job if it is a later state than the one held; returns whether it was."""
        with self._lock:
            return keep_if_newer(self._jobs, job_key(body), body)

    def drop_job(self, key: JobKey) -> None:
        """The FineTuneJob is gone; the garbage collector removes its children and their watch events
        drop them here."""
        with self._lock:
            self._jobs.pop(key, None)

    def job(self, key: JobKey) -> Manifest | None:
        with self._lock:
            return self._jobs.get(key)

    def job_keys(self) -> list[JobKey]:
        with self._lock:
            return list(self._jobs)

    # -------------------------------------------------------------------------------------- children

    def put_pytorchjob(self, key: JobKey, body: Mapping[str, Any]) -> bool:
        with self._lock:
            return keep_if_newer(self._pytorchjobs, key, body)

    def has_pytorchjob(self, key: JobKey) -> bool:
        with self._lock:
            return key in self._pytorchjobs

    def drop_pytorchjob(self, key: JobKey, body: Mapping[str, Any]) -> None:
        with self._lock:
            held = self._pytorchjobs.get(key)
            if held is not None and (held.get("metadata") or {}).get("uid") == (
                body.get("metadata") or {}
            ).get("uid"):
                del self._pytorchjobs[key]

    def put_pod(self, key: JobKey, body: Mapping[str, Any]) -> bool:
        uid = pod_uid(body)
        with self._lock:
            if uid in self._deleted.get(key, {}):
                return False  # a late event of a pod already deleted
            return keep_if_newer(self._pods.setdefault(key, {}), uid, body)

    def drop_pod(self, key: JobKey, body: Mapping[str, Any]) -> None:
        """A deleted pod leaves the live set and waits, in its final state, for a reconcile to bank it."""
        uid = pod_uid(body)
        with self._lock:
            pods = self._pods.get(key, {})
            pods.pop(uid, None)
            if not pods:
                self._pods.pop(key, None)
            self._deleted.setdefault(key, {})[uid] = trimmed(body)

    def children(self, key: JobKey) -> Children:
        """The job's PyTorchJob and that PyTorchJob's pods (see `belongs_to`)."""
        with self._lock:
            pytorchjob = self._pytorchjobs.get(key)
            return Children(
                pytorchjob=pytorchjob,
                pods=tuple(p for p in self._pods.get(key, {}).values() if belongs_to(p, pytorchjob)),
                deleted_pods=tuple(
                    p for p in self._deleted.get(key, {}).values() if belongs_to(p, pytorchjob)
                ),
            )

    def accounted(self, key: JobKey, deleted_pods: tuple[Manifest, ...]) -> None:
        """These deleted pods are in the job's status now: forget them, and any deleted pod of a
        predecessor's PyTorchJob, which no status will ever take."""
        with self._lock:
            waiting = self._deleted.get(key, {})
            for pod in deleted_pods:
                waiting.pop(pod_uid(pod), None)
            pytorchjob = self._pytorchjobs.get(key)
            for uid, pod in list(waiting.items()):
                if not belongs_to(pod, pytorchjob):
                    del waiting[uid]
            if not waiting:
                self._deleted.pop(key, None)

    def forget_children(self, key: JobKey) -> None:
        """A job that no longer exists: nothing of it needs keeping."""
        with self._lock:
            self._deleted.pop(key, None)

    def phases(self) -> list[str | None]:
        """Each stored job's status.phase (None before its first status)."""
        with self._lock:
            return [(job.get("status") or {}).get("phase") for job in self._jobs.values()]
