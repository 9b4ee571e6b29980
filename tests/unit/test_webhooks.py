"""Webhooks (issue 24 item 4): the callback URL rules (SSRF), signing, one POST to a real local
receiver, the settings that enable them, the job spec's ``callback_url``, and the store's
once-per-state events on a real redis-server."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from redis import Redis

from devstack.receiver import WebhookReceiver
from devstack.stack import HOUSEKEEPER_QUEUE, RedisServer, free_port
from jobcore import webhooks
from jobcore.config import Settings
from jobcore.queue import make_celery, webhook_message
from jobcore.spec import JobCreate, JobError, JobState, validate_job
from jobcore.store import JobStore

SECRET = "master-secret-for-tests"


def _settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "s3_access_key_id": "ak",
        "s3_secret_access_key": "sk",
        "s3_bucket": "lorp-artifacts",
        "api_keys": {"k" * 16: "acme", "j" * 16: "umbrella"},
        "webhook_allowed_hosts": ["hooks.example.com", "*.acme.test", "93.184.216.34"],
        "webhook_secret": SECRET,
    }
    values.update(overrides)
    return Settings(**values)


# -- the URL rules --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://hooks.example.com/x", "must use https"),
        ("ftp://hooks.example.com/x", "must use https"),
        ("https://user:pw@hooks.example.com/x", "user info"),
        ("https://hooks.example.com@evil.example.org/x", "user info"),
        ("https://hooks.example.com/x#frag", "fragment"),
        ("https://evil.example.org/x", "not among the hosts"),
        ("https://acme.test/x", "not among the hosts"),  # *.acme.test is subdomains only
        ("https://hooks.example.com.evil.org/x", "not among the hosts"),
        ("https://127.0.0.1/x", "not among the hosts"),
        ("https://hooks.example.com:99999/x", "not a valid URL"),
        ("https://hooks.example.com/a b", "whitespace"),
        ("https:///x", "no host"),
    ],
)
def test_callback_urls_outside_the_rules_are_refused(url: str, reason: str) -> None:
    with pytest.raises(webhooks.CallbackRefusedError, match=reason):
        webhooks.check_url(url, _settings())


def test_allowed_callback_urls() -> None:
    settings = _settings()
    target = webhooks.check_url("https://HOOKS.example.com./lorp?x=1", settings)
    assert (target.scheme, target.host, target.port, target.path) == (
        "https",
        "hooks.example.com",
        443,
        "/lorp?x=1",
    )
    assert webhooks.check_url("https://a.b.acme.test:8443/", settings).port == 8443
    assert webhooks.check_url("https://93.184.216.34/h", settings).host == "93.184.216.34"


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # shared address space
        "0.0.0.0",
        "224.0.0.1",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",  # IPv4-mapped loopback
        "::ffff:169.254.169.254",
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert not webhooks.address_allowed(address, _settings())


def test_public_addresses_pass_and_private_ones_only_when_allowed() -> None:
    assert webhooks.address_allowed("93.184.216.34", _settings())
    assert webhooks.address_allowed("2606:2800:220:1::1", _settings())
    permissive = _settings(webhook_allow_private=True)
    assert webhooks.address_allowed("127.0.0.1", permissive)
    assert webhooks.address_allowed("10.0.0.1", permissive)
    assert not webhooks.address_allowed("224.0.0.1", permissive)


def test_an_allowed_name_resolving_to_an_internal_address_is_refused_at_delivery() -> None:
    """DNS rebinding: the host is allowed, but what it resolves to is checked again before
    connecting ('localhost' resolves to loopback)."""
    settings = _settings(webhook_allowed_hosts=["localhost"], webhook_allow_http=True)
    target = webhooks.check_url("http://localhost:8080/x", settings)
    with pytest.raises(webhooks.CallbackRefusedError, match="non-public address"):
        webhooks.resolve(target, settings)
    permissive = _settings(
        webhook_allowed_hosts=["localhost"], webhook_allow_http=True, webhook_allow_private=True
    )
    assert webhooks.resolve(target, permissive).address in ("127.0.0.1", "::1")


def test_a_literal_private_address_is_refused_even_when_listed() -> None:
    settings = _settings(webhook_allowed_hosts=["10.0.0.5", "169.254.169.254"])
    for url in ("https://10.0.0.5/x", "https://169.254.169.254/latest/meta-data"):
        with pytest.raises(webhooks.CallbackRefusedError, match="not a public address"):
            webhooks.check_url(url, settings)


# -- signing --------------------------------------------------------------------------------


def test_signature_is_hmac_sha256_over_timestamp_and_body() -> None:
    body = b'{"id":"x.running"}'
    header = webhooks.sign(b"s3cret", 1_700_000_000, body)
    expected = hmac.new(b"s3cret", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"
    now = int(time.time())
    fresh = webhooks.sign(b"s3cret", now, body)
    assert webhooks.verify(b"s3cret", fresh, body)
    assert not webhooks.verify(b"other", fresh, body)
    assert not webhooks.verify(b"s3cret", fresh, body + b" ")
    assert not webhooks.verify(b"s3cret", header, body)  # too old
    assert not webhooks.verify(b"s3cret", "garbage", body)


def test_tenant_secrets_are_derived_or_explicit_and_differ() -> None:
    settings = _settings(webhook_secrets={"umbrella": "explicit-umbrella"})
    acme = webhooks.tenant_secret(settings, "acme")
    assert acme == hmac.new(SECRET.encode(), b"acme", hashlib.sha256).hexdigest().encode()
    assert webhooks.tenant_secret(settings, "umbrella") == b"explicit-umbrella"


def test_secret_cli_prints_a_tenants_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key, value in {
        "LORP_S3_ACCESS_KEY_ID": "ak",
        "LORP_S3_SECRET_ACCESS_KEY": "sk",
        "LORP_S3_BUCKET": "lorp-artifacts",
        "LORP_API_KEYS": json.dumps({"k" * 16: "acme"}),
        "LORP_WEBHOOK_SECRET": SECRET,
    }.items():
        monkeypatch.setenv(key, value)
    assert webhooks.main(["secret", "acme"]) == 0
    assert capsys.readouterr().out.strip() == webhooks.tenant_secret(_settings(), "acme").decode()
    assert webhooks.main(["nonsense"]) == 2


# -- settings -------------------------------------------------------------------------------


def test_settings_refuse_webhooks_without_secrets_or_with_a_separate_broker() -> None:
    with pytest.raises(ValidationError, match="no signing secret"):
        _settings(webhook_secret=None)
    with pytest.raises(ValidationError, match="webhook host"):
        _settings(webhook_allowed_hosts=["https://hooks.example.com"])
    with pytest.raises(ValidationError, match="tenants without an API key"):
        _settings(webhook_secrets={"nobody": "x"})
    # every tenant with an explicit secret: no master secret needed
    _settings(webhook_secret=None, webhook_secrets={"acme": "a", "umbrella": "u"})


# -- the job spec ---------------------------------------------------------------------------

BODY = {"model": "hf:org/model", "calibration": "corpus:wiki", "budget": {"blocks": 2}}


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://169.254.169.254/latest/meta-data", "not among the hosts"),
        ("http://hooks.example.com/x", "must use https"),
        ("https://hooks.example.com@10.0.0.1/", "user info"),
    ],
)
def test_a_forbidden_callback_is_a_field_error(url: str, reason: str, tmp_path: Path) -> None:
    corpus = tmp_path / "wiki.txt"
    corpus.write_text("text")
    settings = _settings(allow_hub=True, corpora={"wiki": corpus})
    with pytest.raises(ValidationError) as err:
        validate_job({**BODY, "callback_url": url}, settings, "acme")
    (error,) = err.value.errors()
    assert error["loc"] == ("callback_url",)
    assert reason in error["msg"]
    ok = validate_job({**BODY, "callback_url": "https://hooks.example.com/l"}, settings, "acme")
    assert ok.callback_url == "https://hooks.example.com/l"


def test_callbacks_are_refused_when_the_operator_enabled_none(tmp_path: Path) -> None:
    corpus = tmp_path / "wiki.txt"
    corpus.write_text("text")
    settings = _settings(
        webhook_allowed_hosts=[], allow_hub=True, corpora={"wiki": corpus}, webhook_secret=None
    )
    with pytest.raises(ValidationError, match="callbacks are not enabled"):
        validate_job({**BODY, "callback_url": "https://hooks.example.com/x"}, settings, "acme")


def test_the_housekeeper_queue_and_header_names_agree() -> None:
    from devstack.receiver import EVENT_ID_HEADER

    assert HOUSEKEEPER_QUEUE == webhooks.WEBHOOK_QUEUE
    assert EVENT_ID_HEADER == webhooks.EVENT_ID_HEADER


# -- one POST to a real receiver --------------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver(free_port(), failures=1) as server:
        yield server


def test_post_reaches_the_checked_address_with_the_signature(receiver: WebhookReceiver) -> None:
    settings = _settings(
        webhook_allowed_hosts=["localhost"], webhook_allow_http=True, webhook_allow_private=True
    )
    port = receiver.port
    target = webhooks.resolve(
        webhooks.check_url(f"http://localhost:{port}/h?k=1", settings), settings
    )
    body = webhooks.event_body({"id": "j1", "state": "running"}, "running")
    secret = webhooks.tenant_secret(settings, "acme")
    headers = {
        webhooks.SIGNATURE_HEADER: webhooks.sign(secret, int(time.time()), body),
        webhooks.EVENT_ID_HEADER: webhooks.event_id("j1", "running"),
    }
    first = webhooks.post(target, body, headers, timeout=5)
    second = webhooks.post(target, body, headers, timeout=5)
    assert (first.ok, first.status, first.error) == (False, 503, "HTTP 503")
    assert (second.ok, second.status) == (True, 200)
    assert [p.status for p in receiver.posts] == [503, 200]
    got_headers, got_body = receiver.posts[1].headers, receiver.posts[1].body
    assert got_body == body
    assert got_headers["Host"] == f"localhost:{port}"
    assert got_headers[webhooks.EVENT_ID_HEADER] == "j1.running"
    assert webhooks.verify(secret, got_headers[webhooks.SIGNATURE_HEADER], got_body)
    assert json.loads(got_body) == {
        "id": "j1.running",
        "type": "job.state_changed",
        "state": "running",
        "job": {"id": "j1", "state": "running"},
    }


def test_post_to_nothing_is_a_failed_attempt_not_an_exception() -> None:
    target = webhooks.Target("http", "localhost", 9, "/", "127.0.0.1")  # discard: closed
    attempt = webhooks.post(target, b"{}", {}, timeout=2)
    assert not attempt.ok and attempt.status is None and attempt.error


def test_backoff_doubles_up_to_the_cap() -> None:
    settings = _settings(webhook_backoff_seconds=2.0, webhook_backoff_max_seconds=10.0)
    assert [webhooks.backoff_seconds(n, settings) for n in range(1, 6)] == [2, 4, 8, 10, 10]


# -- the store: one event per state, on a real redis-server ----------------------------------


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.url
    server.stop()


def _queued_events(redis: Redis) -> list[tuple[str, str]]:
    import base64

    out = []
    for raw in reversed(redis.lrange(HOUSEKEEPER_QUEUE, 0, -1)):  # LPUSH: oldest last
        message = json.loads(raw)
        assert message["headers"]["task"] == webhooks.DELIVER_TASK
        args = json.loads(base64.b64decode(message["body"]))[0]
        out.append((args[0], args[1]))
    return out


def test_every_state_change_pushes_one_event_once(redis_url: str) -> None:
    settings = _settings(
        redis_url=redis_url,
        webhook_allowed_hosts=["hooks.example.com"],
    )
    store = JobStore.from_settings(settings)
    assert store.event_message is not None
    redis = store.redis
    redis.delete(HOUSEKEEPER_QUEUE)
    spec = JobCreate.model_validate({**BODY, "callback_url": "https://hooks.example.com/x"})
    plain = JobCreate.model_validate(BODY)
    rec, _ = store.create("acme", spec)
    other, _ = store.create("acme", plain)  # no callback: no events
    assert store.start(rec) and store.start(other)
    assert store.start(store.get_any(rec.id))  # type: ignore[arg-type]  # redelivery: same state
    store.set_progress(rec, "calibration", 0.5, "half")
    assert store.finish(rec, JobState.failed, error=JobError(code="x", message="m"))
    assert store.send_events(rec.id) == 0  # all sent already
    assert _queued_events(redis) == [(rec.id, "queued"), (rec.id, "running"), (rec.id, "failed")]
    assert redis.zscore("lorp:hooks:pending", rec.id) is None  # final event pushed
    store.close()


def test_a_separate_broker_gets_each_event_once(redis_url: str) -> None:
    """Broker on another Redis database (as in docker-compose): pushed there, then marked."""
    broker_url = redis_url.rsplit("/", 1)[0] + "/3"
    settings = _settings(
        redis_url=redis_url, broker_url=broker_url, webhook_allowed_hosts=["hooks.example.com"]
    )
    store = JobStore.from_settings(settings)
    assert store.event_broker is not None
    broker = Redis.from_url(broker_url, decode_responses=True)
    broker.delete(HOUSEKEEPER_QUEUE)
    store.redis.delete(HOUSEKEEPER_QUEUE)
    spec = JobCreate.model_validate({**BODY, "callback_url": "https://hooks.example.com/x"})
    rec, _ = store.create("acme", spec)
    assert store.start(rec)
    assert store.finish(rec, JobState.succeeded, summary={})
    assert store.send_events(rec.id) == 0
    assert _queued_events(broker) == [
        (rec.id, "queued"),
        (rec.id, "running"),
        (rec.id, "succeeded"),
    ]
    assert store.redis.llen(HOUSEKEEPER_QUEUE) == 0
    assert store.redis.zscore("lorp:hooks:pending", rec.id) is None
    broker.close()
    store.close()


def test_the_sweep_sends_what_a_crash_left_unsent(redis_url: str) -> None:
    settings = _settings(redis_url=redis_url, webhook_allowed_hosts=["hooks.example.com"])
    spec = JobCreate.model_validate({**BODY, "callback_url": "https://hooks.example.com/x"})
    store = JobStore.from_settings(settings)
    store.redis.delete(HOUSEKEEPER_QUEUE)
    rec, _ = store.create("acme", spec)
    # a process that transitions but dies before sending (no event_message)
    app = make_celery(settings)
    store.event_message = None
    assert store.start(rec)
    assert _queued_events(store.redis) == [(rec.id, "queued")]
    store.event_message = lambda job_id, state: webhook_message(app, job_id, state)
    assert store.sweep_events(older_than_s=3600) == 0  # too recent to sweep
    assert store.sweep_events(older_than_s=-1) == 1
    assert _queued_events(store.redis) == [(rec.id, "queued"), (rec.id, "running")]
    assert store.redis.zscore("lorp:hooks:pending", rec.id) is not None  # not final yet
    store.close()


def test_deliveries_are_recorded_on_the_job(redis_url: str) -> None:
    settings = _settings(redis_url=redis_url)
    store = JobStore.from_settings(settings)
    spec = JobCreate.model_validate({**BODY, "callback_url": "https://hooks.example.com/x"})
    rec, _ = store.create("acme", spec)
    for n in range(1, webhooks.MAX_RECORDED_ATTEMPTS + 6):
        store.record_delivery(rec.id, {"event_id": f"{rec.id}.queued", "attempt": n, "ok": False})
    got = store.get("acme", rec.id).deliveries
    assert len(got) == webhooks.MAX_RECORDED_ATTEMPTS
    assert got[-1]["attempt"] == webhooks.MAX_RECORDED_ATTEMPTS + 5
    store.close()
