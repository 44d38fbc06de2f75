"""The side of the operator that talks to the API server: create or adopt children, write status, post events.

Reads of a job's children come from kopf's indexes (see handlers.py); this module reads only what a watch
cannot have yet. Every write is idempotent or conditional, so a retry or an operator restart at any point converges
on exactly one ConfigMap and one PyTorchJob per FineTuneJob.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, cast

import orjson
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.client.rest import RESTResponse

from kubetune.api.v1alpha1 import (
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    FineTuneJob,
    FineTuneJobStatus,
    Progress,
)
from kubetune.controller.changes import status_patch
from kubetune.controller.children import Children
from kubetune.controller.conditions import utc_now
from kubetune.controller.config import OperatorConfig
from kubetune.controller.observed import JobState, Observed, pytorchjob_state
from kubetune.controller.pods import is_master
from kubetune.controller.progress import parse_progress
from kubetune.controller.queueing import (
    JOB_UID_LABEL,
    WORKLOAD_GROUP,
    WORKLOAD_PLURAL,
    WORKLOAD_VERSION,
    is_queued,
    queue_writes,
    workload_of,
    writes_need_workload,
)
from kubetune.render import build_all
from kubetune.render.labels import (
    JOB_NAME,
    KUEUE_QUEUE_NAME,
    MANAGED_BY,
    owner_references,
    pytorchjob_name,
)

Manifest = dict[str, Any]

PYTORCHJOB_GROUP = "kubeflow.org"
PYTORCHJOB_VERSION = "v1"
PYTORCHJOB_PLURAL = "pytorchjobs"
CONFLICT = 409
NOT_FOUND = 404
NODE_READY_TTL_SECONDS = 10.0
EVENT_SOURCE = "kubetune-operator"
MAX_EVENT_MESSAGE = 1024
WAITING_STATES = (JobState.CREATED, JobState.SUSPENDED)
"""Where a queued job may wait for Kueue: the status then quotes its Workload."""
LEGACY_FINALIZER = "kubetune.io/finalizer"
"""Earlier versions put this finalizer on every job; nothing needs it now, and a job that keeps it could
never be deleted: it is kopf's finalizer setting, so kopf lifts it from each job it sees (handlers.py)."""
CORE_PREFIX = "/api/v1"
CONFIGMAPS = "/namespaces/{namespace}/configmaps"
CONFIGMAP = CONFIGMAPS + "/{name}"


def new_api_client(connections: int) -> client.ApiClient:
    """In a pod: its ServiceAccount; elsewhere: the current kubeconfig context. `connections` is how many
    requests may be open at once (each watch holds one): past the pool's size, urllib3 opens a connection
    (a TLS handshake) per request and throws it away afterwards."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    configuration.connection_pool_maxsize = max(connections, configuration.connection_pool_maxsize)
    return client.ApiClient(configuration)


class RetryLater(Exception):
    """A reconcile that cannot go on yet (a name taken, a child still being deleted): the job is reconciled
    again after `delay` seconds, and the message is logged."""

    def __init__(self, message: str, delay: float) -> None:
        super().__init__(message)
        self.delay = delay


def api_request(
    api_client: client.ApiClient,
    method: str,
    path: str,
    *,
    body: Manifest | None = None,
    names: Mapping[str, str] | None = None,
    query: Mapping[str, str] | None = None,
    timeout: tuple[float, float] | None = None,
) -> RESTResponse:
    """One request by path (whose `{placeholders}` are filled from `names`), the body not yet read, so a
    watch can stream it. Raises ApiException on an error status, as the generated clients do."""
    headers = {"Accept": "application/json"}
    if body is not None:
        # The patches here are partial objects: a JSON merge patch.
        headers["Content-Type"] = "application/merge-patch+json" if method == "PATCH" else "application/json"
    request = api_client.param_serialize(
        method=method,
        resource_path=path,
        path_params=dict(names or {}),
        query_params=list((query or {}).items()),
        header_params=headers,
        body=body,
        auth_settings=["BearerToken"],
    )
    response = api_client.call_api(*request, _request_timeout=timeout)
    if not 200 <= response.status <= 299:
        response.read()  # type: ignore[no-untyped-call]
        raise ApiException.from_response(http_resp=response, body=None, data=None)
    return response


@dataclass
class Kube:
    """The API clients of one operator process."""

    api_client: client.ApiClient
    settings: OperatorConfig
    _nodes: dict[str, tuple[float, bool]] = field(default_factory=dict)
    _nodes_lock: threading.Lock = field(default_factory=threading.Lock)
    _node_reads: dict[str, threading.Lock] = field(default_factory=dict)
    """One lock per node, held while it is read: workers that find the same entry expired wait for one read."""

    @cached_property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api_client)

    def warm_up(self) -> None:
        """Import the API module now, not in the first job's reconcile."""
        _ = self.custom

    def core_request(self, method: str, path: str, body: Manifest | None = None, **names: str) -> Manifest:
        """A request to the core group (`/api/v1` + `path`, whose `{placeholders}` are filled from `names`);
        the answer as parsed JSON. Raises ApiException on an error status, as the generated clients do.

        Not through the client's CoreV1Api, whose module and models cost start-up time and memory for five
        calls whose answers are read as plain JSON anyway (docs/architecture.md). The ApiClient underneath
        still does authentication, TLS and retries.
        """
        response = api_request(self.api_client, method, CORE_PREFIX + path, body=body, names=names)
        data = response.read()  # type: ignore[no-untyped-call]
        return cast(Manifest, orjson.loads(data)) if data else {}

    # ------------------------------------------------------------------------------------------- reads

    def read_job(self, namespace: str, name: str) -> Manifest | None:
        """A fresh read, for when a status write found the stored job out of date."""
        return self._read(GROUP, VERSION, PLURAL, namespace, name)

    def read_pytorchjob(self, namespace: str, name: str) -> Manifest | None:
        return self._read(PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, PYTORCHJOB_PLURAL, namespace, name)

    def _read(self, group: str, version: str, plural: str, namespace: str, name: str) -> Manifest | None:
        try:
            return cast(
                Manifest, self.custom.get_namespaced_custom_object(group, version, namespace, plural, name)
            )
        except ApiException as error:
            if error.status == NOT_FOUND:
                return None
            raise

    def read_workload(self, job: FineTuneJob, pytorchjob: Manifest | None) -> Manifest | None:
        """Kueue's Workload of a queued job's PyTorchJob (found by the job-uid label Kueue puts on it); None
        for a job without a queue, before Kueue made one, or on a cluster without Kueue.

        Read, not watched: Kueue's decisions that matter reach the operator as PyTorchJob events (it
        un-suspends on admission, suspends on eviction), and the wait message is refreshed by the resync; a
        watch would need a cluster-wide read of every Workload, ours or not.
        """
        uid = ((pytorchjob or {}).get("metadata") or {}).get("uid")
        if not is_queued(job) or not uid or pytorchjob is None:
            return None
        try:
            listed = cast(
                Manifest,
                self.custom.list_namespaced_custom_object(
                    WORKLOAD_GROUP,
                    WORKLOAD_VERSION,
                    job.namespace,
                    WORKLOAD_PLURAL,
                    label_selector=f"{JOB_UID_LABEL}={uid}",
                ),
            )
        except ApiException as error:
            if error.status == NOT_FOUND:  # no Kueue: the job waits for a queue that never admits it
                return None
            raise
        found = workload_of(pytorchjob, list(listed.get("items") or []))
        return dict(found) if found is not None else None

    def observe(self, children: Children, job: FineTuneJob | None = None) -> Observed:
        """The PyTorchJob, its pods, which of their nodes stopped reporting (as the watches last said) and,
        for a queued job, Kueue's Workload."""
        nodes = {
            (pod.get("spec") or {}).get("nodeName")
            for pod in children.pods
            if (pod.get("status") or {}).get("phase") == "Running"
        }
        lost = frozenset(node for node in nodes if node and not self._node_ready(node))
        return Observed(
            pytorchjob=children.pytorchjob,
            pods=children.pods,
            lost_nodes=lost,
            deleted_pods=children.deleted_pods,
            workload=(
                self.read_workload(job, children.pytorchjob)
                if job is not None and pytorchjob_state(children.pytorchjob) in WAITING_STATES
                else None
            ),
        )

    def _node_ready(self, name: str) -> bool:
        """Whether the node reports Ready, read at most once per NODE_READY_TTL_SECONDS.

        Many jobs share a node, and a node that stops reporting takes its controller 40 s to mark
        NotReady, so a few seconds of staleness costs nothing and saves a read per running pod and event.
        When the entry expires, one worker reads the node and the others that want it wait for that read.
        """
        if (cached := self._cached_node(name)) is not None:
            return cached
        with self._nodes_lock:
            reading = self._node_reads.setdefault(name, threading.Lock())
        with reading:
            if (cached := self._cached_node(name)) is not None:
                return cached  # read by the worker this one waited for
            now = time.monotonic()
            try:
                node = self.core_request("GET", "/nodes/{name}", name=name)
                conditions = (node.get("status") or {}).get("conditions") or []
                ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
            except ApiException as error:
                if error.status != NOT_FOUND:
                    raise
                ready = False
            with self._nodes_lock:
                self._nodes[name] = (now, ready)
            return ready

    def _cached_node(self, name: str) -> bool | None:
        with self._nodes_lock:
            cached = self._nodes.get(name)
        if cached is None or time.monotonic() - cached[0] >= NODE_READY_TTL_SECONDS:
            return None
        return cached[1]

    # ------------------------------------------------------------------------------------------ writes

    def ensure_children(self, job: FineTuneJob, known: Manifest | None, seen_before: bool) -> Manifest:
        """Create or adopt the ConfigMap, then the PyTorchJob; make suspend match the spec; return the
        PyTorchJob as it now stands.

        `known` is the PyTorchJob as the watch last saw it. When the watch has not delivered one but the job
        was reconciled before (`seen_before`: it has a status), it is read before anything is created, so
        whatever exists is adopted instead of collecting a refused create per child. A job never reconciled has no children to find,
        and a create that meets one anyway (a crash between create and status) adopts it. A PyTorchJob is
        created after its ConfigMap, so an existing one means the ConfigMap exists too.
        """
        existing = known or (self.read_pytorchjob(job.namespace, job.name) if seen_before else None)
        if existing is None:
            configmap, pytorchjob = build_all(job, self.settings.render)
            name = configmap["metadata"]["name"]
            self._create_or_adopt(
                job,
                "ConfigMap",
                name,
                create=lambda: self.core_request("POST", CONFIGMAPS, configmap, namespace=job.namespace),
                read=lambda: self.core_request("GET", CONFIGMAP, namespace=job.namespace, name=name),
                patch=lambda body: self.core_request(
                    "PATCH", CONFIGMAP, body, namespace=job.namespace, name=name
                ),
            )
            try:
                return cast(
                    Manifest,
                    self.custom.create_namespaced_custom_object(
                        PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, job.namespace, PYTORCHJOB_PLURAL, pytorchjob
                    ),
                )
            except ApiException as error:
                if error.status != CONFLICT:
                    raise
            existing = self.read_pytorchjob(job.namespace, job.name) or {}
        self._adopt(
            job,
            "PyTorchJob",
            pytorchjob_name(job),
            existing,
            patch=lambda body: self._patch_pytorchjob(job, body),
        )
        # Suspend follows the spec, except that a queued job's PyTorchJob is un-suspended by Kueue alone; a
        # queued job is suspended and resumed through its Workload (queueing.py).
        workload = self.read_workload(job, existing) if writes_need_workload(job, existing) else None
        writes = queue_writes(job, existing, workload)
        if writes.workload_patch is not None and writes.workload is not None:
            self._patch_workload(job, writes.workload, writes.workload_patch)
        if writes.pytorchjob_queue is not None:
            existing = self._patch_pytorchjob(
                job, {"metadata": {"labels": {KUEUE_QUEUE_NAME: writes.pytorchjob_queue}}}
            )
        if writes.pytorchjob_suspend is not None:
            return self._patch_pytorchjob(
                job, {"spec": {"runPolicy": {"suspend": writes.pytorchjob_suspend}}}
            )
        return existing

    def _patch_workload(
        self, job: FineTuneJob, workload: Mapping[str, Any], patch: Mapping[str, Any]
    ) -> None:
        self.custom.patch_namespaced_custom_object(
            WORKLOAD_GROUP,
            WORKLOAD_VERSION,
            job.namespace,
            WORKLOAD_PLURAL,
            workload["metadata"]["name"],
            dict(patch),
            _content_type="application/merge-patch+json",
        )

    def _patch_pytorchjob(self, job: FineTuneJob, body: Manifest) -> Manifest:
        return cast(
            Manifest,
            self.custom.patch_namespaced_custom_object(
                PYTORCHJOB_GROUP,
                PYTORCHJOB_VERSION,
                job.namespace,
                PYTORCHJOB_PLURAL,
                job.name,
                body,
                _content_type="application/merge-patch+json",
            ),
        )

    def _create_or_adopt(
        self,
        job: FineTuneJob,
        kind: str,
        name: str,
        create: Callable[[], object],
        read: Callable[[], Manifest],
        patch: Callable[[Manifest], object],
    ) -> None:
        """Create the object; when it exists (a retry), adopt it if it carries our labels."""
        try:
            create()
            return
        except ApiException as error:
            if error.status != CONFLICT:
                raise
        self._adopt(job, kind, name, read(), patch)

    def _adopt(
        self,
        job: FineTuneJob,
        kind: str,
        name: str,
        existing: Manifest,
        patch: Callable[[Manifest], object],
    ) -> None:
        """Take over an existing child if it is this job's: our labels, not being deleted, no other owner."""
        metadata = existing.get("metadata") or {}
        labels = metadata.get("labels") or {}
        if labels.get(MANAGED_BY) != "kubetune" or labels.get(JOB_NAME) != job.name:
            raise RetryLater(
                f"{kind} {name} exists and was not made by kubetune for this job: rename or delete it",
                delay=30,
            )
        if metadata.get("deletionTimestamp"):
            raise RetryLater(f"{kind} {name} of an earlier job is being deleted", delay=2)
        owners = metadata.get("ownerReferences") or []
        ours = owner_references(job)
        if owners and ours and all(o.get("uid") != ours[0]["uid"] for o in owners):
            # A child of an earlier FineTuneJob with the same name: the garbage collector removes it.
            raise RetryLater(f"{kind} {name} still belongs to an earlier job of this name", delay=2)
        if not owners and ours:
            patch({"metadata": {"ownerReferences": ours}})

    def stop_pytorchjob(self, job: FineTuneJob) -> Manifest:
        """Suspend the PyTorchJob of a job that ended Failed while its pods still run: the training
        operator deletes them. The PyTorchJob stays, for `kubectl describe`."""
        return self._patch_pytorchjob(job, {"spec": {"runPolicy": {"suspend": True}}})

    def write_status(self, body: Manifest, new: FineTuneJobStatus, current: FineTuneJobStatus) -> Manifest:
        """Patch the status from `current` to `new`, on condition that the job is still at the
        resourceVersion both were computed from; returns the job as written. Raises ApiException 409
        when someone wrote in between, 404 when the job is gone."""
        metadata = body["metadata"]
        patch = {
            "metadata": {"resourceVersion": metadata["resourceVersion"]},
            "status": status_patch(new, current),
        }
        return self._patch_job(metadata, patch, "application/merge-patch+json", status=True)

    def _patch_job(
        self,
        metadata: Mapping[str, Any],
        patch: Manifest | list[Manifest],
        content_type: str,
        status: bool = False,
    ) -> Manifest:
        """Patch the FineTuneJob (or its status subresource) that `metadata` names."""
        call = (
            self.custom.patch_namespaced_custom_object_status
            if status
            else self.custom.patch_namespaced_custom_object
        )
        return cast(
            Manifest,
            call(
                GROUP,
                VERSION,
                metadata["namespace"],
                PLURAL,
                metadata["name"],
                patch,
                _content_type=content_type,
            ),
        )

    def post_event(self, body: Manifest, event_type: str, reason: str, message: str) -> None:
        """A core/v1 Event on the FineTuneJob, as `kubectl describe` shows them.

        An Event that cannot be posted is logged, not retried: the status already says the same.
        """
        metadata = body["metadata"]
        now = utc_now()
        event = {
            "metadata": {"generateName": f"{metadata['name']}.", "namespace": metadata["namespace"]},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": body.get("kind", KIND),
                "name": metadata["name"],
                "namespace": metadata["namespace"],
                "uid": metadata.get("uid"),
            },
            "type": event_type,
            "reason": reason,
            "message": message[:MAX_EVENT_MESSAGE],
            "source": {"component": EVENT_SOURCE},
            "reportingComponent": EVENT_SOURCE,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.core_request(
                "POST", "/namespaces/{namespace}/events", event, namespace=metadata["namespace"]
            )
        except ApiException as error:
            logging.getLogger(__name__).warning(
                f"{metadata['namespace']}/{metadata['name']}: could not post event {reason}: {error.reason}"
            )

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
