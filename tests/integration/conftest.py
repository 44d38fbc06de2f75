"""Fixtures for tests against a real Kubernetes control plane (see cluster.py and docs/testing.md)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from cluster import Cluster, namespace_name, session_cluster


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
