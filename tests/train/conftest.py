"""A tiny random Llama and a word-level tokenizer trained here, saved as a local model folder.

No download: the tokenizer is trained on the sentences below, with ChatML special tokens and a
ChatML chat template, and (like SmolLM2) its pad token is its EOS token `<|im_end|>`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SENTENCES = [
    "give three tips for staying healthy",
    "eat vegetables sleep well and walk every day",
    "what is the capital of france",
    "the capital of france is paris",
    "translate hello to spanish",
    "hola",
    "name a primary color",
    "red is a primary color",
    "summarize the text below",
    "a short story about a cat and a dog",
    "below is an instruction that describes a task write a response that appropriately completes the request",
    "### instruction input response :",
    "Below Instruction Response Write user assistant system .",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tokenizer(chat_template: str | None = CHATML, specials: list[str] = SPECIALS, unk: str = "[UNK]"):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=specials))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, eos_token="<|im_end|>",
                                   pad_token="<|im_end|>")
    if chat_template:
        fast.chat_template = chat_template
    return fast


def make_model(vocab_size: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, eos_token_id=2, bos_token_id=None, pad_token_id=2)
    return LlamaForCausalLM(config).eval()


def save_tiny(folder: Path, chat_template: str | None = CHATML) -> Path:
    tok = make_tokenizer(chat_template)
    model = make_model(len(tok))
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh runs/ directory for the commands under test."""
    monkeypatch.setenv("SIFT_RUNS_DIR", str(tmp_path / "runs"))
    return tmp_path / "runs"


def fine_tune(run: str, student: Path | str | None = None, *, lora: dict | None = None, distill: dict | None = None,
              forget: dict | None = None, **train: object) -> None:
    """`sift train --run RUN` with its sections built from plain values: `student` is student.model,
    `lora`, `distill` and `forget` hold those sections' fields, every other keyword is a train.* field."""
    from pipeline.settings import DistillSettings, ForgetSettings, LoraSettings, StudentSettings, TrainSettings
    from pipeline.stages.train import train as sift_train

    sift_train(run=run, student=StudentSettings(model=str(student)) if student else StudentSettings(),
               lora=LoraSettings(**(lora or {})), train=TrainSettings(**train),  # type: ignore[arg-type]
               distill=DistillSettings(**(distill or {})), forget=ForgetSettings(**(forget or {})))
