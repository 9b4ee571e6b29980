"""Hostile ``POST /jobs`` requests, one table (issue 6, item 7): what to send and which 4xx must
come back. ``tests/integration/test_service_api.py`` asserts every answer; the reliability
benchmark (``benchmarks/reliability/run.py``) counts them. :func:`make_hostile_files` lays out
the local files some of them point at (links leaving the local root, pickle-only weights)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .testbed import Service

__all__ = ["BAD_REQUESTS", "Bad", "make_hostile_files"]


@dataclass(frozen=True)
class Bad:
    """One hostile request to ``POST /jobs``: what to send and which 4xx must come back."""

    name: str
    body: Callable[[Service], Any] | None = None  # JSON value built from the stack
    loc: tuple[str, ...] | None = ("body",)  # 422: an error must point here
    status: tuple[int, ...] = (422,)
    raw: bytes | Callable[[], Iterator[bytes]] | None = None  # or bytes sent as they are
    headers: dict[str, str | bytes] = field(default_factory=dict)
    drop_key: bool = False


def _body(**changes: Any) -> Callable[[Service], dict[str, Any]]:
    """The good body with ``changes`` (a value of ``_DROP`` removes the field); a value that is
    callable gets the service (for paths under its local root)."""

    def make(service: Service) -> dict[str, Any]:
        body = service.job_body()
        for k, v in changes.items():
            if v is _DROP:
                body.pop(k, None)
            else:
                body[k] = v(service) if callable(v) else v
        return body

    return make


_DROP = object()


def _root(suffix: str) -> Callable[[Service], str]:
    return lambda s: f"{s.local_root}{suffix}"


def _chunked_big() -> Iterator[bytes]:
    yield b'{"model": "' + b"a" * 40_000
    yield b"a" * 40_000 + b'"}'


_GOOD_JSON_PREFIX = b'{"model": "s3://lorp-inputs/alpha/m", "calibration": "corpus:handbook", '

#: >= 40 hostile requests. Every one must be a 4xx with a message.
BAD_REQUESTS: list[Bad] = [
    # missing or wrong-typed fields
    Bad("missing model", _body(model=_DROP), ("body", "model")),
    Bad("missing calibration", _body(calibration=_DROP), ("body", "calibration")),
    Bad("missing budget", _body(budget=_DROP), ("body", "budget")),
    Bad("empty object", lambda s: {}, ("body",)),
    Bad("body is a list", lambda s: [s.job_body()], ("body",)),
    Bad("body is null", raw=b"null", loc=("body",)),
    Bad("model is a number", _body(model=123), ("body", "model")),
    Bad("model is null", _body(model=None), ("body", "model")),
    Bad("model is empty", _body(model=""), ("body", "model")),
    Bad("windows is a string", _body(windows="4"), ("body", "windows")),
    Bad("method is a number", _body(method=1), ("body", "method")),
    Bad("budget is a string", _body(budget="6"), ("body", "budget")),
    Bad("extra field", _body(trust_remote_code=True), ("body", "trust_remote_code")),
    # budgets
    Bad("budget both", _body(budget={"blocks": 1, "fraction": 0.1}), ("body", "budget")),
    Bad("budget empty", _body(budget={}), ("body", "budget")),
    Bad("budget unknown key", _body(budget={"percent": 20}), ("body", "budget")),
    Bad("budget zero", _body(budget={"blocks": 0}), ("body", "budget", "blocks")),
    Bad("budget negative", _body(budget={"blocks": -3}), ("body", "budget", "blocks")),
    Bad("fraction negative", _body(budget={"fraction": -0.5}), ("body", "budget", "fraction")),
    Bad("fraction one", _body(budget={"fraction": 1.0}), ("body", "budget", "fraction")),
    Bad("fraction huge", _body(budget={"fraction": 1e308}), ("body", "budget", "fraction")),
    Bad("blocks huge", _body(budget={"blocks": 10**6}), ("body", "budget", "blocks")),
    Bad("blocks 128-bit", _body(budget={"blocks": 2**128}), ("body", "budget", "blocks")),
    Bad("blocks float", _body(budget={"blocks": 1.5}), ("body", "budget", "blocks")),
    Bad("blocks bool", _body(budget={"blocks": True}), ("body", "budget", "blocks")),
    Bad(
        "fraction NaN",
        raw=_GOOD_JSON_PREFIX + b'"budget": {"fraction": NaN}}',
        loc=("body", "budget", "fraction"),
    ),
    Bad(
        "budget == depth (local)",
        _body(model=lambda s: str(s.model_local), budget={"blocks": 6}),
        ("body",),
    ),
    Bad(
        "budget > depth (local)",
        _body(model=lambda s: str(s.model_local), budget={"blocks": 100}),
        ("body",),
    ),
    # other ranges and enums
    Bad("unknown method", _body(method="magic"), ("body", "method")),
    Bad("method wrong case", _body(method="LoRP"), ("body", "method")),
    Bad("unknown dtype", _body(dtype="int4"), ("body", "dtype")),
    Bad("windows zero", _body(windows=0), ("body", "windows")),
    Bad("seq_len too short", _body(seq_len=4), ("body", "seq_len")),
    Bad("huge seq_len", _body(seq_len=10**9), ("body", "seq_len")),
    Bad("batch_size zero", _body(batch_size=0), ("body", "batch_size")),
    Bad("eval_windows negative", _body(eval_windows=-1), ("body", "eval_windows")),
    Bad("num_clusters zero", _body(num_clusters=0), ("body", "num_clusters")),
    Bad(
        "few reps",
        _body(benchmark={"repetitions": 2}),
        ("body", "benchmark", "repetitions"),
    ),
    Bad("benchmark bad shape", _body(benchmark={"prefill": [[1]]}), ("body", "benchmark")),
    Bad("benchmark huge batch", _body(benchmark={"prefill": [[10**4, 16]]}), ("body", "benchmark")),
    # sources: schemes, traversal, roots, tenants, unsafe weights
    Bad("file url", _body(model="file:///etc/passwd"), ("body", "model")),
    Bad("file url evaluation", _body(evaluation="file:///etc/shadow"), ("body", "evaluation")),
    Bad(
        "metadata url",
        _body(calibration="http://169.254.169.254/latest/meta-data"),
        ("body", "calibration"),
    ),
    Bad(
        "metadata url model",
        _body(model="http://169.254.169.254/latest/meta-data/iam/security-credentials/"),
        ("body", "model"),
    ),
    Bad("https url", _body(model="https://example.com/m.gguf"), ("body", "model")),
    Bad("ip bucket", _body(model="s3://169.254.169.254/latest"), ("body", "model")),
    Bad("dotdot", _body(model=_root("/../../etc")), ("body", "model")),
    Bad("dotdot in s3 key", _body(model="s3://lorp-inputs/alpha/../beta/m"), ("body", "model")),
    Bad("dotdot calibration", _body(calibration=_root("/../x.txt")), ("body", "calibration")),
    Bad("encoded dotdot", _body(model="/%2e%2e/%2e%2e/etc"), ("body", "model")),
    Bad("outside root", _body(calibration="/etc/hostname"), ("body", "calibration")),
    Bad("symlink escape", _body(calibration=_root("/escape")), ("body", "calibration")),
    Bad("link in model folder", _body(model=_root("/linked-model")), ("body", "model")),
    Bad("link beside gguf", _body(model=_root("/linked-gguf/m.gguf")), ("body", "model")),
    Bad("relative", _body(model="models/tiny"), ("body", "model")),
    Bad("hub disabled", _body(model="hf:org/name"), ("body", "model")),
    Bad("unknown corpus", _body(calibration="corpus:nope"), ("body", "calibration")),
    Bad(
        "other tenant prefix",
        _body(model="s3://lorp-artifacts/beta/jobs/x/model"),
        ("body", "model"),
    ),
    Bad("pickle only", _body(model=_root("/pickle-model")), ("body", "model")),
    Bad("pickle file", _body(model=_root("/pickle-model/pytorch_model.bin")), ("body", "model")),
    Bad("bad gguf name", _body(gguf_file="../x.gguf"), ("body", "gguf_file")),
    Bad(
        "gguf_file with a .gguf model",
        _body(model="s3://lorp-inputs/alpha/m.gguf", gguf_file="m.gguf"),
        ("body",),
    ),
    # junk unicode and junk bytes
    Bad("junk unicode", _body(model="s3://b\u0000ad/\ud800"), ("body", "model")),
    Bad("lone surrogate", _body(calibration="corpus:\udc80"), ("body", "calibration")),
    Bad("zero-width corpus", _body(calibration="corpus:hand\u200bbook"), ("body", "calibration")),
    Bad("rtl override method", _body(method="\u202elorp"), ("body", "method")),
    Bad(
        "invalid utf-8",
        raw=_GOOD_JSON_PREFIX + b'"budget": {"blocks": 2}, "x": "\xff\xfe"}',
        status=(400, 422),
    ),
    Bad("not json", raw=b"{not json"),
    Bad("truncated json", raw=_GOOD_JSON_PREFIX[:-3]),
    Bad("deeply nested", raw=b"[" * 20_000 + b"]" * 20_000, loc=None, status=(400, 422)),
    # transport: size, content type, headers
    Bad(
        "oversized body",
        _body(model="s3://lorp-inputs/" + "a" * 200_000),
        loc=None,
        status=(413,),
    ),
    Bad("oversized chunked", raw=_chunked_big, loc=None, status=(413,)),
    Bad(
        "idempotency key with space",
        _body(),
        ("header", "idempotency-key"),
        headers={"Idempotency-Key": "has space"},
    ),
    Bad(
        "idempotency key too long",
        _body(),
        ("header", "idempotency-key"),
        headers={"Idempotency-Key": "k" * 300},
    ),
    Bad("missing API key", _body(), loc=None, status=(401,), drop_key=True),
    Bad("unknown API key", _body(), None, (401,), headers={"X-API-Key": "not-a-key-0000"}),
    Bad("binary API key", _body(), None, (401,), headers={"X-API-Key": b"\xff\xfe-key-1234"}),
]


def make_hostile_files(local_root: Path) -> None:
    """The files under ``local_root`` that :data:`BAD_REQUESTS` point at (idempotent): a link
    out of the root, a folder with pickle weights only, a model folder whose tokenizer links
    out, a GGUF beside such a link."""
    escape = local_root / "escape"
    if not escape.is_symlink():
        escape.symlink_to("/etc/hostname")
    pickle_dir = local_root / "pickle-model"
    pickle_dir.mkdir(exist_ok=True)
    (pickle_dir / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    (pickle_dir / "config.json").write_text("{}")
    linked = local_root / "linked-model"
    linked.mkdir(exist_ok=True)
    (linked / "model.safetensors").write_bytes(b"\0" * 8)
    if not (linked / "tokenizer.json").is_symlink():
        (linked / "tokenizer.json").symlink_to("/etc/hostname")
    gguf_dir = local_root / "linked-gguf"
    gguf_dir.mkdir(exist_ok=True)
    (gguf_dir / "m.gguf").write_bytes(b"GGUF")
    if not (gguf_dir / "tokenizer_config.json").is_symlink():
        (gguf_dir / "tokenizer_config.json").symlink_to("/etc/hostname")
