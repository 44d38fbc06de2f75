"""The operator's configuration, from the environment (the Helm chart sets it)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

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
    progress_host: str | None = None
    """KUBETUNE_PROGRESS_HOST: read progress from this host instead of the master pod's IP.

    For a cluster whose pod network the operator cannot reach (a port-forward, the test control plane).
    """

    @field_validator("namespaces", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @property
    def render(self) -> RenderConfig:
        return RenderConfig(trainer_image=self.trainer_image)
