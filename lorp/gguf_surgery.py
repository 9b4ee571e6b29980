"""GGUF in, GGUF out: remove blocks from a GGUF file by surgery on the file itself.

A pruned GGUF is written without de-quantizing the model: the tensors of the removed blocks
(``blk.N.*``) are dropped, the kept blocks are renumbered (``blk.7.attn_q.weight`` becomes
``blk.5.attn_q.weight`` when two blocks before it are gone), and every tensor that no fold
changed is copied byte for byte, with its type, shape and order; the data section keeps the
input's alignment. The metadata is copied as stored (raw bytes) except:

- ``<arch>.block_count``, set to the new depth (same value type);
- every *per-layer array*: an array-valued key under ``<arch>.`` whose length equals the old
  block count (per-layer head counts, feed-forward lengths, sliding-window patterns...), filtered
  to the kept blocks. Arrays outside ``<arch>.`` (tokenizer, ``general.*``) are never touched;
- ``lorp.removed_layers`` (array of uint32), added or extended: the removed block indices in the
  numbering of the original, unpruned model (the GGUF twin of the ``lorp_removed_layers`` field
  :func:`lorp.surgery.remove_blocks` writes into a Hugging Face config).

Tensors changed by a fold (compensation: a block's ``ffn_down``; temperature: ``output_norm``)
are passed in ``replaced`` and re-quantized to their original type with the ``gguf`` package's
quantizers (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, TQ1_0, TQ2_0, MXFP4 in gguf 0.19). For a
type it cannot write (the K-quants Q2_K..Q6_K, the IQ types...) the documented fallback is Q8_0
when the row length is a multiple of 32, else F16; :attr:`RequantizedTensor.fallback` and the
write result list every such tensor, and ``allow_fallback=False`` refuses instead.

Which files: architectures in :data:`SUPPORTED_ARCHITECTURES`, whose blocks are the ``blk.N.*``
tensors and whose llama.cpp and transformers implementations derive nothing from a block's index
except through the per-layer metadata above. Gemma 2 and Gemma 3 are the exception they allow:
llama.cpp and transformers derive which blocks use sliding-window attention from the index
(every 2nd block global for Gemma 2, every 6th for Gemma 3; an integer
``<arch>.attention.sliding_window_pattern`` sets the period for any architecture), so a removal
is accepted only when every kept block keeps its kind at its new index (e.g. runs whose length is
a multiple of the period). Anything else (an unknown architecture, a big-endian file, ``blk.N``
indices that do not match the block count, a block without tensors) is refused with
:class:`~lorp.errors.UnsupportedModelError` by :func:`check_gguf_surgery`, which reads only the
file's header and metadata, so a caller can run it before any compute.

``replaced`` names: GGUF tensor names of the *output* file (``blk.4.ffn_down.weight``,
``output_norm.weight``), values in GGUF's layout and conventions; or Hugging Face parameter names
of the *pruned* model (``model.layers.4.mlp.down_proj.weight``, ``model.norm.weight``), values as
transformers holds them, mapped to GGUF with gguf's tensor name map and converted the way
transformers' GGUF reader converts back (Llama's rotary permutation of ``attn_q``/``attn_k``,
Gemma's ``norm + 1``). Both use the pruned (output) block numbering; :func:`folded_tensors`
collects them from a pruned model and its :class:`~lorp.compensation.Compensation`.

This module imports neither torch nor transformers at import time (``check_gguf_surgery`` runs
where only numpy and gguf are installed); the tensors of ``replaced`` may be torch tensors or
numpy arrays.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InvalidInputError, ModelLoadError, UnsupportedModelError
from .removal import validate_removed

if TYPE_CHECKING:
    from gguf import GGUFReader, ReaderField, ReaderTensor
    from torch import nn

    from .compensation import Compensation

__all__ = [
    "FALLBACK_TYPES",
    "REMOVED_LAYERS_KEY",
    "SUPPORTED_ARCHITECTURES",
    "GGUFSurgeryPlan",
    "GGUFWriteResult",
    "RequantizedTensor",
    "check_gguf_surgery",
    "fold_roles",
    "folded_tensors",
    "write_pruned_gguf",
]

#: Architectures (``general.architecture``) the surgery knows: blocks are ``blk.N.*`` and nothing
#: but the per-layer metadata depends on a block's index (Gemma 2/3: see the module docstring).
SUPPORTED_ARCHITECTURES: frozenset[str] = frozenset(
    {"llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe", "phi3", "gemma2", "gemma3", "starcoder2"}
)

#: Metadata key recording the removed blocks in the original model's numbering.
REMOVED_LAYERS_KEY = "lorp.removed_layers"

#: What a replaced tensor whose type gguf cannot quantize is written as: the first of these
#: whose block size divides the row length (F16's is 1).
FALLBACK_TYPES: tuple[str, ...] = ("Q8_0", "F16")

# Which blocks use sliding-window attention is derived from the block index with this period
# (llama.cpp's ``set_swa_pattern``: block i slides iff i % period < period - 1; transformers'
# default layer_types agree) unless the file sets <arch>.attention.sliding_window_pattern.
_SWA_PERIODS: dict[str, int] = {"gemma2": 2, "gemma3": 6}
# Architectures whose attn_q / attn_k rows llama.cpp stores permuted for its rotary layout
# (convert_hf_to_gguf's LlamaModel.permute; transformers' LlamaTensorProcessor undoes it).
_PERMUTED_QK: frozenset[str] = frozenset({"llama"})
# Architectures whose norm weights GGUF stores as 1 + w (transformers' Gemma2TensorProcessor).
_NORM_PLUS_ONE: frozenset[str] = frozenset({"gemma2", "gemma3"})
_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")
_INTEGER_TYPES = frozenset({"I8", "I16", "I32", "I64"})
_GGUF_MAGIC = 0x46554747  # b"GGUF" little-endian
_DEFAULT_ALIGNMENT = 32


# --------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class RequantizedTensor:
    """One tensor written from new values instead of copied.

    ``name``: its name in the written file; ``given_as``: the key it had in ``replaced``;
    ``original_type`` / ``written_type``: GGML type names (they differ only when ``fallback``:
    gguf has no quantizer for the original type); ``bytes_in`` / ``bytes_out``: its data size in
    the input and the output; ``relative_error``: ``||dequantized - given|| / ||given||`` of the
    written tensor (0 for F32), the quantization error the check compares logits within.
    """

    name: str
    given_as: str
    original_type: str
    written_type: str
    fallback: bool
    bytes_in: int
    bytes_out: int
    relative_error: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "given_as": self.given_as,
            "original_type": self.original_type,
            "written_type": self.written_type,
            "fallback": self.fallback,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "relative_error": self.relative_error,
        }


@dataclass(frozen=True)
class GGUFSurgeryPlan:
    """What :func:`check_gguf_surgery` found, without touching tensor data.

    ``removed`` / ``keep``: block indices in the file's numbering (empty ``removed`` when none
    were given); ``per_layer_keys``: the metadata arrays filtered per block; ``swa_period``: the
    index period of the sliding-window pattern a removal must preserve (0: none);
    ``tensor_types``: tensor count per GGML type; ``fold_requantize``: for every tensor matching
    the ``fold_targets`` given, the type a re-quantized copy is written as; ``fallbacks``: those
    of them written at a fallback type (``"name": "Q6_K -> Q8_0"``); ``file_type``: the
    ``general.file_type`` name (``MOSTLY_Q4_1``...), if the file has one.
    """

    path: Path
    architecture: str
    block_count: int
    removed: tuple[int, ...]
    keep: tuple[int, ...]
    per_layer_keys: tuple[str, ...]
    swa_period: int
    tensor_types: dict[str, int]
    file_type: str | None
    fold_requantize: dict[str, str] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "architecture": self.architecture,
            "block_count": self.block_count,
            "removed": list(self.removed),
            "keep": list(self.keep),
            "per_layer_keys": list(self.per_layer_keys),
            "swa_period": self.swa_period,
            "tensor_types": dict(self.tensor_types),
            "file_type": self.file_type,
            "fold_requantize": dict(self.fold_requantize),
            "fallbacks": dict(self.fallbacks),
        }


@dataclass(frozen=True)
class GGUFWriteResult:
    """What :func:`write_pruned_gguf` wrote.

    ``removed``: block indices removed, in the input file's numbering; ``tensors_copied``: tensors
    whose bytes were copied unchanged; ``requantized``: every tensor written from new values;
    ``metadata_changed``: keys whose value changed or was added; ``bytes_in`` / ``bytes_out``:
    file sizes.
    """

    source: Path
    path: Path
    architecture: str
    file_type: str | None
    block_count_in: int
    block_count_out: int
    removed: list[int]
    tensors_in: int
    tensors_out: int
    tensors_copied: int
    bytes_in: int
    bytes_out: int
    metadata_changed: list[str]
    requantized: list[RequantizedTensor]

    @property
    def size_ratio(self) -> float:
        return self.bytes_out / self.bytes_in

    @property
    def fallbacks(self) -> list[RequantizedTensor]:
        return [t for t in self.requantized if t.fallback]

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": str(self.source),
            "path": str(self.path),
            "architecture": self.architecture,
            "file_type": self.file_type,
            "block_count_in": self.block_count_in,
            "block_count_out": self.block_count_out,
            "removed": list(self.removed),
            "tensors_in": self.tensors_in,
            "tensors_out": self.tensors_out,
            "tensors_copied": self.tensors_copied,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "size_ratio": self.size_ratio,
            "metadata_changed": list(self.metadata_changed),
            "requantized": [t.to_dict() for t in self.requantized],
        }


# --------------------------------------------------------------------------------------------
# reading and checking


@dataclass
class _Parsed:
    reader: GGUFReader
    plan: GGUFSurgeryPlan
    block_key: str
    block_of: list[int | None]  # per tensor: its block index, or None for a global tensor


def _open(path: Path) -> GGUFReader:
    from gguf import GGUFReader

    if not path.is_file():
        raise ModelLoadError(f"{path.name}: no such GGUF file")
    try:
        return GGUFReader(path)
    except (ValueError, KeyError, IndexError, OSError) as exc:
        raise ModelLoadError(f"{path.name} is not a readable GGUF file: {exc}") from exc


def _scalar(reader: GGUFReader, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None or len(f.types) != 1:
        return None
    return f.contents()


def _is_sliding(index: int, period: int) -> bool:
    return index % period < period - 1


@cache
def _quantizable(type_name: str) -> bool:
    """Whether gguf can write this GGML type (tried on one zero block; cached)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quantize

    qtype = GGMLQuantizationType[type_name]
    block, _ = GGML_QUANT_SIZES[qtype]
    try:
        quantize(np.zeros((1, block), dtype=np.float32), qtype)
    except NotImplementedError:
        return False
    return True


def _written_type(type_name: str, row: int) -> str:
    """The type a re-quantized tensor of ``type_name`` with rows of ``row`` values is written as."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if type_name in _INTEGER_TYPES:
        raise UnsupportedModelError(f"an integer tensor ({type_name}) cannot take folded values")
    if _quantizable(type_name):
        return type_name
    for candidate in FALLBACK_TYPES:
        block, _ = GGML_QUANT_SIZES[GGMLQuantizationType[candidate]]
        if row % block == 0:
            return candidate
    return "F32"  # not reached: F16's block is 1


def _parse(
    src: str | Path,
    removed: Sequence[int] | None,
    fold_target_suffixes: Iterable[str] = (),
    allow_fallback: bool = True,
) -> _Parsed:
    path = Path(src)
    reader = _open(path)
    name = path.name
    if reader.byte_order != "I" or struct.pack("=I", 1) != struct.pack("<I", 1):
        raise UnsupportedModelError(f"{name}: only little-endian GGUF files are supported")
    arch = _scalar(reader, "general.architecture")
    if not isinstance(arch, str):
        raise UnsupportedModelError(f"{name} has no general.architecture; cannot locate blocks")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{name}: GGUF block removal does not know architecture {arch!r} (supported: "
            f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}); prune the Hugging Face checkpoint "
            "or write safetensors instead"
        )
    block_key = f"{arch}.block_count"
    depth = _scalar(reader, block_key)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise UnsupportedModelError(f"{name}: {block_key} is missing or not a positive integer")

    block_of: list[int | None] = []
    per_block = [0] * depth
    for t in reader.tensors:
        m = _BLOCK_NAME.match(t.name)
        if m is None:
            if t.name.startswith("blk."):
                raise UnsupportedModelError(f"{name}: cannot read the block of tensor {t.name!r}")
            block_of.append(None)
            continue
        index = int(m.group(1))
        if index >= depth:
            raise UnsupportedModelError(
                f"{name}: tensor {t.name} belongs to block {index} but {block_key} is {depth}"
            )
        per_block[index] += 1
        block_of.append(index)
    empty = [i for i, n in enumerate(per_block) if n == 0]
    if empty:
        raise UnsupportedModelError(
            f"{name}: blocks {empty} have no blk.N.* tensors; cannot identify the per-block "
            "tensors of this file"
        )

    per_layer: list[str] = []
    for key, f in reader.fields.items():
        is_array = bool(f.types) and f.types[0].name == "ARRAY"
        if is_array and key.startswith(f"{arch}.") and len(f.data) == depth:
            if len(f.types) != 2:
                raise UnsupportedModelError(
                    f"{name}: per-layer metadata {key} holds nested arrays; cannot filter it"
                )
            per_layer.append(key)

    swa_period = _SWA_PERIODS.get(arch, 0)
    pattern = _scalar(reader, f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, int) and not isinstance(pattern, bool):
        swa_period = pattern if pattern > 1 else 0

    removed_sorted: list[int] = []
    keep = list(range(depth))
    if removed is not None:
        removed_sorted = validate_removed(depth, list(removed))
        gone = set(removed_sorted)
        keep = [i for i in range(depth) if i not in gone]
        if swa_period:
            moved = [
                (old, new)
                for new, old in enumerate(keep)
                if _is_sliding(old, swa_period) != _is_sliding(new, swa_period)
            ]
            if moved:
                shown = ", ".join(f"{old}->{new}" for old, new in moved[:6])
                rule = f"block i is global when i % {swa_period} == {swa_period - 1}"
                raise UnsupportedModelError(
                    f"{name}: {arch} derives which blocks use sliding-window attention from the "
                    f"block index ({rule}), and removing "
                    f"{removed_sorted} would change the attention of kept blocks ({shown}"
                    f"{', ...' if len(moved) > 6 else ''}); remove runs whose length is a "
                    f"multiple of {swa_period}, or prune the Hugging Face checkpoint instead"
                )

    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1

    suffixes = tuple(fold_target_suffixes)
    fold_requantize: dict[str, str] = {}
    fallbacks: dict[str, str] = {}
    if suffixes:
        for t, block in zip(reader.tensors, block_of, strict=True):
            role = t.name if block is None else _BLOCK_NAME.sub(r"\2", t.name)
            if role not in suffixes:
                continue
            original = t.tensor_type.name
            written = _written_type(original, int(t.shape[0]))
            fold_requantize[t.name] = written
            if written != original:
                fallbacks[t.name] = f"{original} -> {written}"
        if fallbacks and not allow_fallback:
            raise UnsupportedModelError(_fallback_message(name, fallbacks))

    file_type = _scalar(reader, "general.file_type")
    file_type_name: str | None = None
    if isinstance(file_type, int):
        from gguf import LlamaFileType

        try:
            file_type_name = LlamaFileType(file_type).name
        except ValueError:
            file_type_name = str(file_type)

    plan = GGUFSurgeryPlan(
        path=path,
        architecture=arch,
        block_count=depth,
        removed=tuple(removed_sorted),
        keep=tuple(keep),
        per_layer_keys=tuple(per_layer),
        swa_period=swa_period,
        tensor_types=types,
        file_type=file_type_name,
        fold_requantize=fold_requantize,
        fallbacks=fallbacks,
    )
    return _Parsed(reader=reader, plan=plan, block_key=block_key, block_of=block_of)


def _fallback_message(name: str, fallbacks: Mapping[str, str]) -> str:
    shown = ", ".join(f"{k} ({v})" for k, v in list(fallbacks.items())[:4])
    more = f" and {len(fallbacks) - 4} more" if len(fallbacks) > 4 else ""
    return (
        f"{name}: gguf cannot quantize the type of {shown}{more}; a folded copy would be "
        "stored at the fallback type (allow_fallback=True), or prune without folds"
    )


def fold_roles(*, compensate: bool = False, temperature: bool = False) -> tuple[str, ...]:
    """GGUF tensor roles (the name without ``blk.N.``) the folds of :mod:`lorp.compensation`
    may change: ``ffn_down`` of blocks before a removed run, the final norm for a temperature."""
    roles: list[str] = []
    if compensate:
        roles += ["ffn_down.weight", "ffn_down.bias"]
    if temperature:
        roles += ["output_norm.weight", "output_norm.bias"]
    return tuple(roles)


def check_gguf_surgery(
    src: str | Path,
    removed: Sequence[int] | None = None,
    *,
    fold_targets: Iterable[str] = (),
    allow_fallback: bool = True,
) -> GGUFSurgeryPlan:
    """Check that :func:`write_pruned_gguf` can prune ``src``, reading only its metadata.

    Raises :class:`UnsupportedModelError` for an architecture the surgery does not know, a file
    whose per-block tensors cannot be identified, a removal that would change the attention kind
    of kept blocks (Gemma 2/3), or (``allow_fallback=False``) a tensor matching ``fold_targets``
    (roles such as ``"ffn_down.weight"``, see :func:`fold_roles`) whose type gguf cannot
    quantize; :class:`InvalidInputError` for bad block indices; :class:`ModelLoadError` for a
    file that is not a readable GGUF. ``removed`` may be omitted (the blocks are chosen later):
    then only the file is checked, and the removal is checked again when writing.
    """
    return _parse(src, removed, fold_targets, allow_fallback).plan


# --------------------------------------------------------------------------------------------
# the replaced tensors


def _llama_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's row permutation of attn_q / attn_k (the inverse of transformers')."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _layer_value(reader: GGUFReader, key: str, layer: int) -> int | None:
    """A metadata integer that may be per-layer (an array indexed by the *input* block)."""
    f = reader.fields.get(key)
    if f is None:
        return None
    value = f.contents() if len(f.types) == 1 else f.contents(layer)
    return int(value) if isinstance(value, int | float | np.integer) else None


def _to_numpy(value: Any, label: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (not imported here)
        value = value.detach().to("cpu").float().numpy()
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"replaced tensor {label!r} is not numeric: {exc}") from exc
    if not np.isfinite(array).all():
        raise InvalidInputError(f"replaced tensor {label!r} has non-finite values")
    return array


@dataclass
class _Replacement:
    given_as: str
    values: np.ndarray  # float32, GGUF layout (numpy shape = reversed GGUF dims)


def _resolve_replaced(
    parsed: _Parsed, replaced: Mapping[str, Any], out_names: Mapping[str, int]
) -> dict[int, _Replacement]:
    """Map ``replaced`` (GGUF or HF names, output numbering) to input tensor positions."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    reader, plan = parsed.reader, parsed.plan
    arch = plan.architecture
    name_map = None
    result: dict[int, _Replacement] = {}
    for key, value in replaced.items():
        gguf_name = key if key in out_names else None
        hf = gguf_name is None
        if hf:
            if name_map is None:
                arch_enum = next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch)
                name_map = get_tensor_name_map(arch_enum, len(plan.keep))
            base, dot, suffix = key.rpartition(".")
            mapped = name_map.get_name(base) if dot and suffix in ("weight", "bias") else None
            gguf_name = f"{mapped}.{suffix}" if mapped is not None else None
            if gguf_name is None or gguf_name not in out_names:
                raise InvalidInputError(
                    f"replaced tensor {key!r} is neither a tensor of the pruned GGUF nor a "
                    "Hugging Face parameter that maps to one"
                    + (f" (it maps to {gguf_name}, absent)" if gguf_name else "")
                )
        assert gguf_name is not None
        position = out_names[gguf_name]
        if position in result:
            raise InvalidInputError(
                f"{key!r} and {result[position].given_as!r} both replace {gguf_name}"
            )
        tensor = reader.tensors[position]
        array = _to_numpy(value, key)
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        if array.shape != shape:
            raise InvalidInputError(
                f"replaced tensor {key!r} has shape {tuple(array.shape)}, {gguf_name} has {shape}"
            )
        if hf:
            array = _hf_to_gguf(parsed, gguf_name, array)
        result[position] = _Replacement(given_as=key, values=np.ascontiguousarray(array))
    return result


def _hf_to_gguf(parsed: _Parsed, gguf_name: str, array: np.ndarray) -> np.ndarray:
    """Undo what transformers' GGUF reader does to this tensor when it loads it."""
    arch = parsed.plan.architecture
    if arch in _PERMUTED_QK and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
        m = _BLOCK_NAME.match(gguf_name)
        layer = parsed.plan.keep[int(m.group(1))] if m else 0
        n_head = _layer_value(parsed.reader, f"{arch}.attention.head_count", layer)
        n_head_kv = _layer_value(parsed.reader, f"{arch}.attention.head_count_kv", layer)
        if n_head is None:
            raise UnsupportedModelError(
                f"{arch}.attention.head_count is missing; cannot lay out {gguf_name}"
            )
        kv = n_head_kv if ".attn_k." in gguf_name else n_head
        return _llama_permute(array, n_head, kv)
    if arch in _NORM_PLUS_ONE and "norm.weight" in gguf_name:
        return array + 1.0
    return array


def _requantize(
    tensor: ReaderTensor, out_name: str, replacement: _Replacement, allow_fallback: bool
) -> tuple[RequantizedTensor, np.ndarray, int]:
    """Quantize the new values; return the record, the bytes and the written type's id."""
    from gguf import GGMLQuantizationType, dequantize, quantize

    original = tensor.tensor_type.name
    values = replacement.values
    written = _written_type(original, int(tensor.shape[0]))
    if written != original and not allow_fallback:
        raise UnsupportedModelError(
            _fallback_message(out_name, {out_name: f"{original} -> {written}"})
        )
    qtype = GGMLQuantizationType[written]
    data = np.ascontiguousarray(quantize(values, qtype))
    restored = dequantize(data, qtype).astype(np.float32, copy=False).reshape(values.shape)
    norm = float(np.linalg.norm(values))
    error = float(np.linalg.norm(restored - values)) / norm if norm > 0 else 0.0
    record = RequantizedTensor(
        name=out_name,
        given_as=replacement.given_as,
        original_type=original,
        written_type=written,
        fallback=written != original,
        bytes_in=int(tensor.n_bytes),
        bytes_out=int(data.nbytes),
        relative_error=error,
    )
    return record, data.view(np.uint8).reshape(-1), int(qtype)


# --------------------------------------------------------------------------------------------
# writing


def _pack_str(text: str | bytes) -> bytes:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _field_bytes(reader: GGUFReader, f: ReaderField) -> bytes:
    size = sum(int(p.nbytes) for p in f.parts)
    return bytes(reader.data[f.offset : f.offset + size])


def _scalar_kv(f: ReaderField, value: int) -> bytes:
    """``f`` (a scalar integer key) with a new value of the same type."""
    from gguf import GGUFReader

    vtype = f.types[0]
    dtype = np.dtype(GGUFReader.gguf_scalar_to_np[vtype]).newbyteorder("<")
    head = bytes(f.parts[0]) + bytes(f.parts[1]) + struct.pack("<I", int(vtype))
    return head + np.array([value], dtype=dtype).tobytes()


def _filtered_array_kv(f: ReaderField, keep: Sequence[int]) -> bytes:
    """``f`` (a per-layer array key) with only the entries of the kept layers."""
    from gguf import GGUFValueType

    out = [bytes(f.parts[0]), bytes(f.parts[1]), bytes(f.parts[2]), bytes(f.parts[3])]
    out.append(struct.pack("<Q", len(keep)))
    strings = f.types[1] == GGUFValueType.STRING
    for i in keep:
        idx = f.data[i]
        if strings:
            out.append(bytes(f.parts[idx - 1]))  # the length
        out.append(bytes(f.parts[idx]))
    return b"".join(out)


def _uint32_array_kv(key: str, values: Sequence[int]) -> bytes:
    from gguf import GGUFValueType

    head = _pack_str(key) + struct.pack("<I", int(GGUFValueType.ARRAY))
    body = struct.pack("<IQ", int(GGUFValueType.UINT32), len(values))
    return head + body + np.asarray(values, dtype="<u4").tobytes()


def _removed_original(reader: GGUFReader, depth: int, removed: Sequence[int]) -> list[int]:
    """``removed`` (file numbering) merged with earlier removals, in the original numbering."""
    previous: list[int] = []
    f = reader.fields.get(REMOVED_LAYERS_KEY)
    if f is not None and len(f.types) == 2:
        previous = [int(v) for v in f.contents()]
    gone = set(previous)
    surviving = [i for i in range(depth + len(previous)) if i not in gone]
    return sorted({*previous, *(surviving[i] for i in removed)})


def _align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def write_pruned_gguf(
    src: str | Path,
    dst: str | Path,
    removed: Sequence[int],
    *,
    replaced: Mapping[str, Any] | None = None,
    allow_fallback: bool = True,
) -> GGUFWriteResult:
    """Write ``dst``: the GGUF ``src`` without the blocks ``removed`` (indices in ``src``'s
    numbering), every other tensor's bytes copied, metadata adjusted (module docstring).

    ``replaced`` maps tensors changed by a fold to their new values (torch tensors or numpy
    arrays): GGUF names of the output file or Hugging Face parameter names of the pruned model,
    both in the pruned numbering (module docstring). Each is re-quantized to its original type,
    or written at the fallback type (Q8_0, else F16) when gguf has no quantizer for it; with
    ``allow_fallback=False`` that raises :class:`UnsupportedModelError` before anything is
    written. Everything is checked before ``dst`` is created; the file is written next to
    ``dst`` and renamed into place, so a failure leaves no partial ``dst``.
    """
    src_path, dst_path = Path(src), Path(dst)
    parsed = _parse(src_path, removed)
    reader, plan = parsed.reader, parsed.plan
    if dst_path.exists() and dst_path.resolve() == src_path.resolve():
        raise InvalidInputError(f"{dst_path.name}: the output must not overwrite the input")
    if not dst_path.parent.is_dir():
        raise InvalidInputError(f"{dst_path.parent} is not a directory")
    new_index = {old: new for new, old in enumerate(plan.keep)}

    # The output tensors, in the input's order, with their new names.
    out: list[tuple[int, str]] = []  # (input position, output name)
    for position, (t, block) in enumerate(zip(reader.tensors, parsed.block_of, strict=True)):
        if block is None:
            out.append((position, t.name))
        elif block in new_index:
            rest = _BLOCK_NAME.match(t.name)
            assert rest is not None
            out.append((position, f"blk.{new_index[block]}.{rest.group(2)}"))
    out_names = {name: position for position, name in out}

    replacements = _resolve_replaced(parsed, replaced or {}, out_names)
    requantized: dict[int, tuple[RequantizedTensor, np.ndarray, int]] = {}
    for position, replacement in replacements.items():
        name = next(n for p, n in out if p == position)
        requantized[position] = _requantize(
            reader.tensors[position], name, replacement, allow_fallback
        )

    # Metadata: raw bytes except the block count, per-layer arrays and the removal record.
    kvs: list[bytes] = []
    changed: list[str] = []
    removed_record = _removed_original(reader, plan.block_count, plan.removed)
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if key == parsed.block_key:
            kvs.append(_scalar_kv(f, len(plan.keep)))
            changed.append(key)
        elif key in plan.per_layer_keys:
            kvs.append(_filtered_array_kv(f, plan.keep))
            changed.append(key)
        elif key == REMOVED_LAYERS_KEY:
            kvs.append(_uint32_array_kv(key, removed_record))
            changed.append(key)
        else:
            kvs.append(_field_bytes(reader, f))
    if REMOVED_LAYERS_KEY not in reader.fields:
        kvs.append(_uint32_array_kv(REMOVED_LAYERS_KEY, removed_record))
        changed.append(REMOVED_LAYERS_KEY)

    alignment = int(reader.alignment) or _DEFAULT_ALIGNMENT
    infos: list[bytes] = []
    sizes: list[int] = []
    offset = 0
    for position, name in out:
        t = reader.tensors[position]
        if position in requantized:
            _, data, qtype = requantized[position]
            nbytes = int(data.nbytes)
        else:
            qtype, nbytes = int(t.tensor_type), int(t.n_bytes)
        dims = [int(d) for d in t.shape.tolist()]
        infos.append(
            _pack_str(name)
            + struct.pack("<I", len(dims))
            + struct.pack(f"<{len(dims)}Q", *dims)
            + struct.pack("<IQ", qtype, offset)
        )
        sizes.append(nbytes)
        offset = _align(offset + nbytes, alignment)

    version = int(reader.fields["GGUF.version"].parts[0][0])
    header = struct.pack("<IIQQ", _GGUF_MAGIC, version, len(out), len(kvs))
    tmp = dst_path.with_name(f".{dst_path.name}.part")
    try:
        with open(tmp, "wb") as fh:
            fh.write(header)
            for kv in kvs:
                fh.write(kv)
            for info in infos:
                fh.write(info)
            fh.write(b"\0" * (_align(fh.tell(), alignment) - fh.tell()))
            start = fh.tell()
            for (position, _), nbytes in zip(out, sizes, strict=True):
                assert fh.tell() - start == _align(fh.tell() - start, alignment)
                if position in requantized:
                    fh.write(requantized[position][1].tobytes())
                else:
                    t = reader.tensors[position]
                    fh.write(reader.data[t.data_offset : t.data_offset + nbytes].tobytes())
                pad = _align(nbytes, alignment) - nbytes
                fh.write(b"\0" * pad)
        os.replace(tmp, dst_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

    return GGUFWriteResult(
        source=src_path,
        path=dst_path,
        architecture=plan.architecture,
        file_type=plan.file_type,
        block_count_in=plan.block_count,
        block_count_out=len(plan.keep),
        removed=list(plan.removed),
        tensors_in=len(reader.tensors),
        tensors_out=len(out),
        tensors_copied=len(out) - len(requantized),
        bytes_in=src_path.stat().st_size,
        bytes_out=dst_path.stat().st_size,
        metadata_changed=changed,
        requantized=[requantized[p][0] for p, _ in out if p in requantized],
    )


# --------------------------------------------------------------------------------------------
# the pipeline's side


def folded_tensors(model: nn.Module, compensation: Compensation | None) -> dict[str, Any]:
    """The parameters of a pruned ``model`` that ``compensation``'s folds changed, by their
    Hugging Face names in the pruned numbering: the down projection (weight, bias) of every
    block a map was folded into, the final norm's parameters when a temperature was folded.
    Call after :func:`lorp.compensation.apply_compensation` and
    :func:`lorp.surgery.remove_blocks`; pass the result as ``replaced``."""
    if compensation is None:
        return {}
    from ._blocks import get_blocks
    from .temperature import final_norm

    ids = {id(p): n for n, p in model.named_parameters()}
    gone = sorted(compensation.removed)
    blocks = get_blocks(model)
    params: list[Any] = []
    for b in sorted(compensation.folded_maps()):
        new = b - sum(1 for r in gone if r < b)
        down: Any = getattr(getattr(blocks[new], "mlp", None), "down_proj", None)
        params += [p for p in (down.weight, down.bias) if p is not None]
    if compensation.temperature is not None:
        params += list(final_norm(model).parameters(recurse=False))
    out: dict[str, Any] = {}
    for p in params:
        name = ids.get(id(p))
        if name is None:
            raise UnsupportedModelError("a folded parameter is not a parameter of the model")
        out[name] = p.detach()
    return out
