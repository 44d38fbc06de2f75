"""The real kstatus library's verdicts (sigs.k8s.io/cli-utils/pkg/kstatus/status.Compute) on Kubernetes objects.

hack/kstatus is a small Go program on that library; hack/install-tools.sh builds it (or finds it built from the
same source) under ~/.cache/kubetune/bin/kstatus/<cli-utils version>/. Flux's kustomize-controller and
kstatus-based waits reach their verdicts through the same function.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.conftest import ROOT


def _pinned(name: str) -> str:
    for line in (ROOT / "hack" / "versions.env").read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == name:
            return value.strip()
    raise KeyError(f"{name} is not pinned in hack/versions.env")


@functools.cache
def kstatus_checker() -> Path:
    """The checker binary, built by hack/install-tools.sh when missing or older than its source."""
    built = subprocess.run(
        [str(ROOT / "hack" / "install-tools.sh"), "kstatus"], capture_output=True, text=True, timeout=900
    )
    assert built.returncode == 0, f"hack/install-tools.sh kstatus failed:\n{built.stderr}"
    cache = Path(os.environ.get("KUBETUNE_CACHE_DIR", Path.home() / ".cache" / "kubetune"))
    bin_root = Path(os.environ.get("KUBETUNE_BIN_DIR", cache / "bin"))
    return bin_root / "kstatus" / _pinned("KSTATUS_VERSION") / "kstatus"


def kstatus_verdicts(objects: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(status, message) kstatus computes for each object, in order: InProgress, Current, Failed, ..."""
    stream = "\n".join(json.dumps(obj) for obj in objects)
    judged = subprocess.run(
        [str(kstatus_checker())], input=stream, capture_output=True, text=True, timeout=60
    )
    assert judged.returncode == 0, judged.stderr
    verdicts = [json.loads(line) for line in judged.stdout.splitlines()]
    assert len(verdicts) == len(objects), judged.stdout
    return [(v["status"], v["message"]) for v in verdicts]
