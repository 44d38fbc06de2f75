"""The operator's configuration, from the environment (the Helm chart sets it)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from kubetune.controller.startup import StartLimits
from kubetune.render import RenderConfig


class OperatorConfig(BaseSettings):
    """Every setting is an environment variable with the KUBETUNE_ prefix."""

    model_config = SettingsConfigDict(env_prefix="KUBETUNE_", frozen=True)

    namespaces: Annotated[tuple[str, ...], NoDecode] = ()
    """KUBETUNE_NAMESPACES: comma-separated namespaces to watch; empty watches all of them."""
    trainer_image: str = RenderConfig.trainer_image
    """KUBETUNE_TRAINER_IMAGE: the trainer image of jobs that do not name one."""
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 8080
    """KUBETUNE_METRICS_PORT: port of the operator's own /metrics; 0 turns it off."""
    health_port: Annotated[int, Field(ge=0, le=65535)] = 8081
    """KUBETUNE_HEALTH_PORT: port of the liveness endpoint /healthz; 0 turns it off."""
    progress_interval_seconds: Annotated[float, Field(gt=0, le=3600)] = 30.0
    """KUBETUNE_PROGRESS_INTERVAL_SECONDS: how often a running job's progress is read from its trainer."""
    progress_timeout_seconds: Annotated[float, Field(gt=0, le=60)] = 5.0
    """KUBETUNE_PROGRESS_TIMEOUT_SECONDS: how long one read of a trainer's /metrics may take."""
    workers: Annotated[int, Field(ge=1, le=64)] = 32
    """KUBETUNE_WORKERS: how many jobs are reconciled at once. Each waits on the API server most of the time;
    past 32, the writes in flight slow the API server more than they add (docs/architecture.md)."""
    progress_host: str | None = None
    """KUBETUNE_PROGRESS_HOST: read progress from this host instead of the master pod's IP.

    For a cluster whose pod network the operator cannot reach (a port-forward, the test control plane).
    """

    image_pull_grace_seconds: Annotated[float, Field(ge=0, le=86400)] = StartLimits.image_pull_grace_seconds
    """KUBETUNE_IMAGE_PULL_GRACE_SECONDS: how long a pod may fail to pull its image before the status says so."""
    unschedulable_after_seconds: Annotated[float, Field(ge=0, le=86400)] = (
        StartLimits.unschedulable_after_seconds
    )
    """KUBETUNE_UNSCHEDULABLE_AFTER_SECONDS: how long the scheduler may refuse a pod before the status says so."""

    fit_check: bool = True
    """KUBETUNE_FIT_CHECK: refuse a new job whose model cannot fit its GPUs (reason DoesNotFit) before any pod
    exists, when both the model's config.json and the GPUs' memory are known (controller/fitcheck.py)."""
    hub_endpoint: str = "https://huggingface.co"
    """KUBETUNE_HUB_ENDPOINT: where the fit check reads an hf:// model's config.json (a hub mirror)."""
    fit_check_timeout_seconds: Annotated[float, Field(gt=0, le=60)] = 3.0
    """KUBETUNE_FIT_CHECK_TIMEOUT_SECONDS: how long one read of a config.json may take; a model whose config
    cannot be read is left to the trainer's own check."""

    leader_election: bool = False
    """KUBETUNE_LEADER_ELECTION: reconcile only while holding a Lease; other replicas wait as standbys."""
    leader_election_namespace: str = ""
    """KUBETUNE_LEADER_ELECTION_NAMESPACE: namespace of the Lease (the chart sets the operator's own)."""
    leader_election_lease: str = "kubetune-operator"
    """KUBETUNE_LEADER_ELECTION_LEASE: name of the coordination.k8s.io Lease the replicas compete for."""
    leader_election_lease_seconds: Annotated[int, Field(ge=5, le=300)] = 15
    """KUBETUNE_LEADER_ELECTION_LEASE_SECONDS: how long a vanished leader blocks its standbys."""

    webhook_port: Annotated[int, Field(ge=0, le=65535)] = 0
    """KUBETUNE_WEBHOOK_PORT: port of the validating admission webhook kopf serves (HTTPS); 0 (the default)
    serves none. A ValidatingWebhookConfiguration must send the API server's requests there (the chart's
    `webhook.enabled` renders one)."""
    webhook_address: str = "0.0.0.0"
    """KUBETUNE_WEBHOOK_ADDRESS: address the webhook listens on."""
    webhook_cert_file: str | None = None
    """KUBETUNE_WEBHOOK_CERT_FILE: PEM certificate of the webhook (the chain the API server verifies with the
    configuration's caBundle); required with a port."""
    webhook_key_file: str | None = None
    """KUBETUNE_WEBHOOK_KEY_FILE: PEM private key of that certificate; required with a port."""

    @model_validator(mode="after")
    def _webhook_has_a_certificate(self) -> OperatorConfig:
        if self.webhook_port and not (self.webhook_cert_file and self.webhook_key_file):
            raise ValueError(
                "KUBETUNE_WEBHOOK_PORT is set but KUBETUNE_WEBHOOK_CERT_FILE or KUBETUNE_WEBHOOK_KEY_FILE is "
                "empty: the API server calls webhooks over HTTPS only (the chart mounts both from a Secret)"
            )
        return self

    @model_validator(mode="after")
    def _lease_has_a_namespace(self) -> OperatorConfig:
        if self.leader_election and not self.leader_election_namespace:
            raise ValueError(
                "KUBETUNE_LEADER_ELECTION is on but KUBETUNE_LEADER_ELECTION_NAMESPACE is empty: "
                "set it to the namespace the operator runs in (the chart does)"
            )
        return self

    @field_validator("namespaces", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @property
    def start_limits(self) -> StartLimits:
        return StartLimits(self.image_pull_grace_seconds, self.unschedulable_after_seconds)

    @property
    def render(self) -> RenderConfig:
        return RenderConfig(trainer_image=self.trainer_image)
