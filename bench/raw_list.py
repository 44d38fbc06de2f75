"""The raw list a restarted operator starts from: FineTuneJobs, our PyTorchJobs and pods, decoded.

`bench.operator_scale` times it in its own running process and, as `python -m bench.raw_list KUBECONFIG`, in a
new one from its start; so this module imports the kubernetes client and nothing heavier.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from kubernetes import client, config

GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
PTJ_GROUP, PTJ_VERSION, PTJ_PLURAL = "kubeflow.org", "v1", "pytorchjobs"
OURS = "app.kubernetes.io/managed-by=kubetune"


def list_what_the_operator_lists(api: client.ApiClient) -> None:
    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    responses: tuple[Any, ...] = (
        custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, _preload_content=False),
        custom.list_cluster_custom_object(
            PTJ_GROUP, PTJ_VERSION, PTJ_PLURAL, label_selector=OURS, _preload_content=False
        ),
        core.list_pod_for_all_namespaces(label_selector=OURS, _preload_content=False),
    )
    for response in responses:
        json.loads(response.data)


if __name__ == "__main__":
    list_what_the_operator_lists(config.new_client_from_config(sys.argv[1]))  # type: ignore[no-untyped-call]
