"""The side of the operator that talks to the API server: read children, create or adopt them, write status.

Every function here is idempotent: it reads what is there before it acts, so a retry or an operator restart
at any point converges on exactly one ConfigMap and one PyTorchJob per FineTuneJob.
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, cast

import kopf
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from kubetune.api.v1alpha1 import (
    GROUP,
    PLURAL,
    VERSION,
    ConditionType,
    FineTuneJob,
    FineTuneJobStatus,
    Phase,
    Progress,
)
from kubetune.api.validation import validate_manifest
from kubetune.controller.conditions import find_condition, utc_now
from kubetune.controller.config import OperatorConfig
from kubetune.controller.pods import is_master, pod_uid
from kubetune.controller.progress import parse_progress
from kubetune.controller.status import (
    TERMINAL_PHASES,
    JobState,
    Observed,
    compute_status,
    describe_failure,
    invalid_status,
    pytorchjob_state,
)
from kubetune.render import build_all
from kubetune.render.labels import JOB_NAME, MANAGED_BY

Manifest = dict[str, Any]

PYTORCHJOB_GROUP = "kubeflow.org"
PYTORCHJOB_VERSION = "v1"
PYTORCHJOB_PLURAL = "pytorchjobs"
CONFLICT = 409
NOT_FOUND = 404
STATUS_WRITE_ATTEMPTS = 5


def new_api_client() -> client.ApiClient:
    """In a pod: its ServiceAccount; elsewhere: the current kubeconfig context."""
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
        return client.ApiClient()
    except config.ConfigException:
        return cast(client.ApiClient, config.new_client_from_config())  # type: ignore[no-untyped-call]


def children_selector(job_name: str) -> str:
    return f"{MANAGED_BY}=kubetune,{JOB_NAME}={job_name}"


def without_status(body: Mapping[str, Any]) -> Manifest:
    """The parts of a FineTuneJob the spec model validates."""
    return {key: body[key] for key in ("apiVersion", "kind", "metadata", "spec") if key in body}


def stored_status(body: Mapping[str, Any]) -> FineTuneJobStatus:
    """The status as stored; a status this version cannot read starts over rather than blocking the job."""
    try:
        return FineTuneJobStatus.model_validate(body.get("status") or {})
    except ValueError:
        return FineTuneJobStatus()


def has_ended(body: Mapping[str, Any]) -> bool:
    """The job succeeded or failed: its children are left as they are (a PyTorchJob removed by its
    ttlSecondsAfterFinished is not made again, one stopped at the backoff limit is not resumed)."""
    return stored_status(body).phase in TERMINAL_PHASES


def status_patch(new: FineTuneJobStatus, current: FineTuneJobStatus) -> Manifest:
    """A merge patch that turns `current` into `new`: fields gone from `new` are set to null."""
    wire = new.to_wire()
    for key in current.to_wire():
        wire.setdefault(key, None)
    return wire


@dataclass(frozen=True)
class Transition:
    """What changed in one status write, for the events that follow it."""

    body: Manifest
    before: FineTuneJobStatus
    after: FineTuneJobStatus


def without_cost(status: FineTuneJobStatus) -> FineTuneJobStatus:
    """The status without the GPU seconds of running pods, which grow every second."""
    return status.model_copy(update={"gpu_seconds": None})


def transition_events(change: Transition) -> list[tuple[str, str, str]]:
    """(type, reason, message) of the events a status change deserves: phase changes, restarts, new stalls."""
    before, after = change.before, change.after
    events: list[tuple[str, str, str]] = []
    last = after.last_failure
    if (after.restarts or 0) > (before.restarts or 0) and last is not None:
        events.append(
            ("Warning", last.reason, f"{describe_failure(last)}; replaced (restart {after.restarts})")
        )
    stalled_before = find_condition(before.conditions, ConditionType.STALLED)
    stalled_after = find_condition(after.conditions, ConditionType.STALLED)
    if (
        stalled_after is not None
        and stalled_after.status == "True"
        and (
            stalled_before is None
            or stalled_before.status != "True"
            or stalled_before.reason != stalled_after.reason
        )
    ):
        events.append(("Warning", stalled_after.reason, stalled_after.message))
    if after.phase != before.phase and after.phase is not None:
        if after.phase is Phase.FAILED:
            failed = find_condition(after.conditions, ConditionType.FAILED)
            if not (stalled_after is not None and stalled_after.status == "True"):
                reason = failed.reason if failed else "Failed"
                events.append(("Warning", reason, after.message or ""))
        else:
            events.append(("Normal", after.phase.value, after.message or ""))
    return events


@dataclass
class Kube:
    """The API clients of one operator process."""

    api_client: client.ApiClient
    settings: OperatorConfig

    @cached_property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api_client)

    @cached_property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api_client)

    def as_dict(self, obj: Any) -> Manifest:
        return cast(Manifest, self.api_client.sanitize_for_serialization(obj))  # type: ignore[no-untyped-call]

    # ------------------------------------------------------------------------------------------- reads

    def read_job(self, namespace: str, name: str) -> Manifest | None:
        try:
            body = cast(
                Manifest, self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            )
        except ApiException as error:
            if error.status == NOT_FOUND:
                return None
            raise
        return body

    def read_pytorchjob(self, namespace: str, name: str) -> Manifest | None:
        try:
            body = cast(
                Manifest,
                self.custom.get_namespaced_custom_object(
                    PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, namespace, PYTORCHJOB_PLURAL, name
                ),
            )
        except ApiException as error:
            if error.status == NOT_FOUND:
                return None
            raise
        return body

    def observe(self, job: FineTuneJob, deleted_pod: Manifest | None = None) -> Observed:
        """The PyTorchJob, its pods and which of their nodes stopped reporting.

        `deleted_pod` is a pod a watch just reported deleted, in its final state: the list no longer has
        it, and its final state holds how long it ran and why it failed.
        """
        pytorchjob = self.read_pytorchjob(job.namespace, job.name)
        gone = pod_uid(deleted_pod) if deleted_pod is not None else None
        pods = [
            pod
            for pod in (
                self.as_dict(item)
                for item in self.core.list_namespaced_pod(
                    job.namespace, label_selector=children_selector(job.name)
                ).items
            )
            if pod_uid(pod) != gone
        ]
        nodes = {
            (pod.get("spec") or {}).get("nodeName")
            for pod in pods
            if (pod.get("status") or {}).get("phase") == "Running"
        }
        lost = frozenset(node for node in nodes if node and not self._node_ready(node))
        return Observed(
            pytorchjob=pytorchjob,
            pods=pods,
            lost_nodes=lost,
            deleted_pods=(deleted_pod,) if deleted_pod is not None else (),
        )

    def _node_ready(self, name: str) -> bool:
        try:
            node = self.as_dict(self.core.read_node(name))
        except ApiException as error:
            if error.status == NOT_FOUND:
                return False
            raise
        conditions = (node.get("status") or {}).get("conditions") or []
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)

    # ------------------------------------------------------------------------------------------ writes

    def ensure_children(self, job: FineTuneJob) -> None:
        """Create or adopt the ConfigMap, then the PyTorchJob; then make suspend match the spec."""
        configmap, pytorchjob = build_all(job, self.settings.render)
        self._create_or_adopt(
            job,
            configmap,
            create=lambda: self.core.create_namespaced_config_map(job.namespace, configmap),  # type: ignore[arg-type]
            read=lambda: self.as_dict(
                self.core.read_namespaced_config_map(configmap["metadata"]["name"], job.namespace)
            ),
            patch=lambda body: self.core.patch_namespaced_config_map(
                configmap["metadata"]["name"], job.namespace, body
            ),
        )
        existing = self._create_or_adopt(
            job,
            pytorchjob,
            create=lambda: self.custom.create_namespaced_custom_object(
                PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, job.namespace, PYTORCHJOB_PLURAL, pytorchjob
            ),
            read=lambda: self.read_pytorchjob(job.namespace, job.name) or {},
            patch=lambda body: self._patch_pytorchjob(job, body),
        )
        if existing is not None:
            suspended = bool(((existing.get("spec") or {}).get("runPolicy") or {}).get("suspend", False))
            if suspended != job.spec.run_policy.suspend:
                self._patch_pytorchjob(job, {"spec": {"runPolicy": {"suspend": job.spec.run_policy.suspend}}})

    def _patch_pytorchjob(self, job: FineTuneJob, body: Manifest) -> None:
        self.custom.patch_namespaced_custom_object(
            PYTORCHJOB_GROUP,
            PYTORCHJOB_VERSION,
            job.namespace,
            PYTORCHJOB_PLURAL,
            job.name,
            body,
            _content_type="application/merge-patch+json",
        )

    def _create_or_adopt(
        self,
        job: FineTuneJob,
        manifest: Manifest,
        create: Callable[[], object],
        read: Callable[[], Manifest],
        patch: Callable[[Manifest], object],
    ) -> Manifest | None:
        """Create the object; when it exists (a retry, a restart), adopt it if it carries our labels.

        Returns the object that already existed, or None when this call created it.
        """
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        try:
            create()
            return None
        except ApiException as error:
            if error.status != CONFLICT:
                raise
        existing = read()
        metadata = existing.get("metadata") or {}
        labels = metadata.get("labels") or {}
        if labels.get(MANAGED_BY) != "kubetune" or labels.get(JOB_NAME) != job.name:
            raise kopf.TemporaryError(
                f"{kind} {name} exists and was not made by kubetune for this job: rename or delete it",
                delay=30,
            )
        if metadata.get("deletionTimestamp"):
            raise kopf.TemporaryError(f"{kind} {name} of an earlier job is being deleted", delay=2)
        owners = metadata.get("ownerReferences") or []
        ours = manifest["metadata"].get("ownerReferences") or []
        if owners and ours and all(o.get("uid") != ours[0]["uid"] for o in owners):
            # A child of an earlier FineTuneJob with the same name: the garbage collector removes it.
            raise kopf.TemporaryError(f"{kind} {name} still belongs to an earlier job of this name", delay=2)
        if not owners and ours:
            patch({"metadata": {"ownerReferences": ours}})
        return existing

    def stop_pytorchjob(self, job: FineTuneJob) -> None:
        """Suspend the PyTorchJob of a job that ended Failed while its pods still run: the training
        operator deletes them. The PyTorchJob stays, for `kubectl describe`."""
        self._patch_pytorchjob(job, {"spec": {"runPolicy": {"suspend": True}}})

    def refresh_status(
        self,
        namespace: str | None,
        name: str,
        progress: Progress | None = None,
        tick: bool = False,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
        deleted_pod: Manifest | None = None,
    ) -> Transition | None:
        """Recompute a job's status from its children and write it when it changed.

        The write carries the resourceVersion it was computed from; when someone wrote in between
        (another handler of the same job) the whole computation starts again from fresh reads.
        Outside a timer tick (`tick`), a change of gpuSeconds alone is not worth a write.
        A job that ended Failed while its PyTorchJob still runs (its backoff limit) has the
        PyTorchJob stopped, after the status that says why is written.
        """
        if namespace is None:  # FineTuneJobs are namespaced; kopf types it optional
            return None
        for _ in range(STATUS_WRITE_ATTEMPTS):
            body = self.read_job(namespace, name)
            if body is None:
                return None
            current = stored_status(body)
            job, errors = validate_manifest(without_status(body))
            now = utc_now()
            generation = (body.get("metadata") or {}).get("generation")
            observed = None
            if job is None:
                new = invalid_status(current, generation, errors, now)
            else:
                observed = self.observe(job, deleted_pod)
                new = compute_status(job, current, observed, now, progress)
            if new == current or (not tick and without_cost(new) == without_cost(current)):
                self._stop_if_failed(job, new, observed, logger)
                return None
            patch = {
                "metadata": {"resourceVersion": body["metadata"]["resourceVersion"]},
                "status": status_patch(new, current),
            }
            try:
                self.custom.patch_namespaced_custom_object_status(
                    GROUP,
                    VERSION,
                    namespace,
                    PLURAL,
                    name,
                    patch,
                    _content_type="application/merge-patch+json",
                )
            except ApiException as error:
                if error.status in (CONFLICT, NOT_FOUND):
                    continue
                raise
            if logger is not None and new.phase != current.phase:
                logger.info(f"phase {current.phase} -> {new.phase}: {new.message}")
            self._stop_if_failed(job, new, observed, logger)
            return Transition(body=body, before=current, after=new)
        raise kopf.TemporaryError("the status kept changing underneath; trying again", delay=1)

    def _stop_if_failed(
        self,
        job: FineTuneJob | None,
        status: FineTuneJobStatus,
        observed: Observed | None,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None,
    ) -> None:
        if job is None or observed is None or status.phase is not Phase.FAILED:
            return
        if pytorchjob_state(observed.pytorchjob) not in (
            JobState.CREATED,
            JobState.RUNNING,
            JobState.RESTARTING,
        ):
            return
        run_policy = ((observed.pytorchjob or {}).get("spec") or {}).get("runPolicy") or {}
        if run_policy.get("suspend") is True:
            return
        if logger is not None:
            logger.info(f"stopping PyTorchJob {job.name}: {status.message}")
        self.stop_pytorchjob(job)

    # ---------------------------------------------------------------------------------------- progress

    def read_progress(self, job: FineTuneJob, observed: Observed) -> Progress | None:
        """The master pod's own /metrics, read over the pod network (the trainer needs no API credentials)."""
        master = next(
            (
                pod
                for pod in observed.pods
                if is_master(pod) and (pod.get("status") or {}).get("phase") == "Running"
            ),
            None,
        )
        if master is None:
            return None
        host = self.settings.progress_host or (master.get("status") or {}).get("podIP")
        if not host:
            return None
        if ":" in host:
            host = f"[{host}]"
        url = f"http://{host}:{job.spec.metrics.port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=self.settings.progress_timeout_seconds) as response:
                exposition = response.read(4 * 1024 * 1024).decode("utf-8", errors="replace")
        except (urllib.error.URLError, OSError, ValueError):
            return None
        try:
            return parse_progress(exposition, utc_now(), job.name)
        except ValueError:
            return None
