"""The pruning report: a versioned, machine-readable ``report.json`` and a human report.

:func:`build_report` assembles the JSON document (documented by
``lorp/schemas/report.schema.json``, JSON Schema draft 2020-12). :func:`write_reports` writes it
with the similarity matrix (``similarity.npy``), a heatmap of S with the phases and the removed
blocks marked (``heatmap.png``), a speedup bar chart (``speedup.png``, when there is a
benchmark), ``report.html`` (self-contained: the images are embedded, so the file can be
downloaded and opened alone) and its Markdown twin ``report.md`` (images referenced relatively).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .bench import BenchmarkResult, environment_info
from .errors import InvalidInputError, SimilarityMatrixError
from .methods import find_method, generic_explain

REPORT_SCHEMA_VERSION = "1.0"
SCHEMA_PATH = Path(__file__).parent / "schemas" / "report.schema.json"


def method_label(method: str) -> str:
    """The name the report prints for ``method`` (the registry's label; else the name itself)."""
    info = find_method(method)
    return method if info is None else info.label


# --------------------------------------------------------------------------------------------
# Building the JSON document


def json_safe(value: Any) -> Any:
    """Plain JSON types only; non-finite floats become None."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return f if math.isfinite(f) else None
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _check_similarity(similarity: Any) -> np.ndarray:
    try:
        s = np.asarray(similarity, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SimilarityMatrixError(f"similarity matrix is not numeric: {exc}") from exc
    if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] < 1:
        raise SimilarityMatrixError(f"similarity matrix must be square, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise SimilarityMatrixError("similarity matrix has NaN or infinite entries")
    return s


def _phases(labels: Sequence[int] | None, removed: Sequence[int]) -> list[dict[str, Any]]:
    if labels is None:
        return []
    gone = set(removed)
    out = []
    for phase in sorted(set(labels)):
        layers = [i for i, c in enumerate(labels) if c == phase]
        out.append(
            {
                "phase": int(phase),
                "layers": layers,
                "removed": [i for i in layers if i in gone],
            }
        )
    return out


def explain(sel: Mapping[str, Any]) -> str:
    """The report's prose for a selection dict: its method's ``explain`` in the registry
    (:mod:`lorp.methods`); a method the registry does not know gets a plain summary."""
    method = str(sel.get("method", ""))
    info = find_method(method)
    if info is None:
        return generic_explain(sel, method)
    return info.explain(sel)


def _selection_dict(selection: Any) -> dict[str, Any]:
    data = selection.to_dict() if hasattr(selection, "to_dict") else selection
    if not isinstance(data, Mapping):
        raise InvalidInputError("selection must be a lorp.selection.Selection or its dict")
    for key in ("method", "num_layers", "removed"):
        if key not in data:
            raise InvalidInputError(f"selection is missing {key!r}")
    out = dict(json_safe(data))
    out["removed"] = sorted(int(i) for i in out["removed"])
    n = int(out["num_layers"])
    out.setdefault("num_removed", len(out["removed"]))
    out.setdefault("kept", [i for i in range(n) if i not in set(out["removed"])])
    out.setdefault("rls", None)
    out.setdefault("num_clusters", None)
    out.setdefault("labels", None)
    out["phases"] = _phases(out["labels"], out["removed"])
    out["explanation"] = explain(out)
    return out


def _benchmark_dict(benchmark: BenchmarkResult | Mapping[str, Any] | None) -> dict | None:
    if benchmark is None:
        return None
    data = benchmark.to_dict() if isinstance(benchmark, BenchmarkResult) else benchmark
    return dict(json_safe(data))


def _speed_summary(bench: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    if bench is None:
        return []
    out = []
    for w in bench.get("workloads", []):
        out.append(
            {
                "name": w["name"],
                "kind": w["kind"],
                "batch": w["batch"],
                "prompt_len": w["prompt_len"],
                "new_tokens": w.get("new_tokens"),
                "original_median_s": w["original"]["median_s"],
                "pruned_median_s": w["pruned"]["median_s"],
                "original_tokens_per_s": w["original"].get("tokens_per_s"),
                "pruned_tokens_per_s": w["pruned"].get("tokens_per_s"),
                "speedup": w.get("speedup"),
                "ideal_speedup": w.get("ideal_speedup"),
                "measured_over_ideal": w.get("measured_over_ideal"),
            }
        )
    return out


def _memory_summary(bench: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if bench is None:
        return None
    weights = bench.get("weights", {})
    per_workload = {}
    for w in bench.get("workloads", []):
        per_workload[w["name"]] = {
            "original": w["original"].get("memory", {}),
            "pruned": w["pruned"].get("memory", {}),
        }
    return {
        "weights_original_bytes": weights.get("original_bytes"),
        "weights_pruned_bytes": weights.get("pruned_bytes"),
        "weights_saved_bytes": weights.get("saved_bytes"),
        "weights_saved_fraction": weights.get("saved_fraction"),
        "method": bench.get("memory_method"),
        "per_workload": per_workload,
    }


def _quality_summary(quality: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not quality:
        return None
    dense = quality.get("dense") or {}
    pruned = quality.get("pruned") or {}
    d, p = dense.get("ppl"), pruned.get("ppl")
    if not isinstance(d, (int, float)) or not isinstance(p, (int, float)) or d <= 0:
        return None
    return {"ppl_dense": d, "ppl_pruned": p, "ppl_ratio": p / d, "ppl_change": p / d - 1}


def build_report(
    *,
    model: Mapping[str, Any],
    budget: Mapping[str, Any],
    selection: Any,
    similarity: Any,
    timings: Mapping[str, float],
    benchmark: BenchmarkResult | Mapping[str, Any] | None = None,
    quality: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report.json document (schema ``lorp/schemas/report.schema.json``, version
    :data:`REPORT_SCHEMA_VERSION`).

    ``selection`` is a :class:`lorp.selection.Selection` or its ``to_dict()``; ``quality`` is
    open-ended but, when perplexity was measured, holds ``dense``/``pruned`` dicts with ``ppl``
    (and ``tokens``), plus e.g. ``dataset``, ``kl``, ``top1_agreement``.
    """
    s = _check_similarity(similarity)
    sel = _selection_dict(selection)
    if s.shape[0] != sel["num_layers"]:
        raise SimilarityMatrixError(
            f"similarity matrix is {s.shape[0]}x{s.shape[0]} but the selection is over "
            f"{sel['num_layers']} layers"
        )
    bench = _benchmark_dict(benchmark)
    qual = None if quality is None else dict(json_safe(quality))
    n = s.shape[0]
    off = s[~np.eye(n, dtype=bool)]
    env = (
        dict(bench["environment"])
        if bench is not None and isinstance(bench.get("environment"), dict)
        else environment_info(model.get("device") if isinstance(model.get("device"), str) else None)
    )
    env["device"] = (bench or {}).get("device") or model.get("device")
    env["dtype"] = (bench or {}).get("dtype") or model.get("dtype")
    speed = _speed_summary(bench)
    memory = _memory_summary(bench)
    quality_summary = _quality_summary(qual)
    summary = {
        "method": sel["method"],
        "num_layers": sel["num_layers"],
        "removed": sel["removed"],
        "kept_layers": sel["num_layers"] - len(sel["removed"]),
        "rls": sel.get("rls"),
        "num_clusters": sel.get("num_clusters"),
        "speedups": {w["name"]: w["speedup"] for w in speed},
        "weights_saved_bytes": None if memory is None else memory["weights_saved_bytes"],
        "weights_saved_fraction": None if memory is None else memory["weights_saved_fraction"],
        "ppl_dense": None if quality_summary is None else quality_summary["ppl_dense"],
        "ppl_pruned": None if quality_summary is None else quality_summary["ppl_pruned"],
        "ppl_ratio": None if quality_summary is None else quality_summary["ppl_ratio"],
    }
    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "summary": summary,
        "model": dict(model),
        "budget": dict(budget),
        "method": sel["method"],
        "selection": sel,
        "similarity": {
            "num_layers": n,
            "mean_off_diagonal": float(off.mean()) if off.size else None,
            "min": float(s.min()),
            "max": float(s.max()),
            "matrix": s.tolist(),
        },
        "timings_s": {str(k): float(v) for k, v in timings.items()},
        "speed": speed,
        "memory": memory,
        "quality": qual,
        "benchmark": bench,
        "environment": env,
        "extra": None if extra is None else dict(extra),
    }
    return dict(json_safe(report))


def load_schema() -> dict[str, Any]:
    """The report's JSON Schema (draft 2020-12)."""
    schema: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return schema


# --------------------------------------------------------------------------------------------
# Plots


def _phase_colors(k: int) -> list[Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return [cmap(i % 10) for i in range(max(k, 1))]


def plot_heatmap(report: Mapping[str, Any], similarity: Any, path: Path) -> Path:
    """Heatmap of S; phase strips along both axes, phase boundaries, removed blocks marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    s = _check_similarity(similarity)
    n = s.shape[0]
    sel = report["selection"]
    removed = list(sel.get("removed") or [])
    labels = sel.get("labels")
    side = min(10.0, max(5.5, 0.2 * n + 3.0))  # inches of the square heatmap
    left_in, right_in, bottom_in, top_in = 1.3, 1.5, 1.5, 1.1
    width, height = left_in + side + right_in, bottom_in + side + top_in
    fig = plt.figure(figsize=(width, height))

    def box(x: float, y: float, w: float, h: float) -> tuple[float, float, float, float]:
        return (x / width, y / height, w / width, h / height)

    # the heatmap, a phase strip above it and one left of it, and the colorbar
    ax = fig.add_axes(box(left_in, bottom_in, side, side))
    top = fig.add_axes(box(left_in, bottom_in + side + 0.08, side, 0.25))
    left = fig.add_axes(box(left_in - 0.33 - 0.5, bottom_in, 0.25, side))
    cax = fig.add_axes(box(left_in + side + 0.25, bottom_in, 0.25, side))
    im = ax.imshow(s, cmap="viridis", vmin=float(s.min()), vmax=1.0, interpolation="nearest")
    fig.colorbar(im, cax=cax, label="mean per-token cosine of block inputs")

    handles: list[Any] = []
    if labels is not None and len(labels) == n:
        k = max(labels) + 1
        colors = _phase_colors(k)
        cmap = ListedColormap(colors[:k])
        strip = np.asarray(labels, dtype=float)[None, :]
        top.imshow(strip, cmap=cmap, vmin=-0.5, vmax=k - 0.5, aspect="auto")
        left.imshow(strip.T, cmap=cmap, vmin=-0.5, vmax=k - 0.5, aspect="auto")
        for i in range(1, n):
            if labels[i] != labels[i - 1]:
                ax.axvline(i - 0.5, color="white", lw=1.2, ls="--", alpha=0.9)
                ax.axhline(i - 0.5, color="white", lw=1.2, ls="--", alpha=0.9)
        for c in range(k):
            members = [i for i, lab in enumerate(labels) if lab == c]
            handles.append(Patch(color=colors[c], label=f"phase {c}: {_ranges(members)}"))
        handles.append(Line2D([], [], color="0.35", ls="--", label="phase boundary"))
    else:
        top.set_facecolor("0.9")
        left.set_facecolor("0.9")
    for i in removed:
        ax.add_patch(
            matplotlib.patches.Rectangle(
                (i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=2.0
            )
        )
        ax.plot([i], [i], marker="x", color="red", ms=7, mew=2)
        top.plot([i], [0], marker="v", color="red", ms=8, mec="black", mew=0.6)
        left.plot([0], [i], marker=">", color="red", ms=8, mec="black", mew=0.6)
    if removed:
        handles.append(
            Line2D(
                [],
                [],
                color="red",
                marker="x",
                ls="",
                ms=8,
                mew=2,
                label=f"removed ({len(removed)}): {', '.join(map(str, removed))}",
            )
        )
    step = 1 if n <= 32 else 2 if n <= 64 else 5
    ticks = list(range(0, n, step))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.tick_params(axis="x", labelrotation=90, labelsize=8)
    ax.tick_params(axis="y", labelsize=8)
    for tick_labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        for t in tick_labels:
            if t.get_text().lstrip("−-").isdigit() and int(t.get_text()) in set(removed):
                t.set_color("red")
                t.set_fontweight("bold")
    ax.set_xlabel("block j (input of)")
    ax.set_ylabel("block i (input of)")
    for strip_ax in (top, left):
        strip_ax.set_xticks([])
        strip_ax.set_yticks([])
    top.set_xlim(-0.5, n - 0.5)
    left.set_ylim(n - 0.5, -0.5)
    top.set_title("phase", fontsize=8, loc="left", pad=2)
    rls = sel.get("rls")
    k_text = sel.get("num_clusters")
    method = method_label(str(sel.get("method")))
    model_name = str(
        report.get("model", {}).get("name") or report.get("model", {}).get("source") or ""
    )
    title = f"Similarity of block inputs{f' — {Path(model_name).name}' if model_name else ''}\n"
    title += (
        f"{method} · RLS = {'n/a' if rls is None else f'{rls:.3f}'} · "
        f"K = {'n/a' if k_text is None else k_text} · removed {len(removed)} of {n} blocks"
    )
    fig.suptitle(title, fontsize=12, y=1 - 0.15 / height, va="top")
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=2,
        fontsize=9,
        frameon=True,
        bbox_to_anchor=((left_in + side / 2) / width, 0.05 / height),
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ranges(members: Sequence[int]) -> str:
    """[0,1,2,5,7,8] -> '0–2, 5, 7–8'."""
    runs: list[list[int]] = []
    for m in members:
        if runs and m == runs[-1][-1] + 1:
            runs[-1].append(m)
        else:
            runs.append([m])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}–{r[-1]}" for r in runs)


def plot_speedup(report: Mapping[str, Any], path: Path) -> Path | None:
    """Bars per workload: measured speedup (with the spread) next to the ideal speedup."""
    speed = report.get("speed") or []
    if not speed:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bench = report.get("benchmark") or {}
    workloads = {w["name"]: w for w in bench.get("workloads", [])}
    names = [w["name"] for w in speed]
    measured = [w["speedup"] or 0.0 for w in speed]
    ideal = [w["ideal_speedup"] for w in speed]
    lo, hi = [], []
    for w, m in zip(speed, measured, strict=True):
        full = workloads.get(w["name"])
        if full is None:
            lo.append(0.0)
            hi.append(0.0)
            continue
        o, p = full["original"], full["pruned"]
        # conservative band: slow-original/fast-pruned quartiles
        low = o["p25_s"] / p["p75_s"] if p["p75_s"] else m
        high = o["p75_s"] / p["p25_s"] if p["p25_s"] else m
        lo.append(max(0.0, m - low))
        hi.append(max(0.0, high - m))
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(5.5, 1.9 * len(names) + 2), 4.2))
    width = 0.38
    ax.bar(
        x - width / 2,
        measured,
        width,
        yerr=[lo, hi],
        capsize=4,
        color="#2b7bba",
        label="measured (median; whiskers: quartile band)",
    )
    ideal_vals = [v if v is not None else 0.0 for v in ideal]
    ax.bar(x + width / 2, ideal_vals, width, color="#b0b0b0", label="ideal (block times)")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(
        [
            f"{name}\n{m:.2f}× (ideal {'n/a' if i is None else f'{i:.2f}×'})"
            for name, m, i in zip(names, measured, ideal, strict=True)
        ],
        fontsize=9,
    )
    ax.set_ylabel("speedup (original time / pruned time)")
    top_val = max([*(m + h for m, h in zip(measured, hi, strict=True)), *ideal_vals, 1.0])
    ax.set_ylim(0, top_val * 1.22)
    sel = report.get("selection", {})
    ax.set_title(
        f"Pruned vs original: {len(sel.get('removed') or [])} of {sel.get('num_layers')} "
        f"blocks removed ({bench.get('device', '?')}, {bench.get('dtype', '?')})",
        fontsize=11,
    )
    ax.legend(fontsize=8, loc="upper right", ncol=2, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Human report


def _mb(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "n/a"
    return f"{value / 1e6:,.1f} MB"


def _num(value: Any, fmt: str = ".3f") -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "n/a"
    return format(value, fmt)


def _headline(report: Mapping[str, Any]) -> list[str]:
    """The ten-second summary, one short fact a line (plain text)."""
    summ = report["summary"]
    sel = report["selection"]
    n = summ["num_layers"]
    removed = summ["removed"]
    method = method_label(summ["method"])
    lines = [
        f"Removed {len(removed)} of {n} blocks ({', '.join(map(str, removed)) or 'none'}) "
        f"with {method}; {summ['kept_layers']} blocks remain."
    ]
    gate = summ.get("quality_gate")
    if summ.get("status") == "refused":
        lines[0] = (
            f"REFUSED by the quality gate: no checkpoint was written. Selected {len(removed)} "
            f"of {n} blocks ({', '.join(map(str, removed)) or 'none'}) with {method}."
        )
        lines += [f"Gate: {v}." for v in (gate or {}).get("violations", [])]
    elif gate:
        lines.append(f"Quality gate passed (limits {gate.get('limits')}).")
    speed = report.get("speed") or []
    if speed:
        parts = []
        for w in speed:
            ideal = w.get("ideal_speedup")
            ideal_text = f" (ideal {ideal:.2f}×)" if isinstance(ideal, (int, float)) else ""
            parts.append(f"{w['name']} {_num(w['speedup'], '.2f')}×{ideal_text}")
        lines.append("Speedup: " + "; ".join(parts) + ".")
    else:
        lines.append("Speed: not measured.")
    mem = report.get("memory")
    if mem and mem.get("weights_saved_bytes") is not None:
        lines.append(
            f"Weights: {_mb(mem['weights_original_bytes'])} → {_mb(mem['weights_pruned_bytes'])} "
            f"(−{_mb(mem['weights_saved_bytes'])}, −{100 * mem['weights_saved_fraction']:.1f}%)."
        )
    if summ.get("ppl_dense") is not None:
        change = 100 * (summ["ppl_ratio"] - 1)
        dataset = (report.get("quality") or {}).get("dataset", "the evaluation text")
        lines.append(
            f"Perplexity: {summ['ppl_dense']:.2f} → {summ['ppl_pruned']:.2f} "
            f"({change:+.1f}%) on {dataset}."
        )
        if summ.get("kl") is not None and summ.get("top1_agreement") is not None:
            lines.append(
                f"Next-token agreement with the original: top-1 "
                f"{100 * summ['top1_agreement']:.1f}%, mean KL {summ['kl']:.3f} nats/token."
            )
    else:
        lines.append("Quality: not measured (no evaluation text).")
    lines += [f"Warning: {flag}." for flag in summ.get("flags") or []]
    if sel.get("rls") is not None:
        lines.append(
            f"RLS = {sel['rls']:.3f}"
            + (f", K = {sel['num_clusters']} phases." if sel.get("num_clusters") else ".")
        )
    return lines


def _tables(report: Mapping[str, Any]) -> list[tuple[str, list[str], list[list[str]], str]]:
    """(title, header, rows, note) of every table, as plain text cells."""
    tables: list[tuple[str, list[str], list[list[str]], str]] = []
    sel = report["selection"]
    if sel.get("phases"):
        rows = [
            [str(p["phase"]), _ranges(p["layers"]), ", ".join(map(str, p["removed"])) or "—"]
            for p in sel["phases"]
        ]
        tables.append(("Phases", ["phase", "blocks", "removed"], rows, ""))
    speed = report.get("speed") or []
    bench = report.get("benchmark") or {}
    full = {w["name"]: w for w in bench.get("workloads", [])}
    if speed:
        rows = []
        for w in speed:
            f = full.get(w["name"], {})
            unit_o = f.get("original", {})
            unit_p = f.get("pruned", {})
            spread_o = f"{_num(unit_o.get('p10_s'), '.4f')}–{_num(unit_o.get('p90_s'), '.4f')}"
            spread_p = f"{_num(unit_p.get('p10_s'), '.4f')}–{_num(unit_p.get('p90_s'), '.4f')}"
            rows.append(
                [
                    w["name"],
                    f"{_num(w['original_median_s'], '.4f')} ({spread_o})",
                    f"{_num(w['pruned_median_s'], '.4f')} ({spread_p})",
                    f"{_num(w['original_tokens_per_s'], ',.1f')} → "
                    f"{_num(w['pruned_tokens_per_s'], ',.1f')}",
                    f"{_num(w['speedup'], '.3f')}×",
                    f"{_num(w['ideal_speedup'], '.3f')}×",
                    _num(w["measured_over_ideal"], ".3f"),
                ]
            )
        reps = (bench.get("config") or {}).get("repetitions")
        tables.append(
            (
                "Speed",
                [
                    "workload",
                    "original s (p10–p90)",
                    "pruned s (p10–p90)",
                    "tokens/s",
                    "speedup",
                    "ideal",
                    "measured/ideal",
                ],
                rows,
                f"Median of {reps} alternated repetitions per model; prefill = time to first "
                "token, decode = time of the greedy steps with the KV cache.",
            )
        )
    mem = report.get("memory")
    if mem:
        rows = [["weights", _mb(mem["weights_original_bytes"]), _mb(mem["weights_pruned_bytes"])]]
        for name, pair in (mem.get("per_workload") or {}).items():
            o, p = pair["original"], pair["pruned"]
            rows.append(
                [f"{name}: KV cache", _mb(o.get("kv_cache_bytes")), _mb(p.get("kv_cache_bytes"))]
            )
            if "estimated_peak_bytes" in o:
                rows.append(
                    [
                        f"{name}: weights + peak working memory",
                        _mb(o.get("estimated_peak_bytes")),
                        _mb(p.get("estimated_peak_bytes")),
                    ]
                )
                rows.append(
                    [
                        f"{name}: process peak RSS",
                        _mb(o.get("peak_rss_bytes")),
                        _mb(p.get("peak_rss_bytes")),
                    ]
                )
            if "max_memory_allocated_bytes" in o:
                rows.append(
                    [
                        f"{name}: CUDA max allocated",
                        _mb(o.get("max_memory_allocated_bytes")),
                        _mb(p.get("max_memory_allocated_bytes")),
                    ]
                )
                rows.append(
                    [
                        f"{name}: CUDA max reserved",
                        _mb(o.get("max_memory_reserved_bytes")),
                        _mb(p.get("max_memory_reserved_bytes")),
                    ]
                )
        note = str((mem.get("method") or {}).get("description") or "")
        tables.append(("Memory", ["", "original", "pruned"], rows, note))
    qual = report.get("quality")
    if qual:
        rows = []
        dense, pruned = qual.get("dense") or {}, qual.get("pruned") or {}
        for key in sorted(set(dense) | set(pruned)):
            rows.append([key, _fmt_any(dense.get(key)), _fmt_any(pruned.get(key))])
        for key in ("kl", "top1_agreement", "ppl_ratio"):
            if key in qual:
                rows.append([key, "", _fmt_any(qual[key])])
        note = f"Evaluation text: {qual.get('dataset', 'n/a')}"
        if qual.get("kind"):
            note += f" ({qual['kind']}, {qual.get('windows')} x {qual.get('seq_len')} tokens)"
        tables.append(("Quality", ["metric", "original", "pruned"], rows, note))
    cands = (sel.get("details") or {}).get("candidates")
    if sel.get("method") == "auto" and isinstance(cands, list):
        rows = [
            [
                str(c.get("name")) + (" (chosen)" if c.get("chosen") else ""),
                ", ".join(map(str, c.get("removed") or [])),
                _num(c.get("kl"), ".4f"),
                _num(c.get("ppl"), ".2f"),
                _num(c.get("top1_agreement"), ".3f"),
                _fmt_any(c.get("windows")) + (" (dropped)" if c.get("eliminated") else ""),
                _num((c.get("select_s") or 0) + (c.get("score_s") or 0), ".1f"),
            ]
            for c in cands
            if isinstance(c, Mapping)
        ]
        details = sel.get("details") or {}
        scoring = details.get("scoring") or {}
        objective = "KL(original || pruned)" if details.get("objective") == "kl" else "loss (ppl)"
        race = details.get("race") or {}
        tables.append(
            (
                "Candidates (auto)",
                ["candidate", "removed", "KL", "ppl", "top-1", "windows", "seconds"],
                rows,
                f"Scored on up to {scoring.get('windows')} x {scoring.get('seq_len')} tokens of "
                "calibration text held out from the calibration windows (not the evaluation "
                f"text); candidates more than {race.get('margin')} nats behind the best on the "
                f"first {race.get('first_windows')} windows were dropped there, the lowest "
                f"{objective} of the others wins.",
            )
        )
    comp = (report.get("extra") or {}).get("compensation")
    if isinstance(comp, Mapping) and comp.get("runs"):
        rows = [
            [
                ", ".join(map(str, r.get("run") or [])),
                "–" if r.get("block") is None else str(r.get("block")),
                r.get("skipped") or _num(r.get("relative_residual"), ".3f"),
            ]
            for r in comp["runs"]
            if isinstance(r, Mapping)
        ]
        tables.append(
            (
                "Compensation",
                ["removed run", "folded into block", "relative error (1 = plain removal)"],
                rows,
                "A least-squares linear stand-in for each removed run, folded into the down "
                f"projection of the block before it; fitted on {_fmt_any(comp.get('tokens'))} "
                f"calibration tokens (ridge {comp.get('ridge')}), folded at strength "
                f"{comp.get('strength', 1.0)} (share of the fitted correction). The quality "
                "above is the compensated model's.",
            )
        )
        tuning = comp.get("tuning")
        if isinstance(tuning, Mapping) and tuning.get("measured"):
            tables.append(
                (
                    "Compensation strength",
                    [
                        "strength",
                        "calibration NLL (nats per token)",
                        "standard error vs the lowest",
                    ],
                    [
                        [
                            _num(row.get("strength"), ".3f"),
                            _num(row.get("nll"), ".4f"),
                            _num(row.get("se_vs_lowest"), ".4f"),
                        ]
                        for row in tuning["measured"]
                        if isinstance(row, Mapping)
                    ],
                    f"Measured on {tuning.get('windows')} x {tuning.get('seq_len')} calibration "
                    "tokens the maps were not fitted on (0 = plain removal, 1 = the "
                    "least-squares maps); "
                    + (
                        "the lowest was kept."
                        if tuning.get("rule") == "min"
                        else "kept: the smallest strength within one standard error (paired, "
                        "per prediction) of the lowest."
                    ),
                )
            )
    temp = comp.get("temperature") if isinstance(comp, Mapping) else None
    if isinstance(temp, Mapping):
        tables.append(
            (
                "Logit temperature",
                ["logit scale", "calibration ppl before", "after", "predictions"],
                [
                    [
                        _num(temp.get("scale"), ".4f"),
                        _num(temp.get("ppl_before"), ".3f"),
                        _num(temp.get("ppl_after"), ".3f"),
                        _fmt_any(temp.get("predictions")),
                    ]
                ],
                "The pruned model's logits are multiplied by this scale, folded into the final "
                "norm; fitted on the last calibration windows (perplexity of the pruned model "
                "there, before and after). The quality above includes it.",
            )
        )
    timings = report.get("timings_s") or {}
    if timings:
        rows = [[k, f"{v:.1f}"] for k, v in timings.items()]
        tables.append(("Stage timings", ["stage", "seconds"], rows, ""))
    env = report.get("environment") or {}
    rows = [[k, _fmt_any(v)] for k, v in env.items()]
    tables.append(("Environment", ["", ""], rows, ""))
    return tables


def _fmt_any(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "n/a" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def render_html(report: Mapping[str, Any], images: Mapping[str, Path]) -> str:
    """A self-contained HTML page (images embedded as base64). Every string is escaped."""
    e = html.escape
    model = report.get("model", {})
    title = f"LoRP pruning report — {model.get('name') or model.get('source') or 'model'}"
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;"
        "padding:0 1em;color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}"
        "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}"
        "th{background:#f2f2f2}.summary{background:#eef6ee;border-left:5px solid #3a3;"
        "padding:.6em 1em}.note{color:#666;font-size:.9em}img{max-width:100%}</style>",
        "</head><body>",
        f"<h1>{e(title)}</h1>",
        '<div class="summary"><ul>',
    ]
    out += [f"<li>{e(line)}</li>" for line in _headline(report)]
    out.append("</ul></div>")
    out.append("<h2>Why these blocks</h2>")
    out.append(f"<p>{e(report['selection'].get('explanation', ''))}</p>")
    for key, alt in (("heatmap", "similarity heatmap"), ("speedup", "speedup per workload")):
        path = images.get(key)
        if path is not None and path.exists():
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            out.append(f'<p><img alt="{e(alt)}" src="data:image/png;base64,{data}"></p>')
    for name, header, rows, note in _tables(report):
        out.append(f"<h2>{e(name)}</h2><table><tr>")
        out += [f"<th>{e(h)}</th>" for h in header]
        out.append("</tr>")
        for row in rows:
            out.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
        out.append("</table>")
        if note:
            out.append(f'<p class="note">{e(note)}</p>')
    out.append(
        f'<p class="note">report schema {e(str(report.get("schema_version")))}, created '
        f"{e(str(report.get('created_at')))}; machine-readable data in report.json.</p>"
    )
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _md_cell(text: str) -> str:
    """Markdown-safe text: HTML special characters escaped (renderers pass raw HTML through)."""
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ")


def render_markdown(report: Mapping[str, Any], images: Mapping[str, Path]) -> str:
    """The Markdown twin of the HTML report (images referenced relatively)."""
    model = report.get("model", {})
    name = model.get("name") or model.get("source") or "model"
    out = [f"# LoRP pruning report — {_md_cell(name)}", ""]
    out += [f"- {_md_cell(line)}" for line in _headline(report)]
    out += ["", "## Why these blocks", "", _md_cell(report["selection"].get("explanation", "")), ""]
    for key, alt in (("heatmap", "similarity heatmap"), ("speedup", "speedup per workload")):
        path = images.get(key)
        if path is not None:
            out += [f"![{alt}]({path.name})", ""]
    for name, header, rows, note in _tables(report):
        out += [f"## {name}", ""]
        out.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
        out.append("|" + "---|" * len(header))
        out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
        out.append("")
        if note:
            out += [f"_{_md_cell(note)}_", ""]
    return "\n".join(out)


def write_reports(report: Mapping[str, Any], similarity: Any, out_dir: str | Path) -> list[Path]:
    """Write report.json, similarity.npy, heatmap.png, speedup.png (with a benchmark),
    report.html and report.md into ``out_dir``; return the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = _check_similarity(similarity)
    paths: list[Path] = []
    json_path = out / "report.json"
    json_path.write_text(
        json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )
    paths.append(json_path)
    npy = out / "similarity.npy"
    np.save(npy, s)
    paths.append(npy)
    images: dict[str, Path] = {"heatmap": plot_heatmap(report, s, out / "heatmap.png")}
    paths.append(images["heatmap"])
    speed = plot_speedup(report, out / "speedup.png")
    if speed is not None:
        images["speedup"] = speed
        paths.append(speed)
    html_path = out / "report.html"
    html_path.write_text(render_html(report, images), encoding="utf-8")
    paths.append(html_path)
    md_path = out / "report.md"
    md_path.write_text(render_markdown(report, images), encoding="utf-8")
    paths.append(md_path)
    return paths


__all__ = [
    "REPORT_SCHEMA_VERSION",
    "SCHEMA_PATH",
    "build_report",
    "explain",
    "json_safe",
    "load_schema",
    "method_label",
    "plot_heatmap",
    "plot_speedup",
    "render_html",
    "render_markdown",
    "write_reports",
]
