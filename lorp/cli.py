"""The ``lorp`` command line: similarity, select, prune, eval ppl, eval tasks, bench.

Every failure the user can cause ends in one line on stderr (``lorp: error: ...``) and a non-zero
exit code: 2 for bad input, 1 for anything else; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .errors import InvalidInputError, LorpError
from .methods import HEAL_LR, MethodInfo, all_methods, method_names

if TYPE_CHECKING:
    from .target import DepthSearch

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
BUNDLED = "bundled"


# ----------------------------------------------------------------------------- argument types
def _budget(text: str) -> int | float:
    """A block count (``6``) or a fraction of the blocks (``0.2``)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a block count or fraction: {text!r}") from None
    if value != value or not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"a fraction must be between 0 and 1, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _fraction(text: str) -> float:
    value = _budget(text)
    if isinstance(value, int):
        raise argparse.ArgumentTypeError(f"a fraction must be between 0 and 1, got {text!r}")
    return value


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value != value or value < 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _layer_list(text: str) -> list[int]:
    try:
        return sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of block indices: {text!r}"
        ) from None


def _task_names(text: str) -> list[str]:
    """Comma-separated task names (``all``: every task), checked against lorp.tasks' list."""
    from .tasks import parse_tasks

    try:
        return parse_tasks(text)
    except InvalidInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _shapes(width: int) -> Callable[[str], list[tuple[int, ...]]]:
    def parse(text: str) -> list[tuple[int, ...]]:
        out = []
        for item in text.split(","):
            parts = item.lower().split("x")
            try:
                shape = tuple(int(p) for p in parts)
            except ValueError:
                shape = ()
            if len(shape) != width or min(shape) < 1:
                form = "x".join(["B", "L", "N"][:width])
                raise argparse.ArgumentTypeError(
                    f"expected {form}[,{form}...] with positive numbers, got {item!r}"
                )
            out.append(shape)
        return out

    return parse


# ----------------------------------------------------------------------------- helpers
class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Progress:
    """One line per stage step on stderr, rate-limited."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.last = 0.0

    def __call__(self, stage: str, fraction: float, message: str) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if fraction not in (0.0, 1.0) and now - self.last < 1.0:
            return
        self.last = now
        print(f"[{stage:>11}] {fraction * 100:5.1f}%  {message}", file=sys.stderr, flush=True)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help=f"HF model directory (safetensors), a .gguf file, a hub id (with --allow-hub), or "
        f"'{BUNDLED}' for the bundled SmolLM2-135M",
    )
    p.add_argument("--gguf-file", help="GGUF file name inside --model when it is a directory")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="compute dtype; auto (default): the checkpoint's own (config torch_dtype; a GGUF: "
        "bfloat16 on CUDA, float32 on CPU)",
    )
    p.add_argument(
        "--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N"
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow pickle (.bin/.pt) weights: they can run code",
    )
    p.add_argument(
        "--trust-remote-code", action="store_true", help="run the model repository's own code"
    )
    p.add_argument("--allow-hub", action="store_true", help="allow --model to be a model hub id")


def _load_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "gguf_file": args.gguf_file,
        "dtype": args.dtype,
        "device": args.device,
        "allow_pickle": args.allow_pickle,
        "trust_remote_code": args.trust_remote_code,
        "allow_hub": args.allow_hub,
    }


def _output_formats(text: str) -> list[str]:
    """``--output-format``: ``gguf``, ``safetensors`` or a comma list of them."""
    from .outputs import OUTPUT_FORMATS

    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in OUTPUT_FORMATS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"expected {' or '.join(OUTPUT_FORMATS)} (or a comma list), got {text!r}"
        )
    return names


def _model_source(args: argparse.Namespace) -> str:
    if args.model == BUNDLED:
        from .loading import bundled_model_path

        return str(bundled_model_path())
    return str(args.model)


def _load(args: argparse.Namespace) -> Any:
    from .loading import load_model

    return load_model(_model_source(args), **_load_options(args))


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise InvalidInputError(f"{what} not found: {path}")
    return path


def _emit(data: dict[str, Any], as_json: bool, lines: Sequence[str]) -> None:
    if as_json:
        print(json.dumps(data))
    else:
        print("\n".join(lines))


def _bench_config(args: argparse.Namespace) -> Any:
    from .bench import SERVING_DECODE, BenchmarkConfig

    decode = list(args.decode)
    if args.serving:
        decode += [w for w in SERVING_DECODE if w not in decode]
    return BenchmarkConfig(
        prefill=tuple(args.prefill),
        decode=tuple(decode),
        modes=None if args.modes is None else tuple(args.modes),
        warmup=args.warmup,
        repetitions=args.repetitions,
        budget_s=args.budget_s,
        measure_blocks=not args.no_block_timing,
    )


def _modes(text: str) -> list[str]:
    from .bench import MODES

    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if not modes or bad or len(set(modes)) != len(modes):
        raise argparse.ArgumentTypeError(
            f"expected distinct values of {', '.join(MODES)}, comma-separated, got {text!r}"
        )
    return modes


def _positive_float(text: str) -> float:
    value = _nonneg_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prefill",
        type=_shapes(2),
        default=[(1, 512)],
        help="prefill workloads BATCHxPROMPT, comma-separated (default 1x512)",
    )
    p.add_argument(
        "--decode",
        type=_shapes(3),
        default=[(1, 32, 16)],
        help="decode workloads BATCHxPROMPTxNEW, comma-separated (default 1x32x16: batch-1 "
        "latency)",
    )
    p.add_argument(
        "--serving",
        action="store_true",
        help="add the serving-throughput decode workloads 16x32x128 and 64x32x128",
    )
    p.add_argument(
        "--bench-modes",
        dest="modes",
        type=_modes,
        default=None,
        help="eager and/or compiled (static KV cache + torch.compile, decode only), "
        "comma-separated (default: eager, plus compiled on CUDA)",
    )
    p.add_argument(
        "--bench-budget",
        dest="budget_s",
        type=_positive_float,
        default=None,
        help="seconds for the whole benchmark (default: lorp prune 25%% of the job's other "
        "stages; lorp bench 60)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed runs per model and workload, the last one measuring memory (default 1)",
    )
    p.add_argument(
        "--repetitions",
        type=_positive_int,
        default=20,
        help="most A/B pairs per workload (default 20; at least 3 run, then until the "
        "speedup's 95%% interval is within ±2%% or the budget share is spent)",
    )
    p.add_argument(
        "--no-block-timing", action="store_true", help="skip per-block timing (no ideal speedup)"
    )


def _speed_line(w: Any, removed: Sequence[int]) -> str:
    """One benchmark row: engine, times, speedup with its interval, ideal, reliability."""
    if w.status != "measured":
        return f"{w.name:>28}: unavailable ({w.unavailable_reason})"
    o, p = w.original.to_dict(), w.pruned.to_dict()
    ci = w.interval.to_dict() if w.interval is not None else {}
    ci_text = (
        f" [{ci['low']:.3f}-{ci['high']:.3f}]" if ci.get("low") is not None else " [no interval]"
    )
    ideal = w.ideal_speedup(removed)
    line = (
        f"{w.name:>28}: original {o['median_s'] * 1e3:9.1f} ms  pruned {p['median_s'] * 1e3:9.1f} "
        f"ms  speedup {w.speedup:.3f}x{ci_text} ({len(w.original.times_s)} pairs)"
        + (
            f"  ideal {ideal:.3f}x, measured/ideal {w.speedup / ideal:.3f}"
            + (
                f" [{ci['low'] / ideal:.3f}-{ci['high'] / ideal:.3f}]"
                if ci.get("low") is not None
                else ""
            )
            if ideal
            else ""
        )
        + f"  [{w.engine}]"
    )
    if w.unreliable_reasons:
        line += "  UNRELIABLE: " + "; ".join(w.unreliable_reasons)
    return line


# ----------------------------------------------------------------------------- commands
def cmd_similarity(args: argparse.Namespace) -> int:
    import numpy as np

    from .data import text_windows
    from .similarity import capture_similarity

    calibration = _require_file(args.calibration, "calibration file")
    loaded = _load(args)
    windows = text_windows(loaded.tokenizer, calibration, args.seq_len, args.windows)
    start = time.perf_counter()
    s = capture_similarity(
        loaded.model, windows, batch_size=args.batch_size, progress=_Progress(not args.quiet)
    )
    elapsed = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, s)
    if not args.quiet:
        print(
            f"wrote {args.out}: {s.shape[0]}x{s.shape[1]} from {windows.shape[0]} windows x "
            f"{windows.shape[1]} tokens in {elapsed:.1f}s",
            file=sys.stderr,
        )
    return EXIT_OK


def _load_similarity(path: Path) -> Any:
    import numpy as np

    _require_file(path, "similarity file")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InvalidInputError(f"{path} is not a numpy .npy matrix ({exc})") from exc


def cmd_select(args: argparse.Namespace) -> int:
    from .selection import select_layers

    s = _load_similarity(args.similarity)
    sel = select_layers(s, args.remove, method=args.method, num_clusters=args.clusters)
    data = {
        "method": sel.method,
        "num_layers": sel.num_layers,
        "removed": sel.removed,
        "rls": sel.rls,
        "num_clusters": sel.num_clusters,
        "labels": sel.labels,
    }
    _emit(
        data,
        args.json,
        [
            f"method: {sel.method}",
            f"layers: {sel.num_layers}",
            f"RLS: {sel.rls:.4f}" + (f"  K: {sel.num_clusters}" if sel.num_clusters else ""),
            f"phases: {sel.labels}" if sel.labels is not None else "phases: -",
            f"remove: {','.join(map(str, sel.removed))}",
        ],
    )
    return EXIT_OK


def _depth_line(search: DepthSearch) -> str:
    """What a quality target's depth search measured and chose, in one line."""
    curve = ", ".join(f"{p.num_remove}: {p.value:.3f}" for p in search.points)
    text = (
        f"target {search.target.describe()}: depth {search.chosen} chosen on "
        f"{search.data.get('kind')} ({search.target.metric} by blocks removed: {curve})"
    )
    for c in search.confirmations:
        value = "n/a" if c["value"] is None else f"{c['value']:.3f}"
        text += f"; evaluation at {c['num_remove']}: {value} ({'met' if c['met'] else 'missed'})"
    return text


def cmd_prune(args: argparse.Namespace) -> int:
    from .errors import QualityGateError
    from .gate import QualityGate
    from .pipeline import PruneConfig, run_pipeline

    gate = QualityGate(
        max_ppl_ratio=args.max_ppl_ratio,
        max_kl=args.max_kl,
        min_top1_agreement=args.min_top1,
        min_task_retention=args.min_task_retention,
    )
    task_dir = _task_dir(args.task_data_dir, "--task-data-dir") if args.tasks else None
    calibration = _require_file(args.calibration, "calibration file")
    evaluation = _require_file(args.eval, "evaluation file") if args.eval else None
    config = PruneConfig(
        method=args.method,
        num_remove=args.remove,
        fraction=args.fraction,
        target_ppl_ratio=args.target_ppl_ratio,
        target_task_retention=args.target_task_retention,
        target_task_items=args.target_task_items,
        num_clusters=args.clusters,
        windows=args.windows,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        eval_windows=args.eval_windows,
        eval_seq_len=args.eval_seq_len,
        holdout_windows=args.holdout_windows,
        score_windows=args.score_windows,
        score_seq_len=args.score_seq_len,
        search_candidates=args.search_candidates,
        compensate=args.compensate,
        compensation_windows=args.compensation_windows,
        compensation_tune_windows=args.compensation_tune_windows,
        heal_steps=args.heal_steps,
        heal_lr=args.heal_lr,
        temperature=args.temperature,
        temperature_windows=args.temperature_windows,
        quality_gate=gate if gate.active else None,
        benchmark=None if args.no_bench else _bench_config(args),
        tasks=tuple(args.tasks),
        task_limit=args.task_limit,
        task_data_dir=task_dir,
        offload=args.offload,
        max_device_memory=args.max_device_memory,
    )
    try:
        out = run_pipeline(
            _model_source(args),
            calibration,
            args.out,
            config,
            evaluation=evaluation,
            progress=_Progress(not args.quiet),
            output_formats=args.output_formats,
            made_by="`lorp " + shlex.join(getattr(args, "command_line", None) or ["prune"]) + "`",
            **_load_options(args),
        )
    except QualityGateError as exc:
        report = args.out / "report.json"
        where = f" (no checkpoint written; see {report})" if report.is_file() else ""
        raise QualityGateError(
            f"{exc}{where}", result=exc.result, report=exc.report, summary=exc.summary
        ) from exc
    res = out.result
    search = res.depth_search
    lines = [] if search is None else [_depth_line(search)]
    lines += [
        f"removed {len(res.removed)} of {res.num_layers_before} blocks: {res.removed} "
        f"(method {res.selection.method}, RLS {res.selection.rls:.3f}"
        + (f", K {res.selection.num_clusters})" if res.selection.num_clusters else ")"),
        f"checkpoint: {out.checkpoint_dir}",
        f"report: {args.out / 'report.json'}, {args.out / 'report.html'}",
    ]
    artifacts = out.report.get("artifacts") or {}
    gguf = artifacts.get("gguf")
    if gguf:
        lines.append(
            f"gguf: {out.checkpoint_dir / gguf['file']} ({gguf['bytes_out']:,} bytes, "
            f"{100 * gguf['size_ratio']:.1f}% of the input's {gguf['bytes_in']:,})"
        )
    lines += [f"note: {note}" for note in artifacts.get("notes") or []]
    if res.quality is not None:
        q = res.quality
        lines.append(
            f"perplexity {q.dense.ppl:.2f} -> {q.pruned.ppl:.2f}, KL {q.kl:.4f}, "
            f"top-1 agreement {q.top1_agreement:.3f} on {(res.evaluation or {}).get('kind', 'n/a')}"
        )
    if res.tasks is not None:
        avg = res.tasks.to_dict()["average"]
        ret = avg["retention"]
        lines.append(
            f"tasks: average accuracy {100 * avg['dense']:.1f}% -> {100 * avg['pruned']:.1f}%, "
            + ("retention n/a" if ret is None else f"retention {100 * ret:.1f}%")
            + f" ({', '.join(res.tasks.dense.tasks)})"
        )
    for flag in res.flags:
        lines.append(f"warning: {flag['message']}")
    if res.gate is not None:
        lines.append(res.gate.message)
    if res.benchmark is not None:
        lines += [_speed_line(w, res.removed) for w in res.benchmark.workloads]
    summary = {"removed": res.removed, "out": str(args.out), "report": out.report}
    _emit(summary, args.json, lines)
    return EXIT_OK


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    from .data import text_windows
    from .quality import perplexity

    text = _require_file(args.text, "text file")
    loaded = _load(args)
    windows = text_windows(loaded.tokenizer, text, args.seq_len, args.windows)
    res = perplexity(
        loaded.model, windows, batch_size=args.batch_size, progress=_Progress(not args.quiet)
    )
    data = {
        "ppl": res.ppl,
        "nll": res.nll,
        "tokens": res.tokens,
        "windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
    }
    _emit(
        data,
        args.json,
        [
            f"perplexity {res.ppl:.3f} over {res.tokens} predicted tokens "
            f"({windows.shape[0]} windows x {windows.shape[1]})"
        ],
    )
    return EXIT_OK


def default_task_dir() -> Path | None:
    """``lorp eval tasks``' default ``--data-dir``: the first of ``../shared/data/tasks`` next
    to the repository and next to the working directory that exists (a CLI convenience: the
    library never looks for task data)."""
    repo = Path(__file__).resolve().parent.parent
    for base in (repo, Path.cwd()):
        candidate = (base.parent / "shared" / "data" / "tasks").resolve()
        if candidate.is_dir():
            return candidate
    return None


def _task_dir(given: Path | None, flag: str = "--data-dir") -> Path:
    if given is not None:
        if not given.is_dir():
            raise InvalidInputError(f"task data directory not found: {given}")
        return given
    found = default_task_dir()
    if found is None:
        raise InvalidInputError(
            f"no task data directory: give {flag}, a folder holding <task>.jsonl files "
            "(none found at ../shared/data/tasks)"
        )
    return found


def _task_lines(data: dict[str, Any], header: str) -> list[str]:
    """Human lines for a :class:`lorp.tasks.TaskScores` / ``TaskComparison`` dict."""
    lines = [header]
    for name, t in data["tasks"].items():
        if "dense" in t:  # a comparison
            d, p = t["dense"], t["pruned"]
            ret = t["retention"]
            lines.append(
                f"{name:>14} {t['metric']:>8}: dense {100 * d['score']:5.1f} "
                f"± {100 * (d['stderr'] or 0):4.1f}  pruned {100 * p['score']:5.1f} "
                f"± {100 * (p['stderr'] or 0):4.1f}  retention "
                + ("n/a" if ret is None else f"{100 * ret:5.1f}%")
                + f"  (n={t['n']})"
            )
        else:
            lines.append(
                f"{name:>14} {t['metric']:>8}: {100 * t['score']:5.1f} "
                f"± {100 * (t['stderr'] or 0):4.1f}  acc {100 * t['acc']:5.1f}  (n={t['n']})"
            )
    avg = data["average"]
    if isinstance(avg, dict):
        ret = avg["retention"]
        lines.append(
            f"{'average':>14}: dense {100 * avg['dense']:5.1f}  pruned {100 * avg['pruned']:5.1f}"
            "  retention " + ("n/a" if ret is None else f"{100 * ret:5.1f}%")
        )
    else:
        lines.append(f"{'average':>14}: {100 * avg:5.1f}")
    return lines


def cmd_eval_tasks(args: argparse.Namespace) -> int:
    from .tasks import compare_tasks, parse_tasks, score_tasks

    tasks = parse_tasks(args.tasks)  # bad names fail before the model is loaded
    data_dir = _task_dir(args.data_dir)
    for name in tasks:
        _require_file(data_dir / f"{name}.jsonl", f"task data for {name}")
    loaded = _load(args)
    common: dict[str, Any] = {
        "data_dir": data_dir,
        "limit": args.limit,
        "batch_size": args.batch_size,
        "progress": _Progress(not args.quiet),
    }
    if args.remove_layers:
        comparison = compare_tasks(
            loaded.model, loaded.tokenizer, args.remove_layers, tasks, **common
        )
        data = comparison.to_dict()
        header = f"tasks, dense vs blocks {comparison.removed} removed (headline metric, %)"
    else:
        scores = score_tasks(loaded.model, loaded.tokenizer, tasks, **common)
        data = scores.to_dict()
        header = f"tasks ({scores.seconds:.1f} s; headline metric, %)"
    data = {"model": args.model, "data_dir": str(data_dir), **data}
    _emit(data, args.json, _task_lines(data, header))
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import benchmark

    loaded = _load(args)
    result = benchmark(
        loaded.model, args.remove_layers, _bench_config(args), progress=_Progress(not args.quiet)
    )
    data = result.to_dict()
    lines = [
        f"removed blocks {result.removed} of {result.num_layers}; "
        f"{result.total_time_s:.1f} s of a {result.budget['budget_s']:.0f} s budget"
    ]
    lines += [_speed_line(w, result.removed) for w in result.workloads]
    lines += [f"note: {n}" for n in result.notes]
    _emit(data, args.json, lines)
    return EXIT_OK


# ----------------------------------------------------------------------------- parser
def _method_help(methods: Sequence[MethodInfo]) -> str:
    """``--method`` help from the registry: every method's name and description."""
    parts = []
    for m in methods:
        text = f"{m.name}: {m.description}"
        if m.fold is not None:
            flags = [
                flag
                for flag, on in (
                    ("--compensate", m.fold.compensate),
                    ("--temperature", m.fold.temperature),
                )
                if on
            ]
            text += f" (the same as --method {' '.join([m.fold.of, *flags])})"
        parts.append(text)
    return "; ".join(parts).replace("%", "%%")  # argparse formats help with %


def _scoring_help(methods: Sequence[MethodInfo], which: int, what: str) -> str:
    """Help of --score-windows (``which`` 0) / --score-seq-len (1): the methods that run the
    model and their defaults."""
    defaults: dict[int, list[str]] = {}
    for m in methods:
        defaults.setdefault(m.scoring_shape[which], []).append(m.name)
    listed = "; ".join(f"{value} for {', '.join(names)}" for value, names in defaults.items())
    return f"{what} (default: {listed})"


def build_parser() -> argparse.ArgumentParser:
    s_only = [m for m in all_methods() if not m.needs_model and m.fold is None]
    searching = [m for m in all_methods() if m.needs_model and m.fold is None]
    parser = _Parser(prog="lorp", description="Training-free depth pruning of LLMs (LoRP).")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--quiet", action="store_true", help="no progress on stderr")

    p = sub.add_parser("similarity", help="capture the block-input similarity matrix S")
    _model_args(p)
    p.add_argument("--calibration", type=Path, required=True, help="UTF-8 calibration text")
    p.add_argument(
        "--windows", type=_positive_int, default=32, help="calibration windows (default 32)"
    )
    p.add_argument(
        "--seq-len", type=_positive_int, default=512, help="tokens per window (default 512)"
    )
    p.add_argument("--batch-size", type=_positive_int, default=1)
    p.add_argument("--out", type=Path, required=True, help="where to write S (.npy)")
    common(p)
    p.set_defaults(func=cmd_similarity)

    p = sub.add_parser("select", help="choose blocks to remove from a similarity matrix")
    p.add_argument(
        "--similarity", type=Path, required=True, help="S as .npy (from `lorp similarity`)"
    )
    p.add_argument(
        "--remove", type=_budget, required=True, help="blocks to remove: a count or a fraction"
    )
    p.add_argument(
        "--method",
        default="lorp",
        choices=[m.name for m in s_only],
        help=_method_help(s_only),
    )
    p.add_argument(
        "--clusters",
        type=_positive_int,
        help="force the number of phases K "
        f"({', '.join(m.name for m in s_only if m.takes_clusters)})",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("prune", help="select, remove and save; measure quality and speed")
    _model_args(p)
    p.add_argument("--calibration", type=Path, required=True, help="UTF-8 calibration text")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--remove", type=_positive_int, help="number of blocks to remove")
    budget.add_argument("--fraction", type=_fraction, help="fraction of blocks to remove")
    budget.add_argument(
        "--target-ppl-ratio",
        type=_nonneg_float,
        help="remove as many blocks as keep the perplexity ratio pruned/dense at most this "
        "(> 1): the depth is searched on held-out calibration windows (--holdout-windows) and "
        "confirmed on --eval",
    )
    budget.add_argument(
        "--target-task-retention",
        type=_nonneg_float,
        help="remove as many blocks as keep the average task retention at least this (0..1]; "
        "needs --tasks; searched on --target-task-items items after the first --task-limit",
    )
    p.add_argument(
        "--target-task-items",
        type=_positive_int,
        default=50,
        help="with --target-task-retention: items of each task every searched depth is "
        "scored on (50)",
    )
    p.add_argument(
        "--method",
        default="lorp",
        choices=method_names(),
        help=_method_help(all_methods()),
    )
    p.add_argument(
        "--clusters",
        type=_positive_int,
        help=f"force the number of phases K ({', '.join(method_names(takes_clusters=True))})",
    )
    p.add_argument("--windows", type=_positive_int, default=32)
    p.add_argument("--seq-len", type=_positive_int, default=512)
    p.add_argument("--batch-size", type=_positive_int, default=1)
    p.add_argument(
        "--score-windows",
        type=_positive_int,
        default=None,
        help=_scoring_help(
            searching,
            0,
            f"scoring windows for {'/'.join(m.name for m in searching)}, after the "
            "calibration windows",
        ),
    )
    p.add_argument(
        "--score-seq-len",
        type=_positive_int,
        default=None,
        help=_scoring_help(searching, 1, "scoring window length"),
    )
    p.add_argument(
        "--search-candidates",
        type=_positive_int,
        default=3,
        help="lorp-kl: candidates measured per removal slot (3)",
    )
    p.add_argument(
        "--compensate",
        action="store_true",
        help="fold a least-squares linear stand-in for each removed run of blocks into the "
        "block before it (Llama/Qwen-style blocks; not Gemma 2/3, GPT-2)",
    )
    p.add_argument(
        "--compensation-windows",
        type=_positive_int,
        default=12,
        help="with --compensate: calibration windows the maps are fitted on (12)",
    )
    p.add_argument(
        "--compensation-tune-windows",
        type=_nonneg_int,
        default=2,
        help="with --compensate: the calibration windows after the fit windows on which the "
        "strength of the fold is chosen by loss (2; 0: fold the maps as fitted)",
    )
    p.add_argument(
        "--heal-steps",
        type=_nonneg_int,
        default=0,
        help="with --compensate (lorp-fold): then train the folded maps alone for at most N "
        "steps to match the dense model's logits on the fit windows, stopping early on the "
        "tune windows (0: off)",
    )
    p.add_argument(
        "--heal-lr",
        type=float,
        default=HEAL_LR,
        help=f"with --heal-steps: Adam's learning rate on the maps ({HEAL_LR:g})",
    )
    p.add_argument(
        "--temperature",
        action="store_true",
        help="fit the pruned model's logit scale on calibration windows and fold it into the "
        "final norm",
    )
    p.add_argument(
        "--temperature-windows",
        type=_positive_int,
        default=4,
        help="with --temperature: the last calibration windows it is fitted on (4)",
    )
    p.add_argument("--eval", type=Path, help="held-out text for dense vs pruned quality")
    p.add_argument("--eval-windows", type=_positive_int, default=64)
    p.add_argument("--eval-seq-len", type=_positive_int, default=512)
    p.add_argument(
        "--holdout-windows",
        type=_nonneg_int,
        default=8,
        help="without --eval: calibration-text windows held out for quality (8)",
    )
    p.add_argument(
        "--max-ppl-ratio",
        type=_nonneg_float,
        help="quality gate: refuse (no checkpoint) if pruned/dense perplexity exceeds this",
    )
    p.add_argument(
        "--max-kl", type=_nonneg_float, help="quality gate: refuse if mean KL (nats) exceeds this"
    )
    p.add_argument(
        "--min-top1",
        type=_nonneg_float,
        help="quality gate: refuse if top-1 agreement with the dense model is below this (0..1)",
    )
    p.add_argument(
        "--tasks",
        type=_task_names,
        default=[],
        help="also score dense vs pruned zero-shot accuracy on these downstream tasks "
        "(comma-separated: hellaswag, piqa, arc_easy, arc_challenge, winogrande, boolq, or all)",
    )
    p.add_argument(
        "--task-limit",
        type=_positive_int,
        default=200,
        help="with --tasks: the first N items of each task (200)",
    )
    p.add_argument(
        "--task-data-dir",
        type=Path,
        default=None,
        help="with --tasks: folder of <task>.jsonl files (default: ../shared/data/tasks next to "
        "the repository or the working directory)",
    )
    p.add_argument(
        "--min-task-retention",
        type=_nonneg_float,
        help="quality gate: refuse if the average task retention (pruned / dense accuracy) is "
        "below this (0..1; needs --tasks)",
    )
    p.add_argument(
        "--offload",
        default="auto",
        choices=["none", "sequential", "auto"],
        help="models larger than the device: sequential keeps the weights in host memory (a "
        "safetensors checkpoint without --compensate: on disk) and runs one block at a time on "
        "the device (no benchmark); auto (default): sequential when the weights + a working "
        "margin exceed the device's free memory or --max-device-memory; none: the whole model "
        "on the device",
    )
    p.add_argument(
        "--max-device-memory",
        type=_positive_int,
        default=None,
        help="bytes the prune may use on the device (--offload auto; the only limit on CPU)",
    )
    p.add_argument("--no-bench", action="store_true", help="skip the speed/memory benchmark")
    _bench_args(p)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument(
        "--output-format",
        dest="output_formats",
        action="extend",
        type=_output_formats,
        default=None,
        help="what out/model/ holds: gguf (a GGUF input pruned by file surgery, its "
        "quantization kept) and/or safetensors; repeat or give a comma list (default: the "
        "input's format)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    common(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("eval", help="evaluate a model")
    esub = p.add_subparsers(dest="what", required=True, metavar="WHAT", parser_class=_Parser)
    pe = esub.add_parser("ppl", help="perplexity on a text file (non-overlapping windows)")
    _model_args(pe)
    pe.add_argument("--text", type=Path, required=True)
    pe.add_argument("--seq-len", type=_positive_int, default=512)
    pe.add_argument(
        "--windows", type=_positive_int, default=None, help="first N windows (default: all)"
    )
    pe.add_argument("--batch-size", type=_positive_int, default=1)
    pe.add_argument("--json", action="store_true")
    common(pe)
    pe.set_defaults(func=cmd_eval_ppl)
    pt = esub.add_parser(
        "tasks",
        help="zero-shot accuracy on downstream tasks, scored as lm-evaluation-harness does",
    )
    _model_args(pt)
    pt.add_argument(
        "--tasks",
        default=None,
        help="comma-separated task names or 'all' (default: all of hellaswag, piqa, arc_easy, "
        "arc_challenge, winogrande, boolq)",
    )
    pt.add_argument(
        "--limit", type=_positive_int, default=None, help="first N items per task (default: all)"
    )
    pt.add_argument("--batch-size", type=_positive_int, default=16, help="sequences per pass (16)")
    pt.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder of <task>.jsonl files (default: ../shared/data/tasks next to the "
        "repository or the working directory, the first that exists)",
    )
    pt.add_argument(
        "--remove-layers",
        type=_layer_list,
        default=None,
        help="also score the model with these blocks removed (e.g. 3,7,9) and print retention",
    )
    pt.add_argument("--json", action="store_true", help="print one JSON object")
    common(pt)
    pt.set_defaults(func=cmd_eval_tasks)

    p = sub.add_parser("bench", help="time original vs pruned without saving a checkpoint")
    _model_args(p)
    p.add_argument("--remove-layers", type=_layer_list, required=True, help="e.g. 3,7,9")
    _bench_args(p)
    p.add_argument("--json", action="store_true")
    common(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = list(sys.argv[1:] if argv is None else argv)  # for the model card
    if getattr(args, "quiet", False) or getattr(args, "json", False):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        return int(args.func(args))
    except LorpError as exc:
        print(f"lorp: error: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, InvalidInputError) else EXIT_FAILURE
    except KeyboardInterrupt:
        print("lorp: interrupted", file=sys.stderr)
        return 130
    except (OSError, MemoryError) as exc:
        print(f"lorp: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
