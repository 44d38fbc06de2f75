"""A FineTuneJob watch in a process that does nothing else: when each job's creation reached an idle client.

`bench.operator_scale` runs it beside the operator during a create wave, as
`python -m bench.watch_probe KUBECONFIG NAMESPACE OUTPUT`. It follows the namespace with the operator's own
Reflector, so the two receive the same events through the same code; set against the API server's audit
log, the probe's arrival times say how late the API server delivers a watch event under that load, and the
rest of the operator's wait before its first write is its own. It prints `ready` once its watch can no longer
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


def main(kubeconfig: str, namespace: str, output: Path) -> None:
    seen: dict[str, float] = {}
    stopping = threading.Event()

    def added(event_type: str, obj: dict[str, Any]) -> None:
        if event_type == "ADDED":
            seen.setdefault(str(obj["metadata"]["name"]), time.time())

    def stop(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    api = config.new_client_from_config(kubeconfig)  # type: ignore[no-untyped-call]
    reflector = Reflector(api, Collection(KIND, f"{GROUP}/{VERSION}", PLURAL, namespace), added)
    reflector.start()
    reflector.synced.wait()  # the watch goes on from the list's version: no later create is missed
    print("ready", flush=True)
    stopping.wait()
    reflector.stop()
    output.write_text(json.dumps({"seen": seen}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
