"""The ``report.json`` document, and the job summary read from it.

:func:`build_report` assembles the document (documented by ``lorp/schemas/report.schema.json``,
JSON Schema draft 2020-12, version :data:`REPORT_SCHEMA_VERSION`); :func:`make_report` is the
document of one prune (:class:`lorp.pipeline.PruneResult`), quality guard included;
:func:`job_summary` is the summary the service stores with a job, read from a document. Every
key of ``summary`` is written here and read back here, in one module.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._blocks import get_blocks, num_blocks
from ..bench import EAGER, BenchmarkResult, engine, environment_info
from ..errors import InvalidInputError, SimilarityMatrixError
from ..gate import FLAG_THRESHOLDS
from .prose import explain

if TYPE_CHECKING:
    from ..pipeline import PruneConfig, PruneResult

__all__ = [
    "REPORT_SCHEMA_VERSION",
    "SCHEMA_PATH",
    "STATUSES",
    "build_report",
    "check_similarity",
    "job_summary",
    "json_safe",
    "load_schema",
    "make_report",
    "migrate_report",
]

REPORT_SCHEMA_VERSION = "2.0"
#: Earlier versions :func:`migrate_report` upgrades.
MIGRATES_FROM = ("1.0",)
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "report.schema.json"

#: ``summary.status`` of a prune's report: the blocks were removed, or the quality gate refused.
STATUSES = ("pruned", "refused")


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


def check_similarity(similarity: Any) -> np.ndarray:
    """``similarity`` as a finite, square float64 matrix (:class:`SimilarityMatrixError` else)."""
    try:
        s = np.asarray(similarity, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SimilarityMatrixError(f"similarity matrix is not numeric: {exc}") from exc
    if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] < 1:
        raise SimilarityMatrixError(f"similarity matrix must be square, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise SimilarityMatrixError("similarity matrix has NaN or infinite entries")
    return s


def load_schema() -> dict[str, Any]:
    """The report's JSON Schema (draft 2020-12)."""
    schema: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return schema


# --------------------------------------------------------------------------------------------
# Sections


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


def _peak_bytes(memory: Mapping[str, Any] | None) -> int | None:
    """A run's peak memory: CUDA allocator peak on GPU, weights + peak RSS growth on CPU."""
    memory = memory or {}
    for key in ("max_memory_allocated_bytes", "estimated_peak_bytes"):
        if isinstance(memory.get(key), int):
            return int(memory[key])
    return None


def _speed_summary(bench: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    if bench is None:
        return []
    out = []
    for w in bench.get("workloads", []):
        o, p = w.get("original") or {}, w.get("pruned") or {}
        ci = w.get("speedup_ci") or {}
        out.append(
            {
                "name": w["name"],
                "workload": w.get("workload") or w["name"],
                "kind": w["kind"],
                "mode": w.get("mode") or EAGER,
                "engine": w.get("engine") or engine(EAGER, "cpu"),
                "status": w.get("status") or "measured",
                "unavailable_reason": w.get("unavailable_reason"),
                "batch": w["batch"],
                "prompt_len": w["prompt_len"],
                "new_tokens": w.get("new_tokens"),
                "original_median_s": o.get("median_s"),
                "pruned_median_s": p.get("median_s"),
                "original_tokens_per_s": o.get("tokens_per_s"),
                "pruned_tokens_per_s": p.get("tokens_per_s"),
                "speedup": w.get("speedup"),
                "speedup_low": ci.get("low"),
                "speedup_high": ci.get("high"),
                "speedup_half_width": ci.get("half_width"),
                "pairs": ci.get("pairs", o.get("repetitions")),
                "stop_reason": w.get("stop_reason"),
                "ideal_speedup": w.get("ideal_speedup"),
                "ideal_source": w.get("ideal_source"),
                "measured_over_ideal": w.get("measured_over_ideal"),
                "measured_over_ideal_low": (w.get("measured_over_ideal_ci") or {}).get("low"),
                "measured_over_ideal_high": (w.get("measured_over_ideal_ci") or {}).get("high"),
                "reliable": w.get("reliable"),
                "unreliable_reasons": list(w.get("unreliable_reasons") or []),
                "compile_s": w.get("compile_s"),
                "original_peak_memory_bytes": _peak_bytes(o.get("memory")),
                "pruned_peak_memory_bytes": _peak_bytes(p.get("memory")),
            }
        )
    return out


def _memory_summary(bench: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if bench is None:
        return None
    weights = bench.get("weights", {})
    per_workload = {}
    for w in bench.get("workloads", []):
        if w.get("original") is None or w.get("pruned") is None:
            continue  # unavailable
        per_workload[w["name"]] = {
            "original": w["original"].get("memory", {}),
            "pruned": w["pruned"].get("memory", {}),
        }
    return {
        "weights_original_bytes": weights.get("original_bytes"),
        "weights_pruned_bytes": weights.get("pruned_bytes"),
        "weights_saved_bytes": weights.get("saved_bytes"),
        "weights_saved_fraction": weights.get("saved_fraction"),
        "serving": bench.get("serving_memory"),
        "method": bench.get("memory_method"),
        "per_workload": per_workload,
    }


def _perplexities(quality: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not quality:
        return None
    dense = quality.get("dense") or {}
    pruned = quality.get("pruned") or {}
    d, p = dense.get("ppl"), pruned.get("ppl")
    if not isinstance(d, (int, float)) or not isinstance(p, (int, float)) or d <= 0:
        return None
    return {"ppl_dense": d, "ppl_pruned": p, "ppl_ratio": p / d}


def _task_summary(tasks: Mapping[str, Any] | None) -> dict[str, Any]:
    """The summary's downstream task keys from the report's ``tasks`` section (None / {} when
    no tasks were scored): average headline accuracy dense and pruned, average retention and
    retention per task."""
    average = (tasks or {}).get("average") or {}
    return {
        "task_accuracy_dense": average.get("dense"),
        "task_accuracy_pruned": average.get("pruned"),
        "task_retention": average.get("retention"),
        "task_retention_by_task": {
            str(name): t.get("retention") for name, t in ((tasks or {}).get("tasks") or {}).items()
        },
    }


def _summary(
    sel: Mapping[str, Any],
    speed: Sequence[Mapping[str, Any]],
    memory: Mapping[str, Any] | None,
    quality: Mapping[str, Any] | None,
    guard: Mapping[str, Any] | None,
    tasks: Mapping[str, Any] | None = None,
    depth_search: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ten-second summary; with ``guard`` (a prune's status, flags and gate) the quality
    guard's keys too; the downstream task keys (:func:`_task_summary`) always; with a
    ``depth_search`` (a quality target) the target, the depth chosen and whether the evaluation
    confirmed it."""
    ppl = _perplexities(quality) or {}
    serving = (memory or {}).get("serving") or {}
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
        "serving_memory_saved_bytes": serving.get("saved_bytes"),
        "serving_memory_saved_fraction": serving.get("saved_fraction"),
        "unreliable_speedups": [w["name"] for w in speed if w.get("reliable") is False],
        "ppl_dense": ppl.get("ppl_dense"),
        "ppl_pruned": ppl.get("ppl_pruned"),
        "ppl_ratio": ppl.get("ppl_ratio"),
        **_task_summary(tasks),
    }
    if depth_search is not None:
        summary.update(
            quality_target=dict(depth_search["target"]),
            target_depth=depth_search["final"],
            target_confirmed=depth_search["confirmed"],
        )
    if guard is not None:
        summary.update(
            status=guard["status"],
            kl=None if quality is None else quality.get("kl"),
            top1_agreement=None if quality is None else quality.get("top1_agreement"),
            flags=[str(f["message"]) for f in guard["flags"]],
            quality_gate=guard["gate"],
        )
    return summary


# --------------------------------------------------------------------------------------------
# The document


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
    status: str | None = None,
    flags: Sequence[Mapping[str, Any]] = (),
    gate: Mapping[str, Any] | None = None,
    tasks: Mapping[str, Any] | None = None,
    depth_search: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report.json document (schema ``lorp/schemas/report.schema.json``, version
    :data:`REPORT_SCHEMA_VERSION`).

    ``selection`` is a :class:`lorp.selection.Selection` or its ``to_dict()``; ``quality`` is
    open-ended but, when perplexity was measured, holds ``dense``/``pruned`` dicts with ``ppl``
    (and ``tokens``), plus e.g. ``dataset``, ``kl``, ``top1_agreement``.

    ``status`` (one of :data:`STATUSES`) marks the document of a prune, which carries its quality
    guard: ``flags`` (:func:`lorp.gate.quality_flags`) and ``gate`` (the quality gate's result as
    a dict, or None) go into ``quality`` (with ``flag_thresholds``) and into ``summary`` with
    ``status``, ``kl`` and ``top1_agreement``. Without ``status`` neither section has those keys
    (``flags`` and ``gate`` are not used).

    ``tasks``: downstream accuracy, dense vs pruned (:meth:`lorp.tasks.TaskComparison.to_dict`
    plus ``data`` and ``protocol``), the document's ``tasks`` (None when not scored; a section
    of its own, since tasks can be scored when perplexity could not be measured).

    ``depth_search``: a quality target's search (:meth:`lorp.target.DepthSearch.to_dict`: the
    target, the quality-vs-depth curve, the depth chosen and its confirmations), the document's
    ``depth_search`` (None with a block budget) and the summary's ``quality_target``,
    ``target_depth`` and ``target_confirmed``.
    """
    s = check_similarity(similarity)
    sel = _selection_dict(selection)
    if s.shape[0] != sel["num_layers"]:
        raise SimilarityMatrixError(
            f"similarity matrix is {s.shape[0]}x{s.shape[0]} but the selection is over "
            f"{sel['num_layers']} layers"
        )
    guard = None
    if status is not None:
        if status not in STATUSES:
            raise InvalidInputError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        guard = {"status": status, "flags": list(flags), "gate": gate}
    bench = _benchmark_dict(benchmark)
    qual = None if quality is None else dict(json_safe(quality))
    if qual is not None and guard is not None:
        qual.update(flags=guard["flags"], flag_thresholds=dict(FLAG_THRESHOLDS), gate=gate)
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
    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "summary": _summary(sel, speed, memory, qual, guard, tasks, depth_search),
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
        "tasks": None if tasks is None else dict(tasks),
        "depth_search": None if depth_search is None else dict(depth_search),
        "benchmark": bench,
        "environment": env,
        "extra": None if extra is None else dict(extra),
    }
    return dict(json_safe(report))


def make_report(
    result: PruneResult,
    config: PruneConfig,
    *,
    model_source: str,
    gguf_file: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    dtype_source: str | None = None,
    name: str | None = None,
    artifacts: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report.json document of a prune (:func:`lorp.pipeline.prune`'s result, or the result
    a quality gate refused, ``result.pruned`` False: then ``summary.status`` is "refused" and
    ``model`` describes the pruned model it would have been).

    ``quality`` holds the evaluation data (``dataset``, ``kind``, ``source``, ``windows``,
    ``seq_len``) and the measurement; ``extra`` the calibration and scoring windows, the
    compensation and the config. ``name``: the model's short name (the report's title);
    ``dtype_source``: why ``dtype`` (:func:`lorp.loading.choose_dtype`); ``artifacts``: what
    was written (:func:`lorp.outputs.write_outputs`), as the document's ``artifacts``.
    """
    model = result.model
    params = sum(p.numel() for p in model.parameters())
    layers_after = num_blocks(model)
    if not result.pruned:  # refused: report what the pruned model would have been
        blocks = get_blocks(model)
        params -= sum(p.numel() for i in result.selection.removed for p in blocks[i].parameters())
        layers_after -= len(result.selection.removed)
    quality = None
    if result.quality is not None and result.evaluation is not None:
        quality = {
            "dataset": result.evaluation.get("source") or result.evaluation["kind"],
            **result.evaluation,
            **result.quality.to_dict(),
        }
    report = build_report(
        model={
            "source": model_source,
            "name": name,
            "gguf_file": gguf_file,
            "architecture": type(model).__name__,
            "num_layers": result.num_layers_before,
            "num_layers_after": layers_after,
            "parameters_after": int(params),
            "dtype": dtype,
            "dtype_source": dtype_source,
            "device": device,
            "offload": result.offload,
        },
        budget={
            "requested": config.requested_budget,
            "num_remove": len(result.selection.removed),
        },
        selection=result.selection,
        similarity=result.similarity,
        timings=dict(result.timings),
        benchmark=result.benchmark,
        quality=quality,
        extra={
            "calibration": result.calibration,
            "scoring": result.scoring,
            "compensation": None if result.compensation is None else result.compensation.to_dict(),
            "config": _config_dict(result, config),
        },
        status="pruned" if result.pruned else "refused",
        flags=result.flags,
        gate=None if result.gate is None else result.gate.to_dict(),
        tasks=_tasks_section(result, config),
        depth_search=None if result.depth_search is None else result.depth_search.to_dict(),
    )
    if artifacts is not None:
        report["artifacts"] = json_safe(dict(artifacts))
    return report


#: How the report's ``tasks`` section says the accuracies were measured.
TASK_PROTOCOL = (
    "zero-shot, lm-evaluation-harness log-likelihood scoring (lorp.tasks); headline metric per "
    "task (acc_norm for HellaSwag, PIQA, ARC; acc for WinoGrande, BoolQ); standard error "
    "sqrt(p(1-p)/(n-1)); retention = pruned / dense"
)


def _config_dict(result: PruneResult, config: PruneConfig) -> dict[str, Any]:
    """``config.to_dict()``, the task data directory named as the caller named it (a service
    worker's local folder is the operator's business)."""
    out = config.to_dict()
    if result.task_source is not None and out.get("task_data_dir") is not None:
        out["task_data_dir"] = result.task_source
    return out


def _tasks_section(result: PruneResult, config: PruneConfig) -> dict[str, Any] | None:
    if result.tasks is None:
        return None
    data = result.task_source or (
        None if config.task_data_dir is None else str(config.task_data_dir)
    )
    return {"data": data, "protocol": TASK_PROTOCOL, **result.tasks.to_dict()}


# --------------------------------------------------------------------------------------------
# The job summary


def _median_speedup(speed: Sequence[Mapping[str, Any]], kind: str) -> float | None:
    """Median speedup of the eager rows of ``kind`` (compiled rows are in ``speedups``)."""
    vals = [
        float(r["speedup"])
        for r in speed
        if r.get("kind") == kind and r.get("speedup") and (r.get("mode") or EAGER) == EAGER
    ]
    return statistics.median(vals) if vals else None


def job_summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """The summary a service job stores (the API's ``JobSummary`` fields), from a report.json
    document (:func:`make_report`; a refused prune's too: ``status`` "refused").

    ``prefill_speedup`` / ``decode_speedup``: the median speedup of the workloads of that kind;
    ``memory_reduction``: the share of weight bytes saved; ``quality_gate``: the gate's result
    (``summary.quality_gate``, else ``quality.gate``); ``task_accuracy_before`` /
    ``task_accuracy_after``: the average headline accuracy over the downstream tasks, dense and
    pruned; ``task_retention``: its average retention (pruned / dense per task, averaged);
    ``task_retention_by_task``: per task; ``quality_target``, ``target_depth``,
    ``target_confirmed``: a quality target's budget, the depth the prune ended with and whether
    the evaluation data confirmed the target; ``offload``: the memory mode that ran (``"none"``,
    ``"sequential"``; ``model.offload`` says why); ``healing``: a heal's steps run, early-stop
    step, best step, held-out KL before and after, and seconds. Keys the report lacks are None
    (``{}``).
    """
    s = report.get("summary") or {}
    speed = report.get("speed") or []
    return {
        "method": s.get("method"),
        "num_layers": s.get("num_layers"),
        "kept_layers": s.get("kept_layers"),
        "removed_blocks": list(s.get("removed") or []),
        "rls": s.get("rls"),
        "num_clusters": s.get("num_clusters"),
        "speedups": dict(s.get("speedups") or {}),
        "prefill_speedup": _median_speedup(speed, "prefill"),
        "decode_speedup": _median_speedup(speed, "decode"),
        "memory_reduction": s.get("weights_saved_fraction"),
        "weights_saved_bytes": s.get("weights_saved_bytes"),
        "perplexity_before": s.get("ppl_dense"),
        "perplexity_after": s.get("ppl_pruned"),
        "perplexity_ratio": s.get("ppl_ratio"),
        "offload": ((report.get("model") or {}).get("offload") or {}).get("mode"),
        "status": s.get("status"),
        "kl": s.get("kl"),
        "top1_agreement": s.get("top1_agreement"),
        "flags": [str(f) for f in s.get("flags") or []],
        "quality_gate": s.get("quality_gate") or (report.get("quality") or {}).get("gate"),
        "task_accuracy_before": s.get("task_accuracy_dense"),
        "task_accuracy_after": s.get("task_accuracy_pruned"),
        "task_retention": s.get("task_retention"),
        "task_retention_by_task": dict(s.get("task_retention_by_task") or {}),
        "quality_target": s.get("quality_target"),
        "target_depth": s.get("target_depth"),
        "target_confirmed": s.get("target_confirmed"),
        "healing": _healing_summary(report),
    }


# --------------------------------------------------------------------------------------------
# Migration


def migrate_report(report: Mapping[str, Any]) -> dict[str, Any]:
    """A report.json document of an earlier schema version (:data:`MIGRATES_FROM`) as this
    version describes it; a current document is returned as a copy.

    From 1.0 (a fixed number of repetitions, eager only): every speed row and benchmark
    workload gets ``mode`` "eager", its ``engine``, ``status`` "measured" and no interval
    (``speedup_ci`` null, ``reliable`` null: not assessed then); ``memory.serving`` and the
    benchmark's ``budget``/``serving_memory`` are null; ``migrated_from`` says where it came
    from. Every 1.0 field is kept."""
    doc = json.loads(json.dumps(report))
    version = doc.get("schema_version")
    if version == REPORT_SCHEMA_VERSION:
        return dict(doc)
    if version not in MIGRATES_FROM:
        raise InvalidInputError(
            f"report schema {version!r} can't be migrated (known: "
            f"{', '.join((*MIGRATES_FROM, REPORT_SCHEMA_VERSION))})"
        )
    eager = engine(EAGER, "cpu")
    bench = doc.get("benchmark")
    if isinstance(bench, dict):
        bench.setdefault("modes", [EAGER])
        bench.setdefault("budget", None)
        bench.setdefault("serving_memory", None)
        for w in bench.get("workloads") or []:
            ideal = w.get("ideal_speedup")
            w.setdefault("workload", w["name"])
            w.setdefault("mode", EAGER)
            w.setdefault("engine", eager)
            w.setdefault("status", "measured")
            w.setdefault("unavailable_reason", None)
            w.setdefault("speedup_ci", None)
            w.setdefault("measured_over_ideal_ci", None)
            w.setdefault("ideal_source", None if ideal is None else "block hooks")
            w.setdefault("reliable", None)
            w.setdefault("unreliable_reasons", [])
            w.setdefault("stop_reason", None)
            w.setdefault("load", {})
            w.setdefault("compile_s", None)
    new_rows = {r["name"]: r for r in _speed_summary(bench)} if isinstance(bench, dict) else {}
    for row in doc.get("speed") or []:
        for key, value in new_rows.get(row["name"], {}).items():
            row.setdefault(key, value)
    if isinstance(doc.get("memory"), dict):
        doc["memory"].setdefault("serving", None)
    summary = doc.get("summary") or {}
    summary.setdefault("serving_memory_saved_bytes", None)
    summary.setdefault("serving_memory_saved_fraction", None)
    summary.setdefault("unreliable_speedups", [])
    doc["schema_version"] = REPORT_SCHEMA_VERSION
    doc["migrated_from"] = version
    return dict(doc)


#: The keys of a heal (``extra.compensation.healing``, :func:`lorp.heal.heal_maps`) a job
#: summary carries.
HEALING_SUMMARY_KEYS = (
    "steps_run",
    "early_stop_step",
    "best_step",
    "held_out_kl_before",
    "held_out_kl_after",
    "seconds",
)


def _healing_summary(report: Mapping[str, Any]) -> dict[str, Any] | None:
    comp = (report.get("extra") or {}).get("compensation")
    healing = comp.get("healing") if isinstance(comp, Mapping) else None
    if not isinstance(healing, Mapping):
        return None
    return {key: healing.get(key) for key in HEALING_SUMMARY_KEYS}
