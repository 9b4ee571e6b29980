"""lorp.bench on tiny random models: structure, exact byte counts, restoration, fairness."""

from __future__ import annotations

import json
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
    model_bytes,
    summarize,
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
        assert len(w["block_times_s"]) == DEPTH
        removed_time = sum(w["block_times_s"][i] for i in REMOVED)
        assert w["removed_blocks_time_s"] == pytest.approx(removed_time)
        total = w["hooked_total_s"]
        assert w["ideal_speedup"] == pytest.approx(total / (total - removed_time))
        assert w["measured_over_ideal"] == pytest.approx(w["speedup"] / w["ideal_speedup"])
    assert data["environment"]["torch"] == torch.__version__


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
    assert cfg.prefill == ((1, 512), (8, 128))
    assert cfg.decode == ((1, 32, 128),)
    assert cfg.warmup == 2 and cfg.repetitions == MIN_REPETITIONS and cfg.measure_blocks


def test_config_round_trip_through_json() -> None:
    cfg = _config(order="random", seed=5)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["prefill"] == [[1, 16], [2, 8]]
    assert BenchmarkConfig.from_dict(data) == cfg


@pytest.mark.parametrize(
    "overrides",
    [
        {"repetitions": 3, "allow_few_repetitions": False},
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
