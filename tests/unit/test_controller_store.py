"""The store the reconciler reads instead of the API server: newest state wins, deleted pods wait to be
accounted for."""

from __future__ import annotations

from typing import Any

from kubetune.controller.store import Store, is_newer, owner_key, trimmed

KEY = ("team", "llama")


def obj(rv: str, uid: str = "u1", name: str = "llama", **extra: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "team",
            "uid": uid,
            "resourceVersion": rv,
            "labels": {"kubetune.io/job-name": "llama"},
            **extra,
        }
    }


def test_a_late_watch_event_does_not_undo_the_answer_to_our_own_write() -> None:
    store = Store()
    store.put_job(obj("12", status_marker=True))  # the answer to our status patch
    store.put_job(obj("11"))  # the watch event of an earlier change, arriving after it
    assert store.job(KEY)["metadata"]["resourceVersion"] == "12"


def test_a_new_job_of_the_same_name_replaces_the_old_one_whatever_its_version() -> None:
    assert is_newer(obj("5", uid="new"), obj("900", uid="old"))
    assert is_newer(obj("not-a-number"), obj("7"))


def test_managed_fields_are_not_kept() -> None:
    kept = trimmed(obj("1", managedFields=[{"manager": "kubectl"}]))
    assert "managedFields" not in kept["metadata"] and kept["metadata"]["name"] == "llama"


def test_children_are_grouped_by_their_job_label() -> None:
    pod = obj("3", uid="pod-1", name="llama-master-0")
    assert owner_key(pod) == KEY
    assert owner_key({"metadata": {"name": "x", "namespace": "team"}}) is None


def test_a_deleted_pod_waits_in_its_final_state_until_a_reconcile_accounts_for_it() -> None:
    store = Store()
    running = obj("3", uid="pod-1", name="llama-master-0")
    store.put_pod(KEY, running)
    final = obj("4", uid="pod-1", name="llama-master-0", deletionTimestamp="2026-01-01T00:00:00Z")
    store.drop_pod(KEY, final)
    children = store.children(KEY)
    assert children.pods == () and children.deleted_pods == (final,)
    store.put_pod(KEY, running)  # a late event of the deleted pod does not bring it back
    assert store.children(KEY).pods == ()
    store.accounted(KEY, children.deleted_pods)
    assert store.children(KEY).deleted_pods == ()


def test_a_pytorchjob_deleted_event_of_an_older_object_keeps_the_newer_one() -> None:
    store = Store()
    store.put_pytorchjob(KEY, obj("20", uid="ptj-new"))
    store.drop_pytorchjob(KEY, obj("10", uid="ptj-old"))
    assert store.children(KEY).pytorchjob is not None
    store.drop_pytorchjob(KEY, obj("21", uid="ptj-new"))
    assert store.children(KEY).pytorchjob is None


def test_the_echo_of_our_own_write_is_not_news() -> None:
    """A status patch's answer goes into the store; its watch event, same version, must not queue the job
    once more (a thousand jobs would mean a thousand reconciles that change nothing)."""
    store = Store()
    assert store.put_job(obj("12")) is True
    assert store.put_job(obj("12")) is False
    assert store.put_job(obj("11")) is False
    assert store.put_job(obj("13")) is True
    assert store.put_pytorchjob(KEY, obj("5", uid="ptj")) is True
    assert store.put_pytorchjob(KEY, obj("5", uid="ptj")) is False
    pod = obj("7", uid="pod-1", name="llama-master-0")
    assert store.put_pod(KEY, pod) is True and store.put_pod(KEY, pod) is False


def owned_pod(uid: str, pytorchjob_uid: str, rv: str = "3", **extra: Any) -> dict[str, Any]:
    pod = obj(rv, uid=uid, name="llama-master-0", **extra)
    pod["metadata"]["ownerReferences"] = [
        {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "uid": pytorchjob_uid, "controller": True}
    ]
    return pod


def test_a_job_created_again_under_the_same_name_does_not_see_its_predecessors_pods() -> None:
    """`kubectl delete` then `apply` of the same job: the old pods, labelled with the same job name, are
    still being removed when the new PyTorchJob exists. Their ends are not the new job's failures."""
    store = Store()
    store.put_pod(KEY, owned_pod("old-pod", "old-ptj"))
    store.drop_pod(KEY, owned_pod("old-pod", "old-ptj", rv="9", deletionTimestamp="2026-01-01T00:00:00Z"))
    store.put_pod(KEY, owned_pod("old-pod-2", "old-ptj"))
    store.put_pytorchjob(KEY, obj("20", uid="new-ptj"))
    store.put_pod(KEY, owned_pod("new-pod", "new-ptj", rv="21"))

    children = store.children(KEY)
    assert [p["metadata"]["uid"] for p in children.pods] == ["new-pod"]
    assert children.deleted_pods == ()
    store.accounted(KEY, children.deleted_pods)  # the predecessor's deleted pod is not kept for ever
    store.put_pytorchjob(KEY, obj("5", uid="old-ptj"))  # even if its PyTorchJob's late event comes back
    assert store.children(KEY).deleted_pods == ()


def test_pods_seen_before_their_pytorchjob_are_kept() -> None:
    store = Store()
    store.put_pod(KEY, owned_pod("pod-1", "ptj-1"))
    assert len(store.children(KEY).pods) == 1
