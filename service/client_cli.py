"""``lorp-jobs``: the command line for the LoRP jobs API.

    lorp-jobs submit --model s3://in/acme/m.gguf --calibration corpus:wiki --blocks 6 --wait
    lorp-jobs status JOB_ID
    lorp-jobs wait JOB_ID --timeout 3600
    lorp-jobs list --state running
    lorp-jobs cancel JOB_ID
    lorp-jobs delete JOB_ID
    lorp-jobs download JOB_ID -o out/

``submit`` has a flag for every option of the job spec (``jobcore.spec.JobCreate``: names, types,
choices and help come from it); an option not given is left to the server's default.
The API URL and key come from ``--url``/``--api-key`` or ``LORP_API_URL``/``LORP_API_KEY``.
Exit codes: 0 ok (``wait``: job succeeded), 1 error (HTTP, network, checksum), 2 usage,
3 job failed, 4 job cancelled, 5 wait timed out, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
import typing
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TextIO

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from jobcore.spec import BenchmarkSpec, Budget, HealSpec, JobCreate, QualityGateSpec
from service.client import (
    Artifact,
    ClientError,
    Job,
    LorpClient,
    WaitTimeoutError,
    overall_fraction,
)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_FAILED = 3
EXIT_CANCELLED = 4
EXIT_TIMEOUT = 5
EXIT_INTERRUPTED = 130

_STATE_EXIT = {"succeeded": EXIT_OK, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}


class UsageError(Exception):
    """Bad command-line input detected after argparse (exit 2)."""


# --------------------------------------------------------------------------------------------
# argument parsing


# ``submit``'s flags are the job spec's options (:class:`jobcore.spec.JobCreate`, which imports
# no torch): ``--<option>`` for each, its type, choices and help from the spec. The objects have
# a flag per field (``--blocks`` / ``--fraction`` for the budget; ``--no-benchmark``). A flag not
# given leaves the option out of the body (or as ``--spec`` has it): the server applies the
# spec's default.

#: Options sent as objects, each with its model (``budget`` has its own flags:
#: :data:`_BUDGET_FLAGS`).
_OBJECTS: dict[str, type[BaseModel]] = {
    "quality_gate": QualityGateSpec,
    "heal": HealSpec,
    "benchmark": BenchmarkSpec,
}
#: Objects whose flags carry the object's name (``--heal-steps``: a bare ``--steps`` says nothing).
_PREFIXED = ("heal",)
#: The budget's flags, one per field of :class:`jobcore.spec.Budget` (mutually exclusive); the
#: quality targets are named so as not to clash with the quality gate's limits.
_BUDGET_FLAGS: dict[str, str] = {
    "blocks": "--blocks",
    "fraction": "--fraction",
    "max_ppl_ratio": "--target-ppl-ratio",
    "min_task_retention": "--target-task-retention",
}
#: Other spellings of a flag (the older or shorter name), by option (``object.field``).
_ALIASES: dict[str, tuple[str, ...]] = {"quality_gate.min_top1_agreement": ("--min-top1",)}


def _pair(text: str) -> list[int]:
    return _ints(text, 2, "BATCHxPROMPT_LEN, e.g. 1x512")


def _triple(text: str) -> list[int]:
    return _ints(text, 3, "BATCHxPROMPT_LENxNEW_TOKENS, e.g. 1x32x128")


def _ints(text: str, n: int, form: str) -> list[int]:
    parts = text.lower().replace(":", "x").replace(",", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {form}, got {text!r}") from None
    if len(values) != n or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected {form} (positive integers), got {text!r}")
    return values


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _is_enum(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, Enum)


def _choice_list(choices: list[str]) -> Callable[[str], list[str]]:
    """A flag value that is one of ``choices`` or a comma list of them."""

    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items or any(t not in choices for t in items):
            raise argparse.ArgumentTypeError(
                f"expected one of {', '.join(choices)} (or a comma list), got {text!r}"
            )
        return items

    return parse


def _flag_type(annotation: Any) -> Any:
    """The option's type without ``None`` and ``Annotated`` (int, float, str, bool, an enum or
    a list of workloads)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _flag_type(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        (inner,) = (a for a in typing.get_args(annotation) if a is not type(None))
        return _flag_type(inner)
    return annotation


def _help(field: FieldInfo) -> str:
    text = field.description or ""
    if field.is_required():
        text += " (required unless in --spec)"
    else:
        default = field.get_default(call_default_factory=True)
        if isinstance(default, Enum):
            default = default.value
        elif isinstance(default, bool):
            default = "on" if default else "off"
        elif isinstance(default, list):
            default = ",".join("x".join(map(str, w)) for w in default)
        text += f" (server default: {'none' if default is None else default})"
    return text.strip().replace("%", "%%")  # argparse formats help with %


def _add_option(p: argparse._ActionsContainer, dest: str, field: FieldInfo) -> None:
    """``--<name>`` for one option of the spec (``dest``: ``option`` or ``object.field``)."""
    obj, _, name = dest.rpartition(".")
    if obj in _PREFIXED:
        name = f"{obj}_{name}"
    flags = [f"--{name.replace('_', '-')}", *_ALIASES.get(dest, ())]
    kind = _flag_type(field.annotation)
    kw: dict[str, Any] = {"dest": dest, "help": _help(field), "default": None}
    if kind is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif isinstance(kind, type) and issubclass(kind, Enum):
        kw["choices"] = [member.value for member in kind]
    elif typing.get_origin(kind) is list and _is_enum(typing.get_args(kind)[0]):
        choices = [member.value for member in typing.get_args(kind)[0]]
        kw.update(
            action="extend", type=_choice_list(choices), metavar="{" + ",".join(choices) + "}"
        )
        kw["help"] = kw["help"].replace(
            " (server default", "; repeat the flag or give a comma list (server default"
        )
    elif typing.get_origin(kind) is list:  # benchmark workloads, one flag per workload
        width = len(typing.get_args(typing.get_args(kind)[0]))
        kw.update(action="append", type=_pair if width == 2 else _triple)
        kw["metavar"] = "BxL" if width == 2 else "BxLxN"
        kw["help"] = kw["help"].replace(" (server default", ", repeat the flag (server default")
    else:
        kw["type"] = kind
        kw["metavar"] = name.upper()
    p.add_argument(*flags, **kw)


def _add_spec_options(p: argparse.ArgumentParser) -> None:
    """One flag per option of the job spec, in the spec's order."""
    for option, field in JobCreate.model_fields.items():
        if option == "budget":
            budget = p.add_mutually_exclusive_group()
            for name, inner in Budget.model_fields.items():
                budget.add_argument(
                    _BUDGET_FLAGS[name],
                    dest=f"budget.{name}",
                    type=_flag_type(inner.annotation),
                    default=None,
                    help=(inner.description or "").replace("%", "%%"),
                )
        elif option in _OBJECTS:
            group = p.add_argument_group(option, field.description)
            for name, inner in _OBJECTS[option].model_fields.items():
                _add_option(group, f"{option}.{name}", inner)
            if option == "benchmark":
                group.add_argument(
                    "--no-benchmark", action="store_true", help="send benchmark: null"
                )
        else:
            _add_option(p, option, field)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorp-jobs",
        description="Submit and follow LoRP depth-pruning jobs on a LoRP service.",
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("LORP_API_URL", "http://127.0.0.1:8000"),
        help="API base URL (env LORP_API_URL; default %(default)s)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("LORP_API_KEY"),
        help="API key sent as X-API-Key (env LORP_API_KEY)",
    )
    parser.add_argument(
        "--http-timeout", type=_positive_float, default=30.0, help="seconds per HTTP request"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("submit", help="submit a job (spec from flags and/or a JSON file)")
    p.add_argument("--spec", help="JSON job spec file ('-' = stdin); flags override its fields")
    _add_spec_options(p)
    p.add_argument("--idempotency-key", help="makes retries of this submission safe")
    p.add_argument("--wait", action="store_true", help="wait for the job, showing progress")
    _add_wait_options(p)
    p.add_argument("--json", action="store_true", help="print the job as JSON")

    p = sub.add_parser("status", help="show a job")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("wait", help="wait for a job to finish, with a progress bar")
    p.add_argument("job_id")
    _add_wait_options(p)
    p.add_argument("--json", action="store_true", help="print the final job as JSON")

    p = sub.add_parser("list", help="list jobs (newest first)")
    p.add_argument("--state", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    p.add_argument("--limit", type=int, default=20, help="page size (default %(default)s)")
    p.add_argument("--cursor", help="next_cursor from a previous page")
    p.add_argument("--all", action="store_true", help="follow every page")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("cancel", help="cancel a queued or running job")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("delete", help="delete a finished job's artifacts and record")
    p.add_argument("job_id")

    p = sub.add_parser("download", help="download and verify every artifact of a succeeded job")
    p.add_argument("job_id")
    p.add_argument("-o", "--out", help="destination directory (default: ./<job_id>)")
    p.add_argument("--quiet", action="store_true")
    return parser


def _add_wait_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=_positive_float, help="give up after this many seconds")
    p.add_argument(
        "--interval", type=_positive_float, default=1.0, help="poll interval (default 1s)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The JSON job spec from ``--spec`` plus flag overrides; UsageError when incomplete."""
    spec: dict[str, Any] = {}
    if args.spec:
        try:
            raw = sys.stdin.read() if args.spec == "-" else Path(args.spec).read_text("utf-8")
            loaded = json.loads(raw)
        except OSError as exc:
            raise UsageError(f"cannot read --spec {args.spec}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise UsageError(f"--spec {args.spec} is not valid JSON: {exc}") from None
        if not isinstance(loaded, dict):
            raise UsageError(f"--spec {args.spec} must hold a JSON object")
        spec.update(loaded)
    for option in JobCreate.model_fields:
        if option == "budget":
            for name in Budget.model_fields:
                if (value := getattr(args, f"budget.{name}")) is not None:
                    spec["budget"] = {name: value}
        elif option in _OBJECTS:
            given = {
                name: value
                for name in _OBJECTS[option].model_fields
                if (value := getattr(args, f"{option}.{name}")) is not None
            }
            if option == "benchmark" and args.no_benchmark:
                if given:
                    raise UsageError("--no-benchmark can't be combined with benchmark options")
                spec["benchmark"] = None
            elif given:  # the flags add to (and override) the object from --spec
                spec[option] = {**(spec.get(option) or {}), **given}
        elif (value := getattr(args, option)) is not None:
            spec[option] = value
    missing = [k for k in ("model", "calibration", "budget") if k not in spec]
    if missing:
        flags = {
            "model": "--model",
            "calibration": "--calibration",
            "budget": "/".join(_BUDGET_FLAGS.values()),
        }
        raise UsageError("missing " + ", ".join(flags[m] for m in missing) + " (or --spec FILE)")
    return spec


# --------------------------------------------------------------------------------------------
# output


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressBar:
    """A one-line text progress bar (redrawn in place on a terminal, one line per change
    otherwise) fed with polled jobs."""

    def __init__(self, stream: TextIO | None = None, width: int = 30) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = time.monotonic()
        self._last_line = ""
        self._drawn = False

    def render(self, job: Job) -> str:
        frac = overall_fraction(job)
        filled = round(frac * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        progress = job.get("progress") or {}
        stage = progress.get("stage") or "-"
        stage_pct = 100 * float(progress.get("fraction") or 0.0)
        message = (progress.get("message") or "").strip()
        state = job.get("state", "?")
        text = f"[{bar}] {100 * frac:5.1f}% {state:<9} {stage} {stage_pct:.0f}%"
        if message:
            text += f"  {message}"
        return text[:160]

    def update(self, job: Job) -> None:
        line = self.render(job)
        elapsed = _fmt_duration(time.monotonic() - self.started)
        if self.tty:
            self.stream.write("\r\x1b[2K" + line + f"  {elapsed}")
            self._drawn = True
        elif line != self._last_line:
            self.stream.write(f"{elapsed} {line}\n")
        self._last_line = line
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def _fmt_float(value: Any, spec: str = ".3f", suffix: str = "") -> str:
    return f"{value:{spec}}{suffix}" if isinstance(value, int | float) else "-"


def format_job(job: Job) -> str:
    """Human-readable multi-line view of a job."""
    progress = job.get("progress") or {}
    lines = [
        f"job       {job.get('id')}",
        f"state     {job.get('state')}"
        + ("  (cancel requested)" if job.get("cancel_requested") else ""),
        f"created   {job.get('created_at')}",
    ]
    if job.get("started_at"):
        lines.append(f"started   {job.get('started_at')}")
    if job.get("finished_at"):
        lines.append(f"finished  {job.get('finished_at')}")
    if job.get("state") in ("queued", "running"):
        lines.append(
            f"progress  {progress.get('stage') or '-'} "
            f"{100 * float(progress.get('fraction') or 0):.0f}%  {progress.get('message') or ''}"
        )
    error = job.get("error")
    if error:
        lines.append(f"error     {error.get('code')}: {error.get('message')}")
    summary = job.get("summary")
    if summary:
        lines.extend(format_summary(summary))
    return "\n".join(lines)


def format_summary(summary: dict[str, Any]) -> list[str]:
    lines = []
    removed = summary.get("removed_blocks")
    if removed is not None:
        lines.append(
            f"removed   {len(removed)} of {summary.get('num_layers', '?')} blocks: {removed}"
            f"  (method {summary.get('method', '?')}, RLS {_fmt_float(summary.get('rls'))}, "
            f"K={summary.get('num_clusters', '-')})"
        )
    if summary.get("prefill_speedup") is not None or summary.get("decode_speedup") is not None:
        lines.append(
            f"speedup   prefill x{_fmt_float(summary.get('prefill_speedup'), '.2f')}  "
            f"decode x{_fmt_float(summary.get('decode_speedup'), '.2f')}"
        )
    for name, value in (summary.get("speedups") or {}).items():
        lines.append(f"          {name}: x{_fmt_float(value, '.2f')}")
    if summary.get("memory_reduction") is not None:
        saved = summary.get("weights_saved_bytes")
        extra = f" ({saved / 2**20:.1f} MiB of weights)" if isinstance(saved, int) else ""
        lines.append(f"memory    -{100 * summary['memory_reduction']:.1f}%{extra}")
    if summary.get("perplexity_before") is not None:
        lines.append(
            f"ppl       {_fmt_float(summary.get('perplexity_before'), '.2f')} -> "
            f"{_fmt_float(summary.get('perplexity_after'), '.2f')}"
            f"  (x{_fmt_float(summary.get('perplexity_ratio'), '.3f')})"
        )
    if summary.get("kl") is not None or summary.get("top1_agreement") is not None:
        top1 = summary.get("top1_agreement")
        pct = 100 * top1 if isinstance(top1, int | float) else None
        lines.append(
            f"quality   KL {_fmt_float(summary.get('kl'), '.4f')} nats/token  "
            f"top-1 agreement {_fmt_float(pct, '.1f', '%')}"
        )
    if summary.get("task_accuracy_before") is not None:
        retention = summary.get("task_retention")
        pct = 100 * retention if isinstance(retention, int | float) else None
        lines.append(
            f"tasks     accuracy {_fmt_float(100 * summary['task_accuracy_before'], '.1f', '%')}"
            f" -> {_fmt_float(100 * (summary.get('task_accuracy_after') or 0), '.1f', '%')}"
            f"  retention {_fmt_float(pct, '.1f', '%')}"
        )
        for name, value in (summary.get("task_retention_by_task") or {}).items():
            share = 100 * value if isinstance(value, int | float) else None
            lines.append(f"          {name}: {_fmt_float(share, '.1f', '%')}")
    gate = summary.get("quality_gate")
    if isinstance(gate, dict):
        verdict = "passed" if gate.get("passed") else "FAILED"
        limits = ", ".join(f"{k} {v:g}" for k, v in (gate.get("limits") or {}).items())
        lines.append(f"gate      {verdict} ({limits or 'no limits'})")
        for violation in gate.get("violations") or []:
            lines.append(f"          {violation}")
    if summary.get("status") == "refused":
        lines.append("status    refused by the quality gate: no checkpoint was published")
    for flag in summary.get("flags") or []:
        lines.append(f"flag      {flag}")
    return lines


def _print_json(obj: Any, out: TextIO) -> None:
    out.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _show(job: Job, as_json: bool, out: TextIO) -> None:
    if as_json:
        _print_json(job, out)
    else:
        out.write(format_job(job) + "\n")


# --------------------------------------------------------------------------------------------
# commands


def _wait(client: LorpClient, job_id: str, args: argparse.Namespace, err: TextIO) -> Job:
    bar = None if args.no_progress else ProgressBar(err)
    on_progress: Callable[[Job], None] | None = bar.update if bar is not None else None
    try:
        return client.wait(
            job_id, timeout=args.timeout, poll_interval=args.interval, on_progress=on_progress
        )
    finally:
        if bar is not None:
            bar.close()


def run(args: argparse.Namespace, client: LorpClient, out: TextIO, err: TextIO) -> int:
    """Execute a parsed command against ``client``; returns the exit code."""
    if args.command == "submit":
        spec = build_spec(args)
        job = client.submit(spec, idempotency_key=args.idempotency_key)
        if not args.wait:
            if args.json:
                _print_json(job, out)
            else:
                out.write(f"{job['id']}\n")
            return EXIT_OK
        err.write(f"submitted {job['id']}\n")
        job = _wait(client, job["id"], args, err)
        _show(job, args.json, out)
        return _STATE_EXIT.get(str(job.get("state")), EXIT_ERROR)

    if args.command == "status":
        job = client.get(args.job_id)
        _show(job, args.json, out)
        return EXIT_OK

    if args.command == "wait":
        job = _wait(client, args.job_id, args, err)
        _show(job, args.json, out)
        return _STATE_EXIT.get(str(job.get("state")), EXIT_ERROR)

    if args.command == "list":
        if args.limit < 1:
            raise UsageError("--limit must be at least 1")
        if args.all:
            jobs = list(client.iter_jobs(state=args.state, page_size=min(args.limit, 100)))
            next_cursor = None
        else:
            page = client.list(state=args.state, limit=args.limit, cursor=args.cursor)
            jobs, next_cursor = page["items"], page.get("next_cursor")
        if args.json:
            _print_json({"items": jobs, "next_cursor": next_cursor}, out)
            return EXIT_OK
        for job in jobs:
            progress = job.get("progress") or {}
            stage = (progress.get("stage") or "") if job.get("state") == "running" else ""
            out.write(
                f"{job['id']}  {job.get('state', '?'):<9}  {job.get('created_at')}  {stage}\n"
            )
        if next_cursor:
            err.write(f"more: --cursor {next_cursor}\n")
        return EXIT_OK

    if args.command == "cancel":
        job = client.cancel(args.job_id)
        if args.json:
            _print_json(job, out)
        else:
            note = " (stops at the next stage boundary)" if job.get("state") == "running" else ""
            out.write(f"{job['id']} {job.get('state')}{note}\n")
        return EXIT_OK

    if args.command == "delete":
        client.delete(args.job_id)
        out.write(f"{args.job_id} deleted\n")
        return EXIT_OK

    if args.command == "download":
        dest = Path(args.out) if args.out else Path(args.job_id)

        def on_file(artifact: Artifact, path: Path) -> None:
            if not args.quiet:
                err.write(f"  {artifact['size']:>12,d}  {path}  sha256 ok\n")

        paths = client.download(args.job_id, dest, on_file=on_file)
        out.write(f"{len(paths)} files verified in {dest}\n")
        return EXIT_OK

    raise UsageError(f"unknown command {args.command!r}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out, err = sys.stdout, sys.stderr
    if not args.api_key:
        parser.error("no API key: pass --api-key or set LORP_API_KEY")
    try:
        with LorpClient(args.url, args.api_key, timeout=args.http_timeout) as client:
            return run(args, client, out, err)
    except UsageError as exc:
        err.write(f"lorp-jobs: error: {exc}\n")
        return EXIT_USAGE
    except WaitTimeoutError as exc:
        err.write(f"lorp-jobs: timeout: {exc}\n")
        return EXIT_TIMEOUT
    except ClientError as exc:
        err.write(f"lorp-jobs: error: {exc}\n")
        return EXIT_ERROR
    except OSError as exc:
        err.write(f"lorp-jobs: error: {exc}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        err.write("lorp-jobs: interrupted\n")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
