"""Which files a prune writes into ``out/model/``, chosen before any compute, and writing them.

Formats (:data:`OUTPUT_FORMATS`): ``"gguf"`` (a GGUF input pruned by surgery on the file itself,
:mod:`lorp.gguf_surgery`: the input's quantization kept, folded tensors re-quantized) and
``"safetensors"`` (a Hugging Face checkpoint, :func:`lorp.loading.save_pruned`, in the input's
own dtype for a safetensors input). Default: the input's format.

:func:`plan_outputs` runs before the model is loaded: a GGUF output is checked on the file's
metadata (:func:`lorp.gguf_surgery.check_gguf_surgery`, with the tensors the configured folds may
change). When ``"gguf"`` was asked for, a file the surgery cannot handle (or a non-GGUF input)
is an error then, before any compute; when only the default chose it, the plan falls back to
safetensors and records why (``notes``, in ``report.json``'s ``artifacts``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import InvalidInputError, LorpError, UnsupportedModelError

__all__ = ["OUTPUT_FORMATS", "OutputPlan", "check_destination", "plan_outputs", "write_outputs"]

OUTPUT_FORMATS: tuple[str, ...] = ("gguf", "safetensors")


@dataclass
class OutputPlan:
    """What :func:`write_outputs` will write. ``formats``: in :data:`OUTPUT_FORMATS` order;
    ``requested``: the formats the caller gave (None: the default); ``gguf_source``: the input
    GGUF file (when the input is one); ``notes``: why the plan differs from the default, or
    what a GGUF write will fall back to."""

    formats: list[str]
    requested: list[str] | None
    gguf_source: Path | None
    notes: list[str] = field(default_factory=list)

    @property
    def explicit_gguf(self) -> bool:
        return self.requested is not None and "gguf" in self.requested


def _normalise(output_formats: Sequence[str] | str | None) -> list[str] | None:
    if output_formats is None:
        return None
    items = [output_formats] if isinstance(output_formats, str) else list(output_formats)
    names: list[str] = []
    for item in items:
        for name in str(item).split(","):
            name = name.strip().lower()
            if name not in OUTPUT_FORMATS:
                raise InvalidInputError(
                    f"unknown output format {name!r}; use {' or '.join(OUTPUT_FORMATS)}"
                )
            names.append(name)
    if not names:
        raise InvalidInputError("output_formats is empty; give gguf and/or safetensors")
    return [f for f in OUTPUT_FORMATS if f in names]


def plan_outputs(
    model_source: str | Path,
    *,
    gguf_file: str | None = None,
    output_formats: Sequence[str] | str | None = None,
    compensate: bool = False,
    temperature: bool = False,
    budget: int | float | None = None,
) -> OutputPlan:
    """The outputs of a prune of ``model_source``, checked before loading (module docstring).

    Raises :class:`InvalidInputError` for an unknown format, or ``"gguf"`` asked for a
    non-GGUF input; :class:`~lorp.errors.UnsupportedModelError` when ``"gguf"`` was asked for
    and the surgery does not support the file (its architecture, its blocks), or cannot take
    ``budget`` blocks (a count or fraction) out of it: Gemma 2/3 derive each block's attention
    kind from its index, so the kept last block keeps its kind only when the number removed is
    a multiple of the pattern's period (which runs are removed is checked again on writing)."""
    from .gguf_surgery import check_gguf_surgery, fold_roles
    from .loading import source_gguf
    from .selection import resolve_budget

    requested = _normalise(output_formats)
    gguf = source_gguf(model_source, gguf_file)
    if requested is None:
        plan = OutputPlan(
            formats=["gguf" if gguf is not None else "safetensors"],
            requested=None,
            gguf_source=gguf,
        )
    else:
        if "gguf" in requested and gguf is None:
            raise InvalidInputError(
                "output format gguf needs a GGUF input (a local .gguf file); this model is a "
                "Hugging Face checkpoint: use safetensors"
            )
        plan = OutputPlan(formats=requested, requested=requested, gguf_source=gguf)
    if "gguf" in plan.formats and gguf is not None:
        roles = fold_roles(compensate=compensate, temperature=temperature)
        try:
            checked = check_gguf_surgery(gguf, fold_targets=roles, allow_fallback=True)
        except LorpError as exc:
            if plan.explicit_gguf:
                raise
            plan.formats = ["safetensors"]
            plan.notes.append(f"GGUF output not possible ({exc}); wrote safetensors instead")
        else:
            period = checked.swa_period
            count = None if budget is None else resolve_budget(checked.block_count, budget)
            if period and count is not None and count % period:
                refusal = (
                    f"{checked.architecture} derives which blocks use sliding-window attention "
                    f"from the block index (period {period}): a GGUF output can lose only a "
                    f"multiple of {period} blocks, not {count}"
                )
                if plan.explicit_gguf:
                    raise UnsupportedModelError(f"{refusal}; prune to safetensors instead")
                plan.formats = ["safetensors"]
                plan.notes.append(f"GGUF output not possible ({refusal}); wrote safetensors")
            if checked.fallbacks:
                shown = ", ".join(f"{k} ({v})" for k, v in list(checked.fallbacks.items())[:4])
                plan.notes.append(
                    f"folded tensors of a type gguf cannot quantize are stored at a fallback "
                    f"type: {shown}" + (" ..." if len(checked.fallbacks) > 4 else "")
                )
    return plan


def check_destination(checkpoint: Path) -> None:
    """Refuse (:class:`InvalidInputError`) a checkpoint folder that exists and is not empty
    (:func:`write_outputs` never writes over files), or that could not be created: its nearest
    existing ancestor is not a writable directory (checked before any compute too)."""
    if checkpoint.exists() and (not checkpoint.is_dir() or any(checkpoint.iterdir())):
        raise InvalidInputError(f"output directory {checkpoint} exists and is not empty")
    existing = next(p for p in (checkpoint, *checkpoint.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise InvalidInputError(
            f"cannot write the output directory {checkpoint}: {existing} is not a writable "
            "directory"
        )


def write_outputs(
    plan: OutputPlan,
    model: Any,
    tokenizer: Any,
    removed: Sequence[int],
    compensation: Any,
    checkpoint: Path,
    *,
    save_dtype: str | None = None,
    source_name: str | None = None,
) -> dict[str, Any]:
    """Write ``plan``'s files into ``checkpoint`` (the pruned ``model``, after the surgery) and
    return report.json's ``artifacts`` section (paths relative to the output folder, the input
    named as ``source_name``: no worker path). The GGUF is written first, from the weights as
    computed; the safetensors checkpoint then casts the model to ``save_dtype``."""
    from .gguf_surgery import folded_tensors, write_pruned_gguf
    from .loading import save_pruned

    artifacts: dict[str, Any] = {
        "formats": list(plan.formats),
        "requested": plan.requested,
        "notes": list(plan.notes),
        "gguf": None,
        "safetensors": None,
    }
    folder = checkpoint.name
    check_destination(checkpoint)
    written = None
    if "gguf" in plan.formats and plan.gguf_source is not None:
        checkpoint.mkdir(parents=True, exist_ok=True)
        dst = checkpoint / plan.gguf_source.name
        try:
            written = write_pruned_gguf(
                plan.gguf_source,
                dst,
                list(removed),
                replaced=folded_tensors(model, compensation),
            )
        except UnsupportedModelError as exc:  # the blocks chosen (checked before writing)
            if plan.explicit_gguf:
                raise
            plan = replace(plan, formats=["safetensors"])  # only the default chose GGUF
            artifacts["formats"] = list(plan.formats)
            artifacts["notes"].append(f"GGUF output not possible ({exc}); wrote safetensors")
    if written is not None:
        info = written.to_dict()
        info["source"] = source_name if source_name is not None else dst.name
        info["path"] = f"{folder}/{dst.name}"
        info["file"] = dst.name
        artifacts["gguf"] = info
    if "safetensors" in plan.formats:
        staging = checkpoint
        if checkpoint.exists() and any(checkpoint.iterdir()):
            staging = checkpoint.with_name(f".{checkpoint.name}.safetensors")
        files = save_pruned(model, tokenizer, staging, dtype=save_dtype)
        if staging != checkpoint:
            for f in files:
                target = checkpoint / f.relative_to(staging)
                target.parent.mkdir(parents=True, exist_ok=True)
                f.replace(target)
            files = [checkpoint / f.relative_to(staging) for f in files]
            _remove_tree(staging)
        weights = [f for f in files if f.name.endswith(".safetensors")]
        artifacts["safetensors"] = {
            "files": [f"{folder}/{f.relative_to(checkpoint).as_posix()}" for f in files],
            "dtype": save_dtype or _model_dtype(model),
            "weights_bytes": sum(f.stat().st_size for f in weights),
        }
    return artifacts


def _model_dtype(model: Any) -> str | None:
    dtype = getattr(model, "dtype", None)
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
