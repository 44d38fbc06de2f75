"""A user runs `kubetune validate` before applying: good manifests pass, bad ones name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.api.v1alpha1 import MethodType
from kubetune.api.validation import validate_file, validate_manifest
from tests.builders import a_job
from tests.conftest import EXAMPLES, INVALID, invalid_expectation


def test_there_are_enough_invalid_manifests_to_mean_something() -> None:
    assert len(INVALID) >= 30


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_is_valid(example: Path) -> None:
    results = validate_file(example)
    assert len(results) == 1
    assert results[0].errors == []


@pytest.mark.parametrize("manifest", INVALID, ids=lambda p: p.stem)
def test_every_invalid_manifest_is_refused_naming_its_field(manifest: Path) -> None:
    field, _ = invalid_expectation(manifest)
    [result] = validate_file(manifest)
    paths = [error.path for error in result.errors]
    assert field in paths, f"expected an error at {field}, got {[str(e) for e in result.errors]}"
    message = next(e.message for e in result.errors if e.path == field)
    assert len(message) > 15, "the message should say what would be valid"


def test_an_unknown_field_suggests_the_right_one() -> None:
    manifest = a_job().with_spec(training={"learningrate": 1e-4}).as_manifest()
    _, errors = validate_manifest(manifest)
    assert [e.path for e in errors] == ["spec.training.learningrate"]
    assert "did you mean learningRate?" in errors[0].message


def test_a_bad_uri_says_which_schemes_work() -> None:
    manifest = a_job().with_spec(model={"source": "gs://bucket/model"}).as_manifest()
    _, errors = validate_manifest(manifest)
    assert "hf://" in errors[0].message and "s3://" in errors[0].message


def test_every_error_is_reported_at_once() -> None:
    manifest = a_job().with_method("lora", lora={"r": 0, "dropout": 2.0}).as_manifest()
    _, errors = validate_manifest(manifest)
    assert {e.path for e in errors} == {"spec.method.lora.r", "spec.method.lora.dropout"}


@pytest.mark.parametrize("method", list(MethodType))
def test_every_method_works_with_defaults_alone(method: MethodType) -> None:
    job = a_job().with_method(method.value).build()
    assert job.spec.method.type == method


def test_qlora_without_a_quantization_block_means_nf4_with_double_quant() -> None:
    method = a_job().with_method("qlora").build().spec.method
    assert (method.effective_quantization.bits, method.effective_quantization.type) == (4, "nf4")
    assert method.effective_quantization.double_quant


def test_per_group_learning_rates_are_expressible() -> None:
    job = (
        a_job()
        .with_method("freeze", freeze={"trainableLayers": 2})
        .with_spec(
            training={
                "learningRate": 2e-4,
                "learningRateGroups": [{"name": "base", "match": r"layers\.\d+\.mlp", "learningRate": 1e-5}],
            }
        )
        .build()
    )
    [group] = job.spec.training.learning_rate_groups
    assert group.learning_rate < job.spec.training.learning_rate


def test_quantities_accept_integers_as_kubernetes_does() -> None:
    job = a_job().on(nodes=1, gpus=1, requests={"cpu": 16, "memory": "64Gi"}).build()
    assert job.spec.resources.requests["cpu"] == "16"


def test_a_file_with_several_documents_reports_each(tmp_path: Path) -> None:
    import yaml

    good = a_job("one").as_manifest()
    bad = a_job("two").with_method("lora", lora={"r": 0}).as_manifest()
    other = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3"}}
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump_all([good, other, bad]))
    results = validate_file(path)
    assert [(r.name, bool(r.errors)) for r in results] == [("one", False), ("two", True)]


def test_sample_prompts_are_optional_and_answers_short_by_default() -> None:
    assert a_job().build().spec.samples is None
    job = (
        a_job()
        .with_spec(samples={"prompts": [{"prompt": "color(tomato)", "expected": "red"}, {"prompt": "Hi"}]})
        .build()
    )
    assert job.spec.samples is not None
    assert job.spec.samples.max_new_tokens == 64
    assert [(p.prompt, p.expected) for p in job.spec.samples.prompts] == [
        ("color(tomato)", "red"),
        ("Hi", None),
    ]
