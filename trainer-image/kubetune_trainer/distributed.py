"""Where this process sits in the job, read from the env torchrun (and the Kubeflow
training operator's PET_* variables through torchrun) sets. No torch import."""

from __future__ import annotations

import os


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def rank() -> int:
    return _int_env("RANK", 0)


def local_rank() -> int:
    return _int_env("LOCAL_RANK", 0)


def world_size() -> int:
    return _int_env("WORLD_SIZE", 1)


def local_world_size() -> int:
    return _int_env("LOCAL_WORLD_SIZE", 1)


def node_rank() -> int:
    """The node's index: ``GROUP_RANK`` from torchrun, else derived from the global rank."""
    if "GROUP_RANK" in os.environ:
        return _int_env("GROUP_RANK", 0)
    return rank() // max(local_world_size(), 1)


def is_main_process() -> bool:
    return rank() == 0


def is_local_main_process() -> bool:
    return local_rank() == 0
