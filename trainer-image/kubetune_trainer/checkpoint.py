"""Checkpoints under the output URI: uploaded after every save, marked complete only when
every node's files are up, pruned to the newest K, and found again on start for resume.

The Trainer writes ``checkpoint-N`` folders to a node-local staging folder (each rank its
own RNG state and, under ZeRO, its own optimizer shards). After a save, each node's local
rank 0 uploads what its node wrote; after a barrier, global rank 0 writes
``kubetune-checkpoint.json`` into the folder. A folder without that marker is ignored on
resume, so a pod killed mid-upload costs one checkpoint, never a corrupt resume.
"""

from __future__ import annotations

import logging
import re
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from . import distributed
from .publish import Destination, upload_folder
from .storage import resolve_source

log = logging.getLogger(__name__)

CHECKPOINT_MARKER = "kubetune-checkpoint.json"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class CheckpointStore:
    """The checkpoint folder of one job (``checkpoint.uri`` or ``<output.uri>/checkpoints``)."""

    def __init__(self, uri: str, destination: Destination | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.destination = destination or Destination(self.uri)

    def markers(self) -> dict[int, dict[str, Any]]:
        """The markers of complete checkpoints by step."""
        found = {}
        for name in self.destination.folders():
            match = CHECKPOINT_PATTERN.match(name)
            if match:
                marker = self.destination.get_json(f"{name}/{CHECKPOINT_MARKER}")
                if marker is not None:
                    found[int(match.group(1))] = marker
        return found

    def complete_steps(self) -> list[int]:
        """Steps of the checkpoints whose marker exists, oldest first."""
        return sorted(self.markers())

    def upload(self, local_checkpoint: Path) -> None:
        upload_folder(local_checkpoint, self.destination, under=local_checkpoint.name)

    def mark_complete(self, step: int, info: dict[str, Any]) -> None:
        marker = {"step": step, "completedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **info}
        self.destination.put_json(f"checkpoint-{step}/{CHECKPOINT_MARKER}", marker)

    def prune(self, keep: int) -> list[int]:
        """Delete all but the newest ``keep`` complete checkpoints, and unfinished ones older than those."""
        complete = self.complete_steps()
        kept = set(complete[-keep:])
        oldest_kept = min(kept) if kept else None
        removed = []
        for name in self.destination.folders():
            match = CHECKPOINT_PATTERN.match(name)
            if not match:
                continue
            step = int(match.group(1))
            stale_complete = step in complete and step not in kept
            stale_partial = step not in complete and oldest_kept is not None and step < oldest_kept
            if stale_complete or stale_partial:
                # The marker goes first: a half-deleted folder is never taken for a complete one.
                self.destination.delete(f"{name}/{CHECKPOINT_MARKER}")
                self.destination.delete(f"{name}/")
                removed.append(step)
        return removed

    def fetch(self, step: int) -> Path:
        """A local folder holding checkpoint ``step`` (downloaded once per node for S3)."""
        return resolve_source(f"{self.uri}/checkpoint-{step}", revision=f"checkpoint-{step}")

    def newest(self, spec_digest: str | None = None) -> Path | None:
        """The newest complete checkpoint written for this spec (a changed spec starts afresh)."""
        markers = self.markers()
        steps = sorted(
            s for s, m in markers.items() if spec_digest is None or m.get("specHash") in (None, spec_digest)
        )
        if not steps:
            if markers:
                log.warning("ignoring checkpoints under %s: they were written for another spec", self.uri)
            return None
        log.info("resuming from %s/checkpoint-%d", self.uri, steps[-1])
        return self.fetch(steps[-1])


class CheckpointSyncCallback(TrainerCallback):
    """After each save: upload the node's files, barrier, mark complete, prune."""

    def __init__(
        self, store: CheckpointStore, keep: int, spec_digest: str | None = None, metrics: Any = None
    ) -> None:
        self.store = store
        self.keep = keep
        self.spec_digest = spec_digest
        self.metrics = metrics

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        local = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
        barrier()  # every rank has written its part
        if distributed.is_local_main_process() and local.exists():
            self.store.upload(local)
        barrier()  # every node has uploaded
        if distributed.is_main_process():
            self.store.mark_complete(
                state.global_step,
                {"epoch": state.epoch, "worldSize": distributed.world_size(), "specHash": self.spec_digest},
            )
            removed = self.store.prune(self.keep)
            log.info(
                "checkpoint %d complete at %s (pruned %s)",
                state.global_step,
                self.store.uri,
                removed or "none",
            )
        if self.metrics is not None:
            self.metrics.checkpoints.inc()
            self.metrics.checkpoint_timestamp.set(time.time())
        barrier()


class PreemptionCallback(TrainerCallback):
    """On SIGTERM (eviction, preemption, node drain): save a checkpoint at the next step and stop.

    The signal may reach only some ranks (one pod evicted), so the decision is all-reduced
    every step: saving is collective and every rank must take part.
    """

    def __init__(self) -> None:
        self.requested = False
        self.stopped = False
        try:
            signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (an embedding program owns the signals)
            log.warning("SIGTERM handler not installed: not running in the main thread")

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        log.warning("SIGTERM received: checkpointing at the end of this step, then exiting")
        self.requested = True

    def _anyone_requested(self) -> bool:
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        backend = dist.get_backend()
        device = (
            torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        )
        flag = torch.tensor([1 if self.requested else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._anyone_requested():
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True
