"""The method registry (lorp.methods): complete, torch-free, the one source of every method
list, and a new method is picked up everywhere without touching another file."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import lorp.methods
from benchmarks.quality import report as quality_report
from lorp import search, selection
from lorp.cli import build_parser
from lorp.errors import InvalidInputError
from lorp.methods import (
    REGISTRY,
    Fold,
    MethodInfo,
    Registry,
    SelectionRequest,
    all_methods,
    fold_methods,
    get_method,
    method_names,
)
from lorp.pipeline import PruneConfig, prune
from lorp.report import build_report, method_label
from lorp.selection import Selection, select_layers
from lorp.similarity import capture_similarity
from tests.tiny_models import TINY_TEXT, build_tiny, tiny_input_ids, tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "numpy", "sklearn", "scipy", "transformers")
#: The methods this checkout ships (more may be added; none may disappear).
SHIPPED = ("lorp", "shortgpt", "streamline", "sleb", "lorp-kl", "lorp-loss", "auto", "lorp-fold")


#: Run first in every fresh interpreter: ``heavy()`` lists the heavy packages loaded so far.
_PRELUDE = f"""
import json, sys
HEAVY = {HEAVY!r}


def heavy():
    return sorted({{name.split(".")[0] for name in sys.modules}} & set(HEAVY))

"""


def _python(code: str, *, cwd: Path = REPO, path: Path = REPO) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter (``path`` first on sys.path) after :data:`_PRELUDE`;
    its last stdout line is JSON."""
    env = {**os.environ, "PYTHONPATH": str(path)}
    done = subprocess.run(
        [sys.executable, "-c", _PRELUDE + textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _choices(parser: argparse.ArgumentParser, command: str, option: str) -> list[str]:
    """The choices of ``command``'s ``option`` as the parser has them."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    action = next(a for a in sub.choices[command]._actions if option in a.option_strings)
    assert action.choices is not None
    return list(action.choices)


def _help(parser: argparse.ArgumentParser, command: str, option: str) -> str:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    action = next(a for a in sub.choices[command]._actions if option in a.option_strings)
    return str(action.help)


# --------------------------------------------------------------------------------------------
# torch-free


def test_registry_imports_without_torch_numpy_sklearn_or_transformers() -> None:
    got = _python(
        """
        import lorp.methods

        names = [m.name for m in lorp.methods.all_methods()]
        print(json.dumps({"heavy": heavy(), "names": names}))
        """
    )
    assert got["heavy"] == []
    assert got["names"] == list(method_names())
    assert set(SHIPPED) <= set(got["names"])
    # the package itself and the errors are as light (the API imports them)
    light = _python(
        """
        import lorp
        from lorp.errors import LorpError
        from lorp.methods import get_method

        assert get_method("auto").description and issubclass(LorpError, Exception)
        print(json.dumps({"heavy": heavy()}))
        """
    )
    assert light["heavy"] == []


def test_lazy_package_keeps_its_public_names() -> None:
    import lorp

    assert lorp.prune is __import__("lorp.pipeline", fromlist=["prune"]).prune
    assert lorp.ALL_METHODS == search.ALL_METHODS
    assert set(lorp.__all__) <= set(dir(lorp))
    for name in lorp.__all__:
        assert getattr(lorp, name) is not None
    assert lorp.scoring.WindowScorer.__name__ == "WindowScorer"  # a submodule, on first use
    with pytest.raises(AttributeError):
        lorp.no_such_name  # noqa: B018


# --------------------------------------------------------------------------------------------
# completeness


def _selection_dict(info: MethodInfo) -> dict[str, Any]:
    return {
        "method": info.name,
        "num_layers": 6,
        "removed": [2, 3],
        "rls": 0.8,
        "num_clusters": 2 if info.takes_clusters else None,
        "details": {"scoring": {"windows": 2, "seq_len": 16}, "passes": 7},
    }


@pytest.mark.parametrize("info", all_methods(), ids=lambda m: m.name)
def test_every_method_is_complete(info: MethodInfo) -> None:
    assert info.name == info.name.lower() and " " not in info.name
    for text in (info.label, info.description):
        assert text.strip() and "\n" not in text and len(text) < 160
    assert callable(info.select) and callable(info.explain)
    prose = info.explain(_selection_dict(info))
    # a fold's selection is its base's (Selection.method names the base): its prose starts so
    opening = info.label if info.fold is None else get_method(info.fold.of).label
    assert isinstance(prose, str) and prose.startswith(opening) and len(prose) > len(opening)
    if info.needs_model:
        windows, tokens = info.scoring or (0, 0)
        assert windows >= 1 and tokens >= 2
    else:
        assert info.scoring is None and info.pass_budget is None
    if info.fold is not None:
        base = get_method(info.fold.of)
        assert base.fold is None and info.select is base.select
        assert (info.needs_model, info.takes_clusters, info.scoring) == (
            base.needs_model,
            base.takes_clusters,
            base.scoring,
        )
        assert info.fold.compensate or info.fold.temperature
    assert method_label(info.name) == info.label


def test_names_and_orders_are_unique_and_lists_follow_the_registry() -> None:
    names = [m.name for m in all_methods()]
    orders = [m.order for m in all_methods()]
    assert len(set(names)) == len(names) and orders == sorted(set(orders))
    s_only = [m.name for m in all_methods() if not m.needs_model and m.fold is None]
    searching = [m.name for m in all_methods() if m.needs_model and m.fold is None]
    assert list(selection.METHODS) == s_only
    assert list(search.SEARCH_METHODS) == searching
    assert list(search.ALL_METHODS) == names
    assert tuple(m.name for m in all_methods() if m.takes_clusters) == search.CLUSTER_METHODS
    assert {m.name: m.fold.of for m in all_methods() if m.fold} == search.FOLD_METHODS
    assert fold_methods() == search.FOLD_METHODS
    # the benchmark runs every selection method in the registry's order, before its variants
    assert quality_report.METHOD_ORDER[: len(s_only) + len(searching)] == (*s_only, *searching)
    # the shipped methods keep their place (the REST enum and lorp-jobs list them in this order)
    assert [n for n in names if n in SHIPPED] == list(SHIPPED)


def test_cli_choices_and_help_come_from_the_registry() -> None:
    parser = build_parser()
    assert _choices(parser, "prune", "--method") == [m.name for m in all_methods()]
    assert _choices(parser, "select", "--method") == [
        m.name for m in all_methods() if not m.needs_model and m.fold is None
    ]
    text = _help(parser, "prune", "--method")
    for m in all_methods():
        assert f"{m.name}: {m.description}" in text
    clusters = _help(parser, "prune", "--clusters")
    listed = clusters[clusters.index("(") + 1 : clusters.rindex(")")].split(", ")
    assert listed == [m.name for m in all_methods() if m.takes_clusters]
    assert {"lorp", "lorp-kl", "lorp-loss", "lorp-fold"} <= set(listed)
    assert not {"shortgpt", "streamline", "sleb", "auto"} & set(listed)


def test_registry_refuses_inconsistent_methods() -> None:
    lorp_info = get_method("lorp")
    with pytest.raises(ValueError, match="twice"):
        REGISTRY.with_methods(replace(lorp_info, order=999))
    with pytest.raises(ValueError, match="share order"):
        REGISTRY.with_methods(replace(lorp_info, name="lorp-2", order=lorp_info.order))
    with pytest.raises(ValueError, match="not a registered"):
        Registry([replace(lorp_info, name="f", order=1, fold=Fold(of="nothing", temperature=True))])
    with pytest.raises(ValueError, match="needs_model"):
        replace(lorp_info, name="x", scoring=(4, 256))
    with pytest.raises(ValueError, match="one non-empty line"):
        replace(lorp_info, name="x", description="two\nlines")
    with pytest.raises(InvalidInputError, match="lorp, shortgpt"):
        get_method("magic")


# --------------------------------------------------------------------------------------------
# a new method is picked up everywhere


def _dummy_select(calls: list[SelectionRequest]) -> Any:
    def select(request: SelectionRequest) -> Selection:
        calls.append(request)
        n = int(np.asarray(request.similarity).shape[0])
        return Selection(method="dummy-m", num_layers=n, removed=[n - 2], rls=0.5, details={})

    return select


def _dummy_explain(sel: Mapping[str, Any]) -> str:
    return f"Dummy: removed {sel.get('removed')}."


def _dummies(calls: list[SelectionRequest]) -> tuple[MethodInfo, ...]:
    model_method = MethodInfo(
        name="dummy-m",
        order=1001,
        label="Dummy",
        description="a test method that runs the model",
        select=_dummy_select(calls),
        explain=_dummy_explain,
        needs_model=True,
        scoring=(3, 12),
        pass_budget=lambda model, tokens, shape, k: 5 + k,
    )
    s_method = MethodInfo(
        name="dummy-s",
        order=1002,
        label="Dummy-S",
        description="a test method from S alone",
        select=lambda request: select_layers(request.similarity, request.num_remove, "shortgpt"),
        explain=lambda sel: "Dummy-S.",
        takes_clusters=False,
    )
    fold = replace(
        model_method,
        name="dummy-fold",
        order=1003,
        label="Dummy-fold",
        description="dummy-m with the logit temperature",
        fold=Fold(of="dummy-m", temperature=True),
    )
    return model_method, s_method, fold


def test_a_registered_method_reaches_cli_report_budget_and_pipeline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[SelectionRequest] = []
    monkeypatch.setattr(lorp.methods, "REGISTRY", REGISTRY.with_methods(*_dummies(calls)))

    parser = build_parser()
    assert _choices(parser, "prune", "--method")[-3:] == ["dummy-m", "dummy-s", "dummy-fold"]
    assert _choices(parser, "select", "--method")[-1] == "dummy-s"
    assert "dummy-m: a test method that runs the model" in _help(parser, "prune", "--method")
    assert "3 for " in _help(parser, "prune", "--score-windows")
    assert "dummy-m" in _help(parser, "prune", "--score-windows")

    model = build_tiny("llama")
    s = capture_similarity(model, tiny_input_ids(batch=2, length=16, seed=3))
    assert search.pass_budget("dummy-m", model, 100, (3, 12), 2) == 7
    assert search.pass_budget("dummy-fold", model, 100, (3, 12), 2) == 7  # its base's
    assert search.pass_budget("dummy-s", model, 100, (3, 12), 2) is None
    assert select_layers(s, 2, method="dummy-s").removed == select_layers(s, 2, "shortgpt").removed
    with pytest.raises(InvalidInputError, match="num_clusters"):
        select_layers(s, 2, method="dummy-s", num_clusters=2)
    with pytest.raises(InvalidInputError, match="dummy-s"):
        select_layers(s, 2, method="dummy-m")

    sel = search.search_layers(model, s, 1, "dummy-m", tiny_input_ids(batch=2, length=8))
    assert sel.removed == [4] and calls[-1].model is model
    doc = build_report(
        model={"source": "x", "num_layers": 6},
        budget={"num_remove": 1},
        selection=sel,
        similarity=s,
        timings={},
    )
    assert doc["selection"]["explanation"] == "Dummy: removed [4]."
    assert method_label("dummy-m") == "Dummy"

    config = PruneConfig(method="dummy-fold", num_remove=1, windows=4, seq_len=32)
    assert config.temperature and not config.compensate
    assert config.selection_method == "dummy-m" and config.scoring_shape == (3, 12)
    text = tmp_path / "calib.txt"
    text.write_text(TINY_TEXT)
    result = prune(model, tiny_tokenizer(), text, config)
    assert result.selection.method == "dummy-m" and result.removed == [4]
    assert result.scoring is not None and (
        result.scoring["windows"],
        result.scoring["seq_len"],
    ) == (
        3,
        12,
    )
    request = calls[-1]
    assert tuple(request.windows.shape) == (3, 12)
    assert request.max_passes == 5 + 1  # its pass budget, as the pipeline computes it
    assert result.compensation is not None and result.compensation.temperature is not None
    with pytest.raises(InvalidInputError, match="num_clusters"):
        PruneConfig(method="dummy-m", num_remove=1, num_clusters=2)
    # and out again: the real registry is untouched
    monkeypatch.undo()
    with pytest.raises(InvalidInputError):
        PruneConfig(method="dummy-m", num_remove=1)


_DROPPED_IN = '''
"""``dropped-in``: a method added as one file."""

from __future__ import annotations

from typing import Any

from ._base import MethodInfo, SelectionRequest, generic_explain


def select(request: SelectionRequest) -> Any:
    from ..selection import select_layers

    return select_layers(request.similarity, request.num_remove, method="streamline")


METHOD = MethodInfo(
    name="dropped-in",
    order=990,
    label="Dropped-in",
    description="a method added as one file in lorp/methods",
    select=select,
    explain=lambda sel: generic_explain(sel, "Dropped-in"),
)
'''


def test_a_file_dropped_into_lorp_methods_is_discovered(tmp_path: Path) -> None:
    shutil.copytree(REPO / "lorp", tmp_path / "lorp", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "lorp" / "methods" / "dropped_in.py").write_text(_DROPPED_IN)
    got = _python(
        """
        import lorp.methods
        from lorp.cli import build_parser

        parser = build_parser()
        sub = [a for a in parser._actions if hasattr(a, "choices") and a.choices][0]
        prune = [a for a in sub.choices["prune"]._actions if "--method" in a.option_strings][0]
        select = [a for a in sub.choices["select"]._actions if "--method" in a.option_strings][0]
        print(json.dumps({"heavy": heavy(), "where": lorp.methods.__file__,
                          "names": [m.name for m in lorp.methods.all_methods()],
                          "prune": list(prune.choices), "select": list(select.choices)}))
        """,
        cwd=tmp_path,
        path=tmp_path,
    )
    assert got["where"].startswith(str(tmp_path))
    assert got["heavy"] == []  # the CLI's parser and the registry load no torch either
    assert got["names"] == [*method_names(), "dropped-in"]
    assert got["prune"] == got["names"] and got["select"][-1] == "dropped-in"
    runs = _python(
        """
        import numpy as np
        from lorp.selection import select_layers
        from lorp.report import explain
        idx = np.arange(8)
        s = 0.9 ** np.abs(idx[:, None] - idx[None, :])
        sel = select_layers(s, 2, method="dropped-in")
        print(json.dumps({"removed": sel.removed, "prose": explain(
            {"method": "dropped-in", "num_layers": 8, "removed": sel.removed, "rls": 0.1})}))
        """,
        cwd=tmp_path,
        path=tmp_path,
    )
    assert len(runs["removed"]) == 2
    assert runs["prose"] == "Dropped-in: 2 of 8 blocks removed. RLS = 0.100."


def test_scoring_engine_and_methods_do_not_form_an_import_loop() -> None:
    """compensation -> scoring -> (no quality); quality -> compensation: importing any one of
    them first works in a fresh interpreter (no module needs a function-level import to
    break a cycle)."""
    for first in ("lorp.quality", "lorp.compensation", "lorp.scoring", "lorp.search"):
        got = _python(f"import {first}\nprint(json.dumps({{'ok': True}}))")
        assert got["ok"]
