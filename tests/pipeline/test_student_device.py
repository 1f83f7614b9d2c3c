"""`student.device` reaches every model sift eval, score, sample and merge load; `auto` picks the CPU here
and says so once; a GPU that is not there is a clear error before any work. And the eval judge is built
like every stage's teacher, so its key variable, options and pools work.

    .venv/bin/python -m pytest tests/pipeline/test_student_device.py -q

There is no GPU on the machines these run on: the spy records the device each load is asked for and
loads on the CPU, so a device name no code writes (`cuda:3`) can only have come from the setting.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.io import models
from pipeline.io.artifacts import write_jsonl
from tests.train.test_evaluate import ROWS, _make_run

NO_GPU = pytest.mark.skipif("__import__('torch').cuda.is_available()", reason="needs a machine without CUDA")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.train.conftest import save_tiny

    return save_tiny(tmp_path_factory.mktemp("device") / "tiny-llama")


@pytest.fixture(scope="module")
def reward(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny sequence-classification model folder, as `score.reward_model` takes."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from tests.train.conftest import make_tokenizer

    folder = tmp_path_factory.mktemp("reward") / "tiny-reward"
    tok = make_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def run(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """runs/t: valid.jsonl and a trained-looking student (a real PEFT adapter on the tiny Llama)."""
    monkeypatch.setenv("SIFT_RUNS_DIR", str(tmp_path / "runs"))
    return _make_run(tmp_path / "runs", tiny)


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Record (kind, device) of every model load, and load on the CPU whatever was asked."""
    from transformers import AutoModelForSequenceClassification

    loads: list[tuple[str, str]] = []
    real_load, real_reward = models.load_model, AutoModelForSequenceClassification.from_pretrained

    def load_model(spec, *, dtype="auto", device):  # noqa: ANN001, ANN202
        loads.append(("causal", str(device)))
        return real_load(spec, dtype=dtype, device="cpu")

    def reward_from_pretrained(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        model = real_reward(*args, **kwargs)
        move = model.to
        model.to = lambda device, *a, **k: (loads.append(("reward", str(device))), move("cpu"))[1]
        return model

    monkeypatch.setattr(models, "load_model", load_model)
    monkeypatch.setattr(models, "resolve_device", lambda setting="auto": setting)  # no GPU needed to name one
    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", reward_from_pretrained)
    return loads


@pytest.mark.parametrize("device", ["cpu", "cuda:3"])
def test_the_device_setting_reaches_every_model_load(device: str, run: Path, tiny: Path, reward: Path,
                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loads = _spy(monkeypatch)
    on = ["--student.device", device, "--student.dtype", "float32"]
    assert main(["eval", "--run", "t", *on, "--eval.base", str(tiny), "--eval.max_new_tokens", "2"]) == 0
    assert loads == [("causal", device)] * 2, "eval: the base and the student"
    loads.clear()
    data = tmp_path / "data.jsonl"
    write_jsonl(data, [{k: r[k] for k in ("instruction", "input", "output")} for r in ROWS])
    assert main(["score", str(data), "-o", str(tmp_path / "scored.jsonl"), *on, "--student.model", str(tiny),
                 "--score.scorers", "ifd,reward,length", "--score.reward_model", str(reward)]) == 0
    assert sorted(loads) == [("causal", device), ("reward", device)], "score: the ifd model and the reward model"
    loads.clear()
    assert main(["sample", "name a primary color", "--run", "t", *on, "--max-new-tokens", "2"]) == 0
    assert loads == [("causal", device)], "sample"
    loads.clear()
    assert main(["merge", "--run", "t", "--student.device", device, "--output", str(tmp_path / "merged")]) == 0
    assert loads == [("causal", device)], "merge"


@NO_GPU
def test_auto_picks_the_cpu_here_and_says_so_once(run: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(models, "_ANNOUNCED", set())  # as in a fresh process
    assert models.resolve_device("auto") == "cpu"
    assert main(["eval", "--run", "t", "--eval.base", str(tiny), "--eval.max_new_tokens", "2"]) == 0
    assert main(["sample", "name a primary color", "--run", "t", "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert err.count("sift: device auto -> cpu") == 1, err  # three loads and two commands, one line


@NO_GPU
@pytest.mark.parametrize("command", [["eval"], ["sample", "hello"], ["merge"], ["score", "--score.scorers", "ifd"]])
def test_a_gpu_that_is_not_there_is_a_clear_error_before_any_work(command: list[str], run: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    before = sorted(p.name for p in run.iterdir())
    assert main([*command, "--run", "t", "--student.device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "student.device" in err and "no CUDA GPU" in err, err
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written, not even a lock or a manifest


@pytest.mark.parametrize("command", ["eval", "score", "sample", "merge"])
def test_help_shows_the_device_setting(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "--student.device" in capsys.readouterr().out


def test_the_eval_judge_gets_the_key_variable_options_and_pool(run: Path, tiny: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Two judges from teacher.pool on a loopback server, the key from teacher.api_key_env: every request
    carries that key, both judges are asked, and eval.json names them."""
    from tests.pipeline.openai_server import FakeOpenAI

    monkeypatch.setenv("MY_JUDGE_KEY", "sk-judge-123")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with FakeOpenAI(reply=lambda body: ("A", "stop")) as server:
        assert main(["eval", "--run", "t", "--student.device", "cpu", "--student.dtype", "float32",
                     "--eval.base", str(tiny), "--eval.max_new_tokens", "2", "--eval.judge",
                     "--teacher.backend", "openai", "--teacher.base_url", server.url,
                     "--teacher.api_key_env", "MY_JUDGE_KEY", "--teacher.options", "max_retries=0",
                     "--teacher.pool", "judge-a=1,judge-b=1"]) == 0
    assert len(server.bodies) == 2 * len(ROWS)  # each pair in both orders
    assert set(server.auth_headers) == {"Bearer sk-judge-123"}
    assert {b["model"] for b in server.bodies} == {"judge-a", "judge-b"}
    entry = json.loads((run / "eval.json").read_text())["valid"]
    assert entry["judge"]["teacher"] == "judge-a+judge-b"
    assert [t["name"] for t in entry["settings"]["teachers"]] == ["judge-a", "judge-b"]
