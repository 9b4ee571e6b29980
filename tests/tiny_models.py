"""Tiny random decoder models, one per supported family, built from configs (no downloads).

Each builder returns a model in eval mode with deterministic weights (seeded). Sizes are chosen
so a forward pass takes milliseconds: hidden 32, 6 blocks, vocabulary 128. A larger
``initializer_range`` than the families' default makes logits peaked enough that greedy decoding
is not decided by float round-off between equivalent code paths (cache vs no cache).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 128
HIDDEN = 32
DEPTH = 6
INIT_RANGE = 0.2

_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": 64,
    "num_hidden_layers": DEPTH,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "initializer_range": INIT_RANGE,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def llama_config() -> PretrainedConfig:
    return LlamaConfig(**_COMMON)


def mistral_config() -> PretrainedConfig:
    return MistralConfig(**_COMMON, sliding_window=6)


def qwen2_config() -> PretrainedConfig:
    # Blocks 3.. use a 4-token sliding window, blocks 0..2 full attention.
    return Qwen2Config(**_COMMON, use_sliding_window=True, sliding_window=4, max_window_layers=3)


def qwen3_config() -> PretrainedConfig:
    return Qwen3Config(**_COMMON, head_dim=8)


def gemma2_config() -> PretrainedConfig:
    return Gemma2Config(**_COMMON, head_dim=8, sliding_window=4, query_pre_attn_scalar=8)


def gemma3_config() -> PretrainedConfig:
    layer_types = ["sliding_attention", "sliding_attention", "full_attention"] * (DEPTH // 3)
    return Gemma3TextConfig(
        **_COMMON, head_dim=8, sliding_window=4, query_pre_attn_scalar=8, layer_types=layer_types
    )


def olmo2_config() -> PretrainedConfig:
    return Olmo2Config(**_COMMON)


def phi3_config() -> PretrainedConfig:
    return Phi3Config(**_COMMON)


def gpt_neox_config() -> PretrainedConfig:
    return GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=DEPTH,
        num_attention_heads=4,
        max_position_embeddings=256,
        initializer_range=INIT_RANGE,
        bos_token_id=1,
        eos_token_id=2,
    )


def gpt2_config() -> PretrainedConfig:
    return GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=DEPTH,
        n_head=4,
        n_positions=256,
        initializer_range=INIT_RANGE,
        bos_token_id=1,
        eos_token_id=2,
    )


CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": llama_config,
    "mistral": mistral_config,
    "qwen2": qwen2_config,
    "qwen3": qwen3_config,
    "gemma2": gemma2_config,
    "gemma3": gemma3_config,
    "olmo2": olmo2_config,
    "phi3": phi3_config,
    "gpt_neox": gpt_neox_config,
    "gpt2": gpt2_config,
}

FAMILIES: tuple[str, ...] = tuple(CONFIGS)


def build_tiny(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A tiny random ``*ForCausalLM`` of ``family`` (see :data:`FAMILIES`), eval mode.

    ``dtype``: the float32 model's weights (the same for every dtype) rounded to ``dtype`` in a
    model built in ``dtype``, as ``from_pretrained(..., dtype=dtype)`` builds it: buffers the
    model computes itself (rotary ``inv_freq``) keep the dtype the model gives them, which
    ``model.to(dtype)`` would round too (and a saved checkpoint would not reload with the same
    logits)."""
    config = CONFIGS[family]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if dtype != torch.float32:
        state = model.state_dict()
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.load_state_dict(state)  # copied into the dtype's tensors
    model.eval()
    return model


def tiny_input_ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    """Random token ids avoiding the special ids 0..2; shape [batch, length]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def snapshot(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """A copy of every tensor in the model's state dict (to check a model was left untouched)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer whose ids fit :data:`VOCAB` (specials 0..3)."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    assert len(vocab) <= VOCAB
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


# A small repetitive English text for calibration / evaluation in tests (~22 k characters).
TINY_TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400))
