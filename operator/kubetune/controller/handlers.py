"""The kopf handlers: thin wiring from watch events to `kube.Kube` and the pure status machine.

- FineTuneJob created, resumed after a restart, or updated: validate, create or adopt the children,
  match suspend, write status.
- PyTorchJob or pod of ours changed (watched, not polled): recompute the owning job's status.
- A timer per unfinished FineTuneJob: read the trainer's progress while it runs, and resync the rest.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import kopf
from prometheus_client import start_http_server

from kubetune.api.v1alpha1 import GROUP, PLURAL, VERSION, Phase
from kubetune.api.validation import validate_manifest
from kubetune.controller import metrics
from kubetune.controller.config import OperatorConfig
from kubetune.controller.kube import (
    PYTORCHJOB_GROUP,
    PYTORCHJOB_PLURAL,
    PYTORCHJOB_VERSION,
    Kube,
    Transition,
    has_ended,
    new_api_client,
    transition_events,
    without_status,
)
from kubetune.render.labels import JOB_NAME, MANAGED_BY

SETTINGS = OperatorConfig()
STATE_PREFIX = "kubetune.io"
FINALIZER = "kubetune.io/finalizer"
OURS = {MANAGED_BY: "kubetune"}
TERMINAL = (Phase.SUCCEEDED.value, Phase.FAILED.value)

_kube: Kube | None = None
_phases: dict[str, str | None] = {}


def kube() -> Kube:
    if _kube is None:
        raise kopf.TemporaryError("the operator is still starting", delay=1)
    return _kube


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, logger: kopf.Logger, **_: Any) -> None:
    """Every kopf setting in one place."""
    global _kube
    # kopf's own bookkeeping lives in annotations of our group, never in status (the schema would prune it).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=STATE_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=STATE_PREFIX, key="last-handled-configuration"
    )
    # Children are removed by the garbage collector through owner references, so no handler needs a
    # finalizer; kopf puts this one on only to stop a job's progress timer before the job goes away.
    settings.persistence.finalizer = FINALIZER
    # Events are posted on purpose (phase changes, stalls); handler chatter stays in the log.
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = 16
    settings.watching.server_timeout = 300
    if SETTINGS.namespaces:
        # Namespaced mode: the chart grants no cluster-wide list of namespaces, and kopf's scan for them
        # retries that forbidden call for about a minute before it watches the named namespaces (at every
        # start and leader change). The names are exact, so nothing needs scanning; the cost is that a CRD
        # installed after the operator started is seen at its next restart.
        settings.scanning.disabled = True
    _kube = Kube(api_client=new_api_client(), settings=SETTINGS)
    if SETTINGS.metrics_port:
        start_http_server(SETTINGS.metrics_port, registry=metrics.REGISTRY)
    logger.info(
        f"kubetune operator: namespaces={list(SETTINGS.namespaces) or 'all'} "
        f"metrics_port={SETTINGS.metrics_port} progress_interval={SETTINGS.progress_interval_seconds}s"
    )


def post_events(change: Transition | None) -> None:
    """Events go out after the status write they describe."""
    if change is None:
        return
    for event_type, reason, message in transition_events(change):
        kopf.event(cast(kopf.Body, change.body), type=event_type, reason=reason, message=message)


# A failed reconcile (API server hiccup, a webhook not ready) is retried in seconds, not kopf's default minute.
@kopf.on.create(GROUP, VERSION, PLURAL, backoff=5)
@kopf.on.resume(GROUP, VERSION, PLURAL, backoff=5)
@kopf.on.update(GROUP, VERSION, PLURAL, backoff=5)
def reconcile_job(body: kopf.Body, name: str, namespace: str | None, logger: kopf.Logger, **_: Any) -> None:
    """Validate; create or adopt the ConfigMap and PyTorchJob; match suspend; write status."""
    with metrics.reconcile("FineTuneJob"):
        job, errors = validate_manifest(without_status(dict(body)))
        if job is None:
            logger.warning(f"invalid spec: {'; '.join(str(e) for e in errors)}")
        elif not has_ended(body):
            kube().ensure_children(job)
        post_events(kube().refresh_status(namespace, name, logger=logger))


def _owner(labels: kopf.Labels) -> str | None:
    return labels.get(JOB_NAME)


@kopf.on.event(PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, PYTORCHJOB_PLURAL, labels=OURS)
def pytorchjob_changed(labels: kopf.Labels, namespace: str | None, logger: kopf.Logger, **_: Any) -> None:
    """The PyTorchJob moved: follow it."""
    if job_name := _owner(labels):
        with metrics.reconcile("PyTorchJob"):
            post_events(kube().refresh_status(namespace, job_name, logger=logger))


@kopf.on.event("", "v1", "pods", labels=OURS)
def pod_changed(
    event: kopf.RawEvent,
    body: kopf.Body,
    labels: kopf.Labels,
    namespace: str | None,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    """A pod started, ended, was disrupted or deleted: its termination message may explain a failure.

    A deleted pod (the training operator replaces a failed one) is passed on in its final state, the
    last word on how long it ran and why it failed.
    """
    if job_name := _owner(labels):
        deleted = dict(body) if event.get("type") == "DELETED" else None
        with metrics.reconcile("Pod"):
            post_events(kube().refresh_status(namespace, job_name, logger=logger, deleted_pod=deleted))


@kopf.on.event(GROUP, VERSION, PLURAL)
def count_phases(event: kopf.RawEvent, body: kopf.Body, namespace: str | None, name: str, **_: Any) -> None:
    """Keeps the FineTuneJobs-by-phase gauge."""
    key = f"{namespace}/{name}"
    if event.get("type") == "DELETED":
        _phases.pop(key, None)
    else:
        _phases[key] = (body.get("status") or {}).get("phase")
    metrics.set_job_phases(_phases)


def _unfinished(status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") not in TERMINAL


@kopf.timer(GROUP, VERSION, PLURAL, interval=SETTINGS.progress_interval_seconds, when=_unfinished)
def follow_progress(body: kopf.Body, name: str, namespace: str | None, logger: kopf.Logger, **_: Any) -> None:
    """While running, read the trainer's progress; in every phase, resync status (missed events, lost nodes)."""
    with metrics.reconcile("Progress"):
        job, _errors = validate_manifest(without_status(dict(body)))
        progress = None
        if job is not None and (body.get("status") or {}).get("phase") == Phase.RUNNING.value:
            progress = kube().read_progress(job, kube().observe(job))
        post_events(kube().refresh_status(namespace, name, progress=progress, tick=True, logger=logger))
