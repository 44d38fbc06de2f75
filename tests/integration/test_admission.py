"""The operator's validating webhook on the real API server: `kubectl apply` of a spec the CRD's schema and CEL
let through but `kubetune validate` refuses is refused with the very lines `kubetune validate` prints.

`kubetune operator` serves the webhook (kopf's WebhookServer) on 127.0.0.1 with a certificate the test makes;
a ValidatingWebhookConfiguration sends the API server's requests there by URL, for the test's namespace only
(the control plane is shared by concurrent tests), and is deleted at teardown.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster import REPO_DIR, Cluster, wait_for
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from test_operator_lifecycle import KUBETUNE, Operator, a_manifest, free_port, jobs_in, read

from kubetune.controller.admission import HANDLER_ID

pytestmark = pytest.mark.cluster

GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
BAD_REGEX = REPO_DIR / "tests" / "data" / "invalid" / "invalid-group-regex.yaml"
WEBHOOK = "finetunejobs.kubetune.io"


@pytest.fixture
def certificate(tmp_path: Path) -> dict[str, Path]:
    """A CA and a server certificate for IP 127.0.0.1 signed by it (P-256: quick to make on a busy machine)."""
    folder = tmp_path / "certs"
    folder.mkdir()
    ca_key, ca, key, request, cert = (
        folder / n for n in ("ca.key", "ca.crt", "tls.key", "tls.csr", "tls.crt")
    )
    san = folder / "san.cnf"
    san.write_text("subjectAltName=IP:127.0.0.1\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    signed_by_ca = ["-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-extfile", san]
    commands = [
        ["req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "1", "-subj", "/CN=kubetune-test-ca"],
        ["req", *ec, "-keyout", key, "-out", request, "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", request, *signed_by_ca, "-out", cert, "-days", "1"],
    ]
    for command in commands:
        subprocess.run(["openssl", *map(str, command)], check=True, capture_output=True, timeout=60)
    return {"ca": ca, "cert": cert, "key": key}


def serves_tls(port: int, ca: Path) -> bool:
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=1) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1"),
        ):
            return True
    except OSError:
        return False


def webhook_configuration(name: str, namespace: str, port: int, ca: Path) -> dict[str, Any]:
    """What the chart renders, but by URL (the operator runs on this machine, not behind a Service)."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [
            {
                "name": WEBHOOK,
                "clientConfig": {
                    "url": f"https://127.0.0.1:{port}/{HANDLER_ID}",
                    "caBundle": base64.b64encode(ca.read_bytes()).decode(),
                },
                "rules": [
                    {
                        "apiGroups": [GROUP],
                        "apiVersions": [VERSION],
                        "resources": [PLURAL],
                        "operations": ["CREATE", "UPDATE"],
                        "scope": "Namespaced",
                    }
                ],
                # Only this test's namespace: other tests share the control plane.
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                # Fail, unlike the chart's Ignore: here a webhook that is not called must fail the test.
                "failurePolicy": "Fail",
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "timeoutSeconds": 10,
            }
        ],
    }


@pytest.fixture
def webhook(
    cluster: Cluster, namespace: str, kubetune_crd: None, certificate: dict[str, Path], tmp_path: Path
) -> Iterator[Operator]:
    """The operator with its webhook on, and the API server calling it for `namespace`'s FineTuneJobs."""
    if not cluster.has_crd("pytorchjobs.kubeflow.org"):
        pytest.skip("this cluster has no Kubeflow training operator")
    port = free_port()
    running = Operator(
        cluster,
        namespace,
        tmp_path / "operator.log",
        free_port(),
        free_port(),
        extra_env={
            "KUBETUNE_WEBHOOK_PORT": str(port),
            "KUBETUNE_WEBHOOK_ADDRESS": "127.0.0.1",
            "KUBETUNE_WEBHOOK_CERT_FILE": str(certificate["cert"]),
            "KUBETUNE_WEBHOOK_KEY_FILE": str(certificate["key"]),
        },
    )
    admission = client.AdmissionregistrationV1Api(cluster.api_client)
    name = f"kubetune-test-{namespace}"
    running.start()
    try:
        wait_for(lambda: serves_tls(port, certificate["ca"]), timeout=30, description="the webhook's port")
        admission.create_validating_webhook_configuration(
            webhook_configuration(name, namespace, port, certificate["ca"])
        )
        # The API server picks a new configuration up from its informer: wait until it calls the webhook.
        probe = in_namespace(BAD_REGEX, namespace, tmp_path / "probe.yaml")
        wait_for(
            lambda: (
                WEBHOOK in cluster.kubectl("apply", "--dry-run=server", "-f", str(probe), check=False).stderr
            ),
            timeout=30,
            description="the API server to call the webhook",
        )
        yield running
    finally:
        # The namespace fixture deletes the jobs with the namespace: the operator puts no finalizer on them.
        with contextlib.suppress(ApiException):
            admission.delete_validating_webhook_configuration(name)
        running.stop()


def in_namespace(source: Path, namespace: str, target: Path, **spec: Any) -> Path:
    """A copy of a manifest file in `namespace` (kubectl refuses a file naming another), with `spec` merged."""
    manifest = yaml.safe_load(source.read_text())
    manifest["metadata"]["namespace"] = namespace
    manifest["spec"].update(spec)
    target.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return target


def validate_says(path: Path) -> list[str]:
    """The error lines `kubetune validate` prints for a file (the CLI as a user runs it)."""
    result = subprocess.run(
        [str(KUBETUNE), "validate", "-f", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1, result.stdout + result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("    ")]


def test_kubectl_apply_refuses_what_only_the_operator_judges_with_kubetune_validates_words(
    cluster: Cluster, namespace: str, webhook: Operator, tmp_path: Path
) -> None:
    path = in_namespace(BAD_REGEX, namespace, tmp_path / "bad-regex.yaml")
    # The CRD's schema and CEL let it through: without the webhook only the operator would refuse it.
    expected = validate_says(path)
    assert expected == [
        "    spec.training.learningRateGroups[0].match: not a valid regular expression: "
        "unterminated character set at position 1 (got '([')"
    ]

    applied = cluster.kubectl("apply", "-f", str(path), check=False)
    assert applied.returncode != 0
    assert f'admission webhook "{WEBHOOK}" denied the request: 1 error(s):\n' in applied.stderr
    assert "\n".join(expected) in applied.stderr, applied.stderr
    assert not jobs_in(cluster, namespace), "a refused job was created all the same"


def test_every_error_comes_back_in_one_refusal(
    cluster: Cluster, namespace: str, webhook: Operator, tmp_path: Path
) -> None:
    groups = [
        {"name": "base", "match": "([", "learningRate": 1e-5},
        {"name": "head", "match": "lm_head)", "learningRate": 1e-4},
    ]
    path = in_namespace(BAD_REGEX, namespace, tmp_path / "two.yaml", training={"learningRateGroups": groups})
    expected = validate_says(path)
    assert len(expected) == 2

    applied = cluster.kubectl("apply", "-f", str(path), check=False)
    assert "denied the request: 2 error(s):\n" + "\n".join(expected) in applied.stderr, applied.stderr


@pytest.fixture
def job_from_before_the_webhook(cluster: Cluster, namespace: str, kubetune_crd: None) -> str:
    """An invalid job the API server took before the webhook was there (as after turning it on)."""
    manifest = yaml.safe_load(BAD_REGEX.read_text())
    manifest["metadata"] = {"name": "from-before", "namespace": namespace}
    cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
    return "from-before"


def test_updates_pass_the_webhook_unless_they_bring_an_error_of_their_own(
    cluster: Cluster, namespace: str, job_from_before_the_webhook: str, webhook: Operator, tmp_path: Path
) -> None:
    path = tmp_path / "valid.yaml"
    path.write_text(yaml.safe_dump(a_manifest("admitted", namespace, suspend=True)))
    cluster.kubectl("apply", "-f", str(path))
    resume = '{"spec": {"runPolicy": {"suspend": false}}}'
    cluster.kubectl("patch", "-n", namespace, "finetunejob/admitted", "--type=merge", "-p", resume)
    assert read(cluster, namespace, "admitted")["spec"]["runPolicy"]["suspend"] is False

    # The invalid job from before still takes a label and a suspend: the webhook ratchets like the API server.
    old = f"finetunejob/{job_from_before_the_webhook}"
    cluster.kubectl("label", "-n", namespace, old, "team=nlp")
    suspend = '{"spec": {"runPolicy": {"suspend": true}}}'
    cluster.kubectl("patch", "-n", namespace, old, "--type=merge", "-p", suspend)
    job = read(cluster, namespace, job_from_before_the_webhook)
    assert (job["metadata"]["labels"]["team"], job["spec"]["runPolicy"]["suspend"]) == ("nlp", True)
