"""The CRD is generated from the models, structural, and committed up to date."""

from __future__ import annotations

from typing import Any

import yaml

from kubetune.api.base import ApiModel
from kubetune.api.crd import build_crd, crd_yaml, openapi_schema
from kubetune.api.v1alpha1 import spec as spec_module
from tests.conftest import ROOT


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = []
    if isinstance(node, dict):
        found.append((path, node))
        for key, value in node.items():
            found.extend(_walk(value, f"{path}/{key}"))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found.extend(_walk(value, f"{path}[{index}]"))
    return found


def test_committed_crd_is_not_stale() -> None:
    committed = (ROOT / "crds" / "kubetune.io_finetunejobs.yaml").read_text()
    assert committed == crd_yaml(), "run `make generate` and commit crds/"


def test_schema_is_structural() -> None:
    schema = openapi_schema()
    for path, node in _walk(schema):
        assert "$ref" not in node, path
        assert node.get("type") != "null", path
        assert node.get("additionalProperties") is not False, path
        assert "const" not in node and "title" not in node, path
        if "properties" in node:
            assert node.get("type") == "object", path
        if isinstance(node.get("exclusiveMinimum"), (int, float)) and not isinstance(
            node["exclusiveMinimum"], bool
        ):
            raise AssertionError(f"{path}: exclusiveMinimum must be a boolean in OpenAPI v3")


def test_every_spec_property_has_a_description() -> None:
    undocumented = [
        f"{path}/{name}"
        for path, node in _walk(openapi_schema()["properties"]["spec"])
        for name, child in node.get("properties", {}).items()
        if not child.get("description")
    ]
    assert undocumented == []


def test_resource_names_columns_and_status_subresource() -> None:
    crd = build_crd()
    assert crd["metadata"]["name"] == "finetunejobs.kubetune.io"
    assert crd["spec"]["names"]["shortNames"] == ["ftj"]
    [version] = crd["spec"]["versions"]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Phase", "Method", "Model", "Progress", "Loss", "Restarts", "Age"]


def test_enums_ranges_and_defaults_reach_the_schema() -> None:
    spec = openapi_schema()["properties"]["spec"]["properties"]
    method = spec["method"]["properties"]
    assert "qlora" in method["type"]["enum"] and method["type"]["default"] == "lora"
    assert method["lora"]["properties"]["r"]["minimum"] == 1
    assert method["quantization"]["properties"]["bits"]["enum"] == [4, 8]
    assert spec["training"]["properties"]["learningRate"]["exclusiveMinimum"] is True
    shared_memory = spec["resources"]["properties"]["sharedMemory"]
    assert shared_memory["x-kubernetes-int-or-string"] is True
    # The API server drops `pattern` on int-or-string fields, so a CEL rule must refuse 'lots'.
    assert "isQuantity(self)" in shared_memory["x-kubernetes-validations"][0]["rule"]
    assert "isQuantity(self)" in str(spec["resources"]["properties"]["requests"]["additionalProperties"])
    assert set(openapi_schema()["properties"]["spec"]["required"]) == {"model", "dataset", "output"}


def test_every_python_rule_has_its_cel_twin_in_the_crd() -> None:
    text = yaml.safe_dump(build_crd(), width=1_000_000)
    models = [m for m in vars(spec_module).values() if isinstance(m, type) and issubclass(m, ApiModel)]
    rules = [rule for model in models for rule in model.own_rules()]
    assert len(rules) > 15
    for rule in rules:
        assert rule.cel in yaml.safe_load(text).__repr__() or rule.cel in text, rule.message


def _fixed_once_created(parent: dict[str, Any], name: str) -> bool:
    """`self == oldSelf` on the field, and for an optional field without a default, its presence pinned by
    the parent (a field's own rule never runs where the field is absent)."""
    field = parent["properties"][name]
    own = {r["rule"] for r in field.get("x-kubernetes-validations", [])}
    pinned = {r["rule"] for r in parent.get("x-kubernetes-validations", [])}
    always_present = name in parent.get("required", []) or "default" in field
    presence = always_present or f"has(self.{name}) == has(oldSelf.{name})" in pinned
    return "self == oldSelf" in own and presence


def test_the_spec_is_fixed_once_created_except_suspend() -> None:
    spec = openapi_schema()["properties"]["spec"]
    run_policy = spec["properties"]["runPolicy"]
    changeable = [name for name in spec["properties"] if not _fixed_once_created(spec, name)]
    assert changeable == ["runPolicy"]
    changeable = [name for name in run_policy["properties"] if not _fixed_once_created(run_policy, name)]
    assert changeable == ["suspend"]


def test_a_field_keeps_its_own_rules_and_its_types() -> None:
    """A field's rule and the rules of its type are both in the CRD (a `$ref`'s own keys once replaced them)."""
    spec = openapi_schema()["properties"]["spec"]
    for name in ("model", "method", "deepspeed", "trainer"):
        rules = [r["rule"] for r in spec["properties"][name]["x-kubernetes-validations"]]
        assert "self == oldSelf" in rules and len(rules) > 1, name
