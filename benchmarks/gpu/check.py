"""Issue 20 item 6: a device check anyone with a GPU can run, no network needed.

Builds random-weight models of real shapes (Qwen3-1.7B and Qwen3-8B: the configs below, bf16,
``AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)`` built on the device), saves each
as safetensors with a byte-level tokenizer made here, then for the methods ``lorp``, ``auto`` and
``lorp-fold`` runs what ``lorp prune --dtype bfloat16 --device cuda`` runs
(:func:`lorp.pipeline.run_pipeline`: load, preflight, calibration, selection, corrections,
evaluation, the benchmark for the first method, save, reports), then reloads the pruned
checkpoint with plain ``from_pretrained``, compares its logits with the pruned model in memory
and generates. Writes one JSON (stage times, selections, perplexities, speedups, peak memory,
versions) and prints a table.

    .venv/bin/python benchmarks/gpu/check.py                       # both shapes on CUDA
    .venv/bin/python benchmarks/gpu/check.py --scale tiny --device cpu   # < 1 min, no GPU

Budget: the real scale is sized for one H200 in under 6 minutes (``--time-limit``, default
330 s): 8 calibration windows of 512 tokens, 4 scoring windows of 256, 4 held-out windows, a
short benchmark (prefill 1x512 and 8x512, decode 1x128+32, 10 repetitions); before each run the
time it would take (the previous run of that model, or the previous model's scaled by the
parameter count) is checked against what is left, and a run that would not fit is recorded as
skipped rather than started. Every output folder is deleted once measured (the 8B checkpoint
is 16 GB; disk is the limit on small machines).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import RESULTS, table

METHODS = ("lorp", "auto", "lorp-fold")

# The real models' shapes (their config.json on the hub; weights are random here).
SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-1.7b": {
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
    },
    "qwen3-8b": {
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "tie_word_embeddings": False,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
    },
    "qwen3-tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 512,  # the byte tokenizer's 259 ids fit; a 151936 head is slow on CPU
        "tie_word_embeddings": True,
        "max_position_embeddings": 4096,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
    },
}
SCALES: dict[str, tuple[str, ...]] = {"tiny": ("qwen3-tiny",), "real": ("qwen3-1.7b", "qwen3-8b")}

# Windows and benchmark per scale: the real one fits an H200 in < 6 min with both shapes.
RUN_SETTINGS: dict[str, dict[str, Any]] = {
    "real": {
        "remove_fraction": 0.25,
        "prune": {
            "windows": 8,
            "seq_len": 512,
            "holdout_windows": 4,
            "score_windows": 4,
            "score_seq_len": 256,
            "compensation_windows": 4,
            "compensation_tune_windows": 2,
            "temperature_windows": 2,
        },
        "benchmark": {
            "prefill": [[1, 512], [8, 512]],
            "decode": [[1, 128, 32]],
            "warmup": 2,
            "repetitions": 10,
            "measure_blocks": False,
        },
        "generate_tokens": 16,
    },
    "tiny": {
        "remove_fraction": 0.25,
        "prune": {
            "windows": 4,
            "seq_len": 64,
            "holdout_windows": 2,
            "score_windows": 2,
            "score_seq_len": 32,
            "compensation_windows": 2,
            "compensation_tune_windows": 1,
            "temperature_windows": 2,
        },
        "benchmark": {
            "prefill": [[1, 32]],
            "decode": [[1, 8, 4]],
            "warmup": 0,
            "repetitions": 2,
            "measure_blocks": False,
            "allow_few_repetitions": True,
        },
        "generate_tokens": 8,
    },
}

WORDS = [
    "the",
    "model",
    "block",
    "layer",
    "token",
    "window",
    "cache",
    "weight",
    "pruning",
    "depth",
    "memory",
    "device",
    "kernel",
    "attention",
    "residual",
    "norm",
    "projection",
    "vocabulary",
    "sequence",
    "batch",
    "prefill",
    "decode",
    "latency",
    "throughput",
    "calibration",
    "similarity",
    "phase",
    "cluster",
    "budget",
    "report",
]


def byte_tokenizer() -> Any:
    """A byte-level tokenizer (259 ids: <pad> <s> </s>, then the 256 bytes), built offline."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for char in pre_tokenizers.ByteLevel.alphabet():
        vocab[char] = len(vocab)
    backend = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            pre_tokenizers.Split(Regex("."), behavior="isolated"),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def synthetic_text(path: Path, chars: int, seed: int = 0) -> Path:
    """Deterministic word salad (random weights make the text's meaning irrelevant)."""
    rng = random.Random(seed)
    words: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(WORDS)
        words.append(word + ("." if rng.random() < 0.08 else ""))
        size += len(word) + 1
    path.write_text(" ".join(words) + "\n")
    return path


def qwen3_config(shape: str) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(
        **SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype="bfloat16"
    )


def parameter_count(shape: str) -> int:
    """The parameters of ``shape``, counted on the meta device (nothing allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(qwen3_config(shape), dtype=torch.bfloat16)
    return sum(p.numel() for p in model.parameters())


def build_and_save(shape: str, folder: Path, device: str) -> dict[str, Any]:
    """Random bf16 weights of ``shape`` (built on ``device``), saved as safetensors."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(qwen3_config(shape), dtype=torch.bfloat16)
    _sync(device)
    built = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    saved = time.perf_counter() - start
    del model
    _free(device)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return {"parameters": params, "safetensors_bytes": size, "build_s": built, "save_s": saved}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def run_method(
    method: str,
    model_dir: Path,
    calibration: Path,
    out: Path,
    device: str,
    settings: dict[str, Any],
    with_benchmark: bool,
) -> dict[str, Any]:
    """One ``lorp prune --dtype bfloat16 --device <device>`` (the pipeline it runs), then save
    -> reload -> compare logits -> generate."""
    from lorp.bench import BenchmarkConfig
    from lorp.pipeline import PruneConfig, run_pipeline

    config = PruneConfig(
        method=method,
        fraction=settings["remove_fraction"],
        batch_size=4 if device == "cuda" else 1,
        benchmark=BenchmarkConfig.from_dict(settings["benchmark"]) if with_benchmark else None,
        **settings["prune"],
    )
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    done = run_pipeline(model_dir, calibration, out, config, dtype="bfloat16", device=device)
    _sync(device)
    wall = time.perf_counter() - start
    result = done.result
    row: dict[str, Any] = {
        "method": method,
        "wall_s": wall,
        "stages_s": dict(result.timings),
        "removed": result.removed,
        "num_layers_before": result.num_layers_before,
        "selection_method": result.selection.method,
        "dtype": done.report.get("model", {}).get("dtype"),
        "peak_device_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
        "peak_rss_bytes": _peak_rss_bytes(),
    }
    if result.quality is not None:
        q = result.quality
        row["quality"] = {
            "ppl_dense": q.dense.ppl,
            "ppl_pruned": q.pruned.ppl,
            "kl": q.kl,
            "top1_agreement": q.top1_agreement,
        }
    if result.compensation is not None and result.compensation.temperature is not None:
        row["temperature"] = result.compensation.temperature.scale
    if result.benchmark is not None:
        row["speedups"] = {w.name: w.speedup for w in result.benchmark.workloads}
    row["reload"] = reload_and_generate(
        done.checkpoint_dir, result.model, done.result.tokenizer, device, settings
    )
    del done, result
    _free(device)
    return row


def reload_and_generate(
    checkpoint: Path, pruned: Any, tokenizer: Any, device: str, settings: dict[str, Any]
) -> dict[str, Any]:
    """The saved checkpoint through plain ``from_pretrained``: its depth, its logits against
    the pruned model's in memory, and a greedy generation."""
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model: Any = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    model = model.to(torch.device(device)).eval()
    load_s = time.perf_counter() - start
    prompt = "the model block layer token window cache weight"
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    with torch.inference_mode():
        reloaded = model(input_ids=ids).logits.float()
        memory = pruned.to(device)(input_ids=ids).logits.float()
        start = time.perf_counter()
        generated = model.generate(
            ids,
            max_new_tokens=settings["generate_tokens"],
            min_new_tokens=settings["generate_tokens"],
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        _sync(device)
        gen_s = time.perf_counter() - start
    new = int(generated.shape[1] - ids.shape[1])
    out = {
        "load_s": load_s,
        "num_layers": int(model.config.num_hidden_layers),
        "logits_max_abs_diff": float((reloaded - memory).abs().max()),
        "logits_scale": float(memory.abs().max()),
        "generated_tokens": new,
        "generate_s": gen_s,
        "generate_tokens_per_s": new / gen_s if gen_s > 0 else None,
    }
    del model
    return out


def versions(device: str) -> dict[str, Any]:
    import transformers

    import lorp

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lorp": lorp.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_bytes=int(props.total_memory))
    return info


def check(args: argparse.Namespace) -> dict[str, Any]:
    settings = RUN_SETTINGS[args.scale]
    methods = tuple(args.methods)
    began = time.perf_counter()
    data: dict[str, Any] = {
        "scale": args.scale,
        "device": args.device,
        "time_limit_s": args.time_limit,
        "settings": settings,
        "versions": versions(args.device),
        "models": {},
    }
    work = Path(tempfile.mkdtemp(prefix="lorp-gpu-check-", dir=args.work_dir))
    try:
        calibration = synthetic_text(work / "calibration.txt", 200_000)
        per_param: float | None = None  # seconds per parameter of the last run (to predict)
        for shape in SCALES[args.scale]:
            model_dir = work / shape
            entry: dict[str, Any] = {"config": SHAPES[shape], "runs": [], "skipped": []}
            data["models"][shape] = entry
            params = parameter_count(shape)
            left = args.time_limit - (time.perf_counter() - began)
            if per_param is not None and per_param * params > left:  # not even one run fits
                entry["skipped"].append(
                    {"method": "all", "reason": f"predicted {per_param * params:.0f} s per run, "
                     f"{left:.0f} s left"}
                )  # fmt: skip
                continue
            entry.update(build_and_save(shape, model_dir, args.device))
            for i, method in enumerate(methods):
                left = args.time_limit - (time.perf_counter() - began)
                predicted = None if per_param is None else per_param * params
                if predicted is not None and predicted > left:
                    entry["skipped"].append(
                        {
                            "method": method,
                            "reason": f"predicted {predicted:.0f} s, {left:.0f} s left",
                        }
                    )
                    continue
                out = work / f"{shape}-{method}"
                row = run_method(
                    method,
                    model_dir,
                    calibration,
                    out,
                    args.device,
                    settings,
                    with_benchmark=i == 0,
                )
                shutil.rmtree(out, ignore_errors=True)
                entry["runs"].append(row)
                # the benchmark is a one-off: predict the next runs from the pipeline without it
                spent = row["wall_s"] - row["stages_s"].get("benchmark", 0.0)
                per_param = (spent + row["reload"]["load_s"]) / params
            shutil.rmtree(model_dir, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    data["total_s"] = time.perf_counter() - began
    return data


def print_table(data: dict[str, Any]) -> None:
    """Stage seconds per run; peak GiB: device memory on CUDA, the process's peak RSS on CPU."""
    nan = float("nan")
    rows = []
    for shape, entry in data["models"].items():
        for run in entry["runs"]:
            q = run.get("quality") or {}
            stages = run["stages_s"]
            speed = run.get("speedups") or {}
            rows.append(
                [
                    shape,
                    run["method"],
                    ",".join(map(str, run["removed"])),
                    f"{stages.get('loading', 0):.1f}",
                    f"{stages.get('calibration', 0):.1f}",
                    f"{stages.get('selection', 0):.1f}",
                    f"{stages.get('compensation', 0) + stages.get('temperature', 0):.1f}",
                    f"{stages.get('evaluation', 0):.1f}",
                    f"{stages.get('benchmark', 0):.1f}",
                    f"{stages.get('saving', 0):.1f}",
                    f"{run['wall_s']:.1f}",
                    f"{q.get('ppl_dense', nan):.4g} -> {q.get('ppl_pruned', nan):.4g}",
                    " ".join(f"{k.split('_')[0]} x{v:.2f}" for k, v in speed.items()) or "-",
                    f"{(run['peak_device_bytes'] or run['peak_rss_bytes']) / 2**30:.2f}",
                    f"{run['reload']['logits_max_abs_diff']:.2g}",
                ]
            )
        for skip in entry["skipped"]:
            rows.append(
                [shape, skip["method"], "skipped: " + skip["reason"], *["" for _ in range(12)]]
            )
    headers = [
        "model", "method", "removed", "load s", "capture s", "select s", "folds s", "eval s",
        "bench s", "save s", "wall s", "ppl", "speedup", "peak GiB", "reload diff",
    ]  # fmt: skip
    print(table(headers, rows))
    print(f"total {data['total_s']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="real")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--time-limit", type=float, default=330.0, help="seconds (default 330)")
    parser.add_argument("--work-dir", type=Path, default=None, help="where models are written")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("check.py: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    data = check(args)
    out = args.out or RESULTS / f"gpu-check-{args.scale}-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    print_table(data)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
