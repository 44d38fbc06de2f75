"""The pieces of the end-to-end story: what the platform provides, and a narrator that prints each hop."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubernetes import watch

from tests.support.kubelet import StandInNodes
from tests.support.operator_chart import InstalledOperator, say
from tests.support.seaweedfs import SeaweedFS

if TYPE_CHECKING:
    from tests.integration.cluster import Cluster

CREDENTIALS_SECRET = "s3-credentials"


@dataclass
class Platform:
    """What a platform team set up once: the operator (helm) on two nodes, S3 with a model and data in it."""

    cluster: Cluster
    nodes: StandInNodes
    operator: InstalledOperator
    namespace: str
    """Where the ML engineers' FineTuneJobs go (the operator watches it)."""
    s3: SeaweedFS
    bucket: str


class Story:
    """Prints each hop of a job as it happens: its PyTorchJob's conditions, its pods (phase, node, exit) and
    the trainer's log lines that matter (steps, checkpoints, resume, upload)."""

    LOG_MARKS = (
        "resuming from",
        "checkpoint ",
        "published",
        "'loss'",
        "PeerLost",
        "failed first",
        "exiting",
        "successor",
    )

    def __init__(self, platform: Platform, job: str) -> None:
        self.platform, self.job = platform, job
        self._stop = threading.Event()
        self._watches: list[watch.Watch] = []
        for target in (self._pods, self._pytorchjob, self._logs):
            threading.Thread(target=target, daemon=True).start()

    def _stream(self, call: Any, *args: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
        stream = watch.Watch()  # type: ignore[no-untyped-call]
        self._watches.append(stream)
        with contextlib.suppress(Exception):
            for event in stream.stream(call, *args, timeout_seconds=900, **kwargs):  # type: ignore[no-untyped-call]
                yield event["raw_object"]

    def _pods(self) -> None:
        seen: dict[str, str] = {}
        core = self.platform.cluster.core
        for pod in self._stream(
            core.list_namespaced_pod,
            self.platform.namespace,
            label_selector=f"kubetune.io/job-name={self.job}",
        ):
            name, status = pod["metadata"]["name"], pod.get("status", {})
            terminated = [
                c["state"]["terminated"]
                for c in status.get("containerStatuses", [])
                if "terminated" in c["state"]
            ]
            state = f"{status.get('phase')} on {pod['spec'].get('nodeName') or '-'} ip {status.get('podIP') or '-'}"
            if terminated:
                state += f" exit {terminated[0]['exitCode']} {terminated[0]['reason']}"
            if pod["metadata"].get("deletionTimestamp"):
                state += " (deleting)"
            key = f"{name}/{pod['metadata']['uid'][:8]}"
            if seen.get(key) != state:
                seen[key] = state
                say(f"pod {key}: {state}")

    def _pytorchjob(self) -> None:
        seen: list[str] = []
        custom = self.platform.cluster.custom
        for job in self._stream(
            custom.list_namespaced_custom_object,
            "kubeflow.org",
            "v1",
            self.platform.namespace,
            "pytorchjobs",
            field_selector=f"metadata.name={self.job}",
        ):
            conditions = [
                c["type"] for c in job.get("status", {}).get("conditions", []) if c["status"] == "True"
            ]
            if conditions != seen:
                seen = conditions
                say(f"PyTorchJob {self.job}: {', '.join(conditions) or 'created'}")

    def _logs(self) -> None:
        offsets: dict[Path, int] = {}
        while not self._stop.wait(0.5):
            for pod in (f"{self.job}-master-0", f"{self.job}-worker-0"):
                for path in self.platform.nodes.log_files(self.platform.namespace, pod):
                    with path.open("rb") as handle:
                        handle.seek(offsets.get(path, 0))
                        text = handle.read()
                        offsets[path] = handle.tell()
                    for line in text.decode(errors="replace").splitlines():
                        if any(mark in line for mark in self.LOG_MARKS):
                            say(f"  {path.parent.parent.name[:-9]}: {line.strip()[:160]}")

    def stop(self) -> None:
        time.sleep(0.6)  # the last log lines
        self._stop.set()
        for stream in self._watches:
            stream.stop()  # type: ignore[no-untyped-call]


def a_finetunejob(platform: Platform, name: str, max_steps: int, metrics_port: int) -> dict[str, Any]:
    """LoRA on the quickstart's tiny Llama, 2 nodes x 1 CPU process under DeepSpeed ZeRO-3 (gloo), model and
    data read from S3, the adapter and checkpoints (every 10 steps) written back to it."""
    bucket = platform.bucket
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"source": f"s3://{bucket}/models/tiny-llama"},
            "dataset": {
                "source": f"s3://{bucket}/data/alpaca.jsonl",
                "format": "alpaca",
                "validationSplit": 0.1,
                "maxSeqLength": 96,
            },
            "method": {
                "type": "lora",
                "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["q_proj", "v_proj"]},
            },
            "training": {
                "maxSteps": max_steps,
                "learningRate": 1.0e-2,
                "batchSizePerDevice": 8,
                "precision": "fp32",
                "scheduler": "constant",
                "warmupRatio": 0.0,
                "logEverySteps": 5,
                "seed": 7,
            },
            "resources": {"nodes": 2, "gpusPerNode": 0},
            "deepspeed": {"zeroStage": 3},
            "output": {"uri": f"s3://{bucket}/adapters/{name}/"},
            "checkpoint": {"everySteps": 10, "keep": 2},
            "storage": {
                "s3": {
                    "endpoint": platform.s3.endpoint,
                    "region": "us-east-1",
                    "credentialsSecret": CREDENTIALS_SECRET,
                }
            },
            "metrics": {"port": metrics_port},
            "scheduling": {
                "nodeSelector": platform.nodes.node_selector,
                "tolerations": platform.nodes.tolerations,
                # One pod per node, as on a real cluster.
                "affinity": {
                    "podAntiAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": [
                            {
                                "labelSelector": {"matchLabels": {"kubetune.io/job-name": name}},
                                "topologyKey": "kubernetes.io/hostname",
                            }
                        ]
                    }
                },
            },
            "trainer": {
                "env": [
                    # Two trainers share this machine's two cores.
                    {"name": "OMP_NUM_THREADS", "value": "1"},
                    {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
                    # Long enough for one more scrape of the final values.
                    {"name": "KUBETUNE_METRICS_LINGER_SECONDS", "value": "3"},
                ]
            },
            "runPolicy": {"backoffLimit": 4},
        },
    }
