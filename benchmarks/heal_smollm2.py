"""Healing the folded maps on the bundled SmolLM2-135M-Instruct: lorp-fold vs lorp-fold + heal.

For one removal set (default: lorp-loss's 6-block set on SmolLM2 in the quality benchmark,
blocks 13-18), the pipeline's own stages on the calibration text (debian-handbook, windows x
seq_len): the tuned fold (:func:`lorp.pipeline.compensate`) and the logit temperature
(:func:`lorp.pipeline.fit_logit_scale`) = lorp-fold; then the same with the maps healed first
(:func:`lorp.pipeline.heal`, at most --steps steps, early stop on the tune windows). Perplexity of
the dense model and both pruned models on WikiText-2 test and the held-out text (the quality
benchmark's evaluation protocol: --eval-windows x --eval-seq-len, the first windows of each
text), and the seconds of each stage. No capture runs here, so the fits and the heal start at
the embeddings (the pipeline starts them mid-model from the capture's stored block inputs: a
heal step there costs less).

    .venv/bin/python benchmarks/heal_smollm2.py [--remove 13,14,15,16,17,18] [--steps 60]
        [--lr 1e-4] [--windows 32] [--seq-len 512] [--eval-windows 32] [--eval-seq-len 512]
        [--threads 2] [--out heal-smollm2]

Writes benchmarks/results/<out>.json and prints a table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import CALIBRATION, HELDOUT, WIKITEXT, machine, table, write_result
from lorp.compensation import Compensation, compensated_view
from lorp.data import text_windows
from lorp.loading import bundled_model_path, load_model
from lorp.methods import HEAL_LR
from lorp.pipeline import PruneConfig, StageTimer, compensate, fit_logit_scale, heal
from lorp.quality import perplexity
from lorp.surgery import pruned_view

TEXTS = {"wikitext2": WIKITEXT, "heldout": HELDOUT}


def ppl(model: Any, windows: torch.Tensor, removed: list[int], comp: Compensation | None) -> float:
    if not removed:
        return float(perplexity(model, windows).ppl)
    with torch.no_grad(), compensated_view(model, comp), pruned_view(model, removed):
        return float(perplexity(model, windows).ppl)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--remove", default="13,14,15,16,17,18")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=HEAL_LR)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="heal-smollm2")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    removed = [int(x) for x in args.remove.split(",")]
    lm = load_model(bundled_model_path(), dtype="float32", device="cpu")
    model, tok = lm.model, lm.tokenizer
    config = PruneConfig(
        method="lorp-fold",
        num_remove=len(removed),
        windows=args.windows,
        seq_len=args.seq_len,
        heal_steps=args.steps,
        heal_lr=args.lr,
    )
    calib = text_windows(tok, CALIBRATION, args.seq_len, args.windows)
    timer = StageTimer()
    comp = compensate(model, removed, calib, config, timer=timer)
    fold = fit_logit_scale(model, removed, calib, config, comp, timer=timer)
    fold_seconds = dict(timer.timings)
    healed = heal(model, calib, config, comp, timer=timer)
    assert healed is not None and healed.healing is not None
    heal_timer = StageTimer()
    healed = fit_logit_scale(model, removed, calib, config, healed, timer=heal_timer)
    evals = {
        name: text_windows(tok, path, args.eval_seq_len, args.eval_windows)
        for name, path in TEXTS.items()
    }
    rows: dict[str, dict[str, float]] = {}
    variants: list[tuple[str, Compensation | None, list[int]]] = [
        ("dense", None, []),
        ("lorp-fold", fold, removed),
        ("lorp-fold + heal", healed, removed),
    ]
    for label, c, rm in variants:
        rows[label] = {name: ppl(model, w, rm, c) for name, w in evals.items()}
    info = healed.healing
    assert info is not None
    result = {
        "model": "SmolLM2-135M-Instruct (bundled Q4_1 GGUF, float32)",
        "removed": removed,
        "calibration": {"file": CALIBRATION.name, "windows": args.windows, "seq_len": args.seq_len},
        "evaluation": {
            name: {"file": path.name, "windows": args.eval_windows, "seq_len": args.eval_seq_len}
            for name, path in TEXTS.items()
        },
        "heal": {"steps": args.steps, "lr": args.lr},
        "ppl": rows,
        "seconds": {
            "lorp-fold (compensation + temperature)": sum(fold_seconds.values()),
            "healing": timer.timings.get("healing"),
            "temperature refit after healing": heal_timer.timings.get("temperature"),
        },
        "strength_before_heal": comp.strength if comp is not None else None,
        "healing": {k: v for k, v in info.items() if k != "curve"},
        "curve": info["curve"],
        "stored_inputs": False,
        "note": "measured on a contended 2-core machine shared with other jobs",
        "machine": machine(),
    }
    path = write_result(args.out, result)
    print(
        table(
            ["model", "WikiText-2 ppl", "held-out ppl"],
            [[k, f"{v['wikitext2']:.2f}", f"{v['heldout']:.2f}"] for k, v in rows.items()],
        )
    )
    print(
        f"healing: {info['steps_run']} steps (early stop: {info['early_stop_step']}, best step "
        f"{info['best_step']}), held-out calibration KL {info['held_out_kl_before']:.4f} -> "
        f"{info['held_out_kl_after']:.4f}, {info['seconds']:.1f} s; lorp-fold's fits "
        f"{sum(fold_seconds.values()):.1f} s"
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
