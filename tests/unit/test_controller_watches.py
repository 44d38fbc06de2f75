"""The pure parts of following a collection: where it is served, what a relist learns, how retries space out."""

from __future__ import annotations

from kubetune.controller.config import OperatorConfig
from kubetune.controller.main import followed
from kubetune.controller.watches import MAX_RETRY_SECONDS, Collection, retry_delay, vanished


def test_core_and_group_collections_are_served_under_their_own_prefixes() -> None:
    assert Collection("Pod", "v1", "pods", "team-a").path == "/api/v1/namespaces/team-a/pods"
    assert Collection("FineTuneJob", "kubetune.io/v1alpha1", "finetunejobs").path == (
        "/apis/kubetune.io/v1alpha1/finetunejobs"
    )


def test_the_operator_follows_three_collections_per_watched_namespace_and_only_its_own_children() -> None:
    everywhere = followed(OperatorConfig(namespaces=()))
    assert [(c.kind, c.namespace) for c in everywhere] == [
        ("FineTuneJob", None),
        ("PyTorchJob", None),
        ("Pod", None),
    ]
    assert everywhere[0].label_selector is None  # every FineTuneJob is ours
    assert {c.label_selector for c in everywhere[1:]} == {"app.kubernetes.io/managed-by=kubetune"}
    two = followed(OperatorConfig(namespaces=("team-a", "team-b")))
    assert len(two) == 6 and {c.namespace for c in two} == {"team-a", "team-b"}


def test_a_relist_reports_what_was_deleted_while_nobody_watched_by_uid() -> None:
    """A pod deleted and created again under the same name is two pods: the old one must be reported gone."""
    old_pod = {"metadata": {"name": "p", "uid": "u-old"}}
    kept = {"metadata": {"name": "q", "uid": "u-q"}}
    assert vanished({"u-old": old_pod, "u-q": kept}, ["u-q", "u-new"]) == [old_pod]
    assert vanished({}, ["u-new"]) == []


def test_retries_double_up_to_a_ceiling_with_jitter() -> None:
    delays = [retry_delay(n) for n in range(1, 12)]
    assert delays[0] <= 0.5 and delays[1] > delays[0] * 1.5
    assert all(d <= MAX_RETRY_SECONDS for d in delays) and delays[-1] >= MAX_RETRY_SECONDS * 0.8
