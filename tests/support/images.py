"""The two images built by `make images` (scripts/build-images.sh), and their programs run inside them.

`podman run` does not work on machines like ours (crun needs cgroups it cannot set up), so a program runs in an
image the way buildah runs a build step: `buildah from IMAGE` makes a working container, `buildah run
--isolation chroot` runs one command in it (the host's network and hostname, the image's environment and user), and `buildah
rm` drops it. buildah does not apply the image's ENTRYPOINT; `BuiltImage.argv` combines it with a pod's
command/args as the kubelet does.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

BUILD_SCRIPT = ROOT / "scripts" / "build-images.sh"
IMAGE_COMMANDS = ("podman", "buildah", "mmdebstrap")


def app_version() -> str:
    for line in (ROOT / "charts" / "kubetune" / "Chart.yaml").read_text().splitlines():
        if line.startswith("appVersion:"):
            return line.split(":", 1)[1].strip().strip('"')
    raise AssertionError("charts/kubetune/Chart.yaml has no appVersion")


@dataclass(frozen=True)
class BuiltImage:
    """A built image: its tag and the parts of its configuration a container runtime uses."""

    tag: str
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    user: str
    exposed_ports: frozenset[int]
    size_bytes: int
    build_seconds: float

    def argv(self, command: Sequence[str] | None, args: Sequence[str] | None) -> list[str]:
        """How the kubelet combines a container's command/args with the image's ENTRYPOINT/CMD."""
        if command:
            return [*command, *(args or [])]
        return [*self.entrypoint, *(args if args is not None else self.cmd)]


def require_image_tools() -> None:
    missing = [name for name in IMAGE_COMMANDS if shutil.which(name) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (make image-deps)")


def build_image(name: str) -> BuiltImage:
    """`scripts/build-images.sh NAME` (a no-op of a few seconds when its layers are cached), then inspect it."""
    require_image_tools()
    started = time.monotonic()
    result = subprocess.run([str(BUILD_SCRIPT), name], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    seconds = time.monotonic() - started
    assert result.returncode == 0, (
        f"building {name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    )
    tag = f"ghcr.io/kubetune/kubetune-{name}:{app_version()}"
    (inspected,) = json.loads(
        subprocess.run(["podman", "image", "inspect", tag], capture_output=True, text=True, check=True).stdout
    )
    config: dict[str, Any] = inspected["Config"]
    return BuiltImage(
        tag=tag,
        entrypoint=tuple(config.get("Entrypoint") or ()),
        cmd=tuple(config.get("Cmd") or ()),
        user=str(config.get("User") or ""),
        exposed_ports=frozenset(int(port.split("/")[0]) for port in config.get("ExposedPorts") or {}),
        size_bytes=int(inspected["Size"]),
        build_seconds=seconds,
    )


@dataclass
class WorkingContainer:
    """A buildah working container of an image; each `run`/`start` is one process inside it."""

    name: str

    def _argv(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        volumes: Mapping[Path, str],
        user: str | None,
    ) -> list[str]:
        # The host's network and hostname, as a hostNetwork pod has: the container's own hostname would not
        # resolve, and torchrun's rendezvous needs it to.
        command = ["buildah", "run", "--isolation", "chroot", "--network", "host", "--uts", "host"]
        if user is not None:
            command += ["--user", user]
        for key, value in env.items():
            command += ["--env", f"{key}={value}"]
        for source, target in volumes.items():
            command += ["--volume", f"{source}:{target}"]
        return [*command, self.name, "--", *argv]

    def run(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        volumes: Mapping[Path, str] | None = None,
        user: str | None = None,
        timeout: float = 600,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self._argv(argv, env or {}, volumes or {}, user),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(
        self,
        argv: Sequence[str],
        log: Path,
        env: Mapping[str, str] | None = None,
        volumes: Mapping[Path, str] | None = None,
        user: str | None = None,
    ) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            return subprocess.Popen(
                self._argv(argv, env or {}, volumes or {}, user), stdout=out, stderr=subprocess.STDOUT
            )


@contextlib.contextmanager
def working_container(image: BuiltImage) -> Iterator[WorkingContainer]:
    """`buildah from` the image, yield, then `buildah rm` it (the image stays)."""
    name = subprocess.run(
        ["buildah", "from", "--pull=never", "--quiet", image.tag], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        yield WorkingContainer(name)
    finally:
        subprocess.run(["buildah", "rm", name], capture_output=True, check=False)
