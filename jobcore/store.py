"""Job store in Redis, shared by the API (create, read, list, cancel) and the worker (start,
progress, finish, run lock).

Key layout (all keys start with ``lorp:``)::

    lorp:job:{id}                      HASH  the job record (tenant, state, spec JSON, progress ...)
    lorp:tenant:{tenant}:seq           STR   per-tenant counter; orders jobs and pages listings
    lorp:tenant:{tenant}:jobs          ZSET  seq -> id, every job of the tenant
    lorp:tenant:{tenant}:state:{state} ZSET  seq -> id, the tenant's jobs in one state
    lorp:idem:{tenant}:{sha256(key)}   STR   {"job_id", "fingerprint"} with a TTL (Idempotency-Key)
    lorp:lock:{id}                     STR   run lock of the worker running the job (TTL, heartbeat)
    lorp:job:{id}:deliveries           LIST  webhook delivery attempts (JSON), oldest first
    lorp:hooks:pending                 ZSET  jobs with a callback whose final event is not sent
    lorp:finished                      ZSET  finished time (epoch s) -> id, every finished job
    lorp:deleting                      ZSET  time the deletion began -> id (artifacts still going)
    lorp:rate:{sha256(api key)}        HASH  token bucket of an API key (tokens, ts; TTL)

Creation and every state transition run as Lua scripts, so a record, its indexes and its
idempotency key change together or not at all; when the Celery broker is this Redis, creation
pushes the job's run message (:mod:`jobcore.queue`) onto the broker's list in the same script
(``service.queue``).
Reads through the API always name the tenant; a job of another tenant is reported exactly like a
missing one.

Quotas: creation refuses a tenant's job while it has ``tenant_max_queued`` jobs queued (nothing is
stored), and :meth:`JobStore.start` refuses to start one while it has ``tenant_max_running``
running (the job stays queued; the worker defers it), each in the script that would change the
state, so concurrent API processes and workers cannot overshoot.

Deletion (``DELETE /jobs/{id}`` and expiry, :mod:`jobcore.retention`) is two steps:
:meth:`JobStore.begin_delete` hides a finished job at once (out of every index, reads 404, its
idempotency key gone, the id in ``lorp:deleting``), then the artifacts are deleted and
:meth:`JobStore.purge` drops the record. A deletion interrupted between the two is finished by
the next expiry sweep or DELETE.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
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
from jobcore.errors import (
    IdempotencyConflictError,
    InvalidTransitionError,
    JobNotFoundError,
    QuotaExceededError,
)
from jobcore.metrics import record_job
from jobcore.spec import TERMINAL_STATES, JobCreate, JobError, JobState
from jobcore.webhooks import MAX_RECORDED_ATTEMPTS

_PENDING_HOOKS = "lorp:hooks:pending"

STATES: tuple[JobState, ...] = tuple(JobState)
FINISHED_KEY = "lorp:finished"
DELETING_KEY = "lorp:deleting"
QUOTA_RETRY_AFTER_SECONDS = 30  # Retry-After of a submission over the queued-jobs quota
_ID_RE = re.compile(r"^[0-9a-f]{32}$")
MAX_PAGE = 100
#: Redis hashes ``<prefix><device class>``: worker -> the memory it advertised and until when.
POOL_PREFIX = "lorp:pool:"

_CREATE_LUA = """
-- KEYS: job, tenant seq, tenant jobs zset, queued zset, idempotency key (optional), queue list
-- ARGV: job id, use idem (0/1), idem value, idem ttl, message ('' = none), max queued ('' = no
-- limit), then field/value pairs
-- returns {1, seq} for a new job (its message pushed onto the queue list in the same step),
-- {0, idem value, the job's fields} for an existing key, {-2, queued count} over the quota
if ARGV[2] == '1' then
  local existing = redis.call('GET', KEYS[5])
  if existing then
    -- the job key is not in KEYS: it is only known here (a single Redis, not a cluster)
    local job = 'lorp:job:' .. cjson.decode(existing)['job_id']
    return {0, existing, redis.call('HGETALL', job)}
  end
end
if ARGV[6] ~= '' then
  local queued = redis.call('ZCARD', KEYS[4])
  if queued >= tonumber(ARGV[6]) then return {-2, queued} end
end
local seq = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'seq', seq, unpack(ARGV, 7))
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
-- KEYS: job, then the tenant's state zsets in the order of ARGV[3] (comma list of all states),
-- then the finished index
-- ARGV: new state ('' = keep), allowed current states (comma list), all states, the most jobs
-- of the tenant allowed in the new state ('' = no limit), field/values...
-- returns {1, old state}; {0, state} when not allowed; {-2, state} at the limit; {-1} missing
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {-1, ''} end
local ok = false
for s in string.gmatch(ARGV[2], '[^,]+') do if s == cur then ok = true end end
if not ok then return {0, cur} end
local new = ARGV[1]
if ARGV[4] ~= '' and new ~= '' and new ~= cur then
  local i = 1
  for s in string.gmatch(ARGV[3], '[^,]+') do
    i = i + 1
    if s == new and redis.call('ZCARD', KEYS[i]) >= tonumber(ARGV[4]) then return {-2, cur} end
  end
end
if #ARGV > 4 then redis.call('HSET', KEYS[1], unpack(ARGV, 5)) end
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
  local finished = redis.call('HGET', KEYS[1], 'finished_ts')
  if finished and finished ~= '' then redis.call('ZADD', KEYS[#KEYS], finished, id) end
end
return {1, cur}
"""

_EVENTS_LUA = """
-- KEYS: job, webhook queue list, pending zset; ARGV: now (epoch s), then state/message pairs.
-- Marks each state's event sent (hook:<state>) and pushes its delivery message, once per state,
-- for a job with a callback; a job stays in the pending set until a terminal event is pushed.
if redis.call('HGET', KEYS[1], 'callback') ~= '1' then return 0 end
local id = redis.call('HGET', KEYS[1], 'id')
local pushed = 0
for i = 2, #ARGV, 2 do
  if redis.call('HSETNX', KEYS[1], 'hook:' .. ARGV[i], ARGV[1]) == 1 then
    redis.call('LPUSH', KEYS[2], ARGV[i + 1])
    pushed = pushed + 1
  end
end
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'queued' or state == 'running' then
  redis.call('ZADD', KEYS[3], 'NX', ARGV[1], id)
else
  redis.call('ZREM', KEYS[3], id)
end
return pushed
"""

_BEGIN_DELETE_LUA = """
-- KEYS: job, tenant jobs zset, the tenant's state zsets (ARGV[3] order), finished, deleting
-- ARGV: tenant ('' = any), finished states (comma list), all states, now (epoch s)
-- returns {1, state} (hidden now, or already being deleted); {0, state} not finished; {-1} missing
local h = redis.call('HMGET', KEYS[1], 'tenant', 'state', 'id', 'idem_key')
if not h[1] or (ARGV[1] ~= '' and h[1] ~= ARGV[1]) then return {-1, ''} end
local finished = false
for s in string.gmatch(ARGV[2], '[^,]+') do if s == h[2] then finished = true end end
if not finished then return {0, h[2]} end
local id = h[3]
redis.call('HSET', KEYS[1], 'deleting', '1')
redis.call('ZREM', KEYS[2], id)
for i = 3, #KEYS - 2 do redis.call('ZREM', KEYS[i], id) end
redis.call('ZREM', KEYS[#KEYS - 1], id)
if redis.call('ZSCORE', KEYS[#KEYS], id) == false then
  redis.call('ZADD', KEYS[#KEYS], ARGV[4], id)
end
if h[4] and h[4] ~= '' then
  -- the job key and the idempotency key are not in KEYS: a single Redis, not a cluster
  local idem = redis.call('GET', h[4])
  if idem and cjson.decode(idem)['job_id'] == id then redis.call('DEL', h[4]) end
end
return {1, h[2]}
"""

_TAKE_TOKEN_LUA = """
-- KEYS: bucket; ARGV: refill per second, burst. Returns '0' (taken) or the seconds to wait.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local h = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(h[1]) or burst
local ts = tonumber(h[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
local fmt = '%.6f'
redis.call('HSET', KEYS[1], 'tokens', string.format(fmt, tokens), 'ts', string.format(fmt, now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return string.format('%.6f', wait)
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


def _finished_fields() -> dict[str, str]:
    """``finished_at`` (ISO) and ``finished_ts`` (epoch seconds: the finished index's score)."""
    now = datetime.now(UTC)
    return {"finished_at": now.isoformat(), "finished_ts": f"{now.timestamp():.3f}"}


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
    deliveries: list[dict[str, Any]] = field(default_factory=list)
    deleting: bool = False
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
            deleting=h.get("deleting") == "1",
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
        self._begin_delete = redis.register_script(_BEGIN_DELETE_LUA)
        self._take_token = redis.register_script(_TAKE_TOKEN_LUA)
        self._refresh_lock = redis.register_script(_REFRESH_LOCK_LUA)
        self._release_lock = redis.register_script(_RELEASE_LOCK_LUA)
        self._events = redis.register_script(_EVENTS_LUA)
        # webhooks: the broker list and message of a job's state event (None: no webhooks),
        # and the broker's Redis when it is not this one
        self.event_message: Callable[[str, str], tuple[str, str]] | None = None
        self.event_broker: Redis | None = None

    @classmethod
    def from_settings(cls, settings: Settings, *, for_worker: bool = False) -> JobStore:
        """A store on ``LORP_REDIS_URL``."""
        store = cls(
            make_redis(settings.redis_url, for_worker=for_worker),
            idempotency_ttl=settings.idempotency_ttl_seconds,
        )
        if settings.webhook_allowed_hosts:
            from jobcore.queue import make_celery, webhook_message

            app = make_celery(settings)
            store.event_message = lambda job_id, state: webhook_message(app, job_id, state)
            if settings.broker_url and settings.broker_url != settings.redis_url:
                store.event_broker = make_redis(settings.broker_url, for_worker=for_worker)
        return store

    def close(self) -> None:
        """Close the connection pools."""
        self.redis.close()
        if self.event_broker is not None:
            self.event_broker.close()

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
        max_queued: int | None = None,
        queue: str | None = None,
    ) -> tuple[JobRecord, bool]:
        """Store a new queued job; returns ``(record, created)``.

        With an idempotency key, a repeat of the same key and the same spec returns the existing
        job (``created=False``); the same key with another spec raises
        :class:`IdempotencyConflictError`. With ``message``, ``message(job_id)`` is a broker
        list in this Redis and the run message of the new job: the same script pushes it there
        and marks the job enqueued, so a job is stored and queued together or not at all.
        With ``max_queued``, a new job of a tenant that already has that many jobs queued raises
        :class:`QuotaExceededError` and nothing is stored (a repeat of a stored job still
        returns it).
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
            "callback": "1" if spec.callback_url else "0",
            "idem_key": idem_key,
        }
        if queue is not None:
            fields["queue"] = queue
        args: list[Any] = [
            job_id,
            "1" if idem_key else "0",
            json.dumps({"job_id": job_id, "fingerprint": fingerprint}),
            self.idempotency_ttl,
            payload,
            "" if max_queued is None else str(max_queued),
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
            self.send_events(job_id)
            return JobRecord.from_hash({**fields, "seq": str(value)}), True
        if int(created) == -2:
            raise QuotaExceededError(
                f"tenant {tenant!r} already has {value} queued jobs, the most allowed "
                f"(tenant_max_queued={max_queued}); retry once some have started",
                retry_after=QUOTA_RETRY_AFTER_SECONDS,
            )
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
        """The tenant's job (with its webhook deliveries); :class:`JobNotFoundError` when
        missing, another tenant's or being deleted."""
        rec = self.get_any(job_id)
        if rec is None or rec.tenant != tenant or rec.deleting:
            raise JobNotFoundError("job not found")
        if rec.spec.get("callback_url"):
            rec.deliveries = self.deliveries(job_id)
        return rec

    def record_job(self, state: str, timings: Mapping[str, float]) -> None:
        """Count a job that ended in ``state`` and its stages' seconds (:mod:`jobcore.metrics`,
        read by ``/metrics``)."""
        record_job(self.redis, state, timings)

    # -- webhooks -------------------------------------------------------------------------

    def send_events(self, job_id: str) -> int:
        """Push the webhook delivery of every state the job has entered whose event was not
        pushed yet (in one script with the mark when the broker is this Redis; else pushed,
        then marked: a crash in between repeats an event, same id); the number pushed. A job
        without a callback, or a store without ``event_message``, sends nothing. Called after
        every transition; :meth:`sweep_events` repeats it for jobs a crash may have left
        between a transition and this call."""
        if self.event_message is None:
            return 0
        state, started, callback = cast(
            "list[str | None]",
            self.redis.hmget(_job_key(job_id), ["state", "started_at", "callback"]),
        )
        if callback != "1" or state is None:
            return 0
        visited = [JobState.queued.value]
        if started:
            visited.append(JobState.running.value)
        if state not in visited:
            visited.append(state)
        now = int(time.time())
        if self.event_broker is None:  # the broker is this Redis: mark and push in one step
            queue = ""
            args: list[Any] = [now]
            for entered in visited:
                queue, message = self.event_message(job_id, entered)
                args += [entered, message]
            return int(self._events(keys=[_job_key(job_id), queue, _PENDING_HOOKS], args=args))
        # a separate broker: push, then mark; a crash in between repeats the event (same id)
        flags = cast(
            "list[str | None]",
            self.redis.hmget(_job_key(job_id), [f"hook:{s}" for s in visited]),
        )
        missing = [s for s, flag in zip(visited, flags, strict=True) if not flag]
        for entered in missing:
            self.event_broker.lpush(*self.event_message(job_id, entered))
        pipe = self.redis.pipeline()
        for entered in missing:
            pipe.hsetnx(_job_key(job_id), f"hook:{entered}", now)
        if state in (JobState.queued.value, JobState.running.value):
            pipe.zadd(_PENDING_HOOKS, {job_id: now}, nx=True)
        else:
            pipe.zrem(_PENDING_HOOKS, job_id)
        pipe.execute()
        return len(missing)

    def sweep_events(self, older_than_s: float = 60.0) -> int:
        """:meth:`send_events` for every job with a callback whose final event has not been
        pushed and that was last seen over ``older_than_s`` ago; the number pushed."""
        cutoff = time.time() - older_than_s
        ids = cast("list[str]", self.redis.zrangebyscore(_PENDING_HOOKS, "-inf", cutoff))
        pushed = 0
        for job_id in ids:
            if not self.redis.exists(_job_key(job_id)):
                self.redis.zrem(_PENDING_HOOKS, job_id)
                continue
            pushed += self.send_events(job_id)
            self.redis.zadd(_PENDING_HOOKS, {job_id: time.time()}, xx=True)
        return pushed

    def record_delivery(self, job_id: str, attempt: dict[str, Any]) -> None:
        """Append a webhook delivery attempt to the job's record (the last
        :data:`jobcore.webhooks.MAX_RECORDED_ATTEMPTS` are kept)."""
        key = f"{_job_key(job_id)}:deliveries"
        pipe = self.redis.pipeline()
        pipe.rpush(key, json.dumps(attempt, sort_keys=True))
        pipe.ltrim(key, -MAX_RECORDED_ATTEMPTS, -1)
        pipe.execute()

    def deliveries(self, job_id: str) -> list[dict[str, Any]]:
        """The job's webhook delivery attempts, oldest first."""
        raw = cast("list[str]", self.redis.lrange(f"{_job_key(job_id)}:deliveries", 0, -1))
        return [json.loads(item) for item in raw]

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
                **_finished_fields(),
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

    def start(self, rec: JobRecord, *, max_running: int | None = None) -> bool:
        """queued|running -> running (a redelivered job is running already); counts attempts.
        With ``max_running``, a queued job whose tenant already has that many jobs running
        stays queued and :class:`QuotaExceededError` is raised (checked in the same script)."""
        now = _now()
        fields = {
            "attempts": str(rec.attempts + 1),
            "started_at": rec.started_at or now,
            "updated_at": now,
            "error": "",
            "progress": json.dumps({"stage": "starting", "fraction": 0.0, "message": ""}),
        }
        ok, _ = self._run_transition(
            rec.tenant,
            rec.id,
            JobState.running,
            {JobState.queued, JobState.running},
            fields,
            limit=max_running,
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
        finished = _finished_fields()
        fields = {
            **finished,
            "updated_at": finished["finished_at"],
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

    # -- deletion and expiry (jobcore.retention) -----------------------------------------

    def begin_delete(self, job_id: str, tenant: str | None = None) -> JobRecord:
        """Hide a finished job (``tenant`` None: of any tenant): out of every index, reads
        404, its idempotency key gone, listed in :meth:`deleting_ids` until :meth:`purge`.
        Repeats on a job being deleted succeed (to finish an interrupted deletion).
        :class:`JobNotFoundError` when missing or another tenant's;
        :class:`InvalidTransitionError` while queued or running."""
        rec = self.get_any(job_id)
        if rec is None or (tenant is not None and rec.tenant != tenant):
            raise JobNotFoundError("job not found")
        code, state = self._begin_delete(
            keys=[
                _job_key(job_id),
                _tenant_key(rec.tenant, "jobs"),
                *_state_keys(rec.tenant),
                FINISHED_KEY,
                DELETING_KEY,
            ],
            args=[
                rec.tenant,
                ",".join(s.value for s in TERMINAL_STATES),
                ",".join(s.value for s in STATES),
                f"{datetime.now(UTC).timestamp():.3f}",
            ],
        )
        if int(code) == -1:
            raise JobNotFoundError("job not found")
        if int(code) == 0:
            raise InvalidTransitionError(
                f"job is {state}; only finished jobs can be deleted "
                "(cancel it first: POST /jobs/{id}/cancel)"
            )
        return rec

    def purge(self, job_id: str) -> None:
        """Drop the record of a job :meth:`begin_delete` hid (its artifacts are gone)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(_job_key(job_id), f"{_job_key(job_id)}:deliveries")
        pipe.zrem(_PENDING_HOOKS, job_id)
        pipe.zrem(DELETING_KEY, job_id)
        pipe.zrem(FINISHED_KEY, job_id)
        pipe.execute()

    def expired_ids(self, finished_before: float, limit: int = 500) -> list[str]:
        """Ids of jobs that finished before ``finished_before`` (epoch seconds), oldest first."""
        return cast(
            "list[str]",
            self.redis.zrangebyscore(FINISHED_KEY, "-inf", finished_before, start=0, num=limit),
        )

    def deleting_ids(self, began_before: float, limit: int = 500) -> list[str]:
        """Ids of jobs whose deletion began before ``began_before`` and was never finished."""
        return cast(
            "list[str]",
            self.redis.zrangebyscore(DELETING_KEY, "-inf", began_before, start=0, num=limit),
        )

    # -- request rate limit -------------------------------------------------------------

    def take_token(self, caller: str, rate: float, burst: int) -> float:
        """Take one request from ``caller``'s token bucket (``burst`` tokens, ``rate`` refilled
        per second, Redis's clock); 0.0 when taken, else the seconds until one is available."""
        digest = hashlib.sha256(caller.encode("utf-8", "surrogateescape")).hexdigest()
        return float(self._take_token(keys=[f"lorp:rate:{digest}"], args=[rate, burst]))

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
        now = seconds + micros / 1e6
        value = json.dumps({"memory": int(memory_bytes), "until": now + ttl_s, "at": now})
        self.redis.hset(f"{POOL_PREFIX}{device_class}", worker, value)

    def withdraw(self, device_class: str, worker: str) -> None:
        """A worker stopping: its advertisement goes at once."""
        self.redis.hdel(f"{POOL_PREFIX}{device_class}", worker)

    def pool_memory(self, device_classes: Sequence[str]) -> dict[str, int]:
        """Device class -> the largest memory a live worker of it advertised (classes nobody
        advertised are left out)."""
        pools: dict[str, int] = {}
        for w in self.pool_workers(device_classes):
            if w["live"]:
                pools[w["device_class"]] = max(pools.get(w["device_class"], 0), w["memory"])
        return pools

    def pool_workers(self, device_classes: Sequence[str]) -> list[dict[str, Any]]:
        """Every advertisement of ``device_classes`` (the workers' heartbeats, refreshed while
        they run): device class, worker, memory, seconds since its last refresh, live (not
        expired)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.time()
        for device_class in device_classes:
            pipe.hgetall(f"{POOL_PREFIX}{device_class}")
        (seconds, micros), *hashes = pipe.execute()
        now = seconds + micros / 1e6
        out = []
        for device_class, offers in zip(device_classes, hashes, strict=True):
            for worker, raw in sorted(offers.items()):
                offer = json.loads(raw)
                out.append(
                    {
                        "device_class": device_class,
                        "worker": worker,
                        "memory": int(offer["memory"]),
                        "age_s": max(0.0, now - float(offer.get("at", now))),
                        "live": float(offer["until"]) > now,
                    }
                )
        return out

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
        *,
        limit: int | None = None,
    ) -> tuple[bool, str]:
        args: list[str] = [
            new.value if new else "",
            ",".join(s.value for s in allowed),
            ",".join(s.value for s in STATES),
            "" if limit is None or new is None else str(limit),
        ]
        for k, v in fields.items():
            args += [k, v]
        code, cur = self._transition(
            keys=[_job_key(job_id), *_state_keys(tenant), FINISHED_KEY], args=args
        )
        if int(code) == -1:
            raise JobNotFoundError("job not found")
        if int(code) == 1 and new is not None and new.value != cur:
            self.send_events(job_id)
        if int(code) == -2:
            raise QuotaExceededError(
                f"tenant {tenant!r} already has {limit} jobs {new.value if new else ''} "
                f"(tenant_max_{new.value if new else ''}={limit})"
            )
        return int(code) == 1, str(cur)
