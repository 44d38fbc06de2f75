"""Fixtures of the end-to-end tier: the test control plane with two stand-in nodes, the chart's operator on them,
SeaweedFS with the quickstart's tiny model and data, and a Prometheus per test (see docs/testing.md)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

import pytest
from kubernetes import client

from tests.conftest import ROOT
from tests.e2e.chain import CREDENTIALS_SECRET, Platform
from tests.support.kubelet import stand_in_nodes
from tests.support.operator_chart import IMAGES, installed_operator, say
from tests.support.prometheus import prometheus_factory  # noqa: F401  (fixture)
from tests.support.seaweedfs import ACCESS_KEY, SECRET_KEY, SeaweedFS, seaweedfs  # noqa: F401  (fixture)

if TYPE_CHECKING:
    from tests.integration.cluster import Cluster

QUICKSTART = ROOT / "examples" / "quickstart"


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The session's cluster: started once by hack/cluster and shared with the other tiers."""
    support = pytest.importorskip(
        "tests.integration.cluster", reason="needs the control plane of tests/integration"
    )
    with support.session_cluster() as started:
        if started.external:
            pytest.skip("the stand-in kubelet registers nodes in the project's own test control plane only")
        yield started


@pytest.fixture(scope="module")
def platform(
    cluster: Cluster,
    seaweedfs: SeaweedFS,  # noqa: F811  (the fixture imported above)
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Platform]:
    from tests.integration.cluster import namespace_name

    work = tmp_path_factory.mktemp("e2e")
    lock = machine_lock()
    system = cluster.create_namespace(namespace_name("kubetune-system"))
    team = cluster.create_namespace(namespace_name("ml-team"))
    try:
        with (
            stand_in_nodes(cluster.api_client, work / "nodes", IMAGES, count=2) as nodes,
            installed_operator(cluster, nodes, system, [team], work, progress_interval=2) as operator,
        ):
            bucket = seaweedfs.new_bucket("e2e")
            s3 = seaweedfs.client()
            for path in sorted((QUICKSTART / "model").iterdir()):
                s3.upload_file(str(path), bucket, f"models/tiny-llama/{path.name}")
            s3.upload_file(str(QUICKSTART / "alpaca.jsonl"), bucket, "data/alpaca.jsonl")
            say(f"uploaded the quickstart model and data to s3://{bucket}/ ({seaweedfs.endpoint})")
            cluster.core.create_namespaced_secret(
                team,
                client.V1Secret(
                    metadata=client.V1ObjectMeta(name=CREDENTIALS_SECRET),
                    string_data={"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY},
                ),
            )
            yield Platform(cluster, nodes, operator, team, seaweedfs, bucket)
            # Jobs go before the operator does: its finalizer is on them.
            cluster.kubectl("delete", "finetunejobs", "--all", "-n", team, "--wait=true", "--timeout=120s")
    finally:
        cluster.delete_namespace(team)
        cluster.delete_namespace(system)
        lock.close()


def machine_lock() -> IO[str]:
    """One end-to-end run per machine at a time: stand-in pods share its network, and every PyTorchJob's
    master listens on the same rendezvous port (23456), so two runs' jobs would meet each other's nodes."""
    path = Path(os.environ.get("KUBETUNE_CACHE_DIR", Path.home() / ".cache" / "kubetune")) / "e2e.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        say(f"another end-to-end run holds {path}; waiting for it")
        fcntl.flock(handle, fcntl.LOCK_EX)
    return handle
