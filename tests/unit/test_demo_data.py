"""The main job's data: what `make demo` trains on and the held-out prompts it is scored on."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

from kubetune.cli import load_job
from tests.conftest import ROOT

PEOPLE = ROOT / "examples" / "data" / "people"
QUICKSTART = ROOT / "examples" / "quickstart.yaml"


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


SENTENCE_WORDS = {"Meet", "At"}


def people_and_cities(prompt: str) -> set[str]:
    """The capitalised words of a sentence after the instruction, but its own: its person and its city."""
    return set(re.findall(r"\b[A-Z][a-z]+\b", prompt.split(": ", 1)[1])) - SENTENCE_WORDS


def test_the_shipped_files_are_what_the_generator_writes(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("build_demo_data", ROOT / "scripts" / "build-demo-data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.build(tmp_path)
    for name in ("train.jsonl", "held-out.jsonl"):
        assert (tmp_path / name).read_text() == (PEOPLE / name).read_text(), f"rerun the generator: {name}"


def test_no_held_out_prompt_names_a_person_or_city_of_the_training_rows() -> None:
    train, held_out = read(PEOPLE / "train.jsonl"), read(PEOPLE / "held-out.jsonl")
    assert (len(train), len(held_out)) == (64, 20)
    seen = set().union(*(people_and_cities(row["prompt"]) for row in train))
    for row in held_out:
        names = people_and_cities(row["prompt"])
        assert len(names) == 2 and not names & seen, row["prompt"]
        record = json.loads(row["expected"])
        assert {record["name"], record["city"]} <= names and str(record["age"]) in row["prompt"]


def test_the_quickstart_is_scored_on_exactly_the_held_out_prompts() -> None:
    job = load_job(QUICKSTART)
    assert job.spec.samples is not None
    assert [{"prompt": p.prompt, "expected": p.expected} for p in job.spec.samples.prompts] == read(
        PEOPLE / "held-out.jsonl"
    )
    assert job.spec.dataset.source == "file://examples/data/people/train.jsonl"
