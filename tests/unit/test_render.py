"""What the operator would create for a FineTuneJob: golden files plus the properties that matter."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api.validation import validate_manifest
from kubetune.cli import dump_manifests
from kubetune.render import RenderConfig, build_all, build_pytorchjob, build_spec_configmap
from kubetune.render.pytorchjob import spec_hash
from kubetune.render.volumes import PVC_MOUNT_ROOT, PVC_ROOT_ENV, ClaimUse
from kubetune_trainer.storage import DEFAULT_PVC_ROOT
from kubetune_trainer.storage import PVC_ROOT_ENV as PVC_ROOT_ENV_OF_TRAINER
from tests.builders import a_job
from tests.conftest import EXAMPLES, ROOT

GOLDEN = ROOT / "tests" / "data" / "golden"
CONFIG = RenderConfig(trainer_image="registry.example/kubetune/trainer:test")


def _load(example: Path) -> Any:
    job, errors = validate_manifest(yaml.safe_load(example.read_text()))
    assert not errors and job is not None
    return job


def _pod(pytorchjob: dict[str, Any], replica: str = "Master") -> dict[str, Any]:
    return pytorchjob["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_rendering_matches_the_golden_file(example: Path, request: pytest.FixtureRequest) -> None:
    rendered = dump_manifests(build_all(_load(example), CONFIG))
    golden = GOLDEN / f"{example.stem}.yaml"
    if request.config.getoption("--update-golden") or not golden.exists():
        golden.write_text(rendered)
    assert rendered == golden.read_text(), (
        f"{golden} is stale: rerun with --update-golden and review the diff"
    )


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_replicas_processes_gpus_and_shm_follow_the_spec(example: Path) -> None:
    job = _load(example)
    resources = job.spec.resources
    pytorchjob = build_pytorchjob(job, CONFIG)
    replicas = pytorchjob["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    assert replicas.get("Worker", {}).get("replicas", 0) == resources.nodes - 1
    assert pytorchjob["spec"]["nprocPerNode"] == str(max(resources.gpus_per_node, 1))
    for replica in replicas:
        pod = _pod(pytorchjob, replica)
        [container] = pod["containers"]
        assert container["name"] == "pytorch"
        limits = container["resources"].get("limits", {})
        if resources.gpus_per_node:
            assert limits[resources.gpu_resource_name] == str(resources.gpus_per_node)
        else:
            assert resources.gpu_resource_name not in limits
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": resources.shared_memory}
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
        assert pod["automountServiceAccountToken"] is False


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_every_object_carries_the_labels(example: Path) -> None:
    job = _load(example)
    for manifest in build_all(job, CONFIG):
        labels = manifest["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "kubetune"
        assert labels["kubetune.io/job-name"] == job.name
    template = build_pytorchjob(job, CONFIG)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    assert template["metadata"]["labels"]["kubetune.io/job-name"] == job.name


def test_credentials_are_only_secret_references() -> None:
    job = (
        a_job()
        .with_spec(
            storage={
                "s3": {"credentialsSecret": "s3-creds", "endpoint": "http://minio:9000"},
                "hub": {"tokenSecret": "hf"},
            }
        )
        .build()
    )
    env = {e["name"]: e for e in _pod(build_pytorchjob(job, CONFIG))["containers"][0]["env"]}
    for name, secret in [
        ("AWS_ACCESS_KEY_ID", "s3-creds"),
        ("AWS_SECRET_ACCESS_KEY", "s3-creds"),
        ("HF_TOKEN", "hf"),
    ]:
        assert "value" not in env[name]
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": name}
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://minio:9000"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_no_credential_value_appears_in_any_rendered_object(example: Path) -> None:
    credential_names = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN"}
    for manifest in build_all(_load(example), CONFIG):
        for path, node in _walk(manifest):
            if isinstance(node, dict) and node.get("name") in credential_names:
                assert "value" not in node, f"{path}: a credential as a literal value"
                assert "secretKeyRef" in node["valueFrom"]


def _walk(node: Any, path: str = "") -> list[tuple[str, Any]]:
    found = [(path, node)]
    if isinstance(node, dict):
        found += [item for key, value in node.items() for item in _walk(value, f"{path}.{key}")]
    elif isinstance(node, list):
        found += [item for index, value in enumerate(node) for item in _walk(value, f"{path}[{index}]")]
    return found


def test_owner_reference_points_at_the_finetunejob_when_it_has_a_uid() -> None:
    job = a_job("owned").with_uid("0c0ffee0-0000-4000-8000-000000000000").build()
    for manifest in build_all(job, CONFIG):
        [owner] = manifest["metadata"]["ownerReferences"]
        assert owner == {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "name": "owned",
            "uid": "0c0ffee0-0000-4000-8000-000000000000",
            "controller": True,
            "blockOwnerDeletion": True,
        }


def test_run_policy_and_scheduling_pass_through() -> None:
    job = (
        a_job()
        .on(nodes=3, gpus=8)
        .with_spec(
            runPolicy={
                "backoffLimit": 7,
                "activeDeadlineSeconds": 3600,
                "ttlSecondsAfterFinished": 60,
                "suspend": True,
                "cleanPodPolicy": "All",
            },
            scheduling={
                "nodeSelector": {"gpu": "h100"},
                "priorityClassName": "high",
                "schedulerName": "volcano",
                "queueName": "team-a",
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}
                    }
                },
            },
        )
        .build()
    )
    pytorchjob = build_pytorchjob(job, CONFIG)
    assert pytorchjob["spec"]["runPolicy"] == {
        "backoffLimit": 7,
        "activeDeadlineSeconds": 3600,
        "ttlSecondsAfterFinished": 60,
        "suspend": True,
        "cleanPodPolicy": "All",
        "schedulingPolicy": {"minAvailable": 3, "priorityClass": "high"},
    }
    assert "kueue.x-k8s.io/queue-name" not in pytorchjob["metadata"]["labels"], "joins its queue on resume"
    pod = _pod(pytorchjob, "Worker")
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert (pod["priorityClassName"], pod["schedulerName"]) == ("high", "volcano")
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    assert "nodeAffinity" in pod["affinity"]
    assert pytorchjob["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2


def test_the_configmap_holds_the_spec_the_trainer_reads_back() -> None:
    from kubetune.api.v1alpha1 import parse_job

    job = a_job().with_method("qlora").build()
    document = json.loads(build_spec_configmap(job)["data"]["spec.json"])
    assert parse_job(document).spec.method == job.spec.method


def test_suspending_does_not_change_the_spec_hash() -> None:
    running = a_job().build()
    suspended = a_job().with_spec(runPolicy={"suspend": True}).build()
    assert spec_hash(running) == spec_hash(suspended)
    assert spec_hash(running) != spec_hash(a_job().with_method("dora").build())


def test_trainer_command_lets_torchrun_read_the_operator_env() -> None:
    container = _pod(build_pytorchjob(a_job().on(nodes=2, gpus=4).build(), CONFIG))["containers"][0]
    # torchrun through the launcher that turns a retryable failure into a retryable exit code
    assert container["command"][:3] == ["python", "-m", "kubetune_trainer.launch"]
    assert "--master_addr=$(MASTER_ADDR)" in container["command"]
    assert container["command"][-2:] == ["-m", "kubetune_trainer"]
    assert {"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"} in container["ports"]


TEAM_LABELS = {"team": "search", "cost-center": "ml-4711", "example.com/project": "support-bot"}
TEAM_ANNOTATIONS = {
    "sidecar.istio.io/inject": "false",
    "vault.hashicorp.com/agent-inject": "true",
    "vault.hashicorp.com/role": "trainer",
}
RESERVED = {
    "kubectl.kubernetes.io/last-applied-configuration": "{}",
    "app.kubernetes.io/instance": "ml-finetunes",
    "kubernetes.io/description": "x",
    "k8s.io/anything": "x",
    "kubetune.io/job-name": "another-job",
    "kubetune.io/spec-hash": "forged",
    "kopf.zalando.org/last-handled-configuration": "{}",
    "argocd.argoproj.io/tracking-id": "ml-finetunes:kubetune.io/FineTuneJob:ml/demo",
    "kustomize.toolkit.fluxcd.io/name": "ml-finetunes",
    "meta.helm.sh/release-name": "jobs",
    "training.kubeflow.org/replica-type": "master",
    "kueue.x-k8s.io/queue-name": "somebody-elses-queue",
}


def every_child_metadata(job: Any) -> dict[str, dict[str, Any]]:
    configmap, pytorchjob = build_all(job, CONFIG)
    found = {"ConfigMap": configmap["metadata"], "PyTorchJob": pytorchjob["metadata"]}
    for replica, spec in pytorchjob["spec"]["pytorchReplicaSpecs"].items():
        found[f"{replica} pod"] = spec["template"]["metadata"]
    return found


def test_team_labels_and_sidecar_annotations_reach_the_configmap_pytorchjob_and_pods() -> None:
    job = a_job().on(nodes=2).with_metadata(labels=TEAM_LABELS, annotations=TEAM_ANNOTATIONS).build()
    for child, metadata in every_child_metadata(job).items():
        assert TEAM_LABELS.items() <= metadata["labels"].items(), child
        assert TEAM_ANNOTATIONS.items() <= metadata["annotations"].items(), child


def test_reserved_labels_and_annotations_stay_on_the_finetunejob() -> None:
    job = (
        a_job()
        .with_spec(scheduling={"queueName": "team-a"})
        .with_metadata(labels={**RESERVED, "team": "search"}, annotations={**RESERVED, "team": "search"})
        .build()
    )
    for child, metadata in every_child_metadata(job).items():
        for key in RESERVED:
            assert metadata["labels"].get(key) != RESERVED[key], f"{child} label {key}"
            assert metadata.get("annotations", {}).get(key) != RESERVED[key], f"{child} annotation {key}"
        assert metadata["labels"]["team"] == "search", child
        assert metadata["labels"]["kubetune.io/job-name"] == "demo", child
        assert metadata["labels"]["app.kubernetes.io/managed-by"] == "kubetune", child
    assert every_child_metadata(job)["PyTorchJob"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"


def test_the_operators_own_pod_annotations_win_over_the_jobs() -> None:
    job = a_job().with_metadata(annotations={"prometheus.io/port": "1"}).build()
    pod = every_child_metadata(job)["Master pod"]
    assert pod["annotations"]["prometheus.io/port"] == str(job.spec.metrics.port)


def test_labels_do_not_change_the_spec_hash() -> None:
    assert spec_hash(a_job().with_metadata(labels=TEAM_LABELS).build()) == spec_hash(a_job().build())


def claim_mounts_of(job: Any) -> dict[str, tuple[str, bool]]:
    """mountPath -> (claim, read-only) of the trainer container, checked against the pod's volumes."""
    pod = _pod(build_pytorchjob(job, CONFIG))
    volumes = {v["name"]: v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    found = {}
    for mount in pod["containers"][0]["volumeMounts"]:
        if mount["name"] in volumes:
            claim = volumes[mount["name"]]
            assert claim["readOnly"] == mount["readOnly"]
            found[mount["mountPath"]] = (claim["claimName"], mount["readOnly"])
    return found


def test_a_pvc_model_and_dataset_are_mounted_read_only_where_the_trainer_reads_them() -> None:
    job = a_job().with_spec(
        model={"source": "pvc://models/llama-3.1-8b"}, dataset={"source": "pvc://datasets/sft/train.jsonl"}
    )
    assert claim_mounts_of(job.build()) == {
        "/mnt/pvc/models": ("models", True),
        "/mnt/pvc/datasets": ("datasets", True),
    }
    env = {
        e["name"]: e.get("value") for e in _pod(build_pytorchjob(job.build(), CONFIG))["containers"][0]["env"]
    }
    assert env["KUBETUNE_PVC_ROOT"] == "/mnt/pvc"


def test_an_output_claim_is_writable_and_a_claim_named_twice_is_one_writable_volume() -> None:
    job = a_job().with_spec(
        model={"source": "pvc://shared/base"},
        dataset={"source": "s3://data/train.jsonl"},
        output={"uri": "pvc://shared/adapters/demo/"},
        checkpoint={"uri": "pvc://scratch/ckpt/demo"},
    )
    assert claim_mounts_of(job.build()) == {
        "/mnt/pvc/shared": ("shared", False),
        "/mnt/pvc/scratch": ("scratch", False),
    }


def test_a_job_without_claims_mounts_none_and_sets_no_pvc_root() -> None:
    pod = _pod(build_pytorchjob(a_job().build(), CONFIG))
    assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert "KUBETUNE_PVC_ROOT" not in {e["name"] for e in pod["containers"][0]["env"]}


def test_every_replica_mounts_the_claims() -> None:
    job = a_job().on(nodes=3).with_spec(model={"source": "pvc://models/base"}).build()
    pytorchjob = build_pytorchjob(job, CONFIG)
    for replica in ("Master", "Worker"):
        names = {v["name"] for v in _pod(pytorchjob, replica)["volumes"]}
        assert "pvc-models" in names, replica


def test_a_long_claim_name_still_gives_a_valid_volume_name() -> None:
    claim = "a" * 60 + "-models"
    use = ClaimUse(claim, writable=False, fields=("spec.model.source",))
    assert len(use.volume_name) <= 63 and re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", use.volume_name)
    assert use.volume_name != ClaimUse(claim + "x", False, ()).volume_name


def test_the_claims_are_mounted_where_the_trainer_looks_for_them() -> None:
    assert PVC_MOUNT_ROOT == DEFAULT_PVC_ROOT
    assert PVC_ROOT_ENV == PVC_ROOT_ENV_OF_TRAINER


def test_a_queued_job_is_created_suspended_for_kueue_to_admit() -> None:
    queued = a_job().with_spec(scheduling={"queueName": "team-a"}).build()
    assert build_pytorchjob(queued, CONFIG)["spec"]["runPolicy"]["suspend"] is True
    assert build_pytorchjob(a_job().build(), CONFIG)["spec"]["runPolicy"]["suspend"] is False


def test_the_gang_is_every_pod_of_the_job_at_the_specs_priority() -> None:
    job = a_job().on(nodes=4, gpus=8).with_spec(scheduling={"priorityClassName": "research"}).build()
    policy = build_pytorchjob(job, CONFIG)["spec"]["runPolicy"]["schedulingPolicy"]
    assert policy == {"minAvailable": 4, "priorityClass": "research"}
    assert build_pytorchjob(a_job().build(), CONFIG)["spec"]["runPolicy"]["schedulingPolicy"] == {
        "minAvailable": 1
    }
