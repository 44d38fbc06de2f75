"""Which GPU memory the operator's fit check compares a new job with: the largest node it may land on, and
only when every such node says how much its GPUs have."""

from __future__ import annotations

from typing import Any

from kubetune.controller.fitcheck import GPU_MEMORY_LABEL, MIB, candidate_gpu_memory, hub_repo
from tests.builders import a_job


def node(gpus: int, memory_mib: str | None, **labels: str) -> dict[str, Any]:
    if memory_mib is not None:
        labels[GPU_MEMORY_LABEL] = memory_mib
    return {"metadata": {"labels": labels}, "status": {"allocatable": {"nvidia.com/gpu": str(gpus)}}}


def job(gpus: int = 8, **selector: str) -> Any:
    return a_job().on(nodes=1, gpus=gpus).with_spec(scheduling={"nodeSelector": selector}).build()


def test_the_largest_node_with_the_jobs_gpus_and_labels_counts() -> None:
    nodes = [node(8, "40960", pool="a100"), node(8, "81920", pool="a100"), node(8, "196608", pool="b200")]
    assert candidate_gpu_memory(job(pool="a100"), nodes) == 81920 * MIB
    assert candidate_gpu_memory(job(), nodes) == 196608 * MIB


def test_nodes_with_too_few_gpus_are_not_candidates() -> None:
    assert candidate_gpu_memory(job(gpus=8), [node(4, "196608"), node(8, "24576")]) == 24576 * MIB


def test_unknown_when_a_candidate_does_not_say_or_none_fits_the_selector() -> None:
    assert candidate_gpu_memory(job(), [node(8, "24576"), node(8, None)]) is None, "it might be larger"
    assert candidate_gpu_memory(job(), [node(8, "lots")]) is None
    assert candidate_gpu_memory(job(pool="h100"), [node(8, "81920", pool="a100")]) is None


def test_only_hub_sources_have_a_config_the_operator_may_read() -> None:
    assert hub_repo("hf://HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_repo("s3://models/llama") is None
    assert hub_repo("pvc://models/llama") is None
