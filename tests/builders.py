"""Builders for test objects, so a test states only what matters to its story."""

from __future__ import annotations

import copy
from typing import Any

from kubetune.api.v1alpha1 import FineTuneJob, parse_job


class JobBuilder:
    """`a_job().with_method("qlora").on(nodes=2, gpus=8).build()`"""

    def __init__(self, name: str = "demo") -> None:
        self.manifest: dict[str, Any] = {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": "ml"},
            "spec": {
                "model": {"source": "hf://Qwen/Qwen2.5-0.5B"},
                "dataset": {"source": "s3://data/train.jsonl"},
                "output": {"uri": "s3://adapters/demo/"},
            },
        }

    def with_method(self, method_type: str, **block: Any) -> JobBuilder:
        self.manifest["spec"]["method"] = {"type": method_type, **block}
        return self

    def on(self, nodes: int = 1, gpus: int = 1, **resources: Any) -> JobBuilder:
        self.manifest["spec"]["resources"] = {"nodes": nodes, "gpusPerNode": gpus, **resources}
        return self

    def with_spec(self, **fields: Any) -> JobBuilder:
        self.manifest["spec"].update(copy.deepcopy(fields))
        return self

    def with_metadata(
        self, labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None
    ) -> JobBuilder:
        if labels is not None:
            self.manifest["metadata"]["labels"] = dict(labels)
        if annotations is not None:
            self.manifest["metadata"]["annotations"] = dict(annotations)
        return self

    def with_uid(self, uid: str = "3f1c2f7e-0000-4000-8000-000000000001") -> JobBuilder:
        self.manifest["metadata"]["uid"] = uid
        return self

    def as_manifest(self) -> dict[str, Any]:
        return copy.deepcopy(self.manifest)

    def build(self) -> FineTuneJob:
        return parse_job(self.as_manifest())


def a_job(name: str = "demo") -> JobBuilder:
    return JobBuilder(name)
