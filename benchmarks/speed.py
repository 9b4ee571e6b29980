"""Issue #4 (budgeted and with intervals since issue 22): speed and memory of SmolLM2-135M with
6 of 30 blocks removed, on this machine.

Loads the bundled SmolLM2-135M (GGUF, float32), picks the blocks to remove, and runs
lorp.bench.benchmark (original vs pruned view in one process, alternated repetitions) on the
issue's workloads: prefill 1x512 and 8x128 (time to first token) and decode 1 prompt x 32 tokens
+ 128 new tokens (tokens/s). Writes benchmarks/results/speed-<timestamp>.json (plus, with
--report-dir, the full human report) and prints a table. Run it twice to see the spread.

Blocks to remove, first that applies:
  --remove-layers 3,7,...           a fixed list;
  --similarity FILE                 LoRP on a saved S (.npy, or a JSON with a "similarity" key
                                    such as benchmarks/results/selection_smollm2.json);
  benchmarks/results/selection_smollm2.json if it exists;
  otherwise S is captured on --windows calibration windows (shared corpus) and LoRP selects.

    .venv/bin/python benchmarks/speed.py [--remove 6] [--budget 600] [--modes eager,compiled]
        [--serving] [--repetitions 20] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CALIBRATION, RESULTS, table

from lorp.bench import SERVING_DECODE, BenchmarkConfig, benchmark
from lorp.loading import bundled_model_path, load_model

SELECTION_RESULT = RESULTS / "selection_smollm2.json"


def _load_similarity(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.asarray(np.load(path), dtype=np.float64)
    data = json.loads(path.read_text())
    return np.asarray(data["similarity"], dtype=np.float64)


def _choose(
    args: argparse.Namespace, model: Any, tokenizer: Any
) -> tuple[list[int], dict[str, Any], np.ndarray | None]:
    if args.remove_layers:
        removed = sorted(int(x) for x in args.remove_layers.split(",") if x.strip())
        return removed, {"source": "--remove-layers"}, None
    from lorp.selection import select_layers

    source = args.similarity or (SELECTION_RESULT if SELECTION_RESULT.exists() else None)
    if source is not None:
        s = _load_similarity(Path(source))
        how = {"source": f"LoRP on S from {source}"}
    else:  # the pipeline's calibration stage (its time: the windows' tokenisation + capture)
        from lorp.pipeline import PruneConfig, StageTimer, calibrate

        config = PruneConfig(num_remove=args.remove, windows=args.windows, seq_len=args.seq_len)
        timer = StageTimer()
        s = calibrate(model, tokenizer, CALIBRATION, config, timer=timer).similarity
        how = {
            "source": f"LoRP on S captured from {CALIBRATION.name}",
            "windows": args.windows,
            "seq_len": args.seq_len,
            "capture_s": timer.timings["calibration"],
        }
    selection = select_layers(s, args.remove)
    how.update(rls=selection.rls, num_clusters=selection.num_clusters, labels=selection.labels)
    return list(selection.removed), how, s


def _load_average() -> list[float] | None:
    try:
        return [float(x) for x in os.getloadavg()]
    except OSError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--remove-layers", default=None, help="comma-separated block indices")
    ap.add_argument("--similarity", default=None, help=".npy or JSON with a similarity key")
    ap.add_argument("--remove", type=int, default=6, help="blocks LoRP removes (default 6)")
    ap.add_argument("--windows", type=int, default=8, help="calibration windows if S is captured")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--repetitions", type=int, default=20, help="most A/B pairs per row")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--block-repetitions", type=int, default=3)
    ap.add_argument("--budget", type=float, default=600.0, help="benchmark seconds (600)")
    ap.add_argument("--modes", default="eager", help="eager and/or compiled, comma-separated")
    ap.add_argument("--serving", action="store_true", help="add decode 16x32x128 and 64x32x128")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--report-dir", default=None, help="also write the human report here")
    ap.add_argument("--note", default="", help="free text stored with the result")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    path = bundled_model_path()
    loaded = load_model(path, dtype="float32", device="cpu")
    load_s = time.perf_counter() - t0
    model = loaded.model
    removed, how, s = _choose(args, model, loaded.tokenizer)
    print(f"model {path.name}: removing blocks {removed} ({how['source']})", flush=True)

    config = BenchmarkConfig(
        prefill=((1, 512), (8, 128)),
        decode=((1, 32, 128), *(SERVING_DECODE if args.serving else ())),
        modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()),
        warmup=args.warmup,
        repetitions=args.repetitions,
        block_repetitions=args.block_repetitions,
        budget_s=args.budget,
    )
    last = [0.0]

    def progress(stage: str, fraction: float, message: str) -> None:
        now = time.perf_counter()
        if now - last[0] > 10 or fraction >= 1.0:
            last[0] = now
            print(f"  [{fraction:5.1%}] {message}", flush=True)

    load_before = _load_average()
    result = benchmark(model, removed, config, progress=progress)
    load_after = _load_average()
    data = result.to_dict()

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = {
        "script": "benchmarks/speed.py",
        "model": {"file": path.name, "architecture": type(model).__name__, "load_s": load_s},
        "selection": how,
        "contention": {
            "load_average_before": load_before,
            "load_average_after": load_after,
            "cpu_count": os.cpu_count(),
            "note": args.note
            or "shared machine: other processes may have run during the measurement",
        },
        "benchmark": data,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    result_path = RESULTS / f"speed-{stamp}.json"
    result_path.write_text(json.dumps(out, indent=2, allow_nan=False) + "\n")

    if args.report_dir and s is not None:
        from lorp.report import build_report, write_reports
        from lorp.selection import select_layers

        report = build_report(
            model={
                "source": path.name,
                "architecture": type(model).__name__,
                "num_layers": data["num_layers"],
                "dtype": "float32",
                "device": "cpu",
            },
            budget={"requested": args.remove, "num_remove": len(removed)},
            selection=select_layers(s, args.remove),
            similarity=s,
            timings={"loading": load_s, "benchmark": data["total_time_s"]},
            benchmark=result,
            quality=None,
            extra={"selection_source": how["source"]},
        )
        for p in write_reports(report, s, args.report_dir):
            print(f"wrote {p}")

    rows = []
    for w in data["workloads"]:
        o, p = w["original"], w["pruned"]
        if o is None or p is None:
            rows.append([w["name"], f"unavailable: {w['unavailable_reason']}"] + [""] * 8)
            continue
        ci = w["speedup_ci"] or {}
        rows.append(
            [
                w["name"] + ("" if w["reliable"] else " (unreliable)"),
                f"{o['median_s'] * 1e3:.1f} [{o['p10_s'] * 1e3:.1f}-{o['p90_s'] * 1e3:.1f}]",
                f"{p['median_s'] * 1e3:.1f} [{p['p10_s'] * 1e3:.1f}-{p['p90_s'] * 1e3:.1f}]",
                f"{o['tokens_per_s']:.1f} -> {p['tokens_per_s']:.1f}",
                f"{w['speedup']:.3f} [{ci.get('low') or 0:.3f}-{ci.get('high') or 0:.3f}]",
                str(len(o["times_s"])),
                "n/a" if w["ideal_speedup"] is None else f"{w['ideal_speedup']:.3f}",
                "n/a" if w["measured_over_ideal"] is None else f"{w['measured_over_ideal']:.3f}",
                f"{o['memory']['kv_cache_bytes'] / 1e6:.1f} -> "
                f"{p['memory']['kv_cache_bytes'] / 1e6:.1f}",
                _peak(o["memory"]) + " -> " + _peak(p["memory"]),
            ]
        )
    headers = [
        "workload",
        "original ms [p10-p90]",
        "pruned ms [p10-p90]",
        "tokens/s",
        "speedup [95% CI]",
        "pairs",
        "ideal",
        "meas/ideal",
        "KV MB",
        "weights+peak work MB",
    ]
    print()
    print(table(headers, rows))
    wt = data["weights"]
    print(
        f"\nweights {wt['original_bytes'] / 1e6:.1f} MB -> {wt['pruned_bytes'] / 1e6:.1f} MB "
        f"(-{100 * wt['saved_fraction']:.1f}%); threads {data['environment']['torch_threads']}; "
        f"load average {load_before} -> {load_after}"
    )
    print(f"wrote {result_path}")


def _peak(mem: dict[str, Any]) -> str:
    value = mem.get("estimated_peak_bytes")
    return "n/a" if value is None else f"{value / 1e6:.1f}"


if __name__ == "__main__":
    main()
