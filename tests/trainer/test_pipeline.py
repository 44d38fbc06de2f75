"""Whole runs as a pod would do them: sources and outputs in S3, a Prometheus scraping the
trainer, merged weights, learning-rate groups, added tokens, the classification and QA heads."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.support.seaweedfs import SeaweedFS
from tests.trainer.conftest import cpu_job, late_to_early, logged_losses
from tests.trainer.test_methods import logits_of, untrained_model

pytestmark = pytest.mark.trainer

LORA = {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["q_proj", "v_proj"]}}


def upload_folder(client: Any, bucket: str, prefix: str, folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


def test_a_pod_reads_model_and_data_from_s3_publishes_there_and_is_scraped_by_prometheus(
    s3_env: SeaweedFS,
    prometheus_factory: Any,
    tiny_llama_dir: Path,
    data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.support.seaweedfs import free_port

    from kubetune_trainer.train import run

    client = s3_env.client()
    bucket = s3_env.new_bucket("ml")
    upload_folder(client, bucket, "models/tiny", tiny_llama_dir)
    client.upload_file(str(data_dir / "alpaca.jsonl"), bucket, "data/alpaca.jsonl")
    port = free_port()
    monkeypatch.setenv("KUBETUNE_METRICS_PORT", str(port))
    monkeypatch.setenv("KUBETUNE_METRICS_LINGER_SECONDS", "4")
    monkeypatch.setenv("KUBETUNE_JOB_NAME", "support-bot")
    monkeypatch.setenv("KUBETUNE_NAMESPACE", "ml")
    prometheus = prometheus_factory([f"127.0.0.1:{port}"])
    scraped: list[Any] = []
    poller = threading.Thread(
        target=lambda: scraped.extend(
            prometheus.wait_for('kubetune_train_loss{finetunejob="support-bot"}', 60)
        ),
        daemon=True,
    )
    poller.start()

    job = cpu_job(
        f"s3://{bucket}/models/tiny",
        f"s3://{bucket}/data/alpaca.jsonl",
        f"s3://{bucket}/adapters/support-bot",
        method=LORA,
        checkpoint={"everySteps": 10, "keep": 1},
    ).build()
    result = run(job, "spec-digest", tmp_path / "work")
    poller.join(timeout=30)

    assert scraped and float(scraped[0]["value"][1]) > 0
    assert scraped[0]["metric"]["namespace"] == "ml" and scraped[0]["metric"]["method"] == "lora"
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="adapters/")["Contents"]}
    assert "adapters/support-bot/kubetune-manifest.json" in keys
    assert "adapters/support-bot/adapter_model.safetensors" in keys
    assert "adapters/support-bot/checkpoints/checkpoint-20/kubetune-checkpoint.json" in keys
    assert not any(k.startswith("adapters/support-bot/checkpoints/checkpoint-10/") for k in keys)  # keep: 1
    manifest = json.loads(
        client.get_object(Bucket=bucket, Key="adapters/support-bot/kubetune-manifest.json")["Body"].read()
    )
    assert manifest["specHash"] == "spec-digest" and manifest["metrics"]["eval_loss"] > 0
    assert manifest["trainableParams"] == result.trainable_params
    assert manifest["job"] == {"name": "support-bot", "namespace": "ml"}
    assert_every_trainer_panel_shows_the_run(prometheus)


# A causal LM trained on a CPU has no classification metrics and no GPU memory to show.
NOT_FOR_A_CPU_LANGUAGE_MODEL = {"Evaluation (classification)", "GPU memory"}


def assert_every_trainer_panel_shows_the_run(prometheus: Any) -> None:
    """Each trainer panel of the Grafana dashboard, as Grafana would send it, returns series from the real
    Prometheus that scraped the run. Queried at the run's last scrape: once the trainer exits, Prometheus
    marks its series stale and an instant query "now" returns nothing."""
    from tests.deploy.test_dashboard import all_targets

    samples = prometheus.query('kubetune_train_step{finetunejob="support-bot"}[10m]')
    last_scrape = max(float(moment) for moment, _ in samples[0]["values"])
    variables = {"$__rate_interval": "1m", "$__range": "10m", "$namespace": "ml", "$job": "support-bot"}
    empty, checked = [], 0
    for title, target in all_targets():
        expr = target["expr"]
        if "kubetune_train_" not in expr or title in NOT_FOR_A_CPU_LANGUAGE_MODEL:
            continue
        for variable, value in variables.items():
            expr = expr.replace(variable, value)
        checked += 1
        if not prometheus.query(expr, at=last_scrape):
            empty.append(f"{title}: {expr}")
    assert checked >= 14 and empty == [], (checked, empty)


def test_merged_lora_gives_the_logits_of_the_adapter(
    tiny_llama_dir: Path, data_dir: Path, tokenizer: Any, tmp_path: Path, run_job: Any
) -> None:
    from transformers import AutoModelForCausalLM

    job = cpu_job(
        tiny_llama_dir,
        data_dir / "alpaca.jsonl",
        tmp_path / "merged",
        method=LORA,
        output={"mergeWeights": True},
        training={"maxSteps": 10},
    )
    result = run_job(job)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert result.manifest is not None and result.manifest["merged"] is True
    batch = dict(tokenizer(["### Instruction:\nCount up from two.\n\n### Response:\n"], return_tensors="pt"))
    torch.testing.assert_close(logits_of(merged, batch), logits_of(result.model, batch), rtol=1e-4, atol=1e-4)


def test_learning_rate_groups_give_matching_parameters_their_own_rate(
    tiny_llama_dir: Path, data_dir: Path, tmp_path: Path, run_job: Any
) -> None:
    job = cpu_job(
        tiny_llama_dir,
        data_dir / "alpaca.jsonl",
        tmp_path / "out",
        method=LORA,
        training={
            "maxSteps": 5,
            "learningRateGroups": [{"name": "queries", "match": r"q_proj\.lora_", "learningRate": 1e-9}],
        },
    )
    before = {
        n: p.detach().clone()
        for n, p in untrained_model(job, tiny_llama_dir, 5).named_parameters()
        if p.requires_grad
    }
    result = run_job(job)
    after = dict(result.model.named_parameters())
    moved = {n: float((after[n].detach() - before[n]).abs().max()) for n in before}
    assert all(moved[n] < 1e-6 for n in moved if "q_proj" in n)
    assert all(moved[n] > 1e-4 for n in moved if "v_proj" in n)


def test_added_tokens_are_in_the_published_tokenizer_and_their_embeddings_train(
    tiny_llama_dir: Path, data_dir: Path, tokenizer: Any, tmp_path: Path, run_job: Any
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job = cpu_job(
        tiny_llama_dir,
        data_dir / "alpaca.jsonl",
        tmp_path / "out",
        method=LORA,
        model={"addedTokens": ["<color>", "<count>"]},
        training={"maxSteps": 5},
    )
    result = run_job(job)
    published = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert len(published) == len(tokenizer) + 2 and published.convert_tokens_to_ids("<color>") == len(
        tokenizer
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    base.resize_token_embeddings(len(published))
    reloaded = PeftModel.from_pretrained(base, tmp_path / "out")
    batch = dict(published(["<color> sky <count>"], return_tensors="pt"))
    torch.testing.assert_close(
        logits_of(reloaded, batch), logits_of(result.model, batch), rtol=1e-4, atol=1e-4
    )


def minilm_sentiment_job(
    minilm_dir: Path, data_dir: Path, output: Path, steps: int, learning_rate: float, seed: int = 7
) -> Any:
    return cpu_job(
        minilm_dir,
        data_dir / "sentiment.jsonl",
        output,
        model={"task": "seq-cls", "numLabels": 2},
        dataset={"format": "text", "validationSplit": 0.25, "maxSeqLength": 32},
        method={
            "type": "lora",
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["query", "value"]},
        },
        training={"maxSteps": steps, "learningRate": learning_rate, "batchSizePerDevice": 16, "seed": seed},
    )


def test_minilm_with_lora_for_seq_cls_beats_its_untrained_accuracy(
    minilm_dir: Path, data_dir: Path, tmp_path: Path, run_job: Any
) -> None:
    """Over 20 seeds (``measure_spread --tier checks``) the trained accuracy was 1.0 every time and the
    untrained one at most 0.683: the test asks for >= 0.9 and 0.2 above the untrained run."""
    # One step at a negligible rate: the pretrained encoder with a fresh head, as a baseline.
    untrained = run_job(
        minilm_sentiment_job(minilm_dir, data_dir, tmp_path / "baseline", 1, 1e-9), tmp_path / "w0"
    )
    trained = run_job(minilm_sentiment_job(minilm_dir, data_dir, tmp_path / "out", 30, 5e-3), tmp_path / "w1")
    assert trained.metrics["eval_accuracy"] >= 0.9
    assert trained.metrics["eval_accuracy"] > untrained.metrics["eval_accuracy"] + 0.2
    assert 0 < trained.metrics["eval_f1"] <= 1


HEAD_TASKS = {
    "token-cls": ("ner.jsonl", {"text": "tokens", "label": "ner_tags"}),
    "question-answering": ("qa.jsonl", {}),
}


HEAD_LOSS_RATIO_THRESHOLDS = {"token-cls": 0.89, "question-answering": 0.67}


def head_job(task: str, minilm_dir: Path, data_dir: Path, output: Path, seed: int = 7) -> Any:
    """LoRA on MiniLM with a fresh token-classification or extractive-QA head."""
    data, columns = HEAD_TASKS[task]
    model: dict[str, Any] = {"task": task, **({"numLabels": 3} if task == "token-cls" else {})}
    return cpu_job(
        minilm_dir,
        data_dir / data,
        output,
        model=model,
        dataset={"format": "text", "validationSplit": 0.2, "maxSeqLength": 48, "columns": columns},
        method={
            "type": "lora",
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["query", "value"]},
        },
        training={"maxSteps": 30, "learningRate": 1e-2, "seed": seed},
    )


@pytest.mark.parametrize("task", list(HEAD_TASKS))
def test_token_classification_and_question_answering_train_and_evaluate(
    task: str, minilm_dir: Path, data_dir: Path, tmp_path: Path, run_job: Any
) -> None:
    """Over 20 seeds (``measure_spread --tier checks``) the late/early loss ratio was at worst 0.794
    (token-cls) and 0.342 (QA), eval accuracy at worst 0.986 and 1.0; the test asks for half the
    smallest drop (below 0.89 and 0.67) and an accuracy above 0.9."""
    result = run_job(head_job(task, minilm_dir, data_dir, tmp_path / "out"))
    assert late_to_early(result.log_history, 5) < HEAD_LOSS_RATIO_THRESHOLDS[task]
    assert result.metrics["eval_accuracy"] > 0.9


def chat_packing_job(model_dir: Path, data_dir: Path, output: Path, seed: int = 7) -> Any:
    return cpu_job(
        model_dir,
        data_dir / "chat.jsonl",
        output,
        method=LORA,
        dataset={"format": "chat", "packing": True, "maxSeqLength": 256},
        training={"maxSteps": 15, "gradientCheckpointing": True, "batchSizePerDevice": 4, "seed": seed},
    )


def test_chat_data_packed_and_trained_with_gradient_checkpointing(
    tiny_llama_dir: Path, data_dir: Path, tmp_path: Path, run_job: Any
) -> None:
    """Over 20 initialisations and seeds the late/early loss ratio was at worst 0.768 (mean 0.686,
    sd 0.029; ``measure_spread --tier checks``): the test asks for half that drop, below 0.88."""
    result = run_job(chat_packing_job(tiny_llama_dir, data_dir, tmp_path / "out"))
    assert len(logged_losses(result.log_history)) == 15
    assert late_to_early(result.log_history, 3) < 0.88
    assert result.model.base_model.model.is_gradient_checkpointing
