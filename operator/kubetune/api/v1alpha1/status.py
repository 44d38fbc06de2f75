"""The FineTuneJob status: what the operator observed. Condition types and reasons live beside it."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field

from kubetune.api.base import ApiModel


class Phase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


class ConditionType(StrEnum):
    """kstatus conditions (Ready, Reconciling, Stalled) plus the terminal ones users alert on."""

    READY = "Ready"
    RECONCILING = "Reconciling"
    STALLED = "Stalled"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class Reason(StrEnum):
    """Machine-readable condition reasons. Failure reasons are stable: alerts match on them."""

    CREATED = "PyTorchJobCreated"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUSPENDED = "Suspended"
    QUEUED = "Queued"
    SUCCEEDED = "Succeeded"
    INVALID_SPEC = "InvalidSpec"
    SPEC_CHANGED = "SpecChangedWhileCreated"
    OOM_KILLED = "OOMKilled"
    NCCL_TIMEOUT = "NCCLTimeout"
    SHARED_MEMORY_EXHAUSTED = "SharedMemoryExhausted"
    STORAGE_AUTH_FAILED = "StorageAuthFailed"
    INSUFFICIENT_GPU_MEMORY = "InsufficientGPUMemory"
    DOES_NOT_FIT = "DoesNotFit"
    PREEMPTED = "Preempted"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    NODE_LOST = "NodeLost"
    PEER_LOST = "PeerLost"
    OUT_OF_MEMORY = "OutOfMemory"
    SOURCE_NOT_FOUND = "SourceNotFound"
    SOURCE_UNAVAILABLE = "SourceUnavailable"
    TRAINER_ERROR = "TrainerError"
    IMAGE_PULL_FAILED = "ImagePullFailed"
    UNSCHEDULABLE = "Unschedulable"


class Condition(ApiModel):
    """A Kubernetes-style condition (metav1.Condition)."""

    type: Annotated[str, Field(max_length=316)]
    """Condition type, e.g. Ready."""
    status: Literal["True", "False", "Unknown"]
    """True, False or Unknown."""
    reason: Annotated[str, Field(max_length=1024)] = ""
    """Machine-readable CamelCase reason."""
    message: Annotated[str, Field(max_length=32768)] = ""
    """Human-readable details."""
    last_transition_time: str | None = None
    """When status last changed (RFC 3339)."""
    observed_generation: int | None = None
    """The metadata.generation this condition was computed from."""


class Progress(ApiModel):
    """Training progress as the trainer last reported it."""

    step: int | None = None
    """Optimizer steps done."""
    total_steps: int | None = None
    """Optimizer steps planned."""
    percent: int | None = None
    """step / totalSteps, in percent."""
    epoch: float | None = None
    """Fractional epoch."""
    loss: float | None = None
    """Latest training loss."""
    eval_loss: float | None = None
    """Latest evaluation loss."""
    learning_rate: float | None = None
    """Current learning rate."""
    tokens_per_second: float | None = None
    """Training throughput over the whole job."""
    eta_seconds: float | None = None
    """Estimated seconds to the end of training."""
    updated_at: str | None = None
    """When these numbers were read (RFC 3339)."""


SHA256_HEX = r"^[0-9a-f]{64}$"
MAX_ADAPTER_FILES = 10_000


class AdapterStatus(ApiModel):
    """The published result, as the trainer's rank 0 reported it in its termination message.

    The same model is the wire format of that message (compact JSON): the trainer writes it and
    the operator reads it back strictly, so the two cannot drift apart.
    """

    uri: Annotated[str, Field(max_length=2048)] | None = None
    """Folder the adapter was published to."""
    files: Annotated[list[Annotated[str, Field(max_length=1024)]], Field(max_length=MAX_ADAPTER_FILES)] = []
    """Files of the adapter, relative to uri; empty when the list did not fit in the trainer's termination message (fileCount still counts them, kubetune-manifest.json lists them all)."""
    file_count: Annotated[int, Field(ge=0)] | None = None
    """How many files the adapter has (kubetune-manifest.json not counted)."""
    size_bytes: Annotated[int, Field(ge=0)] | None = None
    """Total size of the files."""
    sha256: Annotated[str, Field(pattern=SHA256_HEX)] | None = None
    """sha256 of kubetune-manifest.json as published (`sha256sum kubetune-manifest.json`); the manifest lists every file with its size and sha256."""


class LastFailure(ApiModel):
    """One failure of a trainer pod as the operator saw it, kept after the pod is gone."""

    reason: Annotated[str, Field(max_length=1024)]
    """Why it failed: OOMKilled, NCCLTimeout, Preempted, PeerLost (another node of the job went away), TrainerError..."""
    message: Annotated[str, Field(max_length=4096)] = ""
    """The trainer's termination message (or the pod's, when it was evicted)."""
    pod: Annotated[str, Field(max_length=253)]
    """The pod that failed."""
    pod_uid: Annotated[str, Field(max_length=128)] | None = None
    """Its UID: pods replaced on a restart keep their name but not their UID."""
    exit_code: int | None = None
    """Exit code of the trainer container (137: killed, usually by the out-of-memory killer)."""
    time: str | None = None
    """When it failed (RFC 3339)."""


class FineTuneJobStatus(ApiModel):
    """What the operator observed."""

    phase: Phase | None = None
    """Pending, Running, Succeeded, Failed or Suspended."""
    observed_generation: int | None = None
    """The metadata.generation this status describes."""
    conditions: Annotated[
        list[Condition],
        Field(
            max_length=32,
            json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
        ),
    ] = []
    """Ready, Reconciling, Stalled, Succeeded, Failed."""
    pytorch_job: str | None = None
    """Name of the PyTorchJob running the training."""
    progress: Progress | None = None
    """Training progress."""
    adapter: AdapterStatus | None = None
    """The published adapter."""
    gpu_seconds: float | None = None
    """GPUs x seconds of the trainer pods so far, those replaced on restarts included: what the job cost."""
    gpu_seconds_of_deleted_pods: float | None = None
    """The part of gpuSeconds spent by pods that no longer exist (replaced after a failure, stopped by a suspend)."""
    restarts: Annotated[int, Field(ge=0)] | None = None
    """How many times the job restarted after a retryable failure; spec.runPolicy.backoffLimit caps it. One lost node is one restart: the other nodes' pods that exit PeerLost with it are not counted again."""
    last_failure: LastFailure | None = None
    """The newest failure of a trainer pod, kept after the pod is gone; a PeerLost (another node went away) does not replace the failure that caused it."""
    start_time: str | None = None
    """When the first pod started running."""
    completion_time: str | None = None
    """When the job succeeded or failed."""
    message: Annotated[str, Field(max_length=32768)] | None = None
    """A human summary of the current state."""
