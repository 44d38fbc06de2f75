"""Fixtures for tests against a real Kubernetes control plane (see cluster.py and docs/testing.md)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from cluster import REPO_DIR, Cluster, namespace_name, session_cluster, wait_for, wait_for_condition

KUBETUNE_CRD = REPO_DIR / "crds" / "kubetune.io_finetunejobs.yaml"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cluster: needs the real test control plane (hack/cluster)")


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The session's cluster: started once by hack/cluster (or $KUBETUNE_TEST_KUBECONFIG's) and reused."""
    with session_cluster() as started:
        yield started


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test, deleted (with everything in it) afterwards."""
    name = cluster.create_namespace(namespace_name(request.node.name))
    yield name
    cluster.delete_namespace(name)


@pytest.fixture(scope="session")
def kubetune_crd(cluster: Cluster) -> dict[str, Any]:
    """crds/kubetune.io_finetunejobs.yaml applied (server-side, as a GitOps tool would) and Established."""
    if not KUBETUNE_CRD.exists():
        pytest.skip(f"{KUBETUNE_CRD.relative_to(REPO_DIR)} is not generated yet (make generate)")
    crd = yaml.safe_load(KUBETUNE_CRD.read_text())
    cluster.kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=kubetune-tests",
        "-f",
        str(KUBETUNE_CRD),
    )
    name = crd["metadata"]["name"]
    wait_for_condition(
        lambda: cluster.apiextensions.read_custom_resource_definition(name).to_dict(),
        "Established",
        timeout=30,
    )
    # The CRD is Established before discovery serves it; wait until the resource answers.
    group, version = crd["spec"]["group"], crd["spec"]["versions"][0]["name"]
    wait_for(
        lambda: (
            cluster.custom.list_cluster_custom_object(group, version, crd["spec"]["names"]["plural"])
            is not None
        ),
        timeout=30,
        description=f"{name} to be served",
    )
    return crd
