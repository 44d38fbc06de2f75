"""The kopf side of the operator: settings, indexes, event handlers, the liveness probe, the resync.

kopf watches FineTuneJobs and our own PyTorchJobs and pods (filtered by label on the API server), keeps them
in its indexes, and calls the handlers below with every event, one object at a time. A job's reconcile
(reconciler.py) is triggered by its own events and by its children's, so the handlers hand it to `Dispatch`,
which runs it in a worker thread, folds the triggers that arrive while it waits into one, and retries a failed
one after a growing delay.

Only `@kopf.on.event` handlers serve the FineTuneJobs: kopf's change-detection handlers (on.create/update)
keep a diff base and their progress on the object, one more write per create and per spec change, and
timers and daemons put a finalizer on every job. Level-triggered reconciles need none of that state.
The optional validating webhook (admission.py) keeps none either.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import kopf

from kubetune.api.v1alpha1 import GROUP, PLURAL, VERSION
from kubetune.controller import admission, metrics
from kubetune.controller.children import JobKey, Manifest, owner_key, trimmed
from kubetune.controller.config import OperatorConfig
from kubetune.controller.kube import (
    LEGACY_FINALIZER,
    PYTORCHJOB_GROUP,
    PYTORCHJOB_PLURAL,
    PYTORCHJOB_VERSION,
    RetryLater,
)
from kubetune.controller.reconciler import Reconciler, Seen
from kubetune.render.labels import MANAGED_BY

OURS = {MANAGED_BY: "kubetune"}
OURS_SELECTOR = f"{MANAGED_BY}=kubetune"
FIRST_RETRY_SECONDS = 0.5
MAX_RETRY_SECONDS = 30.0
STOP_SECONDS = 20.0
"""How long a stopping operator waits for the reconciles in flight."""
WATCH_SECONDS = 300
"""How long one watch request lasts; kopf resumes from the last resourceVersion after each."""

log = logging.getLogger("kubetune.operator")


def retry_delay(failures: int) -> float:
    """Doubling from FIRST_RETRY_SECONDS up to MAX_RETRY_SECONDS."""
    return float(min(MAX_RETRY_SECONDS, FIRST_RETRY_SECONDS * 2 ** max(0, failures - 1)))


@dataclass
class Dispatch:
    """Runs `reconciler.reconcile(key)` in `workers` threads; thread-safe.

    A job waits at most once: triggers that arrive while it waits are folded into that reconcile, and one
    that arrives while it runs makes it run once more afterwards, so that the last event is always seen.
    """

    reconciler: Reconciler
    workers: int
    leading: threading.Event
    _executor: ThreadPoolExecutor = field(init=False)
    _waiting: dict[JobKey, tuple[float, bool]] = field(default_factory=dict)
    """Job -> (when it was queued, whether it is a new job awaiting its children)."""
    _running: set[JobKey] = field(default_factory=set)
    _again: set[JobKey] = field(default_factory=set)
    _failures: dict[JobKey, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stopped: bool = False

    def __post_init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="reconcile")
        self.reconciler.requeue = self.submit
        self.reconciler.first_waiting = self.first_waiting
        metrics.QUEUE_DEPTH.set_function(lambda: float(len(self._waiting)))

    def submit(self, key: JobKey, first: bool = False) -> None:
        with self._lock:
            if self._stopped or not self.leading.is_set():
                return
            if key in self._running:
                self._again.add(key)
                return
            if key in self._waiting:
                queued, was_first = self._waiting[key]
                self._waiting[key] = (queued, was_first or first)
                return
            self._waiting[key] = (time.monotonic(), first)
        self._executor.submit(self._run, key)

    def first_waiting(self) -> bool:
        with self._lock:
            return any(first for _, first in self._waiting.values())

    def _run(self, key: JobKey) -> None:
        with self._lock:
            queued, first = self._waiting.pop(key)
            self._running.add(key)
        metrics.queue_waited(first, time.monotonic() - queued)
        delay: float | None = None
        try:
            with metrics.reconcile("FineTuneJob"):
                self.reconciler.reconcile(key)
            self._failures.pop(key, None)
        except RetryLater as error:
            log.warning(f"{key[0]}/{key[1]}: {error}")
            delay = error.delay
        except Exception as error:  # any failure is retried: the job must not be left behind
            self._failures[key] = failures = self._failures.get(key, 0) + 1
            delay = retry_delay(failures)
            log.warning(f"{key[0]}/{key[1]}: reconcile failed, retrying in {delay:.1f} s: {error!r}")
        finally:
            with self._lock:
                self._running.discard(key)
                again = key in self._again
                self._again.discard(key)
        if again:
            self.submit(key)
        elif delay is not None:
            timer = threading.Timer(delay, self.submit, args=(key,))
            timer.daemon = True
            timer.start()

    def stop(self) -> None:
        """Let the reconciles in flight finish (a status write is not cut in half); drop the waiting ones."""
        with self._lock:
            self._stopped = True
        self._executor.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + STOP_SECONDS
        while self._running and time.monotonic() < deadline:
            time.sleep(0.05)


@dataclass
class Runtime:
    """What the handlers share: the reconciler, its dispatch, and kopf's indexes once kopf hands them over."""

    settings: OperatorConfig
    reconciler: Reconciler
    dispatch: Dispatch
    leading: threading.Event
    indexes: dict[str, kopf.Index[Any, Any]] = field(default_factory=dict)
    on_stop: list[Callable[[], object]] = field(default_factory=list)
    """Called once the reconciles have stopped (the Lease is handed back there)."""

    def look(self, key: JobKey) -> Seen:
        """The job and its children as kopf's indexes hold them (read from worker threads: each read is a
        single C-level copy of a dict's values, which the event loop's updates cannot interleave)."""
        jobs = tuple(self.indexes["finetunejobs"].get(key) or ())
        pytorchjobs = tuple(self.indexes["pytorchjobs"].get(key) or ())
        return Seen(
            job=jobs[0] if jobs else None,
            pytorchjob=pytorchjobs[0] if pytorchjobs else None,
            pods=tuple(self.indexes["pods"].get(key) or ()),
        )

    def reconcile_all(self) -> None:
        """Every job once: on becoming the leader."""
        for key in list(self.indexes.get("finetunejobs") or ()):
            self.dispatch.submit(key)


_runtime: Runtime | None = None


def install(runtime: Runtime) -> None:
    global _runtime
    _runtime = runtime


def runtime() -> Runtime:
    assert _runtime is not None, "handlers.install() first"
    return _runtime


# ------------------------------------------------------------------------------------------- settings


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **kwargs: Any) -> None:
    """The fleet's kopf settings, one line of why each."""
    running = runtime()
    # kopf passes its indexes to every handler by their ids; the worker threads read them through look().
    running.indexes.update({name: kwargs[name] for name in ("finetunejobs", "pytorchjobs", "pods")})
    # The API server filters our children by label: a cluster's other pods never reach the operator.
    settings.watching.label_selectors[PYTORCHJOB_GROUP, PYTORCHJOB_PLURAL] = OURS_SELECTOR
    settings.watching.label_selectors["v1", "pods"] = OURS_SELECTOR
    # Watches end and resume from their last resourceVersion every few minutes, not at the server's whim;
    # a stream silent past the bookmark interval is taken for dead (kopf's inactivity_timeout).
    settings.watching.server_timeout = WATCH_SECONDS
    settings.watching.client_timeout = WATCH_SECONDS + 30
    settings.watching.connect_timeout = 10
    # Lists in pages of 500: at a thousand jobs a list is a few MB, not one spike in both processes.
    settings.watching.chunk_size = 500
    # The chart grants no cluster-wide read of namespaces or CRDs (least privilege): kopf serves the
    # namespaces it is given and the resources discovered at start (a CRD installed later: after a restart).
    settings.scanning.disabled = True
    # Events are the status transitions' own (kube.transition_events); kopf's would repeat handler logs.
    settings.posting.enabled = False
    # kopf's state, were any handler to keep some, lives under kubetune.io; none does (see the module).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubetune.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kubetune.io", key="last-handled-configuration"
    )
    # The finalizer of earlier versions: no handler requires a finalizer, so kopf lifts this one from every
    # job that still has it (a JSON patch conditional on the resourceVersion), and the job can be deleted.
    settings.persistence.finalizer = LEGACY_FINALIZER
    # The handlers are async and return at once (the reconciles run in Dispatch's threads): one kopf worker
    # per object with events is cheap, so no limit delays an object's events behind others'.
    settings.queueing.worker_limit = None
    settings.execution.max_workers = running.settings.workers
    # The validating webhook (admission.py), when configured: the chart's ValidatingWebhookConfiguration
    # routes to it, so kopf manages no webhook configuration (no cluster-wide RBAC for one).
    if running.settings.webhook_port:
        settings.admission.server = admission.webhook_server(running.settings)
    asyncio.get_running_loop().create_task(_resync(running), name="kubetune resync")
    log.info(
        f"kubetune operator: namespaces={list(running.settings.namespaces) or 'all'} "
        f"workers={running.settings.workers} metrics_port={running.settings.metrics_port} "
        f"progress_interval={running.settings.progress_interval_seconds}s "
        f"webhook_port={running.settings.webhook_port or 'off'}"
    )


@kopf.on.cleanup()
async def stop(**_: Any) -> None:
    running = runtime()
    await asyncio.get_running_loop().run_in_executor(None, running.dispatch.stop)
    running.reconciler.stop()
    for then in running.on_stop:
        await asyncio.get_running_loop().run_in_executor(None, then)


async def _resync(running: Runtime) -> None:
    """Every progress interval: each unfinished job once more; a running one after its progress is read."""
    while True:
        await asyncio.sleep(running.settings.progress_interval_seconds)
        if not running.leading.is_set() or "finetunejobs" not in running.indexes:
            continue
        keys = list(running.indexes["finetunejobs"])
        for key in await asyncio.get_running_loop().run_in_executor(None, running.reconciler.resync, keys):
            running.dispatch.submit(key)


@kopf.on.probe(id="jobs")
async def jobs_known(**kwargs: Any) -> int:
    """/healthz answers once kopf runs; it reports how many jobs the index holds."""
    return len(kwargs["finetunejobs"])


# -------------------------------------------------------------------------------------------- indexes


@kopf.index(GROUP, VERSION, PLURAL, id="finetunejobs")
async def index_finetunejobs(body: kopf.Body, **_: Any) -> dict[JobKey, Manifest]:
    return {(str(body.metadata.namespace), str(body.metadata.name)): trimmed(body)}


@kopf.index(PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, PYTORCHJOB_PLURAL, labels=OURS, id="pytorchjobs")
async def index_pytorchjobs(body: kopf.Body, **_: Any) -> dict[JobKey, Manifest] | None:
    key = owner_key(body)
    return {key: trimmed(body)} if key else None


@kopf.index("v1", "pods", labels=OURS, id="pods")
async def index_pods(body: kopf.Body, **_: Any) -> dict[JobKey, Manifest] | None:
    key = owner_key(body)
    return {key: trimmed(body)} if key else None


# --------------------------------------------------------------------------------------------- events

DELETED = "DELETED"


@kopf.on.event(GROUP, VERSION, PLURAL)
async def finetunejob_event(type: str | None, body: kopf.Body, **_: Any) -> None:
    running = runtime()
    metrics.WATCH_EVENTS.labels(kind="FineTuneJob").inc()
    key = (str(body.metadata.namespace), str(body.metadata.name))
    raw = trimmed(body)
    if type == DELETED:
        running.reconciler.job_deleted(key)
        return
    if running.reconciler.job_is_news(key, raw):
        running.dispatch.submit(key, first=running.reconciler.awaits_children(key, raw))


@kopf.on.event(PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, PYTORCHJOB_PLURAL, labels=OURS)
async def pytorchjob_event(type: str | None, body: kopf.Body, **_: Any) -> None:
    """A PyTorchJob of ours changed: reconcile its job (not for the echo of our own create or patch)."""
    running = runtime()
    metrics.WATCH_EVENTS.labels(kind="PyTorchJob").inc()
    if (key := owner_key(body)) is not None and running.reconciler.pytorchjob_is_news(
        key, trimmed(body), deleted=type == DELETED
    ):
        running.dispatch.submit(key)


@kopf.on.event("v1", "pods", labels=OURS)
async def pod_event(type: str | None, body: kopf.Body, **_: Any) -> None:
    running = runtime()
    metrics.WATCH_EVENTS.labels(kind="Pod").inc()
    if (key := owner_key(body)) is None:
        return
    if type == DELETED:
        running.reconciler.pod_deleted(key, trimmed(body))
    running.dispatch.submit(key)
