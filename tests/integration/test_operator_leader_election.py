"""Two operator replicas on the real control plane: one leads through a coordination.k8s.io Lease, the
other waits; when the leader dies the standby takes over, and a leader that stops hands the Lease back.

Each replica is a `kubetune operator` process with leader election on, as the chart runs them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import Cluster, wait_for
from test_operator_lifecycle import (
    Operator,
    a_manifest,
    create,
    free_port,
    pytorchjobs,
    wait_for_phase,
)

pytestmark = pytest.mark.cluster

LEASE = "kubetune-operator"
LEASE_SECONDS = 6


def holder(cluster: Cluster, namespace: str) -> str | None:
    from kubernetes import client

    try:
        lease = client.CoordinationV1Api(cluster.api_client).read_namespaced_lease(LEASE, namespace)
    except client.exceptions.ApiException:
        return None
    return lease.spec.holder_identity if lease.spec else None


def logs_say(replica: Operator, text: str) -> bool:
    return text in replica.log.read_text(errors="replace")


@pytest.fixture
def replicas(
    cluster: Cluster, namespace: str, kubetune_crd: None, tmp_path: Path
) -> Iterator[list[Operator]]:
    if not cluster.has_crd("pytorchjobs.kubeflow.org"):
        pytest.skip("this cluster has no Kubeflow training operator")
    env = {
        "KUBETUNE_LEADER_ELECTION": "true",
        "KUBETUNE_LEADER_ELECTION_NAMESPACE": namespace,
        "KUBETUNE_LEADER_ELECTION_LEASE_SECONDS": str(LEASE_SECONDS),
    }
    started = [
        Operator(cluster, namespace, tmp_path / f"replica-{i}.log", free_port(), free_port(), extra_env=env)
        for i in range(2)
    ]
    started[0].start()
    wait_for(lambda: logs_say(started[0], "leads: reconciling"), timeout=30, description="a leader")
    started[1].start()  # answers /healthz as a standby
    try:
        yield started
    finally:
        for replica in started:
            replica.stop()


def test_only_the_lease_holder_reconciles_and_a_standby_takes_over_when_it_dies(
    cluster: Cluster, replicas: list[Operator]
) -> None:
    leader, standby = replicas
    namespace = leader.namespace
    assert holder(cluster, namespace) is not None
    assert not logs_say(standby, "leads: reconciling"), "both replicas lead"

    create(cluster, a_manifest("first", namespace, suspend=True))
    wait_for_phase(cluster, namespace, "first", "Suspended")
    assert logs_say(leader, "first"), "the leader did not reconcile the job"
    assert not logs_say(standby, "first"), "the standby reconciled a job"

    leader.kill()  # no hand-back: the standby waits for the Lease to expire
    killed_at = time.monotonic()
    wait_for(
        lambda: logs_say(standby, "leads: reconciling"),
        timeout=LEASE_SECONDS * 3 + 10,
        description="the standby to take the Lease",
    )
    takeover = time.monotonic() - killed_at
    assert takeover >= LEASE_SECONDS - 1, f"the standby took a live Lease after {takeover:.1f}s"

    create(cluster, a_manifest("second", namespace, suspend=True))
    wait_for_phase(cluster, namespace, "second", "Suspended")
    assert sorted(job["metadata"]["name"] for job in pytorchjobs(cluster, namespace)) == ["first", "second"]


def test_a_leader_that_stops_hands_the_lease_back_at_once(cluster: Cluster, replicas: list[Operator]) -> None:
    leader, standby = replicas
    first = holder(cluster, leader.namespace)
    leader.stop()  # SIGTERM, as on a rollout
    stopped_at = time.monotonic()
    wait_for(
        lambda: logs_say(standby, "leads: reconciling"),
        timeout=LEASE_SECONDS * 3,
        description="the standby to take the Lease",
    )
    assert time.monotonic() - stopped_at < LEASE_SECONDS, "the standby waited for the Lease to expire"
    assert holder(cluster, leader.namespace) not in (None, first)
