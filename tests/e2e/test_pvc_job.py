"""A job that reads its model and data from one PersistentVolumeClaim and writes its adapter to another.

The claims are real PersistentVolumeClaims, bound by the real PV controller (kube-controller-manager) to
`hostPath` PersistentVolumes on this machine; the real scheduler places the pod only once they are bound.
The pod runs on a stand-in kubelet (tests/support/kubelet.py: no container runtime runs here), which gives
the container the bound volume's folder at the claim's mount path; the trainer really runs and reads
`pvc://` through the path the operator rendered. Read-only mounts are rendered but not enforced by the
stand-in (it runs processes, not containers).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.conftest import ROOT
from tests.e2e.chain import Platform, Story, a_finetunejob
from tests.e2e.test_finetune_chain import apply, succeeded
from tests.support.operator_chart import PhaseHistory, say
from tests.support.seaweedfs import free_port

wait_for = pytest.importorskip("tests.integration.cluster", reason="needs the control plane").wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

QUICKSTART = ROOT / "examples" / "quickstart"


def a_bound_claim(platform: Platform, claim: str, folder: Path) -> str:
    """A hostPath PersistentVolume for `folder` and a claim in the team's namespace bound to it."""
    namespace = platform.namespace
    volume = f"{namespace}-{claim}"
    platform.cluster.core.create_persistent_volume(
        client.V1PersistentVolume(
            metadata=client.V1ObjectMeta(name=volume, labels={"kubetune.io/test": namespace}),
            spec=client.V1PersistentVolumeSpec(
                capacity={"storage": "1Gi"},
                access_modes=["ReadWriteMany"],
                storage_class_name="",
                persistent_volume_reclaim_policy="Retain",
                host_path=client.V1HostPathVolumeSource(path=str(folder), type="Directory"),
                claim_ref=client.V1ObjectReference(namespace=namespace, name=claim),
            ),
        )
    )
    platform.cluster.core.create_namespaced_persistent_volume_claim(
        namespace,
        client.V1PersistentVolumeClaim(
            metadata=client.V1ObjectMeta(name=claim),
            spec=client.V1PersistentVolumeClaimSpec(
                access_modes=["ReadWriteMany"],
                storage_class_name="",
                volume_name=volume,
                resources=client.V1VolumeResourceRequirements(requests={"storage": "1Gi"}),
            ),
        ),
    )

    def bound() -> bool:
        found = platform.cluster.core.read_namespaced_persistent_volume_claim(claim, namespace)
        return bool(found.status and found.status.phase == "Bound")

    wait_for(bound, timeout=60, description=f"the PV controller to bind claim {claim}")
    return volume


@pytest.fixture
def claims(platform: Platform, tmp_path: Path) -> Any:
    """`models` (the quickstart model and data) and `outputs` (empty), bound; their folders."""
    models, outputs = tmp_path / "models", tmp_path / "outputs"
    shutil.copytree(QUICKSTART / "model", models / "tiny-llama")
    (models / "data").mkdir()
    shutil.copy(QUICKSTART / "alpaca.jsonl", models / "data" / "alpaca.jsonl")
    outputs.mkdir()
    volumes = [a_bound_claim(platform, "models", models), a_bound_claim(platform, "outputs", outputs)]
    say(f"claims models and outputs bound to hostPath volumes {', '.join(volumes)}")
    yield models, outputs
    for volume in volumes:
        platform.cluster.core.delete_persistent_volume(volume)


def test_a_job_reading_model_and_data_from_a_claim_publishes_to_another_and_succeeds(
    platform: Platform, claims: tuple[Path, Path], tmp_path: Path
) -> None:
    _, outputs = claims
    name, max_steps = "from-pvc", 10
    manifest = a_finetunejob(platform, name, max_steps, free_port())
    spec = manifest["spec"]
    spec["model"] = {"source": "pvc://models/tiny-llama"}
    spec["dataset"]["source"] = "pvc://models/data/alpaca.jsonl"
    spec["output"] = {"uri": f"pvc://outputs/adapters/{name}/"}
    spec["resources"] = {"nodes": 1, "gpusPerNode": 0}
    spec.pop("deepspeed")
    spec["scheduling"].pop("affinity")
    history, story = PhaseHistory(platform.cluster, platform.namespace, name), Story(platform, name)
    started = time.monotonic()

    apply(platform, manifest, tmp_path)

    job, took = succeeded(platform, name, started, history, story)
    pod = platform.cluster.core.read_namespaced_pod(f"{name}-master-0", platform.namespace)
    mounts = {m.mount_path: m.read_only for m in pod.spec.containers[0].volume_mounts}
    assert mounts["/mnt/pvc/models"] is True and not mounts["/mnt/pvc/outputs"]

    published = outputs / "adapters" / name
    manifest_file = json.loads((published / "kubetune-manifest.json").read_text())
    for entry in manifest_file["files"]:
        assert (published / entry["path"]).stat().st_size == entry["size"], entry
    assert job["status"]["adapter"]["uri"].rstrip("/") == f"pvc://outputs/adapters/{name}"
    say(f"e2e {name}: {took:.0f} s from kubectl apply to Succeeded; adapter in the outputs claim's volume")
