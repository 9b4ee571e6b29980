"""Models larger than the device: sequential (layer-wise) onloading.

With ``offload="sequential"`` the block weights stay in host memory, or on disk (a safetensors
checkpoint read block by block: :func:`load_skeleton`), and the passes over token windows run
*layer-wise*, the way llm-compressor's sequential pipeline does: every window goes through the
embeddings first; then one block at a time is brought to the device, every window's hidden
state goes through it, and it is released before the next block (:class:`Onloader`). The
embeddings, the final norm and the LM head stay on the device (:func:`place_resident`). Peak
device memory is about the resident modules + one block + the windows' hidden states.

How a block is called differs between families (rotary embeddings computed once per forward,
per-layer-type attention masks, positional arguments): the engine never re-derives it. A
*stub pass* runs the model's own forward with every block replaced by a recorder that keeps
each block's call (arguments and keyword arguments, the same tensor objects the model would
have passed) and returns its input unchanged; a *tail pass* runs the forward once more with
block 0 answering the final hidden state, so the final norm, the LM head and any soft-capping
are the model's own code. Each block then does exactly the operations on exactly the values it
does in a whole forward, so the results equal the in-memory path's.

What runs layer-wise (:func:`sequential_similarity`, :func:`sequential_compare`,
:func:`sequential_log_probs`): the calibration capture (S and the stored block inputs), the
evaluation (dense vs pruned perplexity, KL, top-1) and the candidate passes of the
model-in-the-loop scoring (:class:`lorp.scoring.WindowScorer`, from the embeddings or from a
stored dense block input). The scorer's dense and prefix passes, the compensation and
temperature fits and the downstream tasks go window by window through the whole model;
:func:`onloading` brings each block to the device when it is called and releases it after, so
they too hold one block at a time (each block is read once per forward rather than once per
pass). Compensation folds its
maps into block weights, so it needs the weights in host memory, not on disk. The benchmark
needs the whole model on the device and is skipped.

Choosing the mode (:func:`choose_offload`): ``"auto"`` runs sequentially when the weights plus
a working margin (:func:`working_margin`) exceed what the device has: the free memory of a
CUDA device (``torch.cuda.mem_get_info``) and ``max_device_memory`` when given (the only limit
on CPU; without it, never on CPU).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._blocks import get_blocks, locate_blocks
from ._forward import batches, check_windows, input_device, log_probs
from .errors import InvalidInputError, ModelLoadError, UnsupportedModelError
from .inputs import BlockInputs
from .progress import ProgressCallback

#: What ``PruneConfig.offload`` accepts.
OFFLOAD_MODES: tuple[str, ...] = ("none", "sequential", "auto")
#: The windows' hidden states stay on the device between blocks up to this many bytes; beyond,
#: they wait in host memory and each batch visits the device for its block.
ACTIVATION_DEVICE_BYTES = 1 << 30
#: The layer-wise capture keeps every block's normalised input of the windows it runs at once
#: (float32) to fold S; windows are taken in groups within this many bytes (one group: every
#: block is onloaded once).
CAPTURE_GROUP_BYTES = 1 << 30
#: The working margin over the weights :func:`working_margin` adds: this share of the weights.
MARGIN_SHARE = 0.1
#: Float32 copies of one batch's logits the evaluation holds at once (dense and pruned logits,
#: their log-softmax, the KL terms): what :func:`working_margin` counts per logit.
LOGIT_COPIES = 8

_ATTR = "_lorp_onloader"


# --------------------------------------------------------------------------------------------
# Choosing the mode


@dataclass(frozen=True)
class OffloadDecision:
    """Which mode a prune runs in and why (the report's ``model.offload``).

    ``requested``: the config's ``offload``; ``mode``: ``"none"`` or ``"sequential"``;
    ``reason``: why, in words; ``weight_bytes``: the weights' size the choice used (estimated
    before loading, or the model's real parameter bytes); ``needed_bytes``: with the working
    margin; ``device_bytes``: what the device offered (None: no limit known); ``weights``: where
    the block weights live in sequential mode (``"disk"``: memory-mapped safetensors read block
    by block; ``"host"``: host memory), None in-memory; ``peak_block_bytes``: the most block
    weight bytes that were on the device at once (filled after the run)."""

    mode: str
    requested: str
    reason: str
    weight_bytes: int | None = None
    needed_bytes: int | None = None
    device_bytes: int | None = None
    weights: str | None = None
    peak_block_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_offload(offload: Any, max_device_memory: Any) -> None:
    """:class:`InvalidInputError` unless ``offload`` is one of :data:`OFFLOAD_MODES` and
    ``max_device_memory`` None or a positive integer (bytes)."""
    if not isinstance(offload, str) or offload not in OFFLOAD_MODES:
        raise InvalidInputError(
            f"offload must be one of {', '.join(OFFLOAD_MODES)}, got {offload!r}"
        )
    if max_device_memory is not None and (
        isinstance(max_device_memory, bool)
        or not isinstance(max_device_memory, int)
        or max_device_memory < 1
    ):
        raise InvalidInputError(
            f"max_device_memory must be a positive number of bytes or None, got "
            f"{max_device_memory!r}"
        )


def device_memory(
    device: torch.device | str, max_device_memory: int | None = None, *, resident: int = 0
) -> int | None:
    """Bytes a prune may use on ``device``: a CUDA device's free memory plus ``resident`` (the
    bytes of the model already on it, which its free memory leaves out), capped at
    ``max_device_memory``; on any other device ``max_device_memory`` (None: no known limit)."""
    device = torch.device(device)
    free: int | None = None
    if device.type == "cuda" and torch.cuda.is_available():
        free = int(torch.cuda.mem_get_info(device)[0]) + resident
    if max_device_memory is None:
        return free
    return max_device_memory if free is None else min(free, max_device_memory)


def working_margin(
    weight_bytes: int, *, batch_size: int = 1, seq_len: int = 512, vocab_size: int = 0
) -> int:
    """Memory a prune needs beyond the weights: :data:`MARGIN_SHARE` of them plus
    :data:`LOGIT_COPIES` float32 copies of one batch's logits."""
    logits = batch_size * seq_len * max(vocab_size, 0)
    return int(weight_bytes * MARGIN_SHARE) + LOGIT_COPIES * 4 * logits


def choose_offload(
    requested: str,
    weight_bytes: int,
    *,
    device: torch.device | str,
    max_device_memory: int | None = None,
    margin_bytes: int = 0,
    resident: int = 0,
) -> OffloadDecision:
    """The mode for ``requested`` (:data:`OFFLOAD_MODES`): ``"auto"`` is ``"sequential"`` when
    ``weight_bytes + margin_bytes`` exceed :func:`device_memory` (``resident``: bytes of the
    weights already on the device), else ``"none"``."""
    check_offload(requested, max_device_memory)
    needed = weight_bytes + margin_bytes
    available = device_memory(device, max_device_memory, resident=resident)

    def decide(mode: str, reason: str) -> OffloadDecision:
        return OffloadDecision(
            mode,
            requested,
            reason,
            weight_bytes=weight_bytes,
            needed_bytes=needed,
            device_bytes=available,
        )

    if requested != "auto":
        return decide(requested, f"offload {requested!r} requested")
    if available is None:
        return decide("none", f"no memory limit known for {torch.device(device)}")
    where = "max_device_memory" if available == max_device_memory else f"{device} free memory"
    sizes = f"weights + margin ({_size(needed)}) {{}} the {where} ({_size(available)})"
    if needed > available:
        return decide("sequential", sizes.format("exceed"))
    return decide("none", sizes.format("fit"))


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers (tied ones once; meta tensors counted)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


# --------------------------------------------------------------------------------------------
# Where block weights live and how one reaches the device


def _set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def _floating(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


class MappedWeights:
    """Tensor names of a safetensors checkpoint -> their file; :meth:`read` opens the files it
    needs, takes the tensors and closes the files again (a tensor read on the CPU in its stored
    dtype may share the file's pages until it is released)."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        self.files: dict[str, Path] = {}
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    self.files[key] = path

    def read(
        self, names: Mapping[str, str], dtype: torch.dtype, device: torch.device
    ) -> dict[str, torch.Tensor]:
        """``{target: tensor}`` for ``names`` (target -> checkpoint name), floats as ``dtype``."""
        from safetensors import safe_open

        by_file: dict[Path, list[tuple[str, str]]] = {}
        for target, key in names.items():
            by_file.setdefault(self.files[key], []).append((target, key))
        out: dict[str, torch.Tensor] = {}
        for path, items in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for target, key in items:
                    out[target] = _floating(f.get_tensor(key), dtype).to(device)
        return out


class Onloader:
    """Brings one block at a time to ``device`` (:meth:`onloaded`) and releases it after.

    Weights in host memory (``mapped`` None): the block is moved to ``device`` and back (nothing
    moves when it already lives there). Weights on disk (``mapped``): the block's parameters are
    meta tensors between uses; :meth:`onloaded` reads them from the checkpoint (``prefixes``:
    each block module -> its tensors' name prefix, kept by module so a surgery that renumbers
    the list changes nothing) in ``dtype``. ``peak_bytes``: the most block parameter bytes
    materialised at once."""

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        *,
        mapped: MappedWeights | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        loc = locate_blocks(model)
        self.device = torch.device(device)
        self.mapped = mapped
        self.dtype = dtype or next(model.parameters()).dtype
        self.prefixes = {id(b): f"{loc.path}.{i}." for i, b in enumerate(loc.blocks)}
        self.live = 0
        self.peak_bytes = 0
        self.hooked = False  # lorp.offload.onloading is active

    @property
    def weights(self) -> str:
        return "host" if self.mapped is None else "disk"

    @staticmethod
    def _bytes(block: nn.Module) -> int:
        return sum(p.numel() * p.element_size() for p in block.parameters() if not p.is_meta)

    def _load(self, block: nn.Module, device: torch.device) -> None:
        if self.mapped is None:
            block.to(device)
            return
        prefix = self.prefixes[id(block)]
        names = {n: prefix + n for n, p in block.named_parameters() if p.is_meta}
        for name, value in self.mapped.read(names, self.dtype, device).items():
            _set_param(block, name, value)
        block.to(device)  # the buffers (real, small)

    @contextlib.contextmanager
    def onloaded(self, block: nn.Module) -> Iterator[nn.Module]:
        home = next((p.device for p in block.parameters() if not p.is_meta), None)
        self._load(block, self.device)
        size = self._bytes(block)
        self.live += size
        self.peak_bytes = max(self.peak_bytes, self.live)
        try:
            yield block
        finally:
            self.live -= size
            if self.mapped is not None:
                for name, p in list(block.named_parameters()):
                    _set_param(block, name, torch.empty(p.shape, dtype=p.dtype, device="meta"))
            elif home is not None and home != self.device:
                block.to(home)

    def materialise(self, model: nn.Module, device: torch.device | str = "cpu") -> None:
        """Read every block of ``model`` still on disk into ``device`` (before saving it)."""
        for block in get_blocks(model):
            if any(p.is_meta for p in block.parameters()):
                self._load(block, torch.device(device))


@contextlib.contextmanager
def onloading(model: nn.Module) -> Iterator[None]:
    """While the body runs whole forwards of ``model``, every block is brought to the device
    when it is called and released when it returns (a prepared model, :func:`prepare`;
    otherwise nothing changes). For passes that go window by window through the whole model
    (the model-in-the-loop scoring): one block on the device at a time, each block onloaded
    once per forward instead of once per pass."""
    onloader = onloader_of(model)
    if onloader is None or onloader.hooked:  # not prepared, or already onloading (nested)
        yield
        return
    open_: dict[int, contextlib.ExitStack] = {}

    def pre(module: nn.Module, _args: Any) -> None:
        stack = contextlib.ExitStack()
        stack.enter_context(onloader.onloaded(module))
        open_[id(module)] = stack

    def post(module: nn.Module, _args: Any, _out: Any) -> None:
        stack = open_.pop(id(module), None)
        if stack is not None:
            stack.close()

    blocks = list(get_blocks(model))
    handles = [b.register_forward_pre_hook(pre, prepend=True) for b in blocks]
    handles += [b.register_forward_hook(post, always_call=True) for b in blocks]
    onloader.hooked = True
    try:
        yield
    finally:
        onloader.hooked = False
        for h in handles:
            h.remove()
        for stack in open_.values():
            stack.close()
        open_.clear()


def attach(model: nn.Module, onloader: Onloader) -> None:
    """Mark ``model`` for layer-wise passes with ``onloader`` (:func:`onloader_of`)."""
    object.__setattr__(model, _ATTR, onloader)


def onloader_of(model: nn.Module) -> Onloader | None:
    """The :class:`Onloader` :func:`attach` gave ``model`` (None: it runs in memory)."""
    found = getattr(model, _ATTR, None)
    return found if isinstance(found, Onloader) else None


def prepare(model: nn.Module, device: torch.device | str | None = None) -> Onloader:
    """Run ``model`` layer-wise from now on: its resident modules on ``device`` (default: where
    its input embeddings are), its blocks where they are; returns the attached onloader."""
    found = onloader_of(model)
    if found is not None:
        return found
    target = input_device(model) if device is None else torch.device(device)
    place_resident(model, target)
    onloader = Onloader(model, target)
    attach(model, onloader)
    return onloader


def place_resident(model: nn.Module, device: torch.device) -> None:
    """Move every parameter and buffer outside the block list to ``device`` (in place: tied
    weights stay tied)."""
    inside = {id(m) for b in get_blocks(model) for m in b.modules()}
    for module in model.modules():
        if id(module) in inside:
            continue
        for tensors in (module._parameters, module._buffers):
            for t in tensors.values():
                if t is not None and not t.is_meta and t.device != device:
                    t.data = t.data.to(device)


def load_skeleton(
    folder: Path, dtype: torch.dtype, device: torch.device, *, trust_remote_code: bool = False
) -> nn.Module | None:
    """The causal LM of the safetensors checkpoint ``folder`` with its blocks' parameters on the
    meta device and everything else read onto ``device`` in ``dtype``, an :class:`Onloader`
    attached that reads each block from the files when it runs. None when the checkpoint's
    tensor names are not the model's (then load it into host memory instead)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    mapped = MappedWeights(folder)
    if not mapped.files:
        return None
    try:
        config = AutoConfig.from_pretrained(
            folder, local_files_only=True, trust_remote_code=trust_remote_code
        )
        with init_empty_weights(include_buffers=False):
            model: nn.Module = AutoModelForCausalLM.from_config(
                config, dtype=dtype, trust_remote_code=trust_remote_code
            )
    except Exception as exc:
        raise ModelLoadError(f"could not build the model of {folder.name}: {exc}") from exc
    if (folder / "generation_config.json").is_file():  # as from_pretrained would read it
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(folder)  # type: ignore[assignment]
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"could not read the generation config of {folder.name}") from exc
    loc = locate_blocks(model)
    prefix = loc.path + "."
    block_names = [
        f"{prefix}{i}.{n}" for i, b in enumerate(loc.blocks) for n, _ in b.named_parameters()
    ]
    if any(name not in mapped.files for name in block_names):
        return None
    resident = {
        n: n for n, _ in model.named_parameters() if not n.startswith(prefix) and n in mapped.files
    }
    for name, value in mapped.read(resident, dtype, device).items():
        _set_param(model, name, value)
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    if any(p.is_meta for n, p in model.named_parameters() if not n.startswith(prefix)):
        return None
    place_resident(model, device)
    model.eval()
    attach(model, Onloader(model, device, mapped=mapped, dtype=dtype))
    return model


# --------------------------------------------------------------------------------------------
# The layer-wise engine


class _Stop(Exception):
    """Raised by the last block's recorder: the forward's blocks were all seen."""


@contextlib.contextmanager
def _stubbed(
    model: nn.Module, stub: Callable[[int, tuple[Any, ...], dict[str, Any]], Any]
) -> Iterator[None]:
    """Every block's forward replaced by ``stub(index, args, kwargs)`` (weights untouched)."""
    blocks = list(get_blocks(model))
    for i, block in enumerate(blocks):
        object.__setattr__(block, "forward", lambda *a, _i=i, **k: stub(_i, a, k))
    try:
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)


def _hidden_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise UnsupportedModelError(
            "a block did not receive hidden states [batch, tokens, dim] as its first input"
        )
    return hidden


@dataclass
class _Batch:
    """One batch of windows: ``ids``, the first block's input ``hidden`` and every block's call
    (``calls[b]``: the arguments after the hidden state and the keyword arguments)."""

    ids: torch.Tensor
    first: int  # index of its first window
    hidden: torch.Tensor
    calls: list[tuple[tuple[Any, ...], dict[str, Any], bool]] = field(default_factory=list)


@torch.no_grad()
def _record(model: nn.Module, ids: torch.Tensor, first: int, device: torch.device) -> _Batch:
    n = len(get_blocks(model))
    calls: list[Any] = [None] * n
    seen: dict[str, torch.Tensor] = {}

    def stub(i: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        hidden = _hidden_of(args, kwargs)
        if i == 0:
            seen["hidden"] = hidden
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        calls[i] = (args[1:], rest, bool(args))
        if i == n - 1:
            raise _Stop
        return hidden

    with _stubbed(model, stub), contextlib.suppress(_Stop):
        model(input_ids=ids.to(device), use_cache=False)
    if "hidden" not in seen or any(c is None for c in calls):
        raise UnsupportedModelError(
            f"{type(model).__name__}'s forward does not call its blocks in order; it cannot run "
            "layer-wise (offload sequential)"
        )
    return _Batch(ids=ids, first=first, hidden=seen["hidden"], calls=calls)


def _call(block: nn.Module, hidden: torch.Tensor, call: tuple[Any, ...]) -> torch.Tensor:
    args, kwargs, positional = call
    out = block(hidden, *args, **kwargs) if positional else block(hidden_states=hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _record_all(
    model: nn.Module, windows: torch.Tensor, batch_size: int, offset: int = 0
) -> list[_Batch]:
    device = input_device(model)
    out: list[_Batch] = []
    first = offset
    for ids in batches(windows, batch_size):
        out.append(_record(model, ids, first, device))
        first += ids.shape[0]
    return out


@torch.no_grad()
def _layerwise(
    model: nn.Module,
    onloader: Onloader,
    recorded: Sequence[_Batch],
    skipped: Mapping[str, set[int]],
    *,
    on_input: Callable[[int, _Batch, torch.Tensor], None] | None = None,
    stop_at: int | None = None,
    progress: Callable[[int], None] | None = None,
    initial: Sequence[torch.Tensor] | None = None,
) -> dict[str, list[torch.Tensor]]:
    """Run the ``recorded`` batches through the blocks one block at a time, once per stream
    (``skipped[stream]``: the blocks that stream skips); ``on_input(b, batch, hidden)`` sees
    the first stream's input of block b; stops before block ``stop_at``. ``initial``: every
    stream's hidden states per batch as they enter its first kept block (default: the
    embeddings' output). Returns every stream's final hidden states per batch. Streams whose
    input is the same tensor share the work."""
    blocks = get_blocks(model)
    device = onloader.device
    total = sum(b.hidden.numel() * b.hidden.element_size() for b in recorded) * len(skipped)
    store = device if total <= ACTIVATION_DEVICE_BYTES else torch.device("cpu")
    start = initial if initial is not None else [b.hidden for b in recorded]
    states = {s: [h.to(store) for h in start] for s in skipped}
    first = next(iter(skipped))
    for i in range(len(blocks)):
        if on_input is not None:
            for k, batch in enumerate(recorded):
                on_input(i, batch, states[first][k])
        if stop_at is not None and i >= stop_at:
            break
        active = [s for s in skipped if i not in skipped[s]]
        if active:
            with onloader.onloaded(blocks[i]) as block:
                for k, batch in enumerate(recorded):
                    done: dict[int, torch.Tensor] = {}
                    for s in active:
                        given = states[s][k]
                        if id(given) not in done:
                            done[id(given)] = _call(block, given.to(device), batch.calls[i]).to(
                                store
                            )
                        states[s][k] = done[id(given)]
        if progress is not None:
            progress(i + 1)
    return states


def _tail_log_probs(model: nn.Module, batch: _Batch, hidden: torch.Tensor) -> torch.Tensor:
    """The model's own output layers (final norm, head, soft-capping) on the final ``hidden``:
    log-probabilities as :func:`lorp._forward.log_probs` gives them."""
    device = input_device(model)

    def stub(i: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        given = _hidden_of(args, kwargs)
        return hidden.to(given.device) if i == 0 else given

    with _stubbed(model, stub):
        return log_probs(model, batch.ids, device)


@torch.no_grad()
def sequential_log_probs(
    model: nn.Module,
    batches_: Sequence[torch.Tensor],
    removed: Sequence[int],
    *,
    start: int = 0,
    inputs: Sequence[torch.Tensor] | None = None,
) -> list[Callable[[], torch.Tensor]]:
    """Next-token log-probabilities (as :func:`lorp._forward.log_probs` gives them) of each of
    ``batches_`` (token ids) with the blocks ``removed`` skipped, layer-wise: each kept block
    onloaded once for all of them; per batch a function that computes them from the batch's
    final hidden state when called (one batch's logits in memory at a time). ``start`` > 0
    with ``inputs`` (the dense input of block ``start`` per batch, e.g.
    :class:`lorp.scoring.WindowScorer`'s prefix cache): the blocks before ``start`` are skipped
    and the first kept block is fed ``inputs``."""
    onloader = _require(model)
    device = input_device(model)
    recorded = [_record(model, ids, 0, device) for ids in batches_]
    skipped = set(removed) | set(range(start))
    if start > 0 and (inputs is None or len(inputs) != len(recorded)):
        raise InvalidInputError(f"starting at block {start} needs its input for every batch")
    finals = _layerwise(
        model, onloader, recorded, {"run": skipped}, initial=inputs if start > 0 else None
    )["run"]
    return [
        functools.partial(_tail_log_probs, model, b, h)
        for b, h in zip(recorded, finals, strict=True)
    ]


def _require(model: nn.Module) -> Onloader:
    onloader = onloader_of(model)
    if onloader is None:
        raise InvalidInputError(
            "the model is not prepared for layer-wise passes (lorp.offload.prepare)"
        )
    return onloader


@torch.no_grad()
def sequential_similarity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    progress: ProgressCallback | None = None,
    keep: BlockInputs | None = None,
) -> np.ndarray:
    """:func:`lorp.similarity.capture_similarity`, layer-wise: the same S (and ``keep``'s block
    inputs), the same sums in the same order. Windows run in groups of at most
    :data:`CAPTURE_GROUP_BYTES` of normalised block inputs; each group onloads every block but
    the last once."""
    from .similarity import _Accumulator, similarity_from_sums

    windows = check_windows(windows)
    onloader = _require(model)
    n = len(get_blocks(model))
    if keep is not None:
        keep.start(windows, n)
    width = int(getattr(model.get_input_embeddings(), "embedding_dim", 0) or 1)  # type: ignore[operator]
    per_window = n * int(windows.shape[1]) * width * 4
    group = max(batch_size, CAPTURE_GROUP_BYTES // max(per_window, 1) // batch_size * batch_size)
    total = torch.zeros(n, n, dtype=torch.float64)
    seen = 0
    count = int(windows.shape[0])
    was_training = model.training
    model.eval()
    try:
        for start in range(0, count, group):
            recorded = _record_all(model, windows[start : start + group], batch_size, start)
            accs = [_Accumulator(n, keep) for _ in recorded]
            index = {id(b): a for b, a in zip(recorded, accs, strict=True)}

            def take(
                i: int, batch: _Batch, hidden: torch.Tensor, _index: dict[int, Any] = index
            ) -> None:
                _index[id(batch)].add(i, hidden)
                if keep is not None:
                    keep.add(i, batch.first, hidden)

            def report(done: int, _start: int = start, _size: int = len(recorded)) -> None:
                if progress is not None:
                    frac = (_start + min(group, count - _start) * done / n) / count
                    progress("calibration", frac, f"block {done}/{n}, windows {_start + 1}..")

            _layerwise(
                model,
                onloader,
                recorded,
                {"dense": set()},
                on_input=take,
                stop_at=n - 1,
                progress=report,
            )
            for acc in accs:
                total += acc.total
                seen += acc.windows
    finally:
        model.train(was_training)
    if keep is not None:
        keep.finish()
    return similarity_from_sums(total, seen, count)


@torch.no_grad()
def sequential_compare(
    model: nn.Module,
    removed: Sequence[int],
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    progress: ProgressCallback | None = None,
    stage: str = "evaluation",
    compensation: Any = None,
) -> Any:
    """:func:`lorp.quality.compare_pruned`, layer-wise: the dense and the pruned stream pass
    every block together (sharing the work until the first removed block), then the model's own
    output layers score each batch. ``compensation`` must be None (its folds need the whole
    model; a sequential prune refuses them at preflight)."""
    from .quality import compare_log_probs

    if compensation is not None:
        raise UnsupportedModelError("compensation and temperature folds cannot run layer-wise yet")
    windows = check_windows(windows)
    onloader = _require(model)
    n = len(get_blocks(model))
    recorded = _record_all(model, windows, batch_size)

    def report(done: int) -> None:
        if progress is not None:
            progress(stage, 0.9 * done / n, f"block {done}/{n} (dense and pruned)")

    finals = _layerwise(
        model, onloader, recorded, {"dense": set(), "pruned": set(removed)}, progress=report
    )
    pairs = iter(
        (
            _tail_log_probs(model, b, finals["dense"][k]),
            _tail_log_probs(model, b, finals["pruned"][k]),
        )
        for k, b in enumerate(recorded)
    )
    return compare_log_probs(windows, batch_size, lambda _batch: next(pairs), progress, stage)


__all__ = [
    "ACTIVATION_DEVICE_BYTES",
    "CAPTURE_GROUP_BYTES",
    "LOGIT_COPIES",
    "OFFLOAD_MODES",
    "MappedWeights",
    "OffloadDecision",
    "Onloader",
    "attach",
    "check_offload",
    "choose_offload",
    "device_memory",
    "load_skeleton",
    "onloader_of",
    "onloading",
    "parameter_bytes",
    "place_resident",
    "prepare",
    "sequential_compare",
    "sequential_log_probs",
    "sequential_similarity",
    "working_margin",
]
