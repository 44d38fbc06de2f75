"""kubetune.io/v1alpha1: the FineTuneJob resource, the single source of truth of the API."""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

from pydantic import Field, StringConstraints

from kubetune.api.base import ApiModel, Rule
from kubetune.api.v1alpha1.spec import *  # noqa: F403 - the spec models are this module's API
from kubetune.api.v1alpha1.spec import FineTuneJobSpec
from kubetune.api.v1alpha1.status import *  # noqa: F403 - so are the status models
from kubetune.api.v1alpha1.status import FineTuneJobStatus

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION: Final = "kubetune.io/v1alpha1"
KIND: Final = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ("ftj",)
CATEGORIES = ("kubetune", "ml")

MAX_NAME_LENGTH = 50
"""Room for the PyTorchJob's '-worker-NNN' pod and service suffixes within a 63-character DNS label."""


class ObjectMeta(ApiModel):
    """The parts of metadata kubetune reads; everything else is kept as it is."""

    model_config = ApiModel.model_config | {"extra": "allow"}

    name: Annotated[
        str, StringConstraints(pattern=r"^[a-z]([a-z0-9\-]*[a-z0-9])?$", max_length=MAX_NAME_LENGTH)
    ]
    """Job name (a DNS label of at most 50 characters)."""
    namespace: str | None = None
    """Namespace of the job."""
    uid: str | None = None
    """Set by the API server; used for owner references."""
    generation: int | None = None
    """Set by the API server; bumped by every spec change."""
    labels: dict[str, str] = {}
    """Labels; those present when the job is first reconciled are copied to its ConfigMap, PyTorchJob and pods,
    except reserved prefixes (kubetune.render.labels.RESERVED_DOMAINS)."""
    annotations: dict[str, str] = {}
    """Annotations; copied like the labels."""


class FineTuneJob(ApiModel):
    """A fine-tuning run of a large language model on the cluster."""

    api_version: Literal["kubetune.io/v1alpha1"] = Field(default=API_VERSION, alias="apiVersion")
    """kubetune.io/v1alpha1"""
    kind: Literal["FineTuneJob"] = KIND
    """FineTuneJob"""
    metadata: ObjectMeta
    """Standard object metadata."""
    spec: FineTuneJobSpec
    """What to fine-tune, how, and on what."""
    status: FineTuneJobStatus | None = None
    """What the operator observed."""

    rules = (
        Rule(
            cel=f"self.metadata.name.size() <= {MAX_NAME_LENGTH}",
            message=f"metadata.name must be at most {MAX_NAME_LENGTH} characters so the PyTorchJob's pod and service names fit in 63",
            field="",
        ),
    )

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace or "default"


def parse_job(manifest: dict[str, Any]) -> FineTuneJob:
    """Validate a manifest dict (as read from YAML or the API server) into a FineTuneJob."""
    return FineTuneJob.model_validate(manifest)
