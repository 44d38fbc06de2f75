"""Rows -> tokenized examples: response-only labels by offsets, chat templates, packing,
validation split, file types, and the classification and QA tasks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.v1alpha1 import DatasetSpec, Task
from kubetune_trainer.data import (
    IGNORE_INDEX,
    CausalLMCollator,
    build_task_data,
    collator_for,
    load_rows,
    pack_examples,
)
from kubetune_trainer.termination import DataError

pytestmark = pytest.mark.trainer


def a_dataset(**fields: Any) -> DatasetSpec:
    return DatasetSpec.model_validate({"source": "file:///data", "validationSplit": 0.0, **fields})


def labelled_text(tokenizer: Any, example: dict[str, list[int]]) -> str:
    return str(tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX]))


def test_alpaca_rows_carry_loss_on_the_response_and_eos_only(tokenizer: Any, data_dir: Path) -> None:
    rows = load_rows(data_dir / "alpaca.jsonl")
    data = build_task_data(
        rows, tokenizer, a_dataset(format="alpaca", maxSeqLength=256), Task.CAUSAL_LM, seed=0
    )
    first, row = data.train[0], rows[0]
    assert labelled_text(tokenizer, first) == row["output"] + tokenizer.eos_token
    prompt_ids = [
        i for i, label in zip(first["input_ids"], first["labels"], strict=True) if label == IGNORE_INDEX
    ]
    assert "### Response:" in tokenizer.decode(prompt_ids)
    assert first["input_ids"][0] == tokenizer.bos_token_id and first["labels"][0] == IGNORE_INDEX
    # Labels are the input ids where they are not masked (the model shifts them itself).
    assert all(
        label in (IGNORE_INDEX, token)
        for token, label in zip(first["input_ids"], first["labels"], strict=True)
    )


def test_train_on_prompt_puts_loss_on_every_text_token(tokenizer: Any, data_dir: Path) -> None:
    rows = load_rows(data_dir / "alpaca.jsonl").select(range(4))
    data = build_task_data(
        rows, tokenizer, a_dataset(trainOnPrompt=True, maxSeqLength=256), Task.CAUSAL_LM, seed=0
    )
    assert data.train[0]["labels"][1:] == data.train[0]["input_ids"][1:]  # all but BOS


def test_chat_rows_carry_loss_on_every_assistant_turn_and_nothing_else(
    tokenizer: Any, data_dir: Path
) -> None:
    rows = load_rows(data_dir / "chat.jsonl").select(range(3))
    data = build_task_data(
        rows, tokenizer, a_dataset(format="chat", maxSeqLength=256), Task.CAUSAL_LM, seed=0
    )
    for example, row in zip(data.train, rows, strict=True):
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert labelled_text(tokenizer, example) == "".join(f"{a}<|im_end|>\n" for a in answers)


def test_completion_and_text_formats(tokenizer: Any, data_dir: Path) -> None:
    completion = load_rows(data_dir / "completion.jsonl")
    data = build_task_data(completion, tokenizer, a_dataset(format="completion"), Task.CAUSAL_LM, seed=0)
    assert labelled_text(tokenizer, data.train[0]) == completion[0]["completion"] + tokenizer.eos_token
    text = load_rows(data_dir / "text.jsonl")
    data = build_task_data(text, tokenizer, a_dataset(format="text"), Task.CAUSAL_LM, seed=0)
    assert labelled_text(tokenizer, data.train[0]) == text[0]["text"] + tokenizer.eos_token


def test_rows_whose_response_is_cut_off_are_dropped_and_none_left_is_an_error(
    tokenizer: Any, data_dir: Path
) -> None:
    rows = load_rows(data_dir / "alpaca.jsonl").select(range(4))
    with pytest.raises(DataError, match="maxSeqLength=8"):
        build_task_data(rows, tokenizer, a_dataset(maxSeqLength=8), Task.CAUSAL_LM, seed=0)


def test_packing_fills_rows_up_to_max_length_without_splitting_examples() -> None:
    examples = [{"input_ids": [n] * n, "labels": [n] * n} for n in (7, 5, 4, 3, 3, 2)]
    packed = pack_examples(examples, max_length=10)
    assert all(len(row["input_ids"]) <= 10 for row in packed)
    assert sorted(t for row in packed for t in row["input_ids"]) == sorted(
        t for e in examples for t in e["input_ids"]
    )
    assert len(packed) == 3  # 24 tokens in rows of 10: best fit needs 3


def test_packed_dataset_and_collator_pad_labels_with_ignore_index(tokenizer: Any, data_dir: Path) -> None:
    rows = load_rows(data_dir / "alpaca.jsonl")
    unpacked = build_task_data(rows, tokenizer, a_dataset(maxSeqLength=512), Task.CAUSAL_LM, seed=0)
    packed = build_task_data(
        rows, tokenizer, a_dataset(maxSeqLength=512, packing=True), Task.CAUSAL_LM, seed=0
    )
    assert len(packed.train) < len(unpacked.train) / 2
    batch = CausalLMCollator(tokenizer.pad_token_id)([packed.train[0], packed.train[-1]])
    assert batch["input_ids"].shape[1] % 8 == 0
    short = int(batch["attention_mask"][1].sum())
    assert (batch["labels"][1, short:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][1, short:] == tokenizer.pad_token_id).all()


def test_on_the_cpu_a_batch_is_padded_to_its_longest_row_and_for_tensor_cores_to_a_multiple_of_8(
    tokenizer: Any,
) -> None:
    import torch

    from kubetune_trainer.trainer import pad_multiple

    rows = [{"input_ids": [5] * 5, "labels": [5] * 5}, {"input_ids": [6] * 11, "labels": [6] * 11}]
    longest = collator_for("causal-lm", tokenizer, pad_to_multiple_of=None)(rows)
    assert longest["input_ids"].shape == (2, 11)
    assert longest["attention_mask"].sum().item() == 16
    assert collator_for("causal-lm", tokenizer, pad_to_multiple_of=8)(rows)["input_ids"].shape == (2, 16)
    if not torch.cuda.is_available():
        assert pad_multiple() is None


def test_validation_split_holds_out_rows_before_tokenizing(tokenizer: Any, data_dir: Path) -> None:
    rows = load_rows(data_dir / "alpaca.jsonl")
    data = build_task_data(rows, tokenizer, a_dataset(validationSplit=0.1), Task.CAUSAL_LM, seed=0)
    assert data.validation is not None
    assert (len(data.train), len(data.validation)) == (144, 16)


def test_jsonl_json_parquet_and_csv_files_read_the_same_rows(data_dir: Path, tmp_path: Path) -> None:
    reference = load_rows(data_dir / "sentiment.jsonl")
    frame = reference.to_pandas()
    frame.to_parquet(tmp_path / "rows.parquet")
    frame.to_csv(tmp_path / "rows.csv", index=False)
    (tmp_path / "rows.json").write_text(json.dumps(reference.to_list()))
    for name in ("rows.parquet", "rows.csv", "rows.json"):
        assert load_rows(tmp_path / name).to_list() == reference.to_list(), name
    (tmp_path / "noext").write_text((data_dir / "sentiment.jsonl").read_text())
    assert len(load_rows(tmp_path / "noext", file_type="jsonl")) == len(reference)


def test_seq_cls_maps_string_labels_to_ids_shared_by_both_splits(tokenizer: Any, data_dir: Path) -> None:
    rows = load_rows(data_dir / "sentiment.jsonl")
    data = build_task_data(
        rows, tokenizer, a_dataset(format="text", validationSplit=0.2), Task.SEQ_CLS, seed=0
    )
    assert data.id2label == {0: "negative", 1: "positive"} and data.num_labels == 2
    assert data.validation is not None and set(data.validation["labels"]) == {0, 1}


def test_token_cls_labels_the_first_sub_token_of_each_word(tokenizer: Any, data_dir: Path) -> None:
    rows = load_rows(data_dir / "ner.jsonl")
    spec = a_dataset(format="text", columns={"text": "tokens", "label": "ner_tags"})
    data = build_task_data(rows, tokenizer, spec, Task.TOKEN_CLS, seed=0)
    ids = {name: i for i, name in data.id2label.items()}
    labels = [label for label in data.train[0]["labels"] if label != IGNORE_INDEX]
    assert labels == [ids[tag] for tag in rows[0]["ner_tags"]]


def test_question_answering_positions_point_at_the_answer(tokenizer: Any, data_dir: Path) -> None:
    rows = load_rows(data_dir / "qa.jsonl")
    data = build_task_data(rows, tokenizer, a_dataset(format="text"), Task.QUESTION_ANSWERING, seed=0)
    example = data.train[0]
    span = example["input_ids"][example["start_positions"] : example["end_positions"] + 1]
    assert tokenizer.decode(span).strip() == rows[0]["answers"]["text"][0]


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_a_chat_model_learns_alpaca_rows_in_its_own_template_with_loss_on_the_answer_only(
    smollm2_tokenizer: Any, tmp_path: Path
) -> None:
    tokenizer = smollm2_tokenizer
    row = {"instruction": "Reverse the word.", "input": "kubetune", "output": "enutebuk"}
    (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n")
    data = build_task_data(
        load_rows(tmp_path / "rows.jsonl"), tokenizer, a_dataset(format="alpaca"), Task.CAUSAL_LM, seed=0
    )
    example = data.train[0]
    assert tokenizer.decode(example["input_ids"]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nReverse the word.\n\nkubetune<|im_end|>\n"
        "<|im_start|>assistant\nenutebuk<|im_end|>\n"
    )
    # The template's own end-of-turn closes the answer: no extra EOS, no BOS before the system turn.
    assert example["input_ids"].count(tokenizer.eos_token_id) == 3
    answer = [i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX]
    assert answer == list(range(answer[0], len(example["input_ids"])))  # one span, to the end
    tokens = tokenizer.convert_ids_to_tokens(example["input_ids"])
    assert tokens[answer[0] - 4 :] == [
        "<|im_start|>",
        "ass",
        "istant",
        "Ċ",
        "en",
        "ute",
        "b",
        "uk",
        "<|im_end|>",
        "Ċ",
    ]
    assert labelled_text(tokenizer, example) == "enutebuk<|im_end|>\n"
    assert example["input_ids"] == tokenizer.apply_chat_template(
        [
            {"role": "user", "content": "Reverse the word.\n\nkubetune"},
            {"role": "assistant", "content": "enutebuk"},
        ],
        tokenize=True,
        return_dict=False,
    )


def test_a_chat_model_learns_completion_rows_as_one_exchange(smollm2_tokenizer: Any, data_dir: Path) -> None:
    tokenizer = smollm2_tokenizer
    rows = load_rows(data_dir / "completion.jsonl")
    data = build_task_data(rows, tokenizer, a_dataset(format="completion"), Task.CAUSAL_LM, seed=0)
    text = tokenizer.decode(data.train[0]["input_ids"])
    assert f"<|im_start|>user\n{rows[0]['prompt']}<|im_end|>\n<|im_start|>assistant\n" in text
    assert "### " not in text
    assert labelled_text(tokenizer, data.train[0]) == f"{rows[0]['completion']}<|im_end|>\n"


def test_without_a_template_alpaca_rows_keep_their_headers_even_after_a_chat_dataset(
    tokenizer: Any, data_dir: Path
) -> None:
    assert tokenizer.chat_template is None  # the tiny test tokenizer ships none
    chat = load_rows(data_dir / "chat.jsonl").select(range(2))
    build_task_data(chat, tokenizer, a_dataset(format="chat"), Task.CAUSAL_LM, seed=0)
    assert tokenizer.chat_template is None  # ChatML was used, not left on the tokenizer
    rows = load_rows(data_dir / "alpaca.jsonl").select(range(2))
    data = build_task_data(rows, tokenizer, a_dataset(format="alpaca"), Task.CAUSAL_LM, seed=0)
    assert "### Instruction:" in tokenizer.decode(data.train[0]["input_ids"])
