"""GGUF in -> GGUF out through REST on the real stack: a job whose model is a GGUF file publishes
a pruned GGUF (by default: the input's format) with its model card, and the report says what was
written and which dtype was used."""

from __future__ import annotations

import httpx
import pytest
import yaml
from gguf import GGUFReader

from tests.integration.conftest import Service
from tests.tiny_gguf import DEPTH, write_tiny_gguf

pytestmark = pytest.mark.integration


def test_a_gguf_job_publishes_a_pruned_gguf(
    service: Service, client_a: httpx.Client, tmp_path_factory: pytest.TempPathFactory
) -> None:
    folder = service.local_root / "tiny-gguf"
    folder.mkdir(exist_ok=True)
    src = write_tiny_gguf(folder / "tiny-llama.Q8_0.gguf")
    body = {
        "model": str(src),
        "calibration": "corpus:handbook",
        "budget": {"blocks": 1},
        "windows": 4,
        "seq_len": 32,
        "holdout_windows": 2,
    }
    resp = client_a.post("/jobs", json=body)
    assert resp.status_code == 202, resp.text
    assert resp.json()["spec"]["dtype"] == "auto"
    job = service.wait(client_a, resp.json()["id"])
    assert job["state"] == "succeeded", job

    items = {a["name"]: a for a in client_a.get(f"/jobs/{job['id']}/artifacts").json()["items"]}
    assert {"model/tiny-llama.Q8_0.gguf", "model/README.md"} <= set(items)
    assert not any(name.endswith(".safetensors") for name in items)
    out = tmp_path_factory.mktemp("download")
    gguf = out / "pruned.gguf"
    gguf.write_bytes(httpx.get(items["model/tiny-llama.Q8_0.gguf"]["url"], timeout=30).content)
    assert GGUFReader(gguf).fields["llama.block_count"].contents() == DEPTH - 1
    assert gguf.stat().st_size < src.stat().st_size

    report = client_a.get(f"/jobs/{job['id']}/report").raise_for_status().json()
    written = report["artifacts"]["gguf"]
    assert written["bytes_out"] == gguf.stat().st_size
    assert written["bytes_in"] == src.stat().st_size
    assert written["source"] == str(src) and written["path"] == "model/tiny-llama.Q8_0.gguf"
    assert (report["model"]["dtype"], report["model"]["dtype_source"]) == (
        "float32",
        "GGUF on cpu",
    )
    assert report["model"]["name"] == "tiny-llama.Q8_0"
    card = httpx.get(items["model/README.md"]["url"], timeout=30).text
    front = yaml.safe_load(card[4:].partition("\n---\n")[0])
    assert front["base_model"] == str(src) and "lorp" in front["tags"]
    assert f"LoRP service job {job['id']}" in card
    assert "/work/" not in card and "/inputs/" not in card  # no worker path
