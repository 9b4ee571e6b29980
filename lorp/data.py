"""Turning a text file into calibration / evaluation token windows.

Protocol (the same for calibration and perplexity):
- the file is read as bytes and decoded as UTF-8 with line endings kept as they are (WikiText-2's
  CRLF changes its tokens, so no newline translation);
- the text is tokenised once, without special tokens, and cut into non-overlapping windows of
  ``seq_len`` tokens from the start; a trailing partial window is dropped;
- if the tokenizer prepends a BOS token by default (Gemma), every window starts with BOS followed by
  ``seq_len - 1`` text tokens, so the model sees what it was trained to see.
Only as much of the file as the windows need is tokenised (with a wide margin, so no token in a
window is affected by where the text was cut).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import InvalidInputError

# Generous upper bound on characters per token, used to tokenise only a prefix of huge files.
_CHARS_PER_TOKEN = 16


def read_text(path: str | Path) -> str:
    """Read a UTF-8 text file exactly (no newline translation)."""
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(f"text file not found: {p}")
    try:
        return p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(
            f"{p} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from exc


def prepends_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer adds a BOS token at the start by default."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return len(ids) > 0 and ids[0] == bos


def tokenize_windows(
    tokenizer: Any,
    text: str,
    seq_len: int,
    num_windows: int | None = None,
    *,
    skip_windows: int = 0,
) -> torch.Tensor:
    """Cut ``text`` into non-overlapping token windows, shape ``[W, seq_len]`` (int64).

    ``num_windows=None`` takes every full window. ``skip_windows`` drops that many leading windows
    first (used to hold out windows that follow the calibration windows of the same text).
    Raises InvalidInputError when the text holds no full window.
    """
    if seq_len < 2:
        raise InvalidInputError(f"seq_len must be at least 2, got {seq_len}")
    if num_windows is not None and num_windows < 1:
        raise InvalidInputError(f"the number of windows must be at least 1, got {num_windows}")
    bos = prepends_bos(tokenizer)
    body = seq_len - 1 if bos else seq_len
    ids = _tokenize_prefix(
        tokenizer, text, None if num_windows is None else body * (num_windows + skip_windows)
    )
    total = len(ids) // body
    if total <= skip_windows:
        raise InvalidInputError(
            f"the text has {len(ids)} tokens: not enough for "
            f"{skip_windows + 1} window(s) of {seq_len}"
        )
    count = total - skip_windows if num_windows is None else min(num_windows, total - skip_windows)
    start = skip_windows * body
    windows = torch.tensor(ids[start : start + count * body], dtype=torch.long).view(count, body)
    if bos:
        windows = torch.cat([torch.full((count, 1), tokenizer.bos_token_id), windows], dim=1)
    return windows


def text_windows(
    tokenizer: Any,
    path: str | Path,
    seq_len: int,
    num_windows: int | None = None,
    *,
    skip_windows: int = 0,
) -> torch.Tensor:
    """:func:`tokenize_windows` on a UTF-8 text file."""
    return tokenize_windows(
        tokenizer, read_text(path), seq_len, num_windows, skip_windows=skip_windows
    )


def _tokenize_prefix(tokenizer: Any, text: str, needed: int | None) -> list[int]:
    """Token ids of ``text`` (no special tokens); when ``needed`` is given, of a prefix long enough
    to hold ``needed`` tokens plus a margin of the same size, cut at a line boundary."""
    if needed is None or len(text) <= 2 * needed * _CHARS_PER_TOKEN:
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    limit = 2 * needed * _CHARS_PER_TOKEN
    while True:
        cut = text.rfind("\n", 0, limit)
        prefix = text[: cut + 1] if cut > 0 else text[:limit]
        ids = list(tokenizer(prefix, add_special_tokens=False).input_ids)
        if len(ids) >= 2 * needed or len(prefix) >= len(text):
            return ids
        limit *= 2
