"""Model-in-the-loop selection: methods that run the model on a few scoring windows.

The S-only methods (:mod:`lorp.selection`) decide from the similarity matrix alone. The methods
here also measure candidate removals on *scoring windows*: a few short token windows of the
calibration text that follow the calibration windows (never the evaluation text; the pipeline
draws them, see :func:`lorp.pipeline.prune`). A candidate removal set R is measured by one
forward pass of the model with the blocks in R skipped (:func:`lorp.surgery.pruned_view`) over
the scoring windows, compared with the dense model's next-token log-probabilities, which are
computed once and cached (memory: windows × (tokens − 1) × vocabulary float32, e.g. 200 MB for
4 × 256 tokens and SmolLM2's 49,152 tokens). Scores are cached per removal set, so a set is
never measured twice. One such forward is a *pass*; every method records how many it ran.
A pass need not start at the embeddings: nothing changes before the first removed block, so
the dense hidden states entering the blocks where the candidates start are stored once
(:meth:`WindowScorer.prefetch`) and each pass resumes from there (same numbers, fewer blocks
run: for SLEB on SmolLM2 about half of them).

``sleb``
    SLEB-style iterative removal. Start from the dense model; at each of k steps try removing
    every remaining interior block b (1..N−2, like every method here the first and last blocks
    are protected) on top of the blocks already removed, and remove the b with the lowest mean
    NLL on the scoring windows (ties: the shallower block). Needs no similarity matrix.
    Cost: Σ_{s=0}^{k−1} (N−2−s) passes (SmolLM2, N=30, k=9: 216 passes) — far more than LoRP.
``lorp-kl``
    LoRP's structure with a measured objective. Phases (RLS policy K or a forced K, spectral
    clustering) and the two-stage allocation are LoRP's, so every phase loses exactly as many
    blocks as in LoRP ("quotas") and the slots are filled in LoRP's removal order. For each slot
    of phase c the candidates are the first ``candidates_per_slot`` (default 3) not yet removed
    members of c's LoRP candidate list (redundancy order); each candidate is measured by mean
    KL(dense || pruned) on the scoring windows with the blocks chosen so far plus the candidate
    removed, and the lowest KL wins (ties: LoRP's order). A slot with one candidate left is
    filled without measuring. Cost: 1 dense pass + at most k × candidates_per_slot passes.
``lorp-loss``
    LoRP's phase structure with the measured loss as the objective (the companion study's point:
    the objective matters more than the search). (1) Starting points: LoRP at its policy K (or
    the forced K) and the other S-based selections (LoRP at K = 2..4, ShortGPT, LLM-Streamline),
    raced by mean NLL on the scoring windows (default 8 x 512 tokens; :func:`race`); the
    lowest is the start. (2) Best-improvement local search from the start on cheaper *search
    windows* (the first half of the scoring windows, each cut to half its length): a move
    swaps one block — an end of a run of removed blocks leaves, and either the block just past
    a run's end (the run slides) or one of the ``candidates_per_phase`` (default 2) kept blocks
    with the highest local redundancy S[b, b+1] in each LoRP phase comes in; every move of a
    round is measured, the best is taken if it lowers the loss, and the search stops when no
    move helps or ``max_passes`` is spent (:func:`local_search_passes`: about one capture's
    worth). (3) The search result replaces the start only if the full scoring windows agree
    that its loss is lower, so the method never returns a set that measured worse than the
    best S-based selection. Cost: the raced S-based candidates (about auto's) + at most
    ``max_passes`` cheap passes + 2; about 2-3x LoRP's selection time. (Racing the moves too,
    to afford more rounds in the same time, lowered the search-window loss further but raised
    WikiText-2 perplexity on SmolLM2 at 3 blocks, 44.02 -> 46.67: more search on a few
    calibration windows over-fits them, so the moves are measured in full. Scoring only every
    4th prediction on Gemma-3-270M, whose 262k-token output head dominates a pass, was tried
    too: 3.0-3.2x LoRP's time instead of 4.2-4.7x, but worse sets at 2 and 5 blocks, e.g.
    WikiText-2 587.5 instead of 273.0 at 5; so every prediction is scored.)
``auto``
    Compute candidate selections from S with every S-based method — LoRP with the policy K,
    LoRP with K forced to each other value in 2..4, ShortGPT, LLM-Streamline — plus ``lorp-kl``
    when affordable and a dense reference is kept (below), dedupe them, measure each distinct
    removal set by its mean next-token loss (NLL) on the scoring windows (default 8 x 512
    tokens; ``objective="kl"`` ranks by KL(dense || pruned) instead, at one more pass) and keep
    the lowest (ties: the order above). The sets are raced (:func:`race`): all are measured on
    the first quarter of the windows, those more than :data:`RACE_MARGIN` (0.25 nats) behind
    the best there are dropped, the rest finish (a lone survivor has won); on SmolLM2 at 3, 6
    and 9 removed blocks this cut auto's scoring time (relative to the capture) by 30 %, 36 %
    and 78 % and changed no choice. NLL is the default because it is what held-out perplexity
    measures, needs no dense pass, and on SmolLM2 ranked the candidates as WikiText-2
    perplexity does at 3, 6 and 9 removed blocks (KL on 4 x 256 tokens did not at 3). All
    candidates with their KL, NLL/perplexity, top-1 agreement and times are recorded in
    ``Selection.details["candidates"]``. Affordable: with ``max_passes`` given (the pipeline
    passes :func:`affordable_passes`, sized so that auto's scoring costs about 3/4 of the
    similarity capture, i.e. auto's capture + selection stays near 2× LoRP's), lorp-kl joins
    when its planned passes fit in what the S-based candidates leave; its per-slot candidate
    count is lowered (down to 2) to fit, else it is left out and the reason recorded. Caveat:
    lorp-kl chose its blocks on the same scoring windows auto compares on, so its score is an
    in-sample one; the report's quality measurement (evaluation text or other held-out windows)
    is not affected.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import nn

from ._blocks import get_blocks
from ._forward import check_windows, input_device
from .errors import InvalidInputError
from .inputs import hidden_bytes, resumed
from .quality import _log_probs
from .selection import (
    METHODS,
    Selection,
    policy_num_clusters,
    representation_locality_score,
    resolve_budget,
    select_layers,
    validate_similarity,
)
from .surgery import pruned_view

__all__ = [
    "ALL_METHODS",
    "CLUSTER_METHODS",
    "FOLD_METHODS",
    "SEARCH_METHODS",
    "RaceResult",
    "WindowScore",
    "WindowScorer",
    "affordable_passes",
    "auto_select",
    "local_search_passes",
    "lorp_kl_select",
    "lorp_loss_select",
    "pass_budget",
    "race",
    "search_layers",
    "sleb_select",
]

ProgressCallback = Callable[[str, float, str], None]

#: Methods that run the model on scoring windows.
SEARCH_METHODS: tuple[str, ...] = ("sleb", "lorp-kl", "lorp-loss", "auto")
#: Pipeline methods that are a search method's selection with the corrections on
#: (:class:`lorp.pipeline.PruneConfig` turns on ``compensate`` and ``temperature``): name ->
#: the selection method. ``lorp-fold``: lorp-loss's blocks, the tuned linear fold
#: (:mod:`lorp.compensation`) and the logit temperature (:mod:`lorp.temperature`).
FOLD_METHODS: dict[str, str] = {"lorp-fold": "lorp-loss"}
#: Every method name the pipeline accepts.
ALL_METHODS: tuple[str, ...] = METHODS + SEARCH_METHODS + tuple(FOLD_METHODS)
#: Methods built on LoRP's phases, which accept a forced number of phases K.
CLUSTER_METHODS: tuple[str, ...] = ("lorp", "lorp-kl", "lorp-loss", "lorp-fold")

#: Default memory for :class:`WindowScorer`'s dense prefix cache.
DEFAULT_PREFIX_BYTES = 1 << 30

#: The range of forced K that ``auto`` tries besides the policy K.
AUTO_CLUSTER_RANGE = (2, 4)

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
            logp = _log_probs(self.model, batch, device)
            per = -logp.gather(-1, batch[:, 1:].to(logp.device).unsqueeze(-1)).squeeze(-1)
            return float(per.sum()), logp, per
        get_head = getattr(self.model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        if not isinstance(head, nn.Module):
            raise InvalidInputError("a stride > 1 needs a model with an output embedding")
        pos = self._positions.to(device)

        def take(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (args[0][:, pos], *args[1:])

        handle = head.register_forward_pre_hook(take)
        try:
            logits = self.model(input_ids=batch.to(device), use_cache=False).logits
        finally:
            handle.remove()
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
        with self._storing(starts, stop=True) as cur:
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
        with self._storing(starts, stop=False) as cur:
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
        try:
            with self._resumed(key, start_block) if start_block else _plain(self.model, key) as cur:
                for i in range(lo, hi):
                    cur[0] = i
                    batch = self._batch(i)
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


def pass_budget(
    method: str,
    model: nn.Module,
    calibration_tokens: int,
    scoring_shape: tuple[int, int],
    num_remove: int,
) -> int | None:
    """The ``max_passes`` the pipeline gives ``method``: :func:`affordable_passes` for ``auto``,
    :func:`local_search_passes` for ``lorp-loss``, ``None`` (no limit) for the others."""
    if method == "auto":
        tokens = scoring_shape[0] * scoring_shape[1]
        return affordable_passes(model, calibration_tokens, tokens, num_remove)
    if method == "lorp-loss":
        return local_search_passes(model, calibration_tokens, scoring_shape, num_remove)
    return None


# --------------------------------------------------------------------------------------------
# SLEB
# --------------------------------------------------------------------------------------------


def _rls(matrix: np.ndarray | None) -> float:
    return math.nan if matrix is None else representation_locality_score(matrix)


def sleb_select(
    scorer: WindowScorer, num_remove: int | float, *, similarity: ArrayLike | None = None
) -> Selection:
    """SLEB-style greedy removal by scoring-window NLL (module docstring). ``similarity`` is
    optional (only for the RLS in the result)."""
    n = scorer.num_layers
    matrix = None if similarity is None else validate_similarity(similarity)
    if matrix is not None and matrix.shape[0] != n:
        raise InvalidInputError(
            f"similarity is {matrix.shape[0]}x{matrix.shape[0]}, model has {n} blocks"
        )
    k = resolve_budget(n, num_remove)
    start = time.perf_counter()
    passes0 = scorer.passes
    scorer.planned = passes0 + sum(n - 2 - s for s in range(k))
    removed: list[int] = []
    steps: list[dict[str, Any]] = []
    first_scores: list[float | None] = [None] * n
    for step in range(k):
        pool = [b for b in range(1, n - 1) if b not in removed]
        scorer.prefetch([[*removed, b] for b in pool])
        nll = {b: scorer.score([*removed, b]).nll for b in pool}
        best = min(pool, key=lambda b: nll[b])  # pool ascending: ties go to the shallower block
        if step == 0:
            for b, v in nll.items():
                first_scores[b] = v
        removed.append(best)
        steps.append(
            {
                "removed": best,
                "nll": nll[best],
                "nll_by_block": {str(b): v for b, v in nll.items()},
                "elapsed_s": time.perf_counter() - start,
            }
        )
    return Selection(
        method="sleb",
        num_layers=n,
        removed=sorted(removed),
        rls=_rls(matrix),
        details={
            "objective": "nll",
            "scores": first_scores,
            "removal_order": list(removed),
            "steps": steps,
            "passes": scorer.passes - passes0,
            "search_s": time.perf_counter() - start,
            "scoring": scorer.info(),
        },
    )


# --------------------------------------------------------------------------------------------
# LoRP-KL
# --------------------------------------------------------------------------------------------


def _lorp_slots(base: Selection) -> tuple[list[int], list[int], list[list[int]]]:
    """(phase of every slot in LoRP's removal order, stage of every slot, candidate lists)."""
    assert base.labels is not None
    order = list(base.details["removal_order"])
    stages = list(base.details["stages"])
    candidates = [list(c) for c in base.details["candidates"]]
    return [base.labels[layer] for layer in order], stages, candidates


def _planned_lorp_kl_passes(base: Selection, per_slot: int) -> int:
    """Exact number of passes lorp-kl will run (pool sizes do not depend on the choices)."""
    phases, _, candidates = _lorp_slots(base)
    used: dict[int, int] = {}
    total = 0
    for c in phases:
        pool = len(candidates[c]) - used.get(c, 0)
        if pool >= 2:
            total += min(per_slot, pool)
        used[c] = used.get(c, 0) + 1
    return total


def _check_per_slot(candidates_per_slot: int) -> int:
    if isinstance(candidates_per_slot, bool) or not isinstance(candidates_per_slot, int):
        raise InvalidInputError(
            f"candidates_per_slot must be an integer, got {candidates_per_slot!r}"
        )
    if candidates_per_slot < 1:
        raise InvalidInputError(
            f"candidates_per_slot must be at least 1, got {candidates_per_slot}"
        )
    return candidates_per_slot


def lorp_kl_select(
    similarity: ArrayLike,
    num_remove: int | float,
    scorer: WindowScorer,
    *,
    num_clusters: int | None = None,
    candidates_per_slot: int = 3,
) -> Selection:
    """LoRP's phases and quotas, each slot filled by measured KL (module docstring)."""
    per_slot = _check_per_slot(candidates_per_slot)
    if not scorer.reference:
        raise InvalidInputError("lorp-kl needs a scorer with a dense reference (reference=True)")
    matrix = validate_similarity(similarity)
    n = matrix.shape[0]
    if n != scorer.num_layers:
        raise InvalidInputError(f"similarity is {n}x{n}, model has {scorer.num_layers} blocks")
    start = time.perf_counter()
    base = select_layers(matrix, num_remove, method="lorp", num_clusters=num_clusters)
    phases, stages, candidates = _lorp_slots(base)
    passes0 = scorer.passes
    planned = _planned_lorp_kl_passes(base, per_slot)
    scorer.planned = passes0 + planned + (0 if scorer.cached(()) else 1)
    removed: list[int] = []
    slots: list[dict[str, Any]] = []
    for c, stage in zip(phases, stages, strict=True):
        pool = [m for m in candidates[c] if m not in removed][:per_slot]
        kls: dict[int, float] = {}
        if len(pool) >= 2:
            scorer.prefetch([[*removed, m] for m in pool])
            for m in pool:
                kl = scorer.score([*removed, m]).kl
                assert kl is not None
                kls[m] = kl
            choice = min(pool, key=lambda m: kls[m])  # pool in LoRP order: ties keep it
        else:
            choice = pool[0]
        removed.append(choice)
        slots.append(
            {
                "phase": c,
                "stage": stage,
                "candidates": pool,
                "kl": {str(m): v for m, v in kls.items()},
                "chosen": choice,
                "lorp_choice": pool[0],
            }
        )
    final = scorer.score(removed)
    quotas = {str(c): phases.count(c) for c in sorted(set(phases))}
    details = {
        "objective": "kl",
        "num_clusters_source": base.details.get("num_clusters_source"),
        "scores": base.details.get("scores"),
        "removal_order": list(removed),
        "stages": stages,
        "candidates": candidates,
        "quotas": quotas,
        "slots": slots,
        "candidates_per_slot": per_slot,
        "lorp_removed": list(base.removed),
        "kl": final.kl,
        "nll": final.nll,
        "top1_agreement": final.top1_agreement,
        "passes": scorer.passes - passes0,
        "search_s": time.perf_counter() - start,
        "scoring": scorer.info(),
    }
    return Selection(
        method="lorp-kl",
        num_layers=n,
        removed=sorted(removed),
        rls=base.rls,
        num_clusters=base.num_clusters,
        labels=base.labels,
        details=details,
    )


# --------------------------------------------------------------------------------------------
# LoRP-loss
# --------------------------------------------------------------------------------------------


def _runs(blocks: Sequence[int]) -> list[list[int]]:
    """Maximal runs of consecutive block indices, in order."""
    runs: list[list[int]] = []
    for b in sorted(blocks):
        if runs and b == runs[-1][-1] + 1:
            runs[-1].append(b)
        else:
            runs.append([b])
    return runs


def _swap_moves(
    removed: Sequence[int], labels: Sequence[int], matrix: np.ndarray, per_phase: int
) -> list[tuple[int, ...]]:
    """Neighbouring removal sets of ``removed``, most promising first (see lorp_loss_select).

    A move takes one block out of the set and puts another in: out, an end of a run of removed
    blocks (the interior of a run stays); in, the block just past either end of a run (the run
    slides) or one of the ``per_phase`` kept blocks of each phase with the highest local
    redundancy S[c, c+1] (a removal moves to another place or phase). Blocks 0 and N−1 never
    enter. Ordered by the S-based gain S[in, in+1] − S[out, out+1], largest first.
    """
    n = matrix.shape[0]
    current = set(removed)

    def local(b: int) -> float:
        return float(matrix[b, b + 1])

    def free(b: int) -> bool:
        return 0 < b < n - 1 and b not in current

    ends: set[int] = set()
    incoming: set[int] = set()
    for run in _runs(removed):
        ends.update((run[0], run[-1]))
        incoming.update(b for b in (run[0] - 1, run[-1] + 1) if free(b))
    for phase in sorted(set(labels)):
        kept = [b for b in range(n) if labels[b] == phase and free(b)]
        incoming.update(sorted(kept, key=lambda b: -local(b))[:per_phase])
    scored: dict[tuple[int, ...], float] = {}
    for out in sorted(ends):
        for inc in sorted(incoming):
            move = tuple(sorted((current - {out}) | {inc}))
            gain = local(inc) - local(out)
            scored[move] = max(gain, scored.get(move, -math.inf))
    return sorted(scored, key=lambda m: -scored[m])  # stable: equal gains keep index order


def lorp_loss_select(
    similarity: ArrayLike,
    num_remove: int | float,
    scorer: WindowScorer,
    *,
    num_clusters: int | None = None,
    candidates_per_phase: int = 2,
    max_passes: int | None = None,
    search_windows: torch.Tensor | None = None,
    race_margin: float = RACE_MARGIN,
) -> Selection:
    """LoRP's phases with the measured loss as the objective (module docstring).

    ``scorer``: the scoring windows that decide (NLL). ``search_windows``: the cheaper windows the
    local search moves on (default: the first half of the scoring windows, each cut to half its
    length). ``max_passes``: local-search passes allowed on them (``None``: until no move helps).
    """
    per_phase = _check_per_slot(candidates_per_phase)
    matrix = validate_similarity(similarity)
    n = matrix.shape[0]
    if n != scorer.num_layers:
        raise InvalidInputError(f"similarity is {n}x{n}, model has {scorer.num_layers} blocks")
    if max_passes is not None and max_passes < 0:
        raise InvalidInputError(f"max_passes must be >= 0, got {max_passes}")
    k = resolve_budget(n, num_remove)
    start = time.perf_counter()
    passes0 = scorer.passes
    rls = representation_locality_score(matrix)
    lorp = select_layers(matrix, k, method="lorp", num_clusters=num_clusters)
    assert lorp.labels is not None
    labels = lorp.labels

    # 1. Starting points: every S-based selection, ranked by loss on the scoring windows.
    built: list[tuple[str, Selection]] = [(f"lorp (K={lorp.num_clusters})", lorp)]
    for name, method, forced in _candidate_specs(n, rls):
        if method == "lorp" and (forced or policy_num_clusters(rls)) == lorp.num_clusters:
            continue
        built.append((name, select_layers(matrix, k, method=method, num_clusters=forced)))
    raced = race(scorer, [sel.removed for _, sel in built], margin=race_margin)
    origin = raced.best("nll")
    best_start = next(i for i, (_, sel) in enumerate(built) if tuple(sel.removed) == origin)
    width = scorer.windows.shape[1] - 1
    starts = [
        {
            "name": name,
            "removed": list(sel.removed),
            "nll": raced.scores[tuple(sel.removed)].nll,
            "windows": raced.scores[tuple(sel.removed)].tokens // width,
            "eliminated": tuple(sel.removed) not in raced.alive,
        }
        for name, sel in built
    ]

    # 2. Local search from the best start, on the cheaper windows: best-improvement swaps.
    if search_windows is None:
        w, t = scorer.windows.shape
        search_windows = scorer.windows[: max(1, w // 2), : max(2, t // 2)]
    fast = WindowScorer(
        scorer.model,
        search_windows,
        batch_size=scorer.batch_size,
        reference=False,
        prefix_bytes=scorer.prefix_bytes,
        progress=scorer.progress,
        stage=scorer.stage,
    )
    current = origin
    current_nll = fast.score(current).nll
    rounds: list[dict[str, Any]] = []
    while max_passes is None or fast.passes < max_passes:
        moves = [m for m in _swap_moves(current, labels, matrix, per_phase) if not fast.cached(m)]
        if max_passes is not None:
            moves = moves[: max_passes - fast.passes]
        if not moves:
            break
        fast.prefetch(moves)
        tried = {m: fast.score(m).nll for m in moves}
        best = min(moves, key=lambda m: tried[m])  # moves in S-gain order: ties keep it
        rounds.append(
            {
                "from": list(current),
                "nll": current_nll,
                "moves": len(moves),
                "best": list(best),
                "best_nll": tried[best],
                "accepted": tried[best] < current_nll,
            }
        )
        if tried[best] >= current_nll:
            break
        current, current_nll = best, tried[best]

    # 3. Keep the local-search result only if the scoring windows agree it is better.
    chosen = origin
    if current != origin and scorer.score(current).nll < scorer.score(origin).nll:
        chosen = current
    final = scorer.score(chosen) if scorer.cached(chosen) else raced.scores[chosen]
    quotas = Counter(labels[b] for b in chosen)
    phases = sorted(set(labels))
    details = {
        "objective": "nll",
        "num_clusters_source": lorp.details.get("num_clusters_source"),
        "scores": lorp.details.get("scores"),
        "starts": starts,
        "start": starts[best_start]["name"],
        "search": {
            "windows": int(search_windows.shape[0]),
            "seq_len": int(search_windows.shape[1]),
            "passes": fast.passes,
            "prefix_passes": fast.prefix_passes,
            "seconds": fast.seconds,
            "max_passes": max_passes,
            "candidates_per_phase": per_phase,
            "rounds": rounds,
            "result": list(current),
        },
        "improved": chosen != origin,
        "nll": final.nll,
        "nll_windows": final.tokens // width,
        "race": {"first_windows": raced.first_windows, "margin": race_margin},
        "quotas": {str(c): quotas.get(c, 0) for c in phases},
        "lorp_removed": list(lorp.removed),
        "lorp_quotas": {str(c): sum(1 for b in lorp.removed if labels[b] == c) for c in phases},
        "passes": scorer.passes - passes0 + fast.passes,
        "search_s": time.perf_counter() - start,
        "scoring": scorer.info(),
    }
    return Selection(
        method="lorp-loss",
        num_layers=n,
        removed=sorted(chosen),
        rls=rls,
        num_clusters=lorp.num_clusters,
        labels=labels,
        details=details,
    )


# --------------------------------------------------------------------------------------------
# Racing the starting candidates
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


# --------------------------------------------------------------------------------------------
# auto
# --------------------------------------------------------------------------------------------


def _candidate_specs(n: int, rls: float) -> list[tuple[str, str, int | None]]:
    """(name, method, forced K or None) of every S-based candidate, in tie-break order."""
    policy = policy_num_clusters(rls)
    lo, hi = AUTO_CLUSTER_RANGE
    specs: list[tuple[str, str, int | None]] = [(f"lorp (K={policy}, policy)", "lorp", None)]
    specs += [(f"lorp (K={k})", "lorp", k) for k in range(lo, min(hi, n) + 1) if k != policy]
    specs += [("shortgpt", "shortgpt", None), ("streamline", "streamline", None)]
    return specs


def auto_select(
    similarity: ArrayLike,
    num_remove: int | float,
    scorer: WindowScorer,
    *,
    candidates_per_slot: int = 3,
    max_passes: int | None = None,
    include_lorp_kl: bool | None = None,
    objective: str = "nll",
    race_margin: float = RACE_MARGIN,
) -> Selection:
    """Best of the S-based selections (and lorp-kl when affordable) on the scoring windows.

    ``objective``: ``"nll"`` (mean next-token loss; needs no dense pass) or ``"kl"``
    (KL(dense || pruned); needs a scorer with the dense reference). ``max_passes``: scoring
    passes allowed (``None``: no limit). ``include_lorp_kl``: ``None`` decides by ``max_passes``;
    ``True``/``False`` force it; lorp-kl needs the dense reference in any case.
    """
    per_slot = _check_per_slot(candidates_per_slot)
    if objective not in ("nll", "kl"):
        raise InvalidInputError(f"auto's objective must be 'nll' or 'kl', got {objective!r}")
    if objective == "kl" and not scorer.reference:
        raise InvalidInputError("objective 'kl' needs a scorer with a dense reference")
    matrix = validate_similarity(similarity)
    n = matrix.shape[0]
    if n != scorer.num_layers:
        raise InvalidInputError(f"similarity is {n}x{n}, model has {scorer.num_layers} blocks")
    k = resolve_budget(n, num_remove)
    start = time.perf_counter()
    passes0 = scorer.passes
    rls = representation_locality_score(matrix)

    built: list[tuple[str, Selection, float]] = []
    for name, method, forced in _candidate_specs(n, rls):
        t = time.perf_counter()
        sel = select_layers(matrix, k, method=method, num_clusters=forced)
        built.append((name, sel, time.perf_counter() - t))
    distinct = {tuple(sel.removed) for _, sel, _ in built}
    base_passes = len(distinct) + (1 if scorer.reference and not scorer.cached(()) else 0)

    # Is lorp-kl affordable? Its base selection is the policy-K LoRP candidate.
    lorp_base = built[0][1]
    kl_plan: dict[str, Any] = {"included": False}
    kl_per_slot: int | None = None
    if include_lorp_kl is False:
        kl_plan["reason"] = "excluded by the caller"
    elif not scorer.reference:
        kl_plan["reason"] = "lorp-kl needs the dense reference (objective 'kl')"
    else:
        left = None if max_passes is None else max_passes - base_passes
        unlimited = include_lorp_kl is True or left is None
        lowest = per_slot if unlimited else min(2, per_slot)
        for m in range(per_slot, lowest - 1, -1):
            need = _planned_lorp_kl_passes(lorp_base, m)
            if unlimited or (left is not None and need <= left):
                kl_per_slot = m
                kl_plan = {"included": True, "candidates_per_slot": m, "planned_passes": need}
                break
        if kl_per_slot is None:
            kl_plan["reason"] = (
                f"not affordable: {_planned_lorp_kl_passes(lorp_base, lowest)} passes needed "
                f"with {lowest} candidates per slot, {max(left or 0, 0)} left of {max_passes} "
                "after the S-based candidates"
            )
    scorer.planned = passes0 + base_passes + int(kl_plan.get("planned_passes", 0))

    records: list[dict[str, Any]] = []
    selections: list[Selection] = []
    first_name: dict[tuple[int, ...], str] = {}
    if scorer.reference:  # the dense reference first, storing the candidates' block inputs
        scorer.prefetch([sel.removed for _, sel, _ in built])
        scorer.score(())
    raced = race(
        scorer, [sel.removed for _, sel, _ in built], objective=objective, margin=race_margin
    )
    for name, sel, select_s in built:
        key = tuple(sel.removed)
        res = raced.scores[key]
        alive = key in raced.alive
        records.append(
            {
                "name": name,
                "method": sel.method,
                "num_clusters": sel.num_clusters,
                "removed": list(sel.removed),
                "kl": res.kl,
                "nll": res.nll,
                "ppl": res.ppl,
                "top1_agreement": res.top1_agreement,
                "windows": res.tokens // (scorer.windows.shape[1] - 1),
                "eliminated": not alive,
                "select_s": select_s,
                "score_s": 0.0 if key in first_name else res.seconds,
                "same_as": first_name.get(key),
            }
        )
        first_name.setdefault(key, name)
        selections.append(sel)
    if kl_per_slot is not None:
        t = time.perf_counter()
        p0 = scorer.passes
        sel = lorp_kl_select(matrix, k, scorer, candidates_per_slot=kl_per_slot)
        search_s = time.perf_counter() - t
        key = tuple(sel.removed)
        res = scorer.score(key)
        records.append(
            {
                "name": f"lorp-kl (K={sel.num_clusters}, {kl_per_slot} per slot)",
                "method": "lorp-kl",
                "num_clusters": sel.num_clusters,
                "removed": list(sel.removed),
                "kl": res.kl,
                "nll": res.nll,
                "ppl": res.ppl,
                "top1_agreement": res.top1_agreement,
                "windows": res.tokens // (scorer.windows.shape[1] - 1),
                "eliminated": False,
                "select_s": search_s,
                "score_s": 0.0,  # included in select_s (its search measured it)
                "passes": scorer.passes - p0,
                "same_as": first_name.get(key),
            }
        )
        first_name.setdefault(key, records[-1]["name"])
        selections.append(sel)

    # the lowest of the candidates measured on every window (ties: first in order)
    best = min(
        (i for i, rec in enumerate(records) if not rec["eliminated"]),
        key=lambda i: records[i][objective],
    )
    for i, rec in enumerate(records):
        rec["chosen"] = i == best
    chosen = selections[best]
    details = {
        "objective": objective,
        "chosen": records[best]["name"],
        "chosen_method": chosen.method,
        "candidates": records,
        "race": {"first_windows": raced.first_windows, "margin": race_margin},
        "lorp_kl": kl_plan,
        "max_passes": max_passes,
        "passes": scorer.passes - passes0,
        "search_s": time.perf_counter() - start,
        "scoring": scorer.info(),
        "scores": chosen.details.get("scores"),
        "chosen_details": chosen.details,
    }
    return Selection(
        method="auto",
        num_layers=n,
        removed=list(chosen.removed),
        rls=rls,
        num_clusters=chosen.num_clusters,
        labels=chosen.labels,
        details=details,
    )


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def search_layers(
    model: nn.Module,
    similarity: ArrayLike,
    num_remove: int | float,
    method: str,
    windows: torch.Tensor,
    *,
    num_clusters: int | None = None,
    batch_size: int = 1,
    candidates_per_slot: int = 3,
    max_passes: int | None = None,
    progress: ProgressCallback | None = None,
) -> Selection:
    """Choose blocks with a model-in-the-loop ``method`` (one of :data:`SEARCH_METHODS`).

    ``windows``: scoring windows ``[W, T]`` (held out from the calibration windows, never the
    evaluation text). ``num_clusters`` forces K for ``lorp-kl`` and ``lorp-loss`` only.
    ``candidates_per_slot``: candidates per removal slot (``lorp-kl``). ``max_passes`` limits
    ``auto`` and ``lorp-loss``'s local search (see :func:`pass_budget`). Progress goes to
    stage ``"selection"``.
    """
    if method not in SEARCH_METHODS:
        raise InvalidInputError(
            f"unknown search method {method!r}; valid: {', '.join(SEARCH_METHODS)}"
        )
    if num_clusters is not None and method not in CLUSTER_METHODS:
        raise InvalidInputError(
            f"num_clusters only applies to methods {', '.join(CLUSTER_METHODS)}, not {method!r}"
        )
    matrix = validate_similarity(similarity)
    n = len(get_blocks(model))
    if matrix.shape[0] != n:
        raise InvalidInputError(
            f"similarity is {matrix.shape[0]}x{matrix.shape[0]}, model has {n} blocks"
        )
    # lorp-kl measures KL against the dense model; sleb and auto rank by loss (no dense pass)
    scorer = WindowScorer(
        model, windows, batch_size=batch_size, reference=method == "lorp-kl", progress=progress
    )
    was_training = model.training
    model.eval()
    try:
        if method == "sleb":
            return sleb_select(scorer, num_remove, similarity=matrix)
        if method == "lorp-loss":
            return lorp_loss_select(
                matrix,
                num_remove,
                scorer,
                num_clusters=num_clusters,
                max_passes=max_passes,
            )
        if method == "lorp-kl":
            return lorp_kl_select(
                matrix,
                num_remove,
                scorer,
                num_clusters=num_clusters,
                candidates_per_slot=candidates_per_slot,
            )
        return auto_select(
            matrix,
            num_remove,
            scorer,
            candidates_per_slot=candidates_per_slot,
            max_passes=max_passes,
        )
    finally:
        model.train(was_training)
