"""The base of every API model, and cross-field rules that are written once and enforced twice.

A `Rule` carries the CEL expression the API server evaluates (`x-kubernetes-validations` in the
generated CRD) and the Python predicate `kubetune validate` and the operator evaluate, side by side,
so the two cannot drift apart without a test noticing (tests/integration compares them on the
invalid manifests).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, GetJsonSchemaHandler, model_validator
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError


@dataclass(frozen=True)
class Rule:
    """A cross-field rule: CEL for the API server, a Python predicate for everyone else.

    `field` is the path of the offending field relative to the model the rule sits on
    (e.g. ".quantization"); it becomes the CRD's `fieldPath` and the error's location.
    A rule without `check` compares old and new objects (a transition rule) and only the
    API server can judge it.
    """

    cel: str
    message: str
    field: str = ""
    check: Callable[[Any], bool] | None = None

    def to_crd(self) -> dict[str, str]:
        validation = {"rule": self.cel, "message": self.message}
        if self.field:
            validation["fieldPath"] = self.field
        return validation


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are errors; instances are immutable."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        validate_default=True,
    )

    rules: ClassVar[tuple[Rule, ...]] = ()
    """Cross-field rules of this model (not inherited: each model states its own)."""

    @classmethod
    def own_rules(cls) -> tuple[Rule, ...]:
        own: tuple[Rule, ...] = cls.__dict__.get("rules", ())
        return own

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(core_schema)
        target = handler.resolve_ref_schema(json_schema)
        if cls.own_rules():
            target["x-kubernetes-validations"] = [rule.to_crd() for rule in cls.own_rules()]
        return json_schema

    @model_validator(mode="after")
    def _check_rules(self) -> ApiModel:
        for rule in type(self).own_rules():
            if rule.check is not None and not rule.check(self):
                raise PydanticCustomError("cross_field", rule.message, {"field": rule.field})
        return self

    def to_wire(self) -> dict[str, Any]:
        """The manifest form: camelCase keys, no unset optional fields."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)
