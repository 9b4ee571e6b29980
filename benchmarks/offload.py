"""Sequential onloading vs the in-memory path (issue 20 item 5): wall time and peak memory of
each stage on a bf16 safetensors copy of SmolLM2-135M and of Qwen2.5-Coder-0.5B.

Each model is converted once (its GGUF loaded in bfloat16, saved as safetensors with
:func:`lorp.loading.save_pruned`) into ``--cache-dir``. Each mode runs in a fresh process (so
its peaks are its own): ``none`` loads the whole model, ``sequential`` loads it for layer-wise
passes (:func:`lorp.loading.load_model` ``sequential=True``: the blocks stay on disk and are read
one at a time). Stages, as the pipeline runs them: loading, calibration (S on ``--windows`` x
``--seq-len``), selection (lorp, ``--remove`` blocks), evaluation (dense vs pruned on
``--eval-windows`` held-out windows). Memory: on CPU the process's resident set sampled every
2 ms (VmRSS, and its anonymous part RssAnon; safetensors weights are memory-mapped, so they
count in VmRSS only), minus what the process held before loading (after a warm-up run of both
paths on a 2-block random model of the same config, so library code and heap are in the
baseline); on CUDA the allocator's peak (``torch.cuda.max_memory_allocated``, reset per stage).

Goal check (issue 20): the sequential calibration and evaluation peaks are at most 1.15 x
(embeddings + head + 2 blocks + activations), activations being the stage's hidden states
(calibration: every window's block input and the normalised block inputs S is folded from;
evaluation: the dense and the pruned stream and ``lorp.offload.LOGIT_COPIES`` float32 copies of
one batch's logits, which the in-memory evaluation holds too), and their wall times at most
1.3 x the in-memory path's. Safetensors weights are memory-mapped: a tied embedding counts
fully once the head has run (evaluation), only its used rows before (calibration).

    python benchmarks/offload.py                    # both models, the full scale
    python benchmarks/offload.py --models smollm2 --windows 2 --eval-windows 2 --seq-len 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks._common import CALIBRATION, HELDOUT, machine, table, write_result  # noqa: E402
from benchmarks.quality.models import MODELS  # noqa: E402
from lorp._blocks import get_blocks  # noqa: E402
from lorp.data import text_windows  # noqa: E402
from lorp.loading import load_model, save_pruned  # noqa: E402
from lorp.offload import LOGIT_COPIES, onloader_of  # noqa: E402
from lorp.quality import compare_pruned  # noqa: E402
from lorp.selection import select_layers  # noqa: E402
from lorp.similarity import capture_similarity  # noqa: E402

MODEL_KEYS = {"smollm2": "smollm2", "qwen2.5-coder-0.5b": "qwen2.5"}
STAGES = ("loading", "calibration", "selection", "evaluation")
SELECTION_BUDGETS = (3, 6, 9)
PEAK_SLACK = 1.15
WALL_LIMIT = 1.3


def _status() -> dict[str, int]:
    """VmRSS and RssAnon of this process, bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            out[key] = int(value.split()[0]) * 1024
    return out


class Sampler:
    """Peak VmRSS / RssAnon (CPU) or allocator peak (CUDA) of the stage being timed."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, value in _status().items():
                self.peak[key] = max(self.peak.get(key, 0), value)
            time.sleep(0.002)

    @contextmanager
    def stage(self, into: dict[str, Any], name: str) -> Iterator[None]:
        self.peak = _status()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
        self._stop.clear()
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        self._stop.set()
        thread.join()
        for key, value in _status().items():
            self.peak[key] = max(self.peak.get(key, 0), value)
        entry: dict[str, Any] = {"seconds": wall, "peak_rss": self.peak.get("VmRSS")}
        entry["peak_rss_anon"] = self.peak.get("RssAnon")
        if self.device.type == "cuda":
            entry["peak_cuda"] = int(torch.cuda.max_memory_allocated(self.device))
        into[name] = entry


def convert(key: str, cache_dir: Path) -> Path:
    """The bf16 safetensors copy of model ``key`` (made once from its GGUF)."""
    spec = MODELS[MODEL_KEYS[key]]
    target = cache_dir / f"{key}-bf16"
    if (target / "config.json").is_file():
        return target
    loaded = load_model(spec.locate(cache_dir), dtype="bfloat16", device="cpu")
    partial = target.with_name(target.name + ".partial")
    save_pruned(loaded.model, loaded.tokenizer, partial, dtype="bfloat16")
    os.replace(partial, target)
    return target


def _sizes(model: Any) -> dict[str, int]:
    """Bytes of the embeddings, the head (when not tied) and one block."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head_w = None if head is None else head.weight
    tied = head_w is None or head_w is emb or head_w.data_ptr() == emb.data_ptr()
    block = sum(p.numel() * p.element_size() for p in get_blocks(model)[0].parameters())
    return {
        "embeddings": emb.numel() * emb.element_size(),
        "head": 0 if tied or head_w is None else head_w.numel() * head_w.element_size(),
        "block": block,
    }


def _warm_up(model_dir: str, device: torch.device) -> None:
    """Run both paths once on a 2-block random model of the same config, so the baseline the
    peaks are measured from holds the libraries' code and heap (a few hundred MiB of RSS) and
    the peaks hold the model and its activations."""
    import copy
    import gc

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lorp.offload import prepare

    AutoTokenizer.from_pretrained(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    config.num_hidden_layers = 2
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:2]
    small = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to(device).eval()
    ids = torch.randint(3, 100, (1, 16))
    for model in (small, copy.deepcopy(small)):
        if model is not small:
            prepare(model)
        capture_similarity(model, ids)
        compare_pruned(model, [1], ids)
    del small, model
    gc.collect()


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One mode's run (in its own process)."""
    device = torch.device(args.device)
    sampler = Sampler(device)
    _warm_up(args.model_dir, device)
    base = _status()
    stages: dict[str, Any] = {}
    sequential = args.mode == "sequential"
    with sampler.stage(stages, "loading"):
        loaded = load_model(args.model_dir, dtype="bfloat16", device=device, sequential=sequential)
    model, tok = loaded.model, loaded.tokenizer
    calib = text_windows(tok, CALIBRATION, args.seq_len, args.windows)
    heldout = text_windows(tok, HELDOUT, args.seq_len, args.eval_windows)
    with sampler.stage(stages, "calibration"):
        s = capture_similarity(model, calib, batch_size=args.batch_size)
    with sampler.stage(stages, "selection"):
        removed = select_layers(s, args.remove, method="lorp").removed
    with sampler.stage(stages, "evaluation"):
        quality = compare_pruned(model, removed, heldout, batch_size=args.batch_size)
    onloader = onloader_of(model)
    cfg = model.config
    return {
        "mode": args.mode,
        "baseline_rss": base.get("VmRSS"),
        "baseline_rss_anon": base.get("RssAnon"),
        "stages": stages,
        "removed": list(removed),
        "similarity": s.tolist(),
        "quality": quality.to_dict(),
        "sizes": _sizes(model) if onloader is None else None,
        "peak_block_bytes": None if onloader is None else onloader.peak_bytes,
        "weights": None if onloader is None else onloader.weights,
        "hidden_size": int(cfg.hidden_size),
        "vocab_size": int(cfg.vocab_size),
        "num_blocks": len(get_blocks(model)),
        "itemsize": 2,
    }


def activations(run: dict[str, Any], args: argparse.Namespace) -> dict[str, int]:
    """Bytes of the stage's hidden states (module docstring)."""
    d, n, item = run["hidden_size"], run["num_blocks"], run["itemsize"]
    t = args.seq_len
    logits = LOGIT_COPIES * 4 * args.batch_size * t * run["vocab_size"]
    return {
        "calibration": args.windows * t * d * (item + 4 * n),
        "evaluation": 2 * args.eval_windows * t * d * item + logits,
    }


def _child_run(key: str, mode: str, model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--model-dir",
        str(model_dir),
        *(
            f"--{k.replace('_', '-')}={getattr(args, k)}"
            for k in ("windows", "eval_windows", "seq_len", "batch_size", "remove", "device")
        ),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{key} {mode} failed:\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _best(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two runs of one mode: per stage the shorter wall time; memory peaks are kept from the
    run ``a`` (every run measures the same allocations; the wall time is what a busy machine
    disturbs)."""
    for stage, entry in a["stages"].items():
        entry["seconds"] = min(entry["seconds"], b["stages"][stage]["seconds"])
    return a


def run_model(key: str, args: argparse.Namespace) -> dict[str, Any]:
    model_dir = convert(key, args.cache_dir)
    runs: dict[str, Any] = {}
    order = ("none", "sequential")
    for rep in range(args.repeats):  # alternating which mode goes first
        for mode in order if rep % 2 == 0 else order[::-1]:
            run = _child_run(key, mode, model_dir, args)
            runs[mode] = run if mode not in runs else _best(runs[mode], run)
    mem, seq = runs["none"], runs["sequential"]
    sizes = mem["sizes"]
    acts = activations(mem, args)
    device_key = "peak_cuda" if args.device.startswith("cuda") else "peak_rss"
    checks: dict[str, Any] = {}
    for stage in ("calibration", "evaluation"):
        bound = (sizes["embeddings"] + sizes["head"] + 2 * sizes["block"] + acts[stage]) * (
            PEAK_SLACK
        )
        peak = seq["stages"][stage][device_key]
        if device_key == "peak_rss":
            peak -= seq["baseline_rss"]
        wall = seq["stages"][stage]["seconds"] / mem["stages"][stage]["seconds"]
        checks[stage] = {
            "peak": peak,
            "bound": int(bound),
            "peak_ok": peak <= bound,
            "wall_ratio": wall,
            "wall_ok": wall <= WALL_LIMIT,
        }
    same_s = max(
        abs(a - b)
        for ra, rb in zip(mem["similarity"], seq["similarity"], strict=True)
        for a, b in zip(ra, rb, strict=True)
    )
    s_mem, s_seq = (np.asarray(r["similarity"]) for r in (mem, seq))
    selections = {
        k: {
            "none": select_layers(s_mem, k, method="lorp").removed,
            "sequential": select_layers(s_seq, k, method="lorp").removed,
        }
        for k in SELECTION_BUDGETS
        if k < len(s_mem)
    }
    return {
        "model": key,
        "model_dir": str(model_dir),
        "selections": selections,
        "same_selections": all(v["none"] == v["sequential"] for v in selections.values()),
        "runs": {m: {k: v for k, v in r.items() if k != "similarity"} for m, r in runs.items()},
        "activations": acts,
        "s_max_abs_diff": same_s,
        "same_selection": mem["removed"] == seq["removed"],
        "ppl_rel_diff": abs(seq["quality"]["pruned"]["ppl"] / mem["quality"]["pruned"]["ppl"] - 1),
        "goal": checks,
    }


def _mib(v: Any) -> str:
    return "-" if v is None else f"{v / 2**20:,.0f}"


def report(results: list[dict[str, Any]], device: str) -> None:
    key = "peak_cuda" if device.startswith("cuda") else "peak_rss"
    rows = []
    for r in results:
        for mode, run in r["runs"].items():
            base = 0 if key == "peak_cuda" else run["baseline_rss"]
            for stage in STAGES:
                st = run["stages"][stage]
                rows.append(
                    [
                        r["model"],
                        mode,
                        stage,
                        f"{st['seconds']:.2f}",
                        _mib(st[key] - base),
                        _mib(
                            None
                            if st.get("peak_rss_anon") is None
                            else st["peak_rss_anon"] - run["baseline_rss_anon"]
                        ),
                    ]
                )
    print(table(["model", "offload", "stage", "wall s", "peak MiB", "peak anon MiB"], rows))
    goal_rows = []
    for r in results:
        for stage, c in r["goal"].items():
            goal_rows.append(
                [
                    r["model"],
                    stage,
                    _mib(c["peak"]),
                    _mib(c["bound"]),
                    "ok" if c["peak_ok"] else "OVER",
                    f"{c['wall_ratio']:.2f}x",
                    "ok" if c["wall_ok"] else "OVER",
                ]
            )
    print()
    print(
        table(
            ["model", "stage", "seq peak MiB", "bound MiB", "peak", "wall vs in-memory", "wall"],
            goal_rows,
        )
    )
    for r in results:
        print(
            f"{r['model']}: S max |diff| {r['s_max_abs_diff']:.2e}, same selection "
            f"{r['same_selection']} (at 3/6/9 blocks: {r['same_selections']}), pruned ppl "
            f"rel diff {r['ppl_rel_diff']:.2e}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="smollm2,qwen2.5-coder-0.5b")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--remove", type=int, default=6)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--repeats", type=int, default=2, help="runs per mode, alternating order; best wall kept"
    )
    p.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "offload")
    p.add_argument("--child", choices=("none", "sequential"), help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.mode = args.child
        print(json.dumps(child(args)))
        return
    results = []
    for key in args.models.split(","):
        spec = MODELS[MODEL_KEYS[key]]
        missing = spec.missing_packages()
        if missing and not (args.cache_dir / f"{key}-bf16" / "config.json").is_file():
            print(f"{key}: skipped, needs `pip install {' '.join(spec.pip_args)}`")
            continue
        result = run_model(key, args)
        result["settings"] = {
            k: getattr(args, k)
            for k in (
                "windows",
                "eval_windows",
                "seq_len",
                "batch_size",
                "remove",
                "device",
                "repeats",
            )
        }
        result["machine"] = machine()
        print("wrote", write_result(f"offload-{key}", result))
        results.append(result)
    report(results, args.device)


if __name__ == "__main__":
    main()
