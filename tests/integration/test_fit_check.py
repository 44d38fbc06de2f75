"""Fit before download: on the real control plane the operator refuses a job whose model cannot fit its
GPUs with reason DoesNotFit, before any ConfigMap, PyTorchJob or pod exists, and creates one that fits.

The GPU memory comes from a node's `nvidia.com/gpu.memory` label, as NVIDIA's GPU feature discovery sets it:
the test adds one kwok node of its own with 8 GPUs of 16 GiB (tainted, so no other test's pods land there)
and points its jobs at it. The model's config.json comes from the hub's resolve URL; the hub cannot be
reached from here, so a local HTTP server stands in for it, serving the configs of Llama 3.1 8B and
SmolLM2-135M-Instruct at the paths the hub uses (`/<org>/<name>/resolve/<revision>/config.json`).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from cluster import Cluster, condition, exists, wait_for
from kubernetes.client.exceptions import ApiException
from test_operator_lifecycle import (
    PTJ,
    Operator,
    create,
    events_of,
    operator,
    read_pytorchjob,
    wait_for_phase,
)
from tests.builders import a_job
from tests.model_configs import LLAMA_3_1_8B, SMOLLM2_135M_INSTRUCT

pytestmark = pytest.mark.cluster

__all__ = ["operator"]  # the fixture, shared with the lifecycle tests

CONFIGS = {
    "meta-llama/Llama-3.1-8B": LLAMA_3_1_8B,
    "HuggingFaceTB/SmolLM2-135M-Instruct": SMOLLM2_135M_INSTRUCT,
}
GPU_MEMORY_MIB = 16384
NODE_LABEL = "kubetune.io/test-node"


@pytest.fixture
def hub() -> Iterator[str]:
    """The stand-in hub's endpoint."""

    class Resolve(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            repo, _, rest = self.path.lstrip("/").partition("/resolve/")
            if repo in CONFIGS and rest.endswith("/config.json"):
                body = json.dumps(CONFIGS[repo]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_error(404)

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Resolve)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@pytest.fixture
def gpu_node(cluster: Cluster, namespace: str) -> Iterator[str]:
    """A kwok node with 8 GPUs of 16 GiB, labelled and tainted for this test only; yields its label value."""
    name = f"fit-{namespace}"[:63]
    resources = {"cpu": "96", "memory": "1000Gi", "pods": "110", "nvidia.com/gpu": "8"}
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake"},
            "labels": {
                "type": "kwok",
                NODE_LABEL: namespace[:63],
                "nvidia.com/gpu.memory": str(GPU_MEMORY_MIB),
            },
        },
        "spec": {"taints": [{"key": NODE_LABEL, "value": namespace[:63], "effect": "NoSchedule"}]},
        "status": {"allocatable": resources, "capacity": resources},
    }
    cluster.core.create_node(node)
    try:
        yield namespace[:63]
    finally:
        with contextlib.suppress(ApiException):
            cluster.core.delete_node(name)


def on_the_test_node(name: str, namespace: str, label: str, model: str, method: str) -> dict[str, Any]:
    manifest = (
        a_job(name)
        .with_method(method)
        .on(nodes=1, gpus=8)
        .with_spec(
            model={"source": f"hf://{model}"},
            training={"precision": "bf16", "batchSizePerDevice": 4},
            scheduling={
                "nodeSelector": {NODE_LABEL: label},
                "tolerations": [{"key": NODE_LABEL, "operator": "Exists", "effect": "NoSchedule"}],
            },
        )
        .as_manifest()
    )
    manifest["metadata"]["namespace"] = namespace
    return manifest


def test_a_model_that_cannot_fit_its_gpus_is_refused_before_anything_exists_and_one_that_fits_is_created(
    cluster: Cluster, operator: Operator, hub: str, gpu_node: str
) -> None:
    operator.stop()
    operator.extra_env["KUBETUNE_HUB_ENDPOINT"] = hub
    operator.start()
    namespace = operator.namespace

    create(cluster, on_the_test_node("too-big", namespace, gpu_node, "meta-llama/Llama-3.1-8B", "full"))
    refused = wait_for_phase(cluster, namespace, "too-big", "Failed")
    ready = condition(refused, "Ready") or {}
    assert ready.get("reason") == "DoesNotFit", refused["status"]
    assert (condition(refused, "Stalled") or {}).get("status") == "True"
    message = refused["status"]["message"]
    assert "16.0 GiB" in message and "needs" in message, message
    assert "qlora" in message, "the message names what to change"
    assert not exists(lambda: read_pytorchjob(cluster, namespace, "too-big"))
    assert not exists(lambda: cluster.core.read_namespaced_config_map("too-big-spec", namespace))
    assert any(event.reason == "DoesNotFit" for event in events_of(cluster, namespace, "too-big")), [
        (event.reason, event.message) for event in events_of(cluster, namespace, "too-big")
    ]

    create(
        cluster, on_the_test_node("fits", namespace, gpu_node, "HuggingFaceTB/SmolLM2-135M-Instruct", "lora")
    )
    wait_for(lambda: read_pytorchjob(cluster, namespace, "fits"), timeout=30, description="PyTorchJob fits")
    assert (
        cluster.custom.list_namespaced_custom_object(*PTJ[:2], namespace, PTJ[2])["items"][0]["metadata"][
            "name"
        ]
        == "fits"
    ), "only the job that fits has a PyTorchJob"
