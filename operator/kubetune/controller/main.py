"""`kubetune operator`: run the handlers against the current kubeconfig (or the pod's ServiceAccount)."""

from __future__ import annotations

import logging
import socket
import uuid

import kopf
from kubernetes import config

from kubetune.controller.config import OperatorConfig
from kubetune.controller.leader import LeaseSettings, run_as_leader


def run_operator(verbose: bool = False, json_logs: bool = True) -> None:
    """Run the handlers in this process; with leader election, only once this replica holds the Lease.

    kopf itself runs standalone either way: its peering pauses a standby but is not a lease, so the Lease
    (see leader.py) decides which replica reconciles.
    """
    settings = OperatorConfig()
    kopf.configure(
        verbose=verbose,
        log_format=kopf.LogFormat.JSON if json_logs else kopf.LogFormat.FULL,
        log_refkey="object",
    )
    if not verbose:
        # kopf logs "Handler ... succeeded." for every watch event at INFO: at a thousand jobs that is most
        # of the log and a share of the CPU. Its warnings and errors still come through.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    from kubetune.controller import handlers  # noqa: F401  (registers the handlers)

    liveness = f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None

    def reconcile() -> None:
        kopf.run(
            standalone=True,
            clusterwide=not settings.namespaces,
            namespaces=list(settings.namespaces),
            liveness_endpoint=liveness,
        )

    if not settings.leader_election:
        reconcile()
        return
    config.load_config()  # type: ignore[no-untyped-call]  # the default client the Lease calls use
    lease = LeaseSettings(
        name=settings.leader_election_lease,
        namespace=settings.leader_election_namespace,
        identity=f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}",
        lease_duration_seconds=settings.leader_election_lease_seconds,
        renew_deadline_seconds=max(1, settings.leader_election_lease_seconds * 2 // 3),
    )
    run_as_leader(lease, reconcile, health_port=settings.health_port)
