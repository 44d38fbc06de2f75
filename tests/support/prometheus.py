"""The real Prometheus server (Debian package ``prometheus``) and ``promtool`` for tests.

The binary runs directly (not the systemd unit) with a generated config on a free
loopback port and a throw-away TSDB folder; tests add scrape targets and query PromQL.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .seaweedfs import free_port


def _binary(name: str) -> str:
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (apt-get install -y prometheus)")
    return found


def promtool_check_metrics(exposition: str) -> subprocess.CompletedProcess[str]:
    """``promtool check metrics`` on an exposition text; returncode 0 means no lint problem."""
    return subprocess.run(
        [_binary("promtool"), "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        timeout=30,
    )


class Prometheus:
    """A Prometheus server scraping ``targets`` (host:port) every ``interval``."""

    def __init__(self, work_dir: Path, targets: list[str], interval: str = "1s") -> None:
        self.work_dir = work_dir
        self.targets = targets
        self.interval = interval
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        config = self.work_dir / "prometheus.yml"
        config.write_text(
            json.dumps(
                {
                    "global": {"scrape_interval": self.interval, "evaluation_interval": self.interval},
                    "scrape_configs": [
                        {"job_name": "kubetune-trainer", "static_configs": [{"targets": self.targets}]}
                    ],
                }
            )
        )
        self.process = subprocess.Popen(
            [
                _binary("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={self.work_dir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=(self.work_dir / "prometheus.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited; see {self.work_dir / 'prometheus.log'}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("prometheus did not become ready")

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        """Run an instant query (now, or at the Unix time ``at``); return the result vector."""
        parameters = {"query": promql, **({"time": f"{at:.3f}"} if at is not None else {})}
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode(parameters)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_for(self, promql: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Query until the result is non-empty."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.query(promql)
            if result:
                return result
            time.sleep(0.5)
        raise AssertionError(f"{promql} returned nothing within {timeout:.0f}s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Any]:
    """Start a Prometheus scraping the given targets: ``prometheus_factory(["127.0.0.1:9090"])``."""
    servers: list[Prometheus] = []

    def start(targets: list[str], interval: str = "1s") -> Prometheus:
        server = Prometheus(tmp_path / f"prometheus-{len(servers)}", targets, interval)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()
