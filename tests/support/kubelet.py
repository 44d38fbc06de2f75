"""A stand-in kubelet: runs the containers of the pods bound to its Node as processes on this machine.

No real kubelet can run here (no container runtime, no root for cgroups and namespaces), and kwok only
plays pod states. The stand-in fills that gap for the tests that need a pod's program to really run: the
operator installed by the chart, and the trainer pods of the end-to-end tier.

What is real:
- the Node object, registered by the stand-in, kept Ready by status heartbeats and a Lease in
  `kube-node-lease`, so the node-lifecycle controller leaves it alone; the real kube-scheduler binds pods to it;
- each container's program, from the pod's `command`/`args` (or the image's entrypoint, see `Image`), with
  the kubelet's `$(VAR)` expansion and the pod's env: `value`, `secretKeyRef`, `configMapKeyRef`, `fieldRef`
  (`metadata.*`, `spec.nodeName`, `spec.serviceAccountName`, `status.podIP`, `status.hostIP`) and `envFrom`;
- ConfigMap, Secret, projected (ConfigMap, Secret, downward API, ServiceAccount token from the TokenRequest
  API, bound to the pod) and emptyDir volumes, read from the API server and written into the pod's folder;
  PersistentVolumeClaim volumes: the claim must be Bound (by the real PV controller) to a `hostPath` or `local`
  PersistentVolume, whose folder on this machine becomes the volume (read-only mounts are not enforced);
- the API access of a pod with a ServiceAccount: its token is a real TokenRequest token checked by the API
  server and RBAC;
- what the kubelet reports: phase, conditions, podIP, container state running / waiting / terminated with exit
  code, reason, and the termination message from `terminationMessagePath` (`FallbackToLogsOnError` included),
  restartCount and lastState; restarts by `restartPolicy`; readiness from `httpGet` readiness probes;
- deletion: SIGTERM to the container's main process, the pod's grace period, SIGKILL, then the final delete.

What is stood in, and how:
- A container is a process started in a session of its own. Every process of it (torchrun's workers run in
  sessions of their own) carries `KUBETUNE_STANDIN_CONTAINER=<pod uid>/<name>` in its environment; that mark
  plays the cgroup: stopping or killing the container signals every process that carries it.
- An image is its entrypoint and command from a table (`Image`, e.g. read from the repository's Dockerfiles);
  the programs come from this machine's PATH (the project's venv first). Nothing is pulled; an image missing
  from the table leaves the container waiting with reason ErrImagePull.
- Filesystem: each pod has a folder (`<root>/<namespace>/<pod>/`); volumes live in `volumes/<name>/`. Mount
  paths are not bind-mounted: env values and arguments that start with a container's `mountPath` (also after
  `--flag=`) are rewritten to the volume's folder, as is `terminationMessagePath`; a value naming a folder
  above mount paths (`/mnt/pvc` above `/mnt/pvc/<claim>`) is rewritten to `root/` of the pod's folder, where
  each mount path is a link to its volume. `HOME` and `TMPDIR` point
  into the pod folder (TMPDIR to the volume mounted at /tmp, if any), standing in for the container's own
  filesystem. A pod with a ServiceAccount token volume gets a kubeconfig beside the token (server, CA, token)
  and `KUBECONFIG` pointing to it: the in-cluster paths under /var/run/secrets are absolute.
- Network: pods share this machine's network, like `hostNetwork` pods. A pod's IP is a loopback address
  127.x.y.z derived from its namespace and name (so a re-created pod keeps it); a server bound to 0.0.0.0 is
  reachable there, and two pods that bind one port collide. Cluster DNS: a variable named `*_ADDR`, `*_HOST`,
  `*_ENDPOINT` or `*_SERVER` whose value is a Service's name (`svc`, `svc.ns`, `svc.ns.svc[.cluster.local]`,
  optionally `:port`) gets the address of a pod the Service selects, or of the pod named like the Service
  (the training operator's per-replica Services) before that pod exists. A name no Service has yet is waited
  for a while, as a process would retry its DNS lookup.
- The stand-in talks to the API server with the test's credentials, not as `system:node:<name>`.
- The processes see this machine's hostname (`socket.gethostname()`); `HOSTNAME` has the pod's name.

Not stood in: init and sidecar containers, liveness and startup probes, resource limits, security contexts
(processes run as the test's user), image pull secrets, Service environment variables, token refresh, and the
kubelet's API (`kubectl logs/exec`): each container run logs to a file, see `StandInKubelet.log_path`.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

log = logging.getLogger("kubetune.standin")

Manifest = dict[str, Any]

CONTAINER_MARK = "KUBETUNE_STANDIN_CONTAINER"
NODE_LABEL = "kubetune.io/standin"
"""Label and taint key of stand-in nodes: only pods that select and tolerate it land there."""
HEARTBEAT_SECONDS = 10.0
RESTART_BACKOFF_SECONDS = (1.0, 2.0, 5.0, 10.0)
"""Shorter than the kubelet's 10 s .. 5 min CrashLoopBackOff: tests wait for restarts."""
MAX_TERMINATION_MESSAGE = 4096
FALLBACK_LOG_LINES, FALLBACK_LOG_BYTES = 80, 2048
ADDRESS_VARIABLE = re.compile(r"_(ADDR|HOST|ENDPOINT|SERVER)$")
NAME_RESOLUTION_WAIT_SECONDS = 30.0
SERVICE_ACCOUNT_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
VENV_BIN = Path(sys.executable).parent


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def expand(text: str, variables: Mapping[str, str]) -> str:
    """The kubelet's `$(VAR)` expansion: defined names are replaced, `$$` escapes, anything else stays."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return variables.get(match.group(1), match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", replace, text)


def pod_address(namespace: str, name: str) -> str:
    """The loopback address a pod named so gets on a stand-in node: stable, so a re-created pod keeps it."""
    digest = hashlib.sha256(f"{namespace}/{name}".encode()).digest()
    return f"127.{16 + digest[0] % 224}.{digest[1]}.{1 + digest[2] % 254}"


@dataclass(frozen=True)
class Image:
    """What a container image contributes: its ENTRYPOINT and CMD (exec form)."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()

    @classmethod
    def from_dockerfile(cls, path: Path) -> Image:
        """ENTRYPOINT and CMD of a Dockerfile, read from their JSON (exec) form."""
        found: dict[str, tuple[str, ...]] = {}
        for line in path.read_text().splitlines():
            match = re.match(r"^(ENTRYPOINT|CMD)\s+(\[.*\])\s*$", line.strip())
            if match:
                found[match.group(1)] = tuple(json.loads(match.group(2)))
        return cls(entrypoint=found.get("ENTRYPOINT", ()), cmd=found.get("CMD", ()))

    def argv(self, command: list[str] | None, args: list[str] | None) -> list[str]:
        """How the kubelet combines the container's command/args with the image's entrypoint/cmd."""
        if command:
            return [*command, *(args or [])]
        return [*self.entrypoint, *(args if args is not None else self.cmd)]


def image_repository(image: str) -> str:
    """`registry/repo:tag@digest` -> `registry/repo`."""
    image = image.split("@", 1)[0]
    last = image.rsplit("/", 1)[-1]
    return image[: len(image) - len(last)] + last.split(":", 1)[0]


class ContainerConfigError(Exception):
    """The container cannot start yet (a missing Secret or key, an unknown image); the kubelet retries."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# -------------------------------------------------------------------------------------------- containers


@dataclass
class ContainerRun:
    """One container of a pod and what the kubelet knows of it."""

    spec: Manifest
    restart_count: int = 0
    state: Manifest = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: Manifest = field(default_factory=dict)
    ready: bool = False
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    kill_reason: str | None = None
    done: bool = False

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    def status(self) -> Manifest:
        return {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            "containerID": f"standin://{self.process.pid}" if self.process else "",
            "ready": self.ready,
            "started": "running" in self.state,
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
        }


@dataclass
class PodRun:
    """A pod bound to this node: its folder, address and containers."""

    namespace: str
    name: str
    uid: str
    folder: Path
    ip: str
    pod: Manifest
    containers: list[ContainerRun]
    started_at: str = field(default_factory=now)
    stopping: bool = False
    lock: threading.RLock = field(default_factory=threading.RLock)
    transitions: dict[str, str] = field(default_factory=dict)
    written: Manifest = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name

    def mark(self, container: str) -> str:
        return f"{self.uid}/{container}"


def container_pids(mark: str) -> list[int]:
    """Every process whose environment carries the container's mark (the stand-in's cgroup)."""
    needle = f"{CONTAINER_MARK}={mark}\0".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "environ").read_bytes():
                pids.append(int(entry.name))
    return pids


def signal_container(mark: str, signum: int) -> int:
    """Send `signum` to every process of the container; returns how many got it."""
    sent = 0
    for pid in container_pids(mark):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
            sent += 1
    return sent


# ----------------------------------------------------------------------------------------------- kubelet


class StandInKubelet:
    """One stand-in node: registers it, keeps it Ready, runs the pods the scheduler binds to it."""

    def __init__(
        self,
        api_client: client.ApiClient,
        node_name: str,
        root: Path,
        images: Mapping[str, Image],
        group: str,
        capacity: Mapping[str, str] | None = None,
    ) -> None:
        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.coordination = client.CoordinationV1Api(api_client)
        self.node_name = node_name
        self.root = root
        self.images = dict(images)
        self.group = group
        self.capacity = dict(
            capacity or {"cpu": "16", "memory": "64Gi", "pods": "110", "nvidia.com/gpu": "8"}
        )
        self.pods: dict[tuple[str, str], PodRun] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watch: watch.Watch | None = None
        self._threads: list[threading.Thread] = []
        self._since = now()

    # --------------------------------------------------------------------------------------- the node

    def start(self) -> None:
        """Register the Node, report it Ready, and start watching the pods bound to it."""
        self.root.mkdir(parents=True, exist_ok=True)
        labels = {
            NODE_LABEL: self.group,
            "kubernetes.io/hostname": self.node_name,
            "kubernetes.io/os": "linux",
        }
        node: Manifest = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.node_name, "labels": labels},
            "spec": {"taints": [{"key": NODE_LABEL, "value": self.group, "effect": "NoSchedule"}]},
        }
        self.core.create_node(node)  # type: ignore[arg-type]  # the client takes a manifest as it is
        self._heartbeat()
        for target in (self._heartbeats, self._watch_pods):
            thread = threading.Thread(target=target, name=f"{self.node_name}-{target.__name__}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("node %s registered and Ready", self.node_name)

    def _heartbeat(self) -> None:
        stamp = now()
        conditions = [
            {"type": kind, "status": "False", "reason": f"KubeletHas{reason}", "message": "stand-in"}
            for kind, reason in (
                ("MemoryPressure", "SufficientMemory"),
                ("DiskPressure", "NoDiskPressure"),
                ("PIDPressure", "SufficientPID"),
            )
        ]
        conditions.append(
            {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "stand-in kubelet"}
        )
        for item in conditions:
            item.update(lastHeartbeatTime=stamp, lastTransitionTime=self._since)
        self.core.patch_node_status(
            self.node_name,
            {
                "status": {
                    "capacity": self.capacity,
                    "allocatable": self.capacity,
                    "conditions": conditions,
                    "addresses": [
                        {"type": "InternalIP", "address": "127.0.0.1"},
                        {"type": "Hostname", "address": self.node_name},
                    ],
                    "nodeInfo": {
                        "architecture": "amd64", "operatingSystem": "linux", "kubeletVersion": "standin",
                        "containerRuntimeVersion": "standin://processes", "kernelVersion": os.uname().release,
                        "kubeProxyVersion": "", "osImage": "", "machineID": "", "systemUUID": "", "bootID": "",
                    },
                }
            },
            _content_type="application/strategic-merge-patch+json",
        )  # fmt: skip
        lease = {
            "metadata": {"name": self.node_name, "namespace": "kube-node-lease"},
            "spec": {
                "holderIdentity": self.node_name,
                "leaseDurationSeconds": 40,
                "renewTime": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            },
        }
        try:
            self.coordination.patch_namespaced_lease(
                self.node_name, "kube-node-lease", lease, _content_type="application/merge-patch+json"
            )
        except ApiException as error:
            if error.status != 404:
                raise
            self.coordination.create_namespaced_lease("kube-node-lease", lease)  # type: ignore[arg-type]

    def _heartbeats(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self._heartbeat()
            except Exception as error:  # a missed beat is retried; the grace period is 40 s
                log.warning("node %s heartbeat failed: %s", self.node_name, error)

    def stop(self) -> None:
        """Kill every container, remove the pods bound here and the Node itself."""
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()  # type: ignore[no-untyped-call]
        with self._lock:
            runs = list(self.pods.values())
        for run in runs:
            run.stopping = True
            for container in run.containers:
                signal_container(run.mark(container.name), signal.SIGKILL)
        for run in runs:
            with contextlib.suppress(ApiException):
                self.core.delete_namespaced_pod(run.name, run.namespace, grace_period_seconds=0)
        with contextlib.suppress(ApiException):
            self.core.delete_node(self.node_name)
        with contextlib.suppress(ApiException):
            self.coordination.delete_namespaced_lease(self.node_name, "kube-node-lease")
        log.info("node %s removed", self.node_name)

    # ------------------------------------------------------------------------------------- test hooks

    def find(self, namespace: str, name: str) -> PodRun | None:
        with self._lock:
            return self.pods.get((namespace, name))

    def kill(
        self, namespace: str, name: str, container: str | None = None, reason: str = "OOMKilled"
    ) -> None:
        """SIGKILL every process of a container (the first by default), as the OOM killer does to a cgroup.

        The container then reports exit code 137 and `reason`, like the kubelet after an OOM kill.
        """
        run = self.find(namespace, name)
        assert run is not None, f"pod {namespace}/{name} does not run on {self.node_name}"
        target = next(c for c in run.containers if container in (None, c.name))
        target.kill_reason = reason
        killed = signal_container(run.mark(target.name), signal.SIGKILL)
        log.info("killed %d processes of %s/%s:%s (%s)", killed, namespace, name, target.name, reason)

    def log_path(self, namespace: str, name: str, container: str | None = None) -> Path | None:
        """The log file of a container's current (or last) run."""
        run = self.find(namespace, name)
        if run is None:
            return None
        return next((c.log_path for c in run.containers if container in (None, c.name)), None)

    # ------------------------------------------------------------------------------------- pod events

    def _watch_pods(self) -> None:
        selector = f"spec.nodeName={self.node_name}"
        while not self._stop.is_set():
            try:
                listed = self._json(self.core.list_pod_for_all_namespaces, field_selector=selector)
                for pod in listed["items"]:
                    self._on_pod("ADDED", pod)
                # A pod deleted while the watch was down sends no event: stop what the list no longer has.
                present = {pod["metadata"]["uid"] for pod in listed["items"]}
                with self._lock:
                    gone = [run for run in self.pods.values() if run.uid not in present and not run.stopping]
                for run in gone:
                    self._terminate(run, grace=0.0, delete=False)
                self._watch = watch.Watch()  # type: ignore[no-untyped-call]
                for event in self._watch.stream(  # type: ignore[no-untyped-call]
                    self.core.list_pod_for_all_namespaces,
                    field_selector=selector,
                    resource_version=listed["metadata"]["resourceVersion"],
                    allow_watch_bookmarks=True,
                ):
                    if self._stop.is_set():
                        return
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        self._on_pod(event["type"], event["raw_object"])
            except Exception as error:
                if not self._stop.is_set():
                    log.warning("pod watch of %s restarts after: %s", self.node_name, error)
                    time.sleep(1)

    def _on_pod(self, event: str, pod: Manifest) -> None:
        meta = pod["metadata"]
        key = (meta["namespace"], meta["name"])
        with self._lock:
            run = self.pods.get(key)
            if run is not None and run.uid != meta["uid"]:
                run = None  # an older pod of the same name; its own stop is under way
            if event == "DELETED":
                if run is not None and not run.stopping:
                    self._terminate(run, grace=0.0, delete=False)
                return
            if run is None:
                if meta.get("deletionTimestamp"):
                    self._final_delete(pod)
                    return
                if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                    return  # ended before this stand-in started, or already reported
                run = self._admit(pod)
                self.pods[key] = run
                threading.Thread(
                    target=self._run_pod, args=(run,), name=f"pod-{meta['name']}", daemon=True
                ).start()
                return
        run.pod = pod
        if meta.get("deletionTimestamp") and not run.stopping:
            grace = float(meta.get("deletionGracePeriodSeconds") or 0)
            self._terminate(run, grace=grace, delete=True)

    def _admit(self, pod: Manifest) -> PodRun:
        meta = pod["metadata"]
        folder = self.root / meta["namespace"] / f"{meta['name']}-{meta['uid'][:8]}"
        for sub in ("volumes", "logs", "home", "tmp", "containers"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        containers = [ContainerRun(spec=spec) for spec in pod["spec"]["containers"]]
        log.info("pod %s/%s bound to %s", meta["namespace"], meta["name"], self.node_name)
        return PodRun(
            namespace=meta["namespace"],
            name=meta["name"],
            uid=meta["uid"],
            folder=folder,
            ip=pod_address(meta["namespace"], meta["name"]),
            pod=pod,
            containers=containers,
        )

    # ---------------------------------------------------------------------------------------- running

    def _run_pod(self, run: PodRun) -> None:
        try:
            self._write_status(run)
            self._materialise_volumes(run)
        except ContainerConfigError as error:
            for container in run.containers:
                container.state = {"waiting": {"reason": error.reason, "message": str(error)}}
            self._write_status(run)
            return
        except Exception:
            log.exception("pod %s/%s could not be set up", *run.key)
            return
        threads = [
            threading.Thread(
                target=self._run_container, args=(run, c), name=f"{run.name}-{c.name}", daemon=True
            )
            for c in run.containers
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self._write_status(run)

    def _run_container(self, run: PodRun, container: ContainerRun) -> None:
        policy = run.pod["spec"].get("restartPolicy", "Always")
        backoff = iter(RESTART_BACKOFF_SECONDS)
        delay = 0.0
        while not run.stopping:
            try:
                argv, env, cwd, message_file = self._prepare(run, container)
            except ContainerConfigError as error:
                container.state = {"waiting": {"reason": error.reason, "message": str(error)}}
                self._write_status(run)
                if self._stop.wait(2) or run.stopping:
                    break
                continue
            container.log_path = run.folder / "logs" / f"{container.name}-{container.restart_count}.log"
            message_file.parent.mkdir(parents=True, exist_ok=True)
            message_file.write_bytes(b"")
            container.kill_reason = None
            with container.log_path.open("ab") as log_file:
                try:
                    container.process = subprocess.Popen(
                        argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log_file,
                        stderr=subprocess.STDOUT, start_new_session=True,
                    )  # fmt: skip
                except OSError as error:
                    container.state = {"waiting": {"reason": "RunContainerError", "message": str(error)}}
                    self._write_status(run)
                    break
            started = now()
            container.state = {"running": {"startedAt": started}}
            container.ready = not container.spec.get("readinessProbe")
            log.info(
                "started %s/%s:%s (pid %d): %s",
                *run.key,
                container.name,
                container.process.pid,
                " ".join(argv),
            )
            self._write_status(run)
            code = self._wait(run, container)
            # The container's other processes go with its main one, as a container's do.
            signal_container(run.mark(container.name), signal.SIGKILL)
            container.ready = False
            terminated = self._terminated(container, code, started, message_file)
            container.state = {"terminated": terminated}
            log.info(
                "%s/%s:%s exited %d (%s)%s", *run.key, container.name, code, terminated["reason"],
                f": {terminated['message'][:200]}" if terminated.get("message") else "",
            )  # fmt: skip
            restart = policy == "Always" or (policy == "OnFailure" and code != 0)
            if not restart or run.stopping:
                break
            self._write_status(run)
            delay = next(backoff, RESTART_BACKOFF_SECONDS[-1])
            container.last_state = container.state
            container.state = {"waiting": {"reason": "CrashLoopBackOff", "message": f"back-off {delay:.0f}s"}}
            container.restart_count += 1
            self._write_status(run)
            if self._stop.wait(delay):
                break
        container.done = True
        self._write_status(run)

    def _wait(self, run: PodRun, container: ContainerRun) -> int:
        """Wait for the main process, probing readiness meanwhile; the exit code as the kubelet gives it."""
        assert container.process is not None
        probe = container.spec.get("readinessProbe") or {}
        period = float(probe.get("periodSeconds", 10)) if probe else 1.0
        next_probe = time.monotonic() + float(probe.get("initialDelaySeconds", 0))
        while True:
            try:
                code = container.process.wait(timeout=min(period, 1.0))
                return code if code >= 0 else 128 - code
            except subprocess.TimeoutExpired:
                pass
            if probe and time.monotonic() >= next_probe:
                next_probe = time.monotonic() + period
                ready = self._probe(run, container, probe)
                if ready != container.ready:
                    container.ready = ready
                    self._write_status(run)

    def _probe(self, run: PodRun, container: ContainerRun, probe: Manifest) -> bool:
        http = probe.get("httpGet")
        if not http:
            return True  # exec and tcpSocket probes are not stood in
        port = http["port"]
        if isinstance(port, str):
            port = next(p["containerPort"] for p in container.spec.get("ports", []) if p.get("name") == port)
        url = f"http://{http.get('host') or run.ip}:{port}{http.get('path', '/')}"
        try:
            with urllib.request.urlopen(url, timeout=float(probe.get("timeoutSeconds", 1))) as response:
                return bool(200 <= response.status < 400)
        except Exception:
            return False

    def _terminated(self, container: ContainerRun, code: int, started: str, message_file: Path) -> Manifest:
        reason = container.kill_reason or ("Completed" if code == 0 else "Error")
        message = message_file.read_bytes()[:MAX_TERMINATION_MESSAGE].decode(errors="replace")
        policy = container.spec.get("terminationMessagePolicy", "File")
        if not message.strip() and code != 0 and policy == "FallbackToLogsOnError" and container.log_path:
            tail = container.log_path.read_bytes().splitlines()[-FALLBACK_LOG_LINES:]
            message = b"\n".join(tail)[-FALLBACK_LOG_BYTES:].decode(errors="replace")
        terminated: Manifest = {
            "exitCode": code,
            "reason": reason,
            "startedAt": started,
            "finishedAt": now(),
            "containerID": f"standin://{container.process.pid if container.process else 0}",
        }
        if message.strip():
            terminated["message"] = message
        return terminated

    def _terminate(self, run: PodRun, grace: float, delete: bool) -> None:
        """Graceful stop in a thread of its own: SIGTERM, the grace period, SIGKILL, then the final delete."""
        run.stopping = True

        def stop() -> None:
            for container in run.containers:
                if container.process and container.process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        container.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(
                c.process and c.process.poll() is None for c in run.containers
            ):
                time.sleep(0.1)
            for container in run.containers:
                signal_container(run.mark(container.name), signal.SIGKILL)
            for container in run.containers:
                if container.process:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        container.process.wait(timeout=10)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not all(c.done or not c.process for c in run.containers):
                time.sleep(0.1)
            with self._lock:
                if self.pods.get(run.key) is run:
                    del self.pods[run.key]
            if delete:
                self._final_delete(run.pod)
            log.info("pod %s/%s stopped%s", *run.key, " and removed" if delete else "")

        threading.Thread(target=stop, name=f"stop-{run.name}", daemon=True).start()

    def _final_delete(self, pod: Manifest) -> None:
        meta = pod["metadata"]
        with contextlib.suppress(ApiException):
            self.core.delete_namespaced_pod(
                meta["name"],
                meta["namespace"],
                body=client.V1DeleteOptions(
                    grace_period_seconds=0, preconditions=client.V1Preconditions(uid=meta["uid"])
                ),
            )

    # ----------------------------------------------------------------------------------------- status

    def _write_status(self, run: PodRun) -> None:
        """Everything the kubelet reports for the pod, patched when it changed."""
        with run.lock:
            containers = run.containers
            running = any("running" in c.state for c in containers)
            if all(c.done for c in containers) and all("terminated" in c.state for c in containers):
                codes = [c.state["terminated"]["exitCode"] for c in containers]
                phase = "Succeeded" if all(code == 0 for code in codes) else "Failed"
            elif running or any(c.restart_count or c.last_state for c in containers):
                phase = "Running"
            else:
                phase = "Pending"
            ready = running and all(c.ready for c in containers)
            values = {
                "PodReadyToStartContainers": "True",
                "Initialized": "True",
                "ContainersReady": str(ready),
                "Ready": str(ready),
            }
            conditions = []
            for kind, value in values.items():
                previous = run.transitions.get(kind)
                if previous is None or not previous.startswith(value + "@"):
                    run.transitions[kind] = f"{value}@{now()}"
                conditions.append(
                    {
                        "type": kind,
                        "status": value,
                        "lastTransitionTime": run.transitions[kind].split("@", 1)[1],
                    }
                )
            status = {
                "phase": phase,
                "conditions": conditions,
                "hostIP": "127.0.0.1",
                "hostIPs": [{"ip": "127.0.0.1"}],
                "podIP": run.ip,
                "podIPs": [{"ip": run.ip}],
                "startTime": run.started_at,
                "containerStatuses": [c.status() for c in containers],
            }
            if status == run.written:
                return
            try:
                self.core.patch_namespaced_pod_status(
                    run.name,
                    run.namespace,
                    {"metadata": {"uid": run.uid}, "status": status},
                    _content_type="application/strategic-merge-patch+json",
                )
                run.written = status
            except ApiException as error:
                if error.status not in (404, 409):
                    log.warning("status of %s/%s not written: %s", *run.key, error)

    # ------------------------------------------------------------------------------------- the sandbox

    def _json(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Manifest:
        response = call(*args, _preload_content=False, **kwargs)
        result: Manifest = json.loads(response.data)
        return result

    def _read(self, kind: str, namespace: str, name: str) -> Manifest | None:
        if kind == "persistentvolume":
            call, args = self.core.read_persistent_volume, (name,)
        else:
            call = {
                "configmap": self.core.read_namespaced_config_map,
                "secret": self.core.read_namespaced_secret,
                "persistentvolumeclaim": self.core.read_namespaced_persistent_volume_claim,
            }[kind]
            args = (name, namespace)
        try:
            return self._json(call, *args)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def _object_data(self, kind: str, namespace: str, name: str, optional: bool) -> dict[str, bytes] | None:
        found = self._read(kind, namespace, name)
        if found is None:
            if optional:
                return None
            raise ContainerConfigError("CreateContainerConfigError", f'{kind} "{name}" not found')
        data: dict[str, bytes] = {}
        if kind == "secret":
            data.update({key: base64.b64decode(value) for key, value in (found.get("data") or {}).items()})
        else:
            data.update({key: value.encode() for key, value in (found.get("data") or {}).items()})
            data.update({key: base64.b64decode(v) for key, v in (found.get("binaryData") or {}).items()})
        return data

    def _field(self, run: PodRun, path: str) -> str:
        meta, spec = run.pod["metadata"], run.pod["spec"]
        simple = {
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"],
            "spec.nodeName": self.node_name,
            "spec.serviceAccountName": spec.get("serviceAccountName", ""),
            "status.podIP": run.ip,
            "status.podIPs": run.ip,
            "status.hostIP": "127.0.0.1",
            "status.hostIPs": "127.0.0.1",
        }
        if path in simple:
            return str(simple[path])
        match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if match:
            return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
        if path in ("metadata.labels", "metadata.annotations"):
            items = (meta.get(path.split(".")[1]) or {}).items()
            return "\n".join(f'{key}="{value}"' for key, value in sorted(items))
        raise ContainerConfigError("CreateContainerConfigError", f"fieldRef {path} is not stood in")

    def _materialise_volumes(self, run: PodRun) -> None:
        """Write every volume of the pod into `volumes/<name>/`."""
        for volume in run.pod["spec"].get("volumes", []):
            target = run.folder / "volumes" / volume["name"]
            if "persistentVolumeClaim" in volume:
                self._link_claim(run, volume["persistentVolumeClaim"], target)
                continue
            target.mkdir(parents=True, exist_ok=True)
            files: dict[str, bytes] = {}
            if "emptyDir" in volume:
                continue
            if "configMap" in volume or "secret" in volume:
                files = self._projected_source(run, volume)
            elif "projected" in volume:
                for source in volume["projected"].get("sources", []):
                    files.update(self._projected_source(run, source))
            elif "downwardAPI" in volume:
                files = self._projected_source(run, volume)
            else:
                kinds = ", ".join(sorted(set(volume) - {"name"}))
                raise ContainerConfigError(
                    "CreateContainerConfigError", f"volume type {kinds} is not stood in"
                )
            for relative, content in files.items():
                path = target / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content)
            if {"token", "ca.crt"} <= set(files):
                self._write_kubeconfig(target, files["token"], files["ca.crt"], run.namespace)

    def _link_claim(self, run: PodRun, source: Manifest, target: Path) -> None:
        """A PersistentVolumeClaim volume: the folder of the PersistentVolume the claim is bound to (a
        `hostPath` or `local` volume: this machine's folder), linked in as the volume's folder."""
        name = str(source.get("claimName"))
        claim = self._read("persistentvolumeclaim", run.namespace, name)
        if claim is None:
            raise ContainerConfigError(
                "CreateContainerConfigError", f'persistentvolumeclaim "{name}" not found'
            )
        bound = (claim.get("status") or {}).get("phase") == "Bound"
        volume_name = (claim.get("spec") or {}).get("volumeName")
        volume = self._read("persistentvolume", "", volume_name) if bound and volume_name else None
        if volume is None:
            raise ContainerConfigError(
                "CreateContainerConfigError", f'persistentvolumeclaim "{name}" is not bound to a volume'
            )
        spec = volume.get("spec") or {}
        folder = (spec.get("hostPath") or spec.get("local") or {}).get("path")
        if not folder:
            kinds = ", ".join(sorted(set(spec) & {"csi", "nfs", "iscsi", "awsElasticBlockStore"})) or "this"
            raise ContainerConfigError(
                "CreateContainerConfigError",
                f"persistentvolume {volume_name}: {kinds} volume type is not stood in",
            )
        if not target.is_symlink():
            target.symlink_to(Path(folder), target_is_directory=True)

    def _projected_source(self, run: PodRun, source: Manifest) -> dict[str, bytes]:
        """Files of one volume source (also used for whole configMap/secret/downwardAPI volumes)."""
        if "configMap" in source or "secret" in source:
            kind = "configmap" if "configMap" in source else "secret"
            ref = source.get("configMap") or source.get("secret") or {}
            name = str(ref.get("name") or ref.get("secretName"))
            data = self._object_data(kind, run.namespace, name, bool(ref.get("optional")))
            if data is None:
                return {}
            items = ref.get("items")
            if not items:
                return data
            missing = [item["key"] for item in items if item["key"] not in data]
            if missing and not ref.get("optional"):
                raise ContainerConfigError(
                    "CreateContainerConfigError", f"{kind} {name} has no key {missing[0]}"
                )
            return {item["path"]: data[item["key"]] for item in items if item["key"] in data}
        if "downwardAPI" in source:
            return {
                item["path"]: self._field(run, item["fieldRef"]["fieldPath"]).encode()
                for item in source["downwardAPI"].get("items", [])
                if "fieldRef" in item
            }
        if "serviceAccountToken" in source:
            token = source["serviceAccountToken"]
            return {token.get("path", "token"): self._token(run, token).encode()}
        raise ContainerConfigError(
            "CreateContainerConfigError", f"volume source {sorted(source)} is not stood in"
        )

    def _token(self, run: PodRun, source: Manifest) -> str:
        """A TokenRequest token of the pod's ServiceAccount, bound to the pod, as the kubelet asks for it."""
        spec: Manifest = {
            "expirationSeconds": int(source.get("expirationSeconds", 3607)),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": run.name, "uid": run.uid},
        }
        if source.get("audience"):
            spec["audiences"] = [source["audience"]]
        account = run.pod["spec"].get("serviceAccountName", "default")
        answer = self._json(
            self.core.create_namespaced_service_account_token,
            account,
            run.namespace,
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
        )
        return str(answer["status"]["token"])

    def _write_kubeconfig(self, folder: Path, token: bytes, ca: bytes, namespace: str) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "in-cluster",
                    "cluster": {
                        "server": self.api_client.configuration.host,
                        "certificate-authority-data": base64.b64encode(ca).decode(),
                    },
                }
            ],
            "users": [{"name": "service-account", "user": {"token": token.decode()}}],
            "contexts": [
                {
                    "name": "in-cluster",
                    "context": {"cluster": "in-cluster", "user": "service-account", "namespace": namespace},
                }
            ],
            "current-context": "in-cluster",
        }
        (folder / "kubeconfig").write_text(json.dumps(config, indent=2))

    def _prepare(self, run: PodRun, container: ContainerRun) -> tuple[list[str], dict[str, str], Path, Path]:
        """argv, environment, working directory and termination-message file of one container run."""
        spec = container.spec
        image = self.images.get(image_repository(spec.get("image", "")))
        if image is None and not spec.get("command"):
            raise ContainerConfigError(
                "ErrImagePull", f"image {spec.get('image')!r} is not in the stand-in's table"
            )
        image = image or Image()
        mounts = {
            mount["mountPath"].rstrip("/"): run.folder / "volumes" / mount["name"] / mount.get("subPath", "")
            for mount in spec.get("volumeMounts", [])
        }
        message_path = spec.get("terminationMessagePath", "/dev/termination-log")
        message_file = run.folder / "containers" / container.name / "termination-log"
        mounts[message_path] = message_file

        # The pod's root: each mountPath a link to its volume, so that a folder above mount paths (a
        # variable naming /mnt/pvc, under which each claim is mounted) holds them as the container sees them.
        root = run.folder / "root"
        for mount_path, folder in mounts.items():
            link = root / mount_path.lstrip("/")
            if mount_path.startswith("/") and not link.is_symlink() and folder != message_file:
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(folder)

        def rewrite(value: str) -> str:
            prefix, _, rest = (
                value.partition("=") if value.startswith("-") and "=" in value else ("", "", value)
            )
            for mount_path in sorted(mounts, key=len, reverse=True):
                if rest == mount_path or rest.startswith(mount_path + "/"):
                    rest = str(mounts[mount_path]) + rest[len(mount_path) :]
                    break
            else:
                folder = rest.rstrip("/")
                if folder.startswith("/") and any(m.startswith(folder + "/") for m in mounts):
                    rest = str(root) + rest
            return f"{prefix}={rest}" if prefix else rest

        tmp = mounts.get("/tmp", run.folder / "tmp")
        env: dict[str, str] = {
            "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(run.folder / "home"),
            "TMPDIR": str(tmp),
            "HOSTNAME": run.name,
            "LANG": "C.UTF-8",
        }
        service_account = mounts.get(SERVICE_ACCOUNT_MOUNT)
        if service_account is not None and (service_account / "kubeconfig").exists():
            env["KUBECONFIG"] = str(service_account / "kubeconfig")
        for source in spec.get("envFrom", []):
            kind = "configmap" if "configMapRef" in source else "secret"
            ref = source.get("configMapRef") or source.get("secretRef") or {}
            data = self._object_data(kind, run.namespace, ref["name"], bool(ref.get("optional"))) or {}
            env.update({source.get("prefix", "") + key: value.decode() for key, value in data.items()})
        for variable in spec.get("env", []):
            value = self._env_value(run, variable, env)
            if value is not None:  # an optional key that is missing sets no variable, as the kubelet does
                env[variable["name"]] = rewrite(value)
        for name, value in list(env.items()):
            if ADDRESS_VARIABLE.search(name):
                env[name] = self._resolve(run.namespace, value)
        env[CONTAINER_MARK] = run.mark(container.name)
        argv = [rewrite(expand(part, env)) for part in image.argv(spec.get("command"), spec.get("args"))]
        if not argv:
            raise ContainerConfigError(
                "RunContainerError", "no command: neither the container nor its image has one"
            )
        workdir = spec.get("workingDir")
        cwd = Path(rewrite(workdir)) if workdir else run.folder / "home"
        if not cwd.is_dir():
            cwd = run.folder / "home"
        return argv, env, cwd, message_file

    def _env_value(self, run: PodRun, variable: Manifest, defined: Mapping[str, str]) -> str | None:
        if "valueFrom" not in variable:
            return expand(str(variable.get("value", "")), defined)
        source = variable["valueFrom"]
        if "fieldRef" in source:
            return self._field(run, source["fieldRef"]["fieldPath"])
        for key, kind in (("secretKeyRef", "secret"), ("configMapKeyRef", "configmap")):
            if key in source:
                ref = source[key]
                data = self._object_data(kind, run.namespace, ref["name"], bool(ref.get("optional")))
                if data is None or ref["key"] not in data:
                    if ref.get("optional"):
                        return None
                    raise ContainerConfigError(
                        "CreateContainerConfigError", f"{kind} {ref['name']} has no key {ref['key']}"
                    )
                return data[ref["key"]].decode()
        raise ContainerConfigError(
            "CreateContainerConfigError", f"env {variable['name']}: source not stood in"
        )

    def _resolve(self, namespace: str, value: str) -> str:
        """Cluster DNS for one address value: a Service's name becomes a pod address; anything else stays."""
        host, colon, port = value.partition(":")
        parts = host.split(".")
        local = len(parts) == 1 or (len(parts) >= 2 and (len(parts) == 2 or parts[2] == "svc"))
        if (
            not host
            or host == "localhost"
            or not local
            or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", parts[0])
        ):
            return value
        service_namespace = parts[1] if len(parts) >= 2 else namespace
        deadline = time.monotonic() + NAME_RESOLUTION_WAIT_SECONDS
        while True:
            try:
                service = self._json(self.core.read_namespaced_service, parts[0], service_namespace)
                break
            except ApiException as error:
                if (
                    error.status != 404
                    or len(parts) > 1
                    or time.monotonic() > deadline
                    or self._stop.is_set()
                ):
                    return value  # not a Service (a hostname of another kind, or none yet): left as it is
                time.sleep(0.5)
        selector = service["spec"].get("selector") or {}
        address = pod_address(service_namespace, parts[0])
        if selector:
            labels = ",".join(f"{key}={val}" for key, val in selector.items())
            pods = self._json(self.core.list_namespaced_pod, service_namespace, label_selector=labels)[
                "items"
            ]
            live = [
                p
                for p in pods
                if not p["metadata"].get("deletionTimestamp") and p.get("status", {}).get("podIP")
            ]
            if live:
                address = live[0]["status"]["podIP"]
        return address + colon + port


# ------------------------------------------------------------------------------------------------ a pool


@dataclass
class StandInNodes:
    """Stand-in nodes of one test group: what a pod must say to land there, and the test hooks."""

    group: str
    kubelets: list[StandInKubelet]

    @property
    def node_selector(self) -> dict[str, str]:
        return {NODE_LABEL: self.group}

    @property
    def tolerations(self) -> list[dict[str, str]]:
        return [{"key": NODE_LABEL, "operator": "Equal", "value": self.group, "effect": "NoSchedule"}]

    def running(self, namespace: str, name: str) -> tuple[StandInKubelet, PodRun] | None:
        for kubelet in self.kubelets:
            run = kubelet.find(namespace, name)
            if run is not None:
                return kubelet, run
        return None

    def kill(self, namespace: str, name: str, reason: str = "OOMKilled") -> None:
        found = self.running(namespace, name)
        assert found is not None, f"pod {namespace}/{name} runs on no stand-in node"
        found[0].kill(namespace, name, reason=reason)

    def log_path(self, namespace: str, name: str) -> Path | None:
        found = self.running(namespace, name)
        return found[0].log_path(namespace, name) if found else None

    def log_files(self, namespace: str, name: str) -> list[Path]:
        """The log files of every run of a pod name on these nodes (re-created pods included), oldest first."""
        found = [path for k in self.kubelets for path in k.root.glob(f"{namespace}/{name}-*/logs/*.log")]
        return sorted(found, key=lambda path: path.stat().st_mtime)

    def logs(self, namespace: str | None = None) -> str:
        """Every container log of these nodes (all runs), headed by its file name: for a failing test's output."""
        texts = []
        for kubelet in self.kubelets:
            pattern = f"{namespace or '*'}/*/logs/*.log"
            for path in sorted(kubelet.root.glob(pattern), key=lambda p: p.stat().st_mtime):
                texts.append(f"===== {path.relative_to(kubelet.root)}\n{path.read_text(errors='replace')}")
        return "\n".join(texts)


@contextlib.contextmanager
def stand_in_nodes(
    api_client: client.ApiClient, root: Path, images: Mapping[str, Image], count: int = 1
) -> Iterator[StandInNodes]:
    """`count` stand-in nodes with names unique to this call (several test sessions may share a cluster)."""
    group = f"standin-{os.getpid()}-{os.urandom(2).hex()}"
    kubelets = [
        StandInKubelet(api_client, f"{group}-{index}", root / f"node-{index}", images, group)
        for index in range(count)
    ]
    started: list[StandInKubelet] = []
    try:
        for kubelet in kubelets:
            kubelet.start()
            started.append(kubelet)
        yield StandInNodes(group=group, kubelets=kubelets)
    finally:
        for kubelet in started:
            kubelet.stop()
