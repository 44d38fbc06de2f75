"""The real `helm` binary (built by hack/install-tools.sh from the helm.sh/helm/v3 Go module) and the chart."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT

CHART = ROOT / "charts" / "kubetune"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))


def pinned_version(component: str) -> str | None:
    """A version pinned in hack/versions.env (e.g. HELM_VERSION), or None where it is not pinned."""
    versions = ROOT / "hack" / "versions.env"
    if not versions.exists():
        return None
    for line in versions.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == component:
            return value.strip()
    return None


def kube_version_args() -> list[str]:
    """Offline rendering assumes the test cluster's Kubernetes version: a helm built from its Go module (no
    release ldflags) would otherwise assume v1.20 and refuse the chart's kubeVersion."""
    version = pinned_version("KUBERNETES_VERSION")
    return ["--kube-version", version] if version else []


def helm_binary() -> str:
    """helm from $HELM, the pinned build under ~/.cache/kubetune/bin, or PATH; skips the test when none exists."""
    cache = Path(os.environ.get("KUBETUNE_CACHE_DIR", Path.home() / ".cache" / "kubetune"))
    bin_root = Path(os.environ.get("KUBETUNE_BIN_DIR", cache / "bin"))
    pinned = pinned_version("HELM_VERSION")
    candidates = [
        os.environ.get("HELM"),
        str(bin_root / "helm" / pinned / "helm") if pinned else None,
        shutil.which("helm"),
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("helm is not built yet: run hack/install-tools.sh helm")


def helm(*args: str, check: bool = True, kubeconfig: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Runs helm; with `check`, a non-zero exit fails the test with helm's output."""
    env = {
        **os.environ,
        "HELM_CACHE_HOME": "/tmp/kubetune-helm/cache",
        "HELM_CONFIG_HOME": "/tmp/kubetune-helm/config",
    }
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    argv = [helm_binary(), *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


def value_args(values_files: Sequence[Path] = (), set_values: Sequence[str] = ()) -> list[str]:
    args: list[str] = []
    for path in values_files:
        args += ["-f", str(path)]
    for assignment in set_values:
        args += ["--set", assignment]
    return args


def render(
    values_files: Sequence[Path] = (),
    set_values: Sequence[str] = (),
    namespace: str = "kubetune-system",
    release: str = "kubetune",
    include_crds: bool = False,
) -> list[dict[str, Any]]:
    """`helm template` of the chart: the manifests it would install, as dicts."""
    args = ["template", release, str(CHART), "--namespace", namespace, *kube_version_args()]
    args += value_args(values_files, set_values)
    if include_crds:
        args.append("--include-crds")
    output = helm(*args).stdout
    return [doc for doc in yaml.safe_load_all(output) if doc]


def find(manifests: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)]


def one(manifests: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = find(manifests, kind)
    assert len(found) == 1, f"expected one {kind}, got {[m['metadata']['name'] for m in found]}"
    return found[0]
