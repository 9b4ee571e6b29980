"""The job spec (pydantic), shared by the API and the worker: ``JobCreate`` (what a client sends,
what the job record stores, what the worker runs), its parts and checks, the job's life cycle
(``JobState``) and what the record says of its outcome (``JobError``, ``JobSummary``). The API's
response models are in ``service.schemas``.

Source URIs are checked in two layers. Syntax (scheme, bucket name, no ``..``, no control
characters) is always checked. Checks that need the operator's configuration and the caller's
tenant (local roots, named corpora, hub access, tenant prefix in the artifact bucket) run when the
model is validated with ``context={"settings": Settings, "tenant": str}`` — see
:func:`validate_job`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Callable, Collection
from dataclasses import fields
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from jobcore import webhooks
from jobcore.config import Settings
from lorp.errors import InvalidInputError
from lorp.methods import (
    HEAL_EVAL_EVERY,
    HEAL_LR,
    MAX_HEAL_STEPS,
    all_methods,
    get_method,
    method_names,
    selector,
)
from lorp.paths import check_confined

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")

MAX_URI_LEN = 1024
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_HUB_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")
_CORPUS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_GGUF_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,200}\.gguf$")
#: Weight files the service loads (never pickle); a model folder must hold one of them.
WEIGHT_SUFFIXES = (".safetensors", ".gguf")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
#: Passes over the scoring windows that admission control charges a model-in-the-loop method.
NOMINAL_PASSES = 32
#: Scoring windows (count, tokens) admission control charges when the job gives none: at least
#: every registered method's default (a unit test checks it), so the estimate never undercounts.
NOMINAL_SCORING = (8, 512)
#: The downstream tasks a job can score (``lorp.tasks.TASKS``, which imports torch, so they are
#: named here too; a unit test checks both lists are the same, in the same order).
TASK_NAMES = ("hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande", "boolq")
#: Token positions admission control charges per task item and model (dense or pruned): every
#: choice's sequence of an item together. Measured on SmolLM2's tokenizer over the shared task
#: data, an item averages about 360 (HellaSwag: 4 endings of ~90), 110 (PIQA), 150 (ARC), 60
#: (WinoGrande) and 180 (BoolQ: one passage, " no"/" yes" share a row) tokens; 400 covers the
#: costliest task, so the estimate never undercounts on a similar tokenizer.
TASK_ITEM_TOKENS = 400
#: Depths a budget by quality target is charged for (lorp.target's scan measures the depths up to
#: the first that misses the target; how many is unknown before the model is read).
NOMINAL_DEPTHS = 8


#: Layer-selection methods: every method of the library's registry (:mod:`lorp.methods`, which
#: imports neither torch nor numpy), in its order, so the API never drifts from the worker's lorp.
Method = StrEnum("Method", [(m, m) for m in method_names()])  # type: ignore[misc]
Method.__doc__ = "Layer-selection method (the methods registered in ``lorp.methods``)."
#: Methods that take ``num_clusters`` (the registry's ``takes_clusters``, as ``PruneConfig``).
CLUSTER_METHODS = method_names(takes_clusters=True)


def _method_help() -> str:
    """The ``method`` field's description: every registered method's name and description."""
    return "; ".join(f"{m.name}: {m.description}" for m in all_methods())


def _scoring_help(which: int, what: str) -> str:
    """Description of ``score_windows`` (``which`` 0) / ``score_seq_len`` (1): the methods that
    run the model and their defaults, from the registry."""
    defaults: dict[int, list[str]] = {}
    for m in all_methods():
        if m.needs_model:
            defaults.setdefault(selector(m.name).scoring_shape[which], []).append(m.name)
    listed = "; ".join(f"{value} for {', '.join(names)}" for value, names in defaults.items())
    return f"{what}; null: the method's default ({listed})"


class DType(StrEnum):
    """Compute dtype the worker loads the model in (``auto``: the checkpoint's own)."""

    auto = "auto"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class Offload(StrEnum):
    """Memory mode of the job (``lorp.offload``): ``sequential`` runs one block at a time on the
    device; ``auto`` does when the model does not fit the worker's device."""

    auto = "auto"
    none = "none"
    sequential = "sequential"


class Device(StrEnum):
    """Where a job runs: ``cpu`` or ``cuda`` workers, or ``auto`` (a GPU worker when one can
    hold the model, else a CPU worker; ``jobcore.routing``)."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class OutputFormat(StrEnum):
    """A format of the pruned model the job writes (``lorp.outputs.OUTPUT_FORMATS``)."""

    gguf = "gguf"
    safetensors = "safetensors"


#: A downstream task (:data:`TASK_NAMES`).
TaskName = StrEnum("TaskName", [(t, t) for t in TASK_NAMES])  # type: ignore[misc]
TaskName.__doc__ = "A zero-shot downstream task (lorp.tasks), scored as lm-evaluation-harness does."


class JobState(StrEnum):
    """Life cycle: queued -> running -> succeeded | failed | cancelled (queued -> cancelled)."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


TERMINAL_STATES = frozenset({JobState.succeeded, JobState.failed, JobState.cancelled})


# --------------------------------------------------------------------------------------------
# Source URIs


def _reject(msg: str) -> ValueError:
    return ValueError(msg)


def _check_syntax(value: str, kind: Literal["model", "text"]) -> str:
    """Syntax-only validation of a source URI; returns the normalised value."""
    if not value or not value.strip():
        raise _reject("must not be empty")
    if len(value) > MAX_URI_LEN:
        raise _reject(f"longer than {MAX_URI_LEN} characters")
    if _CONTROL_RE.search(value) or value != value.strip():
        raise _reject("contains control characters or surrounding whitespace")
    if value.startswith("s3://"):
        bucket, _, key = value[5:].partition("/")
        if not _BUCKET_RE.match(bucket) or ".." in bucket:
            raise _reject(f"not a valid S3 bucket name: {bucket!r}")
        if bucket.replace(".", "").isdigit():  # the only names that can be (IPv4) addresses
            try:
                ipaddress.ip_address(bucket)
            except ValueError:
                pass
            else:
                raise _reject("S3 bucket names can't be IP addresses")
        key = key.rstrip("/") if kind == "model" else key
        if not key:
            raise _reject("S3 URI needs a key: s3://bucket/key")
        parts = key.split("/")
        if any(p in ("", ".", "..") for p in parts) or "\\" in key:
            raise _reject("S3 key must not contain empty, '.' or '..' path segments")
        return f"s3://{bucket}/{key}"
    if value.startswith("hf:"):
        if kind != "model":
            raise _reject("hub ids (hf:) are only accepted for the model")
        repo = value[3:]
        if not _HUB_RE.match(repo) or ".." in repo:
            raise _reject("hub id must look like hf:org/name")
        return value
    if value.startswith("corpus:"):
        if kind != "text":
            raise _reject("named corpora (corpus:) are only accepted for calibration/evaluation")
        if not _CORPUS_RE.match(value[7:]):
            raise _reject("corpus name must be letters, digits, '_', '.', '-'")
        return value
    if value.startswith("/"):
        if "\\" in value or any(p in (".", "..") for p in value.split("/")):
            raise _reject("path must not contain '.' or '..' segments")
        return os.path.normpath(value)
    if "://" in value or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", value):
        raise _reject(
            "unsupported URI scheme; use s3://bucket/key, an absolute path under an allowed "
            "local root" + (", hf:org/name" if kind == "model" else ", corpus:<name>")
        )
    raise _reject("relative paths are not accepted; use an absolute path or s3://bucket/key")


def _check_context(value: str, kind: Literal["model", "text"], info: ValidationInfo) -> str:
    """Operator/tenant-dependent checks; a no-op without validation context."""
    ctx = info.context or {}
    settings: Settings | None = ctx.get("settings")
    tenant: str | None = ctx.get("tenant")
    if settings is None:
        return value
    if value.startswith("s3://"):
        # Only locations granted to the caller's tenant; one answer whatever the store holds
        # (no existence oracle: nothing is looked up here).
        if tenant is None or not settings.s3_input_granted(value, tenant):
            raise _reject(s3_not_granted_message(settings, tenant))
        return value
    if value.startswith("hf:"):
        if not settings.allow_hub:
            raise _reject("hub models (hf:) are disabled by the operator")
        return value
    if value.startswith("corpus:"):
        name = value[7:]
        if name not in settings.corpora:
            known = ", ".join(sorted(settings.corpora)) or "none configured"
            raise _reject(f"unknown corpus {name!r} (available: {known})")
        return value
    # absolute local path
    real = Path(os.path.realpath(value))
    if not any(real.is_relative_to(root) for root in settings.local_roots):
        raise _reject("path is not under an allowed local root (after resolving symlinks)")
    if not real.exists():
        raise _reject("path does not exist")
    try:
        # every file under it stays inside the roots, links resolved (the worker checks again
        # right before it reads); a GGUF file's folder too: transformers reads files beside it
        check_confined(value, settings.local_roots)
        if kind == "model" and real.is_file():
            check_confined(real.parent, settings.local_roots)
    except InvalidInputError as e:
        raise _reject(str(e)) from None
    if kind == "text" and not real.is_file():
        raise _reject("text source must be a file")
    if kind == "model":
        if real.is_file() and real.suffix != ".gguf":
            raise _reject("a model file must be .gguf; give the directory of a safetensors model")
        if real.is_dir() and not any(
            p.name.endswith(WEIGHT_SUFFIXES) for p in real.iterdir() if p.is_file()
        ):
            raise _reject(
                "no .safetensors or .gguf weights in the directory (pickle weights are refused)"
            )
    return value


def s3_not_granted_message(settings: Settings, tenant: str | None) -> str:
    """The one refusal for an ``s3://`` input outside the tenant's granted locations."""
    granted = ", ".join(settings.input_prefixes(tenant)) if tenant else "none"
    return f"s3:// inputs must be inside a location granted to your tenant ({granted})"


# --------------------------------------------------------------------------------------------
# Job creation

BatchSize = Annotated[StrictInt, Field(ge=1, le=64)]
PromptLen = Annotated[StrictInt, Field(ge=1, le=8192)]
NewTokens = Annotated[StrictInt, Field(ge=1, le=2048)]
OutputFormats = Annotated[list[OutputFormat], Field(min_length=1, max_length=len(OutputFormat))]


class BenchMode(StrEnum):
    """How the benchmark runs the models (``lorp.bench``): transformers eager, or a static KV
    cache with ``torch.compile`` (decode only; CUDA graphs on a GPU)."""

    eager = "eager"
    compiled = "compiled"


BenchModes = Annotated[list[BenchMode], Field(min_length=1, max_length=len(BenchMode))]


class Budget(BaseModel):
    """How much to remove: exactly one of ``blocks`` (a count), ``fraction`` (of all blocks), or
    a quality target whose depth the worker searches (lorp.target): ``max_ppl_ratio`` or
    ``min_task_retention``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"blocks": 6},
                {"fraction": 0.2},
                {"max_ppl_ratio": 1.5},
                {"min_task_retention": 0.95},
            ]
        },
    )

    blocks: Annotated[StrictInt, Field(ge=1, le=1024)] | None = Field(
        default=None, description="number of blocks to remove"
    )
    fraction: Annotated[StrictFloat, Field(gt=0.0, lt=1.0)] | None = Field(
        default=None, description="fraction of the blocks to remove (0..1)"
    )
    max_ppl_ratio: Annotated[StrictFloat, Field(gt=1.0, allow_inf_nan=False)] | None = Field(
        default=None,
        description="remove as many blocks as keep the held-out perplexity ratio pruned/dense "
        "at most this (> 1); the depth is searched on held-out calibration windows and "
        "confirmed on the evaluation text",
    )
    min_task_retention: (
        Annotated[StrictFloat, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None
    ) = Field(
        default=None,
        description="remove as many blocks as keep the average downstream task retention at "
        "least this (0..1]; needs tasks; searched on items after the first task_limit",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Budget:
        if sum(getattr(self, name) is not None for name in type(self).model_fields) != 1:
            raise ValueError(
                "give exactly one of 'blocks', 'fraction', 'max_ppl_ratio' or 'min_task_retention'"
            )
        return self

    def value(self) -> int | float | dict[str, float]:
        """The budget as ``lorp`` reports it (int = count, float = fraction, ``{kind: value}`` =
        a quality target)."""
        if self.blocks is not None:
            return self.blocks
        if self.fraction is not None:
            return float(self.fraction)
        return self.model_dump(exclude_none=True)


class BenchmarkSpec(BaseModel):
    """Latency/memory workloads measured on the original and the pruned model."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "prefill": [[1, 512], [8, 128]],
                    "decode": [[1, 32, 64], [16, 32, 128]],
                    "modes": ["eager", "compiled"],
                    "budget_s": 120,
                }
            ]
        },
    )

    prefill: Annotated[list[tuple[BatchSize, PromptLen]], Field(max_length=8)] = Field(
        default_factory=lambda: [(1, 512)],
        description="prefill workloads [batch, prompt tokens] (time to first token)",
    )
    decode: Annotated[list[tuple[BatchSize, PromptLen, NewTokens]], Field(max_length=8)] = Field(
        default_factory=lambda: [(1, 32, 16)],
        description="decode workloads [batch, prompt tokens, new tokens] (tokens per second; "
        "batch 1 is latency, e.g. [16, 32, 128] and [64, 32, 128] serving throughput)",
    )
    modes: BenchModes | None = Field(
        default=None,
        description="eager and/or compiled (static KV cache + torch.compile, decode "
        "workloads only); null: eager, plus compiled on a GPU worker",
    )
    warmup: Annotated[StrictInt, Field(ge=0, le=20)] = Field(
        default=1, description="untimed runs per model and workload (the last measures memory)"
    )
    repetitions: Annotated[StrictInt, Field(ge=3, le=200)] = Field(
        default=20,
        description="most A/B pairs per workload: at least 3 run, then more until the "
        "speedup's 95% interval is within ±2% or the workload's share of the budget is spent",
    )
    budget_s: Annotated[float, Field(gt=0, le=3600)] | None = Field(
        default=None,
        description="seconds for the whole benchmark; null: 25% of the job's other stages",
    )
    measure_blocks: StrictBool = Field(
        default=True, description="time every block to report the ideal speedup"
    )

    @model_validator(mode="after")
    def _some_workload(self) -> BenchmarkSpec:
        if not self.prefill and not self.decode:
            raise ValueError("give at least one prefill or decode workload (or benchmark: null)")
        if len(set(self.prefill)) != len(self.prefill) or len(set(self.decode)) != len(self.decode):
            raise ValueError("benchmark workloads must not repeat")
        if self.modes == [BenchMode.compiled] and not self.decode:
            raise ValueError("the compiled mode times decode workloads: give one")
        return self


class QualityGateSpec(BaseModel):
    """Limits the pruned model must meet on the held-out quality measurement (dense vs pruned on
    the same tokens: the evaluation text, or calibration windows held out after the calibration
    and scoring windows). A broken limit ends the job ``failed`` with code ``quality_gate`` and
    no checkpoint is published. At least one limit."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"max_ppl_ratio": 1.5, "min_top1_agreement": 0.8}, {"max_kl": 0.5}]
        },
    )

    max_ppl_ratio: Annotated[StrictFloat, Field(ge=1.0, allow_inf_nan=False)] | None = Field(
        default=None, description="highest allowed perplexity ratio pruned/dense (>= 1)"
    )
    max_kl: Annotated[StrictFloat, Field(ge=0.0, allow_inf_nan=False)] | None = Field(
        default=None, description="highest allowed mean KL(dense || pruned), nats per token"
    )
    min_top1_agreement: (
        Annotated[StrictFloat, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None
    ) = Field(default=None, description="lowest allowed top-1 next-token agreement (0..1)")
    min_task_retention: (
        Annotated[StrictFloat, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None
    ) = Field(
        default=None,
        description="lowest allowed average downstream task retention, pruned / dense accuracy "
        "averaged over the job's tasks (0..1; needs tasks)",
    )

    @model_validator(mode="after")
    def _some_limit(self) -> QualityGateSpec:
        if all(getattr(self, name) is None for name in type(self).model_fields):
            raise ValueError(
                "give at least one of max_ppl_ratio, max_kl, min_top1_agreement, "
                "min_task_retention (or quality_gate: null)"
            )
        return self


class HealSpec(BaseModel):
    """Healing the folded maps (``lorp.heal``; needs compensation: method ``lorp-fold`` or
    ``compensate``): after the fold, the linear maps alone are trained to match the dense
    model's logits (KL) on the compensation's fit windows, at most ``steps`` steps, stopping
    early on its tune windows; all other weights frozen."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"steps": 60}]})

    steps: Annotated[StrictInt, Field(ge=1, le=MAX_HEAL_STEPS)] = Field(
        description="most training steps (one batch of calibration windows each)"
    )
    lr: Annotated[StrictFloat, Field(gt=0.0, le=1.0, allow_inf_nan=False)] = Field(
        default=HEAL_LR, description="Adam's learning rate on the maps"
    )


class JobCreate(BaseModel):
    """A pruning job: which model, which calibration text, which method and budget."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "s3://lorp-inputs/acme/models/smollm2-135m",
                    "calibration": "corpus:wikitext2-train",
                    "evaluation": "s3://lorp-inputs/acme/texts/heldout.txt",
                    "method": "lorp",
                    "budget": {"blocks": 6},
                    "windows": 32,
                    "seq_len": 512,
                },
                {
                    "model": "s3://lorp-inputs/acme/models/smollm2-135m",
                    "calibration": "corpus:wikitext2-train",
                    "method": "auto",
                    "budget": {"blocks": 6},
                    "quality_gate": {"max_ppl_ratio": 1.5, "min_top1_agreement": 0.8},
                },
                {
                    "model": "s3://lorp-inputs/acme/models/smollm2-135m",
                    "calibration": "corpus:wikitext2-train",
                    "method": "lorp-loss",
                    "budget": {"fraction": 0.2},
                    "compensate": True,
                    "temperature": True,
                },
                {
                    "model": "s3://lorp-inputs/acme/models/smollm2-135m",
                    "calibration": "corpus:wikitext2-train",
                    "method": "lorp-fold",
                    "budget": {"fraction": 0.2},
                },
            ]
        },
    )

    model: Annotated[
        StrictStr,
        Field(
            description="s3://bucket/key (safetensors dir prefix or "
            ".gguf), /abs/path under a local root, or hf:org/name"
        ),
    ]
    gguf_file: StrictStr | None = Field(
        default=None,
        description="GGUF file name inside a model directory/prefix holding several files",
    )
    calibration: Annotated[
        StrictStr,
        Field(description="s3://bucket/key.txt, corpus:<name> or /abs/path under a local root"),
    ]
    evaluation: StrictStr | None = Field(
        default=None, description="held-out text for perplexity (same forms as calibration)"
    )
    method: Method = Field(default=Method("lorp"), description=_method_help())
    budget: Budget
    num_clusters: Annotated[StrictInt, Field(ge=1, le=256)] | None = Field(
        default=None,
        description=f"force the number of phases K (methods {', '.join(CLUSTER_METHODS)} only)",
    )
    windows: Annotated[StrictInt, Field(ge=1, le=1024)] = Field(
        default=32, description="calibration windows the similarity matrix S is measured on"
    )
    seq_len: Annotated[StrictInt, Field(ge=8, le=8192)] = Field(
        default=512, description="tokens per calibration and evaluation window"
    )
    batch_size: Annotated[StrictInt, Field(ge=1, le=64)] = Field(
        default=1, description="windows per forward pass"
    )
    eval_windows: Annotated[StrictInt, Field(ge=1, le=1024)] = Field(
        default=64, description="windows of the evaluation text the quality is measured on"
    )
    holdout_windows: Annotated[StrictInt, Field(ge=0, le=1024)] = Field(
        default=8,
        description="calibration windows held out for the quality measurement when no "
        "evaluation text is given (0: none; quality is then not measured)",
    )
    score_windows: Annotated[StrictInt, Field(ge=1, le=256)] | None = Field(
        default=None,
        description=_scoring_help(0, "scoring windows of the methods that run the model"),
    )
    score_seq_len: Annotated[StrictInt, Field(ge=8, le=8192)] | None = Field(
        default=None,
        description=_scoring_help(1, "scoring window length in tokens"),
    )
    search_candidates: Annotated[StrictInt, Field(ge=1, le=16)] = Field(
        default=3,
        description="lorp-kl: candidates measured per removal slot",
    )
    compensate: StrictBool = Field(
        default=False,
        description="fold a fitted linear stand-in for every removed run of blocks into the "
        "block before it (training-free; Llama/Qwen-style blocks only)",
    )
    compensation_windows: Annotated[StrictInt, Field(ge=1, le=1024)] = Field(
        default=12,
        description="with compensate: calibration windows the linear maps are fitted on",
    )
    compensation_tune_windows: Annotated[StrictInt, Field(ge=0, le=1024)] = Field(
        default=2,
        description="with compensate: calibration windows after the fit windows on which "
        "the strength of the fold is chosen by loss; 0: fold the maps as fitted",
    )
    heal: HealSpec | None = Field(
        default=None,
        description="with compensate (lorp-fold): then train the folded maps alone to match "
        "the dense model's logits on the fit windows, stopping early on the tune windows "
        "(null: off)",
    )
    temperature: StrictBool = Field(
        default=False,
        description="fit the pruned model's logit scale on calibration windows and fold it "
        "into the final norm (training-free)",
    )
    temperature_windows: Annotated[StrictInt, Field(ge=1, le=1024)] = Field(
        default=4,
        description="with temperature: the last calibration windows the scale is fitted on",
    )
    tasks: Annotated[list[TaskName], Field(max_length=len(TASK_NAMES))] = Field(
        default_factory=list,
        description="downstream tasks scored zero-shot on the dense and the pruned model "
        "(accuracy, standard error and retention in the report and the summary); needs the "
        "operator's task data (LORP_TASKS_DIR)",
    )
    task_limit: Annotated[StrictInt, Field(ge=1, le=5000)] = Field(
        default=200, description="with tasks: the first N items of each task"
    )
    target_task_items: Annotated[StrictInt, Field(ge=1, le=1000)] = Field(
        default=50,
        description="with budget min_task_retention: items of each task (after the first "
        "task_limit) every searched depth is scored on",
    )
    quality_gate: QualityGateSpec | None = Field(
        default=None,
        description="limits the pruned model must meet, or the job fails with code "
        "quality_gate and publishes nothing (null: none)",
    )
    dtype: DType = Field(
        default=DType.auto,
        description="compute dtype of the model; auto: the checkpoint's own (config "
        "torch_dtype; a GGUF: bfloat16 on a GPU worker, float32 on CPU); the report says which",
    )
    offload: Offload = Field(
        default=Offload.auto,
        description="models larger than the worker's device: sequential keeps the weights in "
        "host memory or on disk and moves one block at a time to the device (calibration and "
        "evaluation: every window passes through a block before the next one comes; scoring, "
        "compensation, temperature and tasks: block by block per window; no benchmark); auto: "
        "sequential when the estimated weights plus a working margin exceed the device's free "
        "memory or the operator's max_device_memory; none: the whole model on the device. The "
        "report says which mode ran and why",
    )
    device: Device = Field(
        default=Device.auto,
        description="which workers run the job: cpu, cuda, or auto (a GPU worker when one can "
        "hold the model, else a CPU worker); a model no worker pool can hold is refused with "
        "code model_too_large",
    )
    output_formats: OutputFormats | None = Field(
        default=None,
        description="formats of the pruned model: gguf (a GGUF input pruned by file "
        "surgery, its quantization kept) and/or safetensors; null: the input's format",
    )
    benchmark: BenchmarkSpec | None = Field(
        default=None,
        description="latency/memory workloads timed on the original and the pruned model "
        "(null: no benchmark)",
    )
    callback_url: Annotated[StrictStr, Field(max_length=2048)] | None = Field(
        default=None,
        description="https URL that gets a signed POST (X-LoRP-Signature: t=<unix>,v1=<hex "
        "HMAC-SHA256 of '<t>.<body>'>) each time the job changes state, at least once, with "
        "an event id (X-LoRP-Event-Id, '<job id>.<state>') to drop duplicates by; its host "
        "must be one the operator allows and resolve to public addresses",
    )

    @field_validator("model")
    @classmethod
    def _model_uri(cls, v: str, info: ValidationInfo) -> str:
        return _check_context(_check_syntax(v, "model"), "model", info)

    @field_validator("calibration", "evaluation")
    @classmethod
    def _text_uri(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return None
        return _check_context(_check_syntax(v, "text"), "text", info)

    @field_validator("callback_url")
    @classmethod
    def _callback_url(cls, v: str | None, info: ValidationInfo) -> str | None:
        settings: Settings | None = (info.context or {}).get("settings")
        if v is None or settings is None:
            return v
        try:
            webhooks.check_url(v, settings)
        except webhooks.CallbackRefusedError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("output_formats")
    @classmethod
    def _distinct_formats(cls, v: list[OutputFormat] | None) -> list[OutputFormat] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError("output formats must not repeat")
        return v

    @field_validator("tasks")
    @classmethod
    def _distinct_tasks(cls, v: list[Any]) -> list[Any]:
        if len(set(v)) != len(v):
            raise ValueError("tasks must not repeat")
        return v

    @field_validator("gguf_file")
    @classmethod
    def _gguf_name(cls, v: str | None) -> str | None:
        if v is not None and (not _GGUF_NAME_RE.match(v) or ".." in v):
            raise ValueError("must be a plain file name ending in .gguf")
        return v

    @model_validator(mode="after")
    def _consistency(self, info: ValidationInfo) -> JobCreate:
        if self.gguf_file is not None and self.model.endswith(".gguf"):
            raise ValueError("gguf_file is only for a model directory/prefix, not a .gguf file")
        if self.num_clusters is not None and self.method.value not in CLUSTER_METHODS:
            raise ValueError(
                f"num_clusters only applies to methods {' and '.join(CLUSTER_METHODS)}, "
                f"not {self.method.value!r}"
            )
        gate = self.quality_gate
        if gate is not None and gate.min_task_retention is not None and not self.tasks:
            raise ValueError("quality_gate.min_task_retention needs tasks to score")
        if self.heal is not None:
            self._check_heal()
        if self.budget.min_task_retention is not None and not self.tasks:
            raise ValueError("budget min_task_retention needs tasks to score")
        if self.budget.max_ppl_ratio is not None and self.holdout_windows < 1:
            raise ValueError(
                "budget max_ppl_ratio searches the depth on held-out calibration windows: "
                "holdout_windows must be at least 1"
            )
        settings: Settings | None = (info.context or {}).get("settings")
        tenant: str | None = (info.context or {}).get("tenant")
        if self.tasks and settings is not None and settings.tasks_dir is None:
            raise ValueError(
                "tasks can't be scored: the operator has not configured task data "
                "(LORP_TASKS_DIR) on this service"
            )
        if settings is not None and tenant is not None:
            cost = self.estimated_tokens()
            limit = settings.job_token_limit(tenant)
            if cost["total"] > limit:
                parts = ", ".join(f"{k} {v:,}" for k, v in cost.items() if k != "total" and v)
                raise ValueError(
                    f"job too costly: about {cost['total']:,} token positions through the model "
                    f"({parts}); the limit for your tenant is {limit:,}. Use fewer or shorter "
                    "windows or benchmark repetitions"
                )
        if self.budget.blocks is not None and settings is not None and self.model.startswith("/"):
            depth = _local_depth(Path(os.path.realpath(self.model)))
            if depth is not None and self.budget.blocks >= depth:
                raise ValueError(
                    f"budget removes {self.budget.blocks} blocks but the model has only {depth}"
                )
        return self

    def _check_heal(self) -> None:
        fold = get_method(self.method.value).fold
        if not (self.compensate or (fold is not None and fold.compensate)):
            raise ValueError(
                f"heal trains the folded maps, and method {self.method.value!r} folds none: "
                "use lorp-fold or compensate: true"
            )
        if self.compensation_tune_windows < 1:
            raise ValueError(
                "heal stops early on the compensation's tune windows: "
                "compensation_tune_windows must be at least 1"
            )
        if self.windows < self.compensation_windows + self.compensation_tune_windows:
            raise ValueError(
                "heal trains on the first compensation_windows and stops early on the next "
                "compensation_tune_windows calibration windows: windows must be at least "
                f"{self.compensation_windows} + {self.compensation_tune_windows}"
            )

    def estimated_tokens(self) -> dict[str, int]:
        """Admission-control estimate of the token positions this job feeds through the model,
        by stage, and their ``total``. Selection passes are counted as :data:`NOMINAL_PASSES`
        passes over the scoring windows (the methods cap their passes near one capture's
        worth; ``sleb`` grows with depth, which is unknown before the model is read). Tasks:
        dense and pruned, ``task_limit`` items of each task at :data:`TASK_ITEM_TOKENS`
        positions an item (an upper bound: a task with fewer items is charged in full)."""
        info = get_method(self.method.value)
        fold = info.fold
        scoring = 0
        if selector(info.name).needs_model:
            windows, seq_len = NOMINAL_SCORING
            scoring = (
                NOMINAL_PASSES * (self.score_windows or windows) * (self.score_seq_len or seq_len)
            )
        fits = 0
        if self.compensate or (fold is not None and fold.compensate):
            fits += (self.compensation_windows + 4 * self.compensation_tune_windows) * self.seq_len
        if self.temperature or (fold is not None and fold.temperature):
            fits += self.temperature_windows * self.seq_len
        heal = 0
        if self.heal is not None:  # the dense logits once, then per step a forward and a
            # backward (charged as 2 more) of a batch, and the held-out windows every
            # HEAL_EVAL_EVERY steps (and before the first)
            held = self.compensation_tune_windows
            evals = 1 + -(-self.heal.steps // HEAL_EVAL_EVERY)
            heal = (
                self.compensation_windows
                + held
                + 3 * self.heal.steps * self.batch_size
                + evals * held
            ) * self.seq_len
        held_out = self.eval_windows if self.evaluation is not None else self.holdout_windows
        search = 0  # a quality target: the dense measurement, then per depth one selection
        if self.budget.max_ppl_ratio is not None:  # and one pruned pass
            search = (1 + NOMINAL_DEPTHS) * self.holdout_windows * self.seq_len
        elif self.budget.min_task_retention is not None:
            search = (1 + NOMINAL_DEPTHS) * len(self.tasks) * self.target_task_items
            search *= TASK_ITEM_TOKENS
        if search:
            search += NOMINAL_DEPTHS * scoring
        bench = 0
        if self.benchmark is not None:
            runs = 2 * (self.benchmark.warmup + self.benchmark.repetitions)  # dense and pruned
            bench = runs * (
                sum(b * p for b, p in self.benchmark.prefill)
                + sum(b * (p + n) for b, p, n in self.benchmark.decode)
            )
        cost = {
            "calibration": self.windows * self.seq_len,
            "selection": scoring,
            "fits": fits,
            "healing": heal,
            "depth_search": search,
            "evaluation": 2 * held_out * self.seq_len,
            "tasks": 2 * len(self.tasks) * self.task_limit * TASK_ITEM_TOKENS,
            "benchmark": bench,
        }
        return {**cost, "total": sum(cost.values())}

    def prune_config(self, config_cls: type[C], settings: Settings | None = None) -> C:
        """The library's ``PruneConfig`` for this job, in one call: the worker passes
        ``lorp.pipeline.PruneConfig`` (this module never imports the library's pipeline, which
        loads torch) and its ``settings``. The keyword arguments are
        :meth:`prune_config_kwargs` of its fields."""
        fields_ = {f.name for f in fields(config_cls)}
        return config_cls(**self.prune_config_kwargs(fields_, settings))

    def prune_config_kwargs(
        self, config_fields: Collection[str], settings: Settings | None = None
    ) -> dict[str, Any]:
        """``PruneConfig``'s keyword arguments for this job, given its field names.

        Declared once: an option named like a field is copied (as JSON: the method's name; the
        ``quality_gate`` and ``benchmark`` objects as dicts, which ``PruneConfig`` turns into
        ``QualityGate`` / ``BenchmarkConfig`` with the same field names); the options in
        :data:`PRUNE_CONFIG_RENAMES` are mapped by it; :data:`RUN_OPTIONS` are
        ``run_pipeline``'s arguments. An option that is none of these is a ``TypeError`` (a new
        option must reach the library; ``tests/unit/test_job_spec.py`` checks all of them).
        The fields in :data:`OPERATOR_FIELDS` come from the operator's ``settings`` (None
        without them)."""
        data = self.model_dump(mode="json")
        out: dict[str, Any] = {
            name: None if settings is None else value(settings)
            for name, value in OPERATOR_FIELDS.items()
            if name in config_fields
        }
        for option in type(self).model_fields:
            if option in RUN_OPTIONS or option in SERVICE_OPTIONS:
                continue
            if option in PRUNE_CONFIG_RENAMES:
                out.update(PRUNE_CONFIG_RENAMES[option](self))
            elif option in config_fields:
                out[option] = data[option]
            else:
                raise TypeError(
                    f"job option {option!r} is not a PruneConfig field: map it in "
                    "jobcore.spec.PRUNE_CONFIG_RENAMES or list it in RUN_OPTIONS"
                )
        return out

    def fingerprint(self) -> str:
        """Canonical JSON of the spec (what 'same body' means for idempotency keys)."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def _local_depth(model_dir: Path) -> int | None:
    """``num_hidden_layers`` from a local model directory's config.json, when readable."""
    cfg = model_dir / "config.json"
    if not model_dir.is_dir() or not cfg.is_file() or cfg.stat().st_size > 1_000_000:
        return None
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    depth = data.get("num_hidden_layers") if isinstance(data, dict) else None
    return depth if isinstance(depth, int) and depth > 0 else None


#: Options that are arguments of ``lorp.pipeline.run_pipeline``, not ``PruneConfig`` fields: the
#: inputs (which the worker fetches first and passes as local paths), the compute dtype, the
#: output formats and the device (which also chose the worker pool, ``jobcore.routing``).
RUN_OPTIONS = (
    "model",
    "gguf_file",
    "calibration",
    "evaluation",
    "dtype",
    "output_formats",
    "device",
)
#: Options the service acts on around the run, which never reach the library.
SERVICE_OPTIONS = ("callback_url",)
#: Options whose ``PruneConfig`` fields are named otherwise: option -> the fields it sets.
PRUNE_CONFIG_RENAMES: dict[str, Callable[[JobCreate], dict[str, Any]]] = {
    # a count or a fraction of the blocks
    "budget": lambda spec: {
        "num_remove": spec.budget.blocks,
        "fraction": spec.budget.fraction,
        "target_ppl_ratio": spec.budget.max_ppl_ratio,
        "target_task_retention": spec.budget.min_task_retention,
    },
    # one window length: the service evaluates with the calibration windows' length
    "seq_len": lambda spec: {"seq_len": spec.seq_len, "eval_seq_len": spec.seq_len},
    # an object, or null: off (0 steps)
    "heal": lambda spec: {
        "heal_steps": 0 if spec.heal is None else spec.heal.steps,
        "heal_lr": HEAL_LR if spec.heal is None else spec.heal.lr,
    },
}


#: ``PruneConfig`` fields no job sets: the operator's settings give them (field -> its value).
OPERATOR_FIELDS: dict[str, Callable[[Settings], Any]] = {
    # LORP_TASKS_DIR: the task data the worker scores a job's tasks on
    "task_data_dir": lambda settings: settings.tasks_dir,
    # LORP_MAX_DEVICE_MEMORY: bytes a job may use on the worker's device (offload "auto")
    "max_device_memory": lambda settings: settings.max_device_memory,
}


def validate_job(data: Any, settings: Settings, tenant: str) -> JobCreate:
    """Full validation of a job spec against the operator's settings and the caller's tenant."""
    return JobCreate.model_validate(data, context={"settings": settings, "tenant": tenant})


# --------------------------------------------------------------------------------------------
# The job record's error and summary (written by the worker, shown by the API)


class JobError(BaseModel):
    """Why a job failed: a stable code and a human message."""

    code: str = Field(examples=["invalid_budget"])
    message: str = Field(examples=["cannot remove 40 of 30 blocks"])


class JobSummary(BaseModel):
    """Headline results of a job (the full story is in the report): of a succeeded job, and of
    one the quality gate refused (``status`` "refused", state ``failed``, no artifacts)."""

    model_config = ConfigDict(extra="allow")

    method: str | None = None
    num_layers: int | None = Field(default=None, description="blocks before pruning")
    kept_layers: int | None = None
    removed_blocks: list[int] = Field(default_factory=list)
    rls: float | None = Field(default=None, description="representation locality score")
    num_clusters: int | None = None
    speedups: dict[str, float | None] = Field(
        default_factory=dict, description="workload -> original time / pruned time"
    )
    prefill_speedup: float | None = Field(default=None, description="median over prefill runs")
    decode_speedup: float | None = Field(default=None, description="median over decode runs")
    memory_reduction: float | None = Field(
        default=None, description="fraction of weight memory saved (0.2 = 20% smaller)"
    )
    weights_saved_bytes: int | None = None
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    perplexity_ratio: float | None = None
    status: Literal["pruned", "refused"] | None = Field(
        default=None, description='"refused": the quality gate stopped the job (no checkpoint)'
    )
    offload: Literal["none", "sequential"] | None = Field(
        default=None,
        description="memory mode that ran: none (whole model on the device) or sequential (one "
        "block at a time; the report's model.offload says why)",
    )
    kl: float | None = Field(
        default=None, description="mean KL(dense || pruned) per token on the held-out tokens"
    )
    top1_agreement: float | None = Field(
        default=None, description="fraction of held-out tokens where both models' top-1 agree"
    )
    flags: list[str] = Field(
        default_factory=list, description="warnings: results far worse than the dense model"
    )
    quality_gate: dict[str, Any] | None = Field(
        default=None, description="the gate's limits, measured values, violations and verdict"
    )
    task_accuracy_before: float | None = Field(
        default=None,
        description="the dense model's accuracy averaged over the job's downstream tasks "
        "(each task's headline metric: acc_norm for HellaSwag, PIQA, ARC; acc for WinoGrande, "
        "BoolQ)",
    )
    task_accuracy_after: float | None = Field(
        default=None, description="the pruned model's, on the same items"
    )
    task_retention: float | None = Field(
        default=None,
        description="pruned / dense accuracy per task, averaged over the tasks (1.0 = nothing "
        "lost; null without tasks, or when a task's dense accuracy is 0)",
    )
    task_retention_by_task: dict[str, float | None] = Field(
        default_factory=dict, description="task -> pruned / dense accuracy"
    )
    quality_target: dict[str, float] | None = Field(
        default=None,
        description="a budget by quality target: {max_ppl_ratio: x} or {min_task_retention: x} "
        "(null with a block budget)",
    )
    target_depth: int | None = Field(
        default=None,
        description="with a quality target: the blocks removed, the deepest prune meeting the "
        "target on held-out calibration data (stepped back if the evaluation missed it)",
    )
    target_confirmed: bool | None = Field(
        default=None,
        description="with a quality target: whether the evaluation data confirmed it",
    )
    healing: dict[str, Any] | None = Field(
        default=None,
        description="with heal: steps_run, early_stop_step (null: not stopped early), "
        "best_step, held_out_kl_before / held_out_kl_after (KL(dense || pruned) on the "
        "held-out calibration windows) and seconds",
    )
