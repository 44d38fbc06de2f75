"""The Argo CD health check (docs/argocd/health.lua) judges recorded FineTuneJobs the way a GitOps user expects:
Succeeded is Healthy, Failed or Stalled is Degraded, everything on the way is Progressing.

It runs in Debian's Lua interpreters (`apt-get install lua5.4 lua5.1`), see tests/support/argocd.py;
tests/deploy/test_gitops_verdicts.py judges the statuses the operator computes in the same way.
"""

from __future__ import annotations

import functools

import pytest
import yaml

from kubetune.api.v1alpha1.status import FineTuneJobStatus
from tests.conftest import ROOT
from tests.support.argocd import INTERPRETERS, argocd_health

STATES = yaml.safe_load((ROOT / "tests" / "deploy" / "data" / "finetunejob-states.yaml").read_text())


@functools.cache
def judged_by(interpreter: str) -> list[tuple[str, str]]:
    """(status, message) the health check returns for each recorded state, in order."""
    return argocd_health(interpreter, [state["object"] for state in STATES])


def test_recorded_states_are_statuses_the_api_accepts() -> None:
    for state in STATES:
        status = state["object"].get("status")
        if status is not None:
            FineTuneJobStatus.model_validate(status)


def test_every_health_the_check_can_return_is_covered() -> None:
    assert {state["health"] for state in STATES} == {"Healthy", "Progressing", "Degraded", "Suspended"}


@pytest.mark.parametrize("interpreter", INTERPRETERS)
@pytest.mark.parametrize("index", range(len(STATES)), ids=[state["story"] for state in STATES])
def test_health_of_a_recorded_finetunejob(interpreter: str, index: int) -> None:
    state = STATES[index]
    status, message = judged_by(interpreter)[index]
    assert status == state["health"], f"{state['story']}: {status} ({message})"
    assert message and message != "nil"
    assert state.get("message", "") in message
