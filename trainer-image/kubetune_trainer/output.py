"""The job's output: what a run produced (:class:`RunResult`), and rank 0's last phase, which checks
the saved weights, merges them into the base when ``output.mergeWeights`` asks, and publishes them
to ``output.uri`` with a manifest that describes the run."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from kubetune.api.v1alpha1 import FineTuneJob, MethodType

from .adapters import merge_into_base
from .job import job_identity
from .methods import expected_saved_fraction, method_for
from .publish import check_adapter, publish
from .samples import Sample


@dataclass
class RunResult:
    """What a run produced; ``manifest`` is set on rank 0 when something was published."""

    global_step: int
    trainable_params: int
    total_params: int
    metrics: dict[str, float] = field(default_factory=dict)
    manifest: dict[str, Any] | None = None
    preempted: bool = False
    log_history: list[dict[str, Any]] = field(default_factory=list)
    model: Any = None
    """The trained model (for callers in the same process, such as tests and chained rounds)."""
    samples: list[Sample] = field(default_factory=list)
    """The answers to the spec's sample prompts (rank 0)."""


def publish_result(
    job: FineTuneJob,
    spec_digest: str,
    model_dir: Path,
    adapter_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    result: RunResult,
    workdir: Path,
) -> dict[str, Any]:
    """Rank 0: check the saved weights, merge them if asked, publish with the manifest last."""
    spec = job.spec
    fraction = expected_saved_fraction(spec)
    merged_chain = spec.method.chain is not None and spec.method.type == MethodType.DORA
    adapter_methods = method_for(spec).peft_config is not None and not merged_chain
    expected = int(result.trainable_params * fraction) if fraction is not None and adapter_methods else None
    check_adapter(adapter_dir, expected if adapter_methods else result.total_params)
    published = adapter_dir
    if spec.output.merge_weights and adapter_methods:
        published = workdir / "merged"
        shutil.rmtree(published, ignore_errors=True)
        merge_into_base(spec, model_dir, adapter_dir, published, tokenizer)
        check_adapter(published, result.total_params)
    name, namespace = job_identity(job)
    return publish(
        published,
        spec.output.uri,
        metrics=result.metrics,
        spec_digest=spec_digest,
        extra={
            "job": {"name": name, "namespace": namespace},
            "method": spec.method.type.value,
            "task": spec.model.task.value,
            "baseModel": {"source": spec.model.source, "revision": spec.model.revision},
            "merged": published != adapter_dir or merged_chain,
            "trainableParams": result.trainable_params,
            "totalParams": result.total_params,
            "globalStep": result.global_step,
            **({"samples": [s.to_manifest() for s in result.samples]} if result.samples else {}),
        },
    )
