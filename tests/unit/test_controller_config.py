"""The operator's settings come from KUBETUNE_* variables; a half-set leader election is refused at start."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kubetune.controller.config import OperatorConfig


def test_leader_election_is_off_unless_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBETUNE_LEADER_ELECTION", raising=False)
    assert OperatorConfig().leader_election is False


def test_leader_election_needs_the_namespace_of_its_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_LEADER_ELECTION", "true")
    monkeypatch.delenv("KUBETUNE_LEADER_ELECTION_NAMESPACE", raising=False)
    with pytest.raises(ValidationError, match="KUBETUNE_LEADER_ELECTION_NAMESPACE"):
        OperatorConfig()
    monkeypatch.setenv("KUBETUNE_LEADER_ELECTION_NAMESPACE", "kubetune-system")
    settings = OperatorConfig()
    assert (settings.leader_election_namespace, settings.leader_election_lease) == (
        "kubetune-system",
        "kubetune-operator",
    )


def test_a_lease_too_short_to_renew_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_LEADER_ELECTION_LEASE_SECONDS", "2")
    with pytest.raises(ValidationError, match="leader_election_lease_seconds"):
        OperatorConfig()
