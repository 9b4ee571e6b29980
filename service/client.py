"""A small typed Python client for the LoRP jobs REST API (httpx).

    from service.client import LorpClient

    with LorpClient("http://127.0.0.1:8000", api_key="...") as api:
        job = api.submit({"model": "s3://in/acme/model.gguf", "calibration": "corpus:wiki",
                          "budget": {"blocks": 6}})
        job = api.wait(job["id"], on_progress=lambda j: print(j["progress"]))
        files = api.download(job["id"], "out/")     # sha256-verified against the artifact list

Every non-2xx answer raises :class:`ApiError` (status, stable ``code`` and a readable message).
Downloads go to the presigned URLs directly (the API key is never sent to the object store).
"""

from __future__ import annotations

import builtins
import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, TypedDict, cast

import httpx

from lorp.progress import STAGES as PIPELINE_STAGES

__all__ = [
    "STAGES",
    "TERMINAL_STATES",
    "ApiError",
    "Artifact",
    "ChecksumError",
    "ClientError",
    "Job",
    "JobPage",
    "LorpClient",
    "WaitTimeoutError",
    "overall_fraction",
]

#: job stages in execution order (the worker's fetch/upload around lorp.pipeline's stages);
#: used for an overall progress figure
STAGES: tuple[str, ...] = ("downloading", *PIPELINE_STAGES, "uploading")
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
_RETRY_STATUS = frozenset({502, 503, 504})
MAX_RATE_LIMIT_WAIT = 10.0  # seconds the client waits at most on one 429 rate_limited


class Progress(TypedDict, total=False):
    stage: str | None
    fraction: float
    message: str


class JobErrorInfo(TypedDict):
    code: str
    message: str


class Job(TypedDict, total=False):
    """A job as ``GET /jobs/{id}`` returns it (JobPublic)."""

    id: str
    state: str
    created_at: str
    started_at: str | None
    finished_at: str | None
    progress: Progress
    error: JobErrorInfo | None
    summary: dict[str, Any] | None
    cancel_requested: bool
    attempts: int
    spec: dict[str, Any]


class JobPage(TypedDict):
    items: list[Job]
    next_cursor: str | None


class Artifact(TypedDict):
    name: str
    size: int
    sha256: str
    url: str


class ClientError(Exception):
    """Base class of everything this client raises on purpose."""


class ApiError(ClientError):
    """The API answered with an error status."""

    def __init__(self, status_code: int, code: str, message: str, body: Any = None) -> None:
        self.status_code = status_code
        self.code = code
        self.message = message
        self.body = body
        super().__init__(f"HTTP {status_code} {code}: {message}")

    @classmethod
    def from_response(cls, response: httpx.Response) -> ApiError:
        try:
            body: Any = response.json()
        except ValueError:
            body = None
        code = "http_error"
        message = response.reason_phrase or "error"
        if isinstance(body, dict):
            detail = body.get("detail")
            code = str(body.get("code") or code)
            if isinstance(detail, str):
                message = detail
            elif isinstance(detail, list):  # FastAPI validation errors
                code = body.get("code") or "validation_error"
                message = "; ".join(_format_validation_item(item) for item in detail) or message
        elif response.text:
            message = response.text.strip().splitlines()[0][:200]
        return cls(response.status_code, code, message, body)


def _format_validation_item(item: Any) -> str:
    if not isinstance(item, dict):
        return str(item)
    loc = [str(p) for p in item.get("loc", []) if p not in ("body", "query", "header")]
    where = ".".join(loc)
    msg = str(item.get("msg", "invalid"))
    return f"{where}: {msg}" if where else msg


class WaitTimeoutError(ClientError):
    """``wait`` gave up before the job reached a terminal state."""

    def __init__(self, job: Job, timeout: float) -> None:
        self.job = job
        super().__init__(
            f"job {job.get('id')} still {job.get('state')} after {timeout:.0f}s "
            f"(stage {(job.get('progress') or {}).get('stage')})"
        )


class ChecksumError(ClientError):
    """A downloaded artifact does not match the size or sha256 the API listed."""


def overall_fraction(job: Job) -> float:
    """Overall progress 0..1 from (stage, fraction within stage); 1.0 once succeeded."""
    state = job.get("state")
    if state == "succeeded":
        return 1.0
    progress = job.get("progress") or {}
    stage = progress.get("stage")
    frac = min(max(float(progress.get("fraction") or 0.0), 0.0), 1.0)
    if stage in STAGES:
        return (STAGES.index(stage) + frac) / len(STAGES)
    return 0.0 if state == "queued" else frac


def _safe_relative(name: str) -> Path:
    """An artifact name as a relative path that can't escape the destination directory."""
    pure = PurePosixPath(name)
    if (
        not name
        or pure.is_absolute()
        or any(part in ("", ".", "..") for part in name.split("/"))
        or "\\" in name
        or "\x00" in name
    ):
        raise ClientError(f"refusing unsafe artifact name {name!r}")
    return Path(*pure.parts)


class LorpClient:
    """Client for one API base URL and API key. Use as a context manager (or call ``close``)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        transport: httpx.BaseTransport | None = None,
        download_transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ClientError(f"API URL must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.retries = max(0, retries)
        headers = {"Accept": "application/json", "User-Agent": "lorp-jobs-client/0.1"}
        if api_key:
            headers["X-API-Key"] = api_key
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )
        # presigned URLs: a separate client without the API key header
        self._download = httpx.Client(
            timeout=httpx.Timeout(timeout, read=max(timeout, 300.0)),
            transport=download_transport or transport,
            follow_redirects=True,
        )

    # -- plumbing -------------------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()
        self._download.close()

    def __enter__(self) -> LorpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool = True,
    ) -> Any:
        """One API call; transient failures (connection errors, 502/503/504) of idempotent
        requests are retried with a short backoff, and any request refused by the API key's rate
        limit (429 ``rate_limited``: nothing was done) after its ``Retry-After`` (at most
        :data:`MAX_RATE_LIMIT_WAIT` s). A tenant quota (429 ``quota_exceeded``) is an
        :class:`ApiError` at once. A 204 returns None."""
        attempt = 0
        while True:
            try:
                response = self._http.request(
                    method, path, json=json, params=params, headers=headers
                )
            except httpx.TransportError as exc:
                if idempotent and attempt < self.retries:
                    attempt += 1
                    time.sleep(0.2 * 2 ** (attempt - 1))
                    continue
                raise ClientError(f"cannot reach {self.base_url}: {exc}") from exc
            if response.status_code in _RETRY_STATUS and idempotent and attempt < self.retries:
                attempt += 1
                time.sleep(0.2 * 2 ** (attempt - 1))
                continue
            if response.status_code == 429 and attempt < self.retries:
                wait = _rate_limit_wait(response)
                if wait is not None:
                    attempt += 1
                    time.sleep(wait)
                    continue
            if response.is_error:
                raise ApiError.from_response(response)
            if response.status_code == 204:
                return None
            try:
                return response.json()
            except ValueError as exc:
                raise ClientError(f"{method} {path}: the API answered non-JSON content") from exc

    # -- API ------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return cast(dict[str, Any], self._request("GET", "/healthz"))

    def submit(self, spec: Mapping[str, Any], idempotency_key: str | None = None) -> Job:
        """``POST /jobs``. With an idempotency key the request is safe to retry (and is)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return cast(
            Job,
            self._request(
                "POST",
                "/jobs",
                json=dict(spec),
                headers=headers,
                idempotent=idempotency_key is not None,
            ),
        )

    def get(self, job_id: str) -> Job:
        return cast(Job, self._request("GET", f"/jobs/{_job_path(job_id)}"))

    def list(
        self, state: str | None = None, limit: int | None = None, cursor: str | None = None
    ) -> JobPage:
        params = {k: v for k, v in {"state": state, "limit": limit, "cursor": cursor}.items() if v}
        return cast(JobPage, self._request("GET", "/jobs", params=params))

    def iter_jobs(self, state: str | None = None, page_size: int = 50) -> Iterator[Job]:
        """Every job (newest first), following ``next_cursor`` page by page."""
        cursor: str | None = None
        while True:
            page = self.list(state=state, limit=page_size, cursor=cursor)
            yield from page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def cancel(self, job_id: str) -> Job:
        return cast(Job, self._request("POST", f"/jobs/{_job_path(job_id)}/cancel"))

    def delete(self, job_id: str) -> None:
        """``DELETE /jobs/{id}``: a finished job's artifacts and record (409 while queued or
        running; 404 once deleted)."""
        self._request("DELETE", f"/jobs/{_job_path(job_id)}")

    def report(self, job_id: str) -> dict[str, Any]:
        return cast(dict[str, Any], self._request("GET", f"/jobs/{_job_path(job_id)}/report"))

    def artifacts(self, job_id: str) -> builtins.list[Artifact]:
        body = self._request("GET", f"/jobs/{_job_path(job_id)}/artifacts")
        return cast(builtins.list[Artifact], body["items"])

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        poll_interval: float = 1.0,
        on_progress: Callable[[Job], None] | None = None,
    ) -> Job:
        """Poll until the job is succeeded, failed or cancelled and return it.

        ``on_progress`` gets every polled job. Raises :class:`WaitTimeoutError` after ``timeout``
        seconds (None = forever). A failed job is returned, not raised: check ``job["state"]``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if on_progress is not None:
                on_progress(job)
            if job.get("state") in TERMINAL_STATES:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeoutError(job, timeout or 0.0)
            sleep = poll_interval
            if deadline is not None:
                sleep = max(0.0, min(sleep, deadline - time.monotonic()))
            time.sleep(sleep)

    def download(
        self,
        job_id: str,
        dest_dir: str | os.PathLike[str],
        *,
        on_file: Callable[[Artifact, Path], None] | None = None,
    ) -> builtins.list[Path]:
        """Fetch every artifact of a succeeded job into ``dest_dir`` (keeping its relative name),
        verifying size and sha256. A file is moved into place only once verified."""
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        paths = []
        for artifact in self.artifacts(job_id):
            target = dest / _safe_relative(artifact["name"])
            self._fetch_verified(artifact, target)
            paths.append(target)
            if on_file is not None:
                on_file(artifact, target)
        return paths

    def _fetch_verified(self, artifact: Artifact, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".part-", dir=target.parent)
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as out:
                try:
                    with self._download.stream("GET", artifact["url"]) as response:
                        if response.is_error:
                            response.read()
                            raise ClientError(
                                f"downloading {artifact['name']}: HTTP {response.status_code} "
                                "from the object store (expired URL?)"
                            )
                        for chunk in response.iter_bytes(1 << 20):
                            digest.update(chunk)
                            size += len(chunk)
                            out.write(chunk)
                except httpx.TransportError as exc:
                    raise ClientError(f"downloading {artifact['name']}: {exc}") from exc
            if size != int(artifact["size"]):
                raise ChecksumError(
                    f"{artifact['name']}: got {size} bytes, the manifest says {artifact['size']}"
                )
            if digest.hexdigest() != artifact["sha256"].lower():
                raise ChecksumError(
                    f"{artifact['name']}: sha256 {digest.hexdigest()} does not match "
                    f"the manifest's {artifact['sha256']}"
                )
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)


def _rate_limit_wait(response: httpx.Response) -> float | None:
    """Seconds to wait before retrying a 429 of the rate limit; None for any other 429."""
    try:
        code = response.json().get("code")
    except (ValueError, AttributeError):
        return None
    if code != "rate_limited":
        return None
    try:
        wait = float(response.headers.get("Retry-After", "1"))
    except ValueError:
        wait = 1.0
    return min(max(wait, 0.0), MAX_RATE_LIMIT_WAIT)


def _job_path(job_id: str) -> str:
    """Job ids go into the URL path: refuse anything that could change the route."""
    if not job_id or any(c in job_id for c in "/?#%\\") or job_id in (".", ".."):
        raise ClientError(f"invalid job id {job_id!r}")
    return job_id
