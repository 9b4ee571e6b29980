"""Budgets by quality target on the bundled SmolLM2-135M-Instruct (Q4_1 GGUF de-quantised to
float32): for each method and target ``max_ppl_ratio``, the depth the search chose on held-out
calibration windows, the quality-vs-depth curve it measured, the confirmation on WikiText-2
(the evaluation text) and the seconds the search took. For the methods with corrections
(``lorp-fold``) the depth is searched with the plain selection and the corrections are fitted
once: the result also records the plain (unfolded) ratio at the final depth on the evaluation
text, to show what the fold changed.

    .venv/bin/python benchmarks/quality_target.py [--methods lorp,lorp-fold]
        [--targets 1.1,1.5,2.0] [--windows 32] [--seq-len 512] [--holdout-windows 8]
        [--eval-windows 64] [--threads 1] [--out quality-target-smollm2]

Writes benchmarks/results/<out>.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import CALIBRATION, WIKITEXT, machine, table, write_result
from lorp.data import text_windows
from lorp.loading import bundled_model_path, load_model
from lorp.pipeline import PruneConfig, prune
from lorp.quality import compare_pruned


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--methods", default="lorp,lorp-fold")
    p.add_argument("--targets", default="1.1,1.5,2.0")
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--holdout-windows", type=int, default=8)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="quality-target-smollm2")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model(bundled_model_path(), device="cpu", dtype="float32")
    dense, tokenizer = loaded.model, loaded.tokenizer
    evaluation = text_windows(tokenizer, WIKITEXT, args.seq_len, args.eval_windows)
    runs: list[dict[str, Any]] = []
    for method in args.methods.split(","):
        for target in (float(t) for t in args.targets.split(",")):
            config = PruneConfig(
                method=method,
                target_ppl_ratio=target,
                windows=args.windows,
                seq_len=args.seq_len,
                holdout_windows=args.holdout_windows,
                eval_windows=args.eval_windows,
                eval_seq_len=args.seq_len,
                benchmark=None,
            )
            model = copy.deepcopy(dense)
            began = time.perf_counter()
            result = prune(model, tokenizer, CALIBRATION, config, evaluation=evaluation)
            seconds = time.perf_counter() - began
            search = result.depth_search
            assert search is not None and result.quality is not None
            run: dict[str, Any] = {
                "method": method,
                "target": target,
                "search": search.to_dict(),
                "removed": result.removed,
                "eval_ratio": result.quality.ppl_ratio,
                "eval_ppl": {
                    "dense": result.quality.dense.ppl,
                    "pruned": result.quality.pruned.ppl,
                },
                "timings_s": dict(result.timings),
                "seconds": seconds,
            }
            if result.compensation is not None:  # the fold: the plain selection's ratio too
                run["eval_ratio_plain"] = compare_pruned(
                    dense, result.removed, evaluation
                ).ppl_ratio
            runs.append(run)
            print(
                f"{method} <= {target}: depth {search.final_depth} (chosen {search.chosen}), "
                f"eval ratio {result.quality.ppl_ratio:.3f}, {seconds:.0f} s",
                flush=True,
            )
    rows = [
        [
            r["method"],
            f"{r['target']:g}",
            str(r["search"]["chosen"]),
            str(r["search"]["final"]),
            ", ".join(f"{p['value']:.2f}" for p in r["search"]["curve"]),
            f"{r['eval_ratio']:.3f}",
            "" if "eval_ratio_plain" not in r else f"{r['eval_ratio_plain']:.3f}",
            f"{r['search']['seconds']:.0f}",
        ]
        for r in runs
    ]
    print(
        table(
            [
                "method",
                "max ratio",
                "chosen",
                "final",
                "held-out ratio by depth",
                "WikiText-2 ratio",
                "unfolded",
                "search s",
            ],
            rows,
        )
    )
    path = write_result(
        args.out,
        {
            "machine": machine(),
            "config": vars(args),
            "calibration": str(CALIBRATION.name),
            "evaluation": str(WIKITEXT.name),
            "runs": runs,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
