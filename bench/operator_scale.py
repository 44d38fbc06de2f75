"""The operator at fleet scale: N FineTuneJobs submitted at once to the real test control plane with kwok nodes.

For each N, in a control plane of its own (`hack/cluster up` under ~/.cache/kubetune/bench-cluster, with the
API server's audit log on), two phases run from an empty etcd:

- **floor**: the N PyTorchJobs our renderer would make, created directly with the kubernetes client. What a
  burst of bare PyTorchJobs costs the API server, and how fast the Kubeflow training operator turns each into
  a pod (the **peer hop**, PyTorchJob created -> its pod created).
- **operator**: `kubetune operator` running under its own ServiceAccount, and N FineTuneJobs. Per job, the
  latency from the FineTuneJob created to its PyTorchJob created (**our hop**) and to status Running; the peer
  hop again under the same load; the operator's RSS and CPU seconds; its API writes per job from the audit
  log (on create, on the Pending -> Running change, on a timer resync and on a restart); and the time a
  restarted operator takes to pick up every job (the best of three restarts), against a raw list of the same
  objects (the best of three). While the FineTuneJobs are submitted, a watch in an idle process of its own
  (`bench.watch_probe`) tells the API server's delivery of their events from the operator's own delay.

Timing is fair to all three hops: each is timed from the API server's audit log, from the moment the
create of one object completed to the moment the create of the next completed (the audit's stageTimestamp,
in microseconds; creationTimestamp and managedFields have 1 s resolution). The benchmark's own watches,
which the API server drops when this process falls behind under load, so that their events come late, time
only what the audit cannot tell apart: a status turning Running. The floor counts from the moment its create
call started.

What stands in for what cannot run here: kwok plays the kubelets (no container starts), and a
MutatingAdmissionPolicy puts `kwok.kubetune.io/outcome: run` on every pod of the benchmark namespace, so pods
stay Running instead of ending after a second; FineTuneJobs have no field for pod annotations. Extra kwok
nodes hold the pods (250 pods and 250 fake GPUs each). The operator's progress reads go to 127.0.0.1 on a port
held closed (kwok's pod IPs lead nowhere), so every read fails fast, as for a trainer not yet serving.

Run `python -m bench.operator_scale` (100, 500 and 1000 jobs, then a profiled run of 300: py-spy samples the
operator, and the API server's own pprof profile shows what its CPU goes to in the create wave) or `--quick`
(20 jobs, no profile).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import yaml
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from bench.common import (
    REPO_DIR,
    describe_machine,
    finish_machine,
    markdown_table,
    save_figure,
    summarize,
    write_results,
)
from bench.raw_list import (
    GROUP,
    PLURAL,
    PTJ_GROUP,
    PTJ_PLURAL,
    PTJ_VERSION,
    VERSION,
    list_what_the_operator_lists,
)
from kubetune.api.v1alpha1 import Reason, parse_job
from kubetune.controller.config import OperatorConfig
from kubetune.render import RenderConfig, build_all

NAME = "operator_scale"
SCALES = (100, 500, 1000)
QUICK_SCALES = (20,)
CLUSTER_DIR = Path(
    os.environ.get("KUBETUNE_BENCH_CLUSTER_DIR", Path.home() / ".cache" / "kubetune" / "bench-cluster")
)
HACK_CLUSTER = REPO_DIR / "hack" / "cluster"
KUBECTL = REPO_DIR / ".venv" / "bin" / "kubectl"
KUBETUNE = REPO_DIR / ".venv" / "bin" / "kubetune"
PY_SPY = REPO_DIR / ".venv" / "bin" / "py-spy"
CRD = REPO_DIR / "crds" / "kubetune.io_finetunejobs.yaml"

NAMESPACE = "bench"
BENCH_LABEL_KEY, BENCH_LABEL_VALUE = "kubetune.io/bench", "operator-scale"
BENCH_LABEL = f"{BENCH_LABEL_KEY}={BENCH_LABEL_VALUE}"
"""On every FineTuneJob of the benchmark; the idle watcher selects by it, which tells its watch apart."""
OPERATOR_NAMESPACE = "kubetune-system"
OPERATOR_ACCOUNT = "kubetune-operator"
OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_ACCOUNT}"
PEER_USER = "training-operator"  # the client certificate hack/cluster gives the training operator
BENCH_USER = "kubernetes-admin"  # hack/cluster's admin certificate, which this benchmark submits with
PTJ_JOB_LABEL = "training.kubeflow.org/job-name"  # the training operator's label on the pods it makes

SUBMIT_WORKERS = 16
RESTARTS = 3  # the best of them is set against the best of as many raw lists
PROFILE_JOBS = 300  # enough to show the per-job costs; the profile does not need the largest N
BENCH_NODES = 5
PODS_PER_NODE = 250
PROGRESS_INTERVAL_S = 30.0  # the operator's default: one timer resync per unfinished job every 30 s
QUICK_PROGRESS_INTERVAL_S = 5.0
WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})
RESTART_EVENT_KINDS = ("FineTuneJob", "PyTorchJob", "Pod")

TARGETS = {
    "hopP99Seconds": 0.5,
    "writesPerCreate": 3,
    "writesPerNoopResync": 0,
    "peakRssMiB": 200,
    "restartToRawListRatio": 2.0,
}

AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [
        # The operator's writes with their bodies: which fields a patch touched, which job an Event is about.
        {"level": "Request", "users": [OPERATOR_USER], "verbs": sorted(WRITE_VERBS)},
        {"level": "Metadata", "users": [OPERATOR_USER, PEER_USER]},
        # The benchmark's own creates: where each hop starts.
        {
            "level": "Metadata",
            "users": [BENCH_USER],
            "verbs": ["create"],
            "resources": [
                {"group": GROUP, "resources": [PLURAL]},
                {"group": PTJ_GROUP, "resources": [PTJ_PLURAL]},
            ],
        },
        {"level": "None"},
    ],
}

# Pods of the benchmark namespace stay Running (kwok ends pods of a PyTorchJob after 1 s unless told otherwise).
KEEP_PODS_RUNNING = [
    {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingAdmissionPolicy",
        "metadata": {"name": "bench-pods-keep-running"},
        "spec": {
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE"],
                        "resources": ["pods"],
                    }
                ]
            },
            "failurePolicy": "Fail",
            "reinvocationPolicy": "Never",
            "mutations": [
                {
                    "patchType": "ApplyConfiguration",
                    "applyConfiguration": {
                        "expression": 'Object{metadata: Object.metadata{annotations: {"kwok.kubetune.io/outcome": "run"}}}'
                    },
                }
            ],
        },
    },
    {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingAdmissionPolicyBinding",
        "metadata": {"name": "bench-pods-keep-running"},
        "spec": {
            "policyName": "bench-pods-keep-running",
            "matchResources": {"namespaceSelector": {"matchLabels": {"kubetune.io/bench": "true"}}},
        },
    },
]


def log(message: str) -> None:
    print(f"[{NAME}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# ------------------------------------------------------------------------------------------- the objects


def job_name(index: int) -> str:
    return f"ft-{index:05d}"


def finetunejob(name: str, metrics_port: int) -> dict[str, Any]:
    """A one-pod, one-GPU LoRA job: the smallest shape, so N jobs are N PyTorchJobs and N pods."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {BENCH_LABEL_KEY: BENCH_LABEL_VALUE}},
        "spec": {
            "model": {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
            "dataset": {"source": "s3://bench/support.jsonl", "format": "alpaca"},
            "method": {"type": "lora"},
            "resources": {"nodes": 1, "gpusPerNode": 1, "requests": {"cpu": "1", "memory": "4Gi"}},
            "output": {"uri": f"s3://bench/adapters/{name}/"},
            "metrics": {"port": metrics_port},
        },
    }


def bare_pytorchjob(name: str, metrics_port: int) -> dict[str, Any]:
    """The PyTorchJob the operator renders for the same FineTuneJob, without an owner."""
    manifest = finetunejob(name, metrics_port)
    manifest["metadata"]["uid"] = "00000000-0000-0000-0000-000000000000"
    _configmap, pytorchjob = build_all(parse_job(manifest), RenderConfig())
    pytorchjob["metadata"].pop("ownerReferences", None)
    return pytorchjob


def bench_node(index: int) -> dict[str, Any]:
    """A kwok node with room for PODS_PER_NODE one-GPU pods (hack/kwok/nodes.yaml's shape, scaled up)."""
    resources = {
        "cpu": str(PODS_PER_NODE * 2),
        "memory": f"{PODS_PER_NODE * 8}Gi",
        "pods": str(PODS_PER_NODE),
        "nvidia.com/gpu": str(PODS_PER_NODE),
    }
    name = f"kwok-bench-node-{index}"
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "type": "kwok"},
        },
        "status": {"allocatable": resources, "capacity": resources},
    }


# ------------------------------------------------------------------------------------------- the cluster


@dataclass
class BenchCluster:
    """A control plane of the benchmark's own (hack/cluster under CLUSTER_DIR), started empty for each phase."""

    root: Path = CLUSTER_DIR

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def audit_log(self) -> Path:
        return self.root / "logs" / "audit.log"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def _hack(self, command: str) -> None:
        policy = self.root / "audit-policy.yaml"
        policy.parent.mkdir(parents=True, exist_ok=True)
        policy.write_text(yaml.safe_dump(AUDIT_POLICY, sort_keys=False))
        env = {
            **os.environ,
            "KUBETUNE_CLUSTER_DIR": str(self.root),
            "KUBETUNE_AUDIT_POLICY": str(policy),
            "KUBETUNE_APISERVER_PROFILING": "1",  # the profiled run takes the API server's CPU profile
        }
        result = subprocess.run(
            [str(HACK_CLUSTER), command], env=env, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"hack/cluster {command} failed:\n{result.stderr[-3000:]}")

    def up(self, attempts: int = 3) -> None:
        """A fresh etcd for every phase. `up` picks free ports before the processes bind them, and on a busy
        machine another process can take one in between: then it is simply tried again."""
        for attempt in range(1, attempts + 1):
            self._hack("down")
            try:
                self._hack("up")
                return
            except RuntimeError as error:
                if attempt == attempts:
                    raise
                log(f"{error}\n(trying again)")

    def down(self) -> None:
        self._hack("down")

    def api_client(self, pool: int = 4) -> client.ApiClient:
        configuration = client.Configuration()
        config.load_kube_config(config_file=str(self.kubeconfig), client_configuration=configuration)  # type: ignore[no-untyped-call]
        configuration.connection_pool_maxsize = pool
        return client.ApiClient(configuration)

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        result = subprocess.run(
            [str(KUBECTL), "--kubeconfig", str(self.kubeconfig), *args],
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def apply(self, *items: Mapping[str, Any]) -> None:
        self.kubectl(
            "apply", "--server-side", "--field-manager=kubetune-bench", "-f", "-", stdin=_as_list(items)
        )

    def prepare(self, with_crd: bool) -> None:
        """The benchmark namespace, the pod policy, room on kwok nodes and (for the operator) the CRD."""
        if with_crd:
            self.kubectl("apply", "--server-side", "--field-manager=kubetune-bench", "-f", str(CRD))
            wait_until(
                lambda: self.succeeds(
                    "wait", "--for=condition=Established", "--timeout=5s", "crd/finetunejobs.kubetune.io"
                ),
                60,
                "the CRD Established",
            )
        namespace = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": NAMESPACE, "labels": {"kubetune.io/bench": "true"}},
        }
        self.apply(namespace, *KEEP_PODS_RUNNING, *(bench_node(i) for i in range(BENCH_NODES)))
        self.kubectl("wait", "--for=condition=Ready", "--timeout=60s", "node", "--selector=type=kwok")
        wait_until(
            lambda: self.succeeds("get", "serviceaccount", "default", "-n", NAMESPACE), 60, "default SA"
        )
        if with_crd:
            wait_until(
                lambda: self.succeeds("get", "finetunejobs", "-n", NAMESPACE), 60, "FineTuneJobs served"
            )
        # A policy binding takes effect once the API server's informer has it: probe with a dry-run pod.
        wait_until(self._policy_active, 60, "the pod policy")

    def succeeds(self, *args: str) -> bool:
        try:
            self.kubectl(*args)
        except RuntimeError:
            return False
        return True

    def _policy_active(self) -> bool:
        probe = self.kubectl(
            "run", "policy-probe", "-n", NAMESPACE, "--image=probe", "--dry-run=server", "-o", "json"
        )
        annotations = json.loads(probe)["metadata"].get("annotations") or {}
        return bool(annotations.get("kwok.kubetune.io/outcome") == "run")

    def operator_kubeconfig(self) -> Path:
        """A kubeconfig for a ServiceAccount of its own, so the audit log tells the operator's requests apart.

        It is bound to cluster-admin: what is measured is the operator's traffic, not its RBAC (the chart's
        least-privilege role is tested by the deploy tests).
        """
        self.apply(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NAMESPACE}},
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": OPERATOR_ACCOUNT, "namespace": OPERATOR_NAMESPACE},
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": "kubetune-bench-operator"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": "cluster-admin",
                },
                "subjects": [
                    {"kind": "ServiceAccount", "name": OPERATOR_ACCOUNT, "namespace": OPERATOR_NAMESPACE}
                ],
            },
        )
        token = self.kubectl("create", "token", OPERATOR_ACCOUNT, "-n", OPERATOR_NAMESPACE, "--duration=2h")
        kubeconfig = yaml.safe_load(self.kubeconfig.read_text())
        kubeconfig["users"] = [{"name": OPERATOR_ACCOUNT, "user": {"token": token.strip()}}]
        kubeconfig["contexts"][0]["context"]["user"] = OPERATOR_ACCOUNT
        path = self.root / "operator.kubeconfig"
        path.write_text(json.dumps(kubeconfig))
        path.chmod(0o600)
        return path


def _as_list(items: Sequence[Mapping[str, Any]]) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": list(items)})


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# ------------------------------------------------------------------------------------------- the watches


@dataclass
class Arrivals:
    """When each moment of each job was first seen by this process's watches (time.monotonic)."""

    times: dict[str, dict[str, float]] = field(default_factory=lambda: collections.defaultdict(dict))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def mark(self, moment: str, job: str, at: float) -> None:
        with self.lock:
            self.times[moment].setdefault(job, at)

    def mark_earliest(self, moment: str, job: str, at: float) -> None:
        with self.lock:
            self.times[moment][job] = min(self.times[moment].get(job, math.inf), at)

    def count(self, moment: str) -> int:
        with self.lock:
            return len(self.times[moment])

    def intervals(self, start: str, end: str, jobs: Sequence[str]) -> list[float]:
        """end - start per job that reached both moments."""
        with self.lock:
            first, second = self.times[start], self.times[end]
            return [second[j] - first[j] for j in jobs if j in first and j in second]


def _condition_true(obj: Mapping[str, Any], kind: str) -> bool:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c.get("type") == kind and c.get("status") == "True" for c in conditions)


class Watches:
    """Watches of FineTuneJobs, PyTorchJobs and pods in the benchmark namespace, one thread each."""

    def __init__(self, api: client.ApiClient, arrivals: Arrivals, finetunejobs: bool) -> None:
        self.api, self.arrivals = api, arrivals
        self.watchers: list[watch.Watch] = []
        self.threads: list[threading.Thread] = []
        self.stopped = threading.Event()
        self.restarts = 0
        custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
        streams: list[
            tuple[Callable[..., Any], tuple[Any, ...], Callable[[str, dict[str, Any], float], None]]
        ] = [
            (
                custom.list_namespaced_custom_object,
                (PTJ_GROUP, PTJ_VERSION, NAMESPACE, PTJ_PLURAL),
                self._pytorchjob,
            ),
            (core.list_namespaced_pod, (NAMESPACE,), self._pod),
        ]
        if finetunejobs:
            streams.append(
                (custom.list_namespaced_custom_object, (GROUP, VERSION, NAMESPACE, PLURAL), self._finetunejob)
            )
        for list_call, args, on_event in streams:
            start = list_call(*args, limit=1, _preload_content=False)
            version = json.loads(start.data)["metadata"]["resourceVersion"]
            watcher = watch.Watch()  # type: ignore[no-untyped-call]
            thread = threading.Thread(
                target=self._run, args=(watcher, list_call, args, version, on_event), daemon=True
            )
            self.watchers.append(watcher)
            self.threads.append(thread)
        for thread in self.threads:
            thread.start()

    def _run(
        self,
        watcher: watch.Watch,
        list_call: Callable[..., Any],
        args: tuple[Any, ...],
        version: str,
        on_event: Callable[[str, dict[str, Any], float], None],
    ) -> None:
        """Follows one resource until stopped.

        Under load the API server closes a watcher that falls behind ("watcher close due to
        unresponsiveness"); the watch then resumes from the last resourceVersion it saw, so no event is lost,
        only late. When that version is too old (410 Gone) it lists again. Each restart is counted and
        reported, since events around one arrive late.
        """
        while not self.stopped.is_set():
            try:
                for event in watcher.stream(  # type: ignore[no-untyped-call]
                    list_call, *args, resource_version=version, allow_watch_bookmarks=True, deserialize=False
                ):
                    arrived = time.monotonic()
                    if event.get("type") in ("ADDED", "MODIFIED"):
                        on_event(event["type"], event["object"], arrived)
                return  # stop() ends the stream
            except Exception as error:  # a closed stream, a refused reconnect, the cluster going away
                if self.stopped.is_set():
                    return
                self.restarts += 1
                version = watcher.resource_version or version
                if isinstance(error, ApiException) and error.status == 410:
                    with contextlib.suppress(Exception):
                        listed = json.loads(list_call(*args, _preload_content=False).data)
                        now = time.monotonic()
                        for item in listed["items"]:
                            on_event("ADDED", item, now)
                        version = listed["metadata"]["resourceVersion"]
                time.sleep(0.2)

    def _finetunejob(self, kind: str, obj: dict[str, Any], at: float) -> None:
        name = obj["metadata"]["name"]
        if kind == "ADDED":
            self.arrivals.mark("ftj_created", name, at)
        if (obj.get("status") or {}).get("phase") == "Running":
            self.arrivals.mark("ftj_running", name, at)

    def _pytorchjob(self, kind: str, obj: dict[str, Any], at: float) -> None:
        name = obj["metadata"]["name"]
        if kind == "ADDED":
            self.arrivals.mark("ptj_created", name, at)
        if _condition_true(obj, "Running"):
            self.arrivals.mark("ptj_running", name, at)

    def _pod(self, kind: str, obj: dict[str, Any], at: float) -> None:
        job = (obj["metadata"].get("labels") or {}).get(PTJ_JOB_LABEL)
        if job is None:
            return
        if kind == "ADDED":
            self.arrivals.mark("pod_created", job, at)
        if (obj.get("status") or {}).get("phase") == "Running":
            self.arrivals.mark("pod_running", job, at)

    def stop(self) -> None:
        self.stopped.set()
        for watcher in self.watchers:
            watcher.stop()  # type: ignore[no-untyped-call]


# ------------------------------------------------------------------------------------------- submitting


@dataclass
class Submission:
    started: dict[str, float]
    finished: dict[str, float]  # when each create call returned: the object existed by then
    seconds: float
    errors: list[str]

    def call_seconds(self) -> list[float]:
        """Each create call's round trip: the API server's write latency at that moment, as a client sees it."""
        return [self.finished[name] - self.started[name] for name in self.finished]


def submit_all(names: Sequence[str], create: Callable[[str], object]) -> Submission:
    """Create every object at once from SUBMIT_WORKERS threads; each create's start time is kept."""
    started: dict[str, float] = {}
    finished: dict[str, float] = {}
    errors: list[str] = []

    def one(name: str) -> None:
        started[name] = time.monotonic()
        try:
            create(name)
            finished[name] = time.monotonic()
        except ApiException as error:
            errors.append(f"{name}: {error.status} {error.reason}")

    begin = time.monotonic()
    with ThreadPoolExecutor(SUBMIT_WORKERS) as pool:
        list(pool.map(one, names))
    return Submission(started=started, finished=finished, seconds=time.monotonic() - begin, errors=errors)


def wait_for_count(arrivals: Arrivals, moment: str, count: int, deadline: float) -> bool:
    """Waits until `count` jobs reached `moment`, or the phase's deadline passed (then says how many did)."""
    timeout = max(0.5, deadline - time.monotonic())
    try:
        wait_until(lambda: arrivals.count(moment) >= count, timeout, f"{count} x {moment}", interval=0.25)
    except TimeoutError:
        log(f"only {arrivals.count(moment)}/{count} reached {moment} within {timeout:.0f} s")
        return False
    return True


class WatchProbe:
    """`bench.watch_probe` in its own process: when each FineTuneJob's ADDED event reached an idle watcher."""

    def __init__(self, kubeconfig: Path, output: Path) -> None:
        self.output = output
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "bench.watch_probe", str(kubeconfig), NAMESPACE, BENCH_LABEL, str(output)],
            cwd=REPO_DIR,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.popen.stdout is not None
        if self.popen.stdout.readline().strip() != "ready":
            self.popen.kill()
            raise RuntimeError(f"the watch probe did not start (exit code {self.popen.wait()})")

    def stop(self) -> dict[str, float]:
        """Wall-clock arrival of each job's ADDED event."""
        self.popen.terminate()
        self.popen.wait(timeout=30)
        return dict(json.loads(self.output.read_text())["seen"])


class ApiServerProfile:
    """The API server's own CPU profile (Go's pprof) over the next `seconds`, fetched with the admin kubeconfig."""

    def __init__(self, cluster: BenchCluster, seconds: int, output: Path) -> None:
        self.output, self.seconds = output, seconds
        self.began = time.time()
        with output.open("wb") as sink:
            self.popen = subprocess.Popen(
                [
                    str(KUBECTL),
                    "--kubeconfig",
                    str(cluster.kubeconfig),
                    "get",
                    "--raw",
                    f"/debug/pprof/profile?seconds={seconds}",
                ],
                stdout=sink,
                stderr=subprocess.PIPE,
            )

    def wait(self) -> Window:
        """The wall-clock window profiled, once the profile is written."""
        _, error = self.popen.communicate(timeout=self.seconds + 60)
        if self.popen.returncode != 0:
            raise RuntimeError(f"the API server's profile failed: {error.decode(errors='replace').strip()}")
        return Window(self.began, self.began + self.seconds)


def apiserver_profile_seconds(jobs: int) -> int:
    """Long enough to cover the submission of `jobs` FineTuneJobs (about 30 per second here) and the hops."""
    return max(10, math.ceil(jobs / 25))


# ------------------------------------------------------------------------------------------ the operator


@dataclass
class Progress:
    """How far a (re)started operator has got, by its own metrics."""

    reconciles: float = 0.0
    events: collections.Counter[str] = field(default_factory=collections.Counter)
    queued: float = 0.0


@dataclass
class Sample:
    at: float
    rss_mib: float
    cpu_seconds: float


class OperatorProcess:
    """`kubetune operator` in its own process (optionally under py-spy), sampled for RSS and CPU time."""

    def __init__(self, kubeconfig: Path, log_path: Path, metrics_port: int, progress_interval: float) -> None:
        self.kubeconfig, self.log_path = kubeconfig, log_path
        self.metrics_port, self.health_port = metrics_port, free_port()
        self.progress_interval = progress_interval
        self.popen: subprocess.Popen[bytes] | None = None
        self.process: psutil.Process | None = None
        self.samples: list[Sample] = []
        self.peak_rss_mib = 0.0
        self.started_at = 0.0
        self._stop_sampling = threading.Event()
        self._sampler: threading.Thread | None = None

    def start(self, profile_to: Path | None = None) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "KUBETUNE_METRICS_PORT": str(self.metrics_port),
            "KUBETUNE_HEALTH_PORT": str(self.health_port),
            "KUBETUNE_PROGRESS_INTERVAL_SECONDS": str(self.progress_interval),
            "KUBETUNE_PROGRESS_HOST": "127.0.0.1",
        }
        argv = [str(KUBETUNE), "operator"]
        if profile_to is not None:
            # --gil: samples of the thread holding the GIL, i.e. where the operator's CPU time goes (threads
            # waiting on the API server would otherwise dominate).
            argv = [str(PY_SPY), "record", "--format", "raw", "--rate", "50", "--nonblocking", "--gil",
                    "--output", str(profile_to), "--", *argv]  # fmt: skip
        self.started_at = time.monotonic()
        with self.log_path.open("ab") as out:
            self.popen = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        root = psutil.Process(self.popen.pid)
        if profile_to is not None:
            wait_until(lambda: bool(root.children()), 30, "the profiled operator process")
            self.process = root.children()[0]
        else:
            self.process = root
        self._stop_sampling.clear()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        assert self.process is not None
        while not self._stop_sampling.wait(0.25):
            with contextlib.suppress(psutil.Error):
                cpu = self.process.cpu_times()
                rss = self.process.memory_info().rss / 2**20
                self.samples.append(Sample(time.monotonic(), rss, cpu.user + cpu.system))
                self.peak_rss_mib = max(self.peak_rss_mib, _peak_rss_mib(self.process.pid))

    def wait_ready(self, timeout: float = 60) -> None:
        def healthy() -> bool:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=1) as response,
            ):
                return bool(response.status == 200)
            return False

        wait_until(healthy, timeout, "the operator's /healthz")

    def cpu_seconds(self) -> float:
        return self.samples[-1].cpu_seconds if self.samples else 0.0

    def _metric_families(self) -> list[Metric]:
        """One scrape of the operator's /metrics, parsed."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as response:
            return list(text_string_to_metric_families(response.read().decode()))

    def progress(self) -> Progress:
        """Reconciles, watch events by kind and the queue's depth, from the operator's /metrics."""
        found = Progress()
        for family in self._metric_families():
            for sample in family.samples:
                if family.name == "kubetune_operator_reconciles" and sample.name.endswith("_total"):
                    found.reconciles += sample.value
                elif family.name == "kubetune_operator_watch_events" and sample.name.endswith("_total"):
                    found.events[sample.labels["kind"]] += int(sample.value)
                elif family.name == "kubetune_operator_queue_depth":
                    found.queued = sample.value
        return found

    def queue_wait(self) -> dict[str, dict[str, float | None]]:
        """Per lane of the operator's work queue: how many keys workers took and their mean wait, from its
        own kubetune_operator_queue_wait_seconds histogram."""
        sums: dict[str, dict[str, float]] = collections.defaultdict(dict)
        for family in self._metric_families():
            if family.name != "kubetune_operator_queue_wait_seconds":
                continue
            for sample in family.samples:
                if sample.name.endswith(("_sum", "_count")):
                    sums[sample.labels["lane"]][sample.name.rsplit("_", 1)[1]] = sample.value
        return {
            lane: {
                "count": found.get("count", 0.0),
                "meanSeconds": round(found["sum"] / found["count"], 4) if found.get("count") else None,
            }
            for lane, found in sums.items()
        }

    def stop(self) -> None:
        if self.popen is None or self.process is None:
            return
        with contextlib.suppress(psutil.Error):
            self.peak_rss_mib = max(self.peak_rss_mib, _peak_rss_mib(self.process.pid))
            cpu = self.process.cpu_times()
            self.samples.append(
                Sample(
                    time.monotonic(), self.samples[-1].rss_mib if self.samples else 0, cpu.user + cpu.system
                )
            )
        self._stop_sampling.set()
        with contextlib.suppress(psutil.Error):
            self.process.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(psutil.Error):
                self.process.kill()
            self.popen.kill()
            self.popen.wait()
        self.popen = None


def cpu_seconds_by_process(cluster: BenchCluster, operator: OperatorProcess) -> dict[str, float]:
    """CPU seconds used so far by each process of the control plane (as hack/cluster recorded them), the
    operator and this benchmark: where a machine's cores went over a span is the difference of two reads."""
    pids = {path.stem: int(path.read_text()) for path in sorted((cluster.root / "run").glob("*.pid"))}
    pids |= {"kubetune operator": operator.process.pid if operator.process else -1, "benchmark": os.getpid()}
    used: dict[str, float] = {}
    for name, pid in pids.items():
        with contextlib.suppress(psutil.Error, ValueError):
            times = psutil.Process(pid).cpu_times()
            used[name] = times.user + times.system
    return used


def _peak_rss_mib(pid: int) -> float:
    """VmHWM: the kernel's own high-water mark of the resident set, so no peak is missed between samples."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


# ---------------------------------------------------------------------------------------------- audit log


@dataclass(frozen=True)
class Request:
    """One audited API request (stage ResponseComplete)."""

    at: float  # when the API server received it: wall clock, seconds since the epoch
    done: float  # when it answered (an object created is stored by then)
    user: str
    verb: str
    resource: str
    subresource: str
    name: str
    code: int
    body: Any  # the request's body: an object, or a JSON patch's list of operations

    @property
    def write(self) -> bool:
        return self.verb in WRITE_VERBS

    @property
    def kind(self) -> str:
        """What the request did: `create configmaps`, `patch finetunejobs/status`, `patch finetunejobs [/metadata/finalizers]`."""
        target = self.resource + (f"/{self.subresource}" if self.subresource else "")
        text = f"{self.verb} {target}"
        if self.verb == "patch" and not self.subresource:
            text += f" [{', '.join(patched_fields(self.body))}]"
        if self.subresource == "status" and NODE_LOST in condition_reasons(self.body):
            text += f" (to {NODE_LOST})"
        return text


NODE_LOST = Reason.NODE_LOST.value
"""The reason a job's conditions take while a node of its pods is NotReady: such writes answer a change (kwok
not renewing a node's lease in time under load), not a no-op."""


def condition_reasons(body: Any) -> set[str]:
    """The reasons of the conditions a status patch sets."""
    status = (body.get("status") if isinstance(body, Mapping) else None) or {}
    return {str(c.get("reason")) for c in status.get("conditions") or [] if isinstance(c, Mapping)}


def patched_fields(body: Any) -> list[str]:
    """The fields a patch touches, two levels deep: a JSON patch's paths, or a merge patch's keys."""
    if isinstance(body, list):
        paths = {"/".join(op.get("path", "").split("/")[:3]) for op in body if op.get("op") != "test"}
        return sorted(paths)
    if isinstance(body, Mapping):
        fields = []
        for key, value in body.items():
            if isinstance(value, Mapping) and key == "metadata":
                fields += [f"/{key}/{inner}" for inner in value if inner != "resourceVersion"]
            else:
                fields.append(f"/{key}")
        return sorted(fields)
    return []


def read_audit(path: Path, users: Sequence[str]) -> list[Request]:
    requests: list[Request] = []
    if not path.exists():
        return requests
    with path.open() as lines:
        for line in lines:
            event = json.loads(line)
            user = event["user"]["username"]
            if event.get("stage") != "ResponseComplete" or user not in users:
                continue
            ref = event.get("objectRef") or {}
            requests.append(
                Request(
                    at=datetime.fromisoformat(event["requestReceivedTimestamp"]).timestamp(),
                    done=datetime.fromisoformat(event["stageTimestamp"]).timestamp(),
                    user=user,
                    verb=event["verb"],
                    resource=ref.get("resource", ""),
                    subresource=ref.get("subresource", ""),
                    name=ref.get("name", ""),
                    code=int((event.get("responseStatus") or {}).get("code", 0)),
                    body=event.get("requestObject") or {},
                )
            )
    return requests


def owning_job(request: Request, jobs: set[str]) -> str | None:
    """The benchmark job a request was about: by object name, a child's name, or an Event's subject."""
    if request.resource == "events":
        body = request.body if isinstance(request.body, Mapping) else {}
        subject = (body.get("involvedObject") or {}).get("name") or request.name.split(".", 1)[0]
        return subject if subject in jobs else _strip_replica(subject, jobs)
    if request.name in jobs:
        return request.name
    if request.resource == "configmaps" and request.name.removesuffix("-spec") in jobs:
        return request.name.removesuffix("-spec")
    return _strip_replica(request.name, jobs)


CREATED_MOMENTS = {PLURAL: "ftj_created", PTJ_PLURAL: "ptj_created", "pods": "pod_created"}


def created_in_audit(requests: Sequence[Request], jobs: Sequence[str]) -> Arrivals:
    """When the API server finished creating each job's FineTuneJob, PyTorchJob and first pod (wall clock).

    The hops timed where they happen: a watch event reaches the benchmark later than the object was created,
    and much later around a watch the API server closed for falling behind.
    """
    names = set(jobs)
    created = Arrivals()
    for request in requests:
        moment = CREATED_MOMENTS.get(request.resource)
        if request.verb != "create" or request.code >= 300 or request.subresource or moment is None:
            continue
        if (job := owning_job(request, names)) is not None:
            created.mark_earliest(moment, job, request.done)
    return created


HOP_SEGMENTS = (
    (
        "toFirstWrite",
        "FineTuneJob created → our ConfigMap create received: the watch event, our queue, rendering",
    ),
    ("configMapCreate", "the API server creates the ConfigMap"),
    ("betweenWrites", "ConfigMap answered → our PyTorchJob create received"),
    ("pyTorchJobCreate", "the API server creates the PyTorchJob (with the training operator's webhook)"),
)
"""Our hop cut at the operator's two creates, which add up to it; each end is an audit timestamp."""


def hop_segments(
    requests: Sequence[Request], jobs: Sequence[str], created: Arrivals
) -> dict[str, list[float]]:
    """Per job that went through the whole hop, the seconds spent in each of HOP_SEGMENTS; `created` is
    `created_in_audit` of the same requests."""
    names = set(jobs)
    job_created = created.times["ftj_created"]
    children: dict[str, dict[str, Request]] = collections.defaultdict(dict)
    for request in requests:
        if request.user != OPERATOR_USER or request.verb != "create" or request.code >= 300:
            continue
        if request.resource in ("configmaps", PTJ_PLURAL) and (job := owning_job(request, names)) is not None:
            children[job].setdefault(request.resource, request)
    segments: dict[str, list[float]] = {key: [] for key, _ in HOP_SEGMENTS}
    for job, made in children.items():
        config_map, pytorchjob = made.get("configmaps"), made.get(PTJ_PLURAL)
        if job not in job_created or config_map is None or pytorchjob is None:
            continue
        for (key, _), seconds in zip(
            HOP_SEGMENTS,
            (
                config_map.at - job_created[job],
                config_map.done - config_map.at,
                pytorchjob.at - config_map.done,
                pytorchjob.done - pytorchjob.at,
            ),
            strict=True,
        ):
            segments[key].append(seconds)
    return segments


def _strip_replica(name: str, jobs: set[str]) -> str | None:
    """`<job>-master-0` / `<job>-worker-3` (pods and services of a PyTorchJob) -> `<job>`."""
    for replica in ("-master-", "-worker-"):
        if replica in name:
            base = name.rsplit(replica, 1)[0]
            if base in jobs:
                return base
    return None


def _sets_phase(request: Request, phase: str) -> bool:
    body = request.body if isinstance(request.body, Mapping) else {}
    return request.subresource == "status" and (body.get("status") or {}).get("phase") == phase


@dataclass
class Window:
    """A span of wall-clock time (audit timestamps are wall clock)."""

    start: float
    end: float

    def __contains__(self, at: float) -> bool:
        return self.start <= at < self.end


def writes_summary(requests: Sequence[Request], jobs: int) -> dict[str, Any]:
    """Write requests per job, how many the API server refused (e.g. 409 Conflict), and what they were."""
    writes = [r for r in requests if r.write]
    by_kind = collections.Counter(r.kind for r in writes)
    refused = sum(1 for r in writes if r.code >= 300)
    return {
        "perJob": round(len(writes) / jobs, 3) if jobs else None,
        "refusedPerJob": round(refused / jobs, 3) if jobs else None,
        "total": len(writes),
        "byKind": {kind: round(count / jobs, 3) for kind, count in by_kind.most_common()} if jobs else {},
    }


def attribute_writes(
    requests: Sequence[Request], jobs: Sequence[str], steady: Window, restart: Window
) -> dict[str, Any]:
    """The operator's writes per job, split by what caused them.

    - create: a job's writes before the status patch that makes it Running;
    - statusChange: from that patch on, until the steady window (Pending -> Running, plus any timer ticks);
    - resync: in the steady window, one full timer interval when nothing about the jobs changes;
    - restart: from the restarted operator's start until it has picked up every job.
    """
    names = set(jobs)
    per_job: dict[str, list[Request]] = collections.defaultdict(list)
    unattributed: list[Request] = []
    for request in sorted(requests, key=lambda r: r.at):
        if not request.write or request.user != OPERATOR_USER:
            continue
        job = owning_job(request, names)
        if job is None:
            unattributed.append(request)
        else:
            per_job[job].append(request)
    buckets: dict[str, list[Request]] = {"create": [], "statusChange": [], "resync": [], "restart": []}
    for writes in per_job.values():
        running_at = next((r.at for r in writes if r.code < 300 and _sets_phase(r, "Running")), math.inf)
        for request in writes:
            if request.at in steady:
                buckets["resync"].append(request)
            elif request.at in restart:
                buckets["restart"].append(request)
            elif request.at < running_at:
                buckets["create"].append(request)
            elif request.at < steady.start:
                buckets["statusChange"].append(request)
    summary: dict[str, Any] = {bucket: writes_summary(found, len(jobs)) for bucket, found in buckets.items()}
    summary["unattributed"] = collections.Counter(r.kind for r in unattributed).most_common(10)
    return summary


def reads_summary(requests: Sequence[Request], window: Window, jobs: int) -> dict[str, Any]:
    reads = [
        r
        for r in requests
        if r.user == OPERATOR_USER and not r.write and r.at in window and r.verb != "watch"
    ]
    by_kind = collections.Counter(f"{r.verb} {r.resource}" for r in reads)
    return {
        "perJob": round(len(reads) / jobs, 3),
        "byKind": {kind: round(count / jobs, 3) for kind, count in by_kind.most_common()},
    }


def peer_writes(requests: Sequence[Request], jobs: Sequence[str], window: Window) -> dict[str, Any]:
    """The training operator's writes per PyTorchJob while the jobs were created and started."""
    names = set(jobs)
    mine = [
        r
        for r in requests
        if r.user == PEER_USER and r.write and r.at in window and owning_job(r, names) is not None
    ]
    return writes_summary(mine, len(jobs))


# ------------------------------------------------------------------------------------------- the phases


def _percent_complete(count: int, jobs: int) -> float:
    return round(100 * count / jobs, 1) if jobs else 0.0


def run_floor(cluster: BenchCluster, jobs: int, metrics_port: int, timeout: float) -> dict[str, Any]:
    """N bare PyTorchJobs created directly: the cost of a burst on the API server, and the peer hop alone."""
    cluster.up()
    try:
        api = cluster.api_client(pool=SUBMIT_WORKERS * 2)
        cluster.prepare(with_crd=False)
        arrivals = Arrivals()
        watches = Watches(cluster.api_client(), arrivals, finetunejobs=False)
        custom = client.CustomObjectsApi(api)
        names = [job_name(i) for i in range(jobs)]
        bodies = {name: bare_pytorchjob(name, metrics_port) for name in names}
        log(f"floor: creating {jobs} PyTorchJobs")
        submission = submit_all(
            names,
            lambda name: custom.create_namespaced_custom_object(
                PTJ_GROUP, PTJ_VERSION, NAMESPACE, PTJ_PLURAL, bodies[name], _preload_content=False
            ),
        )
        deadline = time.monotonic() + timeout
        for moment in ("ptj_created", "pod_created", "ptj_running"):
            wait_for_count(arrivals, moment, jobs, deadline)
        watches.stop()
        watch_restarts = watches.restarts
        for name, at in submission.finished.items():  # it existed once its create call returned
            arrivals.mark_earliest("ptj_created", name, at)
        submit_to_created = [
            arrivals.times["ptj_created"][n] - submission.started[n]
            for n in names
            if n in arrivals.times["ptj_created"]
        ]
        first = min(submission.started.values())
        result: dict[str, Any] = {
            "submitSeconds": round(submission.seconds, 3),
            "submitErrors": submission.errors[:10],
            "latency": {
                "submitToPyTorchJob": summarize(submit_to_created),
                "createCall": summarize(submission.call_seconds()),
                "pyTorchJobToRunning": summarize(arrivals.intervals("ptj_created", "ptj_running", names)),
                "watched": {
                    "pyTorchJobToPod": summarize(arrivals.intervals("ptj_created", "pod_created", names))
                },
            },
            "completePercent": {
                m: _percent_complete(arrivals.count(m), jobs)
                for m in ("ptj_created", "pod_created", "ptj_running")
            },
            "timeline": _timeline(arrivals, first, ("ptj_created", "pod_created", "ptj_running")),
            "watchRestarts": watch_restarts,
        }
    finally:
        cluster.down()
    created = created_in_audit(read_audit(cluster.audit_log, (BENCH_USER, PEER_USER)), names)
    result["latency"]["pyTorchJobToPod"] = summarize(created.intervals("ptj_created", "pod_created", names))
    return result


def run_operator(
    cluster: BenchCluster,
    jobs: int,
    metrics_port: int,
    timeout: float,
    progress_interval: float,
    profile_dir: Path | None = None,
) -> dict[str, Any]:
    """N FineTuneJobs through `kubetune operator`: latency, resources, API writes, a resync and a restart."""
    cluster.up()
    operators: list[OperatorProcess] = []
    probes: list[WatchProbe] = []
    try:
        api = cluster.api_client(pool=SUBMIT_WORKERS * 2)
        cluster.prepare(with_crd=True)
        kubeconfig = cluster.operator_kubeconfig()
        operator = OperatorProcess(
            kubeconfig, cluster.logs / "operator-1.log", free_port(), progress_interval
        )
        operators.append(operator)
        operator.start(profile_to=profile_dir / "wave.txt" if profile_dir else None)
        operator.wait_ready()

        arrivals = Arrivals()
        watches = Watches(cluster.api_client(), arrivals, finetunejobs=True)
        probe = WatchProbe(cluster.kubeconfig, cluster.logs / "watch-probe.json")
        probes.append(probe)
        custom = client.CustomObjectsApi(api)
        names = [job_name(i) for i in range(jobs)]
        bodies = {name: finetunejob(name, metrics_port) for name in names}
        apiserver_profile = (
            ApiServerProfile(cluster, apiserver_profile_seconds(jobs), profile_dir / "apiserver-wave.pprof")
            if profile_dir
            else None
        )
        log(f"operator: creating {jobs} FineTuneJobs")
        wave_start_wall, cpu_before = time.time(), operator.cpu_seconds()
        cores_before = cpu_seconds_by_process(cluster, operator)
        submission = submit_all(
            names,
            lambda name: custom.create_namespaced_custom_object(
                GROUP, VERSION, NAMESPACE, PLURAL, bodies[name], _preload_content=False
            ),
        )
        cores_after = cpu_seconds_by_process(cluster, operator)
        deadline = time.monotonic() + timeout
        for moment in ("ftj_created", "ptj_created", "pod_created", "ftj_running"):
            wait_for_count(arrivals, moment, jobs, deadline)
        wave_seconds = time.monotonic() - min(submission.started.values())
        time.sleep(3)  # trailing pod and PyTorchJob events of the last jobs
        wave_cpu = operator.cpu_seconds() - cpu_before
        wave_peak = operator.peak_rss_mib
        queue_wait = operator.queue_wait()
        watches.stop()
        probe_seen = probe.stop()
        # A FineTuneJob exists once its create call returned, even if the watch event came later.
        for name, at in submission.finished.items():
            arrivals.mark_earliest("ftj_created", name, at)
        first = min(submission.started.values())
        result: dict[str, Any] = {
            "submitSeconds": round(submission.seconds, 3),
            "submitErrors": submission.errors[:10],
            "waveSeconds": round(wave_seconds, 3),
            "latency": {
                "createToRunning": summarize(arrivals.intervals("ftj_created", "ftj_running", names)),
                "createCall": summarize(submission.call_seconds()),
                "submitToPyTorchJob": summarize(
                    [
                        arrivals.times["ptj_created"][n] - submission.started[n]
                        for n in names
                        if n in arrivals.times["ptj_created"]
                    ]
                ),
                "watched": {
                    "createToPyTorchJob": summarize(arrivals.intervals("ftj_created", "ptj_created", names)),
                    "pyTorchJobToPod": summarize(arrivals.intervals("ptj_created", "pod_created", names)),
                },
            },
            "completePercent": {
                m: _percent_complete(arrivals.count(m), jobs)
                for m in ("ftj_created", "ptj_created", "pod_created", "ftj_running")
            },
            "timeline": _timeline(
                arrivals, first, ("ftj_created", "ptj_created", "pod_created", "ftj_running")
            ),
            "watchRestarts": watches.restarts,
            "queueWait": queue_wait,
            # Cores each process kept busy while the FineTuneJobs were submitted, when the hops are made.
            "submitCores": {
                name: round((cores_after[name] - cores_before[name]) / submission.seconds, 2)
                for name in sorted(cores_after, key=lambda n: cores_before.get(n, 0.0) - cores_after[n])
                if name in cores_before
            },
        }
        wave = Window(wave_start_wall, time.time())
        profiled = apiserver_profile.wait() if apiserver_profile else None

        if profile_dir is not None:
            # The profiled run measures where the time goes, not the steady state: a restart is enough.
            steady = Window(wave.end, wave.end)
        else:
            log(f"operator: steady window of {progress_interval + 5:.0f} s (one timer interval)")
            steady_start, cpu_before = time.time(), operator.cpu_seconds()
            time.sleep(progress_interval + 5)
            steady = Window(steady_start, time.time())
            result["steadyCpuSeconds"] = round(operator.cpu_seconds() - cpu_before, 3)
        operator.stop()

        restarts: list[dict[str, Any]] = []
        windows: list[Window] = []
        for attempt in range(1 if profile_dir else RESTARTS):
            log(f"operator: restart {attempt + 1}")
            restarted = OperatorProcess(
                kubeconfig, cluster.logs / f"operator-{attempt + 2}.log", free_port(), progress_interval
            )
            operators.append(restarted)
            began = time.time()
            restarted.start(profile_to=profile_dir / "restart.txt" if profile_dir else None)
            settled = _wait_settled(restarted, jobs, timeout)
            windows.append(Window(began, time.time()))
            restarts.append(
                {
                    "settleSeconds": round(settled, 3) if settled is not None else None,
                    "cpuSeconds": round(restarted.cpu_seconds(), 3),
                    "peakRssMiB": round(restarted.peak_rss_mib, 1),
                }
            )
            restarted.stop()
        raw_list = _raw_list_seconds(api)
        # The best restart against the best raw list: each is the machine's best case.
        best = min(restarts, key=_settled_or_never)
        result["restart"] = best | {
            "each": restarts,
            "rawListSeconds": round(raw_list, 4),
            "kubectlListSeconds": round(_kubectl_list_seconds(cluster), 4),
            "freshProcessListSeconds": round(_fresh_process_list_seconds(cluster), 4),
            "ratioToRawList": (
                round(best["settleSeconds"] / raw_list, 1) if best["settleSeconds"] is not None else None
            ),
        }
        result["process"] = {
            "peakRssMiB": round(max(wave_peak, operator.peak_rss_mib), 1),
            "waveCpuSeconds": round(wave_cpu, 3),
            "rssSeries": _series(operator, first_at=first),
        }
    finally:
        for process in operators:
            process.stop()
        for probe in probes:
            probe.popen.kill()  # gone already unless the wave failed
        cluster.down()

    apiserver_log = cluster.logs / "kube-apiserver.log"
    log_lines = apiserver_log.read_text(errors="replace").splitlines() if apiserver_log.exists() else []
    result["slowWatchersClosed"] = slow_watchers_closed(log_lines)
    result["watchCacheBacklog"] = watch_cache_backlog(log_lines)
    requests = read_audit(cluster.audit_log, (OPERATOR_USER, PEER_USER, BENCH_USER))
    created = created_in_audit(requests, names)
    result["latency"] |= {
        "createToPyTorchJob": summarize(created.intervals("ftj_created", "ptj_created", names)),
        "pyTorchJobToPod": summarize(created.intervals("ptj_created", "pod_created", names)),
    }
    job_created = created.times["ftj_created"]
    result["latency"]["toIdleWatcher"] = summarize(
        [at - job_created[name] for name, at in probe_seen.items() if name in job_created]
    )
    result["hopSegments"] = {
        key: summarize(values) for key, values in hop_segments(requests, names, created).items()
    }
    result["writes"] = attribute_writes(requests, names, steady, Window(windows[0].start, windows[-1].end))
    result["reads"] = {
        "wave": reads_summary(requests, wave, jobs),
        "restart": reads_summary(requests, windows[0], jobs),
    }
    for restart, window in zip(result["restart"]["each"], windows, strict=True):
        first_request = min(
            (r.at for r in requests if r.user == OPERATOR_USER and r.at in window), default=None
        )
        if first_request is not None and restart["settleSeconds"] is not None:
            after = restart["settleSeconds"] - (first_request - window.start)
            restart["settleAfterFirstRequestSeconds"] = round(after, 3)
    # `best` is one of `each`, whose first request was found just above.
    result["restart"]["settleAfterFirstRequestSeconds"] = best.get("settleAfterFirstRequestSeconds")
    result["peerWrites"] = peer_writes(requests, names, wave)
    if profiled is not None:
        result["apiServerProfiled"] = {
            "seconds": round(profiled.end - profiled.start, 1),
            "operatorStatusPatches": sum(
                1
                for r in requests
                if r.user == OPERATOR_USER
                and r.verb == "patch"
                and r.subresource == "status"
                and r.done in profiled
            ),
        }
    return result


def slow_watchers_closed(apiserver_log: Iterable[str]) -> dict[str, int]:
    """Watches the API server closed because their client fell behind, by watched prefix and label selector.

    The benchmark watches the namespace (`/<resource>/bench/`), the idle watcher the namespace by the
    benchmark's label (`/<resource>/bench/ [kubetune.io/bench=operator-scale]`), the operator and the
    training operator the whole cluster (`/<resource>/`).
    """
    closed: collections.Counter[str] = collections.Counter()
    for line in apiserver_log:
        if "watcher close due to unresponsiveness" in line and 'key: "' in line:
            key = line.split('key: "', 1)[1].split('"', 1)[0]
            labels = line.split('labels: "', 1)[1].split('"', 1)[0] if 'labels: "' in line else ""
            closed[f"{key} [{labels}]" if labels else key] += 1
    return dict(closed)


def watch_cache_backlog(apiserver_log: Iterable[str]) -> dict[str, int]:
    """The most events each of the API server's watch caches held queued, received from etcd and not yet
    dispatched to any watcher (it logs each new high: `cacher (pods): 12 objects queued in incoming channel.`).
    Events queued there reach every watcher late, however fast it reads."""
    most: dict[str, int] = {}
    for line in apiserver_log:
        if "objects queued in incoming channel" in line and "cacher (" in line:
            resource, rest = line.split("cacher (", 1)[1].split("): ", 1)
            with contextlib.suppress(ValueError):
                most[resource] = max(most.get(resource, 0), int(rest.split(" ", 1)[0]))
    return dict(sorted(most.items(), key=lambda item: -item[1]))


def _settled_or_never(restart: Mapping[str, Any]) -> float:
    settled = restart["settleSeconds"]
    return math.inf if settled is None else float(settled)


def _wait_settled(operator: OperatorProcess, jobs: int, timeout: float) -> float | None:
    """Seconds from the process start until the initial lists of FineTuneJobs, PyTorchJobs and pods have
    arrived, every job has been reconciled, and nothing waits in the queue."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            seen = operator.progress()
            if (
                all(seen.events[kind] >= jobs for kind in RESTART_EVENT_KINDS)
                and seen.reconciles >= jobs
                and seen.queued == 0
            ):
                return time.monotonic() - operator.started_at
        time.sleep(0.1)
    log(f"the restarted operator did not settle within {timeout:.0f} s")
    return None


def _raw_list_seconds(api: client.ApiClient, repeats: int = 3) -> float:
    """The best of a few lists of what the operator lists on start: FineTuneJobs, our PyTorchJobs and pods."""
    best = math.inf
    for _ in range(repeats):
        started = time.monotonic()
        list_what_the_operator_lists(api)
        best = min(best, time.monotonic() - started)
    return best


def _fresh_process_list_seconds(cluster: BenchCluster, repeats: int = 3) -> float:
    """The best of a few runs of the raw list in a new Python process, from its start to its exit: what a
    restarted operator does before it can reconcile anything, with nothing else (interpreter, client
    imports, the same three lists)."""
    best = math.inf
    for _ in range(repeats):
        started = time.monotonic()
        subprocess.run(
            [sys.executable, "-m", "bench.raw_list", str(cluster.kubeconfig)],
            cwd=REPO_DIR,
            check=True,
            capture_output=True,
        )
        best = min(best, time.monotonic() - started)
    return best


def _kubectl_list_seconds(cluster: BenchCluster, repeats: int = 3) -> float:
    """The best of a few `kubectl get` of the same objects: a fresh process that lists, as a restart is."""
    best = math.inf
    for _ in range(repeats):
        started = time.monotonic()
        cluster.kubectl("get", "finetunejobs,pytorchjobs,pods", "--all-namespaces", "-o", "json")
        best = min(best, time.monotonic() - started)
    return best


def _timeline(arrivals: Arrivals, first: float, moments: Sequence[str]) -> dict[str, list[float]]:
    """Sorted arrival times (s after the first submit) per moment, thinned to at most 200 points for plots."""
    timeline: dict[str, list[float]] = {}
    for moment in moments:
        times = sorted(at - first for at in arrivals.times[moment].values())
        step = max(1, len(times) // 200)
        thinned = times[::step]
        if times and thinned[-1] != times[-1]:
            thinned.append(times[-1])
        timeline[moment] = [round(t, 3) for t in thinned]
    return timeline


def _series(operator: OperatorProcess, first_at: float) -> dict[str, list[float]]:
    samples = operator.samples[:: max(1, len(operator.samples) // 300)]
    return {
        "seconds": [round(s.at - first_at, 2) for s in samples],
        "rssMiB": [round(s.rss_mib, 1) for s in samples],
        "cpuSeconds": [round(s.cpu_seconds, 2) for s in samples],
    }


# -------------------------------------------------------------------------------------------- profiling


CATEGORIES = (
    ("JSON encoding and decoding", ("json/", "/json.py", "sanitize_for_serialization", "__deserialize")),
    ("TLS and HTTP (urllib3, http.client, ssl)", ("ssl.py", "urllib3/", "http/client.py", "socket.py")),
    ("pydantic validation", ("pydantic/", "pydantic_core")),
    ("logging", ("logging/",)),
    ("YAML", ("yaml/",)),
    ("asyncio", ("asyncio/",)),
)


def summarize_profile(path: Path, top: int = 12) -> dict[str, Any]:
    """py-spy's raw (collapsed) stacks -> where the time went: categories, our functions, hottest leaves."""
    stacks: list[tuple[list[str], int]] = []
    for line in path.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        if stack and number.isdigit():
            stacks.append((stack.split(";"), int(number)))
    total = sum(count for _, count in stacks) or 1
    categories: collections.Counter[str] = collections.Counter()
    ours: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        leaves[_frame_name(frames[-1])] += count
        categories[_category(frames)] += count
        seen = {_frame_name(f) for f in frames if "kubetune/" in f and not _entry_point(f)}
        for name in seen:
            ours[name] += count

    def share(counter: collections.Counter[str]) -> list[list[Any]]:
        return [[name, round(100 * count / total, 1)] for name, count in counter.most_common(top)]

    return {
        "samples": total,
        "categories": share(categories),
        "ourFunctionsInclusive": share(ours),
        "hottestLeaves": share(leaves),
    }


OPERATOR_STATUS_PATCHES = "status PATCHes of FineTuneJobs (only the operator sends them)"
APISERVER_CATEGORIES: tuple[tuple[str, tuple[tuple[str, ...], ...]], ...] = (
    # (what, alternatives: each a set of frames that must all be on the stack); the first match counts.
    (
        OPERATOR_STATUS_PATCHES,
        (("customresource.(*StatusREST).Update", "patchResource"), ("serveStatus", "PatchResource")),
    ),
    (
        "status PUTs of PyTorchJobs (the training operator)",
        (("customresource.(*StatusREST).Update",), ("serveStatus", "UpdateResource")),
    ),
    ("creates (all clients)", (("registry.(*Store).Create",), ("createHandler",))),
    (
        "other updates and patches (pod statuses, ...)",
        (("registry.(*Store).Update",), ("patchResource",), ("PatchResource",), ("UpdateResource",)),
    ),
    ("deletes", (("registry.(*Store).Delete",), ("DeleteResource",))),
    ("lists and gets", (("ListResource",), ("GetResource",))),
    ("watch cache: decoding what etcd sends", (("etcd3.(*watchChan)",),)),
    ("watches: filtering and sending events", (("cacher.",), ("WatchServer",))),
    ("admission webhooks (the training operator's)", (("webhook",),)),
    ("request filters (authentication, audit log)", (("withAuthentication",), ("WithAudit",))),
    ("TLS", (("crypto/tls.",),)),
    ("Go's garbage collector (background)", (("runtime.gcBgMarkWorker",),)),
)
CEL_FRAME = "cel.(*Validator).Validate"
PPROF_UNITS = {"ns": 1e-9, "us": 1e-6, "\N{MICRO SIGN}s": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0}


def _pprof_seconds(text: str) -> float:
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz\N{MICRO SIGN}")
    return float(number) * PPROF_UNITS[text[len(number) :]]


def apiserver_categories(traces: str) -> dict[str, Any]:
    """`go tool pprof -traces` of the API server -> its CPU by kind of work (each sample counted once)."""
    seconds: collections.defaultdict[str, float] = collections.defaultdict(float)
    cel = total = 0.0
    for block in traces.split("-----------+")[1:]:
        lines = [line.strip() for line in block.splitlines()[1:] if line.strip()]
        if not lines or lines[0].startswith("-"):
            continue
        value, _, top = lines[0].partition(" ")
        frames = [top.strip(), *lines[1:]]
        spent = _pprof_seconds(value)
        total += spent
        cel += spent if any(CEL_FRAME in f for f in frames) else 0.0
        seconds[_apiserver_category(frames)] += spent
    share = total or 1.0
    return {
        "cpuSeconds": round(total, 2),
        "categories": [
            [name, round(spent, 2), round(100 * spent / share, 1)]
            for name, spent in sorted(seconds.items(), key=lambda item: -item[1])
        ],
        "celPercent": round(100 * cel / share, 1),
    }


def _apiserver_category(frames: Sequence[str]) -> str:
    for name, alternatives in APISERVER_CATEGORIES:
        if any(all(any(n in f for f in frames) for n in needles) for needles in alternatives):
            return name
    return "other"


def summarize_apiserver_profile(path: Path) -> dict[str, Any]:
    """The API server's pprof profile, read with Go's own `go tool pprof` (the Go toolchain builds the
    control plane, so it is here wherever the benchmark runs)."""
    go = shutil.which("go") or "/usr/local/go/bin/go"
    traces = subprocess.run(
        [go, "tool", "pprof", "-traces", str(path)], capture_output=True, text=True, check=True
    ).stdout
    return apiserver_categories(traces)


def _entry_point(frame: str) -> bool:
    """Frames every sample of the main thread passes through (the CLI, main.serve): no information."""
    return "kubetune/cli.py" in frame or "kubetune/controller/main.py" in frame


def _frame_name(frame: str) -> str:
    """`refresh_status (kubetune/controller/kube.py:290)` -> `refresh_status (kubetune/controller/kube.py)`."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "python3.11/", "operator/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where})" if where else name


def _category(frames: Sequence[str]) -> str:
    for frame in reversed(frames):
        for category, needles in CATEGORIES:
            if any(needle in frame for needle in needles):
                return category
        if "kubetune/" in frame:
            return "kubetune code itself"
    return "other (interpreter, threads)"


# ------------------------------------------------------------------------------------------------ plots


def plot(results: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[str] = []
    scales = results["scales"]

    # p50 and p99 of each hop, per N.
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    series = (
        ("our hop: FineTuneJob -> PyTorchJob", "operator", "createToPyTorchJob"),
        ("peer hop: PyTorchJob -> pod (same run)", "operator", "pyTorchJobToPod"),
        ("floor: PyTorchJob submit -> created", "floor", "submitToPyTorchJob"),
    )
    width = 0.8 / len(series)
    for axis, stat in zip(axes, ("p50", "p99"), strict=True):
        for offset, (label, phase, interval) in enumerate(series):
            values = [s[phase]["latency"][interval][stat] or 0 for s in scales]
            axis.bar([i + offset * width for i in range(len(scales))], values, width, label=label)
        axis.set_xticks([i + width for i in range(len(scales))], [str(s["jobs"]) for s in scales])
        axis.set_xlabel("jobs submitted at once")
        axis.set_title(stat)
        axis.set_yscale("log")
        axis.axhline(TARGETS["hopP99Seconds"], color="grey", linestyle=":", linewidth=1)
    axes[0].set_ylabel("seconds (log)")
    axes[0].legend(fontsize=8, loc="upper left")
    figure.suptitle("Latency per job (grey line: the 0.5 s target for our hop's p99)")
    written.append(save_figure(figure, NAME, "latency"))

    # Cumulative arrivals at the largest N: where the queue builds up.
    largest = scales[-1]
    figure, axis = plt.subplots(figsize=(9, 4.5))
    labels = {
        "ftj_created": "FineTuneJobs created",
        "ptj_created": "PyTorchJobs created (by kubetune)",
        "pod_created": "pods created (by the training operator)",
        "ftj_running": "FineTuneJobs Running",
    }
    for moment, label in labels.items():
        times = largest["operator"]["timeline"].get(moment, [])
        reached = round(largest["jobs"] * largest["operator"]["completePercent"].get(moment, 100) / 100)
        axis.plot(times, _cumulative(times, reached), label=label)
    floor = largest["floor"]["timeline"].get("ptj_created", [])
    axis.plot(
        floor,
        _cumulative(floor, largest["jobs"]),
        "--",
        color="grey",
        label="floor: bare PyTorchJobs created",
    )
    axis.set_xlabel("seconds after the first create")
    axis.set_ylabel("jobs")
    axis.set_title(f"{largest['jobs']} jobs submitted at once")
    axis.legend(fontsize=8)
    written.append(save_figure(figure, NAME, "timeline"))

    # Operator RSS and CPU over the wave at each N.
    figure, (rss_axis, cpu_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for scale in scales:
        series_ = scale["operator"]["process"]["rssSeries"]
        rss_axis.plot(series_["seconds"], series_["rssMiB"], label=f"{scale['jobs']} jobs")
        cpu_axis.plot(series_["seconds"], series_["cpuSeconds"], label=f"{scale['jobs']} jobs")
    rss_axis.axhline(TARGETS["peakRssMiB"], color="grey", linestyle=":", linewidth=1)
    rss_axis.set_title("operator RSS (MiB); grey: 200 MiB target")
    cpu_axis.set_title("operator CPU seconds, cumulative")
    for axis in (rss_axis, cpu_axis):
        axis.set_xlabel("seconds after the first create")
        axis.legend(fontsize=8)
    written.append(save_figure(figure, NAME, "resources"))
    return written


def _cumulative(times: Sequence[float], jobs: int) -> list[float]:
    if not times:
        return []
    step = jobs / len(times)
    return [min(jobs, (i + 1) * step) for i in range(len(times))]


# ---------------------------------------------------------------------------------------------- report


def _fmt(value: float | None, unit: str = " s", digits: int = 3) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}g}{unit}" if abs(value) < 1000 else f"{value:.0f}{unit}"


def _ratio(mine: float | None, theirs: float | None) -> str:
    if mine is None or not theirs:
        return "—"
    ratio = mine / theirs
    # Below 0.1x one decimal would print "0.0x": keep two significant digits there.
    return f"{ratio:.2g}x" if ratio < 0.1 else f"{ratio:.1f}x"


def _verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("met" if ok else "**missed**")


def settled_scale(results: dict[str, Any]) -> dict[str, Any]:
    """The largest N whose jobs (99% of them) got Running within the phase: only there do the create, status-change and
    resync buckets of writes mean what they say (a job still Pending keeps its timer ticks in "create", and a
    resync window while jobs still start is not a resync that changes nothing)."""
    scales: list[dict[str, Any]] = results["scales"]
    done = [s for s in scales if s["operator"]["completePercent"]["ftj_running"] >= 99]
    return done[-1] if done else scales[0]


def targets_table(results: dict[str, Any]) -> str:
    largest = results["scales"][-1]
    ours = largest["operator"]
    jobs = largest["jobs"]
    hop_p99 = ours["latency"]["createToPyTorchJob"]["p99"]
    peer_p99 = ours["latency"]["pyTorchJobToPod"]["p99"]
    settled = settled_scale(results)
    create_writes = settled["operator"]["writes"]["create"]["perJob"]
    resync_writes = settled["operator"]["writes"]["resync"]["perJob"]
    rss = ours["process"]["peakRssMiB"]
    ratio = ours["restart"]["ratioToRawList"]
    rows: list[list[object]] = []

    def row(what: str, target: str, measured: str, ok: bool | None, by: str) -> None:
        rows.append([what, target, measured, _verdict(ok), by])

    reached = ours["latency"]["createToPyTorchJob"]["count"]
    # Jobs whose PyTorchJob never appeared within the phase took longer than any measured: a lower bound.
    bound = "" if reached >= jobs else f"≥ {_fmt(hop_p99)} ({reached}/{jobs} jobs got one in time)"
    row(
        f"our hop p99 at {jobs} jobs",
        "≤ 0.5 s",
        bound or _fmt(hop_p99),
        None if hop_p99 is None else hop_p99 <= TARGETS["hopP99Seconds"],
        _ratio(hop_p99, TARGETS["hopP99Seconds"]) + " the target" if hop_p99 else "—",
    )
    row(
        "our hop p99 vs the training operator's hop (same run)",
        "≤ 1x",
        f"{_fmt(hop_p99)} vs {_fmt(peer_p99)}" + (" (of the jobs that got there)" if bound else ""),
        None if hop_p99 is None or peer_p99 is None else hop_p99 <= peer_p99,
        _ratio(hop_p99, peer_p99),
    )
    row(
        f"API writes per job create ({settled['jobs']} jobs, the largest N Running in time)",
        "≤ 3",
        f"{create_writes}",
        None if create_writes is None else create_writes <= TARGETS["writesPerCreate"],
        f"+{create_writes - 3:.1f}" if create_writes and create_writes > 3 else "",
    )
    row(
        f"API writes per job on a timer resync ({settled['jobs']} jobs, "
        f"{results['settings']['progressIntervalSeconds']:.0f} s timer)",
        "0",
        f"{resync_writes}",
        None if resync_writes is None else resync_writes <= TARGETS["writesPerNoopResync"],
        f"+{resync_writes}" if resync_writes else "",
    )
    row(
        f"operator peak RSS at {jobs} jobs",
        "≤ 200 MiB",
        _fmt(rss, " MiB", 4),
        rss <= TARGETS["peakRssMiB"],
        _ratio(rss, TARGETS["peakRssMiB"]) + " the target" if rss > TARGETS["peakRssMiB"] else "",
    )
    row(
        f"restart settles, {jobs} jobs present",
        "≤ 2x a raw list",
        f"{_fmt(ours['restart']['settleSeconds'])} vs {_fmt(ours['restart']['rawListSeconds'])} ({ratio}x)"
        if ratio is not None
        else "did not settle",
        None if ratio is None else ratio <= TARGETS["restartToRawListRatio"],
        f"{ratio / TARGETS['restartToRawListRatio']:.2g}x the target"
        if ratio and ratio > TARGETS["restartToRawListRatio"]
        else "",
    )
    return markdown_table(["target", "goal", "measured", "", "by how much"], rows)


def latency_table(results: dict[str, Any]) -> str:
    rows: list[list[object]] = []
    for scale in results["scales"]:
        ours, floor = scale["operator"]["latency"], scale["floor"]["latency"]
        watched = ours.get("watched") or {}
        for label, stats in (
            ("**our hop**: FineTuneJob created → PyTorchJob created", ours["createToPyTorchJob"]),
            ("our hop as the benchmark's watches saw it", watched.get("createToPyTorchJob")),
            ("FineTuneJob created → its watch event at an idle watcher", ours.get("toIdleWatcher")),
            ("FineTuneJob created → status Running (watches)", ours["createToRunning"]),
            ("peer hop: PyTorchJob created → pod created (our run)", ours["pyTorchJobToPod"]),
            ("floor: PyTorchJob submitted → created", floor["submitToPyTorchJob"]),
            ("peer hop in the floor run", floor["pyTorchJobToPod"]),
            ("floor: PyTorchJob created → Running (watches)", floor["pyTorchJobToRunning"]),
        ):
            if stats is None:
                continue
            rows.append(
                [
                    scale["jobs"],
                    label,
                    _fmt(stats["p50"]),
                    _fmt(stats["p95"]),
                    _fmt(stats["p99"]),
                    _fmt(stats["max"]),
                    stats["count"],
                ]
            )
    return markdown_table(["jobs", "interval", "p50", "p95", "p99", "max", "n"], rows)


def ratio_table(results: dict[str, Any]) -> str:
    rows: list[list[object]] = []
    for scale in results["scales"]:
        ours, floor = scale["operator"]["latency"], scale["floor"]["latency"]
        hop, peer, bare = ours["createToPyTorchJob"], ours["pyTorchJobToPod"], floor["submitToPyTorchJob"]
        rows.append(
            [
                scale["jobs"],
                f"{_ratio(hop['p50'], peer['p50'])} / {_ratio(hop['p99'], peer['p99'])}",
                f"{_ratio(hop['p50'], bare['p50'])} / {_ratio(hop['p99'], bare['p99'])}",
                f"{scale['operator']['submitSeconds']:.1f} s / {scale['floor']['submitSeconds']:.1f} s",
                f"{scale['operator']['waveSeconds']:.1f} s",
            ]
        )
    return markdown_table(
        [
            "jobs",
            "our hop / peer hop (p50 / p99)",
            "our hop / floor (p50 / p99)",
            "submit time: FineTuneJobs / PyTorchJobs",
            "all Running after",
        ],
        rows,
    )


def watch_note(results: dict[str, Any]) -> str:
    """Says where the API server dropped a watcher that fell behind: events around it arrived late."""
    notes = []
    for scale in results["scales"]:
        ours, floor = scale["operator"], scale["floor"]
        closed = ours.get("slowWatchersClosed") or {}
        restarts = (floor.get("watchRestarts") or 0) + (ours.get("watchRestarts") or 0)
        if closed or restarts:
            where = ", ".join(f"`{key}` {count}" for key, count in closed.items()) or "none"
            notes.append(
                f"at {scale['jobs']} jobs the API server closed watchers that fell behind ({where}; a key with "
                f"`/bench/` is the benchmark's, with `[{BENCH_LABEL}]` the idle watcher's, the others "
                "cluster-wide watchers of the operator or the training operator)"
                + (f", and the benchmark's watches had to be restarted {restarts} times" if restarts else "")
            )
    if not notes:
        return "No watch fell behind: every timestamp is an event as it was delivered.\n"
    return (
        "Under load, "
        + "; ".join(notes)
        + ". A closed watch resumes from its last resourceVersion, so no event is lost, but events around a "
        "restart arrive late. The hops come from the audit log and are not affected; the times to Running "
        "are (a create counts from when its create call returned if its event came later).\n"
    )


def _restart_start_cost(restart: Mapping[str, Any]) -> str:
    """Where a restart misses its target: what the new process spent before its first request."""
    ratio, after_first = restart.get("ratioToRawList"), restart.get("settleAfterFirstRequestSeconds")
    if ratio is None or after_first is None or ratio <= TARGETS["restartToRawListRatio"]:
        return ""  # the same judgement as the targets table's
    settle, raw = restart["settleSeconds"], restart["rawListSeconds"]
    return (
        f" What the target's measure leaves out is the new process's start: {_fmt(settle - after_first)} "
        "(Python starting and importing the operator) passed before its first request, which a list in a "
        f"running process does not pay; from its first request the restart took {after_first / raw:.1f}x the "
        "raw list."
    )


def _each_restart(restart: Mapping[str, Any]) -> str:
    """`, the best of 3 restarts (3.1 s, 2.9 s, 3.4 s),` where the results hold more than one."""
    each = restart.get("each") or []
    if len(each) < 2:
        return ""
    return f", the best of {len(each)} restarts ({', '.join(_fmt(r['settleSeconds']) for r in each)}),"


def resources_table(results: dict[str, Any]) -> str:
    rows = []
    for scale in results["scales"]:
        ours = scale["operator"]
        restart = ours["restart"]
        rows.append(
            [
                scale["jobs"],
                _fmt(ours["process"]["peakRssMiB"], " MiB", 4),
                _fmt(ours["process"]["waveCpuSeconds"]),
                _fmt(ours.get("steadyCpuSeconds")),
                _fmt(restart["settleSeconds"]),
                _fmt(restart.get("settleAfterFirstRequestSeconds")),
                _fmt(restart["rawListSeconds"]),
                f"{restart['ratioToRawList']}x" if restart["ratioToRawList"] is not None else "—",
                _fmt(restart.get("freshProcessListSeconds")),
                _fmt(restart["peakRssMiB"], " MiB", 4),
            ]
        )
    return markdown_table(
        [
            "jobs",
            "peak RSS",
            "CPU, create wave",
            "CPU, one timer interval",
            "restart settles",
            "… after its first request",
            "raw list",
            "ratio",
            "raw list, new process",
            "restarted RSS",
        ],
        rows,
    )


def writes_table(results: dict[str, Any]) -> str:
    rows = []
    for scale in results["scales"]:
        writes = scale["operator"]["writes"]
        peer = scale["operator"]["peerWrites"]
        rows.append(
            [
                scale["jobs"],
                *(
                    f"{writes[b]['perJob']} ({writes[b]['refusedPerJob']} refused)"
                    for b in ("create", "statusChange", "resync", "restart")
                ),
                peer["perJob"],
            ]
        )
    return markdown_table(
        [
            "jobs",
            "on create",
            "Pending → Running",
            "timer resync",
            "restart",
            "training operator, per PyTorchJob",
        ],
        rows,
    )


def hop_table(results: dict[str, Any]) -> str:
    """Where our hop's time goes, per scale: the means add up to the hop's mean (percentiles do not)."""
    rows: list[list[object]] = []
    for scale in results["scales"]:
        segments = scale["operator"].get("hopSegments")
        if not segments:
            continue
        total = sum(segments[key]["mean"] or 0.0 for key, _ in HOP_SEGMENTS)
        for key, label in HOP_SEGMENTS:
            stats = segments[key]
            share = f"{100 * stats['mean'] / total:.0f}%" if total and stats["mean"] is not None else "—"
            rows.append(
                [scale["jobs"], label, _fmt(stats["p50"]), _fmt(stats["p99"]), _fmt(stats["mean"]), share]
            )
    if not rows:
        return ""
    return (
        "Where our hop's time goes, cut at the operator's two creates in the audit log (mean shares add up):\n\n"
        + markdown_table(["jobs", "segment", "p50", "p99", "mean", "of the mean hop"], rows)
    )


def breakdown(results: dict[str, Any]) -> str:
    largest = results["scales"][-1]
    writes = largest["operator"]["writes"]
    lines = [f"What the writes are, per job, at {largest['jobs']} jobs:\n"]
    for bucket, label in (
        ("create", "on create"),
        ("statusChange", "Pending → Running"),
        ("resync", "timer resync"),
        ("restart", "restart"),
    ):
        kinds = ", ".join(f"`{kind}` {count}" for kind, count in writes[bucket]["byKind"].items()) or "none"
        lines.append(f"- {label}: {kinds}")
    for scale in results["scales"][:-1]:
        resync = scale["operator"]["writes"]["resync"]["byKind"]
        if resync:
            lines.append(
                f"- timer resync at {scale['jobs']} jobs: "
                + ", ".join(f"`{kind}` {count}" for kind, count in resync.items())
                + (
                    f" (a node went NotReady in the window: the jobs on it went {NODE_LOST} and back)"
                    if any(NODE_LOST in kind for kind in resync)
                    else ""
                )
            )
    reads = largest["operator"]["reads"]
    lines.append(
        f"\nReads per job (GET/LIST, watches excluded): {reads['wave']['perJob']} in the create wave "
        f"({', '.join(f'`{k}` {v}' for k, v in reads['wave']['byKind'].items())}), "
        f"{reads['restart']['perJob']} on restart."
    )
    return "\n".join(lines) + "\n"


def profile_section(results: dict[str, Any]) -> str:
    profile = results.get("profile")
    if not profile:
        return "Not profiled in this run (`--quick` skips it).\n"
    parts = [
        f"py-spy sampled the operator at 50 Hz in a separate run of {profile['jobs']} jobs (the numbers above "
        "come from unprofiled runs).\n"
    ]
    for phase, label in (("wave", "the create wave"), ("restart", "the restart")):
        summary = profile.get(phase)
        if not summary:
            continue
        parts.append(
            f"**{label}** ({summary['samples']} samples of the thread holding the GIL, i.e. CPU time):\n"
        )
        parts.append(markdown_table(["where", "% of samples"], summary["categories"]))
        parts.append("\nkubetune functions on the stack (inclusive):\n")
        parts.append(markdown_table(["function", "% of samples"], summary["ourFunctionsInclusive"][:8]))
        parts.append("")
    if apiserver := profile.get("apiServerWave"):
        parts.append(
            f"**The API server during the create wave**: its own CPU profile (Go's pprof at 100 Hz, "
            f"`/debug/pprof/profile`) over the first {apiserver['seconds']:.0f} s of the same run, "
            f"{apiserver['cpuSeconds']} CPU s. Each sample counts once, under the first row whose frames it "
            f"holds; CEL validation, within the writes, was {apiserver['celPercent']}%.\n"
        )
        parts.append(markdown_table(["where", "CPU s", "%"], apiserver["categories"]))
        parts.append("")
    return "\n".join(parts)


def findings(results: dict[str, Any]) -> list[str]:
    """What the numbers say limits the operator, worked out from the results (so it never goes stale)."""
    largest = results["scales"][-1]
    jobs, ours = largest["jobs"], largest["operator"]
    interval = results["settings"]["progressIntervalSeconds"]
    cores = results["machine"].get("cores") or 1
    said: list[str] = []
    load = results["machine"].get("loadAverage") or {}
    if load.get("start") and load.get("end"):
        said.append(
            f"**Load.** The machine's 1-minute load average was {load['start'][0]:.1f} when the run began "
            f"(other work) and {load['end'][0]:.1f} as it ended (its own processes included), on {cores} "
            "cores: absolute times are stretched accordingly; the ratios within one run (ours against the "
            "floor and the peer) are the figures to compare."
        )
    hop, peer = ours["latency"]["createToPyTorchJob"], ours["latency"]["pyTorchJobToPod"]
    wave_cpu = ours["process"]["waveCpuSeconds"]
    running = ours["completePercent"]["ftj_running"]
    if hop["p99"] is not None and ours["waveSeconds"]:
        pace = (
            f"all Running after {ours['waveSeconds']:.0f} s"
            if running >= 100
            else f"only {running:.0f}% Running when the phase's {ours['waveSeconds']:.0f} s were up"
        )
        said.append(
            f"**Queueing, not a slow hop.** All {jobs} jobs arrive within {ours['submitSeconds']:.1f} s and the "
            f"operator and the control plane work through them at "
            f"{jobs * running / 100 / ours['waveSeconds']:.1f} jobs/s ({pace}), so the last jobs wait: our "
            f"hop's p50 is {_fmt(hop['p50'])} and its p99 {_fmt(hop['p99'])}. The training operator queues the "
            f"same way in the same run (its hop: p50 {_fmt(peer['p50'])}, p99 {_fmt(peer['p99'])})."
        )
    said += _hop_findings(results)
    # Per-job costs from the largest N that finished its wave: there every job went through the whole story.
    settled = settled_scale(results)
    jobs, ours = settled["jobs"], settled["operator"]
    wave_cpu = ours["process"]["waveCpuSeconds"]
    reads, writes = ours["reads"]["wave"], ours["writes"]
    per_job_cpu = wave_cpu / jobs
    said.append(
        f"**CPU per job** ({jobs} jobs). The create wave cost the operator {wave_cpu:.0f} CPU seconds, "
        f"{per_job_cpu * 1000:.0f} ms "
        f"per job, for {reads['perJob']:.0f} reads and {writes['create']['perJob'] + writes['statusChange']['perJob']:.1f} "
        "writes per job. Reads per job: "
        + (", ".join(f"`{kind}` {count}" for kind, count in list(reads["byKind"].items())[:4]) or "none")
        + f". On {cores} shared cores the API server, etcd, the scheduler and the training operator run beside it."
    )
    steady_cpu = ours.get("steadyCpuSeconds")
    if steady_cpu is not None:
        window = interval + 5
        said.append(
            f"**Resync.** With {jobs} Running jobs and nothing changing, one resync of every job cost "
            f"{steady_cpu:.1f} CPU seconds in the {window:.0f} s window ({steady_cpu / window:.2f} cores) and "
            f"{writes['resync']['perJob']} writes per job"
            + (
                ": " + ", ".join(f"`{k}` {v}" for k, v in writes["resync"]["byKind"].items())
                if writes["resync"]["byKind"]
                else ""
            )
            + "."
            + (
                f" The writes marked ({NODE_LOST}) answer a node going NotReady in the window (the node "
                "controller's verdict when kwok's lease renewal lags under load), and the others bring those jobs "
                "back to Running: not a resync that changed nothing."
                if any(NODE_LOST in kind for kind in writes["resync"]["byKind"])
                else ""
            )
        )
    create = writes["create"]
    said.append(
        f"**Writes on create: {create['perJob']} per job** ({create['refusedPerJob']} of them refused): "
        + ", ".join(f"`{k}` {v}" for k, v in create["byKind"].items())
        + ". The least a job can cost is its ConfigMap, its PyTorchJob and the status patch that makes it "
        "Pending: three."
    )
    unsettled = [s["jobs"] for s in results["scales"] if s["operator"]["restart"]["settleSeconds"] is None]
    if unsettled:
        said.append(
            f"**Restart** with {', '.join(map(str, unsettled))} jobs present did not settle within the phase's "
            "limit (initial lists received, every job reconciled, nothing queued)."
        )
    restart = ours["restart"]
    if restart["settleSeconds"] is not None:
        said.append(
            f"**Restart** ({jobs} jobs). {_fmt(restart['settleSeconds'])} from the process start "
            f"({_fmt(restart.get('settleAfterFirstRequestSeconds'))} from its first request)"
            + _each_restart(restart)
            + " against "
            f"{_fmt(restart['rawListSeconds'])} for a raw list in a running process (the target's measure), "
            + (
                f"{_fmt(restart['freshProcessListSeconds'])} for the same list in a new Python process from its "
                f"start ({restart['settleSeconds'] / restart['freshProcessListSeconds']:.1f}x), "
                if restart.get("freshProcessListSeconds")
                else ""
            )
            + f"and {_fmt(restart.get('kubectlListSeconds'))} for `kubectl get` of the same objects. Besides its lists, "
            f"the restarted operator reconciled every job: {writes['restart']['perJob']} writes per job "
            + (f"over the {len(restart['each'])} restarts " if len(restart.get("each") or []) > 1 else "")
            + f"({writes['restart']['refusedPerJob']} refused), {ours['reads']['restart']['perJob']:.1f} reads per job"
            + (
                ": "
                + ", ".join(f"`{k}` {v}" for k, v in list(ours["reads"]["restart"]["byKind"].items())[:3])
                if ours["reads"]["restart"]["byKind"]
                else ""
            )
            + "."
            + _restart_start_cost(restart)
        )
    largest = results["scales"][-1]
    jobs, rss = largest["jobs"], largest["operator"]["process"]["peakRssMiB"]
    said.append(
        f"**Memory** peaks at {rss:.0f} MiB with {jobs} jobs "
        + (
            "(within the 200 MiB target)."
            if rss <= TARGETS["peakRssMiB"]
            else f"({rss - 200:.0f} MiB over the target)."
        )
    )
    profile = results.get("profile") or {}
    if profile.get("wave"):
        top = profile["wave"]["categories"][:3]
        ours_top = profile["wave"]["ourFunctionsInclusive"][:3]
        said.append(
            f"**Profile** ({profile['jobs']} jobs, CPU samples): "
            + ", ".join(f"{name} {pct}%" for name, pct in top)
            + "; on the stack most often: "
            + ", ".join(f"`{name.split(' (')[0]}` {pct}%" for name, pct in ours_top)
            + "."
        )
    if apiserver := profile.get("apiServerWave"):
        said.append(_apiserver_finding(apiserver, profile["jobs"]))
    return said


def _apiserver_finding(apiserver: dict[str, Any], jobs: int) -> str:
    """What the API server spent its CPU on while the FineTuneJobs were submitted, and the status patches' part."""
    top = ", ".join(f"{name} {pct}%" for name, _, pct in apiserver["categories"][:4])
    said = (
        f"**The API server's CPU** in the create wave ({jobs} jobs, its own pprof profile over "
        f"{apiserver['seconds']:.0f} s, {apiserver['cpuSeconds'] / apiserver['seconds']:.2f} cores): {top}."
    )
    status = next(
        (spent for name, spent, _ in apiserver["categories"] if name == OPERATOR_STATUS_PATCHES), None
    )
    if status and apiserver.get("operatorStatusPatches"):
        each = 1000 * status / apiserver["operatorStatusPatches"]
        said += (
            f" The operator's {apiserver['operatorStatusPatches']} status patches in that window cost it "
            f"{each:.1f} ms of CPU each; CEL validation was {apiserver['celPercent']}% of all its CPU."
        )
    return said


def _before_first_write(ours: dict[str, Any], before: float, waited: float, hop: float) -> str:
    """Splits the time before the operator's first write by its own queue-wait histogram and, when the results
    hold it, by when an idle watcher received the same events."""
    closed = ours.get("slowWatchersClosed") or {}
    idle = ours["latency"].get("toIdleWatcher") or {}
    said = f" Of that, new jobs waited {_fmt(waited)} for a worker on average (the operator's own histogram)"
    if idle.get("mean") is not None:
        said += (
            f"; a watcher in an idle process of its own received the FineTuneJobs {_fmt(idle['mean'])} after "
            f"they were created on average, {100 * idle['mean'] / hop:.0f}% of the hop (p99 {_fmt(idle['p99'])}): "
            "the API server's own delivery under this load"
            + (
                f" (its FineTuneJob watch cache held up to {backlog} events received from etcd and not yet "
                "dispatched to any watcher, by its log)"
                if (backlog := (ours.get("watchCacheBacklog") or {}).get(f"{PLURAL}.{GROUP}"))
                else ""
            )
            + f". The rest, about {_fmt(max(0.0, before - waited - idle['mean']))}, is the operator receiving "
            "the event later than that, and rendering"
        )
    else:
        said += (
            f"; the rest, about {_fmt(max(0.0, before - waited))}, is the FineTuneJob's watch event reaching "
            "the operator and the rendering"
        )
    closures = [
        f"{whose} {count} time(s)"
        for whose, key in (
            ("the operator's FineTuneJob watch", f"/{GROUP}/{PLURAL}/"),
            ("the idle watcher's", f"/{GROUP}/{PLURAL}/{NAMESPACE}/ [{BENCH_LABEL}]"),
        )
        if (count := closed.get(key))
    ]
    return said + (
        f" (the API server closed {' and '.join(closures)} for falling behind)." if closures else "."
    )


def _hop_findings(results: dict[str, Any]) -> list[str]:
    """What the hop at the largest N is made of and why its jobs wait: from the audit log's segments when the
    results hold them, else from the benchmark's own create calls."""
    largest = results["scales"][-1]
    jobs, ours = largest["jobs"], largest["operator"]
    calls, floor_calls = ours["latency"].get("createCall"), largest["floor"]["latency"].get("createCall")
    workers = results["settings"].get("operatorWorkers")
    submitted = jobs / ours["submitSeconds"]
    segments = ours.get("hopSegments") or {}
    found = {key: (segments.get(key) or {}).get("mean") for key, _ in HOP_SEGMENTS}
    means: dict[str, float] = {key: float(mean) for key, mean in found.items() if mean is not None}
    if len(means) == len(HOP_SEGMENTS) and workers:
        total = sum(means.values())
        server = means["configMapCreate"] + means["pyTorchJobCreate"]
        queue_wait = ours.get("queueWait") or {}
        waited = (queue_wait.get("first") or {}).get("meanSeconds")
        said = [
            f"**Where the hop goes** ({jobs} jobs, means from the audit log, which add up): of {_fmt(total)}, "
            f"{_fmt(server)} ({100 * server / total:.0f}%) is the API server creating the ConfigMap and the "
            f"PyTorchJob, {_fmt(means['betweenWrites'])} ({100 * means['betweenWrites'] / total:.0f}%) the "
            f"operator's own time between the two, and {_fmt(means['toFirstWrite'])} "
            f"({100 * means['toFirstWrite'] / total:.0f}%) passes before its first write: the watch event "
            "reaching it, the queue and rendering."
            + (_before_first_write(ours, means["toFirstWrite"], waited, total) if waited is not None else "")
        ]
        writes = ours["writes"]["create"]["perJob"]
        if writes:
            # A worker is held for a write's whole round trip; the two creates and the gap between them, halved,
            # is what one write holds it for (the gap after the second write, and event-only reconciles, come
            # on top, so this is a lower bound on how busy the workers are).
            per_write = (server + means["betweenWrites"]) / 2
            busy = submitted * writes * per_write / workers
            other = (queue_wait.get("ordinary") or {}).get("meanSeconds")
            said.append(
                f"**The workers are busy writing.** Every job costs {writes:.1f} writes "
                f"within the burst (ConfigMap, PyTorchJob, Pending status). One write holds a worker about "
                f"{_fmt(per_write)} (the two creates and the gap between them, halved), so {submitted:.0f} jobs/s "
                f"submitted keep the {workers} workers at least {100 * busy:.0f}% busy before any other event "
                "is reconciled, and a queue that busy waits many times a write's duration"
                + (
                    f": the other reconciles waited {_fmt(other)} on average, new jobs, which go first, "
                    f"{_fmt(waited)}."
                    if other is not None and waited is not None
                    else "."
                )
                + " More workers do not help: the API server slows with the writes in flight (64 workers were "
                "slower than 32)."
            )
        if cores := ours.get("submitCores"):
            machine = results["machine"].get("cores")
            said.append(
                f"**The machine's cores while the jobs were submitted** ({_fmt(ours['submitSeconds'])}): "
                + ", ".join(f"{name} {used:.2f}" for name, used in cores.items())
                + f"; {sum(cores.values()):.2f} in all"
                + (f" of the {machine} there are." if machine else ".")
            )
        if calls and calls["p50"] and floor_calls:
            said.append(
                f"**The clients' side of a write.** The benchmark's own create calls took p50 {_fmt(calls['p50'])} "
                f"as a client sees them (the floor's: {_fmt(floor_calls['p50'])}), against "
                f"p50 {_fmt(segments['configMapCreate']['p50'])} for our ConfigMap creates inside the API "
                "server's handlers: the rest is spent in the clients and in getting the request to the API "
                "server on cores the whole control plane shares."
            )
        return said
    if calls and calls["p50"] and floor_calls and workers:
        # While new jobs wait, each worker makes a job's two child writes one after the other and leaves its
        # status for later: at the write latency of the moment, that caps how many jobs per second the operator
        # can start, however little CPU it uses.
        capacity = workers / (2 * calls["p50"])
        return [
            f"**The API server's write latency.** While the {jobs} FineTuneJobs were submitted, one create call "
            f"took p50 {_fmt(calls['p50'])}, p99 {_fmt(calls['p99'])} (while the floor's PyTorchJobs were: p50 "
            f"{_fmt(floor_calls['p50'])}, p99 {_fmt(floor_calls['p99'])}). Our hop is two writes in a row (the "
            f"ConfigMap, then the PyTorchJob), so about {_fmt(2 * calls['p50'])} at the median latency before "
            f"any queueing. While new jobs wait, each of the {workers} workers writes one job's ConfigMap and "
            f"PyTorchJob and leaves its Pending status for after the burst, so at that latency they start at "
            f"most {capacity:.0f} jobs/s against {submitted:.0f} jobs/s submitted."
        ]
    return []


def render_markdown(results: dict[str, Any]) -> str:
    """The operator-at-scale section of docs/benchmarks.md."""
    settings = results["settings"]
    images = "\n".join(f"![{name}](benchmarks/{name})" for name in results.get("plots", []))
    found = findings(results)
    versions = results["machine"].get("versions") or {}
    packages = results["machine"].get("packages") or {}
    return "\n".join(
        [
            "## Operator at fleet scale\n",
            f"`{results['machine']['command']}`: {', '.join(str(s['jobs']) for s in results['scales'])} FineTuneJobs "
            "submitted at once to the test control plane (`hack/cluster`, real kube-apiserver, etcd, scheduler, "
            "controller-manager and Kubeflow training operator; kwok plays the kubelets). Each phase starts from "
            "an empty etcd. Jobs are one pod with one GPU; a MutatingAdmissionPolicy keeps their pods Running "
            f"(`kwok.kubetune.io/outcome: run`) on {settings['benchNodes']} extra kwok nodes of "
            f"{settings['podsPerNode']} pods each. Creates come from {settings['submitWorkers']} client threads. "
            "Our hop and the peer hops are timed alike, from the API server's audit log: from one create's "
            "completion to the next's. A status turning Running is timed by the benchmark's watches (the audit "
            "log holds no status bodies but the operator's), and the floor from its create call's start. The "
            "operator runs as its own ServiceAccount; its API writes come from the audit log too. "
            f"Timer interval: {settings['progressIntervalSeconds']:.0f} s. "
            f"Versions: Kubernetes {versions.get('KUBERNETES_VERSION')}, training operator "
            f"{versions.get('TRAINING_OPERATOR_VERSION')}, kwok {versions.get('KWOK_VERSION')}, "
            + ", ".join(f"{k} {v}" for k, v in packages.items() if v)
            + f"; the operator at commit {results['machine'].get('gitCommit')}"
            + (
                f" with uncommitted changes to {', '.join(f'`{f}`' for f in dirty)}"
                if (dirty := results["machine"].get("uncommittedOperatorFiles"))
                else ""
            )
            + ".\n",
            "### Targets\n",
            targets_table(results),
            "### What limits it\n",
            "\n".join(f"- {finding}" for finding in found) + "\n",
            "### Latency per job\n",
            latency_table(results),
            ratio_table(results),
            hop_table(results),
            watch_note(results),
            "### API writes per job\n",
            writes_table(results),
            breakdown(results),
            "### Memory, CPU and restart\n",
            resources_table(results),
            "The raw list is the best of three lists of all FineTuneJobs, our PyTorchJobs and our pods by the "
            "kubernetes client, parsed with the standard library's json as the client parses it (the operator "
            "parses with orjson). The restart settles when the operator has received the initial lists "
            "of FineTuneJobs, PyTorchJobs and pods, reconciled every job and has nothing queued (its own metrics); "
            "it counts from the "
            "process start, and again from the operator's first API request (after Python imports). Where the "
            "results hold several restarts, one after another, the table shows the best, as it does the raw "
            "list's.\n",
            "### Profile\n",
            profile_section(results),
            images + "\n" if images else "",
        ]
    )


# ------------------------------------------------------------------------------------------------ main


def phase_timeout(jobs: int) -> float:
    """How long a phase may take before it is reported incomplete: generous, but a run stays within minutes."""
    return max(180.0, jobs * 0.8)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.operator_scale", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="20 jobs, a 5 s timer, no profile")
    parser.add_argument("--scales", type=lambda s: tuple(int(x) for x in s.split(",")), help="e.g. 100,500")
    parser.add_argument(
        "--profile-jobs",
        type=int,
        default=PROFILE_JOBS,
        help=f"jobs in the separate profiled run (default {PROFILE_JOBS}; 0 skips it)",
    )
    args = parser.parse_args(argv)
    scales = args.scales or (QUICK_SCALES if args.quick else SCALES)
    interval = QUICK_PROGRESS_INTERVAL_S if args.quick else PROGRESS_INTERVAL_S
    profile_jobs = 0 if args.quick else args.profile_jobs

    machine = describe_machine(["kubernetes", "urllib3", "pydantic", "prometheus-client"])
    machine["versions"] = _component_versions()
    machine["uncommittedOperatorFiles"] = _uncommitted("operator")
    cluster = BenchCluster()
    # Jobs name a metrics port that is bound but never listened on, so progress reads fail at once.
    with contextlib.closing(socket.socket()) as closed_port:
        closed_port.bind(("127.0.0.1", 0))
        metrics_port = closed_port.getsockname()[1]
        scale_results = []
        for jobs in scales:
            timeout = phase_timeout(jobs)
            log(f"--- {jobs} jobs (load {os.getloadavg()[0]:.1f})")
            floor = run_floor(cluster, jobs, metrics_port, timeout)
            ours = run_operator(cluster, jobs, metrics_port, timeout, interval)
            scale_results.append(
                {
                    "jobs": jobs,
                    "loadAverage": [round(x, 2) for x in os.getloadavg()],
                    "floor": floor,
                    "operator": ours,
                }
            )
        profile_result = None
        if profile_jobs:
            jobs = profile_jobs
            log(f"--- profiled run, {jobs} jobs")
            with tempfile.TemporaryDirectory() as folder:
                profiled = run_operator(
                    cluster, jobs, metrics_port, phase_timeout(jobs), interval, profile_dir=Path(folder)
                )
                profile_result = {"jobs": jobs}
                for phase in ("wave", "restart"):
                    found = Path(folder) / f"{phase}.txt"
                    if found.exists():
                        profile_result[phase] = summarize_profile(found)
                        shutil.copy(found, cluster.logs / f"profile-{phase}.txt")
                apiserver = Path(folder) / "apiserver-wave.pprof"
                profile_result["apiServerWave"] = (
                    summarize_apiserver_profile(apiserver) | profiled["apiServerProfiled"]
                )
                shutil.copy(apiserver, cluster.logs / "profile-apiserver-wave.pprof")
    results: dict[str, Any] = {
        "benchmark": NAME,
        "machine": finish_machine(machine),
        "settings": {
            "scales": list(scales),
            "submitWorkers": SUBMIT_WORKERS,
            "operatorWorkers": OperatorConfig().workers,  # the operator inherits this environment
            "benchNodes": BENCH_NODES,
            "podsPerNode": PODS_PER_NODE,
            "progressIntervalSeconds": interval,
            "job": "1 node x 1 GPU LoRA; pods kept Running",
        },
        "targets": TARGETS,
        "scales": scale_results,
        "profile": profile_result,
    }
    write_results(NAME, results)  # kept even if plotting fails
    results["plots"] = plot(results)
    path = write_results(NAME, results)
    log(f"wrote {path.relative_to(REPO_DIR)} and {', '.join(results['plots'])}")
    return 0


def _uncommitted(folder: str) -> list[str]:
    """Files of `folder` that differ from the commit in the machine block: the code measured is the tree's."""
    result = subprocess.run(
        ["git", "-C", str(REPO_DIR), "status", "--porcelain", "--", folder],
        capture_output=True,
        text=True,
        check=False,
    )
    return [line[3:] for line in result.stdout.splitlines()]


def _component_versions() -> dict[str, str]:
    versions = {}
    for line in (REPO_DIR / "hack" / "versions.env").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.startswith("#"):
            versions[key.strip()] = value.strip()
    return versions


if __name__ == "__main__":
    sys.exit(main())
