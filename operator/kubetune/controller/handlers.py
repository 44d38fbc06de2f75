"""The kopf handlers: watch events in, the reconciler's store and queue fed; nothing else.

kopf supplies the watches (lists, reconnects, resourceVersions, server-side label selectors) and the
liveness endpoint. The reconcile itself runs in `reconciler.Reconciler`'s workers, one job at a time, from
what the watches delivered (see reconciler.py for why not in kopf's per-object handlers).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import kopf
from prometheus_client import start_http_server

from kubetune.api.v1alpha1 import GROUP, PLURAL, VERSION
from kubetune.controller import metrics
from kubetune.controller.config import OperatorConfig
from kubetune.controller.kube import (
    PYTORCHJOB_GROUP,
    PYTORCHJOB_PLURAL,
    PYTORCHJOB_VERSION,
    Kube,
    new_api_client,
)
from kubetune.controller.reconciler import Reconciler
from kubetune.render.labels import MANAGED_BY

SETTINGS = OperatorConfig()
FINALIZER = "kubetune.io/finalizer"
OURS = {MANAGED_BY: "kubetune"}
OURS_SELECTOR = f"{MANAGED_BY}=kubetune"


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf builds a diff base for every watch event (a deep copy of the whole object) to serve change
    handlers (on.create/update); this operator has none, only on.event, so nothing ever reads it. At a
    thousand jobs that copy was 14% of the operator's CPU. kopf documents this storage as replaceable."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


_reconciler: Reconciler | None = None


def reconciler() -> Reconciler:
    if _reconciler is None:
        raise kopf.TemporaryError("the operator is still starting", delay=1)
    return _reconciler


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, logger: kopf.Logger, **_: Any) -> None:
    """Every kopf setting in one place; then the reconciler's workers start."""
    global _reconciler
    # Earlier versions had kopf put this finalizer on every job (for a per-job timer). Nothing needs it now,
    # and kopf lifts a finalizer of this name from each job it sees when no handler requires it.
    settings.persistence.finalizer = FINALIZER
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    # Only our own PyTorchJobs and pods, filtered by the API server: a cluster's other pods never reach us.
    settings.watching.label_selectors["v1", "pods"] = OURS_SELECTOR
    settings.watching.label_selectors[PYTORCHJOB_GROUP, PYTORCHJOB_PLURAL] = OURS_SELECTOR
    if SETTINGS.namespaces:
        # Namespaced mode: the chart grants no cluster-wide list of namespaces, and kopf's scan for them
        # retries that forbidden call for about a minute before it watches the named namespaces (at every
        # start and leader change). The names are exact, so nothing needs scanning; the cost is that a CRD
        # installed after the operator started is seen at its next restart.
        settings.scanning.disabled = True
    kube = Kube(api_client=new_api_client(), settings=SETTINGS)
    # Beside the watches, not before them: kopf lists nothing until the startup handlers return, and the
    # imports take a second of a restart that reconciles from the lists alone.
    threading.Thread(target=kube.warm_up, name="warm-up", daemon=True).start()
    _reconciler = Reconciler(kube, SETTINGS)
    _reconciler.start()
    if SETTINGS.metrics_port:
        start_http_server(SETTINGS.metrics_port, registry=metrics.REGISTRY)
    logger.info(
        f"kubetune operator: namespaces={list(SETTINGS.namespaces) or 'all'} workers={SETTINGS.workers} "
        f"metrics_port={SETTINGS.metrics_port} progress_interval={SETTINGS.progress_interval_seconds}s"
    )


@kopf.on.cleanup()
def stop_workers(**_: Any) -> None:
    if _reconciler is not None:
        _reconciler.stop()


@kopf.on.event(GROUP, VERSION, PLURAL)
async def finetunejob_changed(event: kopf.RawEvent, **_: Any) -> None:
    """Store the job and queue it (the by-phase gauge counts the store when scraped)."""
    reconciler().job_event(event.get("type"), event["object"])


@kopf.on.event(PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, PYTORCHJOB_PLURAL, labels=OURS)
async def pytorchjob_changed(event: kopf.RawEvent, **_: Any) -> None:
    reconciler().pytorchjob_event(event.get("type"), event["object"])


@kopf.on.event("", "v1", "pods", labels=OURS)
async def pod_changed(event: kopf.RawEvent, **_: Any) -> None:
    """A deleted pod (the training operator replaces a failed one) is kept in its final state until a
    reconcile has banked how long it ran and why it failed."""
    reconciler().pod_event(event.get("type"), event["object"])
