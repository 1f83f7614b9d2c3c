"""The judge scorer: the rating parser, the G-Eval mean, and the log-probability path on a tiny model.

    .venv/bin/python -m pytest tests/train/test_rating.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.teachers.base import Request
from pipeline.teachers.logprobs import first_token_probs, supports_logprobs
from train import rating
from train.rating import expected_rating, judge_scores, parse_rating

DIGITS = ["rating 1 2 3 4 5", "the answer is good", "the answer is wrong", "below is an answer"]
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize(("text", "value"), [
    ("4", 4), (" 5\n", 5), ("Rating: 3/5", 3), ("**2**", 2), ("I would give it a 1.", 1),
    ("10", None), ("0", None), ("6", None), ("4.5", None), ("", None), ("excellent", None),
    ("score 7 then 3", 3),
])
def test_parse_rating(text: str, value: int | None) -> None:
    assert parse_rating(text) == value


def test_expected_rating_is_the_weighted_mean_over_the_rating_tokens() -> None:
    value, mass = expected_rating({"4": 0.6, "5": 0.2, "The": 0.2})
    assert value == pytest.approx((4 * 0.6 + 5 * 0.2) / 0.8)  # 4.25, renormalised over 1..5
    assert mass == pytest.approx(0.8)
    assert expected_rating({"The": 1.0}) == (None, 0.0)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory):
    """A real transformers teacher on a tiny random Llama whose vocabulary has the digits 1-5."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pipeline.teachers.hf import TransformersTeacher
    from tests.train.conftest import SENTENCES, make_model

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES + DIGITS, trainers.WordLevelTrainer(
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>")
    fast.chat_template = CHATML
    model = make_model(len(fast), seed=3)
    model.config.eos_token_id = model.generation_config.eos_token_id = fast.eos_token_id
    folder = tmp_path_factory.mktemp("judge") / "tiny"
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return TransformersTeacher(str(folder), dtype="float32", engine="hf", batch_size=4)


RECORDS = [{"instruction": "name a primary color", "input": "", "output": "red is a primary color"},
           {"instruction": "what is the capital of france", "input": "", "output": "hola"}]


def reference_distribution(teacher, request: Request) -> dict[str, float]:
    import torch

    ids = torch.tensor([teacher.prompt_ids(request)])
    with torch.no_grad():
        probs = teacher.model(input_ids=ids).logits[0, -1].double().softmax(-1)
    return {teacher.tokenizer.decode([i]).strip(): float(probs[i]) for i in range(probs.shape[0])}


def test_first_token_probs_match_a_single_prompt_reference(teacher) -> None:
    template = rating.load_prompt()
    from pipeline.teachers.base import Sampling

    requests = [template.request(Sampling(temperature=0.0, max_tokens=2), instruction=r["instruction"],
                                 input=r["input"], output=r["output"]) for r in RECORDS]
    assert supports_logprobs(teacher)
    got = first_token_probs(teacher, requests, top=10_000)
    for request, dist in zip(requests, got, strict=True):
        ref = reference_distribution(teacher, request)
        for d in "12345":
            assert dist[d] == pytest.approx(ref[d], rel=1e-4, abs=1e-7)


def test_judge_uses_logprobs_when_the_backend_gives_them(teacher, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rating, "MIN_MASS", 0.0)  # a random model puts little mass on digits; take any
    got = judge_scores(teacher, RECORDS)
    for res in got:
        assert res["method"] == "logprobs"
        assert 1 <= res["value"] <= 5
        assert sum(res["probs"].values()) == pytest.approx(1.0, abs=1e-5)
        assert res["value"] == pytest.approx(sum(int(k) * p for k, p in res["probs"].items()), abs=1e-4)


def test_judge_falls_back_to_a_sampled_reply(teacher, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rating, "MIN_MASS", 1.01)  # no distribution is ever enough: parse the reply
    got = judge_scores(teacher, RECORDS, max_tokens=3)
    for res in got:
        assert res["method"] == "sampled"
        assert res["value"] == parse_rating(res["raw"])
    assert [r["method"] for r in judge_scores(teacher, RECORDS, use_logprobs=False, max_tokens=3)] == ["sampled"] * 2


def test_backends_without_logprobs_say_so() -> None:
    class Plain:
        name = "plain"

    assert not supports_logprobs(Plain())
    assert first_token_probs(Plain(), []) is None


def test_a_prompt_without_the_output_placeholder_is_refused(tmp_path: Path) -> None:
    from pipeline.errors import SiftError

    bad = tmp_path / "rate.txt"
    bad.write_text("Rate this: {instruction}\n")
    with pytest.raises(SiftError, match="must use"):
        rating.load_prompt(str(bad))


def test_judge_through_an_openai_compatible_server_parses_the_reply() -> None:
    """A server that ignores `logprobs` gives no first-token distribution: the greedy reply is parsed."""
    from pipeline.teachers.openai_compat import OpenAITeacher
    from tests.pipeline.openai_server import FakeOpenAI

    replies = {"red is a primary color": "Rating: 4/5", "hola": "I cannot rate this."}

    def reply(body: dict) -> tuple[str, str]:
        prompt = body["messages"][-1]["content"]
        return next(v for k, v in replies.items() if f"### Answer\n{k}" in prompt), "stop"

    with FakeOpenAI(reply=reply) as server:
        got = judge_scores(OpenAITeacher("fake", base_url=server.url, max_retries=0), RECORDS)
    assert [(r["method"], r["value"]) for r in got] == [("sampled", 4), ("sampled", None)]
    assert got[0]["raw"] == "Rating: 4/5" and got[0]["teacher"] == "fake"


# the first token's probabilities per answer; "The" is not a rating, " 4" is another spelling of "4"
LOOPBACK_PROBS = {"red is a primary color": {"4": 0.36, " 4": 0.12, "5": 0.24, "2": 0.08, "The": 0.2},
                  "hola": {"1": 0.5, "2": 0.25, "I": 0.25}}


def _answer_of(body: dict) -> str:
    prompt = body["messages"][-1]["content"]
    return next(k for k in LOOPBACK_PROBS if f"### Answer\n{k}" in prompt)


def _loopback_logprobs(body: dict) -> dict[str, float]:
    return LOOPBACK_PROBS[_answer_of(body)]


def _never_sampled(body: dict) -> tuple[str, str]:
    raise AssertionError("the judge sampled a reply although the server gave log-probabilities")


def test_judge_reads_log_probabilities_from_an_openai_compatible_server() -> None:
    from pipeline.teachers.openai_compat import OpenAITeacher
    from tests.pipeline.openai_server import FakeOpenAI

    with FakeOpenAI(logprobs=_loopback_logprobs, reply=_never_sampled) as server:
        got = judge_scores(OpenAITeacher("fake", base_url=server.url, max_retries=0), RECORDS)
    # by hand: 4 -> 0.48, 5 -> 0.24, 2 -> 0.08 of mass 0.8: 4*0.6 + 5*0.3 + 2*0.1 = 2.4 + 1.5 + 0.2 = 4.1
    assert [r["method"] for r in got] == ["logprobs", "logprobs"]
    assert got[0]["value"] == pytest.approx(4.1) and got[0]["mass"] == pytest.approx(0.8)
    assert got[0]["probs"] == pytest.approx({"1": 0.0, "2": 0.1, "3": 0.0, "4": 0.6, "5": 0.3})
    assert got[1]["value"] == pytest.approx((1 * 0.5 + 2 * 0.25) / 0.75)
    assert {r["teacher"] for r in got} == {"fake"}
    assert all(b["max_tokens"] == 1 and b["top_logprobs"] == 20 and b["logprobs"] is True for b in server.bodies)


@pytest.mark.parametrize("reject", [False, True])
def test_judge_falls_back_to_sampled_when_the_server_refuses_logprobs(reject: bool) -> None:
    from pipeline.teachers.openai_compat import OpenAITeacher
    from tests.pipeline.openai_server import FakeOpenAI

    with FakeOpenAI(reject_logprobs=reject, reply=lambda body: ("Rating: 3", "stop")) as server:
        got = judge_scores(OpenAITeacher("fake", base_url=server.url, max_retries=0), RECORDS)
    assert [(r["method"], r["value"]) for r in got] == [("sampled", 3), ("sampled", 3)]


def test_a_pool_of_two_judges_names_the_judge_of_each_record(tmp_path: Path) -> None:
    """Two loopback judges, one giving log-probabilities and one not: each record says who rated it and how."""
    from pipeline.teachers.openai_compat import OpenAITeacher
    from pipeline.teachers.pool import Member, TeacherPool
    from tests.pipeline.openai_server import FakeOpenAI

    records = RECORDS * 3
    with FakeOpenAI(logprobs=_loopback_logprobs, reply=_never_sampled) as a, \
            FakeOpenAI(reply=lambda body: ("2", "stop")) as b:
        pool = TeacherPool([Member("alpha", OpenAITeacher("m-a", base_url=a.url, max_retries=0), 1.0, "openai"),
                            Member("beta", OpenAITeacher("m-b", base_url=b.url, max_retries=0), 1.0, "openai")])
        got = judge_scores(pool, records)
    assert [r["teacher"] for r in got] == ["alpha", "beta"] * 3  # by share, one each in turn
    for rec, res in zip(records, got, strict=True):
        if res["teacher"] == "alpha":
            assert res["method"] == "logprobs"
            assert res["value"] == pytest.approx(4.1 if rec["output"].startswith("red") else 4 / 3)
        else:
            assert (res["method"], res["value"]) == ("sampled", 2)
    assert len(a.bodies) == 3  # alpha: one log-probability request per record, nothing sampled
