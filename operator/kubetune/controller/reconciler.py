"""The reconcile of one FineTuneJob: bring it to where its spec and children say it should be.

Level-triggered, as Kubernetes controllers are: a reconcile does not ask what happened, only what is. It
creates or adopts the children a job lacks, computes the status from what kopf's indexes hold (handlers.py
fills them from its watches) and writes it only when it changed. Runs in worker threads (handlers.Dispatch);
one job is never reconciled by two threads at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property

from kubernetes.client.exceptions import ApiException

from kubetune.api.v1alpha1 import FineTuneJob, FineTuneJobStatus, Phase, Progress, Reason
from kubetune.api.validation import FieldError, validate_manifest
from kubetune.controller.changes import (
    Transition,
    stored_status,
    transition_events,
    without_cost,
    without_status,
)
from kubetune.controller.children import (
    Children,
    JobKey,
    Manifest,
    belongs_to,
    is_newer,
    later,
    trimmed,
)
from kubetune.controller.conditions import utc_now
from kubetune.controller.config import OperatorConfig
from kubetune.controller.fitcheck import FitCheck
from kubetune.controller.kube import CONFLICT, NOT_FOUND, Kube, RetryLater
from kubetune.controller.observed import TERMINAL_PHASES, JobState, Observed, pytorchjob_state
from kubetune.controller.pods import pod_uid
from kubetune.controller.status import compute_status, invalid_status, refused_status
from kubetune.render.pytorchjob import spec_hash

STATUS_WRITE_ATTEMPTS = 5
TERMINAL_VALUES = tuple(phase.value for phase in TERMINAL_PHASES)

log = logging.getLogger("kubetune.operator")


@dataclass(frozen=True)
class Seen:
    """What kopf's indexes hold of one job now: the job, its PyTorchJob, its live pods."""

    job: Manifest | None
    pytorchjob: Manifest | None
    pods: tuple[Manifest, ...]


Look = Callable[[JobKey], Seen]


@dataclass(frozen=True)
class Spec:
    """A job's spec as validated once per generation (pods and PyTorchJobs change far more often)."""

    uid: str
    generation: int | None
    job: FineTuneJob | None
    errors: tuple[FieldError, ...]

    def digest(self) -> str:
        """spec_hash of the job, rendered when first asked for (most reconciles never need it: see
        status.made_from_this_generation) and then kept."""
        return self._digest

    @cached_property
    def _digest(self) -> str:
        assert self.job is not None
        return spec_hash(self.job)


class Reconciler:
    """Reconciles jobs; holds what kopf's indexes cannot: the answers of our own writes until the watches
    bring them, and the final state of deleted pods until a status has counted them."""

    def __init__(self, kube: Kube, settings: OperatorConfig, look: Look) -> None:
        self.kube, self.settings, self.look = kube, settings, look
        self.fit = FitCheck(kube, settings)
        self.requeue: Callable[[JobKey], None] = lambda key: None
        """Reconcile the job again soon (set by handlers.Dispatch)."""
        self.first_waiting: Callable[[], bool] = lambda: False
        """Whether a new job waits for its children (set by handlers.Dispatch)."""
        self._written_jobs: dict[JobKey, Manifest] = {}
        self._written_pytorchjobs: dict[JobKey, Manifest] = {}
        self._deleted_pods: dict[JobKey, dict[str, Manifest]] = {}
        self._specs: dict[JobKey, Spec] = {}
        self._statuses: dict[JobKey, tuple[str, FineTuneJobStatus]] = {}
        self._progress: dict[JobKey, Progress] = {}
        """Progress read from a trainer, waiting for the job's next reconcile to write it."""
        self._reading: set[JobKey] = set()
        self._busy: dict[JobKey, threading.Lock] = {}
        # Reads of the trainers' /metrics run beside the reconciles, not in them: a pod network that drops
        # the operator's packets makes each read wait its full timeout, and that must not hold them up.
        self._readers = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="progress")
        self._lock = threading.Lock()

    def stop(self) -> None:
        self._readers.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------- what the handlers tell

    def job_is_news(self, key: JobKey, body: Manifest) -> bool:
        """Whether a watch event of the job says something our own last write did not (its echo does not)."""
        with self._lock:
            written = self._written_jobs.get(key)
            if written is not None and not is_newer(body, written):
                return False
            self._written_jobs.pop(key, None)
        return True

    def awaits_children(self, key: JobKey, body: Manifest) -> bool:
        """A job submitted and not yet given its PyTorchJob."""
        return (
            not (body.get("status") or {}).get("phase")
            and not (body.get("metadata") or {}).get("deletionTimestamp")
            and self._pytorchjob(key, self.look(key)) is None
        )

    def job_deleted(self, key: JobKey) -> None:
        """The FineTuneJob is gone; the garbage collector removes its children."""
        with self._lock:
            self._written_jobs.pop(key, None)
            self._specs.pop(key, None)
            self._statuses.pop(key, None)
            self._progress.pop(key, None)
            self._written_pytorchjobs.pop(key, None)
            self._deleted_pods.pop(key, None)
            self._busy.pop(key, None)

    def pytorchjob_is_news(self, key: JobKey, body: Manifest, deleted: bool) -> bool:
        with self._lock:
            written = self._written_pytorchjobs.get(key)
            if deleted:
                if written is not None and written["metadata"].get("uid") == body["metadata"].get("uid"):
                    del self._written_pytorchjobs[key]
                return True
            if written is not None and not is_newer(body, written):
                return False
            self._written_pytorchjobs.pop(key, None)
        return True

    def pod_deleted(self, key: JobKey, body: Manifest) -> None:
        """A deleted pod waits, in its final state, for a status to count it (restarts, GPU seconds)."""
        with self._lock:
            self._deleted_pods.setdefault(key, {})[pod_uid(body)] = trimmed(body)

    # ------------------------------------------------------------------------------------ what is seen

    def _job(self, key: JobKey, seen: Seen) -> Manifest | None:
        if seen.job is None:
            return None  # deleted: an answer of ours from before does not bring it back
        with self._lock:
            return later(seen.job, self._written_jobs.get(key))

    def _pytorchjob(self, key: JobKey, seen: Seen) -> Manifest | None:
        with self._lock:
            return later(seen.pytorchjob, self._written_pytorchjobs.get(key))

    def _children(self, key: JobKey, seen: Seen) -> Children:
        """The job's PyTorchJob and that PyTorchJob's pods (see children.belongs_to)."""
        pytorchjob = self._pytorchjob(key, seen)
        with self._lock:
            deleted = tuple((self._deleted_pods.get(key) or {}).values())
        live = {pod_uid(p) for p in seen.pods}
        return Children(
            pytorchjob=pytorchjob,
            pods=tuple(p for p in seen.pods if belongs_to(p, pytorchjob)),
            deleted_pods=tuple(p for p in deleted if belongs_to(p, pytorchjob) and pod_uid(p) not in live),
        )

    def _accounted(self, key: JobKey, children: Children) -> None:
        """These deleted pods are in the job's status now: forget them, and any deleted pod of a
        predecessor's PyTorchJob, which no status will ever take."""
        with self._lock:
            waiting = self._deleted_pods.get(key)
            if not waiting:
                return
            for pod in children.deleted_pods:
                waiting.pop(pod_uid(pod), None)
            for uid, pod in list(waiting.items()):
                if not belongs_to(pod, children.pytorchjob):
                    del waiting[uid]
            if not waiting:
                del self._deleted_pods[key]

    # ---------------------------------------------------------------------------------------- resync

    def resync(self, keys: list[JobKey]) -> list[JobKey]:
        """Every progress interval: the unfinished jobs to reconcile again (returned); a running one's
        trainer progress is read first, and the job reconciled after the read."""
        due: list[JobKey] = []
        for key in keys:
            body = self._job(key, self.look(key))
            phase = ((body or {}).get("status") or {}).get("phase")
            if body is None or phase in TERMINAL_VALUES:
                continue
            if phase != Phase.RUNNING.value:
                due.append(key)
                continue
            with self._lock:
                if key in self._reading:
                    continue  # the last read has not come back yet
                self._reading.add(key)
            self._readers.submit(self._read_progress, key)
        return due

    def _read_progress(self, key: JobKey) -> None:
        try:
            seen = self.look(key)
            body = self._job(key, seen)
            spec = self._spec(key, body) if body is not None else None
            if spec is not None and spec.job is not None:
                children = self._children(key, seen)
                observed = Observed(pytorchjob=children.pytorchjob, pods=children.pods)
                if (progress := self.kube.read_progress(spec.job, observed)) is not None:
                    with self._lock:
                        self._progress[key] = progress
        except Exception as error:  # a failed read only leaves the progress as it was
            log.warning(f"{key[0]}/{key[1]}: reading progress failed: {error!r}")
        finally:
            with self._lock:
                self._reading.discard(key)
            self.requeue(key)

    # ----------------------------------------------------------------------------------- reconcile

    def reconcile(self, key: JobKey) -> None:
        with self._lock:
            busy = self._busy.setdefault(key, threading.Lock())
        with busy:
            self._reconcile(key)

    def _reconcile(self, key: JobKey) -> None:
        seen = self.look(key)
        body = self._job(key, seen)
        if body is None:
            return
        spec = self._spec(key, body)
        current = self._status(key, body)
        deleting = bool((body.get("metadata") or {}).get("deletionTimestamp"))
        if spec.job is not None and current.phase not in TERMINAL_PHASES and not deleting:
            known = self._pytorchjob(key, seen)
            if known is None and current.phase is None and (refusal := self.fit.refusal(spec.job)):
                self._sync_status(key, refusal)  # nothing is created for a job that cannot fit
                return
            pytorchjob = self.kube.ensure_children(spec.job, known, seen_before=current.phase is not None)
            if pytorchjob is not known:
                with self._lock:
                    self._written_pytorchjobs[key] = trimmed(pytorchjob)
                if known is None and current.phase is None and self.first_waiting():
                    # Other new jobs wait for their children. Their PyTorchJobs come before this job's
                    # Pending status: in a burst of submissions, training starts sooner, and the statuses
                    # follow once the burst is served.
                    self.requeue(key)
                    return
        self._sync_status(key)

    def _spec(self, key: JobKey, body: Manifest) -> Spec:
        metadata = body.get("metadata") or {}
        uid, generation = str(metadata.get("uid") or ""), metadata.get("generation")
        with self._lock:
            held = self._specs.get(key)
        if held is not None and held.uid == uid and held.generation == generation:
            return held
        job, errors = validate_manifest(without_status(body))
        spec = Spec(uid, generation, job, tuple(errors))
        if job is None:
            log.warning(f"{key[0]}/{key[1]}: invalid spec: {'; '.join(str(e) for e in errors)}")
        with self._lock:
            self._specs[key] = spec
        return spec

    def _status(self, key: JobKey, body: Manifest) -> FineTuneJobStatus:
        """The stored status as a model, parsed once per resourceVersion (a job is reconciled far more
        often than its status changes)."""
        version = (
            str((body.get("metadata") or {}).get("uid"))
            + "/"
            + str((body.get("metadata") or {}).get("resourceVersion"))
        )
        with self._lock:
            held = self._statuses.get(key)
        if held is not None and held[0] == version:
            return held[1]
        status = stored_status(body)
        with self._lock:
            self._statuses[key] = (version, status)
        return status

    def _sync_status(self, key: JobKey, refusal: str | None = None) -> None:
        """Compute the status from what is seen and write it when more than gpuSeconds changed.

        The write is conditional on the resourceVersion it was computed from; when someone wrote in between
        (the user changed spec.runPolicy.suspend) the job is read afresh and the status computed again.
        """
        with self._lock:
            progress = self._progress.pop(key, None)
        for _ in range(STATUS_WRITE_ATTEMPTS):
            seen = self.look(key)
            body = self._job(key, seen)
            if body is None:
                return
            spec = self._spec(key, body)
            current = self._status(key, body)
            children = self._children(key, seen)
            now = utc_now()
            observed: Observed | None = None
            if spec.job is None:
                new = invalid_status(current, spec.generation, list(spec.errors), now)
            elif refusal is not None and current.phase is None:
                new = refused_status(current, spec.generation, Reason.DOES_NOT_FIT, refusal, now)
            else:
                observed = self.kube.observe(children, spec.job)
                new = compute_status(
                    spec.job, current, observed, now, progress, spec.digest, self.settings.start_limits
                )
            if without_cost(new) == without_cost(current):
                self._accounted(key, children)
                self._stop_if_failed(spec.job, new, observed)
                return
            try:
                written = self.kube.write_status(body, new, current)
            except ApiException as error:
                if error.status not in (CONFLICT, NOT_FOUND):
                    raise
                fresh = self.kube.read_job(*key) if error.status == CONFLICT else None
                if fresh is None:
                    return
                self._keep_written(key, fresh)
                continue
            self._keep_written(key, written)
            self._accounted(key, children)
            if new.phase != current.phase:
                log.info(f"{key[0]}/{key[1]}: phase {current.phase} -> {new.phase}: {new.message}")
            for event_type, reason, message in transition_events(Transition(body, current, new)):
                self.kube.post_event(body, event_type, reason, message)
            self._stop_if_failed(spec.job, new, observed)
            return
        raise RetryLater("the status kept changing underneath; trying again", delay=1)

    def _keep_written(self, key: JobKey, body: Manifest) -> None:
        with self._lock:
            self._written_jobs[key] = trimmed(body)

    def _stop_if_failed(
        self, job: FineTuneJob | None, status: FineTuneJobStatus, observed: Observed | None
    ) -> None:
        """A job that ended Failed while its PyTorchJob still runs (the backoff limit, enforced here) has the
        PyTorchJob stopped, after the status that says why is written."""
        if job is None or observed is None or status.phase is not Phase.FAILED:
            return
        if pytorchjob_state(observed.pytorchjob) not in (
            JobState.CREATED,
            JobState.RUNNING,
            JobState.RESTARTING,
        ):
            return
        run_policy = ((observed.pytorchjob or {}).get("spec") or {}).get("runPolicy") or {}
        if run_policy.get("suspend") is True:
            return
        log.info(f"{job.namespace}/{job.name}: stopping the PyTorchJob: {status.message}")
        stopped = self.kube.stop_pytorchjob(job)
        with self._lock:
            self._written_pytorchjobs[(job.namespace, job.name)] = trimmed(stopped)
