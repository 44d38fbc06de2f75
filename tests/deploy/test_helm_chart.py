"""The Helm chart: it lints, renders what a platform team expects in each install mode, grants the operator only
what it uses, refuses mistyped values, and ships exactly the generated CRD, dashboard and health check.

These tests run `helm lint` / `helm template` only; tests/deploy/test_chart_install.py installs into the test
control plane.
"""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT
from tests.deploy.helm import CHART, CI_VALUES, find, helm, kube_version_args, one, render

NAMESPACED = CHART / "ci" / "namespaced-values.yaml"
MONITORING = CHART / "ci" / "monitoring-values.yaml"
ARGOCD = CHART / "ci" / "argocd-values.yaml"

# What the operator does with each kind, and nothing else (see docs/gitops.md and the chart's rbac.yaml).
NAMESPACED_PERMISSIONS = {
    ("kubetune.io", "finetunejobs"): {"get", "list", "watch", "patch"},
    ("kubetune.io", "finetunejobs/status"): {"get", "patch"},
    ("kubeflow.org", "pytorchjobs"): {"get", "list", "watch", "create", "patch"},
    ("kueue.x-k8s.io", "workloads"): {"get", "list", "patch"},
    ("", "configmaps"): {"get", "create", "patch"},
    ("", "events"): {"create"},
    ("", "pods"): {"get", "list", "watch"},
}
# Cluster-scoped in both modes: the node of a running trainer pod (lost or not), and the nodes' GPU memory
# labels for the fit check.
CLUSTER_SCOPED = {("", "nodes"): {"get", "list"}}
LEADER_ELECTION = "kubetune-leader-election"


def watch_roles(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The Roles or RoleBindings of the watched namespaces (the leader-election pair aside)."""
    return [m for m in find(manifests, kind) if m["metadata"]["name"] != LEADER_ELECTION]


def permissions(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> verbs of a Role or ClusterRole; asserts no wildcard and no resourceNames tricks."""
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "nonResourceURLs" not in rule and "resourceNames" not in rule, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert "*" not in (group, resource) and "*" not in rule["verbs"], f"wildcard in {rule}"
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda p: p.name if p else "defaults")
def test_chart_lints_strictly_with_default_and_ci_values(values: Path | None) -> None:
    helm("lint", str(CHART), "--strict", *(["-f", str(values)] if values else []))


def test_default_install_is_cluster_wide_with_one_leader_elected_operator() -> None:
    manifests = render()
    kinds = sorted(m["kind"] for m in manifests)
    assert kinds == sorted(
        [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Service",
            "Deployment",
            "ConfigMap",
        ]
    ), kinds
    deployment = one(manifests, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    # The new pod waits as a standby until the old one hands the Lease back: a rollout is never unattended.
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == one(manifests, "ServiceAccount")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/kubetune/kubetune-operator:0.1.0"
    assert "args" not in container  # `kubetune operator` is configured by its KUBETUNE_* environment
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["KUBETUNE_NAMESPACES"] == ""
    assert env["KUBETUNE_TRAINER_IMAGE"] == "ghcr.io/kubetune/kubetune-trainer:0.1.0"
    assert env["KUBETUNE_METRICS_PORT"] == "8080"
    assert env["KUBETUNE_HEALTH_PORT"] == "8081"
    assert env["KUBETUNE_PROGRESS_INTERVAL_SECONDS"] == "30"
    assert env["KUBETUNE_LEADER_ELECTION"] == "true"
    assert env["KUBETUNE_LEADER_ELECTION_LEASE"] == "kubetune"
    assert env["KUBETUNE_LEADER_ELECTION_LEASE_SECONDS"] == "15"
    lease_namespace = next(e for e in container["env"] if e["name"] == "KUBETUNE_LEADER_ELECTION_NAMESPACE")
    assert lease_namespace["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"]["requests"] and container["resources"]["limits"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"metrics": 8080, "healthz": 8081}

    service = one(manifests, "Service")
    assert service["spec"]["selector"] == spec["selector"]["matchLabels"]
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}
    ]


def test_cluster_mode_grants_exactly_what_the_operator_uses() -> None:
    manifests = render()
    role = one(manifests, "ClusterRole")
    assert permissions(role) == {**NAMESPACED_PERMISSIONS, **CLUSTER_SCOPED}
    binding = one(manifests, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kubetune", "namespace": "kubetune-system"}
    ]
    assert not watch_roles(manifests, "Role") and not watch_roles(manifests, "RoleBinding")


def test_leader_election_may_touch_only_its_own_lease_in_the_release_namespace() -> None:
    manifests = render()
    (role,) = find(manifests, "Role", LEADER_ELECTION)
    assert role["metadata"]["namespace"] == "kubetune-system"
    # `create` cannot be limited to a name (the object does not exist yet); get and update can.
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": ["kubetune"],
            "verbs": ["get", "update"],
        },
    ]
    (binding,) = find(manifests, "RoleBinding", LEADER_ELECTION)
    assert binding["roleRef"]["name"] == LEADER_ELECTION
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kubetune", "namespace": "kubetune-system"}
    ]


def test_without_leader_election_one_replica_is_replaced_not_rolled() -> None:
    manifests = render(set_values=["leaderElection.enabled=false"])
    assert not find(manifests, "Role") and not find(manifests, "RoleBinding")
    deployment = one(manifests, "Deployment")
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert not [e for e in container["env"] if e["name"].startswith("KUBETUNE_LEADER_ELECTION")]


def test_standby_replicas_are_allowed_with_leader_election() -> None:
    assert one(render(set_values=["replicaCount=3"]), "Deployment")["spec"]["replicas"] == 3


def test_namespaced_mode_grants_roles_only_in_the_watched_namespaces() -> None:
    manifests = render([NAMESPACED])
    roles = watch_roles(manifests, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert permissions(role) == NAMESPACED_PERMISSIONS
    bindings = watch_roles(manifests, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["subjects"][0]["namespace"] == "kubetune-system"
    # Only the cluster-scoped reads stay cluster-wide: no namespaces, no FineTuneJobs everywhere.
    assert permissions(one(manifests, "ClusterRole")) == CLUSTER_SCOPED
    (container,) = one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["KUBETUNE_NAMESPACES"] == "team-a,team-b"
    assert env["KUBETUNE_TRAINER_IMAGE"] == "registry.example.com/ml/kubetune-trainer:0.1.0"
    assert env["KUBETUNE_PROGRESS_INTERVAL_SECONDS"] == "10"


def test_monitoring_scrapes_the_operator_service_and_every_trainer_pod() -> None:
    manifests = render([MONITORING])
    service = one(manifests, "Service")
    service_monitor = one(manifests, "ServiceMonitor")
    assert service_monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in service_monitor["spec"]["endpoints"]] == ["metrics"]
    assert service_monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"

    pod_monitor = one(manifests, "PodMonitor")
    # The labels and port name the operator's renderer puts on trainer pods (kubetune.render).
    from kubetune.render.labels import JOB_NAME, MANAGED_BY

    selector = pod_monitor["spec"]["selector"]
    assert selector["matchLabels"] == {MANAGED_BY: "kubetune"}
    assert selector["matchExpressions"] == [{"key": JOB_NAME, "operator": "Exists"}]
    assert pod_monitor["spec"]["namespaceSelector"] == {"any": True}
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["interval"] == "10s"

    dashboard = one(manifests, "ConfigMap")
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "ML"}


def test_the_pod_monitor_selects_the_trainer_pods_the_operator_renders() -> None:
    """The PodMonitor's selector and port name match what kubetune.render puts on every trainer pod."""
    from kubetune.render import RenderConfig, build_pytorchjob
    from tests.builders import a_job

    pytorchjob = build_pytorchjob(a_job().build(), RenderConfig(trainer_image="trainer:test"))
    pod_monitor = one(render([MONITORING]), "PodMonitor")["spec"]
    for replica in pytorchjob["spec"]["pytorchReplicaSpecs"].values():
        template = replica["template"]
        labels = template["metadata"]["labels"]
        assert pod_monitor["selector"]["matchLabels"].items() <= labels.items()
        assert all(e["key"] in labels for e in pod_monitor["selector"]["matchExpressions"])
        ports = {port["name"] for c in template["spec"]["containers"] for port in c.get("ports", [])}
        assert {e["port"] for e in pod_monitor["podMetricsEndpoints"]} <= ports


def test_monitoring_in_namespaced_mode_scrapes_only_the_watched_namespaces() -> None:
    manifests = render([NAMESPACED, MONITORING])
    assert one(manifests, "PodMonitor")["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


def test_argocd_values_render_the_health_check_and_a_pinned_digest() -> None:
    manifests = render([ARGOCD])
    (container,) = one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["--text-logs"]
    assert container["image"] == "ghcr.io/kubetune/kubetune-operator@sha256:" + "0" * 64
    health = find(manifests, "ConfigMap", "kubetune-argocd-health")
    assert len(health) == 1 and health[0]["metadata"]["namespace"] == "argocd"
    lua = health[0]["data"]["resource.customizations.health.kubetune.io_FineTuneJob"]
    assert lua == (ROOT / "docs" / "argocd" / "health.lua").read_text().rstrip("\n")


@pytest.mark.parametrize(
    ("set_values", "complaint"),
    [
        (["imagee.tag=x"], "imagee"),  # a typo is refused by values.schema.json
        (["monitoring.serviceMonitor.enabld=true"], "enabld"),
        # Without a Lease, two replicas would both handle every job.
        (["replicaCount=2", "leaderElection.enabled=false"], "leaderElection.enabled"),
        (["leaderElection.leaseDurationSeconds=2"], "leaseDurationSeconds"),
        (["monitoring.serviceMonitor.enabled=true", "service.enabled=false"], "service.enabled"),
        (["watchNamespaces={Team_A}"], "watchNamespaces"),
        (["image.pullPolicy=Sometimes"], "pullPolicy"),
    ],
)
def test_mistakes_in_values_are_refused_with_a_message_naming_them(
    set_values: list[str], complaint: str
) -> None:
    args = ["template", "kubetune", str(CHART), *kube_version_args()]
    for assignment in set_values:
        args += ["--set", assignment]
    result = helm(*args, check=False)
    assert result.returncode != 0, result.stdout
    assert complaint in result.stderr, result.stderr


def _leaf_paths(node: Any, prefix: str = "") -> set[str]:
    if isinstance(node, dict) and node:
        paths: set[str] = set()
        for key, value in node.items():
            paths |= _leaf_paths(value, f"{prefix}.{key}" if prefix else key)
        return paths
    return {prefix}


def _schema_paths(schema: dict[str, Any], prefix: str = "") -> set[str]:
    properties = schema.get("properties")
    if not properties:
        return {prefix}
    paths: set[str] = set()
    for key, value in properties.items():
        paths |= _schema_paths(value, f"{prefix}.{key}" if prefix else key)
    return paths


def test_values_schema_covers_every_value_and_closes_every_section() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    schema_paths = _schema_paths(schema)
    # Free-form maps (resources, securityContext...) are leaves in the schema; values below them are not checked.
    uncovered = {
        p for p in _leaf_paths(values) if not any(p == s or p.startswith(s + ".") for s in schema_paths)
    }
    assert not uncovered, f"values.yaml keys missing from values.schema.json: {sorted(uncovered)}"

    def closed(node: dict[str, Any], path: str) -> None:
        if "properties" in node:
            assert node.get("additionalProperties") is False, f"{path or 'top level'} accepts unknown keys"
            for key, child in node["properties"].items():
                closed(child, f"{path}.{key}" if path else key)

    closed(schema, "")


def test_every_value_is_documented_where_it_is_defined() -> None:
    """Each key in values.yaml has a `# --` comment above it, or lies inside a documented key or section."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    documented_at: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    for index, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip())
        while documented_at and documented_at[-1][0] >= indent:
            documented_at.pop()
        above = index - 1
        while (
            above >= 0
            and lines[above].strip().startswith("#")
            and not lines[above].strip().startswith("# --")
        ):
            above -= 1
        has_doc = above >= 0 and lines[above].strip().startswith("# --")
        inside_documented = any(documented for _, documented in documented_at)
        is_section = stripped.endswith(":")
        if not (has_doc or inside_documented or is_section):
            undocumented.append(stripped)
        documented_at.append((indent, has_doc or inside_documented))
    assert not undocumented, f"values without a `# --` comment: {undocumented}"


def test_chart_copies_equal_their_generated_sources() -> None:
    """The chart ships copies (Helm reads only files inside the chart); scripts/sync-chart-crd.sh refreshes them."""
    pairs = [
        (ROOT / "crds" / "kubetune.io_finetunejobs.yaml", CHART / "crds" / "kubetune.io_finetunejobs.yaml"),
        (
            ROOT / "docs" / "grafana" / "kubetune-dashboard.json",
            CHART / "dashboards" / "kubetune-dashboard.json",
        ),
        (ROOT / "docs" / "argocd" / "health.lua", CHART / "files" / "argocd-health.lua"),
    ]
    stale = [
        str(copy.relative_to(ROOT)) for source, copy in pairs if source.read_bytes() != copy.read_bytes()
    ]
    assert not stale, f"stale chart copies {stale}: run scripts/sync-chart-crd.sh"


def test_rendered_dashboard_is_the_documented_one_labelled_for_the_grafana_sidecar() -> None:
    dashboard = find(render(), "ConfigMap", "kubetune-dashboard")[0]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    rendered = json.loads(dashboard["data"]["kubetune-dashboard.json"])
    assert rendered == json.loads((ROOT / "docs" / "grafana" / "kubetune-dashboard.json").read_text())


def test_crd_ships_in_the_crds_folder_so_uninstall_keeps_it() -> None:
    crds = [m for m in render(include_crds=True) if m["kind"] == "CustomResourceDefinition"]
    assert [c["metadata"]["name"] for c in crds] == ["finetunejobs.kubetune.io"]
    assert not [m for m in render() if m["kind"] == "CustomResourceDefinition"]


# ------------------------------------------------------------------------------------- admission webhook

WEBHOOK_ON = ["webhook.enabled=true"]


def _pem(data: str, path: Path) -> Path:
    path.write_bytes(base64.b64decode(data))
    return path


def openssl(*args: str | Path) -> str:
    result = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_webhook_is_off_by_default_and_renders_nothing_of_it() -> None:
    manifests = render()
    assert not find(manifests, "ValidatingWebhookConfiguration") and not find(manifests, "Secret")
    assert [s["metadata"]["name"] for s in find(manifests, "Service")] == ["kubetune"]
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert not [e for e in container["env"] if e["name"].startswith("KUBETUNE_WEBHOOK")]
    assert "webhook" not in {port["name"] for port in container["ports"]}
    assert [volume["name"] for volume in pod["volumes"]] == ["tmp"]


def test_the_webhook_renders_a_service_a_certificate_and_a_configuration_that_fit_together(
    tmp_path: Path,
) -> None:
    from kubetune.controller.admission import HANDLER_ID

    manifests = render(set_values=WEBHOOK_ON)
    deployment = one(manifests, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["webhook"] == int(env["KUBETUNE_WEBHOOK_PORT"]) == 9443

    # The Service sends 443 to the container's webhook port, on every replica (standbys answer too).
    (service,) = find(manifests, "Service", "kubetune-webhook")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"] == [
        {"name": "webhook", "port": 443, "targetPort": "webhook", "protocol": "TCP"}
    ]

    # The Secret is mounted where the operator reads its certificate and key.
    secret = one(manifests, "Secret")
    assert secret["type"] == "kubernetes.io/tls" and set(secret["data"]) == {"tls.crt", "tls.key", "ca.crt"}
    (volume,) = [v for v in pod["volumes"] if v.get("secret")]
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True
    assert env["KUBETUNE_WEBHOOK_CERT_FILE"] == f"{mount['mountPath']}/tls.crt"
    assert env["KUBETUNE_WEBHOOK_KEY_FILE"] == f"{mount['mountPath']}/tls.key"

    # The API server calls the Service at kopf's path for the handler, trusting the Secret's CA.
    configuration = one(manifests, "ValidatingWebhookConfiguration")
    (webhook,) = configuration["webhooks"]
    assert webhook["clientConfig"]["service"] == {
        "name": "kubetune-webhook",
        "namespace": "kubetune-system",
        "path": f"/{HANDLER_ID}",
        "port": 443,
    }
    assert webhook["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
    assert webhook["rules"] == [
        {
            "apiGroups": ["kubetune.io"],
            "apiVersions": ["v1alpha1"],
            "resources": ["finetunejobs"],
            "operations": ["CREATE", "UPDATE"],
            "scope": "Namespaced",
        }
    ]
    # An operator that is down must not block `kubectl apply`: CEL and the operator still judge the spec.
    assert (webhook["failurePolicy"], webhook["sideEffects"], webhook["timeoutSeconds"]) == (
        "Ignore",
        "None",
        5,
    )
    assert "namespaceSelector" not in webhook

    # The certificate is the CA's, names the Service's DNS name and goes with the key.
    ca = _pem(secret["data"]["ca.crt"], tmp_path / "ca.crt")
    cert = _pem(secret["data"]["tls.crt"], tmp_path / "tls.crt")
    key = _pem(secret["data"]["tls.key"], tmp_path / "tls.key")
    assert openssl("verify", "-CAfile", ca, cert).strip().endswith("OK")
    assert "DNS:kubetune-webhook.kubetune-system.svc" in openssl(
        "x509", "-in", cert, "-noout", "-ext", "subjectAltName"
    )
    assert openssl("x509", "-in", cert, "-noout", "-pubkey") == openssl("pkey", "-in", key, "-pubout")

    # The chart, not kopf, owns the configuration: the operator gets no admissionregistration permission.
    assert permissions(one(manifests, "ClusterRole")) == permissions(one(render(), "ClusterRole"))


def test_in_namespaced_mode_the_webhook_judges_only_the_watched_namespaces() -> None:
    (webhook,) = one(render([NAMESPACED], WEBHOOK_ON), "ValidatingWebhookConfiguration")["webhooks"]
    assert webhook["namespaceSelector"] == {
        "matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a", "team-b"]}
        ]
    }


def test_an_existing_certificate_secret_replaces_the_generated_one() -> None:
    manifests = render(
        set_values=[
            *WEBHOOK_ON,
            "webhook.existingSecret=kubetune-webhook-tls",
            "webhook.annotations.cert-manager\\.io/inject-ca-from=kubetune-system/kubetune-webhook",
        ]
    )
    assert not find(manifests, "Secret")
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    assert [v["secret"]["secretName"] for v in pod["volumes"] if v.get("secret")] == ["kubetune-webhook-tls"]
    configuration = one(manifests, "ValidatingWebhookConfiguration")
    assert configuration["metadata"]["annotations"] == {
        "cert-manager.io/inject-ca-from": "kubetune-system/kubetune-webhook"
    }
    assert "caBundle" not in configuration["webhooks"][0]["clientConfig"]


@pytest.mark.parametrize(
    ("assignment", "complaint"),
    [("webhook.failurePolicy=Sometimes", "failurePolicy"), ("webhook.timeoutSeconds=60", "timeoutSeconds")],
)
def test_webhook_values_the_api_server_would_refuse_are_refused_by_the_chart(
    assignment: str, complaint: str
) -> None:
    result = helm("template", "kubetune", str(CHART), *kube_version_args(), "--set", assignment, check=False)
    assert result.returncode != 0 and complaint in result.stderr, result.stderr
