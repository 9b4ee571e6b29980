"""Issue #3 table: LoRP / ShortGPT / LLM-Streamline on the bundled SmolLM2-135M.

S from the shared calibration corpus (32 windows x 512 tokens); selections at 3, 6 and 9 removed
blocks; WikiText-2 test perplexity (first 64 non-overlapping windows x 512) of the dense model and
of every pruned model (blocks skipped in place with lorp.pruned_view: same numbers as a saved and
reloaded checkpoint). Writes benchmarks/results/selection_smollm2.json and prints a Markdown table.

    .venv/bin/python benchmarks/selection_smollm2.py [--windows 32] [--eval-windows 64]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _common import CALIBRATION, WIKITEXT, machine, table, write_result

from lorp import (
    bundled_model_path,
    capture_similarity,
    load_model,
    perplexity,
    pruned_view,
    select_layers,
)
from lorp.data import text_windows

METHODS = ("lorp", "shortgpt", "streamline")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--budgets", default="3,6,9")
    args = ap.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]

    t0 = time.perf_counter()
    loaded = load_model(bundled_model_path())
    model, tok = loaded.model, loaded.tokenizer
    calib = text_windows(tok, CALIBRATION, args.seq_len, args.windows)
    t = time.perf_counter()
    s = capture_similarity(model, calib)
    capture_s = time.perf_counter() - t
    evalw = text_windows(tok, WIKITEXT, 512, args.eval_windows)
    dense = perplexity(model, evalw)
    print(
        f"dense WikiText-2 ppl {dense.ppl:.2f} ({dense.tokens} tokens); capture {capture_s:.1f}s",
        flush=True,
    )

    rows, results, cache = [], [], {}
    for k in budgets:
        for method in METHODS:
            t = time.perf_counter()
            sel = select_layers(s, k, method=method)
            select_s = time.perf_counter() - t
            key = tuple(sel.removed)
            if key not in cache:
                with pruned_view(model, sel.removed):
                    cache[key] = perplexity(model, evalw).ppl
            ppl = cache[key]
            print(f"k={k} {method:>10}: {sel.removed} ppl {ppl:.2f}", flush=True)
            results.append(
                {
                    "num_remove": k,
                    "method": method,
                    "removed": sel.removed,
                    "rls": sel.rls,
                    "num_clusters": sel.num_clusters,
                    "labels": sel.labels,
                    "wikitext2_ppl": ppl,
                    "selection_time_s": select_s,
                }
            )
            rows.append(
                [
                    str(k),
                    method,
                    ",".join(map(str, sel.removed)),
                    str(sel.num_clusters or "-"),
                    f"{ppl:.2f}",
                    f"{ppl / dense.ppl:.2f}x",
                ]
            )
    rls = float(results[0]["rls"]) if results else float("nan")
    data = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)",
        "num_layers": int(s.shape[0]),
        "calibration": {
            "file": CALIBRATION.name,
            "windows": int(calib.shape[0]),
            "seq_len": args.seq_len,
        },
        "evaluation": {
            "file": "wikitext-2-raw/wiki.test.raw",
            "windows": int(evalw.shape[0]),
            "seq_len": 512,
            "tokens": dense.tokens,
        },
        "rls": rls,
        "dense_ppl": dense.ppl,
        "capture_time_s": capture_s,
        "similarity": np.round(s, 6).tolist(),
        "results": results,
        "total_time_s": time.perf_counter() - t0,
        "machine": machine(),
    }
    path = write_result("selection_smollm2", data)
    print(
        f"\nSmolLM2-135M, {s.shape[0]} blocks, RLS {rls:.3f}; "
        f"dense WikiText-2 ppl {dense.ppl:.2f}\n"
    )
    print(table(["removed", "method", "blocks", "K", "WikiText-2 ppl", "vs dense"], rows))
    print(f"\nwrote {path} in {data['total_time_s']:.0f}s")


if __name__ == "__main__":
    main()
