"""The operator image `make images` builds, run as the chart runs it: the command (the image's entrypoint with
the chart's args), env, ports, probes and non-root user that `helm template` renders with image.tag = the built
tag. Run with buildah against the test control plane, it takes a FineTuneJob to a PyTorchJob.

The image is built once per session (tests/deploy/conftest.py); a build whose layers are cached takes seconds.
"""

from __future__ import annotations

import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import pytest
from kubernetes.client.exceptions import ApiException

from tests.builders import a_job
from tests.conftest import ROOT
from tests.deploy import helm
from tests.support.images import BuiltImage, working_container
from tests.support.seaweedfs import free_ports

if TYPE_CHECKING:
    from tests.integration.cluster import Cluster

pytestmark = pytest.mark.slow

GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
CRD_FILE = "kubetune.io_finetunejobs.yaml"


def chart_operator(set_values: list[str], namespace: str) -> dict[str, Any]:
    """The operator's pod spec as `helm template` renders it."""
    deployment = helm.one(helm.render(set_values=set_values, namespace=namespace), "Deployment")
    pod: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return pod


def env_of(container: dict[str, Any], namespace: str) -> dict[str, str]:
    """The container's environment as the kubelet resolves it (values and the namespace's fieldRef)."""
    env: dict[str, str] = {}
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        elif variable.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[variable["name"]] = namespace
        else:
            raise AssertionError(f"the test does not resolve {variable}")
    return env


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return int(response.status), response.read().decode()
    except OSError:
        return 0, ""


def test_the_chart_defaults_run_the_built_operator_image_on_the_ports_it_exposes(
    operator_image: BuiltImage,
) -> None:
    pod = chart_operator([], "kubetune-system")
    (container,) = pod["containers"]
    assert container["image"] == operator_image.tag
    assert {port["containerPort"] for port in container["ports"]} == operator_image.exposed_ports
    assert pod["securityContext"]["runAsNonRoot"] is True
    user = f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    assert user == operator_image.user


def test_the_operator_image_run_as_the_chart_renders_it_takes_a_finetunejob_to_a_pytorchjob(
    operator_image: BuiltImage, cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    from tests.integration.cluster import wait_for

    if not cluster.has_crd("pytorchjobs.kubeflow.org"):
        pytest.skip("this cluster has no Kubeflow training operator")
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds" / CRD_FILE))
    metrics_port, health_port = free_ports(2)
    tag = operator_image.tag.rsplit(":", 1)[1]
    pod = chart_operator(
        [
            f"image.tag={tag}",
            f"watchNamespaces={{{namespace}}}",
            f"operator.metricsPort={metrics_port}",
            f"operator.healthPort={health_port}",
        ],
        namespace,
    )
    (container,) = pod["containers"]
    assert container["image"] == operator_image.tag

    # What the kubelet would run: the image's entrypoint with the chart's command/args, the chart's env, its
    # user, its /tmp volume; the ServiceAccount's API access is played by a kubeconfig mounted in.
    argv = operator_image.argv(container.get("command"), container.get("args"))
    security = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    user = f"{security['runAsUser']}:{security['runAsGroup']}"
    # A folder, not the file, is mounted: buildah's chroot mounts do not follow /var/run -> /run.
    api_access = tmp_path / "api-access"
    api_access.mkdir(mode=0o755)
    kubeconfig = api_access / "kubeconfig"
    kubeconfig.write_text(cluster.kubectl("config", "view", "--raw", "--flatten", "--minify").stdout)
    kubeconfig.chmod(0o644)
    volumes: dict[Path, str] = {api_access: "/etc/kubetune-api"}
    for mount in container.get("volumeMounts", []):
        folder = tmp_path / "volumes" / mount["name"]
        folder.mkdir(parents=True)
        folder.chmod(0o1777)
        volumes[folder] = mount["mountPath"]
    env = {**env_of(container, namespace), "KUBECONFIG": "/etc/kubetune-api/kubeconfig"}
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"metrics": metrics_port, "healthz": health_port}

    log = tmp_path / "operator.log"
    with working_container(operator_image) as image_container:
        process = image_container.start(argv, log, env=env, volumes=volumes, user=user)
        try:
            for probe in ("readinessProbe", "livenessProbe"):
                get = container[probe]["httpGet"]

                def answers(get: dict[str, Any] = get) -> bool:
                    assert process.poll() is None, f"the operator exited:\n{log.read_text()[-3000:]}"
                    return http_get(ports[get["port"]], get["path"])[0] == 200

                wait_for(answers, timeout=90, description=f"the operator's {probe} ({log})")
            # The process answering is the image's program, run as the chart's non-root user.
            programs = [
                child
                for child in psutil.Process(process.pid).children(recursive=True)
                if child.cmdline()[-len(argv) + 1 :] == argv[1:] and child.uids().real != 0
            ]
            assert programs, [c.cmdline() for c in psutil.Process(process.pid).children(recursive=True)]
            assert {child.uids().real for child in programs} == {security["runAsUser"]}
            status, metrics = http_get(ports["metrics"], "/metrics")
            assert status == 200 and "kubetune_" in metrics

            job = a_job("from-the-image").on(nodes=2, gpus=1).as_manifest()
            job["metadata"]["namespace"] = namespace
            cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
            pytorchjob = wait_for(
                lambda: read_pytorchjob(cluster, namespace, "from-the-image"),
                timeout=60,
                description=f"the PyTorchJob of from-the-image ({log})",
            )
            labels = pytorchjob["metadata"]["labels"]
            assert labels["app.kubernetes.io/managed-by"] == "kubetune"
            assert labels["kubetune.io/job-name"] == "from-the-image"
            replicas = pytorchjob["spec"]["pytorchReplicaSpecs"]
            images = {
                c["image"] for spec in replicas.values() for c in spec["template"]["spec"]["containers"]
            }
            assert images == {env["KUBETUNE_TRAINER_IMAGE"]} == {f"ghcr.io/kubetune/kubetune-trainer:{tag}"}
            assert set(replicas) == {"Master", "Worker"}

            # Deleted while the operator runs, so it lifts its finalizer and the namespace can go.
            cluster.custom.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, "from-the-image"
            )
            wait_for(
                lambda: (
                    not cluster.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)[
                        "items"
                    ]
                ),
                timeout=60,
                description="the FineTuneJob to be deleted",
            )
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def read_pytorchjob(cluster: Cluster, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        found: dict[str, Any] = cluster.custom.get_namespaced_custom_object(
            "kubeflow.org", "v1", namespace, "pytorchjobs", name
        )
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    return found
