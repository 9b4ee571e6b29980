"""The issue #7 quality benchmark harness (benchmarks/quality) end to end on a tiny random model."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from benchmarks.quality import headroom, report, run
from benchmarks.quality.models import MODELS, ModelSpec
from lorp.compensation import (
    apply_compensation,
    compensated_view,
    fit_compensation,
    tune_strength,
)
from lorp.data import text_windows
from lorp.loading import load_model
from lorp.methods import method_names
from lorp.quality import perplexity
from lorp.surgery import pruned_view, remove_blocks
from lorp.temperature import fit_temperature, temperature_view

OTHER_TEXT = "".join(f"Entry {i}: pack my box with five dozen liquor jugs!\n" for i in range(300))


def _spec(tiny_dir: Path) -> ModelSpec:
    return ModelSpec(
        key="tiny",
        name="tiny random Llama",
        depth=6,
        packages=(),
        pip_args=(),
        locate=lambda _cache: tiny_dir,
    )


def _prefix(method: str) -> str:
    """Where a corrected method's evaluation is stored (report.FIT_KEY, report.TEMP_KEY, ...)."""
    for suffix, prefix in report.CORRECTIONS.items():
        if method.endswith(suffix):
            return prefix
    return ""


def _never_loaded(_cache: Path) -> Path:
    raise AssertionError("the model must not be loaded when every result is stored")


def _argv(out: Path, text_file: Path, heldout: Path, *extra: str) -> list[str]:
    return [
        "--models=tiny",
        "--fractions=0.2,0.4",
        "--calib-windows=4",
        "--seq-len=32",
        "--score-windows=2",
        "--score-seq-len=16",
        "--eval-windows=3",
        "--eval-seq-len=24",
        f"--calibration={text_file}",
        f"--wikitext={text_file}",
        f"--heldout={heldout}",
        f"--out-dir={out}",
        f"--cache-dir={out.parent / 'cache'}",
        "--fit-windows=3",
        "--tune-windows=1",
        *extra,
    ]


def test_budgets_follow_the_issue() -> None:
    fractions = (0.1, 0.2, 0.3)
    assert [run.budgets_for(MODELS[k].depth, fractions) for k in MODELS] == [
        [3, 6, 9],
        [2, 4, 5],
        [2, 5, 7],
    ]
    assert run.budgets_for(6, (0.01, 0.9)) == [1, 4]  # clamped to 1..N-2


def test_end_to_end_resume_and_report(tmp_path: Path, tiny_dir: Path, text_file: Path) -> None:
    heldout = tmp_path / "heldout.txt"
    heldout.write_text(OTHER_TEXT)
    out = tmp_path / "out"
    argv = _argv(out, text_file, heldout)

    assert run.main(argv, registry={"tiny": _spec(tiny_dir)}) == 0

    data = json.loads((out / "tiny.json").read_text())
    # by default: every selection method of the library's registry in its order (lorp-fold, a
    # fold, is measured as lorp-loss+tfit+temp), then these corrected variants in this order
    methods = list(method_names(fold=False))
    assert methods[:7] == ["lorp", "shortgpt", "streamline", "sleb", "lorp-kl", "lorp-loss", "auto"]
    assert "lorp-fold" not in methods
    expected = [
        *methods,
        "lorp+fit",
        "shortgpt+fit",
        "streamline+fit",
        "sleb+fit",
        "lorp-loss+fit",
        "streamline+tfit",
        "lorp-loss+tfit",
        "lorp-loss+tfit+temp",
        "streamline+temp",
        "lorp-loss+temp",
    ]
    assert list(data["selections"]) == expected
    assert data["skipped"] == {}
    assert data["errors"] == {}
    assert data["budgets"] == {"1": pytest.approx(1 / 6), "2": pytest.approx(2 / 6)}
    assert data["calibration"]["windows"] == 4 and data["calibration"]["seq_len"] == 32
    assert {m: s["windows"] for m, s in data["scoring"].items()} == {
        m: 2 for m in method_names(needs_model=True, fold=False)
    }
    assert data["evaluation"]["wikitext2"]["windows"] == 3
    assert data["evaluation"]["heldout"]["predictions"] == 3 * 23
    assert len(data["similarity"]) == 6

    # every (method, budget) selected and evaluated; time = capture + own (not SLEB)
    rows = {(r["method"], r["num_remove"]): r for r in data["results"]}
    assert set(rows) == {(m, k) for m in expected for k in (1, 2)}
    for (method, k), row in rows.items():
        assert len(row["removed"]) == k and all(1 <= b <= 4 for b in row["removed"])
        for text in ("wikitext2", "heldout"):
            assert row[f"{text}_ppl"] > 1.0
            assert 0.0 <= row[f"{text}_top1"] <= 1.0
        entry = data["selections"][method][str(k)]
        base = report.base_of(method)
        if base is not None:  # base's selection and time + the fit's
            below = data["selections"][base][str(k)]
            assert entry["removed"] == below["removed"] and entry["fit_s"] > 0
            assert entry["time_s"] == pytest.approx(below["time_s"] + entry["fit_s"])
            assert entry["eval_key"] == _prefix(method) + ",".join(map(str, entry["removed"]))
        elif method == "sleb":
            assert entry["time_s"] == entry["own_s"]
        else:
            assert entry["time_s"] == pytest.approx(data["capture_s"] + entry["own_s"])
    assert rows[("lorp", 2)]["time_vs_lorp"] == pytest.approx(1.0)

    # SLEB: one run at k=2, k=1 is its first step
    sleb = data["selections"]["sleb"]
    order = sleb["2"]["selection"]["details"]["removal_order"]
    assert sleb["1"]["removed"] == [order[0]] and sleb["1"]["from_run_k"] == 2
    assert sleb["1"]["time_s"] <= sleb["2"]["time_s"]
    assert "first k removals" in sleb["1"]["note"]

    # identical removal sets evaluated once; the dense model agrees with itself
    distinct = {_prefix(r["method"]) + ",".join(map(str, r["removed"])) for r in data["results"]}
    assert set(data["evaluations"]) == distinct | {""}
    for text in ("wikitext2", "heldout"):
        assert data["evaluations"][""][text]["top1_agreement"] == 1.0

    # the stored perplexity is the pruned model's perplexity on those windows
    loaded = load_model(tiny_dir, device="cpu")
    removed = rows[("lorp", 2)]["removed"]
    windows = text_windows(loaded.tokenizer, heldout, 24, 3)
    with pruned_view(loaded.model, removed):
        ref = perplexity(loaded.model, windows)
    assert rows[("lorp", 2)]["heldout_ppl"] == pytest.approx(ref.ppl, rel=1e-4)
    assert data["evaluations"][""]["heldout"]["ppl"] == pytest.approx(
        perplexity(loaded.model, windows).ppl, rel=1e-4
    )
    # ... a +temp one's is the pruned model's with the logit scale fitted on the last
    # --temp-windows (4) calibration windows
    calib = text_windows(loaded.tokenizer, text_file, 32, 4)
    scaled = rows[("lorp-loss+temp", 2)]
    with pruned_view(loaded.model, scaled["removed"]):
        scale = fit_temperature(loaded.model, calib).scale
        with temperature_view(loaded.model, scale):
            assert scaled["heldout_ppl"] == pytest.approx(
                perplexity(loaded.model, windows).ppl, rel=1e-4
            )
        assert scaled["heldout_ppl"] != pytest.approx(perplexity(loaded.model, windows).ppl)
    # ... a +tfit one's has the strength chosen on calibration window 4 (after the 3 fit
    # windows), and +tfit+temp adds the logit scale fitted on the folded, pruned model
    tfit = rows[("lorp-loss+tfit", 2)]
    comp = fit_compensation(loaded.model, tfit["removed"], calib[:3])
    tuned = tune_strength(loaded.model, comp, calib[3:])
    stored = data["selections"]["lorp-loss+tfit"]["2"]["compensation"]
    assert stored["strength"] == tuned.strength and stored["tuning"]["windows"] == 1
    with compensated_view(loaded.model, tuned), pruned_view(loaded.model, tfit["removed"]):
        assert tfit["heldout_ppl"] == pytest.approx(perplexity(loaded.model, windows).ppl, rel=1e-4)
        scale = fit_temperature(loaded.model, calib).scale
        with temperature_view(loaded.model, scale):
            both = perplexity(loaded.model, windows).ppl
    assert rows[("lorp-loss+tfit+temp", 2)]["heldout_ppl"] == pytest.approx(both, rel=1e-4)
    stored = data["selections"]["lorp-loss+tfit+temp"]["2"]["compensation"]
    assert stored["temperature"]["scale"] == pytest.approx(scale)
    assert stored["strength"] == tuned.strength
    # ... and a compensated one's is the folded, pruned checkpoint's (fit on the first 3
    # calibration windows, --fit-windows), not the plain pruned model's
    fitted = rows[("lorp-loss+fit", 2)]
    apply_compensation(loaded.model, fit_compensation(loaded.model, fitted["removed"], calib[:3]))
    remove_blocks(loaded.model, fitted["removed"])
    folded = perplexity(loaded.model, windows).ppl
    assert fitted["heldout_ppl"] == pytest.approx(folded, rel=1e-4)
    assert fitted["heldout_ppl"] != pytest.approx(rows[("lorp-loss", 2)]["heldout_ppl"], rel=1e-4)

    # tables and plots
    md = (out / "tiny.md").read_text()
    assert "k=1 WT2 ppl" in md and "k=2 time s" in md
    for method in expected:
        assert f"| {method} " in md
    assert len(re.findall(r"\*\*\d+\.\d+\*\*", md)) >= 4  # best ppl per budget and text
    summary = (out / "summary.md").read_text()
    assert "lorp-loss" in summary and "| tiny " in summary
    for name in ("quality.png", "selection_time.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = json.loads((out / "run_log.json").read_text())
    assert len(log) == 1 and log[0]["wall_s"] > 0 and set(log[0]["per_model_s"]) == {"tiny"}

    # a re-run finds everything done and does not even load the model
    stored = (out / "tiny.json").read_text()
    never = ModelSpec("tiny", "tiny random Llama", 6, (), (), _never_loaded)
    assert run.main(argv, registry={"tiny": never}) == 0
    again = json.loads((out / "tiny.json").read_text())
    assert again["selections"] == data["selections"] and len(again["runs"]) == 1
    assert json.loads(stored)["evaluations"] == again["evaluations"]

    # report-only regenerates the outputs from the JSON, with a model still in progress beside
    # it (selected, nothing evaluated: shown as pending, no plotting warning -> pytest error)
    partial = {**data, "model": {**data["model"], "key": "partial"}, "evaluations": {}}
    partial["runs"] = [{**data["runs"][-1], "note": "A hand-written note on that run."}]
    (out / "partial.json").write_text(json.dumps(partial))
    for name in ("tiny.md", "summary.md", "quality.png", "selection_time.png"):
        (out / name).unlink()
    assert run.main([*argv, "--report-only"], registry={"tiny": never}) == 0
    assert (out / "tiny.md").read_text() == md
    assert (out / "quality.png").stat().st_size > 10_000
    pending = (out / "partial.md").read_text()
    assert re.search(r"\| lorp +\| – +\| – ", pending) and not re.search(r"\*\*\d", pending)
    assert "| partial " in (out / "summary.md").read_text()
    assert pending.count("A hand-written note on that run.") == 1
    assert "hand-written" not in md  # only the run that carries a note

    # a search method computed in a later process is timed against that process's capture
    redo = json.loads((out / "tiny.json").read_text())
    redo["selections"].pop("auto")
    (out / "tiny.json").write_text(json.dumps(redo))
    assert run.main([*argv, "--methods=auto"], registry={"tiny": _spec(tiny_dir)}) == 0
    redone = json.loads((out / "tiny.json").read_text())
    (retimed,) = redone["capture_retimed"]
    assert retimed["capture_s"] > 0 and retimed["max_abs_diff_vs_stored_s"] < 1e-5
    assert redone["capture_s"] == data["capture_s"]  # the stored S and its time stay
    rows = {(r["method"], r["num_remove"]): r for r in report.results(redone)}
    for k, entry in redone["selections"]["auto"].items():
        assert entry["capture_s"] == retimed["capture_s"]
        assert entry["time_s"] == pytest.approx(entry["capture_s"] + entry["own_s"])
        lorp_time = entry["capture_s"] + redone["selections"]["lorp"][k]["own_s"]
        assert rows[("auto", int(k))]["time_vs_lorp"] == pytest.approx(entry["time_s"] / lorp_time)
    assert "Capture re-timed in later runs" in (out / "tiny.md").read_text()

    # a different protocol is refused instead of mixed with the stored numbers
    changed = _argv(out, text_file, heldout, "--eval-windows=2")
    with pytest.raises(SystemExit, match="different protocol"):
        run.main(changed, registry={"tiny": never})


def test_headroom_measures_every_single_swap_neighbour(
    tmp_path: Path, tiny_dir: Path, text_file: Path
) -> None:
    assert headroom.neighbours((2, 3), 6) == [(1, 2), (1, 3), (2, 4), (3, 4)]
    many = headroom.neighbours((3, 4, 5), 10)
    assert len(many) == 3 * 5  # each of 3 out, each of the 5 free interior blocks in
    assert all(len(set(m) & {3, 4, 5}) == 2 and 0 not in m and 9 not in m for m in many)

    spec = _spec(tiny_dir)
    texts = {"wikitext2": text_file, "heldout": text_file}
    shape = {"windows": 2, "seq_len": 24}
    bench: dict = {"evaluation": {n: shape for n in texts}, "evaluations": {}}
    case = headroom.run_case(
        spec, (2, 3), 2, 2, tmp_path, bench=bench, calibration=text_file, texts=texts,
        seq_len=16, skip_windows=1,
    )  # fmt: skip
    loaded = load_model(tiny_dir)
    calib = text_windows(loaded.tokenizer, text_file, 16, 2, skip_windows=1)
    evaluation = text_windows(loaded.tokenizer, text_file, 24, 2)

    def nll(removed: list[int], windows: object) -> float:
        with pruned_view(loaded.model, removed):
            return perplexity(loaded.model, windows).nll

    assert case["neighbours"] == 4 and len(case["calib_nll"]) == 5
    for key, value in case["calib_nll"].items():
        assert value == pytest.approx(nll([int(b) for b in key.split(",")], calib), rel=1e-5)
    evaluated = case["evaluated"]
    assert evaluated[0]["removed"] == [2, 3] and len(evaluated) == 3
    assert evaluated[1]["calib_nll"] <= evaluated[2]["calib_nll"]  # the lowest neighbours
    others = [v for key, v in case["calib_nll"].items() if key != "2,3"]
    assert evaluated[1]["calib_nll"] == min(others)
    for e in evaluated:
        assert e["heldout_ppl"] == pytest.approx(math.exp(nll(e["removed"], evaluation)), 1e-5)
    lower = [v for v in others if v < case["centre_nll"]]
    assert len(case["neighbours_lower_nll"]) == len(lower)
    assert "beats centre" in headroom.render([case])

    # the centre is checked against the benchmark's own numbers
    bench["evaluations"]["2,3"] = {"heldout": {"ppl": evaluated[0]["heldout_ppl"] * 1.01}}
    with pytest.raises(SystemExit, match="benchmark"):
        headroom.run_case(
            spec, (2, 3), 2, 1, tmp_path, bench=bench, calibration=text_file, texts=texts,
            seq_len=16, skip_windows=1,
        )  # fmt: skip
