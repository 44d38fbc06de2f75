"""List, then watch: the collections the operator follows, delivered to the reconciler as events.

This is client-go's Reflector in the lines this operator needs. List the collection in pages and keep the
list's resourceVersion; watch from it, with bookmarks, a few minutes at a time; after a dropped connection,
watch again from the last version seen; when the server no longer has that version (410 Gone), list again
and report what vanished meanwhile as deleted. The objects are delivered as plain JSON: every reader here
reads them as dicts.

Why not kopf, which did this before: kopf passes every watch event through its per-object machinery (a
worker task, a Body, a Patch and handler bookkeeping per event) to serve per-object handlers, and this
operator has none: it reconciles from its own store (store.py) in its own workers (reconciler.py). In py-spy
profiles at a thousand jobs, that machinery and its event loop were 48% of the CPU of a restart and 46% of
the create wave's. Nor `kubernetes.watch.Watch`: for objects read as plain JSON it follows neither their
resourceVersions nor bookmarks, so every reconnect would replay the collection from the list's version.

Decoded with orjson, not the standard library: decoding the initial lists is a fifth of a restart's CPU,
and orjson takes two thirds of the time for them (14.6 MB of lists at a thousand jobs: 0.21 s against 0.33 s).
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.client.rest import RESTResponse
from kubernetes.watch.watch import iter_resp_lines

from kubetune.controller.kube import NOT_FOUND, api_request
from kubetune.controller.store import trimmed

Manifest = dict[str, Any]
Deliver = Callable[[str, Manifest], None]
"""Called with the event type (ADDED, MODIFIED, DELETED) and the object, from the reflector's thread."""

GONE = 410
FORBIDDEN = 403
PAGE_SIZE = 500
WATCH_SECONDS = 300
"""How long one watch request lasts (a random share more, so that watches do not all end together)."""
CONNECT_SECONDS = 10.0
READ_SLACK_SECONDS = 30.0
"""A watch silent this long past its own timeout is a dead connection."""
FIRST_RETRY_SECONDS = 0.5
MAX_RETRY_SECONDS = 30.0

log = logging.getLogger("kubetune.operator")


@dataclass(frozen=True)
class Collection:
    """One collection to follow: a kind in one namespace (None: all of them), optionally by label."""

    kind: str
    api_version: str
    """`v1` for the core group, else `group/version`."""
    plural: str
    namespace: str | None = None
    label_selector: str | None = None

    @property
    def path(self) -> str:
        prefix = f"/apis/{self.api_version}" if "/" in self.api_version else f"/api/{self.api_version}"
        scope = f"/namespaces/{self.namespace}" if self.namespace else ""
        return f"{prefix}{scope}/{self.plural}"

    def __str__(self) -> str:
        where = f"namespace {self.namespace}" if self.namespace else "all namespaces"
        selector = f", labels {self.label_selector}" if self.label_selector else ""
        return f"{self.api_version} {self.plural} ({where}{selector})"


def uid(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("uid") or "")


def vanished(known: Mapping[str, Manifest], listed: Iterable[str]) -> list[Manifest]:
    """The objects held in `known` (by UID) that a new list no longer has: deleted while nobody watched."""
    still = set(listed)
    return [obj for key, obj in known.items() if key not in still]


def retry_delay(failures: int) -> float:
    """Doubling from FIRST_RETRY_SECONDS up to MAX_RETRY_SECONDS, with jitter so that reflectors that
    failed together do not retry together."""
    delay = min(MAX_RETRY_SECONDS, FIRST_RETRY_SECONDS * 2 ** max(0, failures - 1))
    return float(delay * random.uniform(0.8, 1.0))


class Reflector:
    """Follows one collection in its own thread; `synced` is set once its first list has been delivered."""

    def __init__(
        self,
        api_client: client.ApiClient,
        collection: Collection,
        deliver: Deliver,
        watch_seconds: int = WATCH_SECONDS,
    ) -> None:
        self.api_client, self.collection, self.deliver = api_client, collection, deliver
        self.watch_seconds = watch_seconds
        self.synced = threading.Event()
        self._known: dict[str, Manifest] = {}
        """What the watch last said of each object, by UID: the final state of one that vanishes."""
        self._stopped = threading.Event()
        self._response: RESTResponse | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=f"watch-{self.collection.plural}", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop at once: the watch in flight is cut (its socket shut), not waited out."""
        self._stopped.set()
        response = self._response
        sock = getattr(getattr(response.response, "connection", None), "sock", None) if response else None
        if sock is not None:
            with contextlib.suppress(OSError):  # closed already
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        """List, watch, watch again; on any failure wait a growing delay and go on from where it was."""
        version: str | None = None
        failures = 0
        while not self._stopped.is_set():
            try:
                if version is None:
                    version = self.list_all()
                    failures = 0
                began = time.monotonic()
                version = self.watch(version)
                # A watch the server ends at once, again and again (a proxy that cuts them, say), would
                # otherwise be reopened in a tight loop, as client-go's backoff between watches prevents.
                brief = time.monotonic() - began < min(1.0, self.watch_seconds / 2)
                failures = failures + 1 if brief else 0
            except ApiException as error:
                failures += 1
                version = self._failed(error, version, failures)
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as error:
                # A dropped connection, a timeout, a truncated answer: watch again from the last version.
                failures += 1
                if not self._stopped.is_set():
                    log.warning(f"watch of {self.collection} interrupted: {error!r}; resuming")
            if failures:
                self._stopped.wait(retry_delay(failures))

    def _failed(self, error: ApiException, version: str | None, failures: int) -> str | None:
        """Log a refused list or watch and say where to go on from (None: list again)."""
        if error.status == GONE:
            return None  # expired between two watches, or a page's continue token expired: list again
        if error.status == NOT_FOUND:
            # Its CRD is not installed (yet), or was removed: the collection is empty until it appears.
            if failures == 1 or failures % 10 == 0:
                log.warning(
                    f"{self.collection} is not served by the API server: is its CustomResourceDefinition "
                    "installed? Looking again shortly."
                )
            self.replace([])
            self.synced.set()
            return None
        hint = (
            " (the operator's RBAC does not allow it: check the chart's Role)"
            if error.status == FORBIDDEN
            else ""
        )
        log.error(f"listing or watching {self.collection} failed: {error.status} {error.reason}{hint}")
        return version

    # ------------------------------------------------------------------------------------- list, watch

    def list_all(self) -> str:
        """List the whole collection (in pages), deliver it, and return its resourceVersion."""
        started = time.monotonic()
        items: list[Manifest] = []
        query = {"limit": str(PAGE_SIZE)} | self._selector()
        while True:
            page = orjson.loads(self._get(query).read())  # type: ignore[no-untyped-call]
            metadata = page.get("metadata") or {}
            # Items of a list carry no apiVersion and kind of their own in every API; the readers want them.
            for item in page.get("items") or []:
                item.setdefault("apiVersion", self.collection.api_version)
                item.setdefault("kind", self.collection.kind)
                items.append(item)
            if not metadata.get("continue"):
                break
            query["continue"] = metadata["continue"]
        self.replace(items)
        self.synced.set()
        log.info(f"listed {self.collection}: {len(items)} in {time.monotonic() - started:.2f} s")
        return str(metadata.get("resourceVersion") or "")

    def replace(self, items: list[Manifest]) -> None:
        """A fresh list: what vanished since the last one is delivered as deleted, then everything listed."""
        listed = {uid(obj): trimmed(obj) for obj in items}
        for gone in vanished(self._known, listed):
            self._deliver("DELETED", gone)
        self._known = listed
        for obj in listed.values():
            self._deliver("ADDED", obj)

    def watch(self, version: str) -> str | None:
        """Watch from `version` until the server ends the request; return the version to go on from, or None
        when it has expired (410 Gone) and the collection must be listed again."""
        query = {
            "watch": "true",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(int(self.watch_seconds * random.uniform(1.0, 1.2))),
        } | self._selector()
        response = self._get(query, timeout=(CONNECT_SECONDS, self.watch_seconds * 1.2 + READ_SLACK_SECONDS))
        self._response = response
        try:
            for line in iter_resp_lines(response.response):  # type: ignore[no-untyped-call]
                if self._stopped.is_set():
                    break
                if not line:
                    continue
                event = orjson.loads(line)
                event_type, obj = event.get("type"), event.get("object") or {}
                if event_type == "ERROR":
                    if obj.get("code") == GONE:
                        return None
                    raise ApiException(
                        status=obj.get("code"), reason=f"{obj.get('reason')}: {obj.get('message')}"
                    )
                version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                if event_type == "BOOKMARK":
                    continue
                obj = trimmed(obj)
                if event_type == "DELETED":
                    self._known.pop(uid(obj), None)
                else:
                    self._known[uid(obj)] = obj
                self._deliver(str(event_type), obj)
        finally:
            self._response = None
            response.response.close()  # a watch cut short must not go back to the pool half read
            response.response.release_conn()
        return version

    def _get(self, query: Mapping[str, str], timeout: tuple[float, float] | None = None) -> RESTResponse:
        return api_request(self.api_client, "GET", self.collection.path, query=query, timeout=timeout)

    def _selector(self) -> dict[str, str]:
        return {"labelSelector": self.collection.label_selector} if self.collection.label_selector else {}

    def _deliver(self, event_type: str, obj: Manifest) -> None:
        try:
            self.deliver(event_type, obj)
        except Exception:  # a bug in one event's handling must not stop the watch
            log.exception(f"handling a {event_type} event of {self.collection} failed")
