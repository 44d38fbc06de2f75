"""Build the quickstart's shipped assets: a small alpaca dataset and a tiny Llama-style model.

No model hub is reachable from where kubetune is tested, so the quickstart ships its own model:
a byte-level BPE tokenizer trained on the dataset and a 2-layer Llama with random weights.
Everything is seeded, so rebuilding gives the same data and weights.

    .venv/bin/python scripts/build-quickstart.py examples/quickstart
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ROWS = 240
SEED = 7
WORDS = (
    "apple river stone cloud lamp garden window tiger silver music paper ocean forest candle "
    "mirror rocket pencil bridge castle winter summer planet island orange yellow purple green"
).split()


def _row(rng: random.Random) -> dict[str, str]:
    """One instruction of a few learnable kinds: the model can get the responses right."""
    kind = rng.randrange(4)
    words = rng.sample(WORDS, rng.randint(2, 4))
    if kind == 0:
        return {"instruction": "Repeat the words in upper case.", "input": " ".join(words), "output": " ".join(words).upper()}
    if kind == 1:
        return {"instruction": "Reverse the order of the words.", "input": " ".join(words), "output": " ".join(reversed(words))}
    if kind == 2:
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        return {"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": str(a + b)}
    return {"instruction": "Name the first word.", "input": " ".join(words), "output": words[0]}


def build_dataset(path: Path) -> list[dict[str, str]]:
    rng = random.Random(SEED)
    rows = [_row(rng) for _ in range(ROWS)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return rows


def build_model(folder: Path, rows: list[dict[str, str]]) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<pad>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    texts = [" ".join(row.values()) for row in rows] + ["### Instruction:\n### Input:\n### Response:\n"]
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(folder)

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)


def main(target: str) -> None:
    folder = Path(target)
    (folder / "model").mkdir(parents=True, exist_ok=True)
    rows = build_dataset(folder / "alpaca.jsonl")
    build_model(folder / "model", rows)
    print(f"wrote {folder}/alpaca.jsonl ({len(rows)} rows) and {folder}/model")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "examples/quickstart")
