"""A tiny random Gemma 3 base model written as a GGUF file, for tests of conversion and base models.

    from tests.pipeline.tiny_gguf import make_tiny_gemma_gguf
    gguf_path, reference = make_tiny_gemma_gguf(tmp_path / "tiny-gemma3.gguf")

Not the Llama family and not SmolLM2's tokenizer: a sentencepiece-style vocabulary (`▁` for spaces,
`<0xNN>` byte tokens, `<pad>`/`<eos>`/`<bos>`/`<unk>` first, as Gemma's are) trained here on a few
sentences, and no chat template at all, as in a base model's GGUF. Tensors are stored in float32
except one in Q8_0, so the converted model can be compared with the reference to float rounding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SENTENCES = [
    "Give three tips for staying healthy.", "Write a short story about a cat who learns to fly.",
    "What is the difference between a customer and a prospect?", "Classify the sentiment of this review.",
    "Explain why the sky is blue.", "List five fruits that are red.", "Translate the sentence into French.",
    "1. Name a color.\n2. Find the odd one out.\n3. Summarize the paragraph in one sentence.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\n",
]
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0..3, as in Gemma's vocabulary


def _vocabulary() -> list[str]:
    """Specials, 256 byte tokens, then BPE tokens in merge order (Gemma's GGUF builder derives
    merges from the order tokens appear in the file)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.train_from_iterator(SENTENCES * 4, trainers.BpeTrainer(vocab_size=420, show_progress=False))
    learned = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    return SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + [t for t in learned if t not in SPECIALS]


def _gguf_name(hf_name: str) -> str:
    """HF Gemma3 parameter name -> GGUF tensor name (llama.cpp's naming)."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    parts = hf_name.split(".")  # model.layers.N.<group>.<name>.weight
    block, rest = parts[2], ".".join(parts[3:-1])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
             "self_attn.k_norm": "attn_k_norm", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
             "post_feedforward_layernorm": "post_ffw_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    return f"blk.{block}.{names[rest]}.weight"


def make_tiny_gemma_gguf(path: Path, seed: int = 0) -> tuple[Path, Any]:
    """Write a random 6-layer Gemma 3 (five sliding-window layers, one global; no chat template)
    to `path`; return it and the float32 reference model whose weights it holds (the Q8_0 tensor
    dequantised, so the two agree)."""
    import gguf
    import numpy as np
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokens = _vocabulary()
    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=128,
                              num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                              max_position_embeddings=512, sliding_window=64, rms_norm_eps=1e-6,
                              initializer_range=0.2, pad_token_id=0, eos_token_id=1,
                              bos_token_id=2, tie_word_embeddings=True)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1)  # Gemma's norms scale by (1 + w)

    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_name("tiny gemma3 base")
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_parameters["full_attention"]["rope_theta"])
    w.add_sliding_window(config.sliding_window)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([3] * len(SPECIALS) + [6] * 256 + [1] * (len(tokens) - len(SPECIALS) - 256))
    w.add_pad_token_id(0)
    w.add_eos_token_id(1)
    w.add_bos_token_id(2)
    w.add_unk_token_id(3)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)  # and no chat template: a base model
    with torch.no_grad():
        for name, p in model.named_parameters():
            data = p.detach().float().numpy()
            if "norm" in name:
                data = data + 1.0  # llama.cpp stores Gemma norms as 1 + w; transformers subtracts 1
            if name == "model.layers.0.mlp.up_proj.weight":  # one quantised tensor, as real files have
                q = gguf.quantize(data, gguf.GGMLQuantizationType.Q8_0)
                p.copy_(torch.from_numpy(gguf.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(p.shape)))
                w.add_tensor(_gguf_name(name), q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:
                w.add_tensor(_gguf_name(name), np.ascontiguousarray(data, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, model
