"""Pure builders: a validated FineTuneJob -> the ConfigMap and the Kubeflow PyTorchJob that run it."""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.render.labels import (
    KUEUE_QUEUE_NAME,
    child_annotations,
    child_labels,
    owner_references,
    pytorchjob_name,
    spec_configmap_name,
)
from kubetune.render.volumes import PVC_MOUNT_ROOT, PVC_ROOT_ENV, claim_mounts, claim_uses, claim_volumes

Manifest = dict[str, Any]

CONTAINER_NAME = "pytorch"
"""The training operator finds its container by this name."""
RENDEZVOUS_PORT_NAME = "pytorchjob-port"
RENDEZVOUS_PORT = 23456
SPEC_MOUNT_PATH = "/etc/kubetune"
SPEC_FILE_KEY = "spec.json"
TERMINATION_LOG = "/dev/termination-log"
SPEC_HASH_ANNOTATION = "kubetune.io/spec-hash"
SPEC_GENERATION_ANNOTATION = "kubetune.io/spec-generation"
"""The FineTuneJob's metadata.generation the PyTorchJob was rendered from: while the job is at that generation,
its spec is the one the PyTorchJob was made from, which the operator can tell without rendering the spec
document to compare hashes (15% of a restart's CPU at a thousand jobs)."""


@dataclass(frozen=True)
class RenderConfig:
    """What the operator adds to every job (from its own configuration)."""

    trainer_image: str = "ghcr.io/kubetune/kubetune-trainer:0.1.0"
    """Used when spec.trainer.image is unset."""


def _metadata(
    job: FineTuneJob, name: str, labels: dict[str, str], annotations: dict[str, str] | None = None
) -> Manifest:
    metadata: Manifest = {"name": name, "namespace": job.namespace, "labels": labels}
    if merged := {**child_annotations(job), **(annotations or {})}:
        metadata["annotations"] = merged
    if owners := owner_references(job):
        metadata["ownerReferences"] = owners
    return metadata


def spec_hash(job: FineTuneJob) -> str:
    """sha256 of the trainer's spec document: ties a PyTorchJob and a published adapter to the spec that made them."""
    return document_hash(spec_document(job))


def document_hash(document: str) -> str:
    return hashlib.sha256(document.encode()).hexdigest()


def spec_document(job: FineTuneJob) -> str:
    """The trainer's input: the validated job, defaults filled in, as stable JSON.

    runPolicy stays out: the trainer does not read it, and suspending a job must not change the
    document (nor its hash, nor the ConfigMap).
    """
    spec = job.spec.to_wire()
    spec.pop("runPolicy", None)
    document = {
        "apiVersion": job.api_version,
        "kind": job.kind,
        "metadata": {"name": job.name, "namespace": job.namespace},
        "spec": spec,
    }
    return json.dumps(document, indent=2, sort_keys=True)


def build_spec_configmap(job: FineTuneJob, document: str | None = None) -> Manifest:
    """The ConfigMap holding the spec the trainer reads. It holds no credentials: those are Secret refs.
    `document` is `spec_document(job)` when the caller has it already."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, spec_configmap_name(job), child_labels(job)),
        "data": {SPEC_FILE_KEY: document if document is not None else spec_document(job)},
    }


def trainer_command() -> list[str]:
    """torchrun, through the trainer's launcher, which takes torchrun's arguments and exits with the code of
    the root cause (torchrun itself exits 1 for any failure, which restartPolicy ExitCode treats as permanent:
    see docs/architecture.md). torchrun reads PET_NNODES, PET_NPROC_PER_NODE and PET_NODE_RANK from the
    training operator's env."""
    return [
        "python",
        "-m",
        "kubetune_trainer.launch",
        "--master_addr=$(MASTER_ADDR)",
        "--master_port=$(MASTER_PORT)",
        "-m",
        "kubetune_trainer",
    ]


def _secret_env(name: str, secret: str, key: str, optional: bool = False) -> Manifest:
    reference: Manifest = {"name": secret, "key": key}
    if optional:
        reference["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": reference}}


def trainer_env(job: FineTuneJob) -> list[Manifest]:
    """Plain settings as values, credentials only as secretKeyRef."""
    spec = job.spec
    env: list[Manifest] = [
        {"name": "KUBETUNE_SPEC", "value": f"{SPEC_MOUNT_PATH}/{SPEC_FILE_KEY}"},
        {"name": "KUBETUNE_JOB_NAME", "value": job.name},
        {"name": "KUBETUNE_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "KUBETUNE_TERMINATION_LOG", "value": TERMINATION_LOG},
        {"name": "AWS_REGION", "value": spec.storage.s3.region},
    ]
    if spec.storage.s3.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL_S3", "value": spec.storage.s3.endpoint})
    if claim_uses(job):
        env.append({"name": PVC_ROOT_ENV, "value": PVC_MOUNT_ROOT})
    if spec.storage.s3.credentials_secret:
        secret = spec.storage.s3.credentials_secret
        env.append(_secret_env("AWS_ACCESS_KEY_ID", secret, "AWS_ACCESS_KEY_ID"))
        env.append(_secret_env("AWS_SECRET_ACCESS_KEY", secret, "AWS_SECRET_ACCESS_KEY"))
        # Temporary credentials (STS) come with a session token; long-lived keys have none.
        env.append(_secret_env("AWS_SESSION_TOKEN", secret, "AWS_SESSION_TOKEN", optional=True))
    if spec.storage.hub.token_secret:
        env.append(_secret_env("HF_TOKEN", spec.storage.hub.token_secret, "HF_TOKEN"))
    env.extend({"name": var.name, "value": var.value} for var in spec.trainer.env)
    return env


def container_resources(job: FineTuneJob) -> Manifest:
    """Requests as asked; memory and GPUs also as limits (GPUs must be, memory should be)."""
    resources = job.spec.resources
    requests: dict[str, str] = {str(name): value for name, value in resources.requests.items()}
    limits: dict[str, str] = {}
    if "memory" in requests:
        limits["memory"] = requests["memory"]
    if resources.gpus_per_node > 0:
        gpus = str(resources.gpus_per_node)
        requests[resources.gpu_resource_name] = gpus
        limits[resources.gpu_resource_name] = gpus
    out: Manifest = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def build_pod_template(job: FineTuneJob, config: RenderConfig) -> Manifest:
    """The pod every replica runs: the trainer container, the spec volume, a memory-backed /dev/shm and the
    claims of pvc:// sources and outputs."""
    spec = job.spec
    claims = claim_uses(job)
    container: Manifest = {
        "name": CONTAINER_NAME,
        "image": spec.trainer.image or config.trainer_image,
        "imagePullPolicy": spec.trainer.image_pull_policy,
        "command": trainer_command(),
        "env": trainer_env(job),
        "ports": [
            {"name": RENDEZVOUS_PORT_NAME, "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": spec.metrics.port, "protocol": "TCP"},
        ],
        "resources": container_resources(job),
        "volumeMounts": [
            {"name": "spec", "mountPath": SPEC_MOUNT_PATH, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            *claim_mounts(claims),
        ],
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {"allowPrivilegeEscalation": False},
    }
    pod_spec: Manifest = {
        # The trainer reports through its metrics endpoint and the termination message;
        # it never talks to the API server, so it gets no token.
        "automountServiceAccountToken": False,
        "containers": [container],
        "volumes": [
            {"name": "spec", "configMap": {"name": spec_configmap_name(job)}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shared_memory}},
            *claim_volumes(claims),
        ],
        # Room to write a checkpoint after SIGTERM (preemption, drain) before SIGKILL.
        "terminationGracePeriodSeconds": 300,
    }
    scheduling = spec.scheduling
    if scheduling.node_selector:
        pod_spec["nodeSelector"] = dict(scheduling.node_selector)
    if scheduling.tolerations:
        pod_spec["tolerations"] = [t.to_wire() for t in scheduling.tolerations]
    if scheduling.affinity:
        pod_spec["affinity"] = scheduling.affinity
    if scheduling.priority_class_name:
        pod_spec["priorityClassName"] = scheduling.priority_class_name
    if scheduling.scheduler_name:
        pod_spec["schedulerName"] = scheduling.scheduler_name
    if spec.trainer.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in spec.trainer.image_pull_secrets]
    return {
        "metadata": {
            "labels": child_labels(job),
            "annotations": {
                **child_annotations(job),
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(spec.metrics.port),
                "prometheus.io/path": "/metrics",
            },
        },
        "spec": pod_spec,
    }


def _replica(count: int, template: Manifest) -> Manifest:
    # Each replica gets its own copy: a shared dict would alias Master and Worker in YAML and in patches.
    # ExitCode: exit codes 1-127 (bad config, a bug) fail at once; 128+ (OOM-kill, SIGTERM on
    # preemption, a lost peer node) restart the pod, which resumes from its newest checkpoint.
    return {"replicas": count, "restartPolicy": "ExitCode", "template": copy.deepcopy(template)}


def _made_from(job: FineTuneJob, digest: str | None) -> dict[str, str]:
    annotations = {SPEC_HASH_ANNOTATION: digest or spec_hash(job)}
    if job.metadata.generation is not None:
        annotations[SPEC_GENERATION_ANNOTATION] = str(job.metadata.generation)
    return annotations


def scheduling_policy(job: FineTuneJob) -> Manifest:
    """The gang: all of the job's pods start together or none does (a gang scheduler reads minAvailable),
    at the spec's PriorityClass."""
    policy: Manifest = {"minAvailable": job.spec.resources.nodes}
    if job.spec.scheduling.priority_class_name:
        policy["priorityClass"] = job.spec.scheduling.priority_class_name
    return policy


def build_pytorchjob(job: FineTuneJob, config: RenderConfig, digest: str | None = None) -> Manifest:
    """The Kubeflow PyTorchJob: one Master and nodes-1 Workers, nprocPerNode processes each. `digest` is
    `spec_hash(job)` when the caller has it already."""
    spec = job.spec
    template = build_pod_template(job, config)
    replicas: Manifest = {"Master": _replica(1, template)}
    if spec.resources.nodes > 1:
        replicas["Worker"] = _replica(spec.resources.nodes - 1, template)
    run_policy: Manifest = {
        "backoffLimit": spec.run_policy.backoff_limit,
        "cleanPodPolicy": spec.run_policy.clean_pod_policy,
        # Under a Kueue queue the job starts suspended: Kueue un-suspends it when its quota admits it.
        "suspend": spec.run_policy.suspend or bool(spec.scheduling.queue_name),
        "schedulingPolicy": scheduling_policy(job),
    }
    if spec.run_policy.active_deadline_seconds is not None:
        run_policy["activeDeadlineSeconds"] = spec.run_policy.active_deadline_seconds
    if spec.run_policy.ttl_seconds_after_finished is not None:
        run_policy["ttlSecondsAfterFinished"] = spec.run_policy.ttl_seconds_after_finished
    labels = child_labels(job)
    if spec.scheduling.queue_name and not spec.run_policy.suspend:
        # A job created suspended joins its queue when resumed (controller/queueing.py): queued now, Kueue
        # could admit it and start its pods before the operator had deactivated its Workload.
        labels[KUEUE_QUEUE_NAME] = spec.scheduling.queue_name
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": _metadata(job, pytorchjob_name(job), labels, _made_from(job, digest)),
        "spec": {
            "nprocPerNode": str(spec.resources.processes_per_node),
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": replicas,
        },
    }


def build_all(job: FineTuneJob, config: RenderConfig) -> list[Manifest]:
    """Every object a FineTuneJob needs, in creation order (the ConfigMap before the pods that mount it).

    The spec document is rendered once for both: its indented JSON goes through the json module's pure
    Python encoder, and rendering it twice per job was about a third of the CPU of the operator's own code
    (not of kopf's or the API client's) in a profile of a thousand creates.
    """
    document = spec_document(job)
    return [build_spec_configmap(job, document), build_pytorchjob(job, config, document_hash(document))]
