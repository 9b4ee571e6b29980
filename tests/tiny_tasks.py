"""Tiny task data in the schema of ``../shared/data/tasks`` (one ``<task>.jsonl`` per task), so
tests of the task paths (``lorp eval tasks``, ``PruneConfig.tasks``, jobs with ``tasks``) never
depend on the real data or its size. Items are short (the tiny models' tokenizer is
character-level) and deterministic."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TASK_NAMES = ("hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande", "boolq")

_WORDS = ("red", "blue", "cat", "dog", "sun", "tree", "fish", "rock", "milk", "rain", "boat")


def _word(i: int) -> str:
    return _WORDS[i % len(_WORDS)]


def _record(task: str, i: int) -> dict[str, Any]:
    a, b, c, d = _word(i), _word(i + 3), _word(i + 5), _word(i + 7)
    if task == "winogrande":
        options = [a.title(), b.title()]
        sentence = f"{options[0]} met {options[1]} because _ was {c}."
        cut = sentence.index("_")
        return {
            "id": f"wg-{i}",
            "task": task,
            "context": sentence,
            "choices": options,
            "label": i % 2,
            "contexts": [sentence[:cut] + o for o in options],
            "continuation": sentence[cut + 1 :].strip(),
            "scoring": "partial",
        }
    if task == "boolq":
        return {
            "id": f"boolq/validation/{i}",
            "task": task,
            "context": f"The {a} is {b}.\nQuestion: is the {a} {c}?\nAnswer:",
            "choices": ["no", "yes"],
            "label": i % 2,
            "scoring": "acc",
        }
    if task == "hellaswag":
        choices = [f"the {a} {b}.", f"a {c}.", f"then {d} and {a}.", f"{b}"]
        context = f"Home: The {c} sees"
    elif task == "piqa":
        choices = [f"use a {a}.", f"use the {b} and {c}."]
        context = f"Question: How to clean a {d}?\nAnswer:"
    else:  # ARC
        choices = [a, b, c] if task == "arc_easy" else [a, b, c, d]
        context = f"Question: Which is {d}?\nAnswer:"
    return {
        "id": f"{task}/{i}",
        "task": task,
        "context": context,
        "choices": choices,
        "label": i % len(choices),
        "scoring": "acc, acc_norm",
    }


def write_tiny_tasks(directory: Path, items: int = 12) -> Path:
    """Write ``items`` items of each of the six tasks into ``directory`` (created); returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    for task in TASK_NAMES:
        lines = [json.dumps(_record(task, i)) for i in range(items)]
        (directory / f"{task}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory
