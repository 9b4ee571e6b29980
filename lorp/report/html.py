"""The human report: ``report.html`` (self-contained, the figures embedded, so the file can be
downloaded and opened alone) and its Markdown twin ``report.md`` (figures referenced
relatively), both rendered from the report.json document; every string from it is escaped."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .prose import block_ranges, method_label

__all__ = ["render_html", "render_markdown", "speed_headline"]


def _mb(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "n/a"
    return f"{value / 1e6:,.1f} MB"


def _num(value: Any, fmt: str = ".3f") -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "n/a"
    return format(value, fmt)


#: The figures, in the order the human report shows them: image key -> alt text.
_IMAGES = (
    ("heatmap", "similarity heatmap"),
    ("depth", "quality vs depth"),
    ("speedup", "speedup per workload"),
)


def _interval(w: Mapping[str, Any], prefix: str = "speedup") -> str:
    low, high = w.get(f"{prefix}_low"), w.get(f"{prefix}_high")
    if not isinstance(low, (int, float)) or not isinstance(high, (int, float)):
        return ""
    digits = ".2f" if prefix == "speedup" else ".3f"
    return f" [95% CI {format(low, digits)}–{format(high, digits)}]"


def _speed_text(w: Mapping[str, Any]) -> str:
    """One row in the headline: speedup, interval, ideal, and UNRELIABLE with the reasons."""
    name = w.get("workload") or w["name"]
    if w.get("status") == "unavailable":
        return f"{name} unavailable ({w.get('unavailable_reason')})"
    ideal = w.get("ideal_speedup")
    ideal_text = f", ideal {ideal:.2f}×" if isinstance(ideal, (int, float)) else ""
    text = f"{name} {_num(w['speedup'], '.2f')}×{_interval(w)}{ideal_text}"
    if w.get("reliable") is False:
        text += f" — UNRELIABLE: {'; '.join(w.get('unreliable_reasons') or [])}"
    return text


def speed_headline(report: Mapping[str, Any]) -> list[str]:
    """The report's speed in plain text, one line per engine and mode: every speedup with its
    95% interval and ideal, and UNRELIABLE with the reasons where it is (the human report's
    headline; ``make demo`` prints it)."""
    speed = report.get("speed") or []
    if not speed:
        return ["Speed: not measured."]
    by_engine: dict[str, list[str]] = {}
    for w in speed:
        by_engine.setdefault(str(w.get("engine") or "transformers eager"), []).append(
            _speed_text(w)
        )
    return [f"Speedup ({name}): " + "; ".join(parts) + "." for name, parts in by_engine.items()]


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
    search = report.get("depth_search")
    if isinstance(search, Mapping):
        lines.append(_depth_line(search))
    lines += speed_headline(report)
    offload = (report.get("model") or {}).get("offload") or {}
    if offload.get("mode") == "sequential":
        where = {"disk": "on disk", "host": "in host memory"}.get(str(offload.get("weights")), "")
        skipped = offload.get("skipped") or []
        lines.append(
            f"Memory: sequential onloading, one block on the device at a time (weights {where}; "
            f"{offload.get('reason')})" + (f"; skipped: {', '.join(skipped)}." if skipped else ".")
        )
    elif offload.get("mode") == "none" and offload.get("requested") == "auto":
        lines.append(f"Memory: whole model on the device ({offload.get('reason')}).")
    mem = report.get("memory")
    serving = (mem or {}).get("serving")
    if serving:
        lines.append(
            f"Serving memory (weights + KV cache at batch {serving['batch']} × "
            f"{serving['context_tokens']} tokens): {_mb(serving['original_bytes'])} → "
            f"{_mb(serving['pruned_bytes'])} (−{_mb(serving['saved_bytes'])}, "
            f"−{100 * serving['saved_fraction']:.1f}%)."
        )
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
    if summ.get("task_accuracy_dense") is not None:
        retention = summ.get("task_retention")
        lines.append(
            f"Downstream tasks: average accuracy {100 * summ['task_accuracy_dense']:.1f}% → "
            f"{100 * summ['task_accuracy_pruned']:.1f}%"
            + (f", {100 * retention:.1f}% of dense retained" if retention is not None else "")
            + f" ({', '.join(summ.get('task_retention_by_task') or {})})."
        )
    lines += [f"Warning: {flag}." for flag in summ.get("flags") or []]
    if sel.get("rls") is not None:
        lines.append(
            f"RLS = {sel['rls']:.3f}"
            + (f", K = {sel['num_clusters']} phases." if sel.get("num_clusters") else ".")
        )
    return lines


def _depth_line(search: Mapping[str, Any]) -> str:
    """The headline of a quality target's depth search: target, depth chosen, confirmation."""
    target = ", ".join(f"{k} {v:g}" for k, v in (search.get("target") or {}).items())
    data = search.get("data") or {}
    text = (
        f"Budget by quality target ({target}): the deepest prune meeting it on "
        f"{data.get('kind', 'held-out data')} removes {search.get('chosen')} blocks "
        f"({len(search.get('curve') or [])} depths measured; {search.get('stopped')})."
    )
    confirmations = search.get("confirmations") or []
    if confirmations:
        last = confirmations[-1]
        stepped = (
            f" after stepping back to {last['num_remove']} blocks"
            if last["num_remove"] != search.get("chosen")
            else ""
        )
        text += (
            f" Evaluation data: {search.get('metric')} {_num(last.get('value'), '.4g')}"
            + (" — target confirmed" if last.get("met") else " — target NOT confirmed")
            + stepped
            + "."
        )
    return text


def _depth_table(search: Mapping[str, Any]) -> tuple[str, list[str], list[list[str]], str]:
    """The quality-vs-depth curve the search measured, and the confirmations."""
    metric = str(search.get("metric"))
    ratio = metric == "ppl_ratio"
    confirmed = {int(c["num_remove"]): c for c in search.get("confirmations") or []}
    rows = []
    for p in search.get("curve") or []:
        c = confirmed.get(int(p["num_remove"]))
        rows.append(
            [
                str(p["num_remove"]),
                ", ".join(map(str, p.get("removed") or [])),
                _num(p.get("quality"), ".4g"),
                _num(p.get("value"), ".4f"),
                "yes" if p.get("met") else "no",
                ""
                if c is None
                else f"{_num(c.get('value'), '.4f')} ({'met' if c['met'] else 'missed'})",
            ]
        )
    data = search.get("data") or {}
    note = (
        f"Searched on {data.get('kind', 'held-out data')}"
        + (f" ({data['windows']} x {data['seq_len']} tokens)" if "windows" in data else "")
        + f"; dense {'perplexity' if ratio else 'average accuracy'} "
        + f"{_num(search.get('dense'), '.4g')}. Each depth is the method's own choice at that "
        "many blocks, measured without the corrections; the scan stops at the first depth that "
        "misses the target. The last column is the check on the evaluation data (the saved "
        "model, corrections folded in)."
    )
    return (
        "Quality vs depth",
        [
            "blocks removed",
            "removed",
            "perplexity" if ratio else "accuracy",
            metric,
            "meets target",
            "evaluation data",
        ],
        rows,
        note,
    )


def _tables(report: Mapping[str, Any]) -> list[tuple[str, list[str], list[list[str]], str]]:
    """(title, header, rows, note) of every table, as plain text cells."""
    tables: list[tuple[str, list[str], list[list[str]], str]] = []
    sel = report["selection"]
    if sel.get("phases"):
        rows = [
            [str(p["phase"]), block_ranges(p["layers"]), ", ".join(map(str, p["removed"])) or "—"]
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
            unit_o = f.get("original") or {}
            unit_p = f.get("pruned") or {}
            engine = str(w.get("engine") or "transformers eager")
            if w.get("status") == "unavailable":
                reason = f"unavailable: {w.get('unavailable_reason')}"
                rows.append([w["name"], engine, reason, "", "", "", "", "", "", ""])
                continue
            if w.get("reliable") is False:
                verdict = "UNRELIABLE: " + "; ".join(w.get("unreliable_reasons") or [])
            elif w.get("reliable"):
                verdict = "reliable"
            else:
                verdict = "not assessed"
            compiled = w.get("compile_s") or {}
            if compiled:
                verdict += f" (compile {sum(compiled.values()):.1f} s, not timed)"
            spread_o = f"{_num(unit_o.get('p10_s'), '.4f')}–{_num(unit_o.get('p90_s'), '.4f')}"
            spread_p = f"{_num(unit_p.get('p10_s'), '.4f')}–{_num(unit_p.get('p90_s'), '.4f')}"
            rows.append(
                [
                    w["name"],
                    engine,
                    f"{_num(w['original_median_s'], '.4f')} ({spread_o})",
                    f"{_num(w['pruned_median_s'], '.4f')} ({spread_p})",
                    f"{_num(w['original_tokens_per_s'], ',.1f')} → "
                    f"{_num(w['pruned_tokens_per_s'], ',.1f')}",
                    f"{_num(w['speedup'], '.3f')}×{_interval(w)}",
                    f"{_num(w['ideal_speedup'], '.3f')}×",
                    _num(w["measured_over_ideal"], ".3f") + _interval(w, "measured_over_ideal"),
                    str(w.get("pairs") if w.get("pairs") is not None else "n/a"),
                    verdict,
                ]
            )
        budget = bench.get("budget") or {}
        spent = (
            f" The benchmark took {budget['spent_s']:.1f} s of a {budget['budget_s']:.1f} s "
            f"budget ({budget['source']})."
            if budget.get("budget_s")
            else ""
        )
        tables.append(
            (
                "Speed",
                [
                    "workload",
                    "engine",
                    "original s (p10–p90)",
                    "pruned s (p10–p90)",
                    "tokens/s",
                    "speedup [95% CI]",
                    "ideal",
                    "measured/ideal [95% CI]",
                    "pairs",
                    "reliability",
                ],
                rows,
                "Medians of A/B pairs, alternated, run until the speedup's 95% interval (paired "
                "bootstrap of the ratio of medians) was within ±2% or the row's share of the time "
                "budget was spent; unreliable: interval wider than ±5% or the machine's load "
                "changed during the run. Prefill = time to first token, decode = time of the "
                "greedy steps with the KV cache." + spent,
            )
        )
    mem = report.get("memory")
    if mem:
        rows = [["weights", _mb(mem["weights_original_bytes"]), _mb(mem["weights_pruned_bytes"])]]
        serving = mem.get("serving")
        if serving:
            rows.append(
                [
                    f"serving: weights + KV cache at batch {serving['batch']} × "
                    f"{serving['context_tokens']} tokens",
                    _mb(serving["original_bytes"]),
                    _mb(serving["pruned_bytes"]),
                ]
            )
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
    tasks = report.get("tasks")
    if isinstance(tasks, Mapping) and tasks.get("tasks"):
        tables.append(_task_table(tasks))
    search = report.get("depth_search")
    if isinstance(search, Mapping) and search.get("curve"):
        tables.append(_depth_table(search))
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
    healing = comp.get("healing") if isinstance(comp, Mapping) else None
    if isinstance(healing, Mapping):
        stopped = healing.get("early_stop_step")
        tables.append(
            (
                "Healing the folded maps",
                [
                    "steps run",
                    "early stop at step",
                    "best step",
                    "held-out KL before",
                    "after",
                    "seconds",
                ],
                [
                    [
                        _fmt_any(healing.get("steps_run")),
                        "–" if stopped is None else _fmt_any(stopped),
                        _fmt_any(healing.get("best_step")),
                        _num(healing.get("held_out_kl_before"), ".4f"),
                        _num(healing.get("held_out_kl_after"), ".4f"),
                        _num(healing.get("seconds"), ".1f"),
                    ]
                ],
                f"After the fold, only the folded maps ({healing.get('trained')}) were trained "
                "to match the dense model's next-token distribution (KL(dense || pruned)) on "
                f"{healing.get('train_windows')} calibration windows, at most "
                f"{healing.get('steps')} steps (learning rate {healing.get('lr')}); every other "
                "weight frozen. KL measured on the "
                f"{healing.get('held_out_windows')} held-out calibration windows the strength "
                "was tuned on; the maps of the lowest were kept (best step 0: the fold as it "
                "was). The quality above includes it.",
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


def _pct(score: Any, stderr: Any = None) -> str:
    """An accuracy in percent, with ± its standard error when known."""
    if not isinstance(score, (int, float)) or isinstance(score, bool):
        return "n/a"
    if isinstance(stderr, (int, float)) and not isinstance(stderr, bool):
        return f"{100 * score:.1f} ± {100 * stderr:.1f}"
    return f"{100 * score:.1f}"


def _task_table(tasks: Mapping[str, Any]) -> tuple[str, list[str], list[list[str]], str]:
    """The downstream task table: per task the headline metric, dense and pruned accuracy (%,
    ± standard error), retention and items; then the averages."""
    rows = []
    for name, t in tasks["tasks"].items():
        if not isinstance(t, Mapping):
            continue
        dense, pruned = t.get("dense") or {}, t.get("pruned") or {}
        rows.append(
            [
                str(name),
                str(t.get("metric")),
                _pct(dense.get("score"), dense.get("stderr")),
                _pct(pruned.get("score"), pruned.get("stderr")),
                _pct(t.get("retention")),
                _fmt_any(t.get("n")),
            ]
        )
    avg = tasks.get("average") or {}
    rows.append(
        [
            "average",
            "",
            _pct(avg.get("dense")),
            _pct(avg.get("pruned")),
            _pct(avg.get("retention")),
            "",
        ]
    )
    limit = tasks.get("limit")
    note = (
        f"Accuracy in %, ± standard error; retention = pruned / dense, in %. "
        f"{'First ' + str(limit) + ' items' if limit else 'All items'} of each task"
        + (f" from {tasks['data']}" if tasks.get("data") else "")
        + f". {tasks.get('protocol') or ''}"
    ).strip()
    return (
        "Downstream tasks",
        ["task", "metric", "original", "pruned", "retention", "items"],
        rows,
        note,
    )


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
    for key, alt in _IMAGES:
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
    for key, alt in _IMAGES:
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
