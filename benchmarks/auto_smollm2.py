"""Issue #8 table: method "auto" (and lorp-kl, SLEB) against LoRP / ShortGPT / LLM-Streamline on the
bundled SmolLM2-135M at 3, 6 and 9 removed blocks.

Protocol (the same windows as ``lorp prune`` would draw):
- S from the shared calibration corpus, 32 windows x 512 tokens (timed once: "capture");
- scoring windows: 4 x 256 tokens of the same text right after the calibration windows (held
  out from calibration, never the evaluation text; drawn by ``lorp.pipeline.draw_scoring``);
  auto, lorp-kl and SLEB choose with them, and
  every method's selection is scored on them (KL(dense || pruned), NLL, top-1) for the table;
- auto chooses as the pipeline does: by held-out loss (NLL) on its own scoring windows, 8 x 512
  tokens right after the calibration windows (its scoring defaults in lorp.methods), no dense
  pass; its pass budget (for lorp-kl, which needs a dense reference and so never joins here):
  lorp.scoring.affordable_passes;
- WikiText-2 test perplexity, first 64 non-overlapping windows x 512, of every distinct
  selection, blocks skipped with lorp.pruned_view;
- selection time = capture + the method's own selection/search (SLEB needs no S: its time is
  its search alone). SLEB is greedy, so its k=3 and k=6 selections are the first steps of the
  k=9 run and their times the elapsed time at those steps.
Writes benchmarks/results/auto_smollm2.json (after every budget) and prints a Markdown table.

    .venv/bin/python benchmarks/auto_smollm2.py [--budgets 3,6,9] [--eval-windows 64] [--no-sleb]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CALIBRATION, WIKITEXT, machine, table, write_result

from lorp import bundled_model_path, capture_similarity, load_model
from lorp.data import prepends_bos, text_windows
from lorp.methods import get_method
from lorp.methods.auto import auto_select
from lorp.methods.lorp_kl import lorp_kl_select
from lorp.methods.lorp_loss import lorp_loss_select
from lorp.methods.sleb import sleb_select
from lorp.pipeline import Calibration, PruneConfig, draw_scoring
from lorp.scoring import WindowScorer, affordable_passes
from lorp.search import pass_budget
from lorp.selection import select_layers

NAME = "auto_smollm2"


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--score-windows", type=int, default=4)
    ap.add_argument("--score-seq-len", type=int, default=256)
    auto_windows, auto_len = get_method("auto").scoring_shape
    ap.add_argument("--auto-score-windows", type=int, default=auto_windows)
    ap.add_argument("--auto-score-seq-len", type=int, default=auto_len)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--eval-batch", type=int, default=4, help="WikiText-2 windows per forward")
    ap.add_argument("--budgets", default="3,6,9")
    ap.add_argument("--no-sleb", action="store_true", help="skip the (expensive) SLEB baseline")
    ap.add_argument("--out", default=NAME, help="result name under benchmarks/results/")
    ap.add_argument(
        "--no-search-baselines",
        action="store_true",
        help="skip lorp-kl and lorp-loss (time auto against LoRP only)",
    )
    args = ap.parse_args()
    budgets = sorted(int(b) for b in args.budgets.split(","))

    t0 = time.perf_counter()
    loaded = load_model(bundled_model_path())
    model, tok = loaded.model, loaded.tokenizer
    calib = text_windows(tok, CALIBRATION, args.seq_len, args.windows)
    t = time.perf_counter()
    s = capture_similarity(model, calib)
    capture_s = time.perf_counter() - t
    # scoring windows as the pipeline draws them: the calibration text right after the
    # calibration windows (lorp.pipeline.draw_scoring)
    calibration = Calibration(windows=calib, similarity=s, text=CALIBRATION, bos=prepends_bos(tok))

    def scoring_windows(method: str, shape: tuple[int, int]) -> torch.Tensor:
        config = PruneConfig(
            method=method, num_remove=1, score_windows=shape[0], score_seq_len=shape[1]
        )
        drawn = draw_scoring(tok, calibration, config)
        if not drawn.info["held_out"]:
            raise SystemExit(f"{CALIBRATION} has no text left for {shape} scoring windows")
        return drawn.windows

    scoring = scoring_windows("sleb", (args.score_windows, args.score_seq_len))
    auto_scoring = scoring_windows("auto", (args.auto_score_windows, args.auto_score_seq_len))
    loss_windows, loss_len = get_method("lorp-loss").scoring_shape
    loss_scoring = scoring_windows("lorp-loss", (loss_windows, loss_len))
    evalw = text_windows(tok, WIKITEXT, 512, args.eval_windows)
    # untimed: WikiText-2 loss of every selection, each pass resuming from the dense block input
    # at its first removed block (lorp.scoring.WindowScorer's prefix cache; same numbers)
    wiki_scorer = WindowScorer(model, evalw, batch_size=args.eval_batch, reference=False)
    dense = wiki_scorer.score(())
    print(f"dense WikiText-2 ppl {dense.ppl:.2f}; capture {capture_s:.1f}s", flush=True)

    def wikitext(removed: list[int]) -> float:
        return wiki_scorer.score(removed).ppl

    judge = WindowScorer(model, scoring)  # untimed: scores every selection for the table
    results: list[dict[str, Any]] = []
    lorp_time: dict[int, float] = {}
    base_ppl: dict[int, float] = {}

    def save() -> Path:
        data = {
            "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)",
            "num_layers": int(s.shape[0]),
            "calibration": {
                "file": CALIBRATION.name,
                "windows": int(calib.shape[0]),
                "seq_len": args.seq_len,
            },
            "scoring": {
                "file": CALIBRATION.name,
                "windows": int(scoring.shape[0]),
                "seq_len": int(scoring.shape[1]),
                "after_text_tokens": calibration.text_tokens,
            },
            "evaluation": {
                "file": "wikitext-2-raw/wiki.test.raw",
                "windows": int(evalw.shape[0]),
                "seq_len": 512,
                "tokens": dense.tokens,
            },
            "dense_ppl": dense.ppl,
            "capture_time_s": capture_s,
            "results": sorted(results, key=lambda e: e["num_remove"]),
            "total_time_s": time.perf_counter() - t0,
            "machine": machine(),
        }
        return write_result(args.out, data)

    def finish(entries: list[dict[str, Any]], k: int) -> None:
        wiki_scorer.prefetch([e["removed"] for e in entries])
        for e in entries:
            score = judge.score(e["removed"])
            e["scoring"] = {
                "kl": score.kl,
                "nll": score.nll,
                "ppl": score.ppl,
                "top1_agreement": score.top1_agreement,
            }
            uses_s = e.get("needs_similarity", True)
            e["time_s"] = (capture_s if uses_s else 0.0) + e["search_s"]
            e["time_vs_lorp"] = e["time_s"] / lorp_time[k]
            e["wikitext2_ppl"] = wikitext(e["removed"])
            e["num_remove"] = k
            print(
                f"k={k} {e['method']:>10}: {e['removed']} KL {score.kl:.4f} "
                f"wiki {e['wikitext2_ppl']:.2f} time {e['time_s']:.0f}s",
                flush=True,
            )
            results.append(e)
        save()

    def search_baselines(k: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        kl_scorer = WindowScorer(model, scoring)
        t = time.perf_counter()
        sel = lorp_kl_select(s, k, kl_scorer)
        out.append(
            {
                "method": "lorp-kl",
                "removed": sel.removed,
                "num_clusters": sel.num_clusters,
                "search_s": time.perf_counter() - t,
                "passes": kl_scorer.passes,
                "details": {
                    "slots": sel.details["slots"],
                    "lorp_removed": sel.details["lorp_removed"],
                },
            }
        )
        loss_scorer = WindowScorer(model, loss_scoring, reference=False)
        t = time.perf_counter()
        loss_budget = pass_budget(
            "lorp-loss", model, int(calib.numel()), (loss_windows, loss_len), k
        )
        sel = lorp_loss_select(s, k, loss_scorer, max_passes=loss_budget)
        out.append(
            {
                "method": "lorp-loss",
                "removed": sel.removed,
                "num_clusters": sel.num_clusters,
                "search_s": time.perf_counter() - t,
                "passes": sel.details["passes"],
                "scoring_windows": [int(loss_scoring.shape[0]), int(loss_scoring.shape[1])],
                "max_passes": loss_budget,
                "details": {
                    "start": sel.details["start"],
                    "improved": sel.details["improved"],
                    "search": sel.details["search"],
                },
            }
        )
        return out

    for k in budgets:
        entries: list[dict[str, Any]] = []
        for method in ("lorp", "shortgpt", "streamline"):
            t = time.perf_counter()
            sel = select_layers(s, k, method=method)
            entries.append(
                {
                    "method": method,
                    "removed": sel.removed,
                    "num_clusters": sel.num_clusters,
                    "search_s": time.perf_counter() - t,
                    "passes": 0,
                }
            )
        lorp_time[k] = capture_s + entries[0]["search_s"]
        if not args.no_search_baselines:
            entries += search_baselines(k)
        auto_scorer = WindowScorer(model, auto_scoring, reference=False)
        budget = affordable_passes(model, int(calib.numel()), int(auto_scoring.numel()), k)
        t = time.perf_counter()
        auto = auto_select(s, k, auto_scorer, max_passes=budget)
        entries.append(
            {
                "method": "auto",
                "removed": auto.removed,
                "num_clusters": auto.num_clusters,
                "search_s": time.perf_counter() - t,
                "passes": auto_scorer.passes,
                "chosen": auto.details["chosen"],
                "objective": auto.details["objective"],
                "scoring_windows": [int(auto_scoring.shape[0]), int(auto_scoring.shape[1])],
                "max_passes": budget,
                "lorp_kl": auto.details["lorp_kl"],
                "candidates": auto.details["candidates"],
            }
        )
        finish(entries, k)
        base_ppl[k] = min(
            e["wikitext2_ppl"] for e in entries if e["method"] in ("lorp", "shortgpt", "streamline")
        )

    if not args.no_sleb:  # last: the most expensive, and the table is useful without it
        sleb_scorer = WindowScorer(model, scoring, reference=False)
        sleb_run = sleb_select(sleb_scorer, max(budgets), similarity=s)
        steps = sleb_run.details["steps"]
        print(f"SLEB order {sleb_run.details['removal_order']}", flush=True)
        for k in budgets:
            entry = {
                "method": "sleb",
                "removed": sorted(sleb_run.details["removal_order"][:k]),
                "num_clusters": None,
                "search_s": steps[k - 1]["elapsed_s"],
                "passes": sum(int(s.shape[0]) - 2 - i for i in range(k)),
                "needs_similarity": False,
            }
            finish([entry], k)

    order = ("lorp", "shortgpt", "streamline", "sleb", "lorp-kl", "lorp-loss", "auto")
    rows: list[list[str]] = []
    for e in sorted(results, key=lambda e: (e["num_remove"], order.index(e["method"]))):
        rows.append(
            [
                str(e["num_remove"]),
                e["method"] + (f" -> {e['chosen']}" if e["method"] == "auto" else ""),
                ",".join(map(str, e["removed"])),
                f"{e['scoring']['kl']:.4f}",
                f"{e['scoring']['top1_agreement']:.3f}",
                f"{e['wikitext2_ppl']:.2f}",
                f"{e['wikitext2_ppl'] / base_ppl[e['num_remove']]:.3f}",
                f"{e['time_s']:.0f}",
                f"{e['time_vs_lorp']:.2f}x",
                str(e["passes"]),
            ]
        )
    path = save()
    headers = [
        "k",
        "method",
        "removed",
        "held-out KL",
        "held-out top-1",
        "WikiText-2 ppl",
        "vs best S-baseline",
        "selection s",
        "vs LoRP",
        "passes",
    ]
    print(f"\nSmolLM2-135M, 30 blocks; dense WikiText-2 ppl {dense.ppl:.2f}\n")
    print(table(headers, rows))
    print(f"\nwrote {path} in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
