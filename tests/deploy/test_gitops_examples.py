"""The GitOps examples point at what exists: every FineTuneJob in them validates, every path an Argo CD
Application or a Flux object syncs is a folder of this repository, and each kustomization lists real files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kubetune.api.v1alpha1 import FineTuneJob
from tests.conftest import ROOT

GITOPS = ROOT / "examples" / "gitops"


def documents() -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in sorted(GITOPS.rglob("*.yaml")):
        found += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def test_the_finetunejobs_kept_in_git_are_valid() -> None:
    jobs = [doc for _, doc in documents() if doc["kind"] == "FineTuneJob"]
    assert jobs
    for doc in jobs:
        FineTuneJob.model_validate(doc)


def test_synced_paths_and_kustomization_resources_exist() -> None:
    synced = []
    for path, doc in documents():
        if doc["kind"] == "Application":
            synced.append(doc["spec"]["source"]["path"])
        elif doc["apiVersion"].startswith("kustomize.toolkit.fluxcd.io"):
            synced.append(doc["spec"]["path"])
        elif doc["apiVersion"].startswith("helm.toolkit.fluxcd.io"):
            synced.append(doc["spec"]["chart"]["spec"]["chart"])
        elif doc["kind"] == "Kustomization":
            for resource in doc["resources"]:
                assert (path.parent / resource).exists(), f"{path}: {resource}"
    assert synced
    for folder in synced:
        assert (ROOT / folder).is_dir(), folder
