"""Zero-shot task scoring (lorp.tasks) against log-likelihoods computed independently here."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from lorp.errors import InvalidInputError
from lorp.surgery import remove_blocks
from lorp.tasks import (
    HEADLINE,
    TASKS,
    compare_scores,
    compare_tasks,
    encode_request,
    load_task,
    loglikelihoods,
    parse_tasks,
    score_tasks,
)
from tests.tiny_models import build_tiny, snapshot, tiny_tokenizer

# ---------------------------------------------------------------------------------------------
# Hand-made items, one file per task kind (the shared data's schema).

RECORDS: dict[str, list[dict[str, Any]]] = {
    "hellaswag": [
        {
            "id": "h0",
            "context": "Cooking: A man cuts onions. He",
            "choices": ["puts them in a pan.", "  sings.", "walks away from it all now.", "x"],
            "label": 0,
        },
        {
            "id": "h1",
            "context": "Sports: The girl runs fast",
            "choices": ["and wins.", "then stops to rest a while.", "!", "and falls over."],
            "label": 1,
        },
        {
            "id": "h2",
            "context": "Home: Clean the sink",
            "choices": ["with soap.", "by hand.", "using a sponge and water.", "now."],
            "label": 2,
        },
    ],
    "arc_easy": [
        {
            "id": "a0",
            "context": "Question: What is ice?\nAnswer:",
            "choices": ["frozen water", "hot air", "a rock"],
            "label": 0,
        },
        {
            "id": "a1",
            "context": "Question: Which is a planet?\nAnswer:",
            "choices": ["Mars", "the Moon", "the Sun", "a comet", "Pluto"],
            "label": 0,
        },
    ],
    "winogrande": [
        {
            "id": "w0",
            "context": "Tom beat Bob because _ was stronger.",
            "choices": ["Tom", "Bob"],
            "label": 0,
            "contexts": ["Tom beat Bob because Tom", "Tom beat Bob because Bob"],
            "continuation": "was stronger.",
        },
        {
            "id": "w1",
            "context": "The cup fell off the table so _ broke.",
            "choices": ["cup", "table"],
            "label": 0,
            "contexts": [
                "The cup fell off the table so cup",
                "The cup fell off the table so table",
            ],
            "continuation": "broke.",
        },
    ],
    "boolq": [
        {
            "id": "b0",
            "context": "Cats are mammals.\nQuestion: is a cat a mammal?\nAnswer:",
            "choices": ["no", "yes"],
            "label": 1,
        },
        {
            "id": "b1",
            "context": "Fish live in water.\nQuestion: do fish live on land?\nAnswer:",
            "choices": ["no", "yes"],
            "label": 0,
        },
    ],
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tasks")
    for task, records in RECORDS.items():
        lines = [json.dumps({"task": task, **r}, ensure_ascii=False) for r in records]
        (d / f"{task}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def tok() -> Any:
    return tiny_tokenizer()


# ---------------------------------------------------------------------------------------------
# Independent reference: lm-eval's _encode_pair and one unpadded forward over the whole sequence.


def reference_ll(model: Any, tok: Any, context: str, continuation: str) -> float:
    n = len(context) - len(context.rstrip())
    if n:
        continuation = context[-n:] + continuation
        context = context[:-n]
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    cont = whole[len(ctx) :]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def requests_of(task: str) -> list[list[tuple[str, str]]]:
    out = []
    for r in RECORDS[task]:
        if task == "winogrande":
            out.append([(c, " " + r["continuation"]) for c in r["contexts"]])
        else:
            out.append([(r["context"], " " + c) for c in r["choices"]])
    return out


def first_argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def sample_stderr(xs: list[int]) -> float:
    n = len(xs)
    mean = sum(xs) / n
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1) / n)


ALL_REQUESTS = [
    ("The cat sat", " on the mat"),
    ("Hello", " world!"),
    ("A", " b"),
    ("The cat sat", " there"),
    ("Trailing space  ", "moves"),
    ("A much longer context than all of the others, to force padding", " ok"),
]


# ---------------------------------------------------------------------------------------------
# Data


def test_load_task_builds_lm_eval_requests(data_dir: Path) -> None:
    hs = load_task("hellaswag", data_dir)
    assert [it.id for it in hs] == ["h0", "h1", "h2"]
    assert hs[0].requests[1] == ("Cooking: A man cuts onions. He", "   sings.")
    assert hs[0].norm_lengths == (19, 8, 27, 1)  # characters, leading spaces of "  sings." kept
    assert hs[1].label == 1
    wg = load_task("winogrande", data_dir)
    assert wg[0].requests == (
        ("Tom beat Bob because Tom", " was stronger."),
        ("Tom beat Bob because Bob", " was stronger."),
    )
    assert [it.id for it in load_task("boolq", data_dir, limit=1)] == ["b0"]


def test_norm_lengths_count_characters_not_bytes(tmp_path: Path) -> None:
    rec = {"id": "p", "task": "piqa", "context": "Q", "choices": ["café", "cafe!"], "label": 0}
    (tmp_path / "piqa.jsonl").write_text(json.dumps(rec, ensure_ascii=False) + "\n")
    assert load_task("piqa", tmp_path)[0].norm_lengths == (4, 5)


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"id": "x", "context": "c", "choices": ["a", "b"], "label": 2}, "label"),
        ({"id": "x", "context": "c", "choices": ["a"], "label": 0}, "choices"),
        ({"id": "x", "context": "c", "choices": ["a", ""], "label": 0}, "choices"),
        ({"id": "x", "context": 3, "choices": ["a", "b"], "label": 0}, "context"),
        ({"id": "x", "task": "piqa", "context": "c", "choices": ["a", "b"], "label": 0}, "task"),
    ],
)
def test_malformed_items_are_refused(tmp_path: Path, record: dict[str, Any], match: str) -> None:
    (tmp_path / "boolq.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(InvalidInputError, match=match):
        load_task("boolq", tmp_path)


def test_bad_task_names_files_and_limits(tmp_path: Path, data_dir: Path) -> None:
    with pytest.raises(InvalidInputError, match="unknown task"):
        load_task("mmlu", data_dir)
    with pytest.raises(InvalidInputError, match="not found"):
        load_task("piqa", tmp_path)
    with pytest.raises(InvalidInputError, match="limit"):
        load_task("boolq", data_dir, limit=0)
    (tmp_path / "boolq.jsonl").write_text("{not json\n")
    with pytest.raises(InvalidInputError, match="not JSON"):
        load_task("boolq", tmp_path)
    wg = dict(RECORDS["winogrande"][0], contexts=["only one"])
    (tmp_path / "winogrande.jsonl").write_text(json.dumps(wg) + "\n")
    with pytest.raises(InvalidInputError, match="contexts"):
        load_task("winogrande", tmp_path)


def test_parse_tasks() -> None:
    assert parse_tasks(None) == list(TASKS)
    assert parse_tasks("all") == list(TASKS)
    assert parse_tasks("piqa, boolq,piqa") == ["piqa", "boolq"]
    with pytest.raises(InvalidInputError):
        parse_tasks("piqa,nope")
    with pytest.raises(InvalidInputError):
        parse_tasks([])


# ---------------------------------------------------------------------------------------------
# Tokenisation


class MergingTokenizer:
    """Characters, except that "ab" is one token: a merge across the context/continuation
    boundary must be scored as continuation (lm-eval's whole[len(ctx):])."""

    bos_token_id = 1
    eos_token_id = 2
    pad_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        out, i = [], 0
        while i < len(text):
            if text.startswith("ab", i):
                out.append(100)
                i += 2
            else:
                out.append(3 + ord(text[i]) % 90)
                i += 1
        return ([self.bos_token_id] if add_special_tokens else []) + out


def test_encode_request_follows_lm_eval_encode_pair(tok: Any) -> None:
    ctx, cont = encode_request(tok, "Hi there ", "you")
    assert ctx == tok.encode("Hi there") and cont == tok.encode(" you")
    merging = MergingTokenizer()
    ctx, cont = encode_request(merging, "xa", "b c", add_special_tokens=False)
    assert ctx == merging.encode("xa", False)  # [x, a]
    assert cont == merging.encode("xab c", False)[2:]  # [" ", "c"]: "ab" merged away
    ctx, cont = encode_request(merging, "xa", "b", add_special_tokens=True)
    assert ctx[0] == 1  # the tokenizer's default BOS is kept
    ctx, cont = encode_request(tok, "", " start")
    assert ctx == [tok.bos_token_id] and cont == tok.encode(" start")


# ---------------------------------------------------------------------------------------------
# Log-likelihoods


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gpt2"])
def test_batched_loglikelihoods_equal_reference(tok: Any, family: str) -> None:
    model = build_tiny(family)
    expected = [reference_ll(model, tok, c, x) for c, x in ALL_REQUESTS]
    for batch_size in (1, 3, 16):
        got = loglikelihoods(model, tok, ALL_REQUESTS, batch_size=batch_size)
        assert got == pytest.approx(expected, abs=1e-4), batch_size


def test_bfloat16_batched_equals_unbatched(tok: Any) -> None:
    model = build_tiny("llama").to(torch.bfloat16)
    single = [loglikelihoods(model, tok, [r], batch_size=1)[0] for r in ALL_REQUESTS]
    batched = loglikelihoods(model, tok, ALL_REQUESTS, batch_size=8)
    expected = [reference_ll(model, tok, c, x) for c, x in ALL_REQUESTS]
    assert batched == pytest.approx(single, rel=0.02, abs=0.05)
    assert batched == pytest.approx(expected, rel=0.02, abs=0.05)
    assert all(math.isfinite(v) for v in batched)


def test_left_truncation_to_max_length(tok: Any) -> None:
    model = build_tiny("llama")
    context, continuation = "0123456789abcdefghij", " xyz"
    got = loglikelihoods(model, tok, [(context, continuation)], max_length=10)[0]
    whole = tok.encode(context + continuation)[-11:]  # (ctx + cont)[-(max_length + 1):]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([whole[:-1]])).logits[0], -1)
    expected = sum(float(logp[6 + j, whole[7 + j]]) for j in range(4))
    assert got == pytest.approx(expected, abs=1e-5)


def test_identical_inputs_share_one_row(tok: Any) -> None:
    model = build_tiny("llama")
    rows: list[int] = []
    model.register_forward_pre_hook(
        lambda _m, _a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    reqs = [("Passage. Answer:", " n"), ("Passage. Answer:", " y"), ("Other:", " n")]
    got = loglikelihoods(model, tok, reqs, batch_size=8)
    assert sum(rows) == 2  # " n" / " y" are one token: same model input
    assert got == pytest.approx([reference_ll(model, tok, c, x) for c, x in reqs], abs=1e-5)


def test_batch_size_is_validated(tok: Any) -> None:
    with pytest.raises(InvalidInputError):
        loglikelihoods(build_tiny("llama"), tok, ALL_REQUESTS, batch_size=0)


# ---------------------------------------------------------------------------------------------
# Scores


def test_scores_match_hand_computed_accuracy(tok: Any, data_dir: Path) -> None:
    model = build_tiny("llama")
    calls: list[tuple[str, float, str]] = []
    scores = score_tasks(
        model,
        tok,
        list(RECORDS),
        data_dir=data_dir,
        batch_size=4,
        progress=lambda s, f, m: calls.append((s, f, m)),
    )
    assert list(scores.tasks) == list(RECORDS)
    for task, records in RECORDS.items():
        lls = [[reference_ll(model, tok, c, x) for c, x in reqs] for reqs in requests_of(task)]
        acc = [int(first_argmax(ll) == r["label"]) for ll, r in zip(lls, records, strict=True)]
        got = scores.tasks[task]
        assert got.n == len(records)
        assert got.acc == pytest.approx(sum(acc) / len(acc))
        assert got.acc_stderr == pytest.approx(sample_stderr(acc))
        assert got.metric == HEADLINE[task]
        for ll_got, ll_ref in zip(got.loglikelihoods, lls, strict=True):
            assert list(ll_got) == pytest.approx(ll_ref, abs=1e-4)
        if task in ("winogrande", "boolq"):
            assert got.acc_norm is None and "acc_norm" not in got.to_dict()
        else:
            norm = [
                int(
                    first_argmax([v / len(c) for v, c in zip(ll, r["choices"], strict=True)])
                    == r["label"]
                )
                for ll, r in zip(lls, records, strict=True)
            ]
            assert got.acc_norm == pytest.approx(sum(norm) / len(norm))
            assert got.acc_norm_stderr == pytest.approx(sample_stderr(norm))
            assert got.score == got.acc_norm
    assert calls and calls[-1][1] == pytest.approx(1.0)
    assert all(s == "evaluation" for s, _, _ in calls)
    assert [f for _, f, _ in calls] == sorted(f for _, f, _ in calls)
    json.dumps(scores.to_dict())


def test_acc_norm_differs_from_acc_where_lengths_decide() -> None:
    from lorp.tasks import TaskItem, _score

    item = TaskItem("i", "arc_easy", (("q", " a"), ("q", " bbbb")), (1, 4), label=1)
    s = _score("arc_easy", [item], [(-2.0, -4.0)])
    assert (s.acc, s.acc_norm) == (0.0, 1.0)  # -2/1 < -4/4
    assert s.acc_stderr is None  # n = 1: no sample standard deviation


def test_winogrande_scores_the_shared_continuation(tok: Any, data_dir: Path) -> None:
    model = build_tiny("llama")
    got = score_tasks(model, tok, "winogrande", data_dir=data_dir).tasks["winogrande"]
    r = RECORDS["winogrande"][1]
    # Partial scoring: LL(" broke." | "... so cup") vs LL(" broke." | "... so table"), not the
    # likelihood of the option words themselves.
    expected = [reference_ll(model, tok, c, " " + r["continuation"]) for c in r["contexts"]]
    assert list(got.loglikelihoods[1]) == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Dense vs pruned


def test_compare_tasks_pairs_dense_and_pruned(tok: Any, data_dir: Path) -> None:
    model = build_tiny("llama")
    before = snapshot(model)
    calls: list[float] = []
    cmp = compare_tasks(
        model,
        tok,
        [2, 3],
        ["arc_easy", "boolq", "winogrande"],
        data_dir=data_dir,
        batch_size=3,
        progress=lambda _s, f, _m: calls.append(f),
    )
    # The model is restored exactly.
    assert model.config.num_hidden_layers == 6
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # Dense equals a plain run; pruned equals a physically pruned copy.
    dense = score_tasks(model, tok, ["arc_easy", "boolq", "winogrande"], data_dir=data_dir)
    cut = copy.deepcopy(model)
    remove_blocks(cut, [2, 3])
    pruned = score_tasks(cut, tok, ["arc_easy", "boolq", "winogrande"], data_dir=data_dir)
    for task in dense.tasks:
        for got, ref in ((cmp.dense, dense), (cmp.pruned, pruned)):
            pairs = zip(got.tasks[task].loglikelihoods, ref.tasks[task].loglikelihoods, strict=True)
            for a, b in pairs:
                assert list(a) == pytest.approx(list(b), abs=1e-5)
        d, p = cmp.dense.tasks[task].score, cmp.pruned.tasks[task].score
        assert cmp.retention[task] == (pytest.approx(p / d) if d > 0 else None)
        assert cmp.drop[task] == pytest.approx(d - p)
    assert calls[-1] == pytest.approx(1.0) and calls == sorted(calls)
    out = cmp.to_dict()
    json.dumps(out)
    assert out["removed"] == [2, 3]
    assert set(out["tasks"]) == {"arc_easy", "boolq", "winogrande"}
    assert out["average"]["dense"] == pytest.approx(cmp.dense.average)


def test_compare_reuses_a_dense_run_and_checks_pairing(tok: Any, data_dir: Path) -> None:
    model = build_tiny("llama")
    dense = score_tasks(model, tok, "boolq", data_dir=data_dir)
    cmp = compare_tasks(model, tok, [1], "boolq", data_dir=data_dir, dense=dense)
    assert cmp.dense is dense
    # Paired drop standard error: std of per-item differences / sqrt(n).
    diffs = [
        a - b
        for a, b in zip(
            dense.tasks["boolq"].correct, cmp.pruned.tasks["boolq"].correct, strict=True
        )
    ]
    assert cmp.drop_stderr["boolq"] == pytest.approx(sample_stderr(diffs))
    with pytest.raises(InvalidInputError, match="out of range"):
        compare_tasks(model, tok, [6], "boolq", data_dir=data_dir)
    short = score_tasks(model, tok, "boolq", data_dir=data_dir, limit=1)
    with pytest.raises(InvalidInputError, match="items"):
        compare_scores(dense, short)
    with pytest.raises(InvalidInputError, match="tasks"):
        compare_scores(dense, score_tasks(model, tok, "arc_easy", data_dir=data_dir))


def test_head_equals_a_run_with_that_limit(tok: Any, data_dir: Path) -> None:
    model = build_tiny("llama")
    full = score_tasks(model, tok, ["hellaswag", "boolq"], data_dir=data_dir)
    short = score_tasks(model, tok, ["hellaswag", "boolq"], data_dir=data_dir, limit=2)
    cut = full.head(2)
    assert cut.limit == 2
    for task in short.tasks:
        a, b = cut.tasks[task].to_dict(), short.tasks[task].to_dict()
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == (pytest.approx(b[key]) if isinstance(b[key], float) else b[key])
    with pytest.raises(InvalidInputError):
        full.tasks["boolq"].head(0)
