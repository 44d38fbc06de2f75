"""The release workflow builds what the chart points at: both Dockerfiles, for amd64 and arm64, with
an SBOM, tagged with the one version that pyproject.toml, the chart and the images share."""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "release.yaml"


def chart() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "charts" / "kubetune" / "Chart.yaml").read_text())
    return loaded


def workflow() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(WORKFLOW.read_text())
    return loaded


def test_pyproject_chart_and_app_versions_are_one_version() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert chart()["version"] == chart()["appVersion"] == project


def test_both_images_the_chart_defaults_to_are_built_for_two_architectures_with_an_sbom() -> None:
    from kubetune.render.pytorchjob import RenderConfig

    # The trainer image the operator falls back to is one the workflow pushes, at the chart's version.
    assert RenderConfig().trainer_image == f"ghcr.io/kubetune/kubetune-trainer:{chart()['appVersion']}"
    images = workflow()["jobs"]["images"]
    built = {entry["name"]: entry["dockerfile"] for entry in images["strategy"]["matrix"]["include"]}
    assert built == {"kubetune-operator": "Dockerfile", "kubetune-trainer": "trainer-image/Dockerfile"}
    assert all((ROOT / dockerfile).is_file() for dockerfile in built.values())
    push = next(step for step in images["steps"] if str(step.get("uses", "")).startswith("docker/build-push"))
    assert set(push["with"]["platforms"].split(",")) == {"linux/amd64", "linux/arm64"}
    assert push["with"]["sbom"] is True and push["with"]["push"] is True
    assert push["with"]["tags"].endswith(":${{ needs.version.outputs.version }}")
    assert workflow()["env"]["REGISTRY"] == "ghcr.io/kubetune"


def test_the_chart_is_published_as_oci_after_the_images() -> None:
    job = workflow()["jobs"]["chart"]
    assert "images" in job["needs"]
    script = "\n".join(str(step.get("run", "")) for step in job["steps"])
    assert "helm package charts/kubetune" in script and "oci://${{ env.REGISTRY }}/charts" in script


def run_version_check(tag: str, tmp_path: Path) -> tuple[int, str]:
    """The workflow's own version step, run by bash in the repository as Actions would run it."""
    script = workflow()["jobs"]["version"]["steps"][1]["run"]
    output = tmp_path / f"github-output-{tag}"
    output.touch()
    env = {**os.environ, "GITHUB_REF_NAME": tag, "GITHUB_OUTPUT": str(output)}
    done = subprocess.run(["bash", "-eo", "pipefail", "-c", script], cwd=ROOT, env=env, capture_output=True)
    return done.returncode, output.read_text()


def test_the_release_runs_only_for_a_tag_naming_the_files_version(tmp_path: Path) -> None:
    version = chart()["appVersion"]
    assert run_version_check(f"v{version}", tmp_path) == (0, f"version={version}\n")
    code, written = run_version_check("v9.9.9", tmp_path)
    assert code != 0 and written == ""
