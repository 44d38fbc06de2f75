"""Validate FineTuneJob manifests and explain every error by field path and what would be valid."""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.api.v1alpha1.spec import MODEL_URI_PATTERN, OUTPUT_URI_PATTERN, QUANTITY_PATTERN

# Regular expressions mean little to a user at 3 a.m.; say what they accept instead.
PATTERN_HINTS = {
    MODEL_URI_PATTERN: "a URI starting with hf://org/name, s3://bucket/, pvc://claim/ or file:///path",
    OUTPUT_URI_PATTERN: "a URI starting with s3://bucket/, pvc://claim/ or file:///path (hf:// is read-only)",
    QUANTITY_PATTERN: "a Kubernetes quantity such as 16, 500m, 64Gi",
}


@dataclass(frozen=True)
class FieldError:
    """One problem with one field of a manifest."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def format_path(location: tuple[int | str, ...]) -> str:
    """('spec', 'training', 'learningRateGroups', 0, 'match') -> 'spec.training.learningRateGroups[0].match'."""
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else part
    return path


def _model_at(location: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model class that validates the object at `location`, to list its valid fields."""
    model: type[BaseModel] = FineTuneJob
    for part in location:
        if isinstance(part, int):
            continue
        field = next((f for name, f in model.model_fields.items() if part in (name, f.alias)), None)
        if field is None:
            return None
        candidates = [field.annotation, *getattr(field.annotation, "__args__", ())]
        for candidate in list(candidates):
            candidates.extend(getattr(candidate, "__args__", ()))
        nested = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nested is None:
            return None
        model = nested
    return model


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _explain(error: Any) -> FieldError:
    location = tuple(error["loc"])
    kind = error["type"]
    context = error.get("ctx") or {}
    if kind == "cross_field":
        suffix = context.get("field", "").lstrip(".")
        path = format_path(location)
        return FieldError(f"{path}.{suffix}" if suffix and path else suffix or path, error["msg"])
    path = format_path(location)
    if kind == "extra_forbidden":
        parent = _model_at(location[:-1])
        valid = sorted(f.alias or n for n, f in parent.model_fields.items()) if parent else []
        close = difflib.get_close_matches(str(location[-1]), valid, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        hint += f" Valid fields here: {', '.join(valid)}" if valid else ""
        return FieldError(path, f"unknown field{hint}")
    if kind == "missing":
        return FieldError(path, f"required: set {path}")
    if kind == "string_pattern_mismatch":
        hint = PATTERN_HINTS.get(context.get("pattern", ""), f"must match {context.get('pattern')}")
        return FieldError(path, f"{_short(error.get('input'))} is not valid: expected {hint}")
    message = error["msg"].removeprefix("Value error, ")
    if "input" in error and kind not in ("model_type", "dict_type"):
        message += f" (got {_short(error['input'])})"
    return FieldError(path, message)


def validate_manifest(manifest: Any) -> tuple[FineTuneJob | None, list[FieldError]]:
    """The validated job, or every error found in it."""
    if not isinstance(manifest, dict):
        return None, [
            FieldError("(document)", f"expected a FineTuneJob mapping, got {type(manifest).__name__}")
        ]
    try:
        return FineTuneJob.model_validate(manifest), []
    except ValidationError as error:
        return None, [_explain(e) for e in error.errors(include_url=False)]


@dataclass(frozen=True)
class DocumentResult:
    """The outcome of validating one YAML document of one file."""

    source: str
    index: int
    name: str
    errors: list[FieldError]


def load_documents(path: Path) -> Iterator[tuple[int, Any]]:
    """Every non-empty YAML document of a file, with its position."""
    with path.open(encoding="utf-8") as stream:
        for index, document in enumerate(yaml.safe_load_all(stream)):
            if document is not None:
                yield index, document


def validate_file(path: Path) -> list[DocumentResult]:
    """Validate each FineTuneJob document in a file; other kinds are skipped."""
    results = []
    try:
        documents = list(load_documents(path))
    except yaml.YAMLError as error:
        return [DocumentResult(str(path), 0, "?", [FieldError("(yaml)", str(error))])]
    for index, document in documents:
        if isinstance(document, dict) and document.get("kind") not in (None, "FineTuneJob"):
            continue
        _, errors = validate_manifest(document)
        name = document.get("metadata", {}).get("name", "?") if isinstance(document, dict) else "?"
        results.append(DocumentResult(str(path), index, str(name), errors))
    return results
