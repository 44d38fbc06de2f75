"""The trainer image `make images` builds, run with buildah: it holds the pinned training stack with DeepSpeed's
CPU ops prebuilt, and its own command fine-tunes the real SmolLM2 from S3 and publishes the adapter there.

The image is built once per session (tests/deploy/conftest.py); a build whose layers are cached takes seconds.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.builders import a_job
from tests.conftest import ROOT
from tests.support.images import BuiltImage, working_container
from tests.support.seaweedfs import SeaweedFS, free_ports

if TYPE_CHECKING:
    pass

pytestmark = pytest.mark.slow

PINNED = ("torch", "deepspeed", "peft", "bitsandbytes", "transformers")

# Run inside the trainer image. load() imports the prebuilt op; an op that was not prebuilt would be compiled
# there and then, which fails in an image without a compiler.
TRAINER_IMAGE_CHECK = """
import json, os, shutil
import torch, deepspeed, peft, bitsandbytes, transformers, kubetune_trainer
from importlib.metadata import version
from deepspeed.accelerator import get_accelerator
from deepspeed.git_version_info import installed_ops
from deepspeed.ops.adam import DeepSpeedCPUAdam

ops = {}
for builder_name in ("CPUAdamBuilder", "ShareMemCommBuilder"):
    builder = get_accelerator().create_op_builder(builder_name)
    module = builder.load()
    ops[builder.name] = {
        "prebuilt": bool(installed_ops.get(builder.name)),
        "compatible": builder.is_compatible(),
        "module": module.__file__,
    }
weight = torch.nn.Parameter(torch.ones(8))
optimizer = DeepSpeedCPUAdam([weight], lr=0.1)
weight.grad = torch.ones(8)
optimizer.step()
print(json.dumps({
    "versions": {name: version(name) for name in ("torch", "deepspeed", "peft", "bitsandbytes", "transformers")},
    "torch_cuda": torch.version.cuda,
    "accelerator": get_accelerator()._name,
    "ops": ops,
    "weight_after_step": weight.detach().tolist(),
    "compilers": [c for c in ("g++", "c++", "cc", "gcc") if shutil.which(c)],
    "uid": os.getuid(),
    "trainer_package": kubetune_trainer.__file__,
}))
"""


def pins() -> dict[str, str]:
    found: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, _, pinned = line.partition("==")
        found[name.strip().lower()] = pinned.strip()
    return found


def test_the_trainer_image_holds_the_pinned_stack_with_deepspeed_cpu_ops_prebuilt(
    trainer_image: BuiltImage,
) -> None:
    with working_container(trainer_image) as container:
        result = container.run(["python", "-c", TRAINER_IMAGE_CHECK], env={"DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0, result.stderr[-4000:]
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])

    expected = pins()
    assert report["versions"] == {name: expected[name] for name in PINNED}
    assert report["torch_cuda"], "torch in the image is not the CUDA build"
    assert report["accelerator"] == "cpu"
    for name in ("cpu_adam", "deepspeed_shm_comm"):
        op = report["ops"][name]
        assert op["prebuilt"] and op["compatible"], op
        assert op["module"].startswith("/opt/venv/lib/python3.11/site-packages/deepspeed/ops/"), op
    # Adam's first step moves each weight by lr against the gradient's sign: 1 - 0.1.
    assert report["weight_after_step"] == pytest.approx([0.9] * 8, abs=1e-4)
    assert report["compilers"] == []  # nothing could have compiled an op at start
    assert report["uid"] == int(trainer_image.user.split(":")[0]) != 0
    assert report["trainer_package"].startswith("/opt/venv/lib/python3.11/site-packages/kubetune_trainer/")
    assert trainer_image.size_bytes < 8 * 10**9


# --------------------------------------------------------------------------------- the trainer image trains


def upload_folder(client: Any, bucket: str, prefix: str, folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


def test_the_trainer_image_fine_tunes_smollm2_from_s3_and_publishes_a_loadable_adapter(
    trainer_image: BuiltImage, seaweedfs: SeaweedFS, smollm2_dir: Path, tmp_path: Path
) -> None:
    """The image's own command (torchrun through kubetune_trainer.launch) trains a LoRA adapter of the real
    SmolLM2-135M-Instruct, model and chat data read from S3, and publishes adapter and manifest back there."""
    client = seaweedfs.client()
    bucket = seaweedfs.new_bucket("images")
    upload_folder(client, bucket, "models/smollm2", smollm2_dir)
    client.upload_file(str(ROOT / "tests" / "data" / "train" / "chat.jsonl"), bucket, "data/chat.jsonl")
    job = (
        a_job("image-run")
        .with_spec(
            model={"source": f"s3://{bucket}/models/smollm2"},
            dataset={"source": f"s3://{bucket}/data/chat.jsonl", "format": "chat", "maxSeqLength": 64},
            method={"type": "lora", "lora": {"r": 8, "alpha": 16, "targetModules": ["q_proj", "v_proj"]}},
            training={
                "maxSteps": 4,
                "learningRate": 2.0e-3,
                "batchSizePerDevice": 4,
                "precision": "fp32",
                "logEverySteps": 1,
            },
            resources={"nodes": 1, "gpusPerNode": 0},
            output={"uri": f"s3://{bucket}/adapters/image-run"},
        )
        .as_manifest()
    )
    spec = tmp_path / "spec"
    spec.mkdir()
    (spec / "spec.json").write_text(json.dumps(job))
    spec.chmod(0o755)
    (spec / "spec.json").chmod(0o644)
    (metrics_port,) = free_ports(1)
    env = {
        **seaweedfs.env,
        "KUBETUNE_SPEC": "/etc/kubetune/spec.json",
        "KUBETUNE_METRICS_PORT": str(metrics_port),
        "KUBETUNE_JOB_NAME": "image-run",
        "KUBETUNE_NAMESPACE": "images",
        "DS_ACCELERATOR": "cpu",
    }
    log = tmp_path / "trainer.log"
    with working_container(trainer_image) as container:
        process = container.start(
            trainer_image.argv(None, None), log, env=env, volumes={spec: "/etc/kubetune"}
        )
        try:
            code = process.wait(timeout=900)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
    assert code == 0, log.read_text(errors="replace")[-6000:]

    prefix = "adapters/image-run/"
    manifest = json.loads(
        client.get_object(Bucket=bucket, Key=f"{prefix}kubetune-manifest.json")["Body"].read()
    )
    downloaded = tmp_path / "adapter"
    for entry in manifest["files"]:
        target = downloaded / entry["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, prefix + entry["path"], str(target))
        assert target.stat().st_size == entry["size"], entry
        assert hashlib.sha256(target.read_bytes()).hexdigest() == entry["sha256"], entry
    lines = "".join(
        f"{f['path']} {f['sha256']}\n" for f in sorted(manifest["files"], key=lambda f: f["path"])
    )
    assert manifest["sha256"] == hashlib.sha256(lines.encode()).hexdigest()
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {f["path"] for f in manifest["files"]}
    assert manifest["job"] == {"name": "image-run", "namespace": "images"}

    # The published adapter loads onto the base, and training moved its B matrices off their zero start.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, downloaded)
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert len(lora_b) == 2 * base.config.num_hidden_layers
    assert all(float(p.abs().max()) > 0 for p in lora_b)
