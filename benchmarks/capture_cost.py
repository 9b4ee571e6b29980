"""Issue #3: what capturing S costs compared with a plain forward pass over the same windows.

Each measurement runs in a fresh child process (so peak RSS is that of one job): load the bundled
SmolLM2-135M, tokenise the calibration windows, reset the kernel's peak-RSS counter
(/proc/self/clear_refs), then either run `lorp.capture_similarity` or a plain
`model(input_ids, use_cache=False)` over the same windows (batch 1, no grad). Children alternate
(forward, capture, forward, capture, ...) so machine noise hits both. Reports wall time and peak
RSS (absolute, and above the post-load baseline) and their ratios capture / forward.

    .venv/bin/python benchmarks/capture_cost.py [--windows 32] [--seq-len 512] [--pairs 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CALIBRATION, machine, table, write_result


def _kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def child(mode: str, windows: int, seq_len: int) -> None:
    import torch

    from lorp import bundled_model_path, capture_similarity, load_model
    from lorp.data import text_windows

    torch.manual_seed(0)
    loaded = load_model(bundled_model_path())
    w = text_windows(loaded.tokenizer, CALIBRATION, seq_len, windows)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _kib("VmRSS")
    t = time.perf_counter()
    if mode == "capture":
        capture_similarity(loaded.model, w, batch_size=1)
    else:
        with torch.no_grad():
            for x in w:
                loaded.model(input_ids=x[None], use_cache=False)
    wall = time.perf_counter() - t
    peak = _kib("VmHWM")
    print(json.dumps({"mode": mode, "wall_s": wall, "peak_kib": peak, "base_kib": base}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--child", choices=["capture", "forward"])
    args = ap.parse_args()
    if args.child:
        child(args.child, args.windows, args.seq_len)
        return
    runs: dict[str, list[dict[str, float]]] = {"forward": [], "capture": []}
    for i in range(args.pairs):
        order = ("forward", "capture") if i % 2 == 0 else ("capture", "forward")
        for mode in order:
            out = (
                subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        mode,
                        "--windows",
                        str(args.windows),
                        "--seq-len",
                        str(args.seq_len),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            runs[mode].append(json.loads(out))
            print(f"{mode:>8}: {runs[mode][-1]}", flush=True)

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])

    def above(mode: str) -> float:
        return statistics.median(r["peak_kib"] - r["base_kib"] for r in runs[mode])

    summary = {
        "forward_wall_s": med("forward", "wall_s"),
        "capture_wall_s": med("capture", "wall_s"),
        "time_ratio": med("capture", "wall_s") / med("forward", "wall_s"),
        "forward_peak_mib": med("forward", "peak_kib") / 1024,
        "capture_peak_mib": med("capture", "peak_kib") / 1024,
        "peak_ratio": med("capture", "peak_kib") / med("forward", "peak_kib"),
        "forward_above_base_mib": above("forward") / 1024,
        "capture_above_base_mib": above("capture") / 1024,
    }
    data = {
        "windows": args.windows,
        "seq_len": args.seq_len,
        "runs": runs,
        "summary": summary,
        "machine": machine(),
    }
    path = write_result("capture_cost", data)
    rows = [
        [
            "wall time (s)",
            f"{summary['forward_wall_s']:.1f}",
            f"{summary['capture_wall_s']:.1f}",
            f"{summary['time_ratio']:.3f}",
        ],
        [
            "peak RSS (MiB)",
            f"{summary['forward_peak_mib']:.0f}",
            f"{summary['capture_peak_mib']:.0f}",
            f"{summary['peak_ratio']:.3f}",
        ],
        [
            "peak above loaded model (MiB)",
            f"{summary['forward_above_base_mib']:.0f}",
            f"{summary['capture_above_base_mib']:.0f}",
            "-",
        ],
    ]
    print(
        f"\n{args.windows} windows x {args.seq_len} tokens, SmolLM2-135M, batch 1, "
        f"median of {args.pairs}\n"
    )
    print(table(["", "plain forward", "lorp similarity", "ratio"], rows))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
