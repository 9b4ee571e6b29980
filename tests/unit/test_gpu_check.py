"""benchmarks/gpu/check.py end to end at its tiny scale on CPU: the same steps the H200 run
takes (random bf16 Qwen3-shaped model saved as safetensors, lorp / auto / lorp-fold through the
pipeline, the benchmark, save -> reload -> generate), one JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks.gpu import check


def test_tiny_scale_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "check.json"
    argv = ["--scale", "tiny", "--device", "cpu", "--out", str(out), "--work-dir", str(tmp_path)]
    assert check.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["versions"]["torch"] and data["versions"]["transformers"]
    entry = data["models"]["qwen3-tiny"]
    depth = entry["config"]["num_hidden_layers"]
    assert entry["parameters"] > 0 and entry["safetensors_bytes"] > 0 and entry["skipped"] == []
    runs = {run["method"]: run for run in entry["runs"]}
    assert list(runs) == list(check.METHODS)
    for method, run in runs.items():
        assert run["dtype"] == "bfloat16"
        assert len(run["removed"]) == 2 and run["num_layers_before"] == depth  # 25 % of 8
        assert {"loading", "calibration", "selection", "evaluation", "saving"} <= set(
            run["stages_s"]
        )
        q = run["quality"]
        assert math.isfinite(q["ppl_dense"]) and math.isfinite(q["ppl_pruned"])
        reload = run["reload"]
        assert reload["num_layers"] == depth - 2
        assert reload["generated_tokens"] == check.RUN_SETTINGS["tiny"]["generate_tokens"]
        # the checkpoint reloads with the logits the pruned model had in memory
        assert reload["logits_max_abs_diff"] <= 1e-2 * reload["logits_scale"], method
        assert run["peak_rss_bytes"] > 0 and run["peak_device_bytes"] is None
    assert set(runs["lorp"]["speedups"]) == {"prefill_b1_t32", "decode_b1_p8_n4"}
    assert "speedups" not in runs["auto"]  # the benchmark runs once per model
    assert {"compensation", "temperature"} <= set(runs["lorp-fold"]["stages_s"])
    assert runs["lorp-fold"]["selection_method"] == "lorp-loss"
    table = capsys.readouterr().out
    assert "qwen3-tiny" in table and "lorp-fold" in table
    assert not any(p.name.startswith("lorp-gpu-check-") for p in tmp_path.iterdir())  # cleaned


def test_cuda_refused_without_a_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check.torch.cuda, "is_available", lambda: False)
    assert check.main(["--device", "cuda"]) == 2
