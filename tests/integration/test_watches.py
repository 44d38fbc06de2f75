"""Following a collection against the real API server: the list, the watch after it, a watch that ends and
resumes without replaying anything, a relist after a gap, and a collection whose CRD is not installed."""

from __future__ import annotations

import queue
import time
from typing import Any

import pytest
from cluster import Cluster

from kubetune.controller.watches import Collection, Reflector

pytestmark = pytest.mark.cluster

LABEL = "kubetune-test/watched"


class Events:
    """What a reflector delivered, as (type, name)."""

    def __init__(self) -> None:
        self.received: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()

    def __call__(self, event_type: str, obj: dict[str, Any]) -> None:
        self.received.put((event_type, obj))

    def next(self, timeout: float = 10.0) -> tuple[str, str]:
        event_type, obj = self.received.get(timeout=timeout)
        return event_type, obj["metadata"]["name"]

    def drain(self, quiet: float = 0.5) -> list[tuple[str, str]]:
        got = []
        while True:
            try:
                got.append(self.next(timeout=quiet))
            except queue.Empty:
                return got


def configmap(cluster: Cluster, namespace: str, name: str, watched: bool = True) -> None:
    labels = {LABEL: "yes"} if watched else {}
    cluster.core.create_namespaced_config_map(
        namespace, {"metadata": {"name": name, "labels": labels}, "data": {"v": "1"}}
    )


def test_a_collection_is_listed_then_watched_and_a_relist_reports_what_vanished(
    cluster: Cluster, namespace: str
) -> None:
    configmap(cluster, namespace, "a")
    configmap(cluster, namespace, "b")
    configmap(cluster, namespace, "not-ours", watched=False)
    events = Events()
    # Watches of one second: each ends and resumes many times during the test.
    reflector = Reflector(
        cluster.api_client,
        Collection("ConfigMap", "v1", "configmaps", namespace, f"{LABEL}=yes"),
        events,
        watch_seconds=1,
    )
    reflector.start()
    assert reflector.synced.wait(10), "the first list was not delivered"
    listed = []
    while len(listed) < 2:
        event_type, obj = events.received.get(timeout=5)
        listed.append((event_type, obj["metadata"]["name"]))
        # Items of a list carry no apiVersion and kind in the API's answer; the reflector fills them in.
        assert (obj["apiVersion"], obj["kind"]) == ("v1", "ConfigMap")
        assert "managedFields" not in obj["metadata"]
    assert sorted(listed) == [("ADDED", "a"), ("ADDED", "b")]

    time.sleep(3)  # several watches end and resume from the last version seen: nothing is replayed
    assert events.drain() == []

    configmap(cluster, namespace, "c")
    assert events.next() == ("ADDED", "c")
    cluster.core.patch_namespaced_config_map("a", namespace, {"data": {"v": "2"}})
    assert events.next() == ("MODIFIED", "a")
    cluster.core.delete_namespaced_config_map("b", namespace)
    assert events.next() == ("DELETED", "b")

    started = time.monotonic()
    reflector.stop()
    assert not reflector.alive() and time.monotonic() - started < 5, "stop waited for the watch to end"

    # While nobody watches, c is deleted and d created; a relist reports both.
    cluster.core.delete_namespaced_config_map("c", namespace)
    configmap(cluster, namespace, "d")
    events.drain()
    reflector.list_all()
    assert sorted(events.drain()) == [("ADDED", "a"), ("ADDED", "d"), ("DELETED", "c")]


def test_a_collection_whose_crd_is_missing_counts_as_empty_and_is_looked_for_again(cluster: Cluster) -> None:
    """So that a cluster without the training operator still gets its FineTuneJobs' statuses."""
    events = Events()
    reflector = Reflector(
        cluster.api_client, Collection("Nothing", "nothing.kubetune.io/v1", "nothings"), events
    )
    reflector.start()
    try:
        assert reflector.synced.wait(10)
        assert reflector.alive() and events.drain() == []
    finally:
        reflector.stop()
