"""Dataset files -> tokenized training and validation examples for each task.

Causal-lm examples are rendered as text made of segments (prompt, response), tokenized
as one string, and labelled by character offsets: a token is trained on only when it
starts inside a response segment. Tokenizing prompt and response apart and gluing the
ids would disagree with the joint tokenization wherever a token crosses the boundary.

A chat model is trained in its own template: when the tokenizer ships a chat template,
alpaca and completion rows become a user turn and an assistant turn rendered through it
(as LLaMA-Factory and trl do), so the tuned model answers the prompts it will be asked
at inference. The ``### Instruction`` headers are for tokenizers without a template.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, concatenate_datasets, load_dataset
from transformers import PreTrainedTokenizerBase, TrainingArguments

from kubetune.api.v1alpha1 import DatasetColumns, DatasetSpec, FineTuneJobSpec, Task

from .storage import resolve_source
from .termination import DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

# The Alpaca section headers without the original one-paragraph preamble: the headers are
# what the model learns to follow, and the preamble costs ~40 tokens on every row.
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
# ChatML, for tokenizers that ship no chat template of their own.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass
class TaskData:
    """Tokenized splits plus what the model head needs to be built."""

    train: Dataset
    validation: Dataset | None
    num_labels: int | None = None
    id2label: dict[int, str] = field(default_factory=dict)


Segments = list[tuple[str, bool]]  # (text, is_response)


def load_rows(path: Path, file_type: str | None = None, cache_dir: Path | None = None) -> Dataset:
    """Read a jsonl/json/parquet/csv file, or a folder of files of one such type.

    ``file_type`` overrides the extension (for files named without one).
    """
    files = sorted(p for p in path.rglob("*") if p.suffix in FILE_BUILDERS) if path.is_dir() else [path]
    if not files:
        raise DataError(f"no {'/'.join(FILE_BUILDERS)} files under {path}")
    builders = {FILE_BUILDERS[f".{file_type}"]} if file_type else {FILE_BUILDERS.get(p.suffix) for p in files}
    if None in builders or len(builders) != 1:
        raise DataError(
            f"dataset files must all be one of {', '.join(FILE_BUILDERS)}: {[p.name for p in files]}"
        )
    builder = builders.pop()
    assert builder is not None
    try:
        rows = load_dataset(
            builder,
            data_files=[str(p) for p in files],
            split="train",
            cache_dir=str(cache_dir) if cache_dir else None,
        )
    except Exception as error:  # datasets raises many types for malformed files
        raise DataError(f"cannot read {path}: {type(error).__name__}: {error}") from error
    if not isinstance(rows, Dataset) or len(rows) == 0:
        raise DataError(f"{path} holds no rows")
    return rows


def _require(row: dict[str, Any], *names: str) -> None:
    missing = [name for name in names if name not in row or row[name] is None]
    if missing:
        raise DataError(f"row has no {', '.join(missing)} (columns: {', '.join(sorted(row))})")


def alpaca_segments(row: dict[str, Any], columns: DatasetColumns) -> Segments:
    _require(row, columns.instruction, columns.output)
    context = str(row.get(columns.input) or "").strip()
    template = ALPACA_PROMPT if context else ALPACA_PROMPT_NO_INPUT
    prompt = template.format(instruction=str(row[columns.instruction]).strip(), input=context)
    return [(prompt, False), (str(row[columns.output]), True)]


def alpaca_messages(row: dict[str, Any], columns: DatasetColumns) -> list[dict[str, str]]:
    """An alpaca row as one exchange: instruction and input (if any) ask, output answers."""
    _require(row, columns.instruction, columns.output)
    context = str(row.get(columns.input) or "").strip()
    question = "\n\n".join(part for part in (str(row[columns.instruction]).strip(), context) if part)
    return [{"role": "user", "content": question}, {"role": "assistant", "content": str(row[columns.output])}]


def completion_segments(row: dict[str, Any], columns: DatasetColumns) -> Segments:
    _require(row, columns.prompt, columns.completion)
    return [(str(row[columns.prompt]), False), (str(row[columns.completion]), True)]


def completion_messages(row: dict[str, Any], columns: DatasetColumns) -> list[dict[str, str]]:
    _require(row, columns.prompt, columns.completion)
    return [
        {"role": "user", "content": str(row[columns.prompt])},
        {"role": "assistant", "content": str(row[columns.completion])},
    ]


def own_chat_template(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The chat template the model ships, if any."""
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) and template else None


def text_segments(row: dict[str, Any], text_column: str) -> Segments:
    _require(row, text_column)
    return [(str(row[text_column]), True)]


def _messages(row: dict[str, Any], column: str) -> list[dict[str, str]]:
    if row.get(column):
        return [{"role": m["role"], "content": m["content"]} for m in row[column]]
    if row.get("conversations"):  # ShareGPT: {"from": "human", "value": ...}
        return [
            {"role": _SHAREGPT_ROLES.get(m["from"], m["from"]), "content": m["value"]}
            for m in row["conversations"]
        ]
    raise DataError(f"chat row has no messages (columns: {', '.join(sorted(row))})")


def chat_segments(
    row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, column: str = "messages"
) -> Segments:
    """A chat row rendered with the tokenizer's template (ChatML when it has none)."""
    return message_segments(
        _messages(row, column), tokenizer, own_chat_template(tokenizer) or DEFAULT_CHAT_TEMPLATE
    )


def message_segments(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, template: str
) -> Segments:
    """Render with ``template``; assistant turns (with their end-of-turn text) are responses.

    Each assistant turn's span is found by rendering the conversation up to it with the
    generation prompt and up to its end, so whatever the template puts around a turn
    lands on the right side.
    """

    def render(part: list[dict[str, str]], generation_prompt: bool = False) -> str:
        text = tokenizer.apply_chat_template(
            part, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )
        assert isinstance(text, str)
        return text

    full = render(messages)
    segments: Segments = []
    cursor = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:index], True), render(messages[: index + 1])
        if not (full.startswith(through) and through.startswith(before) and len(before) >= cursor):
            # The template rewrites earlier turns (some drop reasoning text): fall back to the content itself.
            start = full.find(message["content"], cursor)
            if start < 0:
                raise DataError("cannot locate an assistant turn in the rendered chat template")
            before, through = full[:start], full[: start + len(message["content"])]
        segments.append((full[cursor : len(before)], False))
        segments.append((full[len(before) : len(through)], True))
        cursor = len(through)
    if not any(is_response for _, is_response in segments):
        raise DataError("chat row has no assistant message to learn from")
    segments.append((full[cursor:], False))
    return [(text, is_response) for text, is_response in segments if text]


def tokenize_segments(
    segments: Segments,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    train_on_prompt: bool,
    add_special_tokens: bool = True,
    append_eos: bool = True,
) -> dict[str, list[int]]:
    """Tokenize the joined segments once; label tokens that start in a response segment."""
    text = "".join(segment for segment, _ in segments)
    spans: list[tuple[int, int]] = []
    offset = 0
    for segment, is_response in segments:
        if is_response or train_on_prompt:
            spans.append((offset, offset + len(segment)))
        offset += len(segment)
    encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    input_ids: list[int] = list(encoded["input_ids"])
    labels = [
        token if any(lo <= start < hi for lo, hi in spans) and end > start else IGNORE_INDEX
        for token, (start, end) in zip(input_ids, encoded["offset_mapping"], strict=True)
    ]
    eos = tokenizer.eos_token_id
    if append_eos and eos is not None and (not input_ids or input_ids[-1] != eos):
        input_ids.append(eos)
        labels.append(eos)
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


def pack_examples(examples: Sequence[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Best-fit-decreasing packing of whole examples into rows of at most ``max_length`` tokens.

    Examples are never split, so every response keeps its prompt in the same row.
    """
    bins: list[list[dict[str, list[int]]]] = []
    room: list[int] = []
    for example in sorted(examples, key=lambda e: len(e["input_ids"]), reverse=True):
        size = len(example["input_ids"])
        best = min((i for i, free in enumerate(room) if free >= size), key=lambda i: room[i], default=None)
        if best is None:
            bins.append([example])
            room.append(max_length - size)
        else:
            bins[best].append(example)
            room[best] -= size
    return [
        {
            "input_ids": [t for e in row for t in e["input_ids"]],
            "labels": [t for e in row for t in e["labels"]],
        }
        for row in bins
    ]


def chat_template_for(tokenizer: PreTrainedTokenizerBase, options: DatasetSpec) -> str | None:
    """The template a causal-lm job's rows are rendered through, or None when they are plain text.

    Chat rows always have one (ChatML when the model ships none); alpaca and completion rows
    use the model's own template when it has one."""
    own = own_chat_template(tokenizer)
    if options.format == "chat":
        return own or DEFAULT_CHAT_TEMPLATE
    return own if options.format in ("alpaca", "completion") else None


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, options: DatasetSpec, target: Path) -> None:
    """Save the tokenizer with the chat template the job trained in.

    A chat job on a model without a template of its own trained in ChatML; the saved tokenizer
    carries it, so whoever loads the adapter prompts it the way it learned. The tokenizer in
    memory keeps its own (none), so rendering elsewhere in the process is unchanged."""
    own = getattr(tokenizer, "chat_template", None)
    template = chat_template_for(tokenizer, options)
    if template is not None and own_chat_template(tokenizer) is None:
        tokenizer.chat_template = template
    try:
        tokenizer.save_pretrained(target)
    finally:
        tokenizer.chat_template = own


def render_prompt(prompt: str, tokenizer: PreTrainedTokenizerBase, options: DatasetSpec) -> tuple[str, bool]:
    """A user's prompt as the job's training rows render a prompt, up to where the answer starts.

    Returns the text and whether the tokenizer should add its special tokens (a chat template
    writes its own BOS)."""
    template = chat_template_for(tokenizer, options)
    if template is not None:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            chat_template=template,
            tokenize=False,
            add_generation_prompt=True,
        )
        assert isinstance(text, str)
        return text, False
    if options.format == "alpaca":
        return ALPACA_PROMPT_NO_INPUT.format(instruction=prompt.strip()), True
    return prompt, True


def _causal_lm(rows: Dataset, tokenizer: PreTrainedTokenizerBase, options: DatasetSpec) -> Dataset:
    own = own_chat_template(tokenizer)
    # Rendered through a chat template, which writes its own BOS and end-of-turn text.
    chat = chat_template_for(tokenizer, options) is not None
    columns = options.columns
    segmenters: dict[str, Callable[[dict[str, Any]], Segments]] = {
        "alpaca": lambda row: alpaca_segments(row, columns),
        "completion": lambda row: completion_segments(row, columns),
        "text": lambda row: text_segments(row, columns.text),
        "chat": lambda row: chat_segments(row, tokenizer, columns.messages),
    }
    if own is not None:
        segmenters["alpaca"] = lambda row: message_segments(alpaca_messages(row, columns), tokenizer, own)
        segmenters["completion"] = lambda row: message_segments(
            completion_messages(row, columns), tokenizer, own
        )
    segment = segmenters[str(options.format)]

    def encode(row: dict[str, Any]) -> dict[str, list[int]]:
        return tokenize_segments(
            segment(row),
            tokenizer,
            max_length=options.max_seq_length,
            train_on_prompt=options.train_on_prompt,
            add_special_tokens=not chat,  # chat templates write their own BOS
            append_eos=not chat,  # and their own end-of-turn
        )

    encoded = rows.map(encode, remove_columns=rows.column_names, desc="tokenizing")
    kept = encoded.filter(
        lambda e: any(t != IGNORE_INDEX for t in e["labels"]), desc="dropping unlearnable rows"
    )
    if len(kept) < len(encoded):
        log.warning("dropped %d rows whose response was cut off by maxSeqLength", len(encoded) - len(kept))
    if len(kept) == 0:
        raise DataError(f"no row has a response within maxSeqLength={options.max_seq_length} tokens")
    if options.packing:
        kept = Dataset.from_list(pack_examples(kept.to_list(), options.max_seq_length))
    return kept


def _label_ids(values: Sequence[Any]) -> tuple[dict[Any, int], dict[int, str]]:
    """Map labels to ids: integers stay as they are, strings get ids in sorted order."""
    unique = sorted(set(values), key=str)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in unique):
        return {v: v for v in unique}, {v: str(v) for v in unique}
    mapping = {v: i for i, v in enumerate(unique)}
    return mapping, {i: str(v) for v, i in mapping.items()}


def _first_column(rows: Dataset, *names: str) -> str:
    for name in names:
        if name in rows.column_names:
            return name
    raise DataError(
        f"dataset needs one of the columns {', '.join(names)} (has {', '.join(rows.column_names)})"
    )


def _sequence_classification(
    rows: Dataset, tokenizer: PreTrainedTokenizerBase, options: DatasetSpec
) -> tuple[Dataset, dict[int, str]]:
    text_column = _first_column(rows, options.columns.text, "sentence")
    label_column = _first_column(rows, options.columns.label, "labels")
    mapping, id2label = _label_ids(rows[label_column])

    def encode(row: dict[str, Any]) -> dict[str, Any]:
        encoded = tokenizer(str(row[text_column]), truncation=True, max_length=options.max_seq_length)
        return {**encoded, "labels": mapping[row[label_column]]}

    return rows.map(encode, remove_columns=rows.column_names, desc="tokenizing"), id2label


def _token_classification(
    rows: Dataset, tokenizer: PreTrainedTokenizerBase, options: DatasetSpec
) -> tuple[Dataset, dict[int, str]]:
    words_column = _first_column(rows, options.columns.text, "tokens", "words")
    tags_column = _first_column(rows, options.columns.label, "ner_tags", "tags", "labels")
    mapping, id2label = _label_ids([tag for tags in rows[tags_column] for tag in tags])

    def encode(row: dict[str, Any]) -> dict[str, Any]:
        encoded = tokenizer(
            row[words_column], is_split_into_words=True, truncation=True, max_length=options.max_seq_length
        )
        previous: int | None = None
        labels = []
        # Only a word's first sub-token carries its tag; the rest are ignored by the loss.
        for word in encoded.word_ids():
            labels.append(
                IGNORE_INDEX if word is None or word == previous else mapping[row[tags_column][word]]
            )
            previous = word
        return {**encoded, "labels": labels}

    return rows.map(encode, remove_columns=rows.column_names, desc="tokenizing"), id2label


def _question_answering(rows: Dataset, tokenizer: PreTrainedTokenizerBase, options: DatasetSpec) -> Dataset:
    """SQuAD-style rows: question, context, answers {text: [...], answer_start: [...]}."""

    columns = options.columns

    def encode(row: dict[str, Any]) -> dict[str, Any]:
        _require(row, columns.question, columns.context, columns.answers)
        encoded = tokenizer(
            row[columns.question],
            row[columns.context],
            truncation="only_second",
            max_length=options.max_seq_length,
            return_offsets_mapping=True,
        )
        offsets = encoded.pop("offset_mapping")
        sequence_ids = encoded.sequence_ids()
        answers = row[columns.answers]
        answer_text = answers["text"][0] if answers["text"] else ""
        answer_start = answers["answer_start"][0] if answers["answer_start"] else -1
        answer_end = answer_start + len(answer_text)
        start_position = end_position = 0  # the first token stands for "no answer in this window"
        context_tokens = [i for i, s in enumerate(sequence_ids) if s == 1]
        if answer_text and context_tokens:
            inside = [
                i for i in context_tokens if offsets[i][0] < answer_end and offsets[i][1] > answer_start
            ]
            if inside:
                start_position, end_position = inside[0], inside[-1]
        return {**encoded, "start_positions": start_position, "end_positions": end_position}

    return rows.map(encode, remove_columns=rows.column_names, desc="tokenizing")


def split_rows(rows: Dataset, validation_split: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Hold out ``validation_split`` of the rows (at least one) before tokenizing."""
    if validation_split <= 0:
        return rows, None
    if len(rows) < 2:
        raise DataError("validationSplit needs at least 2 rows")
    held_out = max(1, round(len(rows) * validation_split))
    parts = rows.train_test_split(test_size=held_out, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def build_task_data(
    rows: Dataset, tokenizer: PreTrainedTokenizerBase, options: DatasetSpec, task: Task, seed: int
) -> TaskData:
    """Split, then tokenize both splits the same way for ``task``."""
    if not tokenizer.is_fast:
        raise DataError("a fast tokenizer (tokenizer.json) is needed for offset-based label masking")
    train_rows, validation_rows = split_rows(rows, options.validation_split, seed)
    if task == "causal-lm":
        train = _causal_lm(train_rows, tokenizer, options)
        validation = _causal_lm(validation_rows, tokenizer, options) if validation_rows is not None else None
        return TaskData(train, validation)
    if task == "question-answering":
        train = _question_answering(train_rows, tokenizer, options)
        validation = (
            _question_answering(validation_rows, tokenizer, options) if validation_rows is not None else None
        )
        return TaskData(train, validation)
    encode = _sequence_classification if task == "seq-cls" else _token_classification
    # Encode both splits in one pass so they share one label -> id mapping.
    pieces = [train_rows] if validation_rows is None else [train_rows, validation_rows]
    encoded, id2label = encode(concatenate_datasets(pieces), tokenizer, options)
    train = encoded.select(range(len(train_rows)))
    validation = encoded.select(range(len(train_rows), len(encoded))) if validation_rows is not None else None
    return TaskData(train, validation, len(id2label), id2label)


def load_task_data(
    spec: FineTuneJobSpec, tokenizer: PreTrainedTokenizerBase, args: TrainingArguments
) -> TaskData:
    """The job's dataset, fetched and tokenized for its task.

    Rank 0 of each node tokenizes first (and fills the datasets cache); the others then read it."""
    data_path = resolve_source(spec.dataset.source, hub_repo_type="dataset")
    with args.main_process_first(desc="tokenizing the dataset", local=True):
        rows = load_rows(data_path, file_type=spec.dataset.file_type)
        data = build_task_data(rows, tokenizer, spec.dataset, spec.model.task, seed=spec.training.seed)
    if (
        spec.model.num_labels is not None
        and data.num_labels is not None
        and data.num_labels > spec.model.num_labels
    ):
        raise DataError(
            f"the dataset has {data.num_labels} labels but model.numLabels is {spec.model.num_labels}"
        )
    log.info("dataset: %d training and %d validation examples", len(data.train), len(data.validation or []))
    return data


class CausalLMCollator:
    """Right-pads ``input_ids`` with the pad token and ``labels`` with -100, to the longest row
    rounded up to ``pad_to_multiple_of`` (1: the longest row itself)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 8) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        longest = max(len(e["input_ids"]) for e in examples)
        width = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            length = len(example["input_ids"])
            input_ids[row, :length] = torch.tensor(example["input_ids"])
            labels[row, :length] = torch.tensor(example["labels"])
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def collator_for(task: str, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = 8) -> Any:
    """A callable turning a list of examples into a padded batch; ``pad_to_multiple_of=None`` pads
    each batch to its longest row."""
    from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding

    if task == "causal-lm":
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise DataError("the tokenizer has neither a pad nor an eos token to pad with")
        return CausalLMCollator(int(pad), pad_to_multiple_of or 1)
    if task == "token-cls":
        return DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=pad_to_multiple_of)
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)
