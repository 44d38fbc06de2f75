"""Fixtures of the deploy tests: the test control plane (the same one tests/integration uses, from hack/cluster)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from tests.support.prometheus import prometheus_factory  # noqa: F401  (fixture)
from tests.support.seaweedfs import seaweedfs  # noqa: F401  (fixture)

if TYPE_CHECKING:
    from tests.integration.cluster import Cluster
    from tests.support.images import BuiltImage


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The session's cluster: started once by hack/cluster (or $KUBETUNE_TEST_KUBECONFIG's) and reused."""
    support = pytest.importorskip(
        "tests.integration.cluster", reason="needs the control plane of tests/integration"
    )
    with support.session_cluster() as started:
        yield started


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test, deleted (with everything in it) afterwards."""
    from tests.integration.cluster import namespace_name

    name = cluster.create_namespace(namespace_name(request.node.name))
    yield name
    cluster.delete_namespace(name)


@pytest.fixture(scope="session")
def operator_image() -> BuiltImage:
    """ghcr.io/kubetune/kubetune-operator:<appVersion>, built once per session by `make images`'s script."""
    from tests.support.images import build_image

    return build_image("operator")


@pytest.fixture(scope="session")
def trainer_image() -> BuiltImage:
    """ghcr.io/kubetune/kubetune-trainer:<appVersion>, built once per session by `make images`'s script."""
    from tests.support.images import build_image

    return build_image("trainer")
