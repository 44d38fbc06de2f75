"""Whether a new job's model can fit its GPUs, judged before anything is created or downloaded.

The estimate is kubetune.fit's (pure); this module fetches the two facts it needs:

- the model's config.json, for `hf://` sources, from the hub (or the mirror KUBETUNE_HUB_ENDPOINT names).
  Other sources would need the job's own credentials, which the operator never holds: they are left to the
  trainer's in-pod check, as is a model whose config cannot be read (gated, air-gapped, an unknown family);
- the GPU memory of the nodes the job may run on: the `nvidia.com/gpu.memory` label (MiB) that NVIDIA's GPU
  feature discovery puts on GPU nodes, on the nodes that match the job's nodeSelector and have its GPUs.

A job is refused only when both are known and it does not fit even the largest of those nodes; a node
without the label might be larger, so one among them leaves the judgement to the in-pod check.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.controller.config import OperatorConfig
from kubetune.controller.kube import Kube
from kubetune.fit import does_not_fit, estimate

GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"
MIB = 1024**2
NODES_TTL_SECONDS = 30.0
"""Nodes change far less often than jobs arrive: one list serves a burst of submissions."""
FAILED_READ_TTL_SECONDS = 300.0
"""A config.json that could not be read is not asked for again for this long (an air-gapped cluster pays
one timeout per model every few minutes, not one per job)."""
MAX_CONFIG_BYTES = 1024**2

log = logging.getLogger("kubetune.operator")


def hub_repo(source: str) -> str | None:
    """`org/name` of an `hf://org/name` source, else None."""
    return source.removeprefix("hf://").strip("/") if source.startswith("hf://") else None


def candidate_gpu_memory(job: FineTuneJob, nodes: list[Mapping[str, Any]]) -> int | None:
    """Bytes of memory per GPU of the largest node the job may land on, or None when unknown: no such node,
    or one of them does not say."""
    resources, selector = job.spec.resources, job.spec.scheduling.node_selector
    sizes: list[int] = []
    for node in nodes:
        labels = (node.get("metadata") or {}).get("labels") or {}
        allocatable = (node.get("status") or {}).get("allocatable") or {}
        if any(labels.get(key) != value for key, value in selector.items()):
            continue
        if int(allocatable.get(resources.gpu_resource_name, 0) or 0) < resources.gpus_per_node:
            continue
        size = labels.get(GPU_MEMORY_LABEL, "")
        if not size.isdigit():
            return None
        sizes.append(int(size) * MIB)
    return max(sizes) if sizes else None


@dataclass
class FitCheck:
    """The operator's fit check; thread-safe, its reads cached (see the module)."""

    kube: Kube
    settings: OperatorConfig
    _configs: dict[tuple[str, str], tuple[float, Mapping[str, Any] | None]] = field(default_factory=dict)
    _nodes: tuple[float, list[Mapping[str, Any]]] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _config_reads: dict[tuple[str, str], threading.Lock] = field(default_factory=dict)
    _node_read: threading.Lock = field(default_factory=threading.Lock)

    def refusal(self, job: FineTuneJob) -> str | None:
        """The DoesNotFit message for a job that cannot fit, else None (it fits, or no one can tell yet)."""
        if not self.settings.fit_check or job.spec.resources.gpus_per_node == 0:
            return None
        memory = candidate_gpu_memory(job, self._list_nodes())
        if memory is None:
            return None
        config = self._model_config(job)
        if config is None:
            return None
        found = estimate(job.spec, config)
        return does_not_fit(found, memory) if found is not None else None

    def _list_nodes(self) -> list[Mapping[str, Any]]:
        with self._node_read:
            if self._nodes is not None and time.monotonic() - self._nodes[0] < NODES_TTL_SECONDS:
                return self._nodes[1]
            listed = self.kube.core_request("GET", "/nodes")
            nodes = list(listed.get("items") or [])
            self._nodes = (time.monotonic(), nodes)
            return nodes

    def _model_config(self, job: FineTuneJob) -> Mapping[str, Any] | None:
        repo = hub_repo(job.spec.model.source)
        if repo is None:
            return None
        key = (repo, job.spec.model.revision)
        with self._lock:
            reading = self._config_reads.setdefault(key, threading.Lock())
        with reading:  # one read per model, however many of its jobs arrive at once
            with self._lock:
                cached = self._configs.get(key)
            fresh = cached is not None and time.monotonic() - cached[0] < FAILED_READ_TTL_SECONDS
            if cached is not None and (cached[1] is not None or fresh):
                return cached[1]
            config = self._read_config(*key)
            with self._lock:
                self._configs[key] = (time.monotonic(), config)
            return config

    def _read_config(self, repo: str, revision: str) -> Mapping[str, Any] | None:
        endpoint = self.settings.hub_endpoint.rstrip("/")
        url = f"{endpoint}/{repo}/resolve/{urllib.parse.quote(revision, safe='')}/config.json"
        try:
            with urllib.request.urlopen(url, timeout=self.settings.fit_check_timeout_seconds) as response:
                config = json.loads(response.read(MAX_CONFIG_BYTES))
        except (OSError, ValueError) as error:  # unreachable, gated (401), missing (404), not JSON
            log.info(f"fit check: no config.json for hf://{repo}@{revision} ({error}); left to the trainer")
            return None
        return config if isinstance(config, dict) else None
