"""Physical removal of transformer blocks, permanent (:func:`remove_blocks`) or temporary
(:func:`pruned_view`).

Deleting blocks from the block list is not enough for a model that generates with a KV cache and
whose checkpoint reloads with plain ``AutoModelForCausalLM.from_pretrained``. Both entry points
share one plan (:func:`_plan_surgery`) that lists every change as ``(object, attribute, old, new)``:

- the block ``nn.ModuleList`` is replaced by the kept blocks (same module objects, no copy);
- the depth field of every decoder config (``num_hidden_layers``; GPT-2's ``n_layer`` through
  its attribute map) is set to the new depth;
- every per-layer list in those configs (a list or tuple as long as the old depth, e.g.
  ``layer_types``, ``mlp_layer_types``, per-layer head counts) is filtered to the kept blocks;
  lists of layer *indices* (``mlp_only_layers``) are re-indexed and "first k layers" counters
  (``max_window_layers``, ``first_k_dense_replace``) are recounted;
- every ``layer_idx`` / ``layer_id`` integer attribute on a kept block's submodules is renumbered
  to the block's new position (the KV cache is indexed by it);
- ``has_sliding_layers`` on the decoder (Qwen2/Qwen3) is recomputed from the new layer types.

Architectures whose per-layer behaviour is derived from the index at construction time in a way
that renumbering would change on reload are refused with :class:`UnsupportedModelError` (GPT-2
with ``scale_attn_by_inverse_layer_idx``, MoE configs with a sparse step > 1, heterogeneous
per-layer configs).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ._blocks import BlockLocation, locate_blocks
from .errors import UnsupportedModelError
from .removal import validate_removed

__all__ = [
    "REMOVED_LAYERS_ATTR",
    "block_runs",
    "check_removable",
    "pruned_view",
    "remove_blocks",
    "validate_removed",
]

#: Config attribute recording the original indices of every block removed so far (it survives
#: ``save_pretrained`` / ``from_pretrained`` as a plain extra config field).
REMOVED_LAYERS_ATTR = "lorp_removed_layers"

# Integer attributes that modules use to find their slot in the KV cache.
_INDEX_ATTRS: tuple[str, ...] = ("layer_idx", "layer_id")

# Config lists that may be as long as the depth but are not per-layer.
_NOT_PER_LAYER: frozenset[str] = frozenset(
    {
        "architectures",
        "bad_words_ids",
        "suppress_tokens",
        "begin_suppress_tokens",
        "forced_decoder_ids",
        "eos_token_id",
        "bos_token_id",
        "pad_token_id",
    }
)

# Config lists holding layer indices (re-indexed, removed entries dropped).
_INDEX_LISTS: tuple[str, ...] = ("mlp_only_layers",)

# Config integers meaning "the first k layers are special" (recounted over kept layers).
_LEADING_COUNTS: tuple[str, ...] = ("max_window_layers", "first_k_dense_replace")

# Config integers that make a layer's kind depend on its index modulo a step; renumbering would
# change the structure on reload unless the step is 1.
_INDEX_STEPS: tuple[str, ...] = ("decoder_sparse_step", "interleave_moe_layer_step")

_MISSING: Any = object()


@dataclass
class _Change:
    obj: Any
    attr: str
    old: Any  # _MISSING when the attribute did not exist
    new: Any


@dataclass
class _Plan:
    location: BlockLocation
    original_blocks: nn.ModuleList
    keep: list[int]
    changes: list[_Change] = field(default_factory=list)

    def apply(self) -> None:
        self.location.set([self.original_blocks[i] for i in self.keep])
        for change in self.changes:
            setattr(change.obj, change.attr, change.new)

    def revert(self) -> None:
        for change in reversed(self.changes):
            if change.old is _MISSING:
                if hasattr(change.obj, change.attr):
                    delattr(change.obj, change.attr)
            else:
                setattr(change.obj, change.attr, change.old)
        setattr(self.location.parent, self.location.attr, self.original_blocks)


def block_runs(blocks: Sequence[int]) -> list[list[int]]:
    """Maximal runs of consecutive block indices, in order (``[1, 2, 5]`` -> ``[[1, 2], [5]]``)."""
    out: list[list[int]] = []
    for b in sorted(blocks):
        if out and b == out[-1][-1] + 1:
            out[-1].append(b)
        else:
            out.append([b])
    return out


def _decoder_configs(model: nn.Module, location: BlockLocation, depth: int) -> list[Any]:
    """Configs describing the decoder whose blocks are removed (deduplicated, depth-matching)."""
    candidates: list[Any] = []
    config = getattr(model, "config", None)
    if config is not None:
        candidates.append(config)
        get_text = getattr(config, "get_text_config", None)
        if callable(get_text):
            candidates.append(get_text(decoder=True))
        text = getattr(config, "text_config", None)
        if text is not None:
            candidates.append(text)
    parent_config = getattr(location.parent, "config", None)
    if parent_config is not None:
        candidates.append(parent_config)
    seen: set[int] = set()
    configs: list[Any] = []
    for c in candidates:
        if id(c) in seen:
            continue
        seen.add(id(c))
        declared = getattr(c, "num_hidden_layers", None)
        if declared == depth:
            configs.append(c)
    if candidates and not configs:
        declared = getattr(candidates[-1], "num_hidden_layers", None)
        raise UnsupportedModelError(
            f"the model has {depth} blocks but its config declares {declared}; "
            "refusing to prune an inconsistent model"
        )
    return configs


def _check_supported(config: Any) -> None:
    if getattr(config, "is_heterogeneous", False):
        raise UnsupportedModelError(
            f"{type(config).__name__} has a heterogeneous per-layer config; block removal "
            "is not supported for it"
        )
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise UnsupportedModelError(
            "scale_attn_by_inverse_layer_idx=True scales each block's attention by its index; "
            "a pruned checkpoint would reload with different scales"
        )
    for name in _INDEX_STEPS:
        step = getattr(config, name, None)
        if isinstance(step, int) and step > 1:
            raise UnsupportedModelError(
                f"{type(config).__name__}.{name}={step}: which blocks are MoE depends on the "
                "block index, so renumbered blocks would change kind on reload"
            )


def _config_changes(config: Any, depth: int, keep: list[int]) -> list[_Change]:
    new_index = {old: new for new, old in enumerate(keep)}
    changes = [_Change(config, "num_hidden_layers", depth, len(keep))]
    for name, value in list(vars(config).items()):
        if name.startswith("_") or name in _NOT_PER_LAYER or name.endswith("_token_id"):
            continue
        if name in _INDEX_LISTS and isinstance(value, list | tuple):
            remapped = [new_index[i] for i in value if i in new_index]
            changes.append(_Change(config, name, value, type(value)(remapped)))
        elif name in _LEADING_COUNTS and isinstance(value, int) and not isinstance(value, bool):
            changes.append(_Change(config, name, value, sum(1 for i in keep if i < value)))
        elif isinstance(value, list | tuple) and len(value) == depth:
            changes.append(_Change(config, name, value, type(value)(value[i] for i in keep)))
    return changes


def _plan_surgery(model: nn.Module, removed: Sequence[int], *, record: bool) -> _Plan:
    location = locate_blocks(model)
    blocks = location.blocks
    depth = len(blocks)
    removed_sorted = validate_removed(depth, removed)
    removed_set = set(removed_sorted)
    keep = [i for i in range(depth) if i not in removed_set]
    plan = _Plan(location=location, original_blocks=blocks, keep=keep)

    configs = _decoder_configs(model, location, depth)
    for config in configs:
        _check_supported(config)
    # Modules can also carry the flag without a config (GPT-2 attention copies it at init).
    for module in blocks.modules():
        if getattr(module, "scale_attn_by_inverse_layer_idx", False):
            _check_supported(module)
    for config in configs:
        plan.changes.extend(_config_changes(config, depth, keep))

    for new, old in enumerate(keep):
        for module in blocks[old].modules():
            for attr in _INDEX_ATTRS:
                value = module.__dict__.get(attr, _MISSING)
                if isinstance(value, int) and not isinstance(value, bool) and value != new:
                    plan.changes.append(_Change(module, attr, value, new))

    flag = location.parent.__dict__.get("has_sliding_layers", _MISSING)
    if isinstance(flag, bool) and configs:
        layer_types = getattr(configs[0], "layer_types", None)
        if layer_types is not None:
            sliding = any(layer_types[i] == "sliding_attention" for i in keep)
            plan.changes.append(_Change(location.parent, "has_sliding_layers", flag, sliding))

    top = getattr(model, "config", None)
    if record and top is not None:
        old = getattr(top, REMOVED_LAYERS_ATTR, _MISSING)
        previous = [int(i) for i in old] if isinstance(old, list | tuple) else []
        # ``removed`` is relative to the current model; record it in the original numbering.
        surviving = [i for i in range(depth + len(previous)) if i not in set(previous)]
        total = sorted({*previous, *(surviving[i] for i in removed_sorted)})
        plan.changes.append(_Change(top, REMOVED_LAYERS_ATTR, old, total))
    return plan


def check_removable(model: nn.Module, removed: Sequence[int]) -> None:
    """Raise what :func:`remove_blocks` would raise for ``removed`` (bad indices, an
    architecture or config that cannot be pruned safely) without changing ``model``: the
    surgery is planned, not applied (the pipeline's preflight)."""
    _plan_surgery(model, removed, record=False)


def remove_blocks(model: nn.Module, removed: Sequence[int]) -> None:
    """Permanently delete the blocks at indices ``removed`` from ``model`` (in place).

    Fixes the config depth, per-layer config lists and attention ``layer_idx`` so that
    ``generate()`` with a KV cache works and ``save_pretrained`` / ``from_pretrained`` round-trips.
    The removed indices (in the numbering of the original, unpruned model) are recorded in
    ``model.config.lorp_removed_layers``. Raises :class:`InvalidInputError` for bad indices and
    :class:`UnsupportedModelError` for architectures that cannot be pruned safely.
    """
    plan = _plan_surgery(model, removed, record=True)
    try:
        plan.apply()
    except BaseException:
        plan.revert()
        raise


@contextmanager
def pruned_view(model: nn.Module, removed: Sequence[int]) -> Iterator[None]:
    """Run ``model`` as if the blocks at ``removed`` were deleted, then restore it exactly.

    The same surgery as :func:`remove_blocks` (blocks, config fields, ``layer_idx``) is applied on
    entry and undone on exit, also when the body raises. Nothing is copied; the kept blocks are the
    model's own modules, so the pruned and the full model can be timed in one process.
    """
    plan = _plan_surgery(model, removed, record=False)
    try:
        plan.apply()
        yield
    finally:
        plan.revert()
