"""The model card of a pruned checkpoint: ``README.md`` in the Hugging Face model-card convention
(YAML front matter, then Markdown), built from the report document alone, so the output folder
can be pushed to a model hub as it is.

Front matter: ``base_model`` (the model as the user named it: a path, ``s3://`` URI, or the hub
id of an ``hf:`` source), ``tags`` (:data:`CARD_TAGS`, plus ``gguf`` when a GGUF was written),
``library_name: transformers``. Body: what was removed and why (method, RLS, K, the selection's
explanation), the calibration data, quality and speed figures with their conditions, the files,
and what made the checkpoint."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .prose import block_ranges, method_label

__all__ = ["CARD_TAGS", "render_model_card", "write_model_card"]

CARD_TAGS: tuple[str, ...] = ("pruned", "depth-pruning", "lorp")


def _yaml_str(text: str) -> str:
    """A YAML double-quoted scalar (JSON strings are valid YAML)."""
    return json.dumps(str(text), ensure_ascii=False)


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def render_model_card(report: Mapping[str, Any], *, made_by: str | None = None) -> str:
    """The README.md text for the checkpoint ``report`` (a prune's report.json document)."""
    model = report.get("model") or {}
    summ = report.get("summary") or {}
    sel = report.get("selection") or {}
    artifacts = report.get("artifacts") or {}
    extra = report.get("extra") or {}
    source = str(model.get("source") or "unknown")
    base = source[3:] if source.startswith("hf:") else source
    name = str(model.get("name") or base.rstrip("/").rpartition("/")[2] or "model")
    tags = list(CARD_TAGS) + (["gguf"] if artifacts.get("gguf") else [])
    out = [
        "---",
        f"base_model: {_yaml_str(base)}",
        "tags:",
        *[f"- {tag}" for tag in tags],
        "library_name: transformers",
        "---",
        "",
        f"# {_one_line(name)}, depth-pruned with LoRP",
        "",
    ]
    removed = list(summ.get("removed") or [])
    n = summ.get("num_layers")
    method = str(summ.get("method") or sel.get("method") or "")
    out += [
        f"This is `{_one_line(base)}` with {len(removed)} of its {n} transformer blocks "
        f"removed (blocks {block_ranges(removed) or 'none'}; {summ.get('kept_layers')} remain), "
        f"training-free, by LoRP depth pruning (method `{method}`, {method_label(method)}).",
        "",
        "## What was removed and why",
        "",
    ]
    if sel.get("explanation"):
        out += [_one_line(sel["explanation"]), ""]
    facts = [f"- Method: `{method}`"]
    if summ.get("rls") is not None:
        facts.append(f"- RLS (representation locality score): {summ['rls']:.3f}")
    if summ.get("num_clusters"):
        facts.append(f"- K (phases): {summ['num_clusters']}")
    compensation = extra.get("compensation")
    if compensation:
        facts.append("- Corrections folded into the weights (compensation / logit temperature)")
    out += [*facts, ""]

    calib = extra.get("calibration") or {}
    out += ["## Calibration data", ""]
    if calib:
        where = calib.get("source") or calib.get("kind") or "given token windows"
        shape = ""
        if calib.get("windows") is not None and calib.get("seq_len") is not None:
            shape = f": {calib['windows']} windows × {calib['seq_len']} tokens"
        out += [f"- {_one_line(where)}{shape}", ""]
    else:
        out += ["- not recorded", ""]

    out += ["## Quality", ""]
    quality = report.get("quality") or {}
    if summ.get("ppl_dense") is not None:
        cond = quality.get("kind") or "evaluation"
        data = quality.get("dataset") or quality.get("source") or "the evaluation text"
        size = ""
        if quality.get("windows") is not None and quality.get("seq_len") is not None:
            size = f", {quality['windows']} windows × {quality['seq_len']} tokens"
        out += [
            f"Measured on {_one_line(data)} ({cond}{size}; dense and pruned on the same tokens, "
            f"in {model.get('dtype')} on {model.get('device')}):",
            "",
            "| | original | pruned |",
            "|---|---|---|",
            f"| perplexity | {summ['ppl_dense']:.3f} | {summ['ppl_pruned']:.3f} |",
        ]
        if summ.get("top1_agreement") is not None:
            out.append(f"| top-1 agreement with the original | 1 | {summ['top1_agreement']:.3f} |")
        if summ.get("kl") is not None:
            out.append(f"| mean KL(original ‖ pruned), nats/token | 0 | {summ['kl']:.4f} |")
        out.append("")
    else:
        out += ["Not measured (no evaluation text and no held-out calibration windows).", ""]

    out += ["## Speed", ""]
    speed = report.get("speed") or []
    if speed:
        env = report.get("environment") or {}
        where = env.get("gpu") or env.get("cpu") or env.get("device") or "this machine"
        out += [
            f"Timed in PyTorch on {_one_line(where)} (device {env.get('device')}, dtype "
            f"{env.get('dtype')}, torch {env.get('torch')}, {env.get('torch_threads')} threads), "
            "original and pruned alternated:",
            "",
            "| workload | engine | batch | prompt | new tokens | original s | pruned s | speedup "
            "[95% CI] |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for w in speed:
            if w.get("status") == "unavailable":
                result = f"unavailable: {_one_line(str(w.get('unavailable_reason')))}"
            else:
                result = f"{_num(w.get('speedup'), '.2f')}×"
                if w.get("speedup_low") is not None and w.get("speedup_high") is not None:
                    result += f" [{w['speedup_low']:.2f}–{w['speedup_high']:.2f}]"
                if w.get("reliable") is False:
                    result += " unreliable: " + _one_line(
                        "; ".join(w.get("unreliable_reasons") or [])
                    )
            out.append(
                f"| {w.get('name')} | {w.get('engine') or 'transformers eager'} | "
                f"{w.get('batch')} | {w.get('prompt_len')} | {w.get('new_tokens') or ''} | "
                f"{_num(w.get('original_median_s'))} | {_num(w.get('pruned_median_s'))} | "
                f"{result} |"
            )
        out.append("")
    else:
        out += ["Not measured.", ""]

    out += ["## Files", ""]
    gguf = artifacts.get("gguf")
    if gguf:
        ratio = gguf.get("size_ratio")
        out.append(
            f"- `{gguf.get('file')}`: GGUF ({gguf.get('file_type') or 'types as the input'}), "
            f"{gguf.get('bytes_out'):,} bytes, {100 * ratio:.1f}% of the input's "
            f"{gguf.get('bytes_in'):,}; {len(gguf.get('requantized') or [])} folded tensor(s) "
            "re-quantized. Load with `from_pretrained(folder, gguf_file=...)` or llama.cpp."
            if isinstance(ratio, (int, float))
            else f"- `{gguf.get('file')}`: GGUF"
        )
    st = artifacts.get("safetensors")
    if st:
        out.append(
            f"- safetensors checkpoint ({st.get('dtype')}, {st.get('weights_bytes'):,} bytes of "
            "weights): `AutoModelForCausalLM.from_pretrained(folder)`."
        )
    for note in artifacts.get("notes") or []:
        out.append(f"- Note: {_one_line(note)}")
    out += ["", "## How it was made", ""]
    out.append(f"- {_one_line(made_by)}" if made_by else "- `lorp.pipeline.run_pipeline`")
    out.append(
        f"- Report: `report.json` / `report.html` beside this folder (schema "
        f"{report.get('schema_version')}, created {report.get('created_at')})."
    )
    out.append("")
    return "\n".join(out)


def _num(value: Any, fmt: str = ".4f") -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "n/a"


def write_model_card(
    report: Mapping[str, Any], folder: str | Path, *, made_by: str | None = None
) -> Path:
    """Write :func:`render_model_card` as ``folder/README.md``; returns its path."""
    path = Path(folder) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_model_card(report, made_by=made_by), encoding="utf-8")
    return path
