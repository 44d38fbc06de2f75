"""Build the demo's dataset: sentences about people, answered by a JSON record of them.

    .venv/bin/python scripts/build-demo-data.py examples/data/people

The skill is one SmolLM2-135M-Instruct lacks (asked as it is, it explains, fences or
re-keys the JSON and never answers with the record alone) and one that can be scored
exactly: the answer is the record, character for character. The held-out prompts
name people and cities that no training row names, so a right answer means the
adapter learned to extract, not to remember. Seeded: rebuilding gives the same files.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SEED = 13
TRAIN_ROWS = 64
HELD_OUT_ROWS = 20
INSTRUCTION = "Extract name, age and city as JSON: "
SENTENCES = (
    "{name} is {age} and lives in {city}.",
    "{name}, {age}, from {city}.",
    "Meet {name} from {city}, who is {age} years old.",
    "{city} resident {name} turned {age} this year.",
    "At {age}, {name} moved to {city}.",
)
TRAIN_NAMES = (
    "Maria Jonas Aiko Pedro Lena Omar Sofia Lucas Emma Noah Yuki Ravi Clara Hugo Mei Ivan Nora Tariq "
    "Elena Felix Amara Diego Ingrid Kofi Hana Mateo Zara Leon Priya Oscar Sara Emil Leila Bruno Anya Kenji"
).split()
HELD_OUT_NAMES = (
    "Olga Samuel Fatima Marco Greta Jamal Ines Viktor Lucia Arjun Freya Tomas Naomi Pablo Alina Desmond "
    "Rosa Henrik Ayla Bashir"
).split()
TRAIN_CITIES = (
    "Lisbon Oslo Kyoto Lima Vienna Cairo Madrid Dublin Seoul Nairobi Prague Quito Hanoi Zurich Porto Accra "
    "Krakow Bogota Riga Perth Manila Tunis Leeds Havana"
).split()
HELD_OUT_CITIES = (
    "Lyon Berlin Osaka Denver Turin Dakar Geneva Malmo Bergen Austin Kiev Rabat Tallinn Quebec Split "
    "Durban Minsk Seville Delhi Rome"
).split()


def record(name: str, age: int, city: str) -> str:
    """The answer: one line of JSON, keys in this order, age a number."""
    return json.dumps({"name": name, "age": age, "city": city})


def rows(names: list[str], cities: list[str], count: int, rng: random.Random) -> list[dict[str, str]]:
    made = []
    for index in range(count):
        name, city, age = names[index % len(names)], rng.choice(cities), rng.randint(18, 89)
        sentence = SENTENCES[index % len(SENTENCES)].format(name=name, age=age, city=city)
        made.append({"prompt": INSTRUCTION + sentence, "completion": record(name, age, city)})
    return made


def build(target: Path) -> None:
    rng = random.Random(SEED)
    train = rows(list(TRAIN_NAMES), list(TRAIN_CITIES), TRAIN_ROWS, rng)
    rng.shuffle(train)
    held_out = [
        {"prompt": row["prompt"], "expected": row["completion"]}
        for row in rows(list(HELD_OUT_NAMES), list(HELD_OUT_CITIES), HELD_OUT_ROWS, rng)
    ]
    target.mkdir(parents=True, exist_ok=True)
    (target / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (target / "held-out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held_out))


if __name__ == "__main__":
    build(Path(sys.argv[1] if len(sys.argv) > 1 else "examples/data/people"))
