"""The kubetune chart installed with helm into the test control plane, its operator run by the stand-in kubelet.

Shared by the deploy tier (tests/deploy/test_chart_lifecycle.py) and the end-to-end tier (tests/e2e). The images
the chart and the renderer name are looked up in the repository's Dockerfiles (their ENTRYPOINT and CMD); the
programs come from the project's venv, so what runs is the checked-out code.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from kubernetes import client, watch

from tests.conftest import ROOT
from tests.deploy.helm import CHART, helm
from tests.support.kubelet import Image, StandInNodes
from tests.support.seaweedfs import free_ports

if TYPE_CHECKING:
    from tests.integration.cluster import Cluster

IMAGES = {
    "ghcr.io/kubetune/kubetune-operator": Image.from_dockerfile(ROOT / "Dockerfile"),
    "ghcr.io/kubetune/kubetune-trainer": Image.from_dockerfile(ROOT / "trainer-image" / "Dockerfile"),
}
GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"


def say(message: str) -> None:
    """One timestamped line of a test's story: pytest shows them when the test fails, `-s` always."""
    stamp = datetime.datetime.now().strftime("%H:%M:%S.%f")[:-3]
    print(f"{stamp} {message}", flush=True)


def release_name() -> str:
    return f"kt-{secrets.token_hex(3)}"


@dataclass
class InstalledOperator:
    """A helm release of the chart whose operator pod runs on a stand-in node."""

    cluster: Cluster
    nodes: StandInNodes
    release: str
    namespace: str
    watched: list[str]

    @property
    def fullname(self) -> str:
        return f"{self.release}-kubetune"

    @property
    def service_account(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.fullname}"

    def pod(self) -> dict[str, Any]:
        """The operator's pod (the one not being deleted)."""
        pods = self.cluster.core.list_namespaced_pod(
            self.namespace, label_selector=f"app.kubernetes.io/instance={self.release}"
        ).items
        live = [p for p in pods if p.metadata.deletion_timestamp is None]
        assert len(live) == 1, [p.metadata.name for p in pods]
        result: dict[str, Any] = self.cluster.api_client.sanitize_for_serialization(live[0])
        return result

    def log(self) -> str:
        path = self.nodes.log_path(self.namespace, self.pod()["metadata"]["name"])
        return path.read_text(errors="replace") if path else ""

    def kubeconfig(self) -> dict[str, Any]:
        """The kubeconfig the stand-in wrote for the operator's process from its ServiceAccount token."""
        found = self.nodes.running(self.namespace, self.pod()["metadata"]["name"])
        assert found is not None
        paths = list(found[1].folder.glob("volumes/*/kubeconfig"))
        assert len(paths) == 1, paths
        config: dict[str, Any] = json.loads(paths[0].read_text())
        return config


def values(nodes: StandInNodes, watched: list[str], progress_interval: int) -> dict[str, Any]:
    """Chart values that put the operator on the stand-in nodes; its ports are free ones, as pods there share
    this machine's network."""
    metrics_port, health_port = free_ports(2)
    return {
        "watchNamespaces": watched,
        "nodeSelector": nodes.node_selector,
        "tolerations": nodes.tolerations,
        "operator": {
            "metricsPort": metrics_port,
            "healthPort": health_port,
            "progressIntervalSeconds": progress_interval,
            "extraArgs": ["--text-logs"],
        },
        "readinessProbe": {"initialDelaySeconds": 1, "periodSeconds": 2},
    }


@contextlib.contextmanager
def installed_operator(
    cluster: Cluster,
    nodes: StandInNodes,
    namespace: str,
    watched: list[str],
    work_dir: Path,
    progress_interval: int = 30,
) -> Iterator[InstalledOperator]:
    """`helm install --wait` (CRD included), yield, then `helm uninstall --wait`.

    --wait waits for the Deployment's pod to be Ready: the stand-in runs `kubetune operator` and probes its
    /healthz, so the install returns once the operator answers.
    """
    release = release_name()
    values_file = work_dir / f"{release}-values.yaml"
    values_file.write_text(yaml.safe_dump(values(nodes, watched, progress_interval)))
    installed = InstalledOperator(cluster, nodes, release, namespace, watched)
    say(
        f"helm install {release} charts/kubetune -n {namespace} (operator on {nodes.group}, watching {watched})"
    )
    helm(
        "install", release, str(CHART), "--namespace", namespace, "-f", str(values_file),
        "--wait", "--timeout", "180s",
        kubeconfig=cluster.kubeconfig,
    )  # fmt: skip
    say(f"operator pod {installed.pod()['metadata']['name']} Ready on {installed.pod()['spec']['nodeName']}")
    try:
        yield installed
    finally:
        say(f"helm uninstall {release}")
        helm(
            "uninstall", release, "--namespace", namespace, "--wait", "--timeout", "120s",
            kubeconfig=cluster.kubeconfig, check=False,
        )  # fmt: skip


@dataclass
class PhaseHistory:
    """Every phase the API server stored for one FineTuneJob, seen through a watch started before it exists."""

    cluster: Cluster
    namespace: str
    name: str
    phases: list[str] = field(default_factory=list)
    statuses: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._watch = watch.Watch()  # type: ignore[no-untyped-call]
        listed = self.cluster.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL)
        since = listed["metadata"]["resourceVersion"]
        threading.Thread(target=self._run, args=(since,), daemon=True).start()

    def _run(self, since: str) -> None:
        with contextlib.suppress(Exception):
            for event in self._watch.stream(  # type: ignore[no-untyped-call]
                self.cluster.custom.list_namespaced_custom_object,
                GROUP, VERSION, self.namespace, PLURAL,
                field_selector=f"metadata.name={self.name}", resource_version=since, timeout_seconds=900,
            ):  # fmt: skip
                status = event["object"].get("status") or {}
                if status and (not self.statuses or self.statuses[-1] != status):
                    self.statuses.append(status)
                phase = status.get("phase")
                if phase and (not self.phases or self.phases[-1] != phase):
                    self.phases.append(phase)
                    say(f"FineTuneJob {self.name}: {phase} {status.get('message') or ''}".rstrip())

    def stop(self) -> None:
        self._watch.stop()  # type: ignore[no-untyped-call]


def token_identity(cluster: Cluster, token: str) -> str:
    """Who the API server says a bearer token is (TokenReview)."""
    review = client.AuthenticationV1Api(cluster.api_client).create_token_review(
        client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token))
    )
    assert review.status.authenticated, review.status.error
    return str(review.status.user.username)
