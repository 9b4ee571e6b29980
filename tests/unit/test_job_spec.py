"""One job spec (issue 19 item 3): the job's options are declared once, in
:class:`jobcore.spec.JobCreate`, and checked here against everything else that names them:
``PruneConfig`` (and ``run_pipeline``, ``QualityGate``, ``BenchmarkConfig``), the ``lorp prune``
flags (read from ``lorp.cli``'s parser), the ``lorp-jobs submit`` flags (read from its parser)
and the body ``lorp-jobs`` builds from them. The worker's one call, ``spec.prune_config``, is
checked against a ``PruneConfig`` written out by hand."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from pathlib import Path
from typing import Any, cast

import pytest

from jobcore.spec import (
    PRUNE_CONFIG_RENAMES,
    RUN_OPTIONS,
    SERVICE_OPTIONS,
    BenchmarkSpec,
    Budget,
    Device,
    DType,
    HealSpec,
    JobCreate,
    Method,
    Offload,
    QualityGateSpec,
)
from lorp.bench import BenchmarkConfig
from lorp.gate import QualityGate
from lorp.pipeline import PruneConfig, run_pipeline

MINIMAL: dict[str, Any] = {
    "model": "s3://inputs/acme/models/tiny",
    "calibration": "corpus:wiki",
    "budget": {"blocks": 2},
}

#: Every option with a value other than its default (a new option must be added here: the
#: first test checks the keys).
EVERY_OPTION: dict[str, Any] = {
    "model": "s3://inputs/acme/models/tiny",
    "gguf_file": "m.Q4_0.gguf",
    "calibration": "corpus:wiki",
    "evaluation": "s3://inputs/acme/texts/heldout.txt",
    "method": "lorp-kl",
    "budget": {"fraction": 0.25},
    "num_clusters": 3,
    "windows": 16,
    "seq_len": 256,
    "batch_size": 2,
    "eval_windows": 8,
    "holdout_windows": 0,
    "score_windows": 5,
    "score_seq_len": 128,
    "search_candidates": 4,
    "compensate": True,
    "compensation_windows": 6,
    "compensation_tune_windows": 1,
    "heal": {"steps": 20, "lr": 0.001},
    "temperature": True,
    "temperature_windows": 3,
    "tasks": ["piqa", "boolq"],
    "task_limit": 50,
    "target_task_items": 20,
    "quality_gate": {
        "max_ppl_ratio": 1.5,
        "max_kl": 0.5,
        "min_top1_agreement": 0.8,
        "min_task_retention": 0.9,
    },
    "dtype": "bfloat16",
    "offload": "none",
    "device": "cuda",
    "output_formats": ["gguf", "safetensors"],
    "benchmark": {
        "prefill": [[1, 64], [2, 32]],
        "decode": [[1, 16, 8]],
        "modes": ["eager", "compiled"],
        "warmup": 2,
        "repetitions": 12,
        "budget_s": 30.0,
        "measure_blocks": False,
    },
    "callback_url": "https://hooks.example.com/lorp",
}

#: Options whose library default differs from the spec's, and why (kept: changing either
#: default changes what existing callers get).
DEFAULT_EXCEPTIONS = {
    "budget": "required in the spec; PruneConfig's num_remove/fraction default to None and its "
    "check asks for exactly one",
    "tasks": "none either way: [] in JSON, () in PruneConfig (which holds the names as a tuple)",
    "heal": "off either way: null in the spec, heal_steps 0 in PruneConfig (heal_lr: the same "
    "default, test_nested_options_match_the_library_objects)",
}
#: BenchmarkSpec fields whose BenchmarkConfig default differs, and why.
BENCHMARK_DEFAULT_EXCEPTIONS: dict[str, str] = {}
#: BenchmarkConfig fields a job can't set, and why.
BENCHMARK_NOT_IN_SPEC = {
    "block_repetitions": "the library's default",
    "order": "the library's default (alternating pairs)",
    "seed": "the library's default",
    "allow_few_repetitions": "for tests; the service asks for at least 3 pairs",
    "min_repetitions": "the library's default (3 pairs)",
    "target_half_width": "the library's default (±2%)",
    "unreliable_half_width": "the library's default (±5%)",
    "budget_fraction": "the library's default (25% of the other stages; budget_s overrides)",
}
#: run_pipeline's parameter for each of the spec's RUN_OPTIONS.
RUN_PARAMETERS = {
    "model": "model_source",
    "gguf_file": "gguf_file",
    "calibration": "calibration",
    "evaluation": "evaluation",
    "dtype": "dtype",
    "output_formats": "output_formats",
    "device": "device",
}


def _default(field: Any) -> Any:
    if field.is_required():
        return inspect.Parameter.empty
    value = field.get_default(call_default_factory=True)
    return value.value if isinstance(value, Method | DType | Offload | Device) else value


def _library_defaults(cls: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


# -- the spec and the library -------------------------------------------------------------------


def test_every_option_is_listed_here() -> None:
    assert list(EVERY_OPTION) == list(JobCreate.model_fields)
    assert set(EVERY_OPTION["quality_gate"]) == set(QualityGateSpec.model_fields)
    assert set(EVERY_OPTION["benchmark"]) == set(BenchmarkSpec.model_fields)
    assert set(EVERY_OPTION["heal"]) == set(HealSpec.model_fields)
    full = JobCreate.model_validate(EVERY_OPTION)
    for option, field in JobCreate.model_fields.items():
        assert getattr(full, option) != field.get_default(call_default_factory=True), option


def test_every_option_reaches_the_library_with_the_same_default() -> None:
    """Each option is a run_pipeline argument, a PruneConfig field of the same name, or one of
    the declared renames; its default is the library's (exceptions listed above)."""
    config_defaults = _library_defaults(PruneConfig)
    run_params = inspect.signature(run_pipeline).parameters
    assert set(RUN_OPTIONS) == set(RUN_PARAMETERS)
    for option, field in JobCreate.model_fields.items():
        default = _default(field)
        if option in SERVICE_OPTIONS:  # acted on by the service, never the library's
            assert option not in config_defaults, option
            continue
        if option in RUN_OPTIONS:
            assert run_params[RUN_PARAMETERS[option]].default == default, option
            continue
        if option in PRUNE_CONFIG_RENAMES:
            targets = PRUNE_CONFIG_RENAMES[option](JobCreate.model_validate(MINIMAL))
        else:
            targets = {option: None}
        for target in targets:
            assert target in config_defaults, f"{option} -> {target}: not a PruneConfig field"
            if option not in DEFAULT_EXCEPTIONS:
                assert config_defaults[target] == default, (option, target)


def test_nested_options_match_the_library_objects() -> None:
    config_defaults = _library_defaults(PruneConfig)
    assert {f"heal_{name}" for name in HealSpec.model_fields} <= set(config_defaults)
    assert config_defaults["heal_lr"] == _default(HealSpec.model_fields["lr"])
    gate_defaults = _library_defaults(QualityGate)
    assert set(QualityGateSpec.model_fields) == set(gate_defaults)
    for name, field in QualityGateSpec.model_fields.items():
        assert gate_defaults[name] == _default(field), name
    bench_defaults = _library_defaults(BenchmarkConfig)
    assert set(BenchmarkSpec.model_fields) | set(BENCHMARK_NOT_IN_SPEC) == set(bench_defaults)
    for name, field in BenchmarkSpec.model_fields.items():
        if name in BENCHMARK_DEFAULT_EXCEPTIONS:
            continue
        library = bench_defaults[name]
        spec_default = _default(field)
        if isinstance(library, tuple):
            library = [tuple(w) for w in library]
        assert library == spec_default, name


def test_every_prune_config_field_is_set_by_the_spec() -> None:
    """A new PruneConfig field fails here until the spec carries it (or maps to it)."""
    kwargs = JobCreate.model_validate(MINIMAL).prune_config_kwargs(
        {f.name for f in dataclasses.fields(PruneConfig)}
    )
    assert set(kwargs) == {f.name for f in dataclasses.fields(PruneConfig)}


def test_the_default_spec_is_the_library_default() -> None:
    assert JobCreate.model_validate(MINIMAL).prune_config(PruneConfig) == PruneConfig(num_remove=2)


def test_every_option_reaches_prune_config_as_written_by_hand() -> None:
    config = JobCreate.model_validate(EVERY_OPTION).prune_config(PruneConfig)
    assert config == PruneConfig(
        method="lorp-kl",
        num_remove=None,
        fraction=0.25,
        num_clusters=3,
        windows=16,
        seq_len=256,
        batch_size=2,
        eval_windows=8,
        eval_seq_len=256,
        holdout_windows=0,
        benchmark=BenchmarkConfig(
            prefill=((1, 64), (2, 32)),
            decode=((1, 16, 8),),
            modes=("eager", "compiled"),
            warmup=2,
            repetitions=12,
            budget_s=30.0,
            measure_blocks=False,
        ),
        score_windows=5,
        score_seq_len=128,
        search_candidates=4,
        quality_gate=QualityGate(
            max_ppl_ratio=1.5, max_kl=0.5, min_top1_agreement=0.8, min_task_retention=0.9
        ),
        tasks=("piqa", "boolq"),
        task_limit=50,
        target_task_items=20,
        task_data_dir=None,  # the operator's (OPERATOR_FIELDS), not the job's
        compensate=True,
        compensation_windows=6,
        compensation_tune_windows=1,
        heal_steps=20,
        heal_lr=0.001,
        temperature=True,
        temperature_windows=3,
        offload="none",
        max_device_memory=None,  # the operator's (OPERATOR_FIELDS), not the job's
    )
    assert type(config.method) is str  # the name, not the enum member
    blocks = JobCreate.model_validate({**MINIMAL, "budget": {"blocks": 5}})
    assert (
        blocks.prune_config(PruneConfig).num_remove,
        blocks.prune_config(PruneConfig).fraction,
    ) == (5, None)


def test_an_option_without_a_field_is_an_error() -> None:
    fields = {f.name for f in dataclasses.fields(PruneConfig)} - {"search_candidates"}
    with pytest.raises(TypeError, match="'search_candidates' is not a PruneConfig field"):
        JobCreate.model_validate(MINIMAL).prune_config_kwargs(fields)


def test_the_worker_runs_the_pipeline_with_the_specs_config(tmp_path: Path) -> None:
    """JobRunner._run_pipeline: PruneConfig from spec.prune_config, the RUN_OPTIONS as the
    pipeline's arguments (a stand-in pipeline records them)."""
    from jobcore.config import Settings
    from worker.runner import Inputs, JobRunner

    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    settings = Settings(  # type: ignore[call-arg]
        s3_access_key_id="ak",
        s3_secret_access_key="sk",
        s3_bucket="lorp-artifacts",
        api_keys={"k" * 16: "acme"},
    )
    runner = JobRunner(
        settings, cast(Any, None), cast(Any, None), pipeline=lambda *a, **k: calls.append((a, k))
    )
    spec = JobCreate.model_validate(EVERY_OPTION)
    inputs = Inputs("/w/model", "m.Q4_0.gguf", tmp_path / "c.txt", tmp_path / "e.txt")
    runner._run_pipeline(spec, inputs, tmp_path / "out", cast(Any, None))
    ((args, kwargs),) = calls
    assert args == (
        "/w/model",
        tmp_path / "c.txt",
        tmp_path / "out",
        spec.prune_config(PruneConfig),
    )
    assert (kwargs["evaluation"], kwargs["gguf_file"], kwargs["dtype"]) == (
        tmp_path / "e.txt",
        "m.Q4_0.gguf",
        "bfloat16",
    )
    assert kwargs["output_formats"] == ["gguf", "safetensors"]
    assert kwargs["device"] == "cuda"


# -- lorp prune ---------------------------------------------------------------------------------

#: `lorp prune`'s flag (argparse dest) for each option whose name differs; nested options as
#: "object.field". benchmark: --no-bench (on unless given).
PRUNE_DESTS: dict[str, str] = {
    "model": "model",
    "evaluation": "eval",
    "num_clusters": "clusters",
    "quality_gate.min_top1_agreement": "min_top1",
    "benchmark": "no_bench",
    "benchmark.measure_blocks": "no_block_timing",
    "heal.steps": "heal_steps",
    "heal.lr": "heal_lr",
}
#: `lorp prune` flags that are no job option, and why.
PRUNE_ONLY = {
    "help": "argparse",
    "out": "the worker's work dir",
    "json": "output format",
    "quiet": "output",
    "device": "the worker's device",
    "allow_pickle": "never for the service (safetensors/GGUF only)",
    "trust_remote_code": "LORP_TRUST_REMOTE_CODE, the operator's choice",
    "task_data_dir": "LORP_TASKS_DIR, the operator's task data (OPERATOR_FIELDS)",
    "max_device_memory": "LORP_MAX_DEVICE_MEMORY, the operator's device limit (OPERATOR_FIELDS)",
    "allow_hub": "LORP_ALLOW_HUB, the operator's choice",
    "eval_seq_len": "a job evaluates with seq_len (PRUNE_CONFIG_RENAMES)",
    "remove": "budget: --remove N | --fraction F",
    "fraction": "budget",
    "target_ppl_ratio": "budget: max_ppl_ratio",
    "target_task_retention": "budget: min_task_retention",
    "serving": "adds the serving decode workloads (a job lists them in benchmark.decode)",
}
#: Options whose `lorp prune` default differs from the spec's, and why.
PRUNE_DEFAULT_EXCEPTIONS = {
    "benchmark": "lorp prune times the models unless --no-bench; a job only when it asks (the "
    "benchmark costs model runs admission control charges)",
    "budget": DEFAULT_EXCEPTIONS["budget"],
    "heal.steps": "required in a job's heal object (heal: null is off); lorp prune's "
    "--heal-steps 0 is off",
}


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return cast(argparse.ArgumentParser, sub.choices[name])


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions}


def _all_options() -> dict[str, Any]:
    """option or "object.field" -> its pydantic field."""
    out: dict[str, Any] = {}
    for option, field in JobCreate.model_fields.items():
        out[option] = field
        for model, prefix in (
            (QualityGateSpec, "quality_gate"),
            (BenchmarkSpec, "benchmark"),
            (HealSpec, "heal"),
        ):
            if option == prefix:
                out.update({f"{prefix}.{n}": f for n, f in model.model_fields.items()})
    return out


def test_lorp_prune_has_every_option_with_the_same_default_and_choices() -> None:
    from lorp.cli import build_parser

    actions = _actions(_subparser(build_parser(), "prune"))
    for option, field in _all_options().items():
        if option == "budget":
            assert {"remove", "fraction", "target_ppl_ratio", "target_task_retention"} <= set(
                actions
            )
            continue
        if option in ("quality_gate", "heal"):  # an object: its fields are checked
            continue
        if option in SERVICE_OPTIONS:  # the service's (webhooks): no library run has them
            assert option not in actions, option
            continue
        dest = PRUNE_DESTS.get(option, option.rpartition(".")[2])
        assert dest in actions, f"lorp prune has no flag for {option}"
        action = actions[dest]
        if option in PRUNE_DEFAULT_EXCEPTIONS:
            continue
        default = _default(field)
        if option == "benchmark.measure_blocks":
            assert action.default is (not default)  # --no-block-timing
        elif default is inspect.Parameter.empty:
            assert action.required, option
        else:
            given = action.default
            if isinstance(given, list) and given and isinstance(given[0], tuple):
                given = [tuple(w) for w in given]
            assert given == default, (option, given, default)
    assert list(actions["method"].choices or ()) == [m.value for m in Method]
    assert list(actions["dtype"].choices or ()) == [d.value for d in DType]
    assert sorted(actions["offload"].choices or ()) == sorted(o.value for o in Offload)


def test_every_lorp_prune_flag_is_an_option_or_listed() -> None:
    from lorp.cli import build_parser

    options = {PRUNE_DESTS.get(o, o.rpartition(".")[2]) for o in _all_options()}
    unknown = set(_actions(_subparser(build_parser(), "prune"))) - options - set(PRUNE_ONLY)
    assert not unknown, f"lorp prune flags that no job can set: {sorted(unknown)}"


# -- lorp-jobs submit ---------------------------------------------------------------------------


def _submit() -> argparse.ArgumentParser:
    from service.client_cli import build_parser

    return _subparser(build_parser(), "submit")


def test_lorp_jobs_submit_has_every_option() -> None:
    """A flag per option (the objects' fields too), read from the parser: no default of its own
    (an option not given is left to the server's default, which the help states), the spec's
    choices."""
    actions = _actions(_submit())
    for option, field in _all_options().items():
        if option == "budget":
            assert {f"budget.{name}" for name in Budget.model_fields} <= set(actions)
            continue
        if option in ("quality_gate", "heal"):
            continue
        if option == "benchmark":
            assert "no_benchmark" in actions
            continue
        action = actions[option]
        assert action.default is None, option
        default = _default(field)
        if default is not inspect.Parameter.empty and not isinstance(default, list | bool):
            assert f"server default: {'none' if default is None else default})" in (
                action.help or ""
            ), option
    assert list(actions["method"].choices or ()) == [m.value for m in Method]
    assert list(actions["dtype"].choices or ()) == [d.value for d in DType]
    assert sorted(actions["offload"].choices or ()) == sorted(o.value for o in Offload)


def _argv(values: dict[str, Any]) -> list[str]:
    """``lorp-jobs submit`` arguments for ``values``, with the flags read from its parser."""
    flags = {a.dest: a for a in _submit()._actions}
    argv: list[str] = ["submit"]

    def add(dest: str, value: Any) -> None:
        action = flags[dest]
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, list):
            for item in value:  # a workload [b, l(, n)], a task or a format name
                argv.extend([flag, item if isinstance(item, str) else "x".join(map(str, item))])
        else:
            argv.extend([flag, str(value)])

    for option, value in values.items():
        if option == "budget":
            ((kind, amount),) = value.items()
            add(f"budget.{kind}", amount)
        elif isinstance(value, dict):
            for name, inner in value.items():
                add(f"{option}.{name}", inner)
        else:
            add(option, value)
    return argv


@pytest.mark.parametrize(
    "values",
    [
        EVERY_OPTION,
        MINIMAL,
        {**MINIMAL, "budget": {"blocks": 3}, "compensate": False, "benchmark": {"warmup": 0}},
        {**MINIMAL, "budget": {"max_ppl_ratio": 1.5}},
        {**MINIMAL, "budget": {"min_task_retention": 0.95}, "tasks": ["piqa"]},
    ],
    ids=["every-option", "minimal", "false-and-partial", "ppl-target", "task-target"],
)
def test_lorp_jobs_submit_body_round_trips(values: dict[str, Any]) -> None:
    """The body lorp-jobs builds from the flags is the spec built from the same values."""
    from service.client_cli import build_parser, build_spec

    body = build_spec(build_parser().parse_args(["--api-key", "k" * 12, *_argv(values)]))
    assert JobCreate.model_validate(body) == JobCreate.model_validate(values)
    assert body.keys() == values.keys()  # nothing the user did not give
