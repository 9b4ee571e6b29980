"""Token windows: protocol details that change perplexity numbers if they drift."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorp.data import read_text, text_windows, tokenize_windows
from lorp.errors import InvalidInputError
from tests.tiny_models import tiny_tokenizer


def test_non_overlapping_windows_and_skip() -> None:
    tok = tiny_tokenizer()
    text = "abcdefghijklmnopqrstuvwxyz" * 4  # 104 characters = 104 tokens
    w = tokenize_windows(tok, text, seq_len=10, num_windows=3)
    ids = tok(text, add_special_tokens=False).input_ids
    assert w.shape == (3, 10) and w.dtype == torch.long
    assert w.flatten().tolist() == ids[:30]
    rest = tokenize_windows(tok, text, seq_len=10, skip_windows=3)
    assert rest.shape == (7, 10)  # 10 full windows in all, the partial tail is dropped
    assert rest[0].tolist() == ids[30:40]


def test_too_short_and_bad_args() -> None:
    tok = tiny_tokenizer()
    with pytest.raises(InvalidInputError, match="not enough"):
        tokenize_windows(tok, "abc", seq_len=10)
    with pytest.raises(InvalidInputError):
        tokenize_windows(tok, "abcdef", seq_len=1)
    with pytest.raises(InvalidInputError):
        tokenize_windows(tok, "abcdef", seq_len=2, num_windows=0)


def test_crlf_is_kept_and_missing_or_binary_files_are_errors(tmp_path: Path) -> None:
    p = tmp_path / "t.txt"
    p.write_bytes(b"ab\r\ncd\r\n" * 10)
    assert read_text(p).count("\r\n") == 20
    with pytest.raises(InvalidInputError, match="not found"):
        read_text(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InvalidInputError, match="UTF-8"):
        text_windows(tiny_tokenizer(), bad, 4)


class _BosTokenizer:
    """Wraps the tiny tokenizer so it prepends BOS by default, as Gemma's does."""

    def __init__(self) -> None:
        self.inner = tiny_tokenizer()
        self.bos_token_id = self.inner.bos_token_id

    def __call__(self, text: str, add_special_tokens: bool = True):
        out = self.inner(text, add_special_tokens=False)
        if add_special_tokens:
            out["input_ids"] = [self.bos_token_id, *out["input_ids"]]
        return out


def test_bos_prepended_per_window() -> None:
    tok = _BosTokenizer()
    w = tokenize_windows(tok, "x" * 50, seq_len=8, num_windows=2)
    assert w[:, 0].tolist() == [tok.bos_token_id] * 2
    assert (w[:, 1:] != tok.bos_token_id).all()


def test_long_text_prefix_tokenisation_matches_whole(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    text = "".join(f"line {i} of the text\n" for i in range(3000))
    whole = tok(text, add_special_tokens=False).input_ids
    w = tokenize_windows(tok, text, seq_len=16, num_windows=4)
    assert w.flatten().tolist() == whole[:64]
