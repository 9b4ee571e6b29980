"""Locating a decoder's list of transformer blocks, for any common family."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from .errors import UnsupportedModelError

# Attribute paths (from the top-level model) of the block list, most common first.
BLOCK_PATHS: tuple[str, ...] = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma2/3, OLMo2, Phi3, ...
    "model.language_model.layers",  # multimodal wrappers (Gemma3ForConditionalGeneration, ...)
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Bloom, Falcon
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "transformer.blocks",  # MPT
    "layers",  # a bare decoder (LlamaModel, ...)
    "h",  # a bare GPT2Model
)


@dataclass(frozen=True)
class BlockLocation:
    """Where a model keeps its blocks: ``parent.<attr>`` is the ``nn.ModuleList``."""

    parent: nn.Module
    attr: str
    path: str

    @property
    def blocks(self) -> nn.ModuleList:
        blocks = getattr(self.parent, self.attr)
        assert isinstance(blocks, nn.ModuleList)
        return blocks

    def set(self, blocks: Sequence[nn.Module]) -> None:
        setattr(self.parent, self.attr, nn.ModuleList(list(blocks)))


def locate_blocks(model: nn.Module) -> BlockLocation:
    """Find the block list of ``model`` or raise :class:`UnsupportedModelError` naming its class."""
    for path in BLOCK_PATHS:
        obj: object = model
        parts = path.split(".")
        for part in parts[:-1]:
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if not isinstance(obj, nn.Module):
            continue
        blocks = getattr(obj, parts[-1], None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return BlockLocation(parent=obj, attr=parts[-1], path=path)
    raise UnsupportedModelError(
        f"cannot find the transformer block list of {type(model).__name__} "
        f"(looked for {', '.join(BLOCK_PATHS)})"
    )


def get_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's ``nn.ModuleList`` of transformer blocks."""
    return locate_blocks(model).blocks


def num_blocks(model: nn.Module) -> int:
    return len(get_blocks(model))


@contextmanager
def blocks_swapped(model: nn.Module, keep: Sequence[int]) -> Iterator[None]:
    """Temporarily run ``model`` with only the blocks at indices ``keep`` (same modules, no copy).

    Only the forward graph changes; configs and attention ``layer_idx`` are untouched, so use it
    without a KV cache or with a cache that indexes by position in the list (see lorp.surgery for
    permanent removal).
    """
    loc = locate_blocks(model)
    full = loc.blocks
    loc.set([full[i] for i in keep])
    try:
        yield
    finally:
        setattr(loc.parent, loc.attr, full)
