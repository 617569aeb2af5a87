"""Verifiable tasks for the GRPO experiment: seeded arithmetic and word problems with exact answers.

``make_problems(n, seed)`` gives ``n`` problems as ``{"prompt": [chat messages], "answer": int,
"question": str}`` rows (the shape TRL's ``GRPOTrainer`` takes as a dataset). ``final_number(text)``
parses the last number of a completion; ``correctness_reward`` is a TRL-style reward function:
1.0 when that number equals the answer, else 0.0.
"""

from __future__ import annotations

import random
import re
from typing import Any, Sequence

INSTRUCTION = "Answer with the final number at the end."

_NAMES = ("Sam", "Ana", "Tom", "Mia", "Leo", "Zoe", "Ben", "Ivy")
_ITEMS = ("apples", "pens", "books", "coins", "stickers", "marbles", "cookies", "cards")


def _problem(rng: random.Random) -> tuple[str, int]:
    kind = rng.randrange(6)
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    if kind == 0:
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        return f"What is {a} + {b}?", a + b
    if kind == 1:
        a = rng.randint(5, 30)
        b = rng.randint(1, a)
        return f"What is {a} - {b}?", a - b
    if kind == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return f"What is {a} times {b}?", a * b
    if kind == 3:
        a, b = rng.randint(2, 15), rng.randint(2, 15)
        return f"{name} has {a} {item}. {name} gets {b} more {item}. How many {item} does {name} have now?", a + b
    if kind == 4:
        a = rng.randint(6, 25)
        b = rng.randint(1, a - 1)
        return f"{name} has {a} {item} and gives {b} of them away. How many {item} are left?", a - b
    a, b = rng.randint(2, 6), rng.randint(2, 9)
    return f"A box holds {b} {item}. How many {item} are in {a} boxes?", a * b


def make_problems(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` seeded problems (same ``seed`` -> same problems, in the same order)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q, ans = _problem(rng)
        rows.append({"prompt": [{"role": "user", "content": f"{q} {INSTRUCTION}"}], "answer": ans, "question": q})
    return rows


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> float | None:
    """The last number in ``text`` ("1,200" -> 1200, "-3" -> -3, "12.0" -> 12.0), or None."""
    if not isinstance(text, str):
        raise TypeError(f"final_number expects a str, got {type(text).__name__}")
    for m in reversed(_NUMBER.findall(text)):
        s = m.replace(",", "")
        try:
            return float(s)
        except ValueError:  # e.g. a stray comma-only group
            continue
    return None


def completion_text(completion: Any) -> str:
    """Text of a completion as TRL passes it: a string, or a list of chat messages (last one's content)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"completion must be a str or a list of chat messages, got {type(completion).__name__}")


def correctness_reward(completions: Sequence[Any], answer: Sequence[float], **_: Any) -> list[float]:
    """1.0 where the completion's final number equals the answer, else 0.0 (TRL reward signature)."""
    if len(completions) != len(answer):
        raise ValueError(f"got {len(completions)} completions for {len(answer)} answers")
    out = []
    for c, a in zip(completions, answer):
        x = final_number(completion_text(c))
        out.append(1.0 if x is not None and abs(x - float(a)) < 1e-9 else 0.0)
    return out
