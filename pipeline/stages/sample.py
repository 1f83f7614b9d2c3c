"""Answer one prompt with the student (base plus adapter), for a quick look.

    sift sample "Give three tips for staying healthy." --run demo
    sift sample "..." --run demo --no-adapter      # the base model, same prompt format
    sift sample "..." --run demo --student.device cuda --student.dtype bfloat16

Loads runs/<run>/student/ (the adapter, and the tokenizer with the chat template and pad token
it was trained with) on `student.device`, renders the prompt exactly as training did
(train/format.py), and decodes greedily until EOS or `max_new_tokens`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import SiftError
from pipeline.io.artifacts import read_json
from pipeline.io.runs import run_dir
from pipeline.settings import StudentSettings
from train.format import prompt_ids


def student_dir(run: str) -> Path:
    """runs/<run>/student/, refusing one that training did not finish."""
    out = run_dir(run) / "student"
    for name in ("train_config.json", "adapter_config.json", "adapter_model.safetensors"):
        if not (out / name).is_file():
            raise SiftError(f"no trained student here (missing {name}); run `sift train --run {run}` first",
                            path=out)
    return out


def load_student(run: str, *, student: StudentSettings, adapter: bool = True) -> tuple[Any, Any, dict]:
    """(model, tokenizer, train_config): the base as trained (`student.model` is not used: the run's
    train_config.json names it), with the adapter on top if asked, on `student.device` with `student.dtype`."""
    from transformers import AutoTokenizer

    from pipeline.io.models import load_model
    from train.lora import trained_base

    folder = student_dir(run)
    config = read_json(folder / "train_config.json")
    tokenizer = AutoTokenizer.from_pretrained(folder)  # as trained: chat template, pad token
    model = load_model(str(trained_base(config)), dtype=student.dtype, device=student.device)
    if config.get("added_tokens"):
        model.resize_token_embeddings(len(tokenizer))
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(folder)).eval()
    return model, tokenizer, config


def generate_ids(model: Any, tokenizer: Any, messages: list[dict], *, max_new_tokens: int) -> list[int]:
    """Greedy continuation of the rendered prompt, up to and including EOS if the model stops."""
    import torch

    ids = torch.tensor([prompt_ids(tokenizer, messages)])
    ids = ids.to(model.device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def sample(prompt: str, /, *, run: str = "demo", max_new_tokens: int = 128, adapter: bool = True,
           student: StudentSettings = StudentSettings()) -> None:
    """Print the student's answer to one prompt (greedy).

    Args:
        prompt: The instruction, as a user would type it.
        run: Run name; the student is runs/<run>/student/.
        max_new_tokens: Longest answer in tokens.
        adapter: Apply the trained adapter; off shows the base model on the same prompt.
        student: where the student runs (device) and in what precision (dtype); its base is the one
            it was trained from.
    """
    if not prompt.strip():
        raise SiftError("empty prompt", field="prompt")
    from pipeline.io.models import resolve_device

    resolve_device(student.device)  # a device torch does not have fails here, before any work
    model, tokenizer, _ = load_student(run, student=student, adapter=adapter)
    new = generate_ids(model, tokenizer, [{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens)
    stopped = tokenizer.eos_token_id in new
    print(tokenizer.decode(new, skip_special_tokens=True).strip())
    if not stopped:
        print(f"[no EOS within {max_new_tokens} tokens]")
