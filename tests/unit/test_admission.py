"""The validating webhook refuses what `kubetune validate` refuses, with the same lines, and nothing else:
a spec left alone on an update (a label, a finalizer lifted) is admitted even when the job is invalid."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from kubetune.cli import app
from kubetune.controller import admission
from kubetune.controller.config import OperatorConfig
from tests.builders import a_job
from tests.conftest import INVALID

BAD_REGEX = {"learningRateGroups": [{"name": "base", "match": "([", "learningRate": 1e-5}]}


def printed_errors(path: Path) -> list[str]:
    """The error lines `kubetune validate` prints for a file, as a user reads them."""
    result = CliRunner().invoke(app, ["validate", "-f", str(path)])
    assert result.exit_code == 1, result.output
    return [line for line in result.output.splitlines() if line.startswith("    ")]


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_a_refused_create_says_what_kubetune_validate_prints(path: Path) -> None:
    manifest = yaml.safe_load(path.read_text().split("\n---")[0])
    errors = admission.admission_errors("CREATE", manifest, None)
    message = admission.refusal_message(errors)
    headline, *lines = message.splitlines()
    assert headline == f"{len(errors)} error(s):"
    assert lines == printed_errors(path)


def test_a_valid_job_is_admitted_on_create() -> None:
    assert admission.admission_errors("CREATE", a_job().as_manifest(), None) == []


def test_an_update_that_brings_a_new_error_is_refused_with_every_error() -> None:
    old = a_job().with_spec(training=BAD_REGEX).as_manifest()
    new = a_job().with_spec(training=BAD_REGEX, checkpoint={"keep": 0}).as_manifest()
    errors = admission.admission_errors("UPDATE", new, old)
    assert {error.path for error in errors} == {
        "spec.training.learningRateGroups[0].match",
        "spec.checkpoint.keep",
    }
    assert admission.admission_errors("UPDATE", new, a_job().as_manifest()) == errors


def test_an_invalid_job_from_before_the_webhook_can_be_labelled_suspended_and_lose_its_finalizer() -> None:
    """The API server ratchets its own CRD validation so: an error the object already had is not news."""
    old = a_job().with_spec(training=BAD_REGEX).as_manifest()
    old["metadata"]["finalizers"] = ["kubetune.io/finalizer"]
    new = copy.deepcopy(old)
    new["metadata"]["labels"] = {"team": "nlp"}
    new["metadata"]["finalizers"] = []
    new["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    new["spec"]["runPolicy"] = {"suspend": True}
    assert admission.admission_errors("UPDATE", new, old) == []
    assert admission.admission_errors("CREATE", new, None) != []


@pytest.mark.parametrize("operation", ["DELETE", "CONNECT"])
def test_other_operations_are_not_judged(operation: str) -> None:
    invalid = a_job().with_spec(training=BAD_REGEX).as_manifest()
    assert admission.admission_errors(operation, invalid, invalid) == []


def test_the_handler_refuses_with_the_api_servers_invalid_code() -> None:
    invalid = kopf.Body(a_job().with_spec(training=BAD_REGEX).as_manifest())
    with pytest.raises(kopf.AdmissionError) as refused:
        asyncio.run(admission.validate_finetunejob(operation="CREATE", new=invalid, old=None))
    assert refused.value.code == 422
    assert "spec.training.learningRateGroups[0].match: not a valid regular expression" in str(refused.value)
    valid = kopf.Body(a_job().as_manifest())
    asyncio.run(admission.validate_finetunejob(operation="CREATE", new=valid, old=None))


def test_the_handler_is_registered_for_finetunejob_creates_and_updates_at_its_path() -> None:
    registry = kopf.OperatorRegistry()
    admission.register(registry)
    (handler,) = registry._webhooks.get_all_handlers()
    assert handler.id == admission.HANDLER_ID == "finetunejobs"
    assert set(handler.operations or ()) == {"CREATE", "UPDATE"}
    assert handler.selector is not None
    assert (handler.selector.group, handler.selector.version, handler.selector.any_name) == (
        "kubetune.io",
        "v1alpha1",
        "finetunejobs",
    )


def test_the_webhook_is_off_unless_a_port_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBETUNE_WEBHOOK_PORT", raising=False)
    assert OperatorConfig().webhook_port == 0


def test_a_webhook_port_needs_a_certificate_and_its_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_WEBHOOK_PORT", "9443")
    monkeypatch.delenv("KUBETUNE_WEBHOOK_KEY_FILE", raising=False)
    monkeypatch.setenv("KUBETUNE_WEBHOOK_CERT_FILE", "/certs/tls.crt")
    with pytest.raises(ValidationError, match="KUBETUNE_WEBHOOK_KEY_FILE"):
        OperatorConfig()
    monkeypatch.setenv("KUBETUNE_WEBHOOK_KEY_FILE", "/certs/tls.key")
    server: Any = admission.webhook_server(OperatorConfig())
    assert isinstance(server, kopf.WebhookServer)
    assert (server.addr, server.port, server.certfile, server.pkeyfile) == (
        "0.0.0.0",
        9443,
        "/certs/tls.crt",
        "/certs/tls.key",
    )
