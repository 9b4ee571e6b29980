"""Job store in Redis, shared by the API (create, read, list, cancel) and the worker (start,
progress, finish, run lock).

Key layout (all keys start with ``lorp:``)::

    lorp:job:{id}                      HASH  the job record (tenant, state, spec JSON, progress ...)
    lorp:tenant:{tenant}:seq           STR   per-tenant counter; orders jobs and pages listings
    lorp:tenant:{tenant}:jobs          ZSET  seq -> id, every job of the tenant
    lorp:tenant:{tenant}:state:{state} ZSET  seq -> id, the tenant's jobs in one state
    lorp:idem:{tenant}:{sha256(key)}   STR   {"job_id", "fingerprint"} with a TTL (Idempotency-Key)
    lorp:lock:{id}                     STR   run lock of the worker running the job (TTL, heartbeat)

Creation and every state transition run as Lua scripts, so a record, its indexes and its
idempotency key change together or not at all; when the Celery broker is this Redis, creation
pushes the job's run message (:mod:`jobcore.queue`) onto the broker's list in the same script
(``service.queue``).
Reads through the API always name the tenant; a job of another tenant is reported exactly like a
missing one.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from redis import Redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from jobcore.config import Settings
from jobcore.errors import IdempotencyConflictError, InvalidTransitionError, JobNotFoundError
from jobcore.spec import TERMINAL_STATES, JobCreate, JobError, JobState

STATES: tuple[JobState, ...] = tuple(JobState)
_ID_RE = re.compile(r"^[0-9a-f]{32}$")
MAX_PAGE = 100
#: Redis hashes ``<prefix><device class>``: worker -> the memory it advertised and until when.
POOL_PREFIX = "lorp:pool:"

_CREATE_LUA = """
-- KEYS: job, tenant seq, tenant jobs zset, queued zset, idempotency key (optional), queue list
-- ARGV: job id, use idem (0/1), idem value, idem ttl, message ('' = none), then field/value pairs
-- returns {1, seq} for a new job (its message pushed onto the queue list in the same step),
-- {0, idem value, the job's fields} for an existing key
if ARGV[2] == '1' then
  local existing = redis.call('GET', KEYS[5])
  if existing then
    -- the job key is not in KEYS: it is only known here (a single Redis, not a cluster)
    local job = 'lorp:job:' .. cjson.decode(existing)['job_id']
    return {0, existing, redis.call('HGETALL', job)}
  end
end
local seq = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'seq', seq, unpack(ARGV, 6))
redis.call('ZADD', KEYS[3], seq, ARGV[1])
redis.call('ZADD', KEYS[4], seq, ARGV[1])
if ARGV[2] == '1' then
  redis.call('SET', KEYS[5], ARGV[3], 'EX', tonumber(ARGV[4]))
end
if ARGV[5] ~= '' then redis.call('LPUSH', KEYS[6], ARGV[5]) end
return {1, seq}
"""

_ENQUEUE_LUA = """
-- KEYS: job, queue list; ARGV: message. Pushes it once, while the job is queued.
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return 0 end
if redis.call('HGET', KEYS[1], 'enqueued') == '1' then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], 'enqueued', '1')
return 1
"""

_TRANSITION_LUA = """
-- KEYS: job, then the tenant's state zsets in the order of ARGV[3] (comma list of all states)
-- ARGV: new state ('' = keep), allowed current states (comma list), all states, field/values...
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {-1, ''} end
local ok = false
for s in string.gmatch(ARGV[2], '[^,]+') do if s == cur then ok = true end end
if not ok then return {0, cur} end
if #ARGV > 3 then redis.call('HSET', KEYS[1], unpack(ARGV, 4)) end
local new = ARGV[1]
if new ~= '' and new ~= cur then
  local seq = redis.call('HGET', KEYS[1], 'seq')
  local id = redis.call('HGET', KEYS[1], 'id')
  local i = 1
  for s in string.gmatch(ARGV[3], '[^,]+') do
    i = i + 1
    if s == cur then redis.call('ZREM', KEYS[i], id) end
    if s == new then redis.call('ZADD', KEYS[i], seq, id) end
  end
  redis.call('HSET', KEYS[1], 'state', new)
end
return {1, cur}
"""

_REFRESH_LOCK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE_LOCK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _job_key(job_id: str) -> str:
    return f"lorp:job:{job_id}"


def _tenant_key(tenant: str, suffix: str) -> str:
    return f"lorp:tenant:{tenant}:{suffix}"


def _state_keys(tenant: str) -> list[str]:
    return [_tenant_key(tenant, f"state:{s.value}") for s in STATES]


def _loads(raw: str | None) -> Any:
    return json.loads(raw) if raw else None


@dataclass
class JobRecord:
    """A job as stored in Redis."""

    id: str
    tenant: str
    seq: int
    state: JobState
    created_at: str
    spec: dict[str, Any]
    fingerprint: str
    started_at: str | None = None
    finished_at: str | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    artifacts: list[dict[str, Any]] | None = None
    cancel_requested: bool = False
    attempts: int = 0
    enqueued: bool = False
    queue: str | None = None  # the worker pool's queue it was sent to (jobcore.routing)

    @classmethod
    def from_hash(cls, h: Mapping[str, str]) -> JobRecord:
        """Decode a ``HGETALL`` result."""
        return cls(
            id=h["id"],
            tenant=h["tenant"],
            seq=int(h.get("seq", "0")),
            state=JobState(h["state"]),
            created_at=h["created_at"],
            spec=json.loads(h["spec"]),
            fingerprint=h.get("fingerprint", ""),
            started_at=h.get("started_at") or None,
            finished_at=h.get("finished_at") or None,
            progress=_loads(h.get("progress")) or {},
            error=_loads(h.get("error")),
            summary=_loads(h.get("summary")),
            artifacts=_loads(h.get("artifacts")),
            cancel_requested=h.get("cancel_requested") == "1",
            attempts=int(h.get("attempts", "0")),
            enqueued=h.get("enqueued") == "1",
            queue=h.get("queue") or None,
        )


def make_redis(url: str, *, for_worker: bool = False) -> Redis:
    """A Redis client. The API fails fast (≈1 s timeouts, one retry) so a dead Redis becomes a
    quick 503; the worker retries with backoff for ~15 s to ride out a Redis restart."""
    if for_worker:
        return Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=5.0,
            socket_connect_timeout=3.0,
            retry=Retry(ExponentialBackoff(cap=3.0, base=0.2), 8),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
    return Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=0.8,
        socket_connect_timeout=0.5,
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        max_connections=64,
    )


class JobStore:
    """CRUD and state transitions of jobs; see the module docstring for the key layout."""

    def __init__(self, redis: Redis, *, idempotency_ttl: int = 24 * 3600) -> None:
        self.redis = redis
        self.idempotency_ttl = idempotency_ttl
        self._create = redis.register_script(_CREATE_LUA)
        self._enqueue = redis.register_script(_ENQUEUE_LUA)
        self._transition = redis.register_script(_TRANSITION_LUA)
        self._refresh_lock = redis.register_script(_REFRESH_LOCK_LUA)
        self._release_lock = redis.register_script(_RELEASE_LOCK_LUA)

    @classmethod
    def from_settings(cls, settings: Settings, *, for_worker: bool = False) -> JobStore:
        """A store on ``LORP_REDIS_URL``."""
        return cls(
            make_redis(settings.redis_url, for_worker=for_worker),
            idempotency_ttl=settings.idempotency_ttl_seconds,
        )

    def close(self) -> None:
        """Close the connection pool."""
        self.redis.close()

    def ping(self) -> bool:
        """True when Redis answers."""
        return bool(self.redis.ping())

    # -- API side -------------------------------------------------------------------------

    def create(
        self,
        tenant: str,
        spec: JobCreate,
        idempotency_key: str | None = None,
        *,
        message: Callable[[str], tuple[str, str]] | None = None,
        queue: str | None = None,
    ) -> tuple[JobRecord, bool]:
        """Store a new queued job; returns ``(record, created)``.

        With an idempotency key, a repeat of the same key and the same spec returns the existing
        job (``created=False``); the same key with another spec raises
        :class:`IdempotencyConflictError`. With ``message``, ``message(job_id)`` is a broker
        list in this Redis and the run message of the new job: the same script pushes it there
        and marks the job enqueued, so a job is stored and queued together or not at all.
        ``queue``: the queue the job is (or will be) sent to, recorded for a later send.
        """
        fingerprint = hashlib.sha256(spec.fingerprint().encode()).hexdigest()
        job_id = uuid.uuid4().hex
        now = _now()
        idem_key = ""
        if idempotency_key is not None:
            digest = hashlib.sha256(idempotency_key.encode()).hexdigest()
            idem_key = f"lorp:idem:{tenant}:{digest}"
        target, payload = message(job_id) if message else ("lorp:queue:none", "")
        fields = {
            "id": job_id,
            "tenant": tenant,
            "state": JobState.queued.value,
            "created_at": now,
            "updated_at": now,
            "spec": json.dumps(spec.model_dump(mode="json")),
            "fingerprint": fingerprint,
            "progress": json.dumps({"stage": None, "fraction": 0.0, "message": "queued"}),
            "cancel_requested": "0",
            "attempts": "0",
            "enqueued": "1" if payload else "0",
        }
        if queue is not None:
            fields["queue"] = queue
        args: list[Any] = [
            job_id,
            "1" if idem_key else "0",
            json.dumps({"job_id": job_id, "fingerprint": fingerprint}),
            self.idempotency_ttl,
            payload,
        ]
        for k, v in fields.items():
            args += [k, v]
        created, value, *existing_job = self._create(
            keys=[
                _job_key(job_id),
                _tenant_key(tenant, "seq"),
                _tenant_key(tenant, "jobs"),
                _tenant_key(tenant, f"state:{JobState.queued.value}"),
                idem_key or "lorp:idem:none",
                target,
            ],
            args=args,
        )
        if int(created) == 1:  # the hash holds exactly these fields plus seq: no read back
            return JobRecord.from_hash({**fields, "seq": str(value)}), True
        if json.loads(value)["fingerprint"] != fingerprint:
            raise IdempotencyConflictError(
                "Idempotency-Key was already used with a different request body"
            )
        flat = existing_job[0]
        rec = JobRecord.from_hash(dict(zip(flat[::2], flat[1::2], strict=True))) if flat else None
        if rec is None or rec.tenant != tenant:
            raise JobNotFoundError("job not found")
        return rec, False

    def get(self, tenant: str, job_id: str) -> JobRecord:
        """The tenant's job; :class:`JobNotFoundError` when missing or another tenant's."""
        rec = self.get_any(job_id)
        if rec is None or rec.tenant != tenant:
            raise JobNotFoundError("job not found")
        return rec

    def list_jobs(
        self,
        tenant: str,
        *,
        state: JobState | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> tuple[list[JobRecord], str | None]:
        """One page of the tenant's jobs, newest first, optionally in one state.

        ``cursor`` is the ``next_cursor`` of the previous page (``ValueError`` if malformed).
        """
        limit = max(1, min(limit, MAX_PAGE))
        index = _tenant_key(tenant, f"state:{state.value}" if state else "jobs")
        top: str = "+inf"
        if cursor is not None:
            if not cursor.isdigit() or len(cursor) > 18:
                raise ValueError("malformed cursor")
            top = f"({cursor}"
        rows = cast(
            "list[tuple[str, float]]",
            self.redis.zrevrangebyscore(
                index, top, "-inf", start=0, num=limit + 1, withscores=True
            ),
        )
        page = rows[:limit]
        pipe = self.redis.pipeline(transaction=False)
        for job_id, _ in page:
            pipe.hgetall(_job_key(job_id))
        records = [JobRecord.from_hash(h) for h in pipe.execute() if h]
        next_cursor = str(int(page[-1][1])) if len(rows) > limit else None
        return records, next_cursor

    def mark_enqueued(self, job_id: str) -> None:
        """Note that the run task was sent to the broker."""
        self.redis.hset(_job_key(job_id), "enqueued", "1")

    def enqueue(self, job_id: str, queue: str, message: str) -> bool:
        """Push a queued job's run message onto ``queue`` (a list in this Redis) and mark it
        enqueued, unless it already is or left the queued state; True when pushed."""
        return bool(self._enqueue(keys=[_job_key(job_id), queue], args=[message]))

    def request_cancel(self, tenant: str, job_id: str) -> JobRecord:
        """Cancel a queued job at once; flag a running one (the worker stops at its next progress
        report). Cancelling a cancelled job is a no-op; a finished one raises
        :class:`InvalidTransitionError`."""
        rec = self.get(tenant, job_id)
        now = _now()
        ok, cur = self._run_transition(
            rec.tenant,
            job_id,
            JobState.cancelled,
            {JobState.queued},
            {
                "cancel_requested": "1",
                "finished_at": now,
                "updated_at": now,
                "progress": json.dumps({"stage": None, "fraction": 0.0, "message": "cancelled"}),
            },
        )
        if not ok and cur == JobState.running.value:
            ok, cur = self._run_transition(
                rec.tenant,
                job_id,
                None,
                {JobState.running},
                {"cancel_requested": "1", "updated_at": now},
            )
        if not ok and cur not in (JobState.cancelled.value, JobState.running.value):
            raise InvalidTransitionError(f"job already {cur}; nothing to cancel")
        return self.get(tenant, job_id)

    # -- worker side ----------------------------------------------------------------------

    def get_any(self, job_id: str) -> JobRecord | None:
        """A job by id regardless of tenant (worker side), or None."""
        if not _ID_RE.match(job_id):
            return None
        h = cast("dict[str, str]", self.redis.hgetall(_job_key(job_id)))
        return JobRecord.from_hash(h) if h else None

    def start(self, rec: JobRecord) -> bool:
        """queued|running -> running (a redelivered job is running already); counts attempts."""
        now = _now()
        fields = {
            "attempts": str(rec.attempts + 1),
            "started_at": rec.started_at or now,
            "updated_at": now,
            "error": "",
            "progress": json.dumps({"stage": "starting", "fraction": 0.0, "message": ""}),
        }
        ok, _ = self._run_transition(
            rec.tenant, rec.id, JobState.running, {JobState.queued, JobState.running}, fields
        )
        return ok

    def set_progress(self, rec: JobRecord, stage: str, fraction: float, message: str) -> None:
        """Record progress of a running job."""
        progress = {"stage": stage, "fraction": min(1.0, max(0.0, fraction)), "message": message}
        self._run_transition(
            rec.tenant,
            rec.id,
            None,
            {JobState.running},
            {"progress": json.dumps(progress), "updated_at": _now()},
        )

    def cancel_requested(self, job_id: str) -> bool:
        """True when a client asked to cancel the job (or it is already cancelled)."""
        flag, state = self.redis.hmget(_job_key(job_id), ["cancel_requested", "state"])
        return flag == "1" or state == JobState.cancelled.value

    def finish(
        self,
        rec: JobRecord,
        state: JobState,
        *,
        error: JobError | None = None,
        summary: dict[str, Any] | None = None,
        artifacts: list[dict[str, Any]] | None = None,
        message: str = "",
    ) -> bool:
        """running|queued -> a terminal state; False when the job already left those states."""
        assert state in TERMINAL_STATES
        now = _now()
        fields = {
            "finished_at": now,
            "updated_at": now,
            "error": error.model_dump_json() if error else "",
            "summary": json.dumps(summary) if summary is not None else "",
            "artifacts": json.dumps(artifacts) if artifacts is not None else "",
            "progress": json.dumps(
                {"stage": "done", "fraction": 1.0, "message": message or state.value}
            ),
        }
        ok, _ = self._run_transition(
            rec.tenant, rec.id, state, {JobState.running, JobState.queued}, fields
        )
        return ok

    def acquire_lock(self, job_id: str, token: str, ttl_ms: int) -> bool:
        """Take the run lock of a job (only one worker runs a job at a time)."""
        return bool(self.redis.set(f"lorp:lock:{job_id}", token, nx=True, px=ttl_ms))

    def refresh_lock(self, job_id: str, token: str, ttl_ms: int) -> bool:
        """Extend our run lock; False when we no longer hold it."""
        return bool(self._refresh_lock(keys=[f"lorp:lock:{job_id}"], args=[token, ttl_ms]))

    # -- worker pools (jobcore.routing) -----------------------------------------------------

    def advertise(self, device_class: str, worker: str, memory_bytes: int, ttl_s: int) -> None:
        """A worker of ``device_class`` (``cpu``/``gpu``) can hold ``memory_bytes``, until
        ``ttl_s`` seconds from now by Redis's clock (a worker that died stops counting). One
        hash per class, so reading the pools costs one round trip whatever the job count."""
        seconds, micros = self.redis.time()
        until = seconds + micros / 1e6 + ttl_s
        value = json.dumps({"memory": int(memory_bytes), "until": until})
        self.redis.hset(f"{POOL_PREFIX}{device_class}", worker, value)

    def withdraw(self, device_class: str, worker: str) -> None:
        """A worker stopping: its advertisement goes at once."""
        self.redis.hdel(f"{POOL_PREFIX}{device_class}", worker)

    def pool_memory(self, device_classes: Sequence[str]) -> dict[str, int]:
        """Device class -> the largest memory a live worker of it advertised (classes nobody
        advertised are left out)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.time()
        for device_class in device_classes:
            pipe.hgetall(f"{POOL_PREFIX}{device_class}")
        (seconds, micros), *hashes = pipe.execute()
        now = seconds + micros / 1e6
        pools: dict[str, int] = {}
        for device_class, offers in zip(device_classes, hashes, strict=True):
            live = [o["memory"] for o in map(json.loads, offers.values()) if o["until"] > now]
            if live:
                pools[device_class] = max(live)
        return pools

    def orphaned_running(self) -> list[str]:
        """Ids of jobs in state running that no worker holds the run lock of (their worker
        died as a whole; the broker would redeliver only after the visibility timeout)."""
        orphans = []
        for key in self.redis.scan_iter(match="lorp:tenant:*:state:running", count=500):
            for job_id in cast("list[str]", self.redis.zrange(key, 0, -1)):
                if not self.redis.exists(f"lorp:lock:{job_id}"):
                    orphans.append(job_id)
        return orphans

    def lock_holder(self, job_id: str) -> str | None:
        """The token of whoever holds the run lock, if anyone."""
        return cast("str | None", self.redis.get(f"lorp:lock:{job_id}"))

    def release_lock(self, job_id: str, token: str) -> None:
        """Drop our run lock."""
        self._release_lock(keys=[f"lorp:lock:{job_id}"], args=[token])

    def _run_transition(
        self,
        tenant: str,
        job_id: str,
        new: JobState | None,
        allowed: set[JobState],
        fields: Mapping[str, str],
    ) -> tuple[bool, str]:
        args: list[str] = [
            new.value if new else "",
            ",".join(s.value for s in allowed),
            ",".join(s.value for s in STATES),
        ]
        for k, v in fields.items():
            args += [k, v]
        code, cur = self._transition(keys=[_job_key(job_id), *_state_keys(tenant)], args=args)
        if int(code) == -1:
            raise JobNotFoundError("job not found")
        return int(code) == 1, str(cur)
