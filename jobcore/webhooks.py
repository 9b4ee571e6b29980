"""Job-state webhooks: which callback URLs a job may name (SSRF rules), the signed event a
receiver gets, and one delivery attempt.

A job with ``callback_url`` gets one event per state it enters (``queued``, ``running``, then
``succeeded`` / ``failed`` / ``cancelled``). The event id is ``<job id>.<state>``: the same on
every retry and redelivery, so a receiver drops duplicates by it. Delivery is at least once
(``jobcore.store.JobStore`` pushes the delivery task in the same Redis script that marks the
event sent, or pushes and then marks with a separate broker; a periodic sweep repeats what a
crash left undone; ``worker.housekeeper`` posts it, retries with backoff and records every
attempt).

Rules for a callback URL (checked at submission without DNS, and again at every delivery after
resolving the host, so DNS rebinding cannot turn an allowed name into an internal address):

* ``https`` (``http`` only with ``LORP_WEBHOOK_ALLOW_HTTP``), no user info, no fragment;
* the host is in the operator's ``LORP_WEBHOOK_ALLOWED_HOSTS`` (exact names, or ``*.example.com``
  for its subdomains); with none configured callbacks are off and such jobs are refused;
* every address the host resolves to is a global unicast address: loopback, private, link-local
  (cloud metadata at 169.254.169.254), multicast, reserved, unspecified, shared and the IPv4
  addresses mapped into IPv6 of any of those are refused, unless ``LORP_WEBHOOK_ALLOW_PRIVATE``
  (a test or an on-premises receiver). The connection goes to the checked address.

Signature: header ``X-LoRP-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret,
"<t>.<body>")>``; the tenant's secret is its entry in ``LORP_WEBHOOK_SECRETS`` or, failing
that, HMAC-SHA256(``LORP_WEBHOOK_SECRET``, tenant) (:func:`tenant_secret`; print one with
``python -m jobcore.webhooks secret <tenant>``). Receivers should reject a timestamp older than
a few minutes.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import json
import socket
import ssl
import sys
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from jobcore.config import Settings

#: The Celery task that posts one event (``worker.housekeeper``) and the queue it reads.
DELIVER_TASK = "lorp.deliver_webhook"
WEBHOOK_QUEUE = "lorp.webhooks"
SIGNATURE_HEADER = "X-LoRP-Signature"
EVENT_ID_HEADER = "X-LoRP-Event-Id"
MAX_URL_LEN = 2048
#: Attempts kept on a job's record (the oldest are dropped).
MAX_RECORDED_ATTEMPTS = 100


class CallbackRefusedError(ValueError):
    """A callback URL the operator's rules do not allow (the message says which rule)."""


@dataclass(frozen=True)
class Target:
    """A checked callback: where to connect (``address``) and what to ask for."""

    scheme: str
    host: str
    port: int
    path: str
    address: str | None = None  # set by :func:`resolve`


def _host_allowed(host: str, allowed: list[str]) -> bool:
    for pattern in allowed:
        pattern = pattern.lower().rstrip(".")
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and host != pattern[2:]:
                return True
        elif host == pattern:
            return True
    return False


def address_allowed(address: str, settings: Settings) -> bool:
    """True when a webhook may connect to ``address`` (an IP literal)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if settings.webhook_allow_private:
        return not (ip.is_multicast or ip.is_unspecified)
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def check_url(url: str, settings: Settings) -> Target:
    """Check ``url`` against the operator's rules without resolving it (what submission can
    know); raises :class:`CallbackRefusedError`."""
    if not settings.webhook_allowed_hosts:
        raise CallbackRefusedError(
            "callbacks are not enabled on this service (the operator has set no "
            "LORP_WEBHOOK_ALLOWED_HOSTS)"
        )
    if len(url) > MAX_URL_LEN or any(c.isspace() or ord(c) < 32 for c in url):
        raise CallbackRefusedError("callback_url is too long or holds whitespace/control chars")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise CallbackRefusedError(f"callback_url is not a valid URL: {exc}") from None
    schemes = ("https", "http") if settings.webhook_allow_http else ("https",)
    if parts.scheme not in schemes:
        raise CallbackRefusedError(f"callback_url must use {' or '.join(schemes)}")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise CallbackRefusedError("callback_url must not hold user info")
    if parts.fragment:
        raise CallbackRefusedError("callback_url must not hold a fragment")
    host = (parts.hostname or "").lower().rstrip(".")
    if not host:
        raise CallbackRefusedError("callback_url has no host")
    if not _host_allowed(host, settings.webhook_allowed_hosts):
        raise CallbackRefusedError(
            f"callback host {host!r} is not among the hosts the operator allows "
            f"({', '.join(settings.webhook_allowed_hosts)})"
        )
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None and not address_allowed(host, settings):
        raise CallbackRefusedError(
            f"callback address {host} is not a public address (loopback, private, link-local "
            "and reserved addresses are refused)"
        )
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(parts.scheme, host, port or (443 if parts.scheme == "https" else 80), path)


def resolve(target: Target, settings: Settings) -> Target:
    """``target`` with the address to connect to: the first address the host resolves to,
    after checking that every one of them is allowed (:func:`address_allowed`)."""
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise CallbackRefusedError(
            f"callback host {target.host!r} does not resolve: {exc}"
        ) from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    refused = [a for a in addresses if not address_allowed(a, settings)]
    if not addresses or refused:
        raise CallbackRefusedError(
            f"callback host {target.host!r} resolves to a non-public address "
            f"({', '.join(refused) or 'none'})"
        )
    return Target(target.scheme, target.host, target.port, target.path, addresses[0])


def tenant_secret(settings: Settings, tenant: str) -> bytes:
    """The key a tenant's events are signed with (see the module docstring)."""
    explicit = settings.webhook_secrets.get(tenant)
    if explicit is not None:
        return explicit.get_secret_value().encode()
    if settings.webhook_secret is None:
        raise CallbackRefusedError(
            "callbacks are not enabled on this service (no LORP_WEBHOOK_SECRET)"
        )
    master = settings.webhook_secret.get_secret_value().encode()
    return hmac.new(master, tenant.encode(), hashlib.sha256).hexdigest().encode()


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The ``X-LoRP-Signature`` value of ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: bytes, header: str, body: bytes, *, tolerance_s: float = 300.0) -> bool:
    """What a receiver checks: the signature matches and is at most ``tolerance_s`` old."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), header)


def event_id(job_id: str, state: str) -> str:
    return f"{job_id}.{state}"


def event_body(record: dict[str, Any], state: str) -> bytes:
    """The JSON body of the event for ``state`` of a job (``record``: the job's public view,
    as ``GET /jobs/{id}`` returns it)."""
    event = {
        "id": event_id(record["id"], state),
        "type": "job.state_changed",
        "state": state,
        "job": record,
    }
    return json.dumps(event, separators=(",", ":"), sort_keys=True).encode()


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, target: Target, timeout: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self._address = target.address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, target: Target, timeout: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self._address = target.address

    def connect(self) -> None:
        raw = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = ssl.create_default_context().wrap_socket(raw, server_hostname=self.host)


@dataclass(frozen=True)
class Attempt:
    """The outcome of one POST."""

    ok: bool
    status: int | None
    error: str | None
    seconds: float


def post(target: Target, body: bytes, headers: dict[str, str], timeout: float) -> Attempt:
    """POST ``body`` to a resolved ``target`` (connecting to its checked address, the Host
    header and TLS name its host); a 2xx answer is success, anything else or no answer is
    not. Redirects are not followed."""
    assert target.address is not None, "resolve() the target first"
    conn: http.client.HTTPConnection = (
        _PinnedHTTPSConnection(target, timeout)
        if target.scheme == "https"
        else _PinnedHTTPConnection(target, timeout)
    )
    start = time.monotonic()
    try:
        conn.request(
            "POST",
            target.path,
            body=body,
            headers={
                "Content-Type": "application/json",
                "User-Agent": "lorp-webhooks/1",
                **headers,
            },
        )
        response = conn.getresponse()
        response.read(64 * 1024)
        ok = 200 <= response.status < 300
        error = None if ok else f"HTTP {response.status}"
        return Attempt(ok, response.status, error, time.monotonic() - start)
    except (OSError, http.client.HTTPException) as exc:
        return Attempt(False, None, f"{type(exc).__name__}: {exc}", time.monotonic() - start)
    finally:
        conn.close()


def backoff_seconds(attempt: int, settings: Settings) -> float:
    """Wait before retry number ``attempt`` (1 = the first retry): doubling from
    ``webhook_backoff_seconds``, at most ``webhook_backoff_max_seconds``."""
    return float(
        min(
            settings.webhook_backoff_max_seconds,
            settings.webhook_backoff_seconds * 2 ** max(0, attempt - 1),
        )
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m jobcore.webhooks secret <tenant>``: print a tenant's signing secret."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "secret":
        print("usage: python -m jobcore.webhooks secret <tenant>", file=sys.stderr)
        return 2
    settings = Settings()  # type: ignore[call-arg]
    try:
        print(tenant_secret(settings, args[1]).decode())
    except CallbackRefusedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
