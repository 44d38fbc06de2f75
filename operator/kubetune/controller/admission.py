"""Optional admission: kopf serves a validating webhook that refuses, at `kubectl apply`, a FineTuneJob that
`kubetune validate` would refuse, with the same field-named messages.

The CRD's schema and CEL rules already refuse most mistakes; this adds what only the model can judge (a
learning-rate group's regular expression, for one). An UPDATE is refused only for an error the old object
did not have (the API server ratchets its own CRD validation the same way): a job created before the webhook,
or while it was down, can still be labelled, suspended, lose a finalizer and be deleted. There is no
defaulting webhook: the CRD carries the model's defaults and the API server applies them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from kubetune.api.v1alpha1 import GROUP, PLURAL, VERSION
from kubetune.api.validation import FieldError, validate_manifest
from kubetune.controller.changes import without_status
from kubetune.controller.config import OperatorConfig

HANDLER_ID = "finetunejobs"
"""kopf serves the handler at `/<id>`: the webhook configuration's path (the chart's and the tests')."""
JUDGED = ("CREATE", "UPDATE")
INVALID = 422
"""The API server's own code for a refused object (`Invalid`), as for a schema or CEL error."""


def admission_errors(
    operation: str, new: Mapping[str, Any] | None, old: Mapping[str, Any] | None
) -> list[FieldError]:
    """What `kubetune validate` would say of the object an API request writes; nothing when it is not judged
    or when an update brings no error of its own."""
    if operation not in JUDGED or new is None:
        return []
    _, errors = validate_manifest(without_status(new))
    if errors and operation == "UPDATE" and old is not None:
        _, before = validate_manifest(without_status(old))
        if set(errors) <= set(before):
            return []
    return errors


def refusal_message(errors: list[FieldError]) -> str:
    """One message holding every error, one per line, each line as `kubetune validate` prints it."""
    return "\n".join([f"{len(errors)} error(s):", *(f"    {error}" for error in errors)])


async def validate_finetunejob(
    *, operation: str | None = None, new: kopf.Body | None = None, old: kopf.Body | None = None, **_: Any
) -> None:
    errors = admission_errors(operation or "", new, old)
    if errors:
        raise kopf.AdmissionError(refusal_message(errors), code=INVALID)


def register(registry: kopf.OperatorRegistry | None = None) -> None:
    """Add the handler to kopf's registry; only with a webhook server (kopf refuses to start handlers without)."""
    kopf.on.validate(
        GROUP, VERSION, PLURAL, id=HANDLER_ID, operations=["CREATE", "UPDATE"], registry=registry
    )(validate_finetunejob)


def webhook_server(settings: OperatorConfig) -> kopf.WebhookServer:
    """kopf's HTTPS server on the configured address and port, with the certificate and key of the files given.

    The webhook configuration (the chart's, or a test's) carries the CA; kopf re-reads the files when they change,
    so a renewed Secret is served without a restart.
    """
    return kopf.WebhookServer(
        addr=settings.webhook_address,
        port=settings.webhook_port,
        certfile=settings.webhook_cert_file,
        pkeyfile=settings.webhook_key_file,
    )
