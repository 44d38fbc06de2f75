"""The pod's exit code decides whether the PyTorchJob restarts it (128 and up, restartPolicy ExitCode) or fails
for good (1-127). torchrun exits 1 for any failure, so the pods run torchrun through kubetune's launcher, which
exits with the root cause's code. These tests run the real torchrun with small stand-in workers."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path

import pytest
from tests.support.seaweedfs import free_port

from kubetune_trainer.launch import wait_for_a_fresh_master
from kubetune_trainer.termination import EXIT_PEER_LOST, TERMINATION_LOG_ENV, reason_for

pytestmark = pytest.mark.trainer

GLOO_PEER_GONE = (
    "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:31888: "
    "Connection reset by peer. This is typically caused by a remote worker hanging."
)


def launch(
    tmp_path: Path,
    worker: str,
    launcher: list[str] | None = None,
    nodes: Sequence[str] = ("--standalone",),
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[str]:
    """Start `worker` (Python source) as one process under the launcher (or the given command), on one node
    of its own unless `nodes` says otherwise."""
    script = tmp_path / "worker.py"
    script.write_text(worker)
    command = launcher or [sys.executable, "-m", "kubetune_trainer.launch"]
    environment = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1", **(env or {})}
    environment.pop("PET_NODE_RANK", None)  # the node rank comes from `nodes` alone
    return subprocess.Popen(
        [*command, *nodes, "--nproc_per_node=1", str(script)],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def exit_code(process: subprocess.Popen[str]) -> int:
    process.communicate(timeout=120)
    return process.returncode


def test_a_lost_peer_is_retryable_and_a_bug_is_not() -> None:
    import torch.distributed

    assert reason_for(RuntimeError(GLOO_PEER_GONE)) == ("PeerLost", EXIT_PEER_LOST)
    assert reason_for(torch.distributed.DistNetworkError("failed to recv, got 0 bytes")) == (
        "PeerLost",
        EXIT_PEER_LOST,
    )
    assert reason_for(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) == ("RuntimeError", 2)
    assert EXIT_PEER_LOST >= 128 + 64, "retryable, and never the code of a signal"


def test_plain_torchrun_turns_a_retryable_exit_into_a_permanent_one(tmp_path: Path) -> None:
    """Why the launcher exists: the trainer's 143 after a preemption checkpoint reaches the pod as 1."""
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    assert exit_code(launch(tmp_path, "raise SystemExit(143)", torchrun)) == 1


@pytest.mark.parametrize("code", [0, 1, EXIT_PEER_LOST])
def test_the_launcher_exits_with_the_workers_code(tmp_path: Path, code: int) -> None:
    assert exit_code(launch(tmp_path, f"raise SystemExit({code})")) == code


def test_a_node_that_cannot_meet_its_master_exits_peer_lost_and_says_why(tmp_path: Path) -> None:
    """The worker pod of a master that is gone: retryable (the pod is re-created and meets the next master), and
    the pod's termination message, which the FineTuneJob's status quotes, names the rendezvous."""
    log = tmp_path / "termination-log"
    nobody = free_port()
    second_of_two = (
        "--nnodes=2",
        "--node_rank=1",
        "--master_addr=127.0.0.1",
        f"--master_port={nobody}",
        "--rdzv_conf=timeout=3",
    )
    process = launch(
        tmp_path, "raise SystemExit(0)", nodes=second_of_two, env={TERMINATION_LOG_ENV: str(log)}
    )
    output, _ = process.communicate(timeout=120)
    assert process.returncode == EXIT_PEER_LOST, output[-2000:]
    assert log.read_text().startswith("PeerLost: rendezvous with the other nodes failed (")


def test_a_worker_killed_by_the_oom_killer_exits_137(tmp_path: Path) -> None:
    assert exit_code(launch(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")) == 137


def test_a_preempted_pod_exits_143_after_its_worker_stopped(tmp_path: Path) -> None:
    """SIGTERM reaches torchrun (the container's main process); it stops the worker, the pod exits 143."""
    stopped = tmp_path / "stopped"
    worker = (
        "import signal, sys, time, pathlib\n"
        "def stop(*_):\n"
        f"    pathlib.Path({str(stopped)!r}).write_text('checkpointed')\n"
        "    sys.exit(143)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        f"pathlib.Path({str(tmp_path / 'started')!r}).touch()\n"
        "time.sleep(120)\n"
    )
    process = launch(tmp_path, worker)
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").exists():
        assert time.monotonic() < deadline and process.poll() is None, "the worker never started"
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    assert exit_code(process) == 143
    assert stopped.read_text() == "checkpointed"


def test_a_replacement_worker_waits_for_the_master_of_a_new_round() -> None:
    """A worker pod re-created while the master of its old round still runs must not join that round: the
    master replacing it would wait for a node that already checked in elsewhere."""
    from torch.distributed import TCPStore

    port, key = free_port(), "kubetune/demo/node-1"
    old_round = TCPStore("127.0.0.1", port, None, True, timedelta(seconds=10), wait_for_workers=False)
    assert wait_for_a_fresh_master("127.0.0.1", port, key, timeout=10), "the first worker joins at once"
    assert not wait_for_a_fresh_master("127.0.0.1", port, key, timeout=2, poll=0.2), "its replacement waits"

    claimed: list[bool] = []
    replacement = threading.Thread(
        target=lambda: claimed.append(wait_for_a_fresh_master("127.0.0.1", port, key, timeout=60, poll=0.2))
    )
    replacement.start()
    time.sleep(1)
    del old_round  # the old master goes away ...
    gc.collect()
    new_round = TCPStore("127.0.0.1", port, None, True, timedelta(seconds=10), wait_for_workers=False)
    replacement.join(timeout=60)  # ... and the replacement joins the new one
    assert claimed == [True]
    assert new_round.get(key)
