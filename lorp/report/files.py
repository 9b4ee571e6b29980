"""Writing a report's files: the document, the similarity matrix, the figures and the human
report, side by side in one folder."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .document import check_similarity, json_safe
from .html import render_html, render_markdown
from .plots import plot_depth, plot_heatmap, plot_speedup

__all__ = ["write_reports"]


def write_reports(report: Mapping[str, Any], similarity: Any, out_dir: str | Path) -> list[Path]:
    """Write report.json, similarity.npy, heatmap.png, speedup.png (with a benchmark),
    depth.png (with a quality target's depth search), report.html and report.md into
    ``out_dir``; return the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = check_similarity(similarity)
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
    depth = plot_depth(report, out / "depth.png")
    if depth is not None:
        images["depth"] = depth
        paths.append(depth)
    html_path = out / "report.html"
    html_path.write_text(render_html(report, images), encoding="utf-8")
    paths.append(html_path)
    md_path = out / "report.md"
    md_path.write_text(render_markdown(report, images), encoding="utf-8")
    paths.append(md_path)
    return paths
