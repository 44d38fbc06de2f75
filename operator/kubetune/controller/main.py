"""`kubetune operator`: kopf runs the handlers of handlers.py until SIGTERM (or a lost lease)."""

from __future__ import annotations

import gc
import logging
import socket
import threading
import uuid

import kopf
from kubernetes import config
from prometheus_client import start_http_server

from kubetune.controller import admission, handlers, metrics
from kubetune.controller.config import OperatorConfig
from kubetune.controller.kube import Kube, new_api_client
from kubetune.controller.leader import LeaseHolder, LeaseSettings
from kubetune.controller.reconciler import Reconciler

YOUNG_COLLECTION_ALLOCATIONS = 50_000
"""CPython's default is 700."""

log = logging.getLogger("kubetune.operator")


def configure_logging(verbose: bool, json_logs: bool) -> None:
    """kopf's own formatter (JSON lines or text) for every logger; kopf's per-object lines (one per
    handled event) only with `verbose`: the operator logs what changes a job."""
    kopf.configure(verbose=verbose, log_format=kopf.LogFormat.JSON if json_logs else kopf.LogFormat.FULL)
    # A probe every few seconds is not worth a log line (neither the request nor the probe handler's).
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("kopf.activities.probe").setLevel(logging.WARNING)
    if not verbose:
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        # A standby's election loop logs "is a follower" every retry period; leader.py logs the transitions.
        logging.getLogger("leaderelection").setLevel(logging.WARNING)


def collect_garbage_seldom() -> None:
    """Fewer garbage collections, and none that scans what start-up loaded: the indexes hold every job's
    objects as decoded JSON, long-lived and rarely cyclic (docs/architecture.md has the measurement)."""
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_ALLOCATIONS, *gc.get_threshold()[1:])


def _lead(leading: threading.Event, running: handlers.Runtime) -> None:
    leading.set()
    running.reconcile_all()


def run_operator(verbose: bool = False, json_logs: bool = True) -> None:
    """Serve in this process; with leader election, reconcile only while this replica holds the Lease.

    A standby runs kopf too (its watches and indexes stay warm, and kopf answers its liveness probe) but
    reconciles nothing until it leads.
    """
    settings = OperatorConfig()
    configure_logging(verbose, json_logs)
    collect_garbage_seldom()
    kube = Kube(api_client=new_api_client(settings.workers + 2), settings=settings)
    leading = threading.Event()
    reconciler = Reconciler(kube, settings, look=lambda key: handlers.runtime().look(key))
    dispatch = handlers.Dispatch(reconciler, settings.workers, leading)
    running = handlers.Runtime(settings, reconciler, dispatch, leading)
    handlers.install(running)
    if settings.webhook_port:
        admission.register()

    lease: LeaseHolder | None = None
    if settings.leader_election:
        config.load_config()  # type: ignore[no-untyped-call]  # the default client the Lease calls use
        lease = LeaseHolder(
            LeaseSettings(
                name=settings.leader_election_lease,
                namespace=settings.leader_election_namespace,
                identity=f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}",
                lease_duration_seconds=settings.leader_election_lease_seconds,
                renew_deadline_seconds=max(1, settings.leader_election_lease_seconds * 2 // 3),
            ),
            on_leading=lambda: _lead(leading, running),
        )
        lease.start()
        running.on_stop.append(lease.stop)
    else:
        leading.set()

    if settings.metrics_port:
        start_http_server(settings.metrics_port, registry=metrics.REGISTRY)
    metrics.count_job_phases(
        lambda: [
            (job.get("status") or {}).get("phase")
            for store in list((running.indexes.get("finetunejobs") or {}).values())
            for job in store
        ]
    )
    try:
        kopf.run(
            clusterwide=not settings.namespaces,
            namespaces=list(settings.namespaces),
            # The Lease elects the leader: kopf peering pauses every replica of one priority instead.
            standalone=True,
            liveness_endpoint=(
                f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None
            ),
        )
    finally:
        if lease is not None:
            lease.stop()
