"""Run folders' manifest: secrets are redacted, tokenizer and sampling settings are not.

    .venv/bin/python -m pytest -q tests/pipeline/test_runs.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.io.runs import is_secret, record_stage, scrub

SECRETS = ["api_key", "OPENAI_API_KEY", "apiKey", "key", "openai_key", "password", "db_password", "secret",
           "client_secret", "access_token", "auth_token", "bearer_token", "hf_token", "HF_TOKEN", "token",
           "refresh_token", "Authorization", "private_key", "x-api-key", "credentials", "github_token"]
PLAIN = ["pad_token", "eos_token", "bos_token", "unk_token", "sep_token", "mask_token", "max_tokens",
         "max_new_tokens", "augment_max_tokens", "tokens_out", "tokens_per_s", "pad_token_id", "tokenizer",
         "api_key_env", "cache_key", "sort_key", "monkey", "turkey_count", "keywords", "hf_token_env"]


@pytest.mark.parametrize("key", SECRETS)
def test_secret_settings_are_redacted(key: str) -> None:
    assert is_secret(key)
    assert scrub({"teacher": {key: "sk-live-123"}}) == {"teacher": {key: "<redacted>"}}


@pytest.mark.parametrize("key", PLAIN)
def test_tokenizer_and_sampling_settings_are_kept(key: str) -> None:
    assert not is_secret(key)
    assert scrub({key: "<|im_end|>"}) == {key: "<|im_end|>"}


def test_the_manifest_keeps_pad_and_eos_and_hides_the_key(tmp_path: Path) -> None:
    record_stage(tmp_path, "train", {"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>", "max_tokens": 256,
                                     "api_key": "sk-secret", "headers": [{"Authorization": "Bearer abc"}]})
    text = (tmp_path / "manifest.json").read_text()
    settings = json.loads(text)["stages"]["train"]["settings"]
    assert settings["pad_token"] == "<|endoftext|>" and settings["eos_token"] == "<|im_end|>"
    assert settings["max_tokens"] == 256 and settings["api_key"] == "<redacted>"
    assert "sk-secret" not in text and "Bearer abc" not in text
