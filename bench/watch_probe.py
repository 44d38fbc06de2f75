"""A FineTuneJob watch in a process that does nothing else: when each job's creation reached an idle client.

`bench.operator_scale` runs it beside the operator during a create wave, as
`python -m bench.watch_probe KUBECONFIG NAMESPACE SELECTOR OUTPUT`. It follows the namespace's FineTuneJobs
that match SELECTOR with the operator's own Reflector, so the two receive the same events through the same
code; the selector tells its watch from the benchmark's in the API server's log. Set against the audit log,
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
from typing import Any

from kubernetes import config

from kubetune.api.v1alpha1 import GROUP, KIND, PLURAL, VERSION
from kubetune.controller.watches import Collection, Reflector

LIST_TIMEOUT_SECONDS = 60


def main(kubeconfig: str, namespace: str, selector: str, output: Path) -> None:
    seen: dict[str, float] = {}
    stopping = threading.Event()

    def added(event_type: str, obj: dict[str, Any]) -> None:
        if event_type == "ADDED":
            seen.setdefault(str(obj["metadata"]["name"]), time.time())

    def stop(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    api = config.new_client_from_config(kubeconfig)  # type: ignore[no-untyped-call]
    reflector = Reflector(api, Collection(KIND, f"{GROUP}/{VERSION}", PLURAL, namespace, selector), added)
    reflector.start()
    # The watch goes on from the list's version: no create after this is missed.
    if not reflector.synced.wait(LIST_TIMEOUT_SECONDS):
        sys.exit(f"the watch probe could not list FineTuneJobs within {LIST_TIMEOUT_SECONDS} s")
    print("ready", flush=True)
    stopping.wait()
    reflector.stop()
    output.write_text(json.dumps({"seen": seen}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]))
