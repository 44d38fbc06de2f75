"""The chart's operator at work: `helm install` puts `kubetune operator` on a node, where it runs under its own
ServiceAccount and takes a FineTuneJob from `kubectl apply` to Succeeded; `helm uninstall` leaves only the CRD.

The operator's pod runs on a stand-in kubelet (tests/support/kubelet.py): its container command is the one the
chart and the operator image's ENTRYPOINT give, run from the project's venv, with a TokenRequest token of the
chart's ServiceAccount, so every call it makes passes the API server's RBAC as in a real cluster. The trainer pods
run on kwok's fake GPU nodes (no trainer process; kwok plays their lifecycle, see docs/testing.md): the
end-to-end tier (tests/e2e) runs the real trainer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from kubernetes import client

from tests.deploy.test_chart_install import leftovers
from tests.support.kubelet import StandInNodes, stand_in_nodes
from tests.support.operator_chart import (
    GROUP,
    IMAGES,
    PLURAL,
    VERSION,
    PhaseHistory,
    installed_operator,
    say,
    token_identity,
)

if TYPE_CHECKING:
    from tests.integration.cluster import Cluster

wait_for = pytest.importorskip(
    "tests.integration.cluster", reason="needs the control plane of tests/integration"
).wait_for

pytestmark = pytest.mark.cluster

PTJ = ("kubeflow.org", "v1", "pytorchjobs")
CRD = f"{PLURAL}.{GROUP}"


@pytest.fixture
def standin(cluster: Cluster, tmp_path: Path) -> Iterator[StandInNodes]:
    if cluster.external:
        pytest.skip("the stand-in kubelet registers nodes in the project's own test control plane only")
    with stand_in_nodes(cluster.api_client, tmp_path / "nodes", IMAGES, count=1) as nodes:
        yield nodes


def a_finetunejob(name: str) -> dict[str, Any]:
    """A two-node job for kwok's 8-GPU nodes: suspended, so the test can tell kwok how long its pods run."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"source": "hf://Qwen/Qwen2.5-0.5B"},
            "dataset": {"source": "s3://data/train.jsonl"},
            "output": {"uri": f"s3://adapters/{name}/"},
            "resources": {"nodes": 2, "gpusPerNode": 8},
            "runPolicy": {"suspend": True},
        },
    }


def resume_on_kwok(cluster: Cluster, pytorchjob: dict[str, Any], run_seconds: int) -> None:
    """Tell kwok how long the job's pods run (long enough for every phase to be seen), then resume the job
    with `kubectl patch`, as a user would."""
    namespace, name = pytorchjob["metadata"]["namespace"], pytorchjob["metadata"]["name"]
    annotations = {"kwok.kubetune.io/run-duration": f"{run_seconds}s"}
    replicas = {
        replica: {"template": {"metadata": {"annotations": annotations}}}
        for replica in pytorchjob["spec"]["pytorchReplicaSpecs"]
    }
    patch = {"spec": {"pytorchReplicaSpecs": replicas}}
    cluster.custom.patch_namespaced_custom_object(*PTJ[:2], namespace, PTJ[2], name, patch)
    resume = json.dumps({"spec": {"runPolicy": {"suspend": False}}})
    cluster.kubectl("patch", "finetunejob", name, "-n", namespace, "--type=merge", "-p", resume)


def wait_for_end(cluster: Cluster, namespace: str, name: str, timeout: float) -> dict[str, Any]:
    """The FineTuneJob once its phase is Succeeded or Failed."""

    def ended() -> dict[str, Any] | None:
        job: dict[str, Any] = cluster.custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name
        )
        return job if job.get("status", {}).get("phase") in ("Succeeded", "Failed") else None

    result: dict[str, Any] = wait_for(ended, timeout=timeout, description=f"FineTuneJob {name} to end")
    return result


def namespace_contents(cluster: Cluster, namespace: str) -> list[str]:
    """Every object in a namespace but what Kubernetes itself puts in each one and events."""
    kinds = cluster.kubectl("api-resources", "--namespaced", "--verbs=list", "-o", "name").stdout.split()
    kinds = [kind for kind in kinds if kind not in ("events", "events.events.k8s.io")]
    found = cluster.kubectl("get", ",".join(kinds), "-n", namespace, "-o", "name").stdout.split()
    defaults = {"configmap/kube-root-ca.crt", "serviceaccount/default"}
    return [name for name in found if name not in defaults]


def test_the_charts_operator_takes_a_job_from_kubectl_apply_to_succeeded_under_its_own_service_account(
    cluster: Cluster, namespace: str, standin: StandInNodes, tmp_path: Path
) -> None:
    team = cluster.create_namespace(f"{namespace[:50]}-team")
    try:
        with installed_operator(
            cluster, standin, namespace, [team], tmp_path, progress_interval=2
        ) as operator:
            pod = operator.pod()
            assert pod["spec"]["nodeName"].startswith(standin.group)
            container = pod["status"]["containerStatuses"][0]
            assert "running" in container["state"] and container["ready"], container

            # The process talks to the API server with a token of the chart's ServiceAccount, nothing else.
            user = operator.kubeconfig()["users"][0]["user"]
            assert set(user) == {"token"}
            assert token_identity(cluster, user["token"]) == operator.service_account

            # It holds the leader-election Lease, which the chart lets it create and renew (that Lease only).
            leases = client.CoordinationV1Api(cluster.api_client)
            lease = leases.read_namespaced_lease(operator.fullname, namespace)
            assert lease.spec.holder_identity and lease.spec.renew_time, lease.spec
            # Owned by the ServiceAccount (from the holder's first renewal), so it goes with the release.
            owner = ("ServiceAccount", operator.service_account.rsplit(":", 1)[1])
            wait_for(
                lambda: (
                    [
                        (o.kind, o.name)
                        for o in leases.read_namespaced_lease(
                            operator.fullname, namespace
                        ).metadata.owner_references
                        or []
                    ]
                    == [owner]
                ),
                timeout=15,
                description="the Lease owned by the operator's ServiceAccount",
            )

            name = "chart-job"
            history = PhaseHistory(cluster, team, name)
            manifest = tmp_path / "finetunejob.yaml"
            manifest.write_text(yaml.safe_dump(a_finetunejob(name)))
            say(f"kubectl apply -f {manifest.name} -n {team}")
            cluster.kubectl("apply", "-n", team, "-f", str(manifest))
            pytorchjob = wait_for(
                lambda: cluster.custom.get_namespaced_custom_object(*PTJ[:2], team, PTJ[2], name),
                timeout=60,
                description=f"PyTorchJob {name} created by the operator",
            )
            say(f"PyTorchJob {name} created; resumed, its pods will run 4 s on kwok nodes")
            resume_on_kwok(cluster, pytorchjob, run_seconds=4)
            done = wait_for_end(cluster, team, name, timeout=120)
            wait_for(lambda: history.phases[-1:] == ["Succeeded"], timeout=10, description="the watch")
            history.stop()
            assert done["status"]["phase"] == "Succeeded", done["status"]
            assert history.phases[0] == "Pending", history.phases
            assert history.phases[-2:] == ["Running", "Succeeded"], history.phases
            pods = cluster.core.list_namespaced_pod(team, label_selector=f"kubetune.io/job-name={name}").items
            assert {p.spec.node_name for p in pods} <= {f"kwok-gpu-node-{i}" for i in range(4)}
            log = operator.log()
            assert "phase Running -> Succeeded" in log, log[-3000:]
            # The chart's permissions were enough for everything it did: not one call was refused.
            assert "Forbidden" not in log, [line for line in log.splitlines() if "Forbidden" in line][:3]

            say(
                f"kubectl delete finetunejob {name}: the operator lets go of it, the garbage collector takes its children"
            )
            cluster.kubectl("delete", "finetunejob", name, "-n", team, "--wait=true", "--timeout=60s")
            wait_for(
                lambda: not cluster.kubectl("get", "pytorchjobs,configmaps", "-n", team, "-o", "name", "-l",
                                            f"kubetune.io/job-name={name}").stdout.split(),
                timeout=60,
                description="the job's PyTorchJob and ConfigMap gone",
            )  # fmt: skip
            operator_pod = pod["metadata"]["name"]

        # The Deployment is gone; its pod goes next: SIGTERM, the operator stops, the stand-in removes the pod.
        wait_for(
            lambda: standin.running(namespace, operator_pod) is None,
            timeout=60,
            description=f"operator pod {operator_pod} stopped and removed",
        )
        wait_for(
            lambda: not leftovers(cluster, operator.release, [namespace, team]),
            timeout=60,
            description="the release's objects gone",
        )
        # Nothing of the chart remains, not even the leader-election Lease the operator made at run time: helm
        # deletes the Role that would let the operator delete it before the pod gets its SIGTERM, and the
        # garbage collector removes it with the ServiceAccount that owns it.
        wait_for(
            lambda: namespace_contents(cluster, namespace) == [],
            timeout=60,
            description="the release namespace emptied, the Lease too",
        )
        assert namespace_contents(cluster, team) == []
        assert cluster.has_crd(CRD), "helm never deletes a CRD it installed from crds/"
    finally:
        cluster.delete_namespace(team)
