"""A job with sample prompts publishes what its model answers to them, before and after training,
and the tokenizer it publishes renders prompts the way the job trained."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tests.trainer.conftest import cpu_job

from kubetune.api.v1alpha1 import DatasetSpec
from kubetune_trainer.data import DEFAULT_CHAT_TEMPLATE, render_prompt, save_tokenizer
from kubetune_trainer.samples import Sample, exact_match_metrics, is_exact

pytestmark = pytest.mark.trainer

LORA = {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["q_proj", "v_proj"]}}
PROMPTS = ["Color of ocean?", "Color of lemon?", "And grass?"]


def greedy(model: Any, tokenizer: Any, text: str, max_new_tokens: int) -> tuple[str, int]:
    """One prompt answered by plain transformers, unbatched: the answer and its token count."""
    import torch

    batch = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    model.eval()
    with torch.no_grad():
        output = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    new = output[0, batch["input_ids"].shape[1] :]
    return str(tokenizer.decode(new, skip_special_tokens=True)).strip(), len(new)


def test_a_chat_job_publishes_its_greedy_answers_before_and_after_and_a_tokenizer_in_its_template(
    tiny_llama_dir: Path, data_dir: Path, tmp_path: Path, run_job: Any
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job = cpu_job(
        tiny_llama_dir,
        data_dir / "chat.jsonl",
        tmp_path / "out",
        method=LORA,
        dataset={"format": "chat", "validationSplit": 0.0},
        training={"maxSteps": 6},
        samples={
            "maxNewTokens": 5,
            "prompts": [{"prompt": p} for p in PROMPTS[:2]] + [{"prompt": PROMPTS[2], "expected": "green"}],
        },
    )
    result = run_job(job)
    manifest = json.loads((tmp_path / "out" / "kubetune-manifest.json").read_text())
    assert [s["prompt"] for s in manifest["samples"]] == PROMPTS
    assert manifest["samples"] == [s.to_manifest() for s in result.samples]
    assert manifest["samples"][2]["exactMatch"] is False  # a random model does not say "green"
    assert manifest["metrics"]["samples_exact_match"] == 0.0
    assert manifest["metrics"]["samples_base_exact_match"] == 0.0

    # The template-less tokenizer trained in ChatML, and says so once published; the one the
    # test loads from the model directory still has none.
    published = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert published.chat_template == DEFAULT_CHAT_TEMPLATE
    original = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert not getattr(original, "chat_template", None)

    # Each answer is what plain transformers generates greedily, one prompt at a time, from the
    # base and from the published adapter on it, prompted through the published template.
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    for sample in result.samples:
        text = published.apply_chat_template(
            [{"role": "user", "content": sample.prompt}], tokenize=False, add_generation_prompt=True
        )
        answer, count = greedy(base, published, text, 5)
        assert sample.base_answer == answer and count <= 5
    tuned = PeftModel.from_pretrained(base, tmp_path / "out")
    for sample in result.samples:
        text = published.apply_chat_template(
            [{"role": "user", "content": sample.prompt}], tokenize=False, add_generation_prompt=True
        )
        assert sample.answer == greedy(tuned, published, text, 5)[0]


def test_prompts_are_rendered_as_the_training_rows_render_them(tokenizer: Any, smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    def dataset(format: str) -> DatasetSpec:
        return DatasetSpec(source="file:///data.jsonl", format=format)  # type: ignore[arg-type]

    smollm2 = AutoTokenizer.from_pretrained(smollm2_dir)
    for format in ("alpaca", "completion", "chat"):
        assert render_prompt("color(tomato)", smollm2, dataset(format)) == (
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            "<|im_start|>user\ncolor(tomato)<|im_end|>\n<|im_start|>assistant\n",
            False,
        )
    # Without a template of the model's own: the alpaca headers, ChatML for chat rows, plain text otherwise.
    assert render_prompt("Name a color.", tokenizer, dataset("alpaca")) == (
        "### Instruction:\nName a color.\n\n### Response:\n",
        True,
    )
    assert render_prompt("Hi", tokenizer, dataset("chat")) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        False,
    )
    assert render_prompt("color(tomato) =", tokenizer, dataset("text")) == ("color(tomato) =", True)


def test_only_a_chat_job_saves_a_template_the_model_lacks(tokenizer: Any, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    for format, saved in (("chat", DEFAULT_CHAT_TEMPLATE), ("alpaca", None), ("text", None)):
        target = tmp_path / format
        save_tokenizer(tokenizer, DatasetSpec(source="file:///d.jsonl", format=format), target)  # type: ignore[arg-type]
        assert getattr(AutoTokenizer.from_pretrained(target), "chat_template", None) == saved
        assert not getattr(tokenizer, "chat_template", None)


def test_exact_match_ignores_case_spaces_and_a_final_period_only() -> None:
    assert is_exact(" Red.\n", "red")
    assert not is_exact("red, like a tomato", "red")
    assert not is_exact("The color is red.", "red")
    samples = [
        Sample("color(tomato)", "red", base_answer="Tomatoes are red.", expected="red"),
        Sample("color(frog)", "Green", base_answer="green", expected="green"),
        Sample("color(sun)", "blue", base_answer="I'm glad", expected="yellow"),
        Sample("Hi", "Hello"),
    ]
    assert exact_match_metrics(samples) == {
        "samples_exact_match": 2 / 3,
        "samples_base_exact_match": 1 / 3,
    }
    assert exact_match_metrics([Sample("color(tomato)", "red", expected="red")]) == {
        "samples_exact_match": 1.0
    }
    assert samples[3].to_manifest() == {"prompt": "Hi", "answer": "Hello"}
