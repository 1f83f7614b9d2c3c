"""sift train / merge / sample on a tiny random Llama with a tokenizer trained in the test.

One module-scoped run overfits 4 examples; the tests read what it wrote. A second run checks
resume and overlong accounting; the slow test trains the embedded SmolLM2-135M for a few steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.errors import SiftError
from pipeline.io.artifacts import write_jsonl
from pipeline.settings import DistillSettings, StudentSettings, TrainSettings
from pipeline.stages.merge import merge
from pipeline.stages.sample import generate_ids, load_student, sample
from pipeline.stages.train import train
from tests.train.conftest import fine_tune
from train.format import to_messages

QA = [("what is the capital of france", "the capital of france is paris"),
      ("name a primary color", "red is a primary color"),
      ("translate hello to spanish", "hola"),
      ("give three tips for staying healthy", "eat vegetables sleep well and walk every day")]
FAST = {"precision": "fp32", "lr": 1e-2, "logging_steps": 1}
CPU32 = StudentSettings(device="cpu", dtype="float32")  # the student as trained, for exact comparisons


def _write_split(runs: Path, run: str, train_qa: list, valid_qa: list) -> Path:
    d = runs / run
    write_jsonl(d / "train.jsonl", [{"id": f"t{i}", "messages": to_messages(q, "", a)} for i, (q, a) in
                                    enumerate(train_qa)])
    write_jsonl(d / "valid.jsonl", [{"id": f"v{i}", "messages": to_messages(q, "", a)} for i, (q, a) in
                                    enumerate(valid_qa)])
    return d


def _metrics(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / "student" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    runs = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SIFT_RUNS_DIR", str(runs))
        d = _write_split(runs, "overfit", QA, QA[:1])
        fine_tune("overfit", tiny_model_dir, epochs=30, batch_size=4, grad_accum=1, eval_steps=10, save_steps=10,
                  **FAST)
        yield d, tiny_model_dir, mp


def test_each_evaluation_is_logged_once(trained) -> None:
    """transformers' own evaluation at the last step is cancelled: train_in evaluates right after."""
    d, _, _ = trained
    assert [e["step"] for e in _metrics(d) if e["kind"] == "eval"] == [0, 10, 20, 30]


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def test_overfitting_lowers_loss_and_greedy_output_stops_at_eos(trained, capsys) -> None:
    d, _, _ = trained
    entries = _metrics(d)
    train_losses = [e["loss"] for e in entries if e["kind"] == "train"]
    assert train_losses[-1] < train_losses[0] - 0.5  # a random tiny model with a frozen lm_head stays unsure
    summary = entries[-1]
    assert summary["kind"] == "summary" and summary["step"] == 30
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert summary["eval_token_accuracy_after"] == 1.0
    assert any("eval_mean_token_accuracy" in e for e in entries if e["kind"] == "eval")
    assert all(e["tokens_per_s"] > 0 for e in entries if e["kind"] == "train")
    model, tok, _ = load_student("overfit", student=CPU32)  # from disk: the saved adapter carries what was learned
    for q, a in QA:
        new = generate_ids(model, tok, to_messages(q, "", "")[:1], max_new_tokens=20)
        assert new == [*tok(a, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    sample("what is the capital of france", run="overfit", student=CPU32)
    assert capsys.readouterr().out.strip() == "the capital of france is paris"


def test_saved_adapter_is_real_and_reloads_to_the_same_logits(trained) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    d, base_dir, _ = trained
    weights = load_file(d / "student" / "adapter_model.safetensors")
    lora_b = {k: v for k, v in weights.items() if "lora_B" in k}
    assert len(lora_b) == 2 * 7 and all(v.abs().sum() > 0 for v in lora_b.values())  # all linear layers
    ids = [1, 5, 6, 9, 13, 2, 1, 7]
    from_student = _logits(load_student("overfit", student=CPU32)[0], ids)
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    from_checkpoint = _logits(PeftModel.from_pretrained(base, str(d / "student" / "checkpoints" / "checkpoint-30")),
                              ids)
    assert torch.allclose(from_student, from_checkpoint, atol=1e-6)
    plain = _logits(AutoModelForCausalLM.from_pretrained(base_dir).eval(), ids)
    assert not torch.allclose(from_student, plain, atol=1e-3)


def test_tokenizer_and_config_are_saved(trained) -> None:
    from transformers import AutoTokenizer

    d, tiny_model_dir, _ = trained
    tok = AutoTokenizer.from_pretrained(d / "student")
    assert tok.chat_template and tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    config = json.loads((d / "student" / "train_config.json").read_text())
    assert (config["lora"]["r"], config["lora"]["alpha"], config["lora"]["target_modules"]) == (16, 32, "all-linear")
    assert config["student"]["model"] == str(tiny_model_dir) and config["train"]["epochs"] == 30
    assert config["resolved"]["device"] == "cpu" and config["resolved"]["precision"] == "fp32"
    assert config["template"] == "chat" and config["pad_token_id"] != config["eos_token_id"]
    assert config["data"]["train"]["examples"] == 4 and config["data"]["packed_rows"] == 1
    manifest = json.loads((d / "manifest.json").read_text())
    assert "student/adapter_model.safetensors" in manifest["artifacts"]
    adapter = json.loads((d / "student" / "adapter_config.json").read_text())
    modules = adapter["target_modules"]  # PEFT's set, sorted so that identical runs write identical files
    assert modules and modules == sorted(modules)


def test_merge_matches_the_adapter_model(trained) -> None:
    from transformers import AutoModelForCausalLM

    d, _, _ = trained
    merge(run="overfit")
    merged = AutoModelForCausalLM.from_pretrained(d / "merged").eval()
    assert not any("lora" in k for k in merged.state_dict())
    ids = [1, 5, 6, 9, 13, 2, 1, 7, 3]
    assert torch.allclose(_logits(merged, ids), _logits(load_student("overfit", student=CPU32)[0], ids), atol=1e-5)


def test_resume_restores_the_global_step_and_overlong_are_counted(runs: Path, tiny_model_dir: Path) -> None:
    long = ("summarize the text below", "a short story about a cat and a dog " * 8)
    d = _write_split(runs, "res", [*QA, long], QA[:2])
    common = {"student": tiny_model_dir, "epochs": 50, "batch_size": 1, "grad_accum": 1, "save_steps": 2,
              "eval_steps": 100, "max_length": 40, "packing": False, **FAST}
    fine_tune("res", max_steps=4, resume=True, **common)  # nothing to resume yet: starts from the beginning
    assert sorted(p.name for p in (d / "student" / "checkpoints").glob("checkpoint-*")) == \
        ["checkpoint-2", "checkpoint-4"]
    config = json.loads((d / "student" / "train_config.json").read_text())
    assert config["data"]["train"]["dropped_overlong"] == 1 and config["data"]["train"]["examples"] == 4
    fine_tune("res", max_steps=6, resume=True, **common)
    steps = [e["step"] for e in _metrics(d) if e["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]  # the resumed run logged 5 and 6 only: it started at step 4
    state = json.loads((d / "student" / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6


def test_gradient_checkpointing_still_trains_the_adapter(runs: Path, tiny_model_dir: Path) -> None:
    """Frozen embeddings + checkpointing must still pass gradients to the LoRA weights."""
    from safetensors.torch import load_file

    d = _write_split(runs, "gc", QA, [])
    fine_tune("gc", tiny_model_dir, max_steps=2, batch_size=2, grad_accum=1, gradient_checkpointing=True, **FAST)
    weights = load_file(d / "student" / "adapter_model.safetensors")
    assert all(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)
    assert json.loads((d / "student" / "train_config.json").read_text())["train"]["gradient_checkpointing"] is True


def test_bad_training_data_gives_a_clear_error(runs: Path, tiny_model_dir: Path) -> None:
    d = runs / "bad"
    d.mkdir(parents=True)
    (d / "train.jsonl").write_text("")
    with pytest.raises(SiftError, match="train.jsonl: is empty"):
        fine_tune("bad", tiny_model_dir)
    (d / "train.jsonl").write_text(json.dumps({"id": "a", "messages": to_messages("q", "", "a")}) + "\n"
                                   + json.dumps({"id": "b", "text": "no messages"}) + "\n")
    with pytest.raises(SiftError, match="train.jsonl:2: field 'messages': missing"):
        fine_tune("bad", tiny_model_dir)
    (d / "train.jsonl").write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "q"}]}) + "\n")
    with pytest.raises(SiftError, match="train.jsonl:1: field 'messages': the last message must be"):
        fine_tune("bad", tiny_model_dir)
    _write_split(runs, "bad", QA, [])
    with pytest.raises(SiftError, match="no example fits in max_length 8"):
        fine_tune("bad", tiny_model_dir, max_length=8)


class Loaded(Exception):
    """Stops a training run at its first model load (the spy has seen the device)."""


def test_the_student_device_reaches_the_model_load(runs: Path, tiny_model_dir: Path, monkeypatch) -> None:
    """student.device is where the student loads (it was always the CPU, the trainer moving it later)."""
    seen = []

    def spy(spec, *, dtype="auto", device):
        seen.append(device)
        raise Loaded

    monkeypatch.setattr("pipeline.io.models.load_model", spy)
    _write_split(runs, "dev", QA, [])
    with pytest.raises(Loaded):  # no GPU here: the load is stopped before anything moves
        train(run="dev", student=StudentSettings(model=str(tiny_model_dir), device="mps"),
              train=TrainSettings(max_steps=1, precision="fp32"))
    assert seen == ["mps"]


def test_auto_trains_student_and_distillation_teacher_on_the_cpu_here(runs: Path, tiny_model_dir: Path,
                                                                      monkeypatch) -> None:
    from pipeline.io import models

    real, seen = models.load_model, []

    def spy(spec, *, dtype="auto", device):
        seen.append(device)
        return real(spec, dtype=dtype, device=device)

    monkeypatch.setattr(models, "load_model", spy)
    d = _write_split(runs, "auto", QA, [])
    train(run="auto", student=StudentSettings(model=str(tiny_model_dir)),
          train=TrainSettings(max_steps=1, batch_size=2, grad_accum=1, **FAST),
          distill=DistillSettings(enabled=True, teacher=str(tiny_model_dir)))
    assert seen == ["cpu", "cpu"]  # the student, then the teacher beside it
    assert json.loads((d / "student" / "train_config.json").read_text())["resolved"]["device"] == "cpu"


@pytest.mark.slow
def test_embedded_student_trains_and_its_adapter_loads(runs: Path) -> None:
    """A few LoRA steps on the real SmolLM2-135M: validation loss falls, the adapter loads with PEFT."""
    from peft import PeftModel

    from pipeline.io.artifacts import read_jsonl
    from pipeline.io.models import EMBEDDED_ALIAS, embedded_dir, fetch_embedded, folder_problem, load_model

    if folder_problem(embedded_dir(), converted=True):
        fetch_embedded()
    seeds = read_jsonl(Path(__file__).resolve().parents[2] / "seeds" / "default.jsonl")
    pairs = [(s["instruction"] + ("\n\n" + i["input"] if i["input"] else ""), i["output"])
             for s in seeds for i in s["instances"]][:20]
    d = _write_split(runs, "smol", pairs[:16], pairs[16:])
    fine_tune("smol", epochs=1, lr=1e-3, batch_size=2, grad_accum=1, max_steps=4, max_length=256, eval_steps=100,
              save_steps=100)
    summary = _metrics(d)[-1]
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    config = json.loads((d / "student" / "train_config.json").read_text())
    assert config["pad_token"] == "<|endoftext|>" and config["eos_token"] == "<|im_end|>"
    assert config["added_tokens"] == 0 and config["template"] == "chat"
    model = PeftModel.from_pretrained(load_model(EMBEDDED_ALIAS, device="cpu"), str(d / "student"))
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())


def _parses(path: Path) -> bool:
    try:
        json.loads(path.read_text())
        return True
    except (OSError, ValueError):
        return False


def test_metrics_after_a_resume_equal_an_uninterrupted_run(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A checkpoint every 3 steps, the train loss logged every 5 (as `make train TRAIN_OPTS="--save-steps
    3"` with the default logging): killed once checkpoint 3 is saved, then the same command. The
    logged window 1-5 spans the resume, and used to cover steps 4-5 only; the summary's train loss
    covered only the steps after the checkpoint."""
    from tests.pipeline.kill_harness import sift, sift_killed_when

    runs = tmp_path / "runs"
    qa = [*QA, *((q + " please", a) for q, a in QA)]
    args = ["--student.model", str(tiny_model_dir), "--train.max_steps", "12", "--train.save_steps", "3",
            "--train.logging_steps", "5", "--train.batch_size", "2", "--train.grad_accum", "1", "--train.max_length",
            "24", "--train.precision", "fp32", "--train.lr", "1e-2", "--train.resume"]
    for run in ("clean", "kt"):
        _write_split(runs, run, qa, QA[:1])
    code, _, err = sift(["train", "--run", "clean", *args], runs=runs)
    assert code == 0, err
    checkpoint = runs / "kt" / "student" / "checkpoints" / "checkpoint-3"
    sift_killed_when(["train", "--run", "kt", *args], runs=runs, appears=lambda: _parses(checkpoint /
                                                                                          "trainer_state.json"))
    resumed_from = max(int(p.name.split("-")[1]) for p in checkpoint.parent.glob("checkpoint-*")
                       if _parses(p / "trainer_state.json"))
    assert resumed_from < 12, "the kill came after the last checkpoint: nothing is resumed"
    code, _, err = sift(["train", "--run", "kt", *args], runs=runs)
    assert code == 0, err
    clean, resumed = _metrics(runs / "clean"), _metrics(runs / "kt")
    def measured(entry: dict) -> set[str]:  # every key but timings
        return {k for k in entry if not k.endswith(("runtime", "_per_second", "_time", "tokens_per_s", "_seconds"))}

    assert [(e["kind"], e["step"]) for e in resumed] == [(e["kind"], e["step"]) for e in clean]
    for a, b in zip(clean, resumed, strict=True):
        assert measured(a) == measured(b), (a, b)
        for key in sorted(measured(a)):
            if isinstance(a[key], float):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["kind"], a["step"], key)
            else:
                assert b[key] == a[key], (a["kind"], a["step"], key)


def _save_on_full_disk(filename: str) -> None:
    """safetensors' save as on a full disk: part of the file written, then the error it raises there
    (a SafetensorError quoting the OS)."""
    from safetensors import SafetensorError

    Path(filename).write_bytes(b"\0" * 16)
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("where", ["checkpoint", "adapter"])
def test_a_full_disk_is_cannot_write_and_a_partial_checkpoint_is_never_resumed(
        runs: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """The disk fills while PEFT writes the adapter (into a checkpoint, or the final one): one line
    naming the folder, as every other stage says it; the same command once there is room again
    trains from the last complete checkpoint, never from the half-written one."""
    import peft.peft_model

    d = _write_split(runs, "full", QA, QA[:1])
    common = {"max_steps": 4, "batch_size": 2, "grad_accum": 1, "resume": True, "save_steps": 2, **FAST}
    real = peft.peft_model.safe_save_file
    full = "/checkpoint-4/" if where == "checkpoint" else "/.save-"  # checkpoint-2 is written whole

    def save(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        if full in str(filename):
            return _save_on_full_disk(filename)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", save)
    target = d / "student" / ("checkpoints" if where == "checkpoint" else "")
    with pytest.raises(SiftError, match="cannot write: No space left on device") as e:
        fine_tune("full", tiny_model_dir, **common)
    assert Path(e.value.path) == target
    checkpoints = d / "student" / "checkpoints"
    if where == "checkpoint":  # the torn checkpoint-4 is gone, checkpoint-2 is whole
        assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-2"]
    else:  # trained to the end: the rerun has nothing to train again
        assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (d / "student" / "adapter_model.safetensors").exists()
    assert not list((d / "student").glob(".save-*"))
    monkeypatch.setattr(peft.peft_model, "safe_save_file", real)
    fine_tune("full", tiny_model_dir, **common)
    assert _metrics(d)[-1]["kind"] == "summary" and _metrics(d)[-1]["step"] == 4
    assert (d / "student" / "adapter_model.safetensors").stat().st_size > 16


@pytest.mark.parametrize("missing", ["trainer_state.json", "optimizer.pt", "adapter_model.safetensors"])
def test_a_checkpoint_missing_a_file_is_skipped_on_resume(runs: Path, tiny_model_dir: Path, missing: str) -> None:
    """The newest checkpoint lost a file (a kill or a full disk mid-save): resuming starts from the
    one before, and the partial folder is removed (transformers would have resumed from it with a
    fresh optimizer, without a word, when optimizer.pt was the file missing)."""
    from train.lora import last_checkpoint

    d = _write_split(runs, "part", QA, [])
    common = {"batch_size": 2, "grad_accum": 1, "save_steps": 2, **FAST}
    fine_tune("part", tiny_model_dir, max_steps=4, **common)
    checkpoints = d / "student" / "checkpoints"
    assert last_checkpoint(checkpoints, remove_partial=False) == str(checkpoints / "checkpoint-4")
    (checkpoints / "checkpoint-4" / missing).unlink()
    assert last_checkpoint(checkpoints, remove_partial=False) == str(checkpoints / "checkpoint-2")
    fine_tune("part", tiny_model_dir, max_steps=4, resume=True, **common)
    steps = [e["step"] for e in _metrics(d) if e["kind"] == "train"]
    assert steps == [1, 2, 3, 4]  # steps 3 and 4 were trained again, from checkpoint-2
    assert checkpoint_files(checkpoints / "checkpoint-4") >= {missing, "trainer_state.json", "optimizer.pt"}


def checkpoint_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}
