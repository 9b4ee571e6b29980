"""A tiny random Llama written as a complete GGUF file (weights *and* a byte-level tokenizer),
so ``lorp prune --model tiny.gguf`` and a service job can load it like a real GGUF checkpoint.

Weights: :data:`QTYPE` (Q8_0) for the matrices, F32 for the norms; 6 blocks, hidden 32. The
tokenizer is GPT-2 style byte-level BPE: the 256 byte symbols, ``<|endoftext|>`` (BOS/EOS) and
one merge, so any text tokenizes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import MODEL_ARCH, GGMLQuantizationType, GGUFWriter, get_tensor_name_map, quantize
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

DEPTH = 6
QTYPE = GGMLQuantizationType.Q8_0
_BYTES = [bytes_to_unicode()[b] for b in range(256)]
TOKENS = [*_BYTES, "<|endoftext|>", "\u0120t"]
CONFIG: dict[str, Any] = {
    "vocab_size": len(TOKENS),
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "initializer_range": 0.2,
    "bos_token_id": 256,
    "eos_token_id": 256,
}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of attn_q / attn_k rows."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_tiny_gguf(path: Path, *, depth: int = DEPTH, arch: str = "llama") -> Path:
    """Write the tiny Llama (seeded) to ``path``; ``arch``: the architecture name the metadata
    states (anything but ``llama`` makes a file no reader knows: for refusal tests)."""
    config = LlamaConfig(**CONFIG, num_hidden_layers=depth)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    heads, kv_heads = CONFIG["num_attention_heads"], CONFIG["num_key_value_heads"]
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, depth)
    w = GGUFWriter(path, arch)
    w.add_name("tiny-llama")
    w.add_block_count(depth)
    w.add_context_length(CONFIG["max_position_embeddings"])
    w.add_embedding_length(CONFIG["hidden_size"])
    w.add_feed_forward_length(CONFIG["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(CONFIG["vocab_size"])
    w.add_rope_dimension_count(CONFIG["hidden_size"] // heads)
    w.add_file_type(7)  # MOSTLY_Q8_0
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS)
    w.add_token_types([1] * 256 + [3, 1])
    w.add_token_merges(["\u0120 t"])
    w.add_bos_token_id(256)
    w.add_eos_token_id(256)
    for hf_name, param in model.state_dict().items():
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = f"{names.get_name(base)}.{suffix}"
        value = param.detach().float().numpy()
        role = gguf_name.split(".", 2)[2] if gguf_name.startswith("blk.") else gguf_name
        if role == "attn_q.weight":
            value = _permute(value, heads)
        elif role == "attn_k.weight":
            value = _permute(value, kv_heads)
        qtype = GGMLQuantizationType.F32 if value.ndim == 1 else QTYPE
        w.add_tensor(gguf_name, quantize(value, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
