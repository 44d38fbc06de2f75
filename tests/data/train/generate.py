"""Regenerate the small training sets in this folder: `python tests/data/train/generate.py`.

The rows are templated so that a tiny model can learn them in a few steps (the tests
check that the loss goes down and that a classifier beats its untrained accuracy).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
COLORS = {
    "apple": "red",
    "banana": "yellow",
    "grass": "green",
    "sky": "blue",
    "snow": "white",
    "coal": "black",
    "orange": "orange",
    "cherry": "red",
    "lemon": "yellow",
    "leaf": "green",
    "ocean": "blue",
    "milk": "white",
}
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
POSITIVE = [
    "wonderful",
    "great",
    "excellent",
    "delightful",
    "fantastic",
    "lovely",
    "superb",
    "brilliant",
    "pleasant",
    "amazing",
]
NEGATIVE = [
    "terrible",
    "awful",
    "horrible",
    "dreadful",
    "boring",
    "bad",
    "disappointing",
    "poor",
    "miserable",
    "annoying",
]
SUBJECTS = [
    "movie",
    "meal",
    "book",
    "concert",
    "hotel",
    "trip",
    "service",
    "game",
    "show",
    "class",
    "phone",
    "car",
]
FRAMES = [
    "The {s} was {w}.",
    "What a {w} {s}!",
    "I found the {s} {w}.",
    "Honestly, the {s} felt {w}.",
    "Our {s} turned out {w}.",
    "That {s} is {w}.",
]
PEOPLE = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi"]
CITIES = ["Paris", "Berlin", "Madrid", "Rome", "Lisbon", "Vienna", "Oslo", "Prague"]


def write(name: str, rows: list[dict[str, object]]) -> None:
    with (HERE / name).open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def main() -> None:
    rng = random.Random(0)
    alpaca = []
    for _ in range(160):
        if rng.random() < 0.5:
            thing = rng.choice(sorted(COLORS))
            alpaca.append(
                {
                    "instruction": "What color is this?",
                    "input": thing,
                    "output": f"The {thing} is {COLORS[thing]}.",
                }
            )
        else:
            start = rng.randrange(0, 7)
            alpaca.append(
                {
                    "instruction": f"Count up from {NUMBERS[start]}.",
                    "input": "",
                    "output": " ".join(NUMBERS[start : start + 4]),
                }
            )
    write("alpaca.jsonl", alpaca)
    write(
        "completion.jsonl",
        [
            {"prompt": f"Q: color of {row['input']}?\nA:", "completion": f" {row['output']}"}
            for row in alpaca
            if row["input"]
        ][:60],
    )
    write("text.jsonl", [{"text": " ".join(NUMBERS[s : s + 6])} for s in range(5) for _ in range(8)])
    chats = []
    for _ in range(40):
        a, b = rng.sample(sorted(COLORS), 2)
        chats.append(
            {
                "messages": [
                    {"role": "system", "content": "You name colors."},
                    {"role": "user", "content": f"Color of {a}?"},
                    {"role": "assistant", "content": COLORS[a]},
                    {"role": "user", "content": f"And {b}?"},
                    {"role": "assistant", "content": COLORS[b]},
                ]
            }
        )
    write("chat.jsonl", chats)
    sentiment = []
    for _ in range(240):
        label = rng.choice(["positive", "negative"])
        word = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        sentiment.append({"text": rng.choice(FRAMES).format(s=rng.choice(SUBJECTS), w=word), "label": label})
    write("sentiment.jsonl", sentiment)
    ner = []
    for _ in range(60):
        person, city = rng.choice(PEOPLE), rng.choice(CITIES)
        tokens = [person, "moved", "to", city, "last", "year"]
        ner.append({"tokens": tokens, "ner_tags": ["B-PER", "O", "O", "B-LOC", "O", "O"]})
    write("ner.jsonl", ner)
    qa = []
    for _ in range(40):
        person, city = rng.choice(PEOPLE), rng.choice(CITIES)
        context = f"{person} lives in {city} and works there."
        qa.append(
            {
                "question": f"Where does {person} live?",
                "context": context,
                "answers": {"text": [city], "answer_start": [context.index(city)]},
            }
        )
    write("qa.jsonl", qa)


if __name__ == "__main__":
    main()
