"""The demo path through REST on the real bundled SmolLM2-135M: a private stack (redis-server,
SeaweedFS with credentials, uvicorn, a prefork Celery worker), the GGUF and the shared texts
uploaded to S3, a job submitted with the Python client, progress followed to the end, every
artifact downloaded and verified, and the pruned checkpoint loaded in a fresh process with plain
transformers that generates text."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack import LocalStack
from lorp.loading import bundled_model_path
from service.client import STAGES, Job, LorpClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
CALIBRATION = SHARED_DATA / "calibration" / "debian-handbook.en.txt"
EVALUATION = SHARED_DATA / "eval" / "debian-reference.en.txt"
INPUTS = "lorp-inputs"
TENANT = "e2e"
KEY = "e2e-key-0123456789abcdef"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    gguf = bundled_model_path()
    with LocalStack(
        tmp_path_factory.mktemp("e2e-stack"),
        extra_buckets=[INPUTS],
        api_keys={KEY: TENANT},
        worker_env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    ) as st:
        s3 = st.s3_client()
        s3.upload_file(str(gguf), INPUTS, f"{TENANT}/models/{gguf.name}")
        s3.upload_file(str(CALIBRATION), INPUTS, f"{TENANT}/texts/calibration.txt")
        s3.upload_file(str(EVALUATION), INPUTS, f"{TENANT}/texts/evaluation.txt")
        yield st


def test_smollm2_job_end_to_end(stack: LocalStack, tmp_path: Path) -> None:
    gguf = bundled_model_path()
    client = LorpClient(stack.api_url, KEY)
    spec = {
        "model": f"s3://{INPUTS}/{TENANT}/models/{gguf.name}",
        "calibration": f"s3://{INPUTS}/{TENANT}/texts/calibration.txt",
        "evaluation": f"s3://{INPUTS}/{TENANT}/texts/evaluation.txt",
        "method": "lorp",
        "budget": {"blocks": 3},
        "windows": 4,
        "seq_len": 128,
        "eval_windows": 4,
        "benchmark": {"prefill": [[1, 64]], "decode": [[1, 8, 8]], "warmup": 1, "repetitions": 10},
    }
    job = client.submit(spec, idempotency_key="e2e-smollm2-1")
    assert job["state"] == "queued"
    assert client.submit(spec, idempotency_key="e2e-smollm2-1")["id"] == job["id"]
    stages: list[str] = []
    states: list[str] = []

    def seen(j: Job) -> None:
        stage = (j.get("progress") or {}).get("stage")
        if not states or states[-1] != j["state"]:
            states.append(j["state"])
        if stage and (not stages or stages[-1] != stage):
            stages.append(stage)

    done = client.wait(job["id"], timeout=900, poll_interval=0.5, on_progress=seen)
    assert done["state"] == "succeeded", done
    assert states[0] in ("queued", "running") and states[-1] == "succeeded"
    # polling every 0.5 s sees the long stages; a stage of a few milliseconds (LoRP's selection)
    # can fall between two polls, so every stage's run is checked in the report's timings below
    assert "calibration" in stages and "saving" in stages, stages
    known = [s for s in stages if s in STAGES]
    assert known == sorted(known, key=STAGES.index), stages

    summary = done.get("summary") or {}
    assert len(summary["removed_blocks"]) == 3
    assert all(0 < i < 29 for i in summary["removed_blocks"])

    out = tmp_path / "download"
    files = client.download(job["id"], out)
    names = {Path(f).name for f in files}
    assert {"report.json", "report.html", "heatmap.png", "similarity.npy", "manifest.json"} <= names
    report = json.loads((out / "report.json").read_text())
    assert report["selection"]["removed"] == summary["removed_blocks"]
    ran = set(report["timings_s"])
    assert {"calibration", "selection", "evaluation", "benchmark", "pruning"} <= ran, ran
    assert report["model"]["num_layers"] == 30 and report["model"]["num_layers_after"] == 27
    assert report["quality"]["dense"]["ppl"] > 1 and report["quality"]["pruned"]["ppl"] > 1

    # a GGUF input comes back as a GGUF of the same quantization, smaller than the input
    (pruned,) = out.rglob("*.gguf")
    assert pruned.name == gguf.name and pruned.stat().st_size < 0.95 * gguf.stat().st_size
    assert report["artifacts"]["gguf"]["requantized"] == []  # no fold: every tensor copied
    model_dir = pruned.parent
    script = textwrap.dedent(
        f"""
        import json, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        kw = dict(gguf_file={pruned.name!r})
        tok = AutoTokenizer.from_pretrained({str(model_dir)!r}, **kw)
        model = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, **kw)
        ids = tok("The capital of France is", return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
        print(json.dumps({{"layers": len(model.model.layers),
                          "config_layers": model.config.num_hidden_layers,
                          "new_tokens": int(out.shape[1] - ids.shape[1]),
                          "text": tok.decode(out[0, ids.shape[1]:])}}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["layers"] == result["config_layers"] == 27
    assert result["new_tokens"] == 8 and result["text"].strip()


def test_smollm2_quality_target_job(stack: LocalStack, tmp_path: Path) -> None:
    """Done-means of issue 23 item 5: a job with ``budget: {"max_ppl_ratio": 1.5}`` on the
    bundled model returns a depth, the quality-vs-depth curve (report and plot), and a checkpoint
    whose perplexity on the evaluation text, measured in a fresh process from the downloaded
    GGUF, is within 1.5x the dense model's."""
    gguf = bundled_model_path()
    client = LorpClient(stack.api_url, KEY)
    spec = {
        "model": f"s3://{INPUTS}/{TENANT}/models/{gguf.name}",
        "calibration": f"s3://{INPUTS}/{TENANT}/texts/calibration.txt",
        "evaluation": f"s3://{INPUTS}/{TENANT}/texts/evaluation.txt",
        "method": "lorp",
        "budget": {"max_ppl_ratio": 1.5},
        "windows": 4,
        "seq_len": 128,
        "holdout_windows": 2,
        "eval_windows": 4,
    }
    job = client.submit(spec)
    done = client.wait(job["id"], timeout=900, poll_interval=0.5)
    assert done["state"] == "succeeded", done
    summary = done.get("summary") or {}
    depth = summary["target_depth"]
    assert summary["quality_target"] == {"max_ppl_ratio": 1.5}
    assert summary["target_confirmed"] is True
    assert depth >= 1 and len(summary["removed_blocks"]) == depth
    assert summary["perplexity_ratio"] <= 1.5

    out = tmp_path / "download"
    files = client.download(job["id"], out)
    assert "depth.png" in {Path(f).name for f in files}
    report = json.loads((out / "report.json").read_text())
    search = report["depth_search"]
    assert search["final"] == depth and search["target"] == {"max_ppl_ratio": 1.5}
    curve = search["curve"]
    assert [p["num_remove"] for p in curve] == list(range(1, len(curve) + 1))
    assert all(p["met"] for p in curve[: search["chosen"]])
    assert search["data"]["kind"] == "held-out calibration windows"
    assert search["confirmations"][-1]["data"]["kind"] == "evaluation text"
    assert report["budget"]["requested"] == {"max_ppl_ratio": 1.5}

    (pruned,) = out.rglob("*.gguf")
    script = textwrap.dedent(
        f"""
        import json
        from lorp.data import text_windows
        from lorp.loading import load_model
        from lorp.quality import perplexity
        loaded = load_model({str(pruned.parent)!r}, device="cpu", dtype="float32")
        windows = text_windows(loaded.tokenizer, {str(EVALUATION)!r}, 128, 4)
        print(json.dumps({{"layers": len(loaded.model.model.layers),
                          "ppl": perplexity(loaded.model, windows).ppl}}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["layers"] == 30 - depth
    dense = report["quality"]["dense"]["ppl"]
    assert result["ppl"] / dense <= 1.5
    assert result["ppl"] == pytest.approx(report["quality"]["pruned"]["ppl"], rel=1e-3)
