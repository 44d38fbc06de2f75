"""A FineTuneJob watch in a process that does nothing else: when each job's creation reached an idle client.

`bench.operator_scale` runs it beside the operator during a create wave, as
`python -m bench.watch_probe KUBECONFIG NAMESPACE SELECTOR OUTPUT`. It follows the namespace's FineTuneJobs
that match SELECTOR with the kubernetes client's plain watch (no handler machinery: the floor kopf's watch
is measured against); the selector tells its watch from the benchmark's in the API server's log. Set against the audit log,
its arrival times say how late the API server delivers a watch event under that load, and the rest of the
operator's wait before its first write is the operator's own. It prints `ready` once its watch can no longer
miss a create, and on SIGTERM writes {"seen": {job: wall-clock seconds of its ADDED event}}.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, cast

from kubernetes import client, config, watch

from kubetune.api.v1alpha1 import GROUP, PLURAL, VERSION

LIST_TIMEOUT_SECONDS = 60
WATCH_SECONDS = 300


def main(kubeconfig: str, namespace: str, selector: str, output: Path) -> None:
    seen: dict[str, float] = {}
    stopping = threading.Event()

    def added(event_type: str, obj: dict[str, Any]) -> None:
        if event_type == "ADDED":
            seen.setdefault(str(obj["metadata"]["name"]), time.time())

    def stop(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    api = client.CustomObjectsApi(config.new_client_from_config(kubeconfig))  # type: ignore[no-untyped-call]
    listed = cast(
        dict[str, Any],
        api.list_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, label_selector=selector, _request_timeout=LIST_TIMEOUT_SECONDS
        ),
    )
    version = str(listed["metadata"]["resourceVersion"])
    watcher = watch.Watch()  # type: ignore[no-untyped-call]

    def follow() -> None:
        """Watch from the list's version, and again from the last version seen after each request."""
        try:
            watch_from_last_version()
        except Exception:
            if not stopping.is_set():
                raise  # the connection cut by watcher.stop() at the end is not worth a traceback

    def watch_from_last_version() -> None:
        nonlocal version
        while not stopping.is_set():
            for event in watcher.stream(  # type: ignore[no-untyped-call]
                api.list_namespaced_custom_object,
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                label_selector=selector,
                resource_version=version,
                timeout_seconds=WATCH_SECONDS,
            ):
                version = str(event["object"]["metadata"]["resourceVersion"])
                added(str(event["type"]), event["object"])

    threading.Thread(target=follow, name="watch", daemon=True).start()
    # The watch goes on from the list's version: no create after this is missed.
    print("ready", flush=True)
    stopping.wait()
    watcher.stop()  # type: ignore[no-untyped-call]
    output.write_text(json.dumps({"seen": seen}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]))
