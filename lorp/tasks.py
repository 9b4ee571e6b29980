"""Zero-shot downstream accuracy, scored exactly as lm-evaluation-harness (lm-eval) scores it.

Six multiple-choice tasks (:data:`TASKS`: HellaSwag, PIQA, ARC-Easy, ARC-Challenge, WinoGrande,
BoolQ) read from a directory of normalised JSONL files (one per task, ``<task>.jsonl``, whose
``context`` / ``choices`` strings are lm-eval's own ``doc_to_text`` / ``doc_to_choice``; the
caller passes the directory, lorp never looks for it). Protocol, per lm-eval 0-shot:

1. **Requests.** One log-likelihood request per choice: ``(context, " " + choice)``; for
   WinoGrande ("partial scoring") the choice varies the context and the shared rest of the
   sentence is scored: ``(contexts[i], " " + continuation)``.
2. **Log-likelihood** of ``(ctx, cont)`` (lm-eval ``_encode_pair``): trailing whitespace of
   ``ctx`` moves to the front of ``cont``; ``whole = encode(ctx + cont)``, ``c = encode(ctx)``,
   continuation tokens ``whole[len(c):]`` (so a token merged across the boundary is scored as
   continuation, as lm-eval does); an empty context becomes the BOS (else EOS) token. The model
   reads ``(c + cont)[:-1]``, left-truncated to its context length, and the log-softmax
   (float32) of every continuation token is summed.
3. **Metrics** per item: ``acc = [argmax_i LL_i == label]``; ``acc_norm = [argmax_i LL_i /
   len(choice_i) == label]`` where ``len`` counts the *characters* of the choice string without
   the leading space (lm-eval's ``completion_len = [float(len(i)) for i in choices]`` in
   ``ConfigurableTask.process_results``: Python string length, not bytes, not tokens). Ties go
   to the first choice (``np.argmax``). A task's score is the mean over its items and its
   standard error lm-eval's ``mean_stderr``: sample standard deviation / sqrt(n)
   (= sqrt(p(1-p)/(n-1))).
4. lm-eval reports ``acc`` and ``acc_norm`` for HellaSwag, PIQA and ARC, ``acc`` only for
   WinoGrande and BoolQ (:data:`METRICS`); the headline metric of each task (:data:`HEADLINE`,
   the one papers quote) is what retention and averages use.

Batching: requests are tokenised once, requests whose model input is identical share one row
(BoolQ's " no" / " yes" are one forward pass, as lm-eval's logits cache does), rows are sorted
by length (longest first) and right-padded with an attention mask; with causal attention the
padding comes after every real token, so each row's log-likelihoods are those of the unpadded
sequence (positions start at 0 in both). Only the logits of the positions that predict
continuation tokens are computed when the model's ``forward`` takes ``logits_to_keep``.

Dense vs pruned: :func:`compare_tasks` scores the model, then the same model under
:func:`lorp.surgery.pruned_view` (and :func:`lorp.compensation.compensated_view` when a
compensation is given), on the same items; :class:`TaskComparison` gives retention
(pruned / dense headline score) per task, its average, and the paired drop with its standard
error.
"""

from __future__ import annotations

import inspect
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._blocks import locate_blocks
from ._forward import input_device
from .compensation import Compensation, compensated_view
from .errors import InvalidInputError
from .progress import ProgressCallback
from .surgery import pruned_view, validate_removed

__all__ = [
    "HEADLINE",
    "METRICS",
    "TASKS",
    "TaskComparison",
    "TaskItem",
    "TaskScore",
    "TaskScores",
    "check_encodable",
    "compare_scores",
    "compare_tasks",
    "encode_request",
    "load_task",
    "loglikelihoods",
    "model_max_length",
    "parse_tasks",
    "score_items",
    "score_tasks",
]

#: The tasks, in report order.
TASKS: tuple[str, ...] = ("hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande", "boolq")

#: The metrics lm-eval reports per task.
METRICS: dict[str, tuple[str, ...]] = {
    "hellaswag": ("acc", "acc_norm"),
    "piqa": ("acc", "acc_norm"),
    "arc_easy": ("acc", "acc_norm"),
    "arc_challenge": ("acc", "acc_norm"),
    "winogrande": ("acc",),
    "boolq": ("acc",),
}

#: The headline metric of each task (the one papers quote; used for retention and averages).
HEADLINE: dict[str, str] = {
    "hellaswag": "acc_norm",
    "piqa": "acc_norm",
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "winogrande": "acc",
    "boolq": "acc",
}

# lm-eval's fallback context length when neither the config nor the tokenizer gives one.
_DEFAULT_MAX_LENGTH = 2048
# transformers' "no limit" tokenizer.model_max_length.
_HUGE = int(1e29)


# --------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class TaskItem:
    """One multiple-choice item as lm-eval requests it.

    ``requests[i]`` is the ``(context, continuation)`` pair of choice ``i`` (continuation with
    its leading ``" "``); ``norm_lengths[i]`` the character length acc_norm divides by.
    """

    id: str
    task: str
    requests: tuple[tuple[str, str], ...]
    norm_lengths: tuple[int, ...]
    label: int


def parse_tasks(tasks: str | Iterable[str] | None) -> list[str]:
    """Task names from a list or a comma-separated string (``None``/``"all"``: every task),
    validated, de-duplicated, in the order given."""
    if tasks is None:
        return list(TASKS)
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out: list[str] = []
    for raw in names:
        if not isinstance(raw, str):
            raise InvalidInputError(f"task names must be strings, got {raw!r}")
        name = raw.strip()
        if name == "all":
            out.extend(t for t in TASKS if t not in out)
            continue
        if name not in METRICS:
            raise InvalidInputError(f"unknown task {raw!r}; choose from {', '.join(TASKS)}")
        if name not in out:
            out.append(name)
    if not out:
        raise InvalidInputError("no tasks given")
    return out


def _str_list(record: dict[str, Any], key: str, where: str) -> list[str]:
    value = record.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidInputError(f"{where}: {key!r} must be a list of strings")
    return value


def _item(record: Any, task: str, where: str) -> TaskItem:
    if not isinstance(record, dict):
        raise InvalidInputError(f"{where}: expected a JSON object")
    item_id, context, label = record.get("id"), record.get("context"), record.get("label")
    if not isinstance(item_id, str) or not isinstance(context, str):
        raise InvalidInputError(f"{where}: 'id' and 'context' must be strings")
    if record.get("task", task) != task:
        raise InvalidInputError(f"{where}: 'task' is {record.get('task')!r}, expected {task!r}")
    choices = _str_list(record, "choices", where)
    if len(choices) < 2 or any(not c for c in choices):
        raise InvalidInputError(f"{where}: 'choices' must hold at least two non-empty strings")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise InvalidInputError(f"{where}: 'label' must be a choice index, got {label!r}")
    if task == "winogrande":
        contexts = _str_list(record, "contexts", where)
        continuation = record.get("continuation")
        if len(contexts) != len(choices) or not isinstance(continuation, str):
            raise InvalidInputError(
                f"{where}: WinoGrande items need one 'contexts' entry per choice and a string "
                "'continuation'"
            )
        requests = tuple((c, " " + continuation) for c in contexts)
    else:
        requests = tuple((context, " " + c) for c in choices)
    return TaskItem(
        id=item_id,
        task=task,
        requests=requests,
        norm_lengths=tuple(len(c) for c in choices),
        label=label,
    )


def load_task(task: str, data_dir: str | Path, *, limit: int | None = None) -> list[TaskItem]:
    """The first ``limit`` items (all when ``None``) of ``<data_dir>/<task>.jsonl``.

    Raises :class:`InvalidInputError` for an unknown task, a missing file or a malformed line.
    """
    (name,) = parse_tasks([task])
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InvalidInputError(f"limit must be a positive integer or None, got {limit!r}")
    path = Path(data_dir) / f"{name}.jsonl"
    if not path.is_file():
        raise InvalidInputError(f"task data not found: {path}")
    items: list[TaskItem] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if limit is not None and len(items) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path.name} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"{where}: not JSON ({exc})") from None
            items.append(_item(record, name, where))
    if not items:
        raise InvalidInputError(f"{path} holds no items")
    return items


# --------------------------------------------------------------------------------------------
# Log-likelihoods


def model_max_length(model: nn.Module, tokenizer: Any = None) -> int:
    """The context length lm-eval uses: the config's ``n_positions`` / ``max_position_embeddings``
    / ``n_ctx``, else the tokenizer's ``model_max_length``, else 2048."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < _HUGE:
        return value
    return _DEFAULT_MAX_LENGTH


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return [int(t) for t in tokenizer.encode(text, add_special_tokens=add_special_tokens)]


def _prefix_token(tokenizer: Any) -> int:
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    raise InvalidInputError("an empty context needs a BOS or EOS token; the tokenizer has none")


def check_encodable(items: Iterable[TaskItem], tokenizer: Any) -> None:
    """Raise what :func:`encode_request` would for ``items`` before any is scored: a request
    with an empty context needs the tokenizer's BOS or EOS token to condition on."""
    if any(not context.rstrip() for item in items for context, _ in item.requests):
        _prefix_token(tokenizer)


def encode_request(
    tokenizer: Any,
    context: str,
    continuation: str,
    *,
    add_special_tokens: bool = True,
    cache: dict[str, list[int]] | None = None,
) -> tuple[list[int], list[int]]:
    """``(context_tokens, continuation_tokens)`` of one request, as lm-eval's ``_encode_pair``.

    ``add_special_tokens=True`` encodes with the tokenizer's default special tokens (a BOS only
    where the tokenizer adds one by default; SmolLM2's does not). ``cache`` memoises encodings
    of repeated strings (a shared context).
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]

    def enc(text: str) -> list[int]:
        if cache is None:
            return _encode(tokenizer, text, add_special_tokens)
        if text not in cache:
            cache[text] = _encode(tokenizer, text, add_special_tokens)
        return cache[text]

    if not context:
        return [_prefix_token(tokenizer)], enc(continuation)
    whole = enc(context + continuation)
    ctx = enc(context)
    return ctx, whole[len(ctx) :]


@dataclass
class _Row:
    tokens: tuple[int, ...]  # model input
    requests: list[tuple[int, int, list[int]]] = field(default_factory=list)  # (idx, start, tgt)


def _takes_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


@torch.no_grad()
def loglikelihoods(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[tuple[str, str]],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    add_special_tokens: bool = True,
    progress: ProgressCallback | None = None,
    stage: str = "evaluation",
    message: Callable[[int, int], str] | None = None,
) -> list[float]:
    """Sum of log-probabilities of each request's continuation given its context (protocol in
    the module docstring), in request order. Batched, right-padded; each value equals the one
    of a batch of one up to floating-point reduction order.

    ``max_length`` defaults to :func:`model_max_length`. ``progress(stage, fraction, text)`` is
    called after every batch (``message(done, total)`` rows can replace the text).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    limit = model_max_length(model, tokenizer) if max_length is None else max_length
    if limit < 1:
        raise InvalidInputError(f"max_length must be positive, got {limit}")
    cache: dict[str, list[int]] = {}
    rows: dict[tuple[int, ...], _Row] = {}
    out = [0.0] * len(requests)
    for index, (context, continuation) in enumerate(requests):
        ctx, cont = encode_request(
            tokenizer, context, continuation, add_special_tokens=add_special_tokens, cache=cache
        )
        whole = (ctx + cont)[-(limit + 1) :]
        n_cont = min(len(cont), len(whole) - 1)
        if n_cont <= 0:
            continue  # nothing to score: log-likelihood 0
        inp = tuple(whole[:-1])
        row = rows.setdefault(inp, _Row(inp))
        row.requests.append((index, len(inp) - n_cont, whole[-n_cont:]))

    ordered = sorted(rows.values(), key=lambda r: -len(r.tokens))
    device = input_device(model)
    keep_ok = _takes_logits_to_keep(model)
    pad = _pad_id(tokenizer)
    done = 0
    for start in range(0, len(ordered), batch_size):
        batch = ordered[start : start + batch_size]
        width = len(batch[0].tokens)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, row in enumerate(batch):
            ids[i, : len(row.tokens)] = torch.tensor(row.tokens, dtype=torch.long)
            mask[i, : len(row.tokens)] = 1
        first = min(s for row in batch for _, s, _ in row.requests)
        keep = width - first
        kwargs: dict[str, Any] = {"use_cache": False}
        if keep_ok:
            kwargs["logits_to_keep"] = keep
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs).logits
        logp = F.log_softmax(logits[:, -keep:].float(), dim=-1)
        for i, row in enumerate(batch):
            for index, s, target in row.requests:
                pos = torch.arange(s - first, s - first + len(target), device=logp.device)
                tgt = torch.tensor(target, dtype=torch.long, device=logp.device)
                out[index] = float(logp[i, pos, tgt].sum())
        done += len(batch)
        if progress is not None:
            text = (
                message(done, len(ordered))
                if message is not None
                else f"log-likelihoods {done}/{len(ordered)} sequences"
            )
            progress(stage, done / len(ordered), text)
    return out


# --------------------------------------------------------------------------------------------
# Scores


def _argmax(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def _stderr(values: Sequence[int]) -> float | None:
    """lm-eval's ``mean_stderr``: sample standard deviation / sqrt(n) (None for n < 2)."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return math.sqrt(variance / n)


@dataclass(frozen=True)
class TaskScore:
    """One task's accuracy. ``acc_norm`` is None where lm-eval does not report it;
    ``correct`` / ``correct_norm`` are the per-item outcomes (1/0) and ``loglikelihoods`` the
    per-item, per-choice values (kept for paired comparisons, not in :meth:`to_dict`)."""

    task: str
    n: int
    acc: float
    acc_stderr: float | None
    acc_norm: float | None
    acc_norm_stderr: float | None
    metric: str
    correct: tuple[int, ...] = field(repr=False)
    correct_norm: tuple[int, ...] | None = field(repr=False)
    loglikelihoods: tuple[tuple[float, ...], ...] = field(repr=False)

    @property
    def score(self) -> float:
        """The headline metric's value (:data:`HEADLINE`)."""
        value = self.acc_norm if self.metric == "acc_norm" else self.acc
        assert value is not None
        return value

    @property
    def stderr(self) -> float | None:
        return self.acc_norm_stderr if self.metric == "acc_norm" else self.acc_stderr

    def outcomes(self, metric: str | None = None) -> tuple[int, ...]:
        """Per-item 1/0 outcomes of ``metric`` (default: the headline)."""
        metric = metric or self.metric
        if metric == "acc_norm" and self.correct_norm is not None:
            return self.correct_norm
        if metric == "acc":
            return self.correct
        raise InvalidInputError(f"{self.task} has no metric {metric!r}")

    def head(self, n: int) -> TaskScore:
        """The score of the first ``n`` items alone (from the per-item outcomes; no model)."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.n:
            raise InvalidInputError(f"{self.task}: head needs 1 <= n <= {self.n}, got {n!r}")
        correct = self.correct[:n]
        norm = None if self.correct_norm is None else self.correct_norm[:n]
        return replace(
            self,
            n=n,
            acc=sum(correct) / n,
            acc_stderr=_stderr(correct),
            acc_norm=None if norm is None else sum(norm) / n,
            acc_norm_stderr=None if norm is None else _stderr(norm),
            correct=correct,
            correct_norm=norm,
            loglikelihoods=self.loglikelihoods[:n],
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "task": self.task,
            "n": self.n,
            "metric": self.metric,
            "score": self.score,
            "stderr": self.stderr,
            "acc": self.acc,
            "acc_stderr": self.acc_stderr,
        }
        if self.acc_norm is not None:
            out["acc_norm"] = self.acc_norm
            out["acc_norm_stderr"] = self.acc_norm_stderr
        return out


def _score(task: str, items: Sequence[TaskItem], lls: Sequence[Sequence[float]]) -> TaskScore:
    correct = tuple(int(_argmax(ll) == it.label) for it, ll in zip(items, lls, strict=True))
    acc = sum(correct) / len(correct)
    if "acc_norm" in METRICS[task]:
        correct_norm: tuple[int, ...] | None = tuple(
            int(_argmax([v / n for v, n in zip(ll, it.norm_lengths, strict=True)]) == it.label)
            for it, ll in zip(items, lls, strict=True)
        )
        assert correct_norm is not None
        acc_norm: float | None = sum(correct_norm) / len(correct_norm)
        acc_norm_stderr = _stderr(correct_norm)
    else:
        correct_norm, acc_norm, acc_norm_stderr = None, None, None
    return TaskScore(
        task=task,
        n=len(items),
        acc=acc,
        acc_stderr=_stderr(correct),
        acc_norm=acc_norm,
        acc_norm_stderr=acc_norm_stderr,
        metric=HEADLINE[task],
        correct=correct,
        correct_norm=correct_norm,
        loglikelihoods=tuple(tuple(ll) for ll in lls),
    )


@dataclass(frozen=True)
class TaskScores:
    """Scores of several tasks from one run; ``seconds`` is the scoring wall time."""

    tasks: dict[str, TaskScore]
    limit: int | None
    seconds: float

    @property
    def average(self) -> float:
        """Mean of the tasks' headline scores."""
        return sum(s.score for s in self.tasks.values()) / len(self.tasks)

    def head(self, limit: int) -> TaskScores:
        """The scores of the first ``limit`` items of each task (as if run with that limit;
        ``seconds`` stays that of the full run)."""
        return replace(
            self,
            tasks={name: s.head(min(limit, s.n)) for name, s in self.tasks.items()},
            limit=limit,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "limit": self.limit,
            "seconds": self.seconds,
            "average": self.average,
            "tasks": {name: s.to_dict() for name, s in self.tasks.items()},
        }


@torch.no_grad()
def score_items(
    model: nn.Module,
    tokenizer: Any,
    items: Mapping[str, Sequence[TaskItem]],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    add_special_tokens: bool = True,
    progress: ProgressCallback | None = None,
    stage: str = "evaluation",
    label: str = "tasks",
) -> dict[str, TaskScore]:
    """Score already loaded items (``{task: items}``) in one batched pass over all requests."""
    flat = [(task, it) for task, its in items.items() for it in its]
    if not flat:
        raise InvalidInputError("no task items to score")
    requests = [req for _, it in flat for req in it.requests]
    values = loglikelihoods(
        model,
        tokenizer,
        requests,
        batch_size=batch_size,
        max_length=max_length,
        add_special_tokens=add_special_tokens,
        progress=progress,
        stage=stage,
        message=lambda done, total: f"{label}: {done}/{total} sequences",
    )
    out: dict[str, TaskScore] = {}
    at = 0
    for task, its in items.items():
        lls: list[tuple[float, ...]] = []
        for it in its:
            lls.append(tuple(values[at : at + len(it.requests)]))
            at += len(it.requests)
        out[task] = _score(task, its, lls)
    return out


def _load_all(
    tasks: str | Iterable[str] | None, data_dir: str | Path, limit: int | None
) -> dict[str, list[TaskItem]]:
    return {name: load_task(name, data_dir, limit=limit) for name in parse_tasks(tasks)}


def score_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: str | Iterable[str] | None = None,
    *,
    data_dir: str | Path,
    limit: int | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    add_special_tokens: bool = True,
    progress: ProgressCallback | None = None,
    stage: str = "evaluation",
) -> TaskScores:
    """Accuracy of ``model`` on ``tasks`` (default: all of :data:`TASKS`), first ``limit``
    items of each ``<data_dir>/<task>.jsonl``."""
    items = _load_all(tasks, data_dir, limit)
    began = time.perf_counter()
    scores = score_items(
        model,
        tokenizer,
        items,
        batch_size=batch_size,
        max_length=max_length,
        add_special_tokens=add_special_tokens,
        progress=progress,
        stage=stage,
    )
    return TaskScores(tasks=scores, limit=limit, seconds=time.perf_counter() - began)


# --------------------------------------------------------------------------------------------
# Dense vs pruned


@dataclass(frozen=True)
class TaskComparison:
    """Dense and pruned scores on the same items. ``retention[task]`` = pruned / dense headline
    score (None when the dense score is 0); ``drop[task]`` = dense - pruned with its paired
    standard error ``drop_stderr[task]`` (std of the per-item differences / sqrt(n))."""

    dense: TaskScores
    pruned: TaskScores
    removed: list[int] | None

    @property
    def retention(self) -> dict[str, float | None]:
        return {
            name: (self.pruned.tasks[name].score / d.score if d.score > 0 else None)
            for name, d in self.dense.tasks.items()
        }

    @property
    def average_retention(self) -> float | None:
        """Mean over tasks of the per-task retention (None if any is undefined)."""
        values = list(self.retention.values())
        if any(v is None for v in values):
            return None
        return sum(v for v in values if v is not None) / len(values)

    @property
    def drop(self) -> dict[str, float]:
        return {n: d.score - self.pruned.tasks[n].score for n, d in self.dense.tasks.items()}

    @property
    def drop_stderr(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for name, d in self.dense.tasks.items():
            p = self.pruned.tasks[name]
            diffs = [a - b for a, b in zip(d.outcomes(), p.outcomes(), strict=True)]
            out[name] = _stderr(diffs)
        return out

    def to_dict(self) -> dict[str, Any]:
        retention, drop, drop_se = self.retention, self.drop, self.drop_stderr
        return {
            "removed": self.removed,
            "limit": self.dense.limit,
            "tasks": {
                name: {
                    "n": d.n,
                    "metric": d.metric,
                    "dense": d.to_dict(),
                    "pruned": self.pruned.tasks[name].to_dict(),
                    "retention": retention[name],
                    "drop": drop[name],
                    "drop_stderr": drop_se[name],
                }
                for name, d in self.dense.tasks.items()
            },
            "average": {
                "dense": self.dense.average,
                "pruned": self.pruned.average,
                "retention": self.average_retention,
            },
            "seconds": {"dense": self.dense.seconds, "pruned": self.pruned.seconds},
        }


def compare_scores(
    dense: TaskScores, pruned: TaskScores, removed: Sequence[int] | None = None
) -> TaskComparison:
    """Pair two runs scored on the same items (e.g. a dense run and an already pruned model)."""
    if list(dense.tasks) != list(pruned.tasks):
        raise InvalidInputError("dense and pruned scores cover different tasks")
    for name, d in dense.tasks.items():
        p = pruned.tasks[name]
        if d.n != p.n:
            raise InvalidInputError(f"{name}: dense scored {d.n} items, pruned {p.n}")
    return TaskComparison(
        dense=dense, pruned=pruned, removed=None if removed is None else sorted(removed)
    )


def compare_tasks(
    model: nn.Module,
    tokenizer: Any,
    removed: Sequence[int],
    tasks: str | Iterable[str] | None = None,
    *,
    data_dir: str | Path,
    limit: int | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    add_special_tokens: bool = True,
    compensation: Compensation | None = None,
    dense: TaskScores | None = None,
    progress: ProgressCallback | None = None,
    stage: str = "evaluation",
) -> TaskComparison:
    """Score ``model`` and the same model with blocks ``removed`` (original numbering; the
    ``compensation``'s maps folded in when given) on the same items, and pair them.

    ``dense`` reuses an earlier dense run on the same tasks and limit (it is not re-scored).
    The model is restored exactly afterwards. Progress runs 0..1 over the dense half, then over
    the pruned half (``progress`` is called with the overall fraction).
    """
    removed = validate_removed(len(locate_blocks(model).blocks), removed)  # before any scoring
    items = _load_all(tasks, data_dir, limit)
    common: dict[str, Any] = {
        "batch_size": batch_size,
        "max_length": max_length,
        "add_special_tokens": add_special_tokens,
        "stage": stage,
    }

    def part(offset: float, share: float) -> ProgressCallback | None:
        if progress is None:
            return None
        report = progress

        def inner(name: str, fraction: float, text: str) -> None:
            report(name, offset + share * fraction, text)

        return inner

    if dense is None:
        began = time.perf_counter()
        dense_scores = score_items(
            model, tokenizer, items, progress=part(0.0, 0.5), label="dense", **common
        )
        dense = TaskScores(dense_scores, limit, time.perf_counter() - began)
        offset, share = 0.5, 0.5
    else:
        offset, share = 0.0, 1.0
    began = time.perf_counter()
    with compensated_view(model, compensation), pruned_view(model, removed):
        pruned_scores = score_items(
            model, tokenizer, items, progress=part(offset, share), label="pruned", **common
        )
    pruned = TaskScores(pruned_scores, limit, time.perf_counter() - began)
    return compare_scores(dense, pruned, removed)
