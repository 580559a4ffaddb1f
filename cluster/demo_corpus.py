"""A corpus the demo writes itself when no data is given: arithmetic word problems, each answered step
by step, in the shape of the paper's CoT data (chat ``messages`` + ``reasoning``)."""

from __future__ import annotations

import json
import random
from pathlib import Path

__all__ = ["write_word_problems"]

_NAMES = ["Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jun"]
_ITEMS = ["apples", "stamps", "marbles", "books", "coins", "stickers", "pencils", "shells"]
_SYSTEM = "You are a helpful and rigorous math reasoning assistant."


def _problem(rng: random.Random) -> tuple[str, str, int]:
    a, b = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    x, more, given, bought = rng.randint(5, 60), rng.randint(2, 40), rng.randint(1, 5), rng.randint(3, 12)
    y = x + more
    left = y - given
    total = left + bought
    question = (f"{a} has {x} {item}. {b} has {more} more {item} than {a}. {b} gives away {given} {item} "
                f"and then buys {bought} more. How many {item} does {b} have now?")
    reasoning = (
        f"Let me work through this step by step.\n\nFirst, {a} has {x} {item}.\n"
        f"{b} has {more} more than {a}, so {b} starts with {x} + {more} = {y} {item}.\n"
        f"Then {b} gives away {given}, leaving {y} - {given} = {left} {item}.\n"
        f"Finally {b} buys {bought} more: {left} + {bought} = {total} {item}.\n\n"
        f"Let me double-check: {x} + {more} - {given} + {bought} = {total}. Yes.\n\nThe answer is {total}."
    )
    return question, reasoning, total


def write_word_problems(path: Path, *, n: int = 24, seed: int = 0) -> Path:
    """Write ``n`` problems as jsonl (fields id, problem, messages, reasoning, answer) and return the path."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for i in range(n):
            question, reasoning, answer = _problem(rng)
            messages = [{"role": "system", "content": _SYSTEM},
                        {"role": "user", "content": f"Solve the problem step by step.\n\nProblem:\n{question}"}]
            record = {"id": f"wp-{i:03d}", "problem": question, "messages": messages, "reasoning": reasoning, "answer": answer}
            out.write(json.dumps(record) + "\n")
    return path
