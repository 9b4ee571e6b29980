"""Training-free linear compensation of removed runs of blocks, folded into the weights.

Removing the run of blocks i..j changes what reaches block j+1: the dense model feeds it
``h_{j+1}`` (the output of block j), the pruned model feeds it ``h_i = y + m``, the output of
block i-1, where ``m`` is block i-1's MLP output (its down projection) and ``y`` the residual
stream it is added to. For every run this module fits one d x d matrix T by ridge least squares
on calibration tokens,

    T = argmin_T  sum_t || (h_{j+1} - y)_t - m_t T ||^2 / ||h_{j+1, t}||^2  +  lam || T - I ||^2,

the relative error of what enters block j+1, with ``lam = ridge * mean(diag(m^T W m))``
(W the per-token weights; T = I is plain removal, the ridge pulls towards it),
and folds it into block i-1's down projection (``W <- T^T W``, ``b <- b T``): block i-1 then
writes ``y + m T`` to the residual stream, the best linear stand-in for the removed run that its
own output projection can express. The pruned checkpoint keeps the standard architecture (fewer
blocks, one changed matrix per run), so it loads anywhere; no gradient step is taken.

One forward pass of the *dense* model over the windows gives every run's statistics (the
pass stops after the last removed block); runs are fitted independently, on dense activations.
Every position is fitted, weighted by the inverse squared norm of its target: the first
position of a window is an attention sink whose hidden state is far larger than the others',
so an unweighted fit is dominated by it, and leaving it out breaks it (on SmolLM2-135M with
blocks 12-14 removed and 16 fit windows: perplexity 40,955 instead of 42.4 on 8 WikiText-2
windows).

Supported: blocks whose MLP output projection ``mlp.down_proj`` (``nn.Linear``) is added to the
residual stream as is (Llama, Mistral, Qwen2/3, Phi-3...). Blocks with a norm after the
MLP (Gemma 2/3, OLMo-2: ``post_feedforward_layernorm``) or without ``mlp.down_proj`` (GPT-2, OPT,
GPT-NeoX) raise :class:`~lorp.errors.UnsupportedModelError`. A run starting at block 0 has no
block before it and is left uncompensated (recorded); no method here removes block 0.

Strength: the least-squares map matches hidden states, not the model's loss, and it overshoots:
on Qwen2.5-Coder-0.5B with blocks 8-14 removed, folding half of the correction,
``I + 0.5 (T - I)``, gave WikiText-2 / held-out perplexity 64.68 / 31.80 against 69.85 / 33.17
for the full map (and with blocks 10-11 removed 44.99 / 21.53 against 47.06 / 21.77).
:func:`tune_strength` therefore measures the next-token loss of the pruned, compensated model on
a few calibration windows the maps were not fitted on, at strengths 0 (plain removal), 0.5 and
1 and at the minimum of the parabola through the best three, and keeps the smallest strength
whose loss is within one standard error of the lowest (paired over the same predictions): the
maps are fitted on one text, and the calibration loss of a few windows cannot tell strengths
apart by less than that, while the transfer to other text favours the smaller fold (on Qwen
with blocks 10-11 removed the calibration loss fell up to s = 0.7 while WikiText-2 perplexity
rose from s = 0.25 on).

Every fit reads the dense block inputs it needs from the similarity capture when the pipeline
kept them (:class:`lorp.inputs.BlockInputs`): the fit then runs only the block before each run,
the tuning and the temperature fit start at the first changed block.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ._blocks import get_blocks
from ._forward import batches, check_windows, input_device
from .errors import InvalidInputError, UnsupportedModelError
from .inputs import BlockInputs, batched_feed, fed, resumed
from .progress import ProgressCallback
from .scoring import WindowScorer
from .surgery import block_runs, pruned_view, validate_removed
from .temperature import Temperature, apply_temperature, fit_temperature

DEFAULT_RIDGE = 0.03
#: Strengths :func:`tune_strength` measures first (0: plain removal, 1: the least-squares map).
DEFAULT_STRENGTHS = (0.0, 0.5, 1.0)
#: :func:`tune_strength` scores every TUNE_STRIDE-th prediction (the output head runs there only).
TUNE_STRIDE = 4
#: How :func:`tune_strength` picks among the measured strengths (see there).
TUNE_RULES = ("one-se", "min")
DEFAULT_TUNE_RULE = "one-se"
_EPS = 1e-6
# Norms that sit between a block's MLP and the residual add; their presence makes folding wrong.
_POST_MLP_NORMS = ("post_feedforward_layernorm", "post_mlp_layernorm", "ffn_post_norm")


class _StopForward(Exception):
    """Raised after the last block whose output a fit needs."""


@dataclass
class Compensation:
    """Fitted maps for one removal set: ``maps[b]`` is the d x d T folded into block b's down
    projection (b = the block just before a removed run, original numbering). ``runs``: per run,
    what was fitted and how well (relative residuals on the fit tokens, 1.0 = plain removal).
    ``temperature``: a logit scale of the pruned model (:mod:`lorp.temperature`), folded into the
    final norm with the maps (no maps when only the temperature was fitted). ``strength``: how
    much of each map is folded, ``I + strength (T - I)`` (:meth:`folded_maps`); ``tuning``: how
    :func:`tune_strength` chose it (None: not tuned); ``healing``: how :func:`lorp.heal.heal_maps`
    trained the maps after the fit (None: not healed; the maps are then the trained ones, at
    strength 1)."""

    removed: list[int]
    maps: dict[int, torch.Tensor]
    ridge: float
    tokens: int
    runs: list[dict[str, Any]] = field(default_factory=list)
    temperature: Temperature | None = None
    strength: float = 1.0
    tuning: dict[str, Any] | None = None
    stored_inputs: bool = False  # fitted from the capture's stored block inputs
    healing: dict[str, Any] | None = None  # the maps were then trained (lorp.heal)

    def folded_maps(self) -> dict[int, torch.Tensor]:
        """The maps as folded: ``I + strength (T - I)``; none at strength 0 (plain removal)."""
        if self.strength == 1.0:
            return self.maps
        if self.strength == 0.0:
            return {}
        return {
            b: torch.lerp(torch.eye(t.shape[0], dtype=t.dtype, device=t.device), t, self.strength)
            for b, t in self.maps.items()
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "linear" if self.maps or self.runs else "none",
            "ridge": self.ridge,
            "tokens": self.tokens,
            "blocks": sorted(self.maps),
            "runs": self.runs,
            "strength": self.strength,
            "tuning": self.tuning,
            "stored_inputs": self.stored_inputs,
            "healing": self.healing,
            "temperature": None if self.temperature is None else self.temperature.to_dict(),
        }


def temperature_only(
    removed: Sequence[int], temperature: Temperature | None = None
) -> Compensation:
    """A :class:`Compensation` without linear maps (a logit temperature, once fitted)."""
    chosen = sorted(int(b) for b in removed)
    return Compensation(removed=chosen, maps={}, ridge=0.0, tokens=0, temperature=temperature)


def _down_proj(block: nn.Module, index: int) -> nn.Linear:
    for name in _POST_MLP_NORMS:
        if hasattr(block, name):
            raise UnsupportedModelError(
                f"block {index} ({type(block).__name__}) normalises its MLP output "
                f"({name}) before the residual add, so a linear map cannot be folded into its "
                "down projection; prune without compensation"
            )
    down = getattr(getattr(block, "mlp", None), "down_proj", None)
    if not isinstance(down, nn.Linear):
        raise UnsupportedModelError(
            f"block {index} ({type(block).__name__}) has no mlp.down_proj linear layer; "
            "compensation supports Llama-style blocks (Llama, Mistral, Qwen2/3, Phi-3, ...)"
        )
    return down


def check_compensable(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` unless every block's MLP output can take a fold."""
    for index, block in enumerate(get_blocks(model)):
        _down_proj(block, index)


def _output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class _Stats:
    """Weighted normal equations of one run's fit, float64: A = m^T W m, B = m^T W r and
    e = sum_t w_t ||r_t - m_t||^2 (the plain-removal residual), r = h_{j+1} - y,
    w_t = 1 / ||h_{j+1, t}||^2."""

    def __init__(self, d: int) -> None:
        self.a = torch.zeros(d, d, dtype=torch.float64)
        self.b = torch.zeros(d, d, dtype=torch.float64)
        self.plain = 0.0
        self.m: torch.Tensor | None = None
        self.y: torch.Tensor | None = None

    def add(self, target: torch.Tensor) -> None:
        assert self.m is not None and self.y is not None
        m, r = self.m, target - self.y
        w = 1.0 / (target.norm(dim=1, keepdim=True) ** 2 + _EPS)  # relative error per token
        self.a += ((m * w).T @ m).cpu()
        self.b += ((m * w).T @ r).cpu()
        self.plain += float((w * (r - m) ** 2).sum())
        self.m = self.y = None


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1, x.shape[-1]).double()


@torch.no_grad()
def fit_compensation(
    model: nn.Module,
    removed: Sequence[int],
    windows: torch.Tensor,
    *,
    ridge: float = DEFAULT_RIDGE,
    batch_size: int = 1,
    progress: ProgressCallback | None = None,
    inputs: BlockInputs | None = None,
) -> Compensation:
    """Fit one linear map per run of ``removed`` on the dense model's activations over
    ``windows`` ``[W, T]`` (calibration tokens; T >= 2). Does not change the model.

    ``inputs``: dense block inputs kept by the similarity capture. When they hold ``windows``
    (and no run ends at the last block), the fit reads the inputs of the blocks after the runs
    from there and runs only the blocks before the runs, each fed its stored input, instead of
    a dense pass up to the last removed block; the sums are the same."""
    if isinstance(ridge, bool) or not isinstance(ridge, int | float) or not ridge > 0:
        raise InvalidInputError(f"ridge must be a positive number, got {ridge!r}")
    if not math.isfinite(float(ridge)):
        raise InvalidInputError(f"ridge must be finite, got {ridge!r}")
    windows = check_windows(windows)
    if windows.shape[1] < 2:
        raise InvalidInputError("compensation windows need at least 2 tokens")
    blocks = get_blocks(model)
    kept_runs = [run for run in block_runs(validate_removed(len(blocks), removed)) if run[0] > 0]
    skipped = [run for run in block_runs(removed) if run[0] == 0]
    downs = {run[0] - 1: _down_proj(blocks[run[0] - 1], run[0] - 1) for run in kept_runs}
    d = int(next(iter(downs.values())).out_features) if downs else 0
    stats = {run[0] - 1: _Stats(d) for run in kept_runs}
    rows = _stored_rows(inputs, windows, kept_runs, len(blocks))
    # per run's block before it: the stored dense input of the block after the run
    stored: dict[int, torch.Tensor] | None = None
    if rows is None:  # a dense pass up to the last removed block
        last = max((run[-1] for run in kept_runs), default=-1)
        hooked = sorted({*downs, *(run[-1] for run in kept_runs)})
        bypassed: list[int] = []
        feeds: dict[int, Callable[[], torch.Tensor]] = {}
    else:  # only the blocks before the runs, each fed its stored dense input
        assert inputs is not None
        stored = {run[0] - 1: inputs.states[run[-1] + 1][rows] for run in kept_runs}
        last = max(downs)
        hooked = sorted(downs)
        bypassed = [b for b in range(len(blocks)) if b not in downs]
        feeds = {b: batched_feed(inputs.states[b][rows], batch_size) for b in downs}
    batch_rows = [0, 0]  # windows of the current batch (stored targets)
    handles: list[Any] = []

    def on_down(before: int) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: Any, out: torch.Tensor) -> None:
            stats[before].m = _flat(out)

        return hook

    def on_block(index: int) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: Any, out: Any) -> None:
            h = _flat(_output(out))
            if index in stats:  # the block before a run: y = its output minus its MLP's
                st = stats[index]
                if st.m is None:
                    raise UnsupportedModelError(
                        f"block {index}'s mlp.down_proj did not run inside the block's forward"
                    )
                st.y = h - st.m
                if stored is not None:
                    target = stored[index][batch_rows[0] : batch_rows[1]]
                    st.add(_flat(target).to(h.device))
            for run in kept_runs:
                if run[-1] == index and stored is None:
                    stats[run[0] - 1].add(h)
            if index == last:
                raise _StopForward

        return hook

    for before, down in downs.items():
        handles.append(down.register_forward_hook(on_down(before)))
    for index in hooked:
        handles.append(blocks[index].register_forward_hook(on_block(index)))
    device = input_device(model)
    was_training = model.training
    model.eval()
    try:
        done = 0
        with fed(model, bypassed, feeds) if feeds else contextlib.nullcontext():
            for batch in batches(windows, batch_size):
                batch_rows[:] = [done, done + batch.shape[0]]
                if kept_runs:
                    with contextlib.suppress(_StopForward):
                        model(input_ids=batch.to(device), use_cache=False)
                done += batch.shape[0]
                if progress is not None:
                    progress("compensation", done / windows.shape[0], f"{done} windows")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    tokens = int(windows.shape[0]) * int(windows.shape[1])
    maps: dict[int, torch.Tensor] = {}
    runs: list[dict[str, Any]] = []
    for run in kept_runs:
        st = stats[run[0] - 1]
        lam = float(ridge) * float(st.a.diagonal().mean())
        eye = torch.eye(d, dtype=torch.float64)
        t = torch.linalg.solve(st.a + lam * eye, st.b + lam * eye)
        # residual of the fit: sum ||r - m T||^2 = c - 2 tr(T^T B) + tr(T^T A T), with c taken
        # from the plain-removal residual e = c - 2 tr(B) + tr(A)
        c = st.plain + 2 * float(st.b.trace()) - float(st.a.trace())
        fitted = c - 2 * float((t * st.b).sum()) + float((t * (st.a @ t)).sum())
        maps[run[0] - 1] = t
        runs.append(
            {
                "run": run,
                "block": run[0] - 1,
                "residual_plain": st.plain / max(tokens, 1),
                "residual_fitted": max(fitted, 0.0) / max(tokens, 1),
                "relative_residual": max(fitted, 0.0) / st.plain if st.plain > 0 else 0.0,
            }
        )
    for run in skipped:
        runs.append({"run": run, "block": None, "skipped": "no block before block 0"})
    chosen = sorted(int(b) for b in removed)
    return Compensation(
        removed=chosen,
        maps=maps,
        ridge=float(ridge),
        tokens=tokens,
        runs=runs,
        stored_inputs=stored is not None,
    )


def _stored_rows(
    inputs: BlockInputs | None,
    windows: torch.Tensor,
    runs: Sequence[Sequence[int]],
    num_blocks: int,
) -> list[int] | None:
    """Where ``inputs`` keep ``windows`` (every block's input), when they serve the fit: some
    run to fit and none ending at the last block (whose output is not stored); else None."""
    if inputs is None or not runs or any(run[-1] + 1 >= num_blocks for run in runs):
        return None
    return inputs.rows(windows)


def _vertex(points: Sequence[tuple[float, float]]) -> float | None:
    """Minimum of the parabola through the measured point with the lowest loss and its two
    neighbours in strength, when it lies strictly between them (else None)."""
    pts = sorted(points)
    best = min(range(len(pts)), key=lambda i: pts[i][1])
    if not 0 < best < len(pts) - 1:
        return None
    (a, fa), (b, fb), (c, fc) = pts[best - 1 : best + 2]
    den = (b - a) * (fb - fc) - (b - c) * (fb - fa)
    if den == 0:
        return None
    x = b - 0.5 * ((b - a) ** 2 * (fb - fc) - (b - c) ** 2 * (fb - fa)) / den
    x = round(x, 3)
    return x if a < x < c and all(x != p for p, _ in pts) else None


@torch.no_grad()
def tune_strength(
    model: nn.Module,
    compensation: Compensation,
    windows: torch.Tensor,
    *,
    strengths: Sequence[float] = DEFAULT_STRENGTHS,
    refine: bool = True,
    batch_size: int = 1,
    progress: ProgressCallback | None = None,
    inputs: BlockInputs | None = None,
    rule: str = DEFAULT_TUNE_RULE,
) -> Compensation:
    """Choose how much of the fitted maps to fold, the strength s of ``I + s (T - I)``, by the
    mean next-token NLL of the pruned, compensated model (the temperature, if any, left out)
    on ``windows`` ``[W, T]`` — calibration windows the maps were *not* fitted on.
    Every one of ``strengths`` is measured, then (``refine``) the minimum of the parabola
    through the best one and its neighbours. ``rule``: ``"min"`` keeps the strength with the
    lowest NLL; ``"one-se"`` (default) keeps the smallest strength whose NLL is within one
    standard error of the best's — the standard error of their per-prediction NLL difference
    (paired, same predictions) — so a correction fitted on one text is folded only as far as
    the calibration loss clearly asks for. Ties keep the smaller strength. Each measurement is
    one pass from the first compensated block (the dense input there is stored once) scoring
    every :data:`TUNE_STRIDE`-th prediction (the output head runs only there). Returns
    the compensation with ``strength`` and ``tuning`` set; the model is left as it was.
    ``inputs``: dense block inputs kept by the similarity capture; when they hold ``windows``,
    the first compensated block's input is read from there instead of a prefix pass."""
    if rule not in TUNE_RULES:
        raise InvalidInputError(f"rule must be one of {', '.join(TUNE_RULES)}, got {rule!r}")
    if not strengths or any(
        isinstance(s, bool) or not isinstance(s, int | float) or not 0 <= s <= 2 for s in strengths
    ):  # (NaN fails 0 <= s)
        raise InvalidInputError(f"strengths must be numbers in [0, 2], got {list(strengths)!r}")
    values = [float(s) for s in strengths]
    windows = check_windows(windows)
    if not compensation.maps:
        return compensation
    first = min(compensation.maps)
    scorer = WindowScorer(
        model,
        windows,
        batch_size=batch_size,
        reference=False,
        stage="compensation",
        stride=TUNE_STRIDE,
        keep_losses=True,
    )
    planned = len(values) + (1 if refine else 0)
    kept = None if inputs is None or first == 0 else inputs.of(first, windows)
    if kept is not None:
        scorer.use_inputs(first, kept)
    scorer.prefetch([[first]], passes=planned)  # every strength's pass starts there
    measured: dict[float, float] = {}
    losses: dict[float, torch.Tensor] = {}

    def measure(strength: float) -> None:
        trial = replace(compensation, strength=strength, temperature=None, tuning=None)
        with compensated_view(model, trial):
            score = scorer.score(compensation.removed, changed=first)
        losses[strength] = scorer.losses(compensation.removed)
        scorer.forget(compensation.removed)
        measured[strength] = score.nll
        if progress is not None:
            progress(
                "compensation",
                len(measured) / planned,
                f"strength {strength:g}: calibration nll {score.nll:.4f}",
            )

    for v in dict.fromkeys(values):
        measure(v)
    extra = _vertex(list(measured.items())) if refine else None
    if extra is not None:
        measure(extra)
    chosen, best, se = choose_strength(losses, rule)
    tuning = {
        "windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        "predictions": int(losses[best].numel()),
        "rule": rule,
        "lowest": best,
        "measured": [
            {"strength": s, "nll": measured[s], "se_vs_lowest": se[s]} for s in sorted(measured)
        ],
        "seconds": scorer.seconds,
    }
    return replace(compensation, strength=chosen, tuning=tuning)


def choose_strength(
    losses: Mapping[float, torch.Tensor], rule: str
) -> tuple[float, float, dict[float, float]]:
    """(chosen strength, lowest-NLL strength, each strength's paired standard error against
    the lowest) from every strength's per-prediction NLLs (see :func:`tune_strength`)."""
    mean = {s: float(x.double().mean()) for s, x in losses.items()}
    best = min(sorted(mean), key=lambda s: mean[s])
    se = {s: _paired_se(losses[s], losses[best]) for s in mean}
    if rule == "min":
        return best, best, se
    return min(s for s in mean if mean[s] <= mean[best] + se[s]), best, se


def _paired_se(a: torch.Tensor, b: torch.Tensor) -> float:
    """Standard error of the mean of ``a - b`` (per-prediction NLLs of the same predictions)."""
    d = (a.double() - b.double()).reshape(-1)
    if d.numel() < 2:
        return 0.0
    return float(d.std(unbiased=True)) / math.sqrt(d.numel())


def fit_tuned_compensation(
    model: nn.Module,
    removed: Sequence[int],
    windows: torch.Tensor,
    *,
    fit_windows: int,
    tune_windows: int,
    batch_size: int = 1,
    progress: ProgressCallback | None = None,
    inputs: BlockInputs | None = None,
) -> Compensation:
    """:func:`fit_compensation` on the first ``fit_windows`` of ``windows``, then
    :func:`tune_strength` on the next ``tune_windows`` (none left, or 0: the maps as fitted);
    both read the dense block inputs from ``inputs`` where it holds their windows."""
    comp = fit_compensation(
        model,
        removed,
        windows[:fit_windows],
        batch_size=batch_size,
        progress=progress,
        inputs=inputs,
    )
    tune = windows[fit_windows : fit_windows + tune_windows]
    if tune.shape[0]:
        comp = tune_strength(
            model, comp, tune, batch_size=batch_size, progress=progress, inputs=inputs
        )
    return comp


def first_changed(compensation: Compensation) -> int:
    """The first block (original numbering) whose output the pruned, compensated model
    changes: the first removed block, or the block before it when a map is folded there."""
    return min([*compensation.folded_maps(), *compensation.removed], default=0)


@torch.no_grad()
def fit_folded_temperature(
    model: nn.Module,
    compensation: Compensation,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    progress: ProgressCallback | None = None,
    inputs: BlockInputs | None = None,
) -> Compensation:
    """:func:`lorp.temperature.fit_temperature` of the model pruned by
    ``compensation.removed`` with its maps folded (the temperature already in it is left
    out), on ``windows``; returns the compensation with the fitted temperature. When
    ``inputs`` hold ``windows``, each pass starts at the first changed block from its stored
    dense input. The model is left as it was."""
    base = replace(compensation, temperature=None)
    start = first_changed(base)
    kept = None if inputs is None or start == 0 else inputs.of(start, check_windows(windows))
    view = (
        pruned_view(model, base.removed)
        if kept is None
        else resumed(model, base.removed, start, batched_feed(kept, batch_size))
    )
    with compensated_view(model, base), view:
        fitted = fit_temperature(model, windows, batch_size=batch_size, progress=progress)
    return replace(compensation, temperature=fitted)


def _folded(down: nn.Linear, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``T^T W`` and ``b T`` computed in float64 from the weights as they are and cast once to
    their dtype (a bf16 weight is rounded once, not after every product)."""
    weight = (t.T @ down.weight.detach().double()).to(down.weight.dtype)
    bias = None
    if down.bias is not None:
        bias = (down.bias.detach().double() @ t).to(down.bias.dtype)
    return weight, bias


def folded_layers(model: nn.Module, compensation: Compensation) -> dict[int, nn.Linear]:
    """The down projection every map of ``compensation`` is folded into (block -> layer), on
    the whole model (original numbering)."""
    blocks = get_blocks(model)
    if any(b >= len(blocks) for b in compensation.maps):
        raise InvalidInputError(
            "apply a compensation before removing the blocks (it uses the original numbering)"
        )
    return {b: _down_proj(blocks[b], b) for b in compensation.maps}


def apply_compensation(model: nn.Module, compensation: Compensation) -> Callable[[], None]:
    """Fold the fitted maps into the down projections and the temperature (if any) into the
    final norm (call before :func:`lorp.surgery.remove_blocks`: block numbers are the original
    ones). Returns a function that restores the original weights exactly."""
    downs = folded_layers(model, compensation)
    folded = compensation.folded_maps()
    unscale = (
        None
        if compensation.temperature is None
        else apply_temperature(model, compensation.temperature.scale)
    )
    saved = {
        b: (d.weight.detach().clone(), None if d.bias is None else d.bias.detach().clone())
        for b, d in downs.items()
    }

    @torch.no_grad()
    def put(values: Mapping[int, tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        for b, (weight, bias) in values.items():
            downs[b].weight.copy_(weight)
            if bias is not None and downs[b].bias is not None:
                downs[b].bias.copy_(bias)

    with torch.no_grad():
        put({b: _folded(downs[b], t.to(downs[b].weight.device)) for b, t in folded.items()})

    def restore() -> None:
        put(saved)
        if unscale is not None:
            unscale()

    return restore


@contextlib.contextmanager
def compensated_view(model: nn.Module, compensation: Compensation | None) -> Iterator[None]:
    """Run ``model`` with the maps folded in, then restore the original weights exactly; enter
    it before :func:`lorp.surgery.pruned_view` (original block numbers) to measure the
    compensated pruned model."""
    if compensation is None:
        yield
        return
    restore = apply_compensation(model, compensation)
    try:
        yield
    finally:
        restore()


__all__ = [
    "DEFAULT_RIDGE",
    "DEFAULT_STRENGTHS",
    "Compensation",
    "apply_compensation",
    "check_compensable",
    "choose_strength",
    "compensated_view",
    "first_changed",
    "fit_compensation",
    "fit_folded_temperature",
    "fit_tuned_compensation",
    "folded_layers",
    "temperature_only",
    "tune_strength",
]
