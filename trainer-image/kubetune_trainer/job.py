"""The job as the trainer reads it: the spec file and its digest, the job's name, where its
checkpoints go."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from kubetune.api.v1alpha1 import FineTuneJob, FineTuneJobSpec


def load_job(path: Path) -> tuple[FineTuneJob, str]:
    """The job from the spec file (JSON from the ConfigMap, or YAML locally) and its sha256.

    The hash is over the file's bytes, which is how the operator hashes the ConfigMap's
    document, so a published manifest names the exact spec that made it.
    """
    raw = path.read_bytes()
    try:
        document = json.loads(raw)
    except json.JSONDecodeError:
        import yaml

        document = yaml.safe_load(raw)
    return FineTuneJob.model_validate(document), hashlib.sha256(raw).hexdigest()


def job_identity(job: FineTuneJob) -> tuple[str, str]:
    """Job name and namespace: the renderer's env wins over the spec's metadata."""
    return (
        os.environ.get("KUBETUNE_JOB_NAME") or job.name,
        os.environ.get("KUBETUNE_NAMESPACE") or job.namespace,
    )


def checkpoint_uri(spec: FineTuneJobSpec) -> str:
    """Where the job's checkpoints go: ``checkpoint.uri``, else ``checkpoints/`` under the output."""
    return spec.checkpoint.uri or f"{spec.output.uri.rstrip('/')}/checkpoints"
