"""The pruned GGUF where llama.cpp users run it (issue 21): load the original and the pruned file
in llama.cpp (``llama-cpp-python``, an optional extra: ``pip install llama-cpp-python``, which
builds llama.cpp from source with cmake), check the pruned one generates, and time both:
prompt processing (tokens/s over a ``--prompt``-token batch) and generation (tokens/s over
``--new`` tokens, one at a time), same threads, A/B alternated ``--reps`` times.

    python benchmarks/llamacpp_gguf.py                      # bundled SmolLM2, blocks 13-18 removed
    python benchmarks/llamacpp_gguf.py --remove 13,14,15 --reps 20

Writes ``benchmarks/results/llamacpp-smollm2.json`` and prints a table. The pruned file is made
by ``lorp.gguf_surgery.write_pruned_gguf`` (no fold: every kept tensor's bytes are the input's).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# llama.cpp before torch: both bring an OpenMP runtime, and llama.cpp crashed (SIGSEGV) when
# torch's was loaded first
try:
    import llama_cpp
except ImportError:
    llama_cpp = None

from lorp.gguf_surgery import write_pruned_gguf  # noqa: E402
from lorp.loading import bundled_model_path  # noqa: E402

TEXT = REPO.parent / "shared" / "data" / "eval" / "debian-reference.en.txt"


def _timings(llm: Any, prompt: list[int], new: int) -> tuple[float, float]:
    """(prompt tokens/s, generated tokens/s) of one run from an empty cache (greedy)."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prompt_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new):
        token = int(llm.sample(top_k=1))
        llm.eval([token])
    gen_s = time.perf_counter() - start
    return len(prompt) / prompt_s, new / gen_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="input GGUF (default: bundled)")
    parser.add_argument("--remove", default="13,14,15,16,17,18", help="blocks to remove")
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    parser.add_argument("--new", type=int, default=64, help="generated tokens")
    parser.add_argument("--reps", type=int, default=10, help="A/B pairs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks/results/llamacpp-smollm2.json"
    )
    args = parser.parse_args(argv)

    if llama_cpp is None:
        print("llama-cpp-python is not installed: pip install llama-cpp-python", file=sys.stderr)
        return 2

    src = args.model or bundled_model_path()
    removed = [int(i) for i in args.remove.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        pruned = Path(tmp) / src.name
        written = write_pruned_gguf(src, pruned, removed)
        models = {
            name: llama_cpp.Llama(
                model_path=str(path),
                n_ctx=args.prompt + args.new + 8,
                n_batch=args.prompt,
                n_threads=args.threads,
                n_threads_batch=args.threads,
                verbose=False,
            )
            for name, path in (("original", src), ("pruned", pruned))
        }
        text = (
            TEXT.read_text(encoding="utf-8", errors="replace") if TEXT.is_file() else "text " * 2000
        )
        prompt = models["original"].tokenize(text.encode())[: args.prompt]
        generated = {
            name: llm("The capital of France is", max_tokens=16, temperature=0.0)["choices"][0][
                "text"
            ]
            for name, llm in models.items()
        }
        for llm in models.values():  # warm-up
            _timings(llm, prompt, 4)
        runs: dict[str, dict[str, list[float]]] = {m: {"pp": [], "tg": []} for m in models}
        for rep in range(args.reps):
            order = ("original", "pruned") if rep % 2 == 0 else ("pruned", "original")
            for name in order:
                pp, tg = _timings(models[name], prompt, args.new)
                runs[name]["pp"].append(pp)
                runs[name]["tg"].append(tg)
        result: dict[str, Any] = {
            "engine": f"llama.cpp via llama-cpp-python {llama_cpp.__version__}",
            "model": src.name,
            "removed": removed,
            "bytes": {"original": written.bytes_in, "pruned": written.bytes_out},
            "threads": args.threads,
            "prompt_tokens": len(prompt),
            "new_tokens": args.new,
            "reps": args.reps,
            "machine": {
                "cpu": platform.processor() or platform.machine(),
                "python": platform.python_version(),
            },
            "generated": generated,
            "median_tokens_per_s": {
                m: {k: statistics.median(v) for k, v in r.items()} for m, r in runs.items()
            },
            "runs": runs,
        }
    med = result["median_tokens_per_s"]
    result["speedup"] = {k: med["pruned"][k] / med["original"][k] for k in ("pp", "tg")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| model | prompt tok/s (median of {args.reps}) | generation tok/s |")
    print("|---|---|---|")
    for name in ("original", "pruned"):
        print(f"| {name} | {med[name]['pp']:.1f} | {med[name]['tg']:.1f} |")
    print(f"| speedup | x{result['speedup']['pp']:.3f} | x{result['speedup']['tg']:.3f} |")
    for name, text_out in generated.items():
        print(f"{name}: {text_out!r}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
