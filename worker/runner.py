"""What ``run_job`` does, as a plain class (the Celery task only wires it up).

One run of a job::

    record terminal?            -> nothing to do (redelivered or duplicate message)
    run lock held elsewhere?    -> "busy": the task retries later
    tenant at its running limit -> "deferred": stays queued, the task retries later
    cancel requested?           -> cancelled, no artifacts
    running (attempts += 1); delete any artifacts of an earlier, interrupted attempt
    fetch inputs -> lorp.pipeline.run_pipeline(progress=...) -> upload every file
    -> manifest.json LAST (the commit point) -> succeeded with a summary

Errors end the job ``failed`` with a stable code: a ``lorp.errors.LorpError``'s ``.code``,
``storage_unavailable`` when the object store stays unreachable after retries, ``input_not_found``,
or ``internal`` (message only, no traceback). Cancelled and failed jobs leave no artifacts behind
(best effort when the object store itself is down; without a manifest nothing is presented).

Quality gate: when the job's limits are broken, ``run_pipeline`` raises ``QualityGateError``
after the measurement and writes no checkpoint. The job ends ``failed`` with code
``quality_gate`` and the measured numbers in the message; its *summary* is the one the error
carries (``lorp.report.job_summary`` of the refusal report: ``status`` "refused", perplexities,
KL, top-1 agreement, flags, the gate's limits and violations) so ``GET /jobs/{id}`` explains it.
Nothing is uploaded for it — neither the (unwritten) checkpoint nor the refusal report: a failed
job keeps the "no objects, no manifest" rule of every failed job, the summary carries what the
user needs, and a rerun without the gate (or with looser limits) produces the full report.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from redis.exceptions import RedisError

from jobcore.config import Settings
from jobcore.errors import (
    INTERNAL,
    STORAGE_UNAVAILABLE,
    WORK_DISK_FULL,
    WORKER_LOST,
    InputNotAllowedError,
    QuotaExceededError,
    StorageError,
    StorageNotFoundError,
    StorageUnavailableError,
)
from jobcore.spec import (
    WEIGHT_SUFFIXES,
    JobCreate,
    JobError,
    JobState,
    s3_not_granted_message,
)
from jobcore.storage import MANIFEST, Storage, job_prefix, retry_storage, split_s3_uri
from jobcore.store import JobRecord, JobStore
from lorp.errors import (
    CancelledError,
    InvalidInputError,
    LorpError,
    ModelTooLargeError,
    QualityGateError,
    UnsafeWeightsError,
)
from lorp.paths import check_confined

log = logging.getLogger(__name__)
T = TypeVar("T")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_TEXT_BYTES = 2 * 1024**3
MAX_ATTEMPTS = 3  # runs of one job before a redelivered job is failed with WORKER_LOST
#: How a job's report names the task data (LORP_TASKS_DIR; its local path is the operator's).
TASK_DATA_NAME = "the service's task data (lm-eval 0-shot subsets)"

Pipeline = Callable[..., Any]


@dataclass
class Inputs:
    """Local paths (or a hub id) ready for ``run_pipeline``."""

    model: str
    gguf_file: str | None
    calibration: Path
    evaluation: Path | None
    local: bool = True  # False for a hub id (nothing on disk to measure)


class _Progress:
    """The pipeline's progress callback: records progress (throttled) and raises
    ``CancelledError`` once a client asked to cancel. Redis hiccups never stop the job."""

    def __init__(self, store: JobStore, rec: JobRecord, interval: float = 0.5) -> None:
        self.store = store
        self.rec = rec
        self.interval = interval
        self._last_write = 0.0
        self._last_check = 0.0
        self._stage: str | None = None

    def __call__(self, stage: str, fraction: float, message: str) -> None:
        now = time.monotonic()
        boundary = stage != self._stage or fraction >= 1.0 or fraction <= 0.0
        self._stage = stage
        if boundary or now - self._last_check >= self.interval:
            self._last_check = now
            try:
                cancel = self.store.cancel_requested(self.rec.id)
            except RedisError as e:
                log.warning("job %s: cancel check failed: %s", self.rec.id, e)
                cancel = False
            if cancel:
                raise CancelledError(f"cancelled by the client during {stage}")
        if boundary or now - self._last_write >= self.interval:
            self._last_write = now
            try:
                self.store.set_progress(self.rec, stage, fraction, message)
            except RedisError as e:
                log.warning("job %s: progress update failed: %s", self.rec.id, e)


class _Heartbeat(threading.Thread):
    """Keeps the run lock alive while the job runs."""

    def __init__(self, store: JobStore, job_id: str, token: str, ttl_ms: int) -> None:
        super().__init__(daemon=True, name=f"lorp-heartbeat-{job_id[:8]}")
        self.store, self.job_id, self.token, self.ttl_ms = store, job_id, token, ttl_ms
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.ttl_ms / 3000):
            try:
                if not self.store.refresh_lock(self.job_id, self.token, self.ttl_ms):
                    log.warning("job %s: lost the run lock", self.job_id)
            except RedisError as e:
                log.warning("job %s: lock heartbeat failed: %s", self.job_id, e)


def _disk_full(exc: BaseException) -> bool:
    """True when ``exc`` or what caused it is "no space left on device" (ENOSPC/EDQUOT; the
    safetensors writer reports it as text)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(current)
        if "No space left on device" in text or "os error 28" in text:
            return True
        current = current.__cause__ or current.__context__
    return False


def _holder_is_dead(token: str) -> bool:
    """True when a lock token names a process on this host that no longer exists."""
    host, _, rest = token.partition(":")
    pid_text, _, _ = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a zombie is dead too
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("Z", "X")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def public_message(message: str, names: dict[str, str]) -> str:
    """``message`` with every worker path in ``names`` replaced by the user's name for it
    (longest paths first, so a file inside a replaced directory keeps its own name)."""
    for path in sorted(names, key=len, reverse=True):
        if path != names[path]:
            message = message.replace(path, names[path])
    return message


def _retry_redis(fn: Callable[[], T], *, deadline_s: float = 90.0) -> T:
    """Keep trying a store write across a Redis restart (the client retries ~15 s itself)."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            return fn()
        except RedisError:
            if time.monotonic() > end:
                raise
            time.sleep(1.0)


class JobRunner:
    """Runs jobs by id. One instance per worker process."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        storage: Storage,
        *,
        pipeline: Pipeline | None = None,
        lock_ttl_ms: int = 10_000,
        storage_attempts: int = 3,
        storage_backoff_s: float = 1.0,
    ) -> None:
        self.settings = settings
        self.store = store
        self.storage = storage
        self._pipeline = pipeline
        self.lock_ttl_ms = lock_ttl_ms
        self.storage_attempts = storage_attempts
        self.storage_backoff_s = storage_backoff_s
        self._timings: dict[str, float] = {}  # seconds per stage of the job being run

    # -- entry point --------------------------------------------------------------------

    def run(self, job_id: str) -> str:
        """Run (or skip) one job; returns what happened: missing, skipped, busy, deferred,
        succeeded, failed or cancelled."""
        rec = self.store.get_any(job_id)
        if rec is None:
            log.warning("job %s: no record; dropping the message", job_id)
            return "missing"
        if rec.state in (JobState.succeeded, JobState.failed, JobState.cancelled):
            log.info("job %s: already %s; nothing to do", job_id, rec.state.value)
            return "skipped"
        token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
        if not self.store.acquire_lock(job_id, token, self.lock_ttl_ms):
            holder = self.store.lock_holder(job_id)
            if holder is not None and _holder_is_dead(holder):
                # The process that held it died on this host (e.g. a SIGKILLed pool process
                # whose message was just redelivered): don't wait for the TTL.
                log.info("job %s: taking over the lock of dead process %s", job_id, holder)
                self.store.release_lock(job_id, holder)
            if not self.store.acquire_lock(job_id, token, self.lock_ttl_ms):
                log.info("job %s: another worker holds the run lock", job_id)
                return "busy"
        heartbeat = _Heartbeat(self.store, job_id, token, self.lock_ttl_ms)
        heartbeat.start()
        work = self.settings.work_dir / job_id
        self._timings = {}
        try:
            outcome = self._run_locked(job_id, work)
            if outcome in ("succeeded", "failed", "cancelled"):
                try:
                    self.store.record_job(outcome, self._timings)
                except RedisError as e:  # metrics never fail a job
                    log.warning("job %s: metrics not recorded: %s", job_id, e)
            return outcome
        finally:
            heartbeat.stopped.set()
            heartbeat.join(timeout=5)
            shutil.rmtree(work, ignore_errors=True)
            try:
                self.store.release_lock(job_id, token)
            except RedisError as e:  # the lock expires on its own
                log.warning("job %s: could not release the run lock: %s", job_id, e)

    # -- the run ------------------------------------------------------------------------

    def _run_locked(self, job_id: str, work: Path) -> str:
        rec = self.store.get_any(job_id)
        if rec is None or rec.state not in (JobState.queued, JobState.running):
            return "skipped"
        if rec.cancel_requested:
            self._cleanup_artifacts(rec)
            self._finish(rec, JobState.cancelled, message="cancelled before it started")
            return "cancelled"
        if rec.attempts >= MAX_ATTEMPTS:
            # Every earlier attempt died with its worker (killed, out of memory...): stop the
            # redelivery loop instead of taking down worker after worker.
            return self._fail(
                rec,
                WORKER_LOST,
                f"the worker died {rec.attempts} times while running this job (killed for "
                'memory? try offload: "sequential", a smaller dtype or batch_size)',
            )
        try:
            started = self.store.start(rec, max_running=self.settings.tenant_max_running)
        except QuotaExceededError as e:
            log.info("job %s: deferred: %s", job_id, e)
            return "deferred"
        if not started:
            return "skipped"
        rec = self.store.get_any(job_id) or rec
        progress = _Progress(self.store, rec)
        names: dict[str, str] = {}  # worker paths -> what the user submitted (for messages)

        def fail(code: str, message: str, summary: dict[str, Any] | None = None) -> str:
            return self._fail(rec, code, public_message(message, names), summary=summary)

        def disk_full() -> str:
            stage = (self.store.get_any(job_id) or rec).progress.get("stage") or "starting"
            return fail(
                WORK_DISK_FULL,
                f"the worker's work disk is full (during {stage}): nothing was published; "
                "retry later or ask the operator for a larger LORP_WORK_DIR",
            )

        try:
            # A redelivered job starts clean: drop whatever an interrupted attempt uploaded.
            self._storage_call(lambda: self.storage.delete_prefix(job_prefix(rec.tenant, rec.id)))
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            spec = JobCreate.model_validate(rec.spec)
            names.update(self._input_names(spec, work))
            progress("downloading", 0.0, "fetching inputs")
            begun = time.perf_counter()
            inputs = self._fetch_inputs(spec, work / "inputs", rec.tenant)
            self._check_memory(inputs, spec.dtype.value, spec.device.value)
            self._timings["downloading"] = time.perf_counter() - begun
            progress("downloading", 1.0, "inputs ready")
            out = work / "out"
            result = self._run_pipeline(spec, inputs, out, progress, job_id=rec.id)
            self._timings.update(result.report.get("timings_s") or {})
            begun = time.perf_counter()
            artifacts = self._upload(rec, out, progress)
            self._timings["uploading"] = time.perf_counter() - begun
            summary = self._summary(result.report)
        except CancelledError:
            self._cleanup_artifacts(rec)
            self._finish(rec, JobState.cancelled, message="cancelled")
            return "cancelled"
        except QualityGateError as e:
            return fail(e.code, str(e), summary=e.summary)
        except LorpError as e:
            return disk_full() if _disk_full(e) else fail(e.code, str(e))
        except (StorageNotFoundError, InputNotAllowedError) as e:
            return fail(e.code, str(e))
        except StorageUnavailableError as e:
            return fail(STORAGE_UNAVAILABLE, f"object store unavailable: {e}")
        except StorageError as e:
            return fail(e.code, str(e))
        except Exception as e:
            if _disk_full(e):
                return disk_full()
            log.exception("job %s: unexpected error", job_id)
            return fail(INTERNAL, f"internal error ({type(e).__name__}): {e}"[:500])
        self._finish(rec, JobState.succeeded, summary=summary, artifacts=artifacts)
        return "succeeded"

    @staticmethod
    def _summary(report: dict[str, Any]) -> dict[str, Any]:
        from lorp.report import job_summary  # the library's own reading of its report

        return job_summary(report)

    def _fail(
        self, rec: JobRecord, code: str, message: str, summary: dict[str, Any] | None = None
    ) -> str:
        log.info("job %s failed: %s: %s", rec.id, code, message)
        self._cleanup_artifacts(rec)
        self._finish(
            rec,
            JobState.failed,
            error=JobError(code=code, message=message[:1000]),
            summary=summary,
        )
        return "failed"

    def _finish(self, rec: JobRecord, state: JobState, **kw: Any) -> None:
        _retry_redis(lambda: self.store.finish(rec, state, **kw))

    def _cleanup_artifacts(self, rec: JobRecord) -> None:
        try:
            self.storage.delete_prefix(job_prefix(rec.tenant, rec.id))
        except StorageError as e:  # no manifest -> nothing is presented as a result anyway
            log.warning("job %s: could not delete partial artifacts: %s", rec.id, e)

    def _storage_call(self, fn: Callable[[], T]) -> T:
        return retry_storage(fn, attempts=self.storage_attempts, base_delay=self.storage_backoff_s)

    # -- inputs -------------------------------------------------------------------------

    def _check_size(self, total: int, what: str) -> None:
        limit = self.settings.max_model_bytes
        if limit is not None and total > limit:
            raise ModelTooLargeError(
                f"{what} is {total} bytes; this worker accepts at most {limit} bytes"
            )

    def _check_memory(self, inputs: Inputs, dtype: str, device: str = "auto") -> None:
        """Refuse, before loading, a model whose weights would exceed ``max_model_bytes`` in
        memory as ``dtype`` (``auto`` resolved as the loader resolves it on this worker's
        ``device``, :func:`lorp.loading.choose_dtype`; the larger of the file headers' and the
        config's size: a quantised
        GGUF or a float16 checkpoint is bigger once loaded in float32 than its files, and a
        config claiming huge dimensions beside tiny weights would be allocated as claimed).
        Runs for every local model, limit or not: malformed headers and configs that are not
        positive integers / absurd fail here as ``model_load_failed``, before any allocation."""
        if not inputs.local:
            return
        from lorp.loading import choose_dtype, estimate_weight_bytes

        if dtype == "auto":
            try:
                dtype = choose_dtype(inputs.model, gguf_file=inputs.gguf_file, device=device)[0]
            except LorpError:
                dtype = "float32"  # the estimate below names what is wrong with the files
        need = estimate_weight_bytes(inputs.model, gguf_file=inputs.gguf_file, dtype=dtype)
        self._check_size(need, f"the model's weights in {dtype}")

    def _input_names(self, spec: JobCreate, work: Path) -> dict[str, str]:
        """Where this worker keeps each input -> how the user named it (messages and reports
        never show the worker's file system)."""
        inputs = work / "inputs"
        names = {str(path): f"corpus:{n}" for n, path in self.settings.corpora.items()}
        if spec.model.startswith("s3://") and spec.model.endswith(".gguf"):
            names[str(inputs / "model" / spec.model.rsplit("/", 1)[-1])] = spec.model
        names[str(inputs / "model")] = spec.model
        names[str(inputs / "calibration.txt")] = spec.calibration
        if spec.evaluation is not None:
            names[str(inputs / "evaluation.txt")] = spec.evaluation
        for uri in (spec.model, spec.calibration, spec.evaluation):
            if uri is not None and uri.startswith("/"):
                names[os.path.realpath(uri)] = uri
        names[str(work)] = "<job work dir>"
        return names

    def _check_granted(self, spec: JobCreate, tenant: str) -> None:
        """Defence in depth: every ``s3://`` input must lie in a location granted to the job's
        tenant (the API checked it at submission; the settings may have changed since)."""
        for uri in (spec.model, spec.calibration, spec.evaluation or ""):
            if uri.startswith("s3://") and not self.settings.s3_input_granted(uri, tenant):
                raise InputNotAllowedError(s3_not_granted_message(self.settings, tenant))

    def _fetch_inputs(self, spec: JobCreate, dest: Path, tenant: str) -> Inputs:
        self._check_granted(spec, tenant)
        model, gguf_file = self._fetch_model(spec.model, spec.gguf_file, dest / "model")
        calibration = self._fetch_text(spec.calibration, dest / "calibration.txt")
        evaluation = (
            self._fetch_text(spec.evaluation, dest / "evaluation.txt") if spec.evaluation else None
        )
        return Inputs(
            model, gguf_file, calibration, evaluation, local=not spec.model.startswith("hf:")
        )

    def _local(self, uri: str) -> Path:
        """The real path of a local input; ``invalid_input`` when it, or any file under it
        (a model folder is walked recursively, symlinks resolved), lies outside the local roots
        or is not a regular file or folder (``lorp.paths.check_confined``; the API checked it at
        submission, and the files may have changed since)."""
        return check_confined(uri, self.settings.local_roots)

    def _fetch_model(self, uri: str, gguf_file: str | None, dest: Path) -> tuple[str, str | None]:
        if uri.startswith("hf:"):
            if not self.settings.allow_hub:
                raise InvalidInputError("hub models are disabled by the operator")
            return uri[3:], gguf_file
        if uri.startswith("/"):
            path = self._local(uri)
            if path.is_file():
                # transformers treats a GGUF file's folder as the repo and reads files beside it
                # (tokenizer_config.json, generation_config.json...): confine those too.
                check_confined(path.parent, self.settings.local_roots)
            if path.is_dir():
                total = sum(
                    p.stat().st_size
                    for p in path.iterdir()
                    if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
                )
            else:
                total = path.stat().st_size if path.exists() else 0
            self._check_size(total, "the model")
            return str(path), gguf_file
        bucket, key = split_s3_uri(uri)
        if key.endswith(".gguf"):
            info = self._storage_call(lambda: self.storage.head(key, bucket))
            self._check_size(info.size, "the model")
            target = dest / Path(key).name
            self._storage_call(lambda: self.storage.download_file(key, target, bucket))
            return str(target), None
        prefix = key.rstrip("/") + "/"
        objects = self._storage_call(lambda: self.storage.list_prefix(prefix, bucket))
        names = [o.key[len(prefix) :] for o in objects]
        if not objects:
            raise StorageNotFoundError(f"no objects under {uri}/")
        if not any(n.endswith(WEIGHT_SUFFIXES) for n in names):
            if any(n.endswith(PICKLE_SUFFIXES) for n in names):
                raise UnsafeWeightsError(
                    "only pickle weights (.bin/.pt) found; the service loads safetensors or GGUF"
                )
            raise InvalidInputError(f"no .safetensors or .gguf weights under {uri}/")
        if gguf_file is not None and gguf_file not in names:
            raise InvalidInputError(f"{gguf_file!r} not found under {uri}/")

        def wanted(rel: str) -> bool:
            if rel.endswith(PICKLE_SUFFIXES):
                return False
            return not (rel.endswith(".gguf") and gguf_file is not None and rel != gguf_file)

        self._check_size(
            sum(o.size for o, n in zip(objects, names, strict=True) if wanted(n)), "the model"
        )
        self._storage_call(
            lambda: self.storage.download_prefix(prefix, dest, bucket, include=wanted)
        )
        return str(dest), gguf_file

    def _fetch_text(self, uri: str, dest: Path) -> Path:
        if uri.startswith("corpus:"):
            name = uri[7:]
            if name not in self.settings.corpora:
                raise InvalidInputError(f"unknown corpus {name!r}")
            return self.settings.corpora[name]
        if uri.startswith("/"):
            return self._local(uri)
        bucket, key = split_s3_uri(uri)
        info = self._storage_call(lambda: self.storage.head(key, bucket))
        if info.size > MAX_TEXT_BYTES:
            raise InvalidInputError(f"{uri} is larger than {MAX_TEXT_BYTES} bytes")
        return self._storage_call(lambda: self.storage.download_file(key, dest, bucket))

    # -- pipeline and upload ------------------------------------------------------------

    def _run_pipeline(
        self,
        spec: JobCreate,
        inputs: Inputs,
        out: Path,
        progress: _Progress,
        *,
        job_id: str | None = None,
    ) -> Any:
        from lorp.pipeline import PruneConfig, run_pipeline

        pipeline = self._pipeline or run_pipeline
        # the spec's RUN_OPTIONS are the arguments below; the task data is the operator's
        config = spec.prune_config(PruneConfig, self.settings)
        return pipeline(
            inputs.model,
            inputs.calibration,
            out,
            config,
            evaluation=inputs.evaluation,
            gguf_file=inputs.gguf_file,
            dtype=spec.dtype.value,
            output_formats=(
                None if spec.output_formats is None else [f.value for f in spec.output_formats]
            ),
            made_by=f"LoRP service job {job_id or ''}".rstrip(),
            device=spec.device.value,
            allow_pickle=False,
            trust_remote_code=self.settings.trust_remote_code,
            allow_hub=self.settings.allow_hub,
            progress=progress,
            source_names={
                k: v
                for k, v in (
                    ("model", spec.model),
                    ("calibration", spec.calibration),
                    ("evaluation", spec.evaluation),
                    ("tasks", TASK_DATA_NAME if spec.tasks else None),
                )
                if v is not None
            },
        )

    def _upload(self, rec: JobRecord, out: Path, progress: _Progress) -> list[dict[str, Any]]:
        prefix = job_prefix(rec.tenant, rec.id)
        files = sorted(p for p in out.rglob("*") if p.is_file())
        entries: list[dict[str, Any]] = []
        total = sum(p.stat().st_size for p in files) or 1
        done = 0
        self._storage_call(self.storage.ensure_bucket)
        for path in files:
            name = path.relative_to(out).as_posix()
            if name == MANIFEST:
                continue
            progress("uploading", done / total, f"uploading {name}")
            entries.append({"name": name, "size": path.stat().st_size, "sha256": sha256_file(path)})
            self._storage_call(functools.partial(self.storage.upload_file, path, prefix + name))
            done += path.stat().st_size
        progress("uploading", 1.0, f"{len(entries)} files uploaded")
        manifest = json.dumps(
            {"job_id": rec.id, "files": entries}, indent=2, sort_keys=True
        ).encode()
        # The manifest is the commit point: written last, after every artifact is in place.
        self._storage_call(
            lambda: self.storage.put_bytes(prefix + MANIFEST, manifest, "application/json")
        )
        return [
            *entries,
            {
                "name": MANIFEST,
                "size": len(manifest),
                "sha256": hashlib.sha256(manifest).hexdigest(),
            },
        ]
