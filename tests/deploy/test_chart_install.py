"""The chart against the real test control plane (hack/cluster): the API server accepts every rendered object,
`helm install` creates the operator with exactly the permissions it needs, and `helm uninstall` leaves only the
CRD behind (Helm never deletes what it installed from crds/).

kwok stands in for the kubelet here: it marks the operator's pod Running on a fake node, but no container is
ever started (there is no container runtime), so these tests check what the chart creates and what its
ServiceAccount may do, not the operator process itself.

The FineTuneJob CRD is left out here (`--skip-crds`, and not in the dry run): the chart's copy is byte-equal
to crds/ (tests/deploy/test_helm_chart.py), the API server's judgement of that generated CRD belongs to
tests/integration, and Helm's rule that crds/ is installed once and never deleted is checked offline.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from kubernetes import client

from tests.deploy.helm import CHART, helm, render, value_args

if TYPE_CHECKING:
    from tests.integration.cluster import Cluster

wait_for = pytest.importorskip(
    "tests.integration.cluster", reason="needs the control plane of tests/integration"
).wait_for

pytestmark = pytest.mark.cluster

PROMETHEUS_OPERATOR_GROUP = "monitoring.coreos.com"
SCENARIOS = {
    "defaults": [],
    "namespaced": ["ci/namespaced-values.yaml"],
    "monitoring": ["ci/monitoring-values.yaml"],
    "argocd": ["ci/argocd-values.yaml"],
}

# (verb, resource) the operator's ServiceAccount must be allowed in a namespace it watches.
NEEDED = [
    *[(verb, "finetunejobs.kubetune.io") for verb in ("get", "list", "watch", "patch")],
    *[(verb, "finetunejobs.kubetune.io/status") for verb in ("get", "patch")],
    *[(verb, "pytorchjobs.kubeflow.org") for verb in ("get", "list", "watch", "create", "patch")],
    *[(verb, "configmaps") for verb in ("get", "create", "patch")],
    ("create", "events"),
    *[(verb, "pods") for verb in ("get", "list", "watch")],
    *[(verb, "workloads.kueue.x-k8s.io") for verb in ("get", "list", "patch")],
]
# Cluster-scoped reads the operator needs in every mode: a running pod's node, and the nodes' GPU memory labels
# for the fit check.
NEEDED_CLUSTER_WIDE = [("get", "nodes"), ("list", "nodes")]
# What it must never do: read credentials, touch workloads it does not own, delete what users own.
FORBIDDEN = [
    ("get", "secrets"),
    ("list", "secrets"),
    ("watch", "secrets"),
    ("create", "secrets"),
    ("create", "deployments.apps"),
    ("delete", "deployments.apps"),
    ("patch", "daemonsets.apps"),
    ("create", "pods"),
    ("delete", "pods"),
    ("get", "pods/log"),
    ("create", "pods/exec"),
    ("delete", "finetunejobs.kubetune.io"),
    ("create", "finetunejobs.kubetune.io"),
    ("delete", "configmaps"),
    ("update", "configmaps"),
    ("list", "configmaps"),
    ("delete", "pytorchjobs.kubeflow.org"),
    ("update", "finetunejobs.kubetune.io"),
    ("create", "serviceaccounts/token"),
    ("create", "rolebindings.rbac.authorization.k8s.io"),
    ("escalate", "clusterroles.rbac.authorization.k8s.io"),
    ("impersonate", "serviceaccounts"),
    ("patch", "nodes"),
]


def can_i(cluster: Cluster, service_account: str, verb: str, resource: str, namespace: str | None) -> bool:
    """What `kubectl auth can-i VERB RESOURCE --as=SERVICE_ACCOUNT` asks, as a SubjectAccessReview.

    Sent directly (with the groups the API server gives every ServiceAccount token) so that the answer comes
    from RBAC alone: kubectl first resolves the resource through discovery and answers "no" for a kind whose
    CRD is not installed, and this test installs the chart without its CRD. `RESOURCE/SUB` names a subresource,
    `RESOURCE#NAME` one object.
    """
    resource, _, name = resource.partition("#")
    kind, _, subresource = resource.partition("/")
    plural, _, group = kind.partition(".")
    sa_namespace = service_account.split(":")[2]
    review = client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user=service_account,
            groups=[
                "system:serviceaccounts",
                f"system:serviceaccounts:{sa_namespace}",
                "system:authenticated",
            ],
            resource_attributes=client.V1ResourceAttributes(
                verb=verb,
                group=group,
                resource=plural,
                subresource=subresource or None,
                name=name or None,
                namespace=namespace or "",
            ),
        )
    )
    answer = client.AuthorizationV1Api(cluster.api_client).create_subject_access_review(review)
    return bool(answer.status.allowed)


def denied(
    cluster: Cluster, service_account: str, checks: list[tuple[str, str]], namespace: str | None
) -> list[str]:
    return [
        f"{verb} {resource}"
        for verb, resource in checks
        if not can_i(cluster, service_account, verb, resource, namespace)
    ]


def granted(
    cluster: Cluster, service_account: str, checks: list[tuple[str, str]], namespace: str | None
) -> list[str]:
    return [
        f"{verb} {resource}"
        for verb, resource in checks
        if can_i(cluster, service_account, verb, resource, namespace)
    ]


def release_name() -> str:
    return f"kt-{secrets.token_hex(3)}"


def install(cluster: Cluster, release: str, namespace: str, *set_values: str) -> str:
    """`helm install --wait`; returns what helm prints (the release notes)."""
    return helm(
        "install", release, str(CHART), "--namespace", namespace, "--skip-crds", "--wait", "--timeout", "120s",
        *value_args(set_values=set_values),
        kubeconfig=cluster.kubeconfig,
    ).stdout  # fmt: skip


def uninstall(cluster: Cluster, release: str, namespace: str) -> None:
    helm(
        "uninstall",
        release,
        "--namespace",
        namespace,
        "--wait",
        "--timeout",
        "120s",
        kubeconfig=cluster.kubeconfig,
    )


def leftovers(cluster: Cluster, release: str, namespaces: list[str]) -> list[str]:
    """Objects of the release still there, by the instance label every chart object carries."""
    selector = f"app.kubernetes.io/instance={release}"
    kinds = "deployments,services,serviceaccounts,configmaps,roles,rolebindings"
    found = []
    for namespace in namespaces:
        output = cluster.kubectl("get", kinds, "-n", namespace, "-l", selector, "-o", "name").stdout
        found += [f"{namespace}/{line}" for line in output.split()]
    output = cluster.kubectl("get", "clusterroles,clusterrolebindings", "-l", selector, "-o", "name").stdout
    return found + output.split()


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_rendered_object_is_accepted_by_the_api_server(
    cluster: Cluster, namespace: str, scenario: str
) -> None:
    """`kubectl apply --dry-run=server --validate=strict`: the test cluster's own schemas judge each object.

    Prometheus Operator objects are judged only when its CRDs are installed (the test cluster has none);
    tests/deploy/test_helm_chart.py checks them against the Service and the trainer pods they select.
    """
    team_a = cluster.create_namespace(f"{namespace[:50]}-a")
    team_b = cluster.create_namespace(f"{namespace[:50]}-b")
    try:
        manifests = render(
            [CHART / path for path in SCENARIOS[scenario]],
            [
                f"dashboard.namespace={namespace}",
                f"argocd.healthCheck.namespace={namespace}",
                *([f"watchNamespaces={{{team_a},{team_b}}}"] if scenario == "namespaced" else []),
            ],
            namespace=namespace,
            release=release_name(),
        )
        has_prometheus_operator = cluster.has_crd(f"servicemonitors.{PROMETHEUS_OPERATOR_GROUP}")
        checked = [
            m
            for m in manifests
            if has_prometheus_operator or not m["apiVersion"].startswith(PROMETHEUS_OPERATOR_GROUP)
        ]
        result = cluster.kubectl(
            "apply", "--dry-run=server", "--validate=strict", "-f", "-",
            stdin=yaml.safe_dump_all(checked), check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        applied = [line for line in result.stdout.splitlines() if "(server dry run)" in line]
        assert len(applied) == len(checked), result.stdout
    finally:
        cluster.delete_namespace(team_a)
        cluster.delete_namespace(team_b)


def test_helm_install_creates_the_operator_with_least_privilege_and_uninstall_removes_it(
    cluster: Cluster, namespace: str
) -> None:
    release = release_name()
    install(cluster, release, namespace)
    try:
        deployment = cluster.kubectl(
            "get", "deployment", release + "-kubetune", "-n", namespace, "-o", "yaml"
        ).stdout
        status: dict[str, Any] = yaml.safe_load(deployment)["status"]
        # kwok's fake node reports the pod Running and Ready; helm --wait already waited for that.
        assert status.get("readyReplicas") == 1, status
        for kind in ("serviceaccount", "service", "configmap"):
            name = release + "-kubetune" + ("-dashboard" if kind == "configmap" else "")
            cluster.kubectl("get", kind, name, "-n", namespace)

        service_account = f"system:serviceaccount:{namespace}:{release}-kubetune"
        assert not denied(cluster, service_account, NEEDED, namespace)
        assert not denied(cluster, service_account, NEEDED, None), "cluster mode watches every namespace"
        assert not denied(cluster, service_account, NEEDED_CLUSTER_WIDE, None)
        assert not granted(cluster, service_account, FORBIDDEN, namespace)
        assert not granted(cluster, service_account, FORBIDDEN, None)

        # Leader election: its own Lease in the release namespace, nobody else's, nowhere else.
        lease = f"leases.coordination.k8s.io#{release}-kubetune"
        leases = "leases.coordination.k8s.io"
        assert not denied(
            cluster, service_account, [("create", leases), ("get", lease), ("update", lease)], namespace
        )
        foreign_lease = f"{leases}#kube-scheduler"
        assert not granted(
            cluster,
            service_account,
            [("update", foreign_lease), ("delete", lease), ("list", leases)],
            namespace,
        )
        assert not granted(cluster, service_account, [("create", leases), ("update", foreign_lease)], None)
    finally:
        uninstall(cluster, release, namespace)

    wait_for(
        lambda: not leftovers(cluster, release, [namespace]),
        timeout=60,
        description="the release's objects gone",
    )


def test_namespaced_install_grants_nothing_outside_the_watched_namespaces(
    cluster: Cluster, namespace: str
) -> None:
    team_a = cluster.create_namespace(f"{namespace[:50]}-a")
    team_b = cluster.create_namespace(f"{namespace[:50]}-b")
    elsewhere = cluster.create_namespace(f"{namespace[:50]}-x")
    release = release_name()
    try:
        notes = install(cluster, release, namespace, f"watchNamespaces={{{team_a},{team_b}}}")
        try:
            assert f"rollout status deployment/{release}-kubetune" in notes
            assert f"namespaced mode): {team_a}, {team_b}" in notes
            assert f"kubectl apply -n {team_a} -f examples/quickstart.yaml" in notes
            service_account = f"system:serviceaccount:{namespace}:{release}-kubetune"
            for watched in (team_a, team_b):
                assert not denied(cluster, service_account, NEEDED, watched), watched
                assert not granted(cluster, service_account, FORBIDDEN, watched), watched
                cluster.kubectl("get", "role,rolebinding", f"{release}-kubetune", "-n", watched)
            for outside in (elsewhere, namespace):
                assert granted(cluster, service_account, NEEDED, outside) == [], outside
            assert not denied(cluster, service_account, NEEDED_CLUSTER_WIDE, None)
            assert (
                granted(
                    cluster,
                    service_account,
                    [("list", "namespaces"), ("list", "finetunejobs.kubetune.io")],
                    None,
                )
                == []
            )
        finally:
            uninstall(cluster, release, namespace)
        wait_for(
            lambda: not leftovers(cluster, release, [namespace, team_a, team_b]),
            timeout=60,
            description="the release's objects gone from every namespace",
        )
    finally:
        for created in (team_a, team_b, elsewhere):
            cluster.delete_namespace(created)
