"""The report's figures (matplotlib, Agg backend, imported when a figure is drawn): a heatmap of
the similarity matrix S with the phases and the removed blocks marked (``heatmap.png``) and the
measured vs ideal speedup per workload (``speedup.png``, when there is a benchmark) and a quality
target's quality-vs-depth curve (``depth.png``, when the depth was searched)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .document import check_similarity
from .prose import block_ranges, method_label

__all__ = ["plot_depth", "plot_heatmap", "plot_speedup"]


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

    s = check_similarity(similarity)
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
            handles.append(Patch(color=colors[c], label=f"phase {c}: {block_ranges(members)}"))
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


def plot_speedup(report: Mapping[str, Any], path: Path) -> Path | None:
    """Bars per workload: measured speedup (with the spread) next to the ideal speedup."""
    speed = [w for w in report.get("speed") or [] if w.get("status") != "unavailable"]
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
        if w.get("speedup_low") is not None and w.get("speedup_high") is not None:
            lo.append(max(0.0, m - w["speedup_low"]))  # the 95% interval
            hi.append(max(0.0, w["speedup_high"] - m))
            continue
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
        label="measured (ratio of medians; whiskers: 95% CI)",
    )
    ideal_vals = [v if v is not None else 0.0 for v in ideal]
    ax.bar(x + width / 2, ideal_vals, width, color="#b0b0b0", label="ideal (block times)")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(
        [
            f"{name}{' (!)' if w.get('reliable') is False else ''}\n{m:.2f}× "
            f"(ideal {'n/a' if i is None else f'{i:.2f}×'})"
            for name, m, i, w in zip(names, measured, ideal, speed, strict=True)
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


def plot_depth(report: Mapping[str, Any], path: Path) -> Path | None:
    """A quality target's search (``report["depth_search"]``): the measured quality-vs-depth
    curve on the search's held-out data, the target, the depth chosen and the confirmations on
    the evaluation data. None without a search."""
    search = report.get("depth_search")
    if not isinstance(search, Mapping) or not search.get("curve"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratio = search.get("metric") == "ppl_ratio"
    curve = [p for p in search["curve"] if isinstance(p.get("value"), (int, float))]
    xs = [0] + [int(p["num_remove"]) for p in curve]
    ys = [1.0] + [float(p["value"]) for p in curve]
    target = next(iter((search.get("target") or {}).values()), None)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(xs, ys, marker="o", color="#2b7bba", label="held-out search data (plain selection)")
    for p in curve:
        if not p.get("met"):
            ax.plot([p["num_remove"]], [p["value"]], marker="o", color="#c0392b", ms=8)
    if isinstance(target, (int, float)):
        ax.axhline(
            target, color="black", ls="--", lw=1, label=f"target {'≤' if ratio else '≥'} {target:g}"
        )
    confirmations = [
        c for c in search.get("confirmations") or [] if isinstance(c.get("value"), (int, float))
    ]
    folded = ", folded" if confirmations and confirmations[0].get("folded") else ""
    for met, color, word in ((True, "#27ae60", "meets"), (False, "#e67e22", "misses")):
        points = [c for c in confirmations if bool(c.get("met")) == met]
        if points:
            ax.plot(
                [c["num_remove"] for c in points],
                [c["value"] for c in points],
                ls="",
                marker="D",
                color=color,
                ms=8,
                label=f"evaluation data{folded}: {word} the target",
            )
    final = search.get("final")
    if isinstance(final, int):
        ax.axvline(final, color="#27ae60", lw=1, alpha=0.6)
    ax.set_xlabel("blocks removed")
    ax.set_ylabel("perplexity ratio pruned / dense" if ratio else "average task retention")
    ax.set_xticks(xs)
    n = (report.get("selection") or {}).get("num_layers")
    metric = "ppl ratio ≤" if ratio else "task retention ≥"
    ax.set_title(
        f"Quality vs depth: {final} of {n} blocks removed (target {metric} {target:g}; "
        "red: the search's first miss)"
        if isinstance(target, (int, float))
        else f"Quality vs depth: {final} of {n} blocks removed",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper left" if ratio else "lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
