"""Fixtures shared by the unit tests: a tiny Llama checkpoint on disk and a text file."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import TINY_TEXT, build_tiny, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved as safetensors, with its tokenizer."""
    d = tmp_path_factory.mktemp("tiny-llama")
    build_tiny("llama").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:data:`tests.tiny_models.TINY_TEXT` as a UTF-8 file."""
    p = tmp_path_factory.mktemp("text") / "calib.txt"
    p.write_text(TINY_TEXT)
    return p
