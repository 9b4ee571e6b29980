"""The `lorp` command line: the documented forms, JSON output, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from lorp.cli import main
from tests.tiny_models import TINY_TEXT, tiny_tokenizer

TEXT = TINY_TEXT


def hand_matrix(n: int = 8) -> np.ndarray:
    idx = np.arange(n)
    return 0.9 ** np.abs(idx[:, None] - idx[None, :])


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse usage errors and --help
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_select_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = tmp_path / "s.npy"
    np.save(s, hand_matrix())
    code, out, _ = run(capsys, "select", "--similarity", str(s), "--remove", "3", "--json")
    assert code == 0
    data = json.loads(out)
    assert set(data) == {"method", "num_layers", "removed", "rls", "num_clusters", "labels"}
    assert data["num_layers"] == 8 and len(data["removed"]) == 3
    assert 0 not in data["removed"] and 7 not in data["removed"]
    code, out, _ = run(
        capsys,
        "select",
        "--similarity",
        str(s),
        "--remove",
        "2",
        "--method",
        "streamline",
        "--json",
    )
    assert code == 0 and json.loads(out)["labels"] is None


def _bad_matrices(tmp_path: Path) -> dict[str, Path]:
    cases = {
        "nonsquare": np.ones((4, 5)),
        "asymmetric": hand_matrix() + np.triu(np.full((8, 8), 0.05), 1),
        "nan": np.where(np.eye(8, k=1) > 0, np.nan, hand_matrix()),
    }
    paths = {}
    for name, m in cases.items():
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], m)
    paths["notnumpy"] = tmp_path / "junk.npy"
    paths["notnumpy"].write_text("not a matrix")
    return paths


def test_select_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.npy"
    np.save(good, hand_matrix())
    bad = _bad_matrices(tmp_path)
    cases = [
        (["--similarity", str(tmp_path / "missing.npy"), "--remove", "2"], "not found"),
        (["--similarity", str(bad["nonsquare"]), "--remove", "2"], "square"),
        (["--similarity", str(bad["asymmetric"]), "--remove", "2"], "symmetric"),
        (["--similarity", str(bad["nan"]), "--remove", "2"], "finite"),
        (["--similarity", str(bad["notnumpy"]), "--remove", "2"], ".npy"),
        (["--similarity", str(good), "--remove", "7"], "budget"),
        (["--similarity", str(good), "--remove", "0"], "budget"),
        (["--similarity", str(good), "--remove", "2", "--method", "magic"], "invalid choice"),
        (["--similarity", str(good), "--remove", "abc"], "not a block count"),
    ]
    for argv, needle in cases:
        code, out, err = run(capsys, "select", *argv)
        assert code != 0, argv
        assert out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert needle.lower() in err.lower(), (argv, err)
        assert "Traceback" not in err


def test_help_for_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in (["similarity"], ["select"], ["prune"], ["eval", "ppl"], ["bench"], []):
        code, out, _ = run(capsys, *cmd, "--help")
        assert code == 0 and "usage:" in out


def test_similarity_prune_eval_end_to_end(
    tmp_path: Path, tiny_dir: Path, text_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s_path = tmp_path / "s.npy"
    code, _, err = run(
        capsys,
        "similarity",
        "--model",
        str(tiny_dir),
        "--calibration",
        str(text_file),
        "--windows",
        "4",
        "--seq-len",
        "32",
        "--out",
        str(s_path),
        "--quiet",
    )
    assert code == 0, err
    s = np.load(s_path)
    assert s.shape == (6, 6) and np.allclose(s, s.T)

    out_dir = tmp_path / "pruned"
    code, out, err = run(
        capsys,
        "prune",
        "--model",
        str(tiny_dir),
        "--calibration",
        str(text_file),
        "--remove",
        "2",
        "--windows",
        "4",
        "--seq-len",
        "32",
        "--eval",
        str(text_file),
        "--eval-windows",
        "2",
        "--eval-seq-len",
        "32",
        "--no-bench",
        "--out",
        str(out_dir),
        "--quiet",
        "--json",
    )
    assert code == 0, err
    summary = json.loads(out)
    removed = summary["removed"]
    assert len(removed) == 2 and 0 not in removed and 5 not in removed
    report = json.loads((out_dir / "report.json").read_text())
    assert report["selection"]["removed"] == removed
    # the same selection as `lorp select` on the captured matrix (same windows)
    code, out, _ = run(
        capsys, "select", "--similarity", str(out_dir / "similarity.npy"), "--remove", "2", "--json"
    )
    assert json.loads(out)["removed"] == removed
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir / "model")
    assert len(reloaded.model.layers) == 4 and reloaded.config.num_hidden_layers == 4
    with torch.no_grad():
        reloaded.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)

    code, out, err = run(
        capsys,
        "eval",
        "ppl",
        "--model",
        str(out_dir / "model"),
        "--text",
        str(text_file),
        "--seq-len",
        "32",
        "--windows",
        "2",
        "--json",
        "--quiet",
    )
    assert code == 0, err
    ppl = json.loads(out)
    assert ppl["tokens"] == 2 * 31 and ppl["ppl"] > 1


def test_model_errors_are_one_line(
    tmp_path: Path, tiny_dir: Path, text_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import BertConfig, BertLMHeadModel

    bert = tmp_path / "bert"
    BertLMHeadModel(
        BertConfig(
            vocab_size=128,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            is_decoder=True,
        )
    ).save_pretrained(bert)
    tiny_tokenizer().save_pretrained(bert)
    cases = [
        (
            [
                "similarity",
                "--model",
                str(tmp_path / "nope"),
                "--calibration",
                str(text_file),
                "--out",
                "x.npy",
            ],
            "",
        ),
        (
            [
                "similarity",
                "--model",
                str(tiny_dir),
                "--calibration",
                str(tmp_path / "nope.txt"),
                "--out",
                "x.npy",
            ],
            "not found",
        ),
        (
            [
                "similarity",
                "--model",
                str(bert),
                "--calibration",
                str(text_file),
                "--windows",
                "1",
                "--seq-len",
                "8",
                "--out",
                str(tmp_path / "x.npy"),
            ],
            "BertLMHeadModel",
        ),
        (
            [
                "prune",
                "--model",
                str(tiny_dir),
                "--calibration",
                str(text_file),
                "--remove",
                "5",
                "--windows",
                "1",
                "--seq-len",
                "8",
                "--no-bench",
                "--out",
                str(tmp_path / "o"),
            ],
            "budget",
        ),
        (
            [
                "prune",
                "--model",
                str(tiny_dir),
                "--calibration",
                str(text_file),
                "--fraction",
                "1.5",
                "--out",
                str(tmp_path / "o"),
            ],
            "fraction",
        ),
    ]
    for argv, needle in cases:
        code, _, err = run(capsys, *argv, "--quiet")
        assert code != 0, argv
        assert len(err.strip().splitlines()) == 1, err
        assert needle in err, (argv, err)


def test_console_script_has_no_traceback(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("lorp")
    assert exe.exists(), "the lorp console script is installed next to the interpreter"
    bad = tmp_path / "bad.npy"
    np.save(bad, np.ones((3, 4)))
    proc = subprocess.run(
        [str(exe), "select", "--similarity", str(bad), "--remove", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("lorp: error:") and "Traceback" not in proc.stderr


def test_prune_lorp_fold_is_lorp_loss_with_both_corrections(
    capsys: pytest.CaptureFixture[str], tiny_dir: Path, text_file: Path, tmp_path: Path
) -> None:
    """--method lorp-fold: lorp-loss's blocks, the tuned fold and the logit temperature, the
    same as --method lorp-loss --compensate --temperature."""
    args = [
        "prune", "--model", str(tiny_dir), "--calibration", str(text_file), "--remove", "2",
        "--windows", "4", "--seq-len", "32", "--score-windows", "2", "--score-seq-len", "32",
        "--compensation-windows", "3", "--compensation-tune-windows", "1",
        "--temperature-windows", "2", "--no-bench", "--quiet",
    ]  # fmt: skip
    reports = []
    for name, extra in [
        ("fold", ["--method", "lorp-fold"]),
        ("explicit", ["--method", "lorp-loss", "--compensate", "--temperature"]),
    ]:
        code, _, err = run(capsys, *args, *extra, "--out", str(tmp_path / name))
        assert code == 0, err
        reports.append(json.loads((tmp_path / name / "report.json").read_text()))
    fold, explicit = reports
    assert fold["extra"]["config"]["method"] == "lorp-fold"
    assert fold["extra"]["config"]["compensate"] is fold["extra"]["config"]["temperature"] is True
    assert fold["selection"]["method"] == "lorp-loss"
    assert fold["selection"]["removed"] == explicit["selection"]["removed"]
    a, b = fold["extra"]["compensation"], explicit["extra"]["compensation"]
    assert a["strength"] == b["strength"] and a["stored_inputs"] is True
    assert a["temperature"]["scale"] == pytest.approx(b["temperature"]["scale"], rel=1e-6)
    assert fold["quality"]["pruned"]["ppl"] == pytest.approx(
        explicit["quality"]["pruned"]["ppl"], rel=1e-6
    )


def test_prune_compensate(
    capsys: pytest.CaptureFixture[str], tiny_dir: Path, text_file: Path, tmp_path: Path
) -> None:
    """--compensate --temperature: the report records the fitted runs and the logit scale, and
    the saved checkpoint's perplexity is the one the report measured; a model whose blocks cannot
    take the fold is refused."""
    from lorp.data import text_windows
    from lorp.quality import perplexity
    from tests.tiny_models import build_tiny

    out_dir = tmp_path / "fit"
    args = ["--calibration", str(text_file), "--remove", "2", "--windows", "4", "--seq-len", "32"]
    evaluation = ["--eval", str(text_file), "--eval-windows", "2", "--eval-seq-len", "32"]
    code, _, err = run(
        capsys,
        "prune",
        "--model",
        str(tiny_dir),
        *args,
        *evaluation,
        "--compensate",
        "--compensation-windows",
        "3",
        "--compensation-tune-windows",
        "1",
        "--temperature",
        "--temperature-windows",
        "2",
        "--no-bench",
        "--out",
        str(out_dir),
        "--quiet",
    )
    assert code == 0, err
    report = json.loads((out_dir / "report.json").read_text())
    comp = report["extra"]["compensation"]
    assert comp["tokens"] == 3 * 32 and comp["runs"] and "compensation" in report["timings_s"]
    assert comp["tuning"]["windows"] == 1 and comp["strength"] in {
        row["strength"] for row in comp["tuning"]["measured"]
    }
    assert comp["temperature"]["predictions"] == 2 * len(range(0, 31, 4))
    assert comp["temperature"]["scale"] > 0 and "temperature" in report["timings_s"]
    for name in ("report.md", "report.html"):
        assert "folded into block" in (out_dir / name).read_text(), name
        assert "Logit temperature" in (out_dir / name).read_text(), name
        assert "Compensation strength" in (out_dir / name).read_text(), name
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir / "model")
    windows = text_windows(tiny_tokenizer(), text_file, 32, 2)
    assert perplexity(reloaded, windows).ppl == pytest.approx(
        report["quality"]["pruned"]["ppl"], rel=1e-5
    )

    gpt2 = tmp_path / "gpt2"
    build_tiny("gpt2").save_pretrained(gpt2)
    tiny_tokenizer().save_pretrained(gpt2)
    for model, extra, needle in [
        (gpt2, ["--compensate"], "down_proj"),
        (gpt2, ["--method", "lorp-fold"], "use 'lorp-loss'"),
        (tiny_dir, ["--compensate", "--compensation-windows", "0"], "compensation-windows"),
        (tiny_dir, ["--compensate", "--compensation-tune-windows", "-1"], "tune-windows"),
        (tiny_dir, ["--temperature", "--temperature-windows", "0"], "temperature-windows"),
    ]:
        code, _, err = run(
            capsys, "prune", "--model", str(model), *args, *extra, "--no-bench", "--out",
            str(tmp_path / "refused"), "--quiet",
        )  # fmt: skip
        assert code != 0 and needle in err and "Traceback" not in err, err
        assert not (tmp_path / "refused" / "model").exists()


def test_bench_json_has_intervals_and_engines(
    tiny_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        capsys, "bench", "--model", str(tiny_dir), "--remove-layers", "1,4",
        "--prefill", "1x8", "--decode", "1x4x3", "--bench-budget", "2", "--json", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    data = json.loads(out)
    assert data["budget"]["budget_s"] == 2.0 and data["budget"]["source"] == "budget_s"
    assert [w["name"] for w in data["workloads"]] == ["prefill_b1_t8", "decode_b1_p4_n3"]
    for w in data["workloads"]:
        assert w["engine"] == "transformers eager (dynamic KV cache)"
        assert w["speedup_ci"]["pairs"] >= 3
        assert w["speedup_ci"]["low"] <= w["speedup"] <= w["speedup_ci"]["high"]
        assert isinstance(w["reliable"], bool)
    code, out, err = run(
        capsys, "bench", "--model", str(tiny_dir), "--remove-layers", "1,4",
        "--prefill", "1x8", "--decode", "1x4x3", "--bench-budget", "1", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    assert "[95% CI" not in out and "transformers eager" in out  # text form: [low-high]
    for argv in (("--bench-modes", "sideways"), ("--bench-budget", "0")):
        code, _, err = run(capsys, "bench", "--model", str(tiny_dir), "--remove-layers", "1", *argv)
        assert code == 2 and err.count("\n") == 1, err
