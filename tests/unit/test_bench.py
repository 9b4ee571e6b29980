"""lorp.bench on tiny random models: structure, exact byte counts, restoration, fairness; the
stopping rule, the interval and the load-change logic on synthetic numbers; the compiled mode."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorp._blocks import get_blocks
from lorp.bench import (
    MIN_REPETITIONS,
    ORIGINAL,
    PRUNED,
    BenchmarkConfig,
    BenchmarkResult,
    _schedule,
    benchmark,
    cache_bytes,
    compiled_mode_unavailable,
    model_bytes,
    summarize,
)
from lorp.benchstats import (
    LoadSample,
    SpeedupInterval,
    StoppingRule,
    assess,
    load_changes,
    read_load,
    sample_pairs,
    speedup_interval,
)
from lorp.errors import CancelledError, InvalidInputError
from tests.tiny_models import DEPTH, build_tiny, tiny_input_ids

REMOVED = [1, 4]
KEEP = [i for i in range(DEPTH) if i not in REMOVED]


def _config(**overrides: Any) -> BenchmarkConfig:
    values: dict[str, Any] = {
        "prefill": [(1, 16), (2, 8)],
        "decode": [(2, 4, 5)],
        "warmup": 1,
        "repetitions": 3,
        "block_repetitions": 2,
        "budget_s": 60.0,  # repetitions 3 is also the minimum: exactly 3 pairs
        "allow_few_repetitions": True,
    }
    values.update(overrides)
    return BenchmarkConfig(**values)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _tensor_bytes(module: torch.nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.fixture(scope="module")
def run() -> tuple[torch.nn.Module, BenchmarkResult, list[tuple[str, float, str]], dict]:
    model = build_tiny("llama")
    model.train()  # the benchmark must switch to eval and restore the mode afterwards
    ids = tiny_input_ids()
    model.eval()
    before = _logits(model, ids)
    model.train()
    state = {
        "blocks": list(get_blocks(model)),
        "layer_idx": [b.self_attn.layer_idx for b in get_blocks(model)],
        "logits": before,
        "ids": ids,
    }
    events: list[tuple[str, float, str]] = []
    result = benchmark(model, REMOVED, _config(), progress=lambda s, f, m: events.append((s, f, m)))
    return model, result, events, state


def test_result_structure(run: Any) -> None:
    _, result, _, _ = run
    data = result.to_dict()
    json.dumps(data, allow_nan=False)  # JSON-safe
    assert data["removed"] == REMOVED
    assert data["num_layers"] == DEPTH
    assert data["kept_layers"] == DEPTH - len(REMOVED)
    assert [w["name"] for w in data["workloads"]] == [
        "prefill_b1_t16",
        "prefill_b2_t8",
        "decode_b2_p4_n5",
    ]
    for w in data["workloads"]:
        for which in (ORIGINAL, PRUNED):
            stats = w[which]
            assert len(stats["times_s"]) == stats["repetitions"] == 3
            assert stats["min_s"] <= stats["p10_s"] <= stats["median_s"] <= stats["p90_s"]
            assert stats["p90_s"] <= stats["max_s"]
            assert stats["tokens"] == w["batch"] * (
                w["prompt_len"] if w["kind"] == "prefill" else w["new_tokens"]
            )
        assert w["speedup"] == pytest.approx(w["original"]["median_s"] / w["pruned"]["median_s"])
        assert w["mode"] == "eager" and w["engine"] == "transformers eager (dynamic KV cache)"
        ci = w["speedup_ci"]
        assert ci["pairs"] == 3 and ci["low"] <= w["speedup"] <= ci["high"]
        assert w["stop_reason"] in ("converged", "budget", "max_pairs")
        assert w["reliable"] is (not w["unreliable_reasons"])
        assert set(w["load"]) >= {"loadavg_start", "others_cpu_share_max", "reasons"}
        assert len(w["block_times_s"]) == DEPTH
        removed_time = sum(w["block_times_s"][i] for i in REMOVED)
        assert w["removed_blocks_time_s"] == pytest.approx(removed_time)
        total = w["hooked_total_s"]
        assert w["ideal_speedup"] == pytest.approx(total / (total - removed_time))
        assert w["measured_over_ideal"] == pytest.approx(w["speedup"] / w["ideal_speedup"])
    assert data["environment"]["torch"] == torch.__version__
    assert data["budget"]["budget_s"] == 60.0 and data["budget"]["source"] == "budget_s"
    assert data["modes"] == ["eager"]  # CPU default: no compiled mode
    serving = data["serving_memory"]
    assert serving["workload"] == "decode_b2_p4_n5"  # 2 x (4 + 5) cached tokens, the most
    assert serving["saved_bytes"] == data["weights"]["saved_bytes"] + (
        serving["kv_cache_original_bytes"] - serving["kv_cache_pruned_bytes"]
    )


def test_pruned_weight_bytes_are_exactly_the_removed_blocks(run: Any) -> None:
    model, result, _, _ = run
    blocks = get_blocks(model)
    removed_bytes = sum(_tensor_bytes(blocks[i]) for i in REMOVED)
    assert result.weights["original_bytes"] == _tensor_bytes(model)
    assert result.weights["pruned_bytes"] == result.weights["original_bytes"] - removed_bytes
    assert result.weights["saved_bytes"] == removed_bytes
    for w in result.workloads:
        assert w.original.memory["weight_bytes"] == result.weights["original_bytes"]
        assert w.pruned.memory["weight_bytes"] == result.weights["pruned_bytes"]


def test_kv_cache_bytes_scale_with_kept_layers(run: Any) -> None:
    model, result, _, _ = run
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    for w in result.workloads:
        seq = w.prompt_len + (w.new_tokens or 0)
        per_layer = 2 * w.batch * cfg.num_key_value_heads * seq * head_dim * 4  # K+V, float32
        assert w.original.memory["kv_cache_bytes"] == DEPTH * per_layer
        assert w.pruned.memory["kv_cache_bytes"] == len(KEEP) * per_layer


def test_cpu_memory_fields(run: Any) -> None:
    _, result, _, _ = run
    assert result.memory_method["kind"] == "cpu_rss"
    for w in result.workloads:
        for stats in (w.original, w.pruned):
            mem = stats.memory
            assert mem["rss_peak_reset"] == result.memory_method["rss_peak_reset"]
            if mem["peak_rss_bytes"] is not None:
                assert mem["peak_rss_delta_bytes"] >= 0
                assert mem["estimated_peak_bytes"] == (
                    mem["weight_bytes"] + mem["peak_rss_delta_bytes"]
                )


def test_model_is_restored(run: Any) -> None:
    model, _, _, state = run
    assert model.training  # mode restored
    blocks = get_blocks(model)
    assert list(blocks) == state["blocks"]
    assert all(a is b for a, b in zip(blocks, state["blocks"], strict=True))
    assert [b.self_attn.layer_idx for b in blocks] == state["layer_idx"]
    assert model.config.num_hidden_layers == DEPTH
    model.eval()
    try:
        assert torch.equal(_logits(model, state["ids"]), state["logits"])
    finally:
        model.train()


def test_runs_alternate(run: Any) -> None:
    _, result, _, _ = run
    for w in result.workloads:
        assert w.schedule == [ORIGINAL, PRUNED, PRUNED, ORIGINAL, ORIGINAL, PRUNED]


def test_progress_reports_monotone_fractions(run: Any) -> None:
    _, _, events, _ = run
    assert events, "no progress reported"
    assert {stage for stage, _, _ in events} == {"benchmark"}
    fractions = [f for _, f, _ in events]
    assert fractions == sorted(fractions)
    assert all(0.0 <= f <= 1.0 for f in fractions)
    assert fractions[-1] == 1.0
    assert any("decode_b2_p4_n5" in m for _, _, m in events)


def test_schedule_orders() -> None:
    assert _schedule(4, "alternate", 0) == [
        ORIGINAL,
        PRUNED,
        PRUNED,
        ORIGINAL,
        ORIGINAL,
        PRUNED,
        PRUNED,
        ORIGINAL,
    ]
    random_a = _schedule(20, "random", 7)
    assert random_a == _schedule(20, "random", 7)  # reproducible
    pairs = [random_a[i : i + 2] for i in range(0, 40, 2)]
    assert all(sorted(p) == [ORIGINAL, PRUNED] for p in pairs)
    assert {p[0] for p in pairs} == {ORIGINAL, PRUNED}


def test_random_order_is_used() -> None:
    model = build_tiny("llama")
    cfg = _config(
        prefill=[(1, 4)],
        decode=[],
        repetitions=12,
        min_repetitions=12,
        order="random",
        seed=3,
        measure_blocks=False,
        warmup=0,
    )
    result = benchmark(model, [2], cfg)
    assert result.workloads[0].schedule == _schedule(12, "random", 3)
    assert result.workloads[0].block_times_s is None
    assert result.to_dict()["workloads"][0]["ideal_speedup"] is None


def test_cancel_propagates_and_restores() -> None:
    model = build_tiny("llama")
    ids = tiny_input_ids()
    before = _logits(model, ids)
    calls = 0

    def cancel(stage: str, fraction: float, message: str) -> None:
        nonlocal calls
        calls += 1
        if calls == 4:
            raise CancelledError("stop")

    with pytest.raises(CancelledError):
        benchmark(model, REMOVED, _config(), progress=cancel)
    assert len(get_blocks(model)) == DEPTH
    assert model.config.num_hidden_layers == DEPTH
    assert torch.equal(_logits(model, ids), before)


def test_tied_embeddings_counted_once() -> None:
    common = {
        "vocab_size": 64,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    }
    tied = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True))
    untied = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    embedding_bytes = 64 * 16 * 4
    assert model_bytes(untied) - model_bytes(tied) == embedding_bytes


def test_cache_bytes_of_plain_tensors() -> None:
    k = torch.zeros(2, 3, 4)
    assert cache_bytes(((k, torch.zeros(5)), [k])) == k.nbytes + 5 * 4  # shared counted once
    assert cache_bytes(None) == 0


def test_invalid_removed_blocks() -> None:
    model = build_tiny("llama")
    with pytest.raises(InvalidInputError):
        benchmark(model, [DEPTH], _config())
    with pytest.raises(InvalidInputError):
        benchmark(model, [1, 1], _config())
    with pytest.raises(InvalidInputError):
        benchmark(model, list(range(DEPTH)), _config())


def test_summarize_percentiles() -> None:
    s = summarize([float(i) for i in range(1, 12)], tokens=22)
    assert s["median_s"] == 6.0
    assert s["p10_s"] == 2.0 and s["p90_s"] == 10.0
    assert s["min_s"] == 1.0 and s["max_s"] == 11.0
    assert s["tokens_per_s"] == pytest.approx(22 / 6.0)


# ---- BenchmarkConfig


def test_config_defaults() -> None:
    cfg = BenchmarkConfig()
    assert cfg.prefill == ((1, 512),)
    assert cfg.decode == ((1, 32, 16),)
    assert cfg.warmup == 1 and cfg.repetitions == 20 and cfg.measure_blocks
    assert cfg.min_repetitions == MIN_REPETITIONS == 3
    assert (cfg.target_half_width, cfg.unreliable_half_width) == (0.02, 0.05)
    assert cfg.budget_s is None and cfg.budget_fraction == 0.25
    assert cfg.modes_for("cpu") == ("eager",)
    assert cfg.modes_for("cuda") == ("eager", "compiled")


def test_config_round_trip_through_json() -> None:
    cfg = _config(order="random", seed=5)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["prefill"] == [[1, 16], [2, 8]]
    assert BenchmarkConfig.from_dict(data) == cfg


@pytest.mark.parametrize(
    "overrides",
    [
        {"min_repetitions": 2, "allow_few_repetitions": False},
        {"repetitions": 2, "min_repetitions": 3, "allow_few_repetitions": False},
        {"modes": ["eager", "sideways"]},
        {"modes": []},
        {"modes": "eager"},
        {"modes": ["eager", "eager"]},
        {"modes": ["compiled"], "decode": []},
        {"budget_s": 0},
        {"budget_s": -1.0},
        {"budget_s": True},
        {"target_half_width": 0},
        {"unreliable_half_width": 1.5},
        {"budget_fraction": 0.0},
        {"repetitions": 0},
        {"warmup": -1},
        {"block_repetitions": 0},
        {"prefill": [(0, 8)]},
        {"prefill": [(1, 8, 3)]},
        {"prefill": [(1, 8), (1, 8)]},
        {"prefill": "1x8"},
        {"prefill": [(1, 8.5)]},
        {"decode": [(1, 4)]},
        {"decode": [(1, 4, 0)]},
        {"prefill": [], "decode": []},
        {"order": "sideways"},
        {"repetitions": True},
        {"measure_blocks": "yes"},
    ],
)
def test_config_rejects(overrides: dict[str, Any]) -> None:
    with pytest.raises(InvalidInputError):
        _config(**overrides)


def test_config_from_dict_rejects_unknown_fields() -> None:
    with pytest.raises(InvalidInputError, match="nonsense"):
        BenchmarkConfig.from_dict({"nonsense": 1})
    with pytest.raises(InvalidInputError):
        BenchmarkConfig.from_dict([1, 2])  # type: ignore[arg-type]


def test_ten_repetitions_need_no_flag() -> None:
    assert BenchmarkConfig(repetitions=10).repetitions == 10


# ---- the interval and the stopping rule, on synthetic timing sequences


def _pairs_from(ratios: list[float], base: float = 1.0) -> Any:
    """run_pair(i) returning (base, base / ratios[i]) and a clock advancing 1 s per pair."""
    now = [0.0]

    def run_pair(i: int) -> tuple[float, float]:
        now[0] += 1.0
        return base, base / ratios[i]

    return run_pair, (lambda: now[0])


def test_interval_of_identical_pairs_is_a_point() -> None:
    ci = speedup_interval([2.0] * 5, [1.0] * 5)
    assert ci.estimate == 2.0 and ci.low == ci.high == 2.0 and ci.half_width == 0.0
    assert speedup_interval([2.0], [1.0]).half_width == math.inf  # one pair: no interval


def test_interval_is_paired_and_reproducible() -> None:
    # both runs of a pair drift together (machine noise): the ratio is always 1.25
    drift = [1.0, 1.6, 0.8, 2.2, 1.1, 0.9]
    ci = speedup_interval([1.25 * d for d in drift], drift)
    assert ci.estimate == pytest.approx(1.25) and ci.half_width < 0.35
    noisy = speedup_interval([1.0, 1.3, 0.9, 1.2], [0.8, 1.0, 0.85, 0.7], seed=3)
    assert noisy == speedup_interval([1.0, 1.3, 0.9, 1.2], [0.8, 1.0, 0.85, 0.7], seed=3)
    assert noisy.low is not None and noisy.high is not None
    assert noisy.low < noisy.estimate < noisy.high


def test_stopping_rule_stops_once_within_two_percent() -> None:
    # three noisy pairs, then steady ones: the interval narrows to ±2% and the rule stops there
    ratios = [1.30, 1.10, 1.45] + [1.25] * 40
    run_pair, clock = _pairs_from(ratios)
    rule = StoppingRule(target=0.02, min_pairs=3, max_pairs=40)
    got = sample_pairs(run_pair, rule, deadline=1e9, clock=clock)
    assert got.stop_reason == "converged"
    n = len(got.original)
    assert 3 < n < 40
    assert got.interval.half_width <= 0.02
    earlier = speedup_interval(got.original[:-1], got.pruned[:-1])
    assert earlier.half_width > 0.02  # it did not run a pair more than needed
    assert not assess(got.interval, {"reasons": []}, rule)  # reliable


def test_stopping_rule_runs_the_minimum_then_respects_the_budget() -> None:
    ratios = [1.0, 1.6, 0.7, 1.5, 0.8, 1.4, 0.9, 1.3] * 5
    run_pair, clock = _pairs_from(ratios)
    rule = StoppingRule(target=0.02, unreliable=0.05, min_pairs=3, max_pairs=40)
    got = sample_pairs(run_pair, rule, deadline=2.0, clock=clock)  # the budget is already spent
    assert len(got.original) == 3 and got.stop_reason == "budget"
    reasons = assess(got.interval, {"reasons": []}, rule)
    assert len(reasons) == 1 and "wider than ±5%" in reasons[0]
    # with time left it keeps going until the deadline (one more pair would overrun it)
    run_pair, clock = _pairs_from(ratios)
    got = sample_pairs(run_pair, rule, deadline=10.5, clock=clock)
    assert len(got.original) == 10 and got.stop_reason == "budget"
    assert got.pair_ends[-1] <= 10.5  # pair 11 would have ended at 11 s
    run_pair, clock = _pairs_from(ratios)
    got = sample_pairs(run_pair, StoppingRule(min_pairs=3, max_pairs=5), 1e9, clock)
    assert len(got.original) == 5 and got.stop_reason == "max_pairs"


def test_unreliable_between_two_and_five_percent_is_not_marked() -> None:
    rule = StoppingRule(target=0.02, unreliable=0.05)
    mid = SpeedupInterval(1.25, 1.25 * 0.97, 1.25 * 1.03, 6)
    assert mid.half_width == pytest.approx(0.03)
    assert assess(mid, {"reasons": []}, rule) == []
    wide = SpeedupInterval(1.25, 1.25 * 0.9, 1.25 * 1.01, 6)
    assert "±10.0%" in assess(wide, {"reasons": []}, rule)[0]
    assert assess(mid, {"reasons": ["the load changed"]}, rule) == ["the load changed"]


# ---- load-change detection, on synthetic /proc readings


def _sample(wall: float, others_busy: float, own: float, **kw: Any) -> LoadSample:
    """A reading after ``wall`` s on a 2-CPU machine where the other processes used
    ``others_busy`` CPU-seconds so far and this process ``own``."""
    values: dict[str, Any] = {
        "loadavg": 1.0,
        "cpu_busy_s": others_busy + own,
        "cpu_steal_s": 0.0,
        "cpu_total_s": 2 * wall,
        "own_cpu_s": own,
    }
    values.update(kw)
    return LoadSample(wall=wall, **values)


def test_steady_load_is_no_reason() -> None:
    # others steadily use 30% of the machine, we use one CPU
    samples = [_sample(t, 0.6 * t, 1.0 * t) for t in range(0, 10)]
    load = load_changes(samples, own_threads=1)
    assert load["reasons"] == []
    assert load["others_cpu_share_min"] == pytest.approx(0.3)
    assert load["others_cpu_share_max"] == pytest.approx(0.3)
    assert load["steal_share"] == 0.0


def test_other_processes_starting_mid_run_are_detected() -> None:
    busy, samples = 0.0, []
    for t in range(10):
        samples.append(_sample(float(t), busy, 1.0 * t))
        busy += 0.1 if t < 5 else 1.6  # others: 5% of the machine, then 80%
    load = load_changes(samples, own_threads=1)
    assert len(load["reasons"]) == 1 and "other processes' CPU use changed" in load["reasons"][0]


def test_a_busy_machine_is_a_reason_even_when_steady() -> None:
    samples = [_sample(t, 1.4 * t, 0.5 * t) for t in range(0, 10)]  # others: 70% throughout
    reasons = load_changes(samples, own_threads=1)["reasons"]
    assert reasons == ["other processes used 70% of the CPUs during the run (a contended machine)"]


def test_steal_loadavg_and_gpu_changes_are_detected() -> None:
    samples = [
        _sample(0.0, 0.0, 0.0, loadavg=0.5, gpu_others=()),
        _sample(5.0, 0.0, 5.0, loadavg=0.6, cpu_steal_s=1.0),
        _sample(10.0, 0.0, 10.0, loadavg=0.5 + 1 + max(1.0, (os.cpu_count() or 1) / 2) + 0.5,
                cpu_steal_s=2.0, gpu_others=(4242,)),
    ]  # fmt: skip
    reasons = load_changes(samples, own_threads=1)["reasons"]
    assert any("CPU steal took 10%" in r for r in reasons)
    assert any("load average went from 0.50" in r for r in reasons)
    assert any("GPU" in r and "4242" in r for r in reasons)
    assert load_changes(samples[:1])["reasons"] == []  # one reading: nothing to compare


def test_read_load_reads_this_machine() -> None:
    sample = read_load(1.0)
    assert sample.own_cpu_s > 0
    if Path("/proc/stat").exists():
        assert sample.cpu_total_s is not None and sample.cpu_total_s > 0


# ---- budget: the pipeline's share of the other stages


def test_pipeline_budget_is_a_share_of_the_other_stages() -> None:
    from lorp.pipeline import PruneConfig, StageTimer, measure_speed

    model = build_tiny("llama")
    timer = StageTimer()
    timer.timings.update({"loading": 4.0, "calibration": 6.0})
    config = PruneConfig(num_remove=2, benchmark=_config(budget_s=None, decode=[]))
    result = measure_speed(model, REMOVED, config, timer=timer)
    assert result is not None
    assert result.budget["budget_s"] == pytest.approx(2.5)
    assert "25% of the job's other stages (10.0 s)" in result.budget["source"]
    assert timer.timings["benchmark"] == pytest.approx(result.total_time_s, abs=0.5)


# ---- the compiled mode (static KV cache + torch.compile; inductor on CPU)


def test_compiled_mode_unavailable_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    import lorp.bench as bench

    def broken(model: torch.nn.Module, device: torch.device) -> Any:
        raise RuntimeError("no compiler here\nsecond line")

    monkeypatch.setattr(bench, "_compile_step", broken)
    model = build_tiny("llama")
    result = benchmark(model, REMOVED, _config(prefill=[], modes=["eager", "compiled"]))
    eager, compiled = result.workloads
    assert eager.status == "measured" and compiled.name == "decode_b2_p4_n5_compiled"
    assert compiled.status == "unavailable"
    assert compiled.unavailable_reason == "compiling failed: RuntimeError: no compiler here"
    row = result.to_dict()["workloads"][1]
    assert row["original"] is None and row["speedup"] is None
    assert row["reliable"] is None


@pytest.mark.slow
@pytest.mark.skipif(compiled_mode_unavailable("cpu") is not None, reason="no C compiler")
def test_compiled_decode_on_cpu_matches_eager() -> None:
    """Inductor compiles the tiny model's decode step (tens of seconds on 2 cores); the
    compiled greedy tokens are the eager ones, and the row has its own engine and interval."""
    model = build_tiny("llama")
    cfg = _config(prefill=[], decode=[(2, 4, 5)], modes=["eager", "compiled"], warmup=0)
    result = benchmark(model, REMOVED, cfg)
    eager, compiled = result.workloads
    assert compiled.status == "measured", compiled.unavailable_reason
    assert compiled.mode == "compiled" and "torch.compile" in compiled.engine
    assert compiled.compile_s is not None and set(compiled.compile_s) == {ORIGINAL, PRUNED}
    assert compiled.interval is not None and compiled.interval.pairs == 3
    data = compiled.to_dict(REMOVED)
    # the compiled row's ideal comes from the eager block fractions of the same workload
    assert data["ideal_speedup"] == pytest.approx(eager.ideal_speedup(REMOVED))
    assert "eager block fractions" in data["ideal_source"]
    # static cache: allocated for prompt + new tokens, only the kept layers for the pruned view
    kv_o = compiled.original.memory["kv_cache_bytes"]  # type: ignore[union-attr]
    kv_p = compiled.pruned.memory["kv_cache_bytes"]  # type: ignore[union-attr]
    assert kv_p < kv_o
    assert len(get_blocks(model)) == DEPTH  # restored
    # same greedy tokens as eager decoding
    import lorp.bench as bench

    ids = torch.randint(3, 64, (2, 4), generator=torch.Generator().manual_seed(0))  # no pad
    runner = bench._Runner(model, torch.device("cpu"))
    decoder = bench._CompiledDecode(runner, bench._compile_step(model, torch.device("cpu")))
    with torch.inference_mode():
        decoder.decode(ids, 5, ORIGINAL)
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False
        )
    torch._dynamo.reset()
    assert decoder.last_tokens is not None
    assert torch.equal(decoder.last_tokens, out[:, 4:])


def test_rows_are_skipped_once_the_budget_is_spent() -> None:
    model = build_tiny("llama")
    result = benchmark(model, REMOVED, _config(budget_s=0.001))
    first, *rest = result.workloads
    assert first.status == "measured" and first.interval is not None  # the first always runs
    assert [w.status for w in rest] == ["unavailable", "unavailable"]
    assert all(
        w.unavailable_reason.startswith("skipped: the benchmark's time budget") for w in rest
    )
    assert result.budget["exceeded"] and any("over its budget" in n for n in result.notes)
    json.dumps(result.to_dict(), allow_nan=False)
