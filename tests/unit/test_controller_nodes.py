"""Whether a node is Ready is read once per node and cache interval, however many workers ask at once.

The API read is replaced by a slow counting function: what is under test is how the operator's threads share
one read, which a real API server would only make slower to observe.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from kubernetes import client

from kubetune.controller import kube as kube_module
from kubetune.controller.config import OperatorConfig
from kubetune.controller.kube import Kube


class CountingNodes:
    """Answers GET /nodes/{name} after a pause, counting the reads per node."""

    def __init__(self, ready: bool = True, pause: float = 0.2) -> None:
        self.reads: dict[str, int] = {}
        self.ready, self.pause = ready, pause
        self._lock = threading.Lock()

    def __call__(self, method: str, path: str, body: Any = None, **names: str) -> dict[str, Any]:
        assert (method, path) == ("GET", "/nodes/{name}")
        with self._lock:
            self.reads[names["name"]] = self.reads.get(names["name"], 0) + 1
        time.sleep(self.pause)
        status = "True" if self.ready else "False"
        return {"status": {"conditions": [{"type": "Ready", "status": status}]}}


@pytest.fixture
def nodes(monkeypatch: pytest.MonkeyPatch) -> tuple[Kube, CountingNodes]:
    kube = Kube(client.ApiClient(client.Configuration()), OperatorConfig())
    counting = CountingNodes()
    monkeypatch.setattr(kube, "core_request", counting)
    return kube, counting


def test_many_workers_asking_for_one_node_make_one_read(nodes: tuple[Kube, CountingNodes]) -> None:
    kube, counting = nodes
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: kube._node_ready("gpu-1"), range(16)))
    assert answers == [True] * 16
    assert counting.reads == {"gpu-1": 1}


def test_different_nodes_are_read_side_by_side(nodes: tuple[Kube, CountingNodes]) -> None:
    kube, counting = nodes
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(kube._node_ready, ["gpu-1", "gpu-2", "gpu-3", "gpu-4"]))
    assert counting.reads == {"gpu-1": 1, "gpu-2": 1, "gpu-3": 1, "gpu-4": 1}
    assert time.monotonic() - started < 4 * counting.pause, "one node's read does not wait for another's"


def test_an_expired_entry_is_read_again(
    nodes: tuple[Kube, CountingNodes], monkeypatch: pytest.MonkeyPatch
) -> None:
    kube, counting = nodes
    assert kube._node_ready("gpu-1") is True
    monkeypatch.setattr(kube_module, "NODE_READY_TTL_SECONDS", 0.0)
    counting.ready = False
    assert kube._node_ready("gpu-1") is False
    assert counting.reads == {"gpu-1": 2}
