"""`kubetune operator`: run the handlers against the current kubeconfig (or the pod's ServiceAccount)."""

from __future__ import annotations

import kopf

from kubetune.controller.config import OperatorConfig


def run_operator(verbose: bool = False, json_logs: bool = True) -> None:
    """One active reconciler (standalone, no peering): the chart runs one replica with the Recreate strategy."""
    settings = OperatorConfig()
    kopf.configure(
        verbose=verbose,
        log_format=kopf.LogFormat.JSON if json_logs else kopf.LogFormat.FULL,
        log_refkey="object",
    )
    from kubetune.controller import handlers  # noqa: F401  (registers the handlers)

    liveness = f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None
    kopf.run(
        standalone=True,
        clusterwide=not settings.namespaces,
        namespaces=list(settings.namespaces),
        liveness_endpoint=liveness,
    )
