"""Issue #7 headroom check: can any method strictly beat a tied set by moving one block?

Where lorp-loss ties the best baseline (it returned the same removal set), the question is
whether a better set was there to find. For each (model, k, centre set) this script measures
every *single-swap neighbour* of the centre (one removed block put back, one kept interior block
removed; blocks 0 and N-1 never removed, as for every method) by mean NLL on calibration
scoring windows (the calibration text right after the 32 calibration windows, like the
pipeline's scoring windows, ``--calib-windows`` x 512), then evaluates the centre and the
``--top`` neighbours with the lowest calibration NLL on both evaluation texts with the
benchmark's own protocol (the model's ``evaluation`` block in ``results/quality/<model>.json``:
same windows, so the centre's perplexities must equal the benchmark's, which is checked).

A centre that no neighbour beats on calibration NLL is a local optimum of the objective every
model-in-the-loop method here optimises; if the best neighbours are also worse on held-out
perplexity, a method choosing by calibration loss can at best tie there.

    .venv/bin/python benchmarks/quality/headroom.py --case smollm2:13,14,15,16,17,18 ...

Writes ``results/quality-headroom.json`` (merged per case) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._common import CALIBRATION, HELDOUT, RESULTS, WIKITEXT, machine, table  # noqa: E402
from benchmarks.quality.models import DEFAULT_CACHE, MODELS, ModelSpec, load  # noqa: E402
from lorp.data import text_windows  # noqa: E402
from lorp.scoring import WindowScorer  # noqa: E402

OUT = RESULTS / "quality-headroom.json"
TEXTS = {"wikitext2": WIKITEXT, "heldout": HELDOUT}


def neighbours(centre: tuple[int, ...], depth: int) -> list[tuple[int, ...]]:
    """Every set that differs from ``centre`` by one block out and one interior block in."""
    inside = set(centre)
    free = [b for b in range(1, depth - 1) if b not in inside]
    return sorted({tuple(sorted((inside - {o}) | {i})) for o in centre for i in free})


def run_case(
    spec: ModelSpec,
    centre: tuple[int, ...],
    calib_windows: int,
    top: int,
    cache: Path,
    *,
    bench: dict[str, Any] | None = None,
    calibration: Path = CALIBRATION,
    texts: dict[str, Path] | None = None,
    seq_len: int = 512,
    skip_windows: int = 32,
) -> dict[str, Any]:
    """One centre set: its neighbours' calibration NLL, the best ones on the evaluation texts.
    ``bench``: the model's benchmark JSON (default: read from ``results/quality``)."""
    key = spec.key
    if bench is None:
        bench = json.loads((RESULTS / "quality" / f"{key}.json").read_text())
    texts = TEXTS if texts is None else texts
    protocol = bench["evaluation"]
    loaded = load(spec, cache)
    model, tok = loaded.model, loaded.tokenizer
    started = time.perf_counter()
    calib = text_windows(tok, calibration, seq_len, calib_windows, skip_windows=skip_windows)
    scorer = WindowScorer(model, calib, reference=False)
    sets = [centre, *neighbours(centre, spec.depth)]
    scorer.prefetch(sets)
    nll = {s: scorer.score(s).nll for s in sets}
    ranked = sorted(sets[1:], key=lambda s: nll[s])
    chosen = [centre, *ranked[:top]]
    evals: dict[tuple[int, ...], dict[str, float]] = {s: {} for s in chosen}
    for name, path in texts.items():
        shape = protocol[name]
        windows = text_windows(tok, path, int(shape["seq_len"]), int(shape["windows"]))
        ev = WindowScorer(model, windows, reference=False)
        ev.prefetch(chosen)
        for s in chosen:
            evals[s][name] = ev.score(s).ppl
    key_centre = ",".join(map(str, centre))
    recorded = bench["evaluations"].get(key_centre, {})
    check = {
        name: (recorded[name]["ppl"], evals[centre][name]) for name in texts if name in recorded
    }
    for name, (old, new) in check.items():
        if not math.isclose(old, new, rel_tol=1e-4):
            raise SystemExit(f"{key} {centre}: {name} ppl {new} != benchmark's {old}")
    better_calib = [s for s in ranked if nll[s] < nll[centre]]
    return {
        "model": key,
        "k": len(centre),
        "centre": list(centre),
        "calibration": {
            "file": str(calibration),
            "windows": calib_windows,
            "seq_len": seq_len,
            "skip_windows": skip_windows,
        },
        "evaluation": {name: protocol[name] for name in texts},
        "neighbours": len(sets) - 1,
        "centre_nll": nll[centre],
        "neighbours_lower_nll": [list(s) for s in better_calib],
        "calib_nll": {",".join(map(str, s)): nll[s] for s in sets},
        "evaluated": [
            {
                "removed": list(s),
                "calib_nll": nll[s],
                **{f"{n}_ppl": evals[s][n] for n in texts},
            }
            for s in chosen
        ],
        "benchmark_check": {n: {"benchmark": a, "here": b} for n, (a, b) in check.items()},
        "seconds": time.perf_counter() - started,
        "machine": machine(),
    }


def render(cases: list[dict[str, Any]]) -> str:
    rows = []
    for case in cases:
        centre = case["evaluated"][0]
        for i, e in enumerate(case["evaluated"]):
            rows.append(
                [
                    case["model"],
                    str(case["k"]),
                    "centre" if i == 0 else f"#{i}",
                    str(e["removed"]),
                    f"{e['calib_nll']:.4f}",
                    f"{e['wikitext2_ppl']:.2f}",
                    f"{e['heldout_ppl']:.2f}",
                    "yes"
                    if i
                    and e["wikitext2_ppl"] < centre["wikitext2_ppl"]
                    and e["heldout_ppl"] < centre["heldout_ppl"]
                    else "",
                ]
            )
    headers = ["model", "k", "rank", "removed", "calib NLL", "WT2 ppl", "HO ppl", "beats centre"]
    return table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", action="append", default=[], help="model:b1,b2,... (repeatable)")
    ap.add_argument("--calib-windows", type=int, default=4)
    ap.add_argument("--top", type=int, default=3)
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    data = json.loads(args.out.read_text()) if args.out.exists() else {"cases": {}}
    for spec in args.case:
        key, _, blocks = spec.partition(":")
        if key not in MODELS or not blocks:
            ap.error(f"--case {spec!r}: expected model:b1,b2,... with model in {list(MODELS)}")
        centre = tuple(sorted(int(b) for b in blocks.split(",")))
        case = run_case(MODELS[key], centre, args.calib_windows, args.top, args.cache_dir)
        data["cases"][f"{key}:{','.join(map(str, centre))}"] = case
        args.out.write_text(json.dumps(data, indent=2) + "\n")
        print(f"{key} k={len(centre)}: {case['neighbours']} neighbours, {case['seconds']:.0f}s")
    print(render(list(data["cases"].values())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
