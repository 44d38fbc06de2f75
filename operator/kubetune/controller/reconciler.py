"""The reconcile loop: watch events fill the store and queue the job; workers bring one job at a time to
where its spec and children say it should be.

Level-triggered, as Kubernetes controllers are: a reconcile does not ask what happened, only what is. It
creates or adopts the children a job lacks, computes the status from the store and writes it only when it
changed. Events of one job that arrive while it waits are folded into one reconcile; a failed reconcile is
retried after a growing delay; a resync every progress interval reads the trainers' progress and catches
anything a watch missed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from kubernetes.client.exceptions import ApiException

from kubetune.api.v1alpha1 import FineTuneJob, FineTuneJobStatus, Phase, Progress
from kubetune.api.validation import FieldError, validate_manifest
from kubetune.controller import metrics
from kubetune.controller.conditions import utc_now
from kubetune.controller.config import OperatorConfig
from kubetune.controller.kube import (
    CONFLICT,
    LEGACY_FINALIZER,
    NOT_FOUND,
    Kube,
    RetryLater,
    Transition,
    stored_status,
    transition_events,
    without_cost,
    without_status,
)
from kubetune.controller.status import (
    TERMINAL_PHASES,
    JobState,
    Observed,
    compute_status,
    invalid_status,
    pytorchjob_state,
)
from kubetune.controller.store import JobKey, Manifest, Store, job_key, owner_key
from kubetune.controller.workqueue import WorkQueue
from kubetune.render.pytorchjob import spec_hash

STATUS_WRITE_ATTEMPTS = 5
STOP_SECONDS = 20.0
"""How long a stopping operator waits for reconciles in flight."""
DELETED = "DELETED"
TERMINAL_VALUES = tuple(phase.value for phase in TERMINAL_PHASES)

log = logging.getLogger("kubetune.operator")


@dataclass(frozen=True)
class Spec:
    """A job's spec as validated once per generation (pods and PyTorchJobs change far more often)."""

    uid: str
    generation: int | None
    job: FineTuneJob | None
    errors: tuple[FieldError, ...]

    def digest(self) -> str:
        """spec_hash of the job, rendered when first asked for (most reconciles never need it: see
        status.made_from_this_generation) and then kept: rendering the spec document on every status
        compute was 7% of the CPU."""
        return self._digest

    @cached_property
    def _digest(self) -> str:
        assert self.job is not None
        return spec_hash(self.job)


class Reconciler:
    """The store, the queue, the workers and the resync of one operator process."""

    def __init__(self, kube: Kube, settings: OperatorConfig) -> None:
        self.kube, self.settings = kube, settings
        self.store = Store()
        self.queue: WorkQueue[JobKey] = WorkQueue(waited=metrics.queue_waited)
        self._specs: dict[JobKey, Spec] = {}
        self._statuses: dict[JobKey, tuple[str, FineTuneJobStatus]] = {}
        self._progress: dict[JobKey, Progress] = {}
        """Progress read from a trainer, waiting for the job's next reconcile to write it."""
        self._reading: set[JobKey] = set()
        # Reads of the trainers' /metrics run beside the workers, not in them: a pod network that drops the
        # operator's packets makes each read wait its full timeout, and that must not hold up the reconciles.
        self._readers = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="progress")
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        metrics.QUEUE_DEPTH.set_function(lambda: float(self.queue.depth()))
        metrics.count_job_phases(self.store.phases)

    def start(self) -> None:
        for index in range(self.settings.workers):
            self._threads.append(threading.Thread(target=self._work, name=f"reconcile-{index}", daemon=True))
        self._threads.append(threading.Thread(target=self._resync, name="resync", daemon=True))
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Let the workers finish the job they are on (a status write is not cut in half), then return."""
        self._stopped.set()
        self.queue.shut_down()
        self._readers.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + STOP_SECONDS
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    # -------------------------------------------------------------------------------- watch events

    def job_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        key = job_key(body)
        metrics.WATCH_EVENTS.labels(kind="FineTuneJob").inc()
        if event_type == DELETED:
            self.store.drop_job(key)
            with self._lock:
                self._specs.pop(key, None)
                self._statuses.pop(key, None)
                self._progress.pop(key, None)
        elif not self.store.put_job(body):
            return  # the echo of our own status write, or a late event: nothing new to act on
        elif not self._threads:
            # The workers wait for every first list; while the children's lists are still coming, validate
            # the specs they will need (at a thousand jobs, a fifth of a restart's CPU).
            self._spec(key, dict(body))
        self.queue.add(key, first=event_type != DELETED and self._awaits_children(key, body))

    def _awaits_children(self, key: JobKey, body: Mapping[str, Any]) -> bool:
        """A job submitted and not yet given its PyTorchJob: its reconcile goes ahead of the others."""
        return (
            not (body.get("status") or {}).get("phase")
            and not (body.get("metadata") or {}).get("deletionTimestamp")
            and not self.store.has_pytorchjob(key)
        )

    def pytorchjob_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        self._child_event(
            "PyTorchJob", event_type, body, self.store.put_pytorchjob, self.store.drop_pytorchjob
        )

    def pod_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        self._child_event("Pod", event_type, body, self.store.put_pod, self.store.drop_pod)

    def _child_event(
        self,
        kind: str,
        event_type: str | None,
        body: Mapping[str, Any],
        put: Callable[[JobKey, Mapping[str, Any]], bool],
        drop: Callable[[JobKey, Mapping[str, Any]], None],
    ) -> None:
        """A child of ours changed: store it under its job, and queue the job (not for the echo of a
        PyTorchJob we created or patched: the store has the answer already)."""
        if (key := owner_key(body)) is None:
            return
        metrics.WATCH_EVENTS.labels(kind=kind).inc()
        if event_type == DELETED:
            drop(key, body)
        elif not put(key, body):
            return
        self.queue.add(key)

    # ------------------------------------------------------------------------------------- workers

    def _work(self) -> None:
        while (key := self.queue.get()) is not None:
            try:
                with metrics.reconcile("FineTuneJob"):
                    self.reconcile(key)
                self.queue.forget(key)
            except RetryLater as error:
                log.warning(f"{key[0]}/{key[1]}: {error}")
                self.queue.add_after(key, error.delay)
            except Exception as error:  # any failure is retried: the loop must go on
                delay = self.queue.retry(key)
                log.warning(f"{key[0]}/{key[1]}: reconcile failed, retrying in {delay:.1f} s: {error!r}")
            finally:
                self.queue.done(key)

    def _resync(self) -> None:
        """Every progress interval: each unfinished job once more; a running one after its trainer's
        progress has been read."""
        while not self._stopped.wait(self.settings.progress_interval_seconds):
            for key in self.store.job_keys():
                body = self.store.job(key)
                phase = ((body or {}).get("status") or {}).get("phase")
                if body is None or phase in TERMINAL_VALUES:
                    continue
                if phase != Phase.RUNNING.value:
                    self.queue.add(key)
                    continue
                with self._lock:
                    if key in self._reading:
                        continue  # the last read has not come back yet
                    self._reading.add(key)
                self._readers.submit(self._read_progress, key)

    def _read_progress(self, key: JobKey) -> None:
        try:
            body = self.store.job(key)
            spec = self._spec(key, body) if body is not None else None
            if spec is not None and spec.job is not None:
                children = self.store.children(key)
                observed = Observed(pytorchjob=children.pytorchjob, pods=children.pods)
                if (progress := self.kube.read_progress(spec.job, observed)) is not None:
                    with self._lock:
                        self._progress[key] = progress
        except Exception as error:  # a failed read only leaves the progress as it was
            log.warning(f"{key[0]}/{key[1]}: reading progress failed: {error!r}")
        finally:
            with self._lock:
                self._reading.discard(key)
            self.queue.add(key)

    # ----------------------------------------------------------------------------------- reconcile

    def reconcile(self, key: JobKey) -> None:
        body = self.store.job(key)
        if body is None:
            self.store.forget_children(key)
            return
        if LEGACY_FINALIZER in ((body.get("metadata") or {}).get("finalizers") or []):
            body = self.kube.lift_legacy_finalizer(body)
            self.store.put_job(body)
        spec = self._spec(key, body)
        current = self._status(key, body)
        deleting = bool((body.get("metadata") or {}).get("deletionTimestamp"))
        if spec.job is not None and current.phase not in TERMINAL_PHASES and not deleting:
            known = self.store.children(key).pytorchjob
            pytorchjob = self.kube.ensure_children(spec.job, known, seen_before=current.phase is not None)
            if pytorchjob is not known:
                self.store.put_pytorchjob(key, pytorchjob)
                if known is None and current.phase is None and self.queue.first_waiting():
                    # Other new jobs wait for their children. Their PyTorchJobs come before this job's
                    # Pending status: in a burst of submissions, training starts sooner, and the statuses
                    # follow once the burst is served. Each worker would otherwise make three writes per
                    # job instead of two while new jobs queue.
                    self.queue.add(key)
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

    def _sync_status(self, key: JobKey) -> None:
        """Compute the status from the store and write it when more than gpuSeconds changed.

        The write is conditional on the resourceVersion it was computed from; when someone wrote in between
        (the user changed spec.runPolicy.suspend) the job is read afresh and the status computed again.
        """
        with self._lock:
            progress = self._progress.pop(key, None)
        for _ in range(STATUS_WRITE_ATTEMPTS):
            body = self.store.job(key)
            if body is None:
                return
            spec = self._spec(key, body)
            current = self._status(key, body)
            children = self.store.children(key)
            now = utc_now()
            observed: Observed | None = None
            if spec.job is None:
                new = invalid_status(current, spec.generation, list(spec.errors), now)
            else:
                observed = self.kube.observe(children)
                new = compute_status(spec.job, current, observed, now, progress, spec.digest)
            if without_cost(new) == without_cost(current):
                self.store.accounted(key, children.deleted_pods)
                self._stop_if_failed(spec.job, new, observed)
                return
            try:
                written = self.kube.write_status(body, new, current)
            except ApiException as error:
                if error.status not in (CONFLICT, NOT_FOUND):
                    raise
                fresh = self.kube.read_job(*key) if error.status == CONFLICT else None
                if fresh is None:
                    self.store.drop_job(key)
                    return
                self.store.put_job(fresh)
                continue
            self.store.put_job(written)
            self.store.accounted(key, children.deleted_pods)
            if new.phase != current.phase:
                log.info(f"{key[0]}/{key[1]}: phase {current.phase} -> {new.phase}: {new.message}")
            for event_type, reason, message in transition_events(Transition(body, current, new)):
                self.kube.post_event(body, event_type, reason, message)
            self._stop_if_failed(spec.job, new, observed)
            return
        raise RetryLater("the status kept changing underneath; trying again", delay=1)

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
        self.store.put_pytorchjob((job.namespace, job.name), self.kube.stop_pytorchjob(job))
