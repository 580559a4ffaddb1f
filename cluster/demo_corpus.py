"""Corpora the demo writes itself, so it runs with no network and no data beside it, and the probe set it cuts
from real mail when ../shared/data is there.

Arithmetic word problems of four kinds, each answered step by step, in the shape of the paper's CoT data (chat
``messages`` + ``reasoning``); :func:`write_training_pairs` turns the same generator into query/positive pairs for
the demo's InfoNCE runs. Their ``kind`` labels the fallback probe corpus, but a mean of token embeddings reads
it off the words (every hidden state separates it perfectly), so transfer says nothing with it.

:func:`read_mail_probes` cuts the probe corpus the demo prefers: hard ham against spam from the SpamAssassin
corpus, balanced. Hard ham is legitimate mail that reads like spam (newsletters, prize notices, renewal
reminders), so the label is not read off the words alone and the probes have something to transfer.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hrsa.store.errors import UserError
from hrsa.store.records import iter_json_lines

__all__ = ["KINDS", "read_mail_probes", "write_dev_pairs", "write_mail_probes", "write_training_pairs",
           "write_word_problems"]

_NAMES = ["Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena"]
_ITEMS = ["apples", "stamps", "marbles", "books", "coins", "stickers", "pencils", "shells", "cards", "beads"]
_SYSTEM = "You are a helpful and rigorous math reasoning assistant."


def _change(rng: random.Random) -> tuple[str, str, int]:
    a, b = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    x, more, given, bought = rng.randint(5, 60), rng.randint(2, 40), rng.randint(1, 5), rng.randint(3, 12)
    y, total = x + more, x + more - given + bought
    question = (f"{a} has {x} {item}. {b} has {more} more {item} than {a}. {b} gives away {given} {item} "
                f"and then buys {bought} more. How many {item} does {b} have now?")
    steps = (f"First, {a} has {x} {item}.\n{b} has {more} more than {a}, so {b} starts with {x} + {more} = {y} {item}.\n"
             f"Then {b} gives away {given}, leaving {y} - {given} = {y - given} {item}.\n"
             f"Finally {b} buys {bought} more: {y - given} + {bought} = {total} {item}.")
    return question, steps, total


def _groups(rng: random.Random) -> tuple[str, str, int]:
    a = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    boxes, per, extra = rng.randint(3, 12), rng.randint(4, 15), rng.randint(1, 9)
    total = boxes * per + extra
    question = (f"{a} buys {boxes} boxes of {item} with {per} {item} in each box, and finds {extra} loose {item}. "
                f"How many {item} does {a} have in all?")
    steps = (f"Each box holds {per} {item}, and there are {boxes} boxes.\nSo the boxes hold {boxes} x {per} = "
             f"{boxes * per} {item}.\nAdding the {extra} loose ones: {boxes * per} + {extra} = {total}.")
    return question, steps, total


def _sharing(rng: random.Random) -> tuple[str, str, int]:
    a = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    friends, each = rng.randint(2, 9), rng.randint(3, 14)
    total = friends * each
    question = f"{a} shares {total} {item} equally among {friends} friends. How many {item} does each friend get?"
    steps = (f"There are {total} {item} to split into {friends} equal parts.\nEach friend gets {total} / {friends} = "
             f"{each} {item}.\nCheck: {friends} x {each} = {total}.")
    return question, steps, each


def _percent(rng: random.Random) -> tuple[str, str, int]:
    a = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    price, pct = rng.randint(2, 40) * 10, rng.choice([10, 20, 25, 30, 50])
    off = price * pct // 100
    question = f"A set of {item} costs {price} dollars. {a} gets a {pct}% discount. How much does {a} pay?"
    steps = (f"The discount is {pct}% of {price}, which is {price} x {pct} / 100 = {off} dollars.\n"
             f"So {a} pays {price} - {off} = {price - off} dollars.")
    return question, steps, price - off


KINDS: dict[str, Callable[[random.Random], tuple[str, str, int]]] = {
    "change": _change, "groups": _groups, "sharing": _sharing, "percent": _percent,
}


def _problems(n: int, seed: int) -> Iterator[tuple[str, str, str, int]]:
    """(kind, question, worked reasoning, answer), the kinds taking turns so every label is balanced."""
    rng = random.Random(seed)
    kinds = list(KINDS)
    for i in range(n):
        kind = kinds[i % len(kinds)]
        question, steps, answer = KINDS[kind](rng)
        yield kind, question, f"Let me work through this step by step.\n\n{steps}\n\nThe answer is {answer}.", answer


def write_word_problems(path: Path, *, n: int = 24, seed: int = 0) -> Path:
    """Write ``n`` problems as jsonl (fields id, kind, problem, messages, reasoning, answer) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for i, (kind, question, reasoning, answer) in enumerate(_problems(n, seed)):
            messages = [{"role": "system", "content": _SYSTEM},
                        {"role": "user", "content": f"Solve the problem step by step.\n\nProblem:\n{question}"}]
            record = {"id": f"wp-{i:03d}", "kind": kind, "problem": question, "messages": messages,
                      "reasoning": reasoning, "answer": answer}
            out.write(json.dumps(record) + "\n")
    return path


def write_training_pairs(path: Path, *, n: int = 256, seed: int = 1) -> Path:
    """Write ``n`` retrieval pairs (query = a problem, pos = its worked solution) as jsonl for InfoNCE."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for kind, question, reasoning, _ in _problems(n, seed):
            out.write(json.dumps({"query": question, "pos": reasoning, "kind": kind}) + "\n")
    return path


def write_dev_pairs(path: Path, *, training: Path, n: int = 64, seed: int = 2) -> Path:
    """Write ``n`` held-out retrieval pairs (as :func:`write_training_pairs`, another seed), none whose problem is a
    query of the ``training`` pairs: what the embedding models are scored on, never trained on."""
    seen = {json.loads(line)["query"] for line in training.read_text(encoding="utf-8").splitlines() if line.strip()}
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    for kind, question, reasoning, _ in _problems(n + len(seen), seed):
        if question not in seen and len(kept) < n:
            seen.add(question)  # each query once: the lines of one query are one query with all their positives
            kept.append((kind, question, reasoning))
    path.write_text("".join(json.dumps({"query": q, "pos": r, "kind": k}) + "\n" for k, q, r in kept),
                    encoding="utf-8")
    return path


def read_mail_probes(source: Path, *, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` mails (half hard ham, half spam, as far as the source has them) from a SpamAssassin jsonl (fields id,
    group, label, text; or the folder holding spam-assassin.jsonl), as records with fields id, label, text, in a
    seeded random order. Read before the demo does any work: a wrong file costs a line, not a minute.

    Raises:
        UserError: no such file, a line that is not a JSON object or not UTF-8, or no hard ham or no spam.
    """
    if source.is_dir():
        source = source / "spam-assassin.jsonl"
    if not source.is_file():
        raise UserError(f"Expected the SpamAssassin jsonl at {source}. Got no such file instead. Pass "
                        "../shared/data/spam-assassin/spam-assassin.jsonl.")
    records = [r for _, r in iter_json_lines(source, error=UserError)]
    ham = [r for r in records if r.get("group") == "hard-ham-1"]
    spam = [r for r in records if r.get("label") == "spam"]
    if not ham or not spam:
        raise UserError(f"Expected hard ham (group hard-ham-1) and spam in {source}. Got {len(ham)} hard ham and "
                        f"{len(spam)} spam instead. Pass ../shared/data/spam-assassin/spam-assassin.jsonl.")
    rng = random.Random(seed)
    half = min(n // 2, len(ham), len(spam))
    chosen = rng.sample(ham, half) + rng.sample(spam, half)
    rng.shuffle(chosen)
    return [{"id": r["id"], "label": r["label"], "text": r["text"]} for r in chosen]


def write_mail_probes(mails: list[dict[str, Any]], path: Path) -> Path:
    """Write the mails :func:`read_mail_probes` chose as jsonl."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for r in mails:
            out.write(json.dumps(r) + "\n")
    return path
