"""Scorer check on the bundled SmolLM2-135M-Instruct (Q4_1 GGUF de-quantised to float32): dense
zero-shot accuracy on the first N items of each task, compared with published figures, and one
pruned variant (blocks removed with lorp.surgery.pruned_view) for retention. N is per task: the
costly tasks (HellaSwag, four long endings; BoolQ, long passages) get fewer items to fit a CPU
budget.

    .venv/bin/python benchmarks/tasks_smollm2.py [--limits hellaswag=100,piqa=300,...]
        [--pruned-limit 200] [--remove 13,14,15,16,17,18] [--threads 1] [--batch-size 8]

Writes benchmarks/results/tasks-smollm2.json. The data directory is ../shared/data/tasks
relative to the repository (the benchmark's business, not lorp's).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import SHARED, machine, table, write_result
from lorp.loading import bundled_model_path, load_model
from lorp.tasks import TaskScore, TaskScores, compare_scores, compare_tasks, score_tasks

DATA = SHARED / "data" / "tasks"

_LLDOIS = (
    "https://huggingface.co/lldois/SmolLM2-135M-Reasoning-SLERP-Champion "
    "(model card, 'Benchmark Results (lm-eval, 0-shot)', Baseline column = SmolLM2-135M-Instruct)"
)
_CARD_INSTRUCT = (
    "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct (model card, Evaluation, "
    "'Instruction model'; lighteval, zero-shot)"
)
_CARD_BASE = (
    "https://huggingface.co/HuggingFaceTB/SmolLM2-135M (model card, Evaluation, "
    "'Base pre-trained model' = SmolLM2-135M-8k; lighteval, zero-shot)"
)

#: Published figures (percent). ``comparable``: same harness (lm-eval 0-shot), same model
#: (Instruct), same metric: the ones the two-standard-error check applies to.
REFERENCES: dict[str, list[dict[str, Any]]] = {
    "hellaswag": [
        {"value": 42.99, "metric": "acc_norm", "model": "Instruct", "harness": "lm-eval 0-shot",
         "source": _LLDOIS, "comparable": True},
        {"value": 40.9, "metric": "lighteval", "model": "Instruct", "harness": "lighteval",
         "source": _CARD_INSTRUCT, "comparable": False},
        {"value": 42.1, "metric": "lighteval", "model": "base", "harness": "lighteval",
         "source": _CARD_BASE, "comparable": False},
    ],
    "piqa": [
        {"value": 66.92, "metric": "acc_norm", "model": "Instruct", "harness": "lm-eval 0-shot",
         "source": _LLDOIS, "comparable": True},
        {"value": 66.3, "metric": "lighteval", "model": "Instruct", "harness": "lighteval",
         "source": _CARD_INSTRUCT, "comparable": False},
        {"value": 68.4, "metric": "lighteval", "model": "base", "harness": "lighteval",
         "source": _CARD_BASE, "comparable": False},
    ],
    "arc_easy": [
        {"value": 54.12, "metric": "acc", "model": "Instruct", "harness": "lm-eval 0-shot",
         "source": _LLDOIS, "comparable": True},
        {"value": 37.3, "metric": "lighteval ARC (Average of Easy and Challenge)",
         "model": "Instruct", "harness": "lighteval", "source": _CARD_INSTRUCT,
         "comparable": False},
    ],
    "arc_challenge": [
        {"value": 27.73, "metric": "acc_norm", "model": "Instruct", "harness": "lm-eval 0-shot",
         "source": _LLDOIS, "comparable": True},
    ],
    "winogrande": [
        {"value": 51.3, "metric": "lighteval", "model": "base", "harness": "lighteval",
         "source": _CARD_BASE, "comparable": False},
    ],
    "boolq": [],
}  # fmt: skip


def check(task: str, dense: dict[str, Any]) -> list[dict[str, Any]]:
    """Each comparable reference against the measured value of its metric: within 2 SE?"""
    out = []
    for ref in REFERENCES[task]:
        if not ref["comparable"]:
            continue
        measured = dense[ref["metric"]]
        se = dense[f"{ref['metric']}_stderr"]
        diff = 100 * measured - ref["value"]
        out.append(
            {
                "metric": ref["metric"],
                "reference": ref["value"],
                "measured": 100 * measured,
                "stderr": 100 * se,
                "diff": diff,
                "z": diff / (100 * se),
                "within_2se": abs(diff) <= 2 * 100 * se,
            }
        )
    return out


DEFAULT_LIMITS = "hellaswag=300,piqa=500,arc_easy=500,arc_challenge=500,winogrande=500,boolq=250"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--limits", default=DEFAULT_LIMITS, help="dense: first N items, per task")
    ap.add_argument("--pruned-limit", type=int, default=200, help="pruned: first N items")
    ap.add_argument("--remove", default="13,14,15,16,17,18")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default="tasks-smollm2")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    removed = [int(x) for x in args.remove.split(",")]
    limits = {k: int(v) for k, v in (kv.split("=") for kv in args.limits.split(","))}

    def progress(stage: str, fraction: float, message: str) -> None:
        print(f"  [{time.strftime('%H:%M:%S')}] {fraction:6.1%} {message}", flush=True)

    began, cpu_began = time.perf_counter(), time.process_time()
    path = bundled_model_path()
    lm = load_model(path, dtype="float32", device="cpu")
    load_s = time.perf_counter() - began
    print(f"loaded {path.name} in {load_s:.1f}s, {args.threads} threads", flush=True)

    dense_parts: dict[str, TaskScore] = {}
    dense_head: dict[str, TaskScore] = {}
    pruned_parts: dict[str, TaskScore] = {}
    timing: dict[str, dict[str, float]] = {}
    for task, limit in limits.items():
        t0, c0 = time.perf_counter(), time.process_time()
        dense = score_tasks(
            lm.model,
            lm.tokenizer,
            [task],
            data_dir=DATA,
            limit=limit,
            batch_size=args.batch_size,
            progress=progress,
        )
        t1, c1 = time.perf_counter(), time.process_time()
        n = min(limit, args.pruned_limit)
        part = compare_tasks(
            lm.model,
            lm.tokenizer,
            removed,
            [task],
            data_dir=DATA,
            limit=n,
            batch_size=args.batch_size,
            dense=dense.head(n),
            progress=progress,
        )
        t2, c2 = time.perf_counter(), time.process_time()
        dense_parts[task] = dense.tasks[task]
        dense_head[task] = part.dense.tasks[task]
        pruned_parts[task] = part.pruned.tasks[task]
        timing[task] = {
            "dense_wall": t1 - t0,
            "dense_cpu": c1 - c0,
            "pruned_wall": t2 - t1,
            "pruned_cpu": c2 - c1,
        }
        print(f"{task}: {timing[task]}", flush=True)

    dense_all = TaskScores(dense_parts, None, sum(t["dense_wall"] for t in timing.values()))
    cmp = compare_scores(
        TaskScores(dense_head, args.pruned_limit, dense_all.seconds),
        TaskScores(pruned_parts, args.pruned_limit, sum(t["pruned_wall"] for t in timing.values())),
        removed,
    )
    comparison = cmp.to_dict()
    per_task: dict[str, Any] = {}
    rows = []
    for task in limits:
        d = dense_all.tasks[task].to_dict()
        c = comparison["tasks"][task]
        checks = check(task, d)
        per_task[task] = {
            "dense": d,
            "references": REFERENCES[task],
            "checks": checks,
            "dense_first_pruned_limit": c["dense"],
            "pruned": c["pruned"],
            "retention": c["retention"],
            "drop": c["drop"],
            "drop_stderr": c["drop_stderr"],
            "seconds": timing[task],
        }
        acc_norm = d.get("acc_norm")
        norm = (
            "—" if acc_norm is None else f"{100 * acc_norm:.1f} ± {100 * d['acc_norm_stderr']:.1f}"
        )
        refs = "; ".join(
            f"{r['value']} ({r['metric']}, {r['model']}, {r['harness']})" for r in REFERENCES[task]
        )
        verdict = ", ".join(
            f"{'within' if k['within_2se'] else 'OUTSIDE'} 2 SE (z={k['z']:+.2f})" for k in checks
        )
        dp = f"{100 * c['dense']['score']:.1f} → {100 * c['pruned']['score']:.1f}"
        rows.append(
            [
                task,
                str(d["n"]),
                f"{100 * d['acc']:.1f} ± {100 * d['acc_stderr']:.1f}",
                norm,
                refs or "none found",
                verdict or "—",
                f"{dp} ({c['metric']}, n={c['n']})",
                "—" if c["retention"] is None else f"{c['retention']:.3f}",
            ]
        )
    headers = ["task", "n", "acc ± se", "acc_norm ± se", "published", "check", "dense → pruned"]
    print(table([*headers, "retention"], rows))
    print(f"average retention: {cmp.average_retention}")
    total = time.perf_counter() - began
    result = {
        "model": path.name,
        "model_note": "SmolLM2-135M-Instruct, Q4_1 GGUF de-quantised to float32 by transformers",
        "data": "../shared/data/tasks (see its README.md)",
        "threads": args.threads,
        "batch_size": args.batch_size,
        "limits": limits,
        "pruned_limit": args.pruned_limit,
        "removed": removed,
        "machine": machine(),
        "seconds": {
            "load": load_s,
            "total_wall": total,
            "total_cpu": time.process_time() - cpu_began,
            "per_task": timing,
        },
        "dense": dense_all.to_dict(),
        "comparison": comparison,
        "tasks": per_task,
        "average_retention": cmp.average_retention,
    }
    print(f"wrote {write_result(args.out, result)} ({total:.0f}s)")


if __name__ == "__main__":
    main()
