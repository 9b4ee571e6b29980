"""The pruned GGUF in llama.cpp (issue 21): it loads, has the kept depth, and computes what
transformers computes for the same file. Needs the optional ``llama-cpp-python`` (built from
source with cmake; not installed by ``scripts/setup.sh``): skipped without it. The speed
comparison is ``benchmarks/llamacpp_gguf.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from lorp.gguf_surgery import write_pruned_gguf
from tests.tiny_gguf import DEPTH, write_tiny_gguf

llama_cpp = pytest.importorskip("llama_cpp")

pytestmark = pytest.mark.slow


def test_pruned_gguf_runs_in_llama_cpp_as_in_transformers(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    src = write_tiny_gguf(tmp_path / "in" / "tiny.gguf")
    removed = [2, 3]
    (tmp_path / "out").mkdir()
    dst = tmp_path / "out" / "tiny.gguf"
    write_pruned_gguf(src, dst, removed)
    tokens = [5, 72, 101, 108, 108, 111, 32, 119]

    def both_engines(path: Path) -> tuple[np.ndarray, np.ndarray, Any]:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False)
        llm.eval(tokens)
        ours = np.asarray(llm.scores[: len(tokens)], dtype=np.float64)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        with torch.no_grad():
            theirs = model(torch.tensor([tokens])).logits[0].double().numpy()
        return ours, theirs, (llm, model)

    ours_in, theirs_in, _ = both_engines(src)
    ours, theirs, (llm, model) = both_engines(dst)
    assert llm.metadata["llama.block_count"] == str(DEPTH - len(removed))
    assert model.config.num_hidden_layers == DEPTH - len(removed)
    # The engines differ by their own kernels (llama.cpp quantizes activations for its Q8_0
    # dot products): measured on this tiny model ~3 % of the largest logit, the same for the
    # input file. The pruned file must not add to that gap.
    gap_in = np.abs(ours_in - theirs_in).max()
    gap = np.abs(ours - theirs).max()
    assert gap <= 0.05 * np.abs(theirs).max() and gap <= 2 * gap_in, (gap, gap_in)
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.999
    out = llm.create_completion(
        llm.detokenize(tokens[:4]).decode("utf-8", "replace"), max_tokens=4, temperature=0.0
    )
    assert out["usage"]["completion_tokens"] >= 1
