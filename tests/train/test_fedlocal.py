"""A federated client's local work (train/fedlocal.py) on the tiny random Llama."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.errors import SiftError
from pipeline.settings import LoraSettings, StudentSettings, TrainSettings
from pipeline.stages.export import write_splits
from train.fedlocal import LocalSettings, adapter_nll, examples, initial_adapter, load_adapter, local_train, peft_model

PAIRS = [("give three tips for staying healthy", "eat vegetables sleep well and walk every day"),
         ("what is the capital of france", "the capital of france is paris"),
         ("translate hello to spanish", "hola"),
         ("name a primary color", "red is a primary color")]


def client_dir(folder: Path) -> Path:
    recs = [{"id": f"r{i}", "instruction": q, "input": "", "output": a} for i, (q, a) in enumerate(PAIRS * 2)]
    write_splits(folder, recs, recs[:2])
    return folder


@pytest.fixture
def settings(tiny_model_dir: Path) -> LocalSettings:
    return LocalSettings(student=StudentSettings(model=str(tiny_model_dir)),
                         lora=LoraSettings(r=4, alpha=8, dropout=0.0),
                         train=TrainSettings(lr=5e-3, batch_size=2, grad_accum=1, max_length=64, precision="fp32"),
                         local_steps=6)


def test_initial_adapter_scores_as_the_base_model(settings: LocalSettings, tmp_path: Path) -> None:
    data = client_dir(tmp_path / "c")
    state = initial_adapter(settings)
    assert all(not v.any() for k, v in state.items() if ".lora_B." in k)  # B = 0: no change to the base
    total, tokens = adapter_nll(state, data / "train.jsonl", settings)
    model, tokenizer = peft_model(settings)
    rows = examples(tokenizer, data / "train.jsonl", settings, allow_empty=False)
    ref = 0.0  # float32 reference: the base model alone, one example at a time, no padding
    with model.disable_adapter(), torch.no_grad():
        for r in rows:
            logits = model(input_ids=torch.tensor([r["input_ids"]])).logits[0, :-1].float()
            ref += float(torch.nn.functional.cross_entropy(logits, torch.tensor(r["labels"][1:]), ignore_index=-100,
                                                           reduction="sum"))
    assert tokens == sum(sum(t != -100 for t in r["labels"][1:]) for r in rows) > 0
    assert total == pytest.approx(ref, rel=1e-4)


def test_local_training_starts_from_the_sent_adapter_and_lowers_the_loss(settings: LocalSettings,
                                                                         tmp_path: Path) -> None:
    data = client_dir(tmp_path / "c")
    start = initial_adapter(settings)
    before, tokens = adapter_nll(start, data / "train.jsonl", settings)
    new, n, metrics = local_train(start, data, settings, round_=1, client=0)
    assert n == 8 and set(new) == set(start) and metrics["train_loss"] > 0
    assert any(not torch.equal(new[k], start[k]) for k in new)
    after, _ = adapter_nll(new, data / "train.jsonl", settings)
    assert after / tokens < before / tokens  # 6 steps at lr 5e-3 on 8 examples it trains on


def test_the_initial_adapter_stays_the_initial_one_after_another_is_loaded(settings: LocalSettings,
                                                                         tmp_path: Path) -> None:
    # bench/federate.py scores the federated adapter (loading it into the cached model) before it asks
    # for the initial adapter that local-only and centralised training start from
    start = initial_adapter(settings)
    trained, _, _ = local_train(start, client_dir(tmp_path / "c"), settings, round_=1, client=0)
    load_adapter(peft_model(settings)[0], trained)
    again = initial_adapter(settings)
    assert set(again) == set(start) and all(torch.equal(again[k], start[k]) for k in start)
    assert all(not v.any() for k, v in again.items() if ".lora_B." in k)


def test_an_adapter_from_other_lora_settings_is_refused(settings: LocalSettings) -> None:
    model, _ = peft_model(settings)
    with pytest.raises(SiftError, match="do not match"):
        load_adapter(model, {"base_model.model.x.lora_A.weight": torch.zeros(4, 4)})


def test_settings_are_checked_and_travel_flat(settings: LocalSettings) -> None:
    from flwr.app import ConfigRecord

    sections = {"student": settings.student, "lora": settings.lora, "train": settings.train}
    with pytest.raises(SiftError) as e:
        LocalSettings(**sections, local_steps=0)
    assert e.value.field == "federate.local_steps"
    with pytest.raises(SiftError) as e:
        LocalSettings(**{**sections, "lora": LoraSettings(qlora=True)}, local_steps=1)
    assert e.value.field == "lora.qlora"
    config = settings.to_config()
    assert config["train.lr"] == 5e-3 and config["student.device"] == "auto" and "train.epochs" not in config
    assert LocalSettings.from_config(ConfigRecord(config)) == settings  # as the clients receive it
