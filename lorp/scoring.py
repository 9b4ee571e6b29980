"""The scoring engine: removal sets measured on scoring windows, raced, and what passes cost.

A candidate removal set R is measured by one forward pass of the model with the blocks in R
skipped (:func:`lorp.surgery.pruned_view`) over the *scoring windows* (a few short token windows
of the calibration text that follow the calibration windows, never the evaluation text; the
pipeline draws them, see :func:`lorp.pipeline.prune`), compared with the dense model's next-token
log-probabilities, which are computed once and cached (memory: windows x (tokens - 1) x
vocabulary float32, e.g. 200 MB for 4 x 256 tokens and SmolLM2's 49,152 tokens). Scores are
cached per removal set, so a set is never measured twice. One such forward is a *pass*; every
method records how many it ran. A pass need not start at the embeddings: nothing changes before
the first removed block, so the dense hidden states entering the blocks where the candidates
start are stored once (:meth:`WindowScorer.prefetch`) and each pass resumes from there (same
numbers, fewer blocks run: for SLEB on SmolLM2 about half of them). A model prepared for
sequential onloading (:mod:`lorp.offload`) runs each candidate pass layer-wise (every kept block
onloaded once for the pass's windows, :func:`lorp.offload.sequential_log_probs`) and the dense
and prefix passes with one block on the device at a time (:func:`lorp.offload.onloading`), with
the same numbers.

:func:`race` measures several candidate sets on leading windows first and finishes only those
close to the best. The cost model (:func:`affordable_passes`, :func:`local_search_passes`) sizes
the pass budgets of the model-in-the-loop methods (:mod:`lorp.methods`) in units of the
similarity capture. Used by the methods and by :mod:`lorp.compensation` (strength tuning).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._blocks import get_blocks
from ._forward import check_windows, head_at, input_device, log_probs
from .errors import InvalidInputError
from .inputs import hidden_bytes, resumed
from .offload import onloader_of, onloading, sequential_log_probs
from .progress import ProgressCallback
from .surgery import pruned_view

__all__ = [
    "DEFAULT_PREFIX_BYTES",
    "RACE_MARGIN",
    "RaceResult",
    "WindowScore",
    "WindowScorer",
    "affordable_passes",
    "local_search_passes",
    "race",
]

#: Default memory for :class:`WindowScorer`'s dense prefix cache.
DEFAULT_PREFIX_BYTES = 1 << 30

#: How far (nats of the objective) behind the best a candidate may be on the first windows of
#: a race and still be finished (:func:`race`).
RACE_MARGIN = 0.25


@dataclass(frozen=True)
class WindowScore:
    """A removal set measured on the scoring windows.

    ``nll``: mean next-token NLL (nats); ``kl``: mean KL(dense || pruned) per prediction and
    ``top1_agreement`` with the dense model (``None`` when the scorer keeps no dense reference);
    ``seconds``: time of the pass that measured it.
    """

    removed: tuple[int, ...]
    nll: float
    kl: float | None
    top1_agreement: float | None
    tokens: int
    seconds: float
    start_block: int = 0  # the pass started at this block's stored dense input (0: embeddings)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll) if self.nll < 700 else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {
            "removed": list(self.removed),
            "nll": self.nll,
            "ppl": self.ppl,
            "kl": self.kl,
            "top1_agreement": self.top1_agreement,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "start_block": self.start_block,
        }


class _StopForward(Exception):
    """Raised in a pre-hook once the deepest block input a prefix pass needs has been stored."""


@dataclass
class _Sums:
    """Per-batch sums of one removal set's measurement so far (batches 0..len-1)."""

    nll: list[float]
    kl: list[float]
    agree: list[int]
    seconds: float = 0.0
    start_block: int = 0
    losses: list[torch.Tensor] = field(default_factory=list)  # per batch (keep_losses)


class WindowScorer:
    """Measures removal sets on fixed scoring windows ``[W, T]``, with caches.

    ``reference=True`` keeps the dense model's next-token predictions (one extra pass, run on
    first need) so top-1 agreement, and with ``keep_distribution=True`` also KL, can be
    measured; ``keep_distribution=False`` keeps only the dense arg-max token per position (a
    few bytes per token instead of the whole vocabulary: use it for long evaluations or big
    vocabularies). ``reference=False`` measures NLL only.

    Leading windows: ``score(removed, windows=m)`` measures a set on the first ``m`` windows
    only (rounded up to whole batches); a later call with more windows runs only the windows
    not yet run, so racing candidates on a few windows and finishing the survivors costs no
    window twice. :attr:`passes` counts the distinct sets measured (however many windows),
    ``info()["pass_equivalents"]`` the windows actually run, in whole passes.

    ``stride`` (NLL only, ``reference=False``): score every ``stride``-th next-token prediction
    of each window; the blocks still run on every token, the output head and its softmax only
    on the scored positions (for a large vocabulary the head costs as much as the blocks).
    ``keep_losses``: keep every scored prediction's NLL (:meth:`losses`), e.g. to compare two
    sets or weight variants prediction by prediction.

    Dense prefix cache: a removal set R changes nothing before its first removed block f, so
    the hidden states entering block f are the dense model's. :meth:`prefetch` stores the dense
    block inputs at the first removed blocks of the sets about to be scored (one partial dense
    pass, or none extra when the dense reference pass is still to run), and :meth:`score` then
    starts each pass at the deepest stored block input at or before f instead of at the
    embeddings. Results are the same as a whole pass (same operations on the same values).
    Memory: windows × tokens × hidden size × 4 bytes per stored block, at most
    ``prefix_bytes`` in all (``0`` turns the cache off).

    ``progress`` receives ``(stage, fraction, message)`` after every pass; ``planned``
    (settable) is the number of passes the caller expects, for the fraction.
    """

    def __init__(
        self,
        model: nn.Module,
        windows: torch.Tensor,
        *,
        batch_size: int = 1,
        reference: bool = True,
        keep_distribution: bool = True,
        prefix_bytes: int = DEFAULT_PREFIX_BYTES,
        progress: ProgressCallback | None = None,
        stage: str = "selection",
        stride: int = 1,
        keep_losses: bool = False,
    ) -> None:
        self.model = model
        self.windows = check_windows(windows)
        if self.windows.shape[1] < 2:
            raise InvalidInputError("scoring windows need at least 2 tokens")
        if isinstance(prefix_bytes, bool) or not isinstance(prefix_bytes, int) or prefix_bytes < 0:
            raise InvalidInputError(f"prefix_bytes must be an integer >= 0, got {prefix_bytes!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidInputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise InvalidInputError(f"stride must be an integer >= 1, got {stride!r}")
        if stride > 1 and reference:
            raise InvalidInputError("a stride > 1 scores NLL only: pass reference=False")
        self.batch_size = batch_size
        self.stride = stride
        self.keep_losses = keep_losses
        # predictions scored per window: every stride-th position (its next token)
        self._positions = torch.arange(0, int(self.windows.shape[1]) - 1, stride)
        self.reference = reference
        self.keep_distribution = keep_distribution
        self.prefix_bytes = prefix_bytes
        self.progress = progress
        self.stage = stage
        self.num_layers = len(get_blocks(model))
        self.num_batches = -(-int(self.windows.shape[0]) // batch_size)
        self.passes = 0
        self.prefix_passes = 0
        self.batches_run = 0
        self.seconds = 0.0
        self.planned: int | None = None
        self._dense: list[torch.Tensor] | None = None  # per batch: log-probs, or arg-max ids
        self._prefix: dict[int, list[torch.Tensor]] = {}  # block -> per-batch dense inputs
        self._sums: dict[tuple[int, ...], _Sums] = {}
        self._cache: dict[tuple[int, ...], WindowScore] = {}  # sets measured on every window

    @property
    def tokens(self) -> int:
        """Predictions per pass."""
        return int(self.windows.shape[0]) * int(self._positions.numel())

    def _nll(
        self, batch: torch.Tensor, device: torch.device
    ) -> tuple[float, torch.Tensor, torch.Tensor]:
        """Summed NLL of ``batch``'s scored predictions, their log-probabilities and each
        prediction's NLL ``[B, P]``. With a stride the output head runs on the scored
        positions only (a pre-hook on it)."""
        if self.stride == 1:
            return _scored(log_probs(self.model, batch, device), batch)
        pos = self._positions.to(device)
        with head_at(self.model, pos):
            logits = self.model(input_ids=batch.to(device), use_cache=False).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        target = batch[:, pos.cpu() + 1].to(logp.device)
        per = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        return float(per.sum()), logp, per

    def info(self) -> dict[str, Any]:
        return {
            "windows": int(self.windows.shape[0]),
            "seq_len": int(self.windows.shape[1]),
            "tokens": self.tokens,
            "passes": self.passes,
            "pass_equivalents": round(self.batches_run / self.num_batches, 3),
            "prefix_passes": self.prefix_passes,
            "prefix_blocks": sorted(self._prefix),
            "seconds": self.seconds,
        }

    def cached(self, removed: Sequence[int]) -> bool:
        """Whether ``removed`` has been measured on every window."""
        return self._key(removed) in self._cache

    def losses(self, removed: Sequence[int]) -> torch.Tensor:
        """Every scored prediction's NLL for ``removed`` (measured on every window, with
        ``keep_losses=True``), window by window, float32 on the CPU."""
        key = self._key(removed)
        sums = self._sums.get(key)
        if not self.keep_losses or sums is None or len(sums.losses) < self.num_batches:
            raise InvalidInputError(
                f"no per-prediction losses of {list(key)} on every window "
                "(score it first on a scorer with keep_losses=True)"
            )
        return torch.cat([x.reshape(-1) for x in sums.losses])

    def forget(self, removed: Sequence[int]) -> None:
        """Drop what was measured for ``removed`` (the dense prefix and reference stay), so the
        same set can be measured again with other weights (e.g. another compensation
        strength, :func:`lorp.compensation.tune_strength`)."""
        key = self._key(removed)
        self._sums.pop(key, None)
        self._cache.pop(key, None)

    def _key(self, removed: Sequence[int]) -> tuple[int, ...]:
        key = tuple(sorted({int(i) for i in removed}))
        for i in key:
            if not 0 <= i < self.num_layers:
                raise InvalidInputError(f"block {i} does not exist (0..{self.num_layers - 1})")
        return key

    def _upto(self, windows: int | None) -> int:
        """Batches covering the first ``windows`` windows (``None``: all)."""
        if windows is None:
            return self.num_batches
        if isinstance(windows, bool) or not isinstance(windows, int) or windows < 1:
            raise InvalidInputError(f"windows must be an integer >= 1, got {windows!r}")
        return min(self.num_batches, -(-windows // self.batch_size))

    def _done(self, key: tuple[int, ...]) -> int:
        sums = self._sums.get(key)
        return 0 if sums is None else len(sums.nll)

    def _batch(self, index: int) -> torch.Tensor:
        return self.windows[index * self.batch_size : (index + 1) * self.batch_size]

    # ---------------------------------------------------------------------------------------
    # dense prefix cache
    # ---------------------------------------------------------------------------------------

    def _bytes_per_block(self) -> int:
        return int(self.windows.numel()) * hidden_bytes(self.model)

    def _plan_prefix(self, starts: set[int]) -> list[int]:
        """Which of ``starts`` (block indices > 0, not yet stored) to store within the budget:
        all when they fit, else evenly spaced ones from the shallowest."""
        todo = sorted(s for s in starts if s > 0 and s not in self._prefix)
        per_block = self._bytes_per_block()
        if not todo or per_block <= 0:
            return []
        room = self.prefix_bytes // per_block - len(self._prefix)
        if room <= 0:
            return []
        if len(todo) > room:
            step = len(todo) / room
            todo = sorted({todo[int(i * step)] for i in range(room)})
        return todo

    def _start_for(
        self,
        key: tuple[int, ...],
        upto: int,
        stored: Iterable[int] = (),
        changed: int | None = None,
    ) -> int:
        """Deepest block at or before the first removed one (and at or before ``changed``)
        whose dense input is stored for batches 0..upto-1 (or is in ``stored``); 0: none, or no
        block is kept after it."""
        if len(key) == self.num_layers - key[0]:  # every block from the first removed one on
            return 0
        last = key[0] if changed is None else min(key[0], changed)
        ready = {s for s, states in self._prefix.items() if len(states) >= upto}
        return max((s for s in ready | set(stored) if s <= last), default=0)

    def prefetch(
        self,
        removal_sets: Iterable[Sequence[int]],
        windows: int | None = None,
        *,
        passes: int = 1,
    ) -> None:
        """Store the dense block inputs that the given sets can start from, for the first
        ``windows`` windows (``None``: all) — the windows :meth:`score` is about to run, each set
        ``passes`` times (e.g. one set measured with several weight variants, :meth:`forget`).

        Runs the dense reference pass when it is still due (storing the block inputs on the
        way, at no extra cost), else one partial dense pass over the batches still missing
        that stops at the deepest block needed — only when it saves work: the blocks it runs
        must be fewer than the blocks the sets' passes skip.
        """
        if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
            raise InvalidInputError(f"passes must be an integer >= 1, got {passes!r}")
        upto = self._upto(windows)
        keys = [k for k in (self._key(s) for s in removal_sets) if k and self._done(k) < upto]
        if not keys:
            return
        firsts = {k[0] for k in keys if len(k) < self.num_layers - k[0]}
        new = self._plan_prefix(firsts)
        short = sorted(s for s in firsts if s in self._prefix and len(self._prefix[s]) < upto)
        todo = sorted(set(new) | set(short))
        if not todo:
            return
        if self.reference and self._dense is None:
            self._dense_pass(todo)
            return
        lo = min(len(self._prefix.get(s, [])) for s in todo)
        gain = passes * sum(
            (upto - self._done(k)) * (self._start_for(k, upto, todo) - self._start_for(k, upto))
            for k in keys
        )
        if gain <= max(todo) * (upto - lo):
            return
        self._prefix_pass(todo, lo, upto)

    @contextlib.contextmanager
    def _storing(self, starts: Sequence[int], stop: bool) -> Iterator[list[int]]:
        """Store the dense inputs of blocks ``starts`` during the forwards run in the body, for
        the batch whose index is the yielded list's only item (set it before each forward;
        batches already stored are left alone). ``stop``: end each forward after the deepest.
        Nothing is kept if the body fails."""
        blocks = get_blocks(self.model)
        last = max(starts) if starts else -1
        before = {s: len(self._prefix[s]) for s in starts if s in self._prefix}
        for s in starts:
            self._prefix.setdefault(s, [])
        current = [0]

        def make(index: int) -> Callable[..., None]:
            def pre_hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                hidden = args[0] if args else kwargs.get("hidden_states")
                if not isinstance(hidden, torch.Tensor):
                    raise InvalidInputError(f"block {index} did not receive hidden states")
                states = self._prefix[index]
                if len(states) == current[0]:
                    states.append(hidden.detach().clone())
                if stop and index == last:
                    raise _StopForward

            return pre_hook

        handles = [blocks[s].register_forward_pre_hook(make(s), with_kwargs=True) for s in starts]
        try:
            yield current
        except BaseException:
            for s in starts:
                if s in before:
                    del self._prefix[s][before[s] :]
                else:
                    self._prefix.pop(s, None)
            raise
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def _prefix_pass(self, starts: Sequence[int], lo: int, hi: int) -> None:
        """Partial dense pass over batches lo..hi-1 storing the inputs of ``starts`` (each
        forward stops after the deepest)."""
        device = input_device(self.model)
        start = time.perf_counter()
        with onloading(self.model), self._storing(starts, stop=True) as cur:
            for i in range(lo, hi):
                cur[0] = i
                with contextlib.suppress(_StopForward):
                    self.model(input_ids=self._batch(i).to(device), use_cache=False)
        self.prefix_passes += 1
        self.seconds += time.perf_counter() - start

    @torch.no_grad()
    def _dense_pass(self, starts: Sequence[int] = ()) -> None:
        """The dense model over every window: its score, its reference predictions (when
        kept) and the block inputs at ``starts``."""
        device = input_device(self.model)
        start = time.perf_counter()
        sums = _Sums([], [], [])
        keep: list[torch.Tensor] = []
        with onloading(self.model), self._storing(starts, stop=False) as cur:
            for i in range(self.num_batches):
                cur[0] = i
                batch = self._batch(i)
                nll, logp, per = self._nll(batch, device)
                sums.nll.append(nll)
                if self.keep_losses:
                    sums.losses.append(per.detach().float().cpu())
                sums.kl.append(0.0)
                sums.agree.append(int(batch.shape[0]) * int(self._positions.numel()))
                if self.reference:
                    keep.append(logp if self.keep_distribution else logp.argmax(-1))
        sums.seconds = time.perf_counter() - start
        if self.reference:
            self._dense = keep
        self._sums[()] = sums
        self.passes += 1
        self.batches_run += self.num_batches
        self.seconds += sums.seconds
        self._report(())

    @contextlib.contextmanager
    def _resumed(self, key: tuple[int, ...], start: int) -> Iterator[list[int]]:
        """The model with ``key`` removed and every block before ``start`` skipped, the first
        kept block fed the stored dense input of block ``start`` for the batch whose index is
        the yielded list's only item (set it before each forward)."""
        states = self._prefix[start]
        current = [0]
        with resumed(self.model, key, start, lambda: states[current[0]]):
            yield current

    def use_inputs(self, block: int, states: torch.Tensor) -> None:
        """Take ``states`` ``[W, T, d]`` — the dense input of ``block`` for this scorer's
        windows, kept by an earlier pass (:class:`lorp.inputs.BlockInputs`) — as the prefix
        cache's entry for ``block``, so no prefix pass is run for it."""
        if not 0 < block < self.num_layers:
            raise InvalidInputError(f"block must be in 1..{self.num_layers - 1}, got {block}")
        if states.dim() != 3 or tuple(states.shape[:2]) != tuple(self.windows.shape):
            raise InvalidInputError(
                f"states {tuple(states.shape)} do not match the windows {tuple(self.windows.shape)}"
            )
        self._prefix[block] = list(states.split(self.batch_size))

    # ---------------------------------------------------------------------------------------
    # scoring
    # ---------------------------------------------------------------------------------------

    def _report(self, key: tuple[int, ...]) -> None:
        if self.progress is not None:
            frac = min(1.0, self.passes / self.planned) if self.planned else 0.0
            self.progress(
                self.stage,
                frac,
                f"scoring pass {self.passes}"
                + (f"/{self.planned}" if self.planned else "")
                + f": removed {list(key)}",
            )

    def _result(self, key: tuple[int, ...], upto: int) -> WindowScore:
        sums = self._sums[key]
        covered = min(int(self.windows.shape[0]), upto * self.batch_size)
        n = covered * int(self._positions.numel())
        nll = sum(sums.nll[:upto]) / n
        if not self.reference:
            kl, top1 = None, None
        else:
            kl = sum(sums.kl[:upto]) / n if self.keep_distribution else None
            top1 = sum(sums.agree[:upto]) / n
        result = WindowScore(key, nll, kl, top1, n, sums.seconds, sums.start_block)
        if upto == self.num_batches:
            self._cache[key] = result
        return result

    @torch.no_grad()
    def score(
        self, removed: Sequence[int], windows: int | None = None, *, changed: int | None = None
    ) -> WindowScore:
        """Measure the model with ``removed`` blocks skipped on the first ``windows`` windows
        (``None``: all; cached per set, windows already run are not run again).

        ``changed``: the first block whose weights differ from the dense model's the prefix
        cache and reference were taken with (e.g. a block with a compensation folded in,
        :func:`lorp.compensation.compensated_view`); passes then start at or before it. The
        caches are per removal set, so score one weight variant per set on a scorer."""
        key = self._key(removed)
        upto = self._upto(windows)
        if upto == self.num_batches and key in self._cache:
            return self._cache[key]
        if not key or (self.reference and self._dense is None):
            if () not in self._sums:
                self._dense_pass()
            if not key:
                return self._result((), upto)
        done = self._done(key)
        if done < upto:
            self._run(key, done, upto, changed)
        return self._result(key, upto)

    def _run(self, key: tuple[int, ...], lo: int, hi: int, changed: int | None = None) -> None:
        """Measure ``key`` on batches lo..hi-1 and add them to its sums."""
        dense = self._dense if self.reference else None
        device = input_device(self.model)
        start_block = self._start_for(key, hi, changed=changed)
        first = key not in self._sums
        sums = self._sums.setdefault(key, _Sums([], [], [], start_block=start_block))
        start = time.perf_counter()
        layerwise: list[Callable[[], torch.Tensor]] | None = None
        if onloader_of(self.model) is not None and self.stride == 1:
            # a model larger than the device: every kept block onloaded once for the batches
            layerwise = sequential_log_probs(
                self.model,
                [self._batch(i) for i in range(lo, hi)],
                key,
                start=start_block,
                inputs=self._prefix[start_block][lo:hi] if start_block else None,
            )
        if layerwise is not None:
            passes: contextlib.AbstractContextManager[list[int]] = contextlib.nullcontext([0])
        elif start_block:
            passes = self._resumed(key, start_block)
        else:
            passes = _plain(self.model, key)
        try:
            with onloading(self.model), passes as cur:
                for i in range(lo, hi):
                    cur[0] = i
                    batch = self._batch(i)
                    if layerwise is not None:
                        nll, logp, per = _scored(layerwise[i - lo](), batch)
                    else:
                        nll, logp, per = self._nll(batch, device)
                    kl = 0.0
                    agree = 0
                    if dense is not None:
                        ref = dense[i].to(logp.device)
                        if self.keep_distribution:
                            kl = float((ref.exp() * (ref - logp)).sum())
                            agree = int((ref.argmax(-1) == logp.argmax(-1)).sum())
                        else:
                            agree = int((ref == logp.argmax(-1)).sum())
                    sums.nll.append(nll)
                    sums.kl.append(kl)
                    sums.agree.append(agree)
                    if self.keep_losses:
                        sums.losses.append(per.detach().float().cpu())
                    self.batches_run += 1
        except BaseException:
            if first:
                self._sums.pop(key, None)
            else:
                for part in (sums.nll, sums.kl, sums.agree, sums.losses):
                    del part[lo:]
            raise
        finally:
            took = time.perf_counter() - start
            sums.seconds += took
            self.seconds += took
        if first:
            self.passes += 1
        self._report(key)


def _scored(logp: torch.Tensor, batch: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Summed NLL of every next-token prediction of ``batch``, ``logp`` and each one's NLL."""
    per = -logp.gather(-1, batch[:, 1:].to(logp.device).unsqueeze(-1)).squeeze(-1)
    return float(per.sum()), logp, per


@contextlib.contextmanager
def _plain(model: nn.Module, key: tuple[int, ...]) -> Iterator[list[int]]:
    """The model with ``key`` removed, whole pass (the yielded batch index is unused)."""
    with pruned_view(model, key):
        yield [0]


# --------------------------------------------------------------------------------------------
# Cost model
# --------------------------------------------------------------------------------------------


def affordable_passes(
    model: nn.Module,
    calibration_tokens: int,
    scoring_tokens: int,
    num_remove: int,
    *,
    share: float = 0.75,
) -> int:
    """How many scoring passes cost about ``share`` of the similarity capture (estimate).

    Cost per token is taken proportional to the parameters a token goes through (attention's
    quadratic term ignored): the capture runs N−1 blocks (it stops at the last block's input)
    and no LM head; a scoring pass runs the N−k kept blocks and the LM head. The default share
    of 0.75 leaves room for what the estimate ignores (a pass's softmax/KL over the vocabulary),
    so auto's capture + selection stays within about 2× the capture alone. Deterministic (no
    timing), so the same inputs always give the same selection.
    """
    blocks = get_blocks(model)
    n = len(blocks)
    per_block = sum(p.numel() for p in blocks.parameters()) / max(n, 1)
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    weight = getattr(head, "weight", None)
    head_params = int(weight.numel()) if isinstance(weight, torch.Tensor) else 0
    capture = share * calibration_tokens * (n - 1) * per_block
    per_pass = scoring_tokens * ((n - num_remove) * per_block + head_params)
    if per_pass <= 0:
        return 0
    return max(0, math.floor(capture / per_pass))


def local_search_passes(
    model: nn.Module, calibration_tokens: int, scoring_shape: tuple[int, int], num_remove: int
) -> int:
    """``lorp-loss``'s local-search pass budget: passes on its search windows (half the scoring
    windows, half as long) costing about one similarity capture (:func:`affordable_passes`
    with share 1.0), so that capture + starting points + search stay within about 3× LoRP's
    selection time."""
    windows, seq_len = scoring_shape
    search_tokens = max(1, windows // 2) * max(2, seq_len // 2)
    return affordable_passes(model, calibration_tokens, search_tokens, num_remove, share=1.0)


# --------------------------------------------------------------------------------------------
# Racing candidate removal sets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RaceResult:
    """Candidates raced on leading windows: every candidate's latest score (``scores``, in the
    given order), the ones still in the race after the first round (``alive``) and the
    windows of that round (``first_windows``; 0 when there was no first round)."""

    scores: dict[tuple[int, ...], WindowScore]
    alive: list[tuple[int, ...]]
    first_windows: int

    def best(self, objective: str) -> tuple[int, ...]:
        """The alive candidate with the lowest ``objective`` (ties: the first given)."""
        return min(self.alive, key=lambda k: _objective(self.scores[k], objective))


def _objective(score: WindowScore, objective: str) -> float:
    value = score.nll if objective == "nll" else score.kl
    if value is None:
        raise InvalidInputError(f"objective {objective!r} needs a scorer with a dense reference")
    return value


def race(
    scorer: WindowScorer,
    sets: Iterable[Sequence[int]],
    *,
    objective: str = "nll",
    first_windows: int | None = None,
    margin: float = RACE_MARGIN,
) -> RaceResult:
    """Measure candidate removal sets, dropping hopeless ones early (successive halving with a
    margin instead of a fixed fraction).

    Round 1 measures every set on the first ``first_windows`` scoring windows (default a
    quarter of them, at least 1); a set whose ``objective`` there is more than ``margin`` nats
    above the round's best is out. Round 2 finishes the rest on the remaining windows (the
    windows of round 1 are not run again); a lone survivor is not finished (it has won).
    Per-window losses of different removal sets on the same text move together, so a gap of
    ``margin`` (default 0.25 nats, a perplexity ratio of 1.28) on a few windows is far outside
    the noise of their difference: on SmolLM2's 8 x 512 scoring windows at 3/6/9 removed
    blocks the paired per-window differences between the two closest candidates varied by
    about 0.05 nats, and every set dropped in round 1 was also worse on all eight windows.
    """
    keys = list(dict.fromkeys(scorer._key(s) for s in sets))
    if not keys:
        raise InvalidInputError("race needs at least one candidate")
    if objective not in ("nll", "kl"):
        raise InvalidInputError(f"objective must be 'nll' or 'kl', got {objective!r}")
    if not margin >= 0:  # also refuses NaN; math.inf: nobody is dropped
        raise InvalidInputError(f"margin must be a number >= 0, got {margin!r}")
    total = int(scorer.windows.shape[0])
    m = max(1, total // 4) if first_windows is None else first_windows
    if scorer._upto(m) >= scorer.num_batches or len(keys) == 1:
        scorer.prefetch(keys)
        return RaceResult({k: scorer.score(k) for k in keys}, keys, 0)
    scorer.prefetch(keys, windows=m)
    scores = {k: scorer.score(k, windows=m) for k in keys}
    lead = min(_objective(v, objective) for v in scores.values())
    alive = [k for k in keys if _objective(scores[k], objective) - lead <= margin]
    if len(alive) > 1:
        scorer.prefetch(alive)
        scores.update({k: scorer.score(k) for k in alive})
    return RaceResult(scores, alive, m)
