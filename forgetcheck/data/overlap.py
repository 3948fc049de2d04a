"""The contamination check every evaluation and training text goes through: two texts overlap when they share
a 13-word sequence (lower-cased `\\w+` words), as in the GPT-3 paper's check. The replay text (data/replay.py)
drops paragraphs that overlap any evaluation document, and the drift text (data/benchmarks.py) drops paragraphs that
overlap any evaluation item."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

NGRAM = 13
WORD = re.compile(r"\w+")


def strings(obj) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from strings(v)


def evaluation_texts(files: Iterable[Path]) -> Iterator[str]:
    """Every string field of every row (question, choices, passages, targets) of the evaluation files, one row
    joined into one document."""
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield "\n".join(strings(json.loads(line)))


def overlap_count(texts: Iterable[str], eval_texts: Iterable[str], n: int = NGRAM) -> tuple[int, set[int]]:
    """(shared n-grams, indices of `texts` that share at least one n-gram with any of `eval_texts`).

    Words are numbered by `texts`' vocabulary; a window of `eval_texts` holding a word `texts` never use
    cannot be shared, so only windows of n known words are looked up (most windows of unrelated text are not)."""
    texts = list(texts)
    vocab: dict[str, int] = {}
    owner: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(texts):
        ids = [vocab.setdefault(w, len(vocab)) for w in WORD.findall(t.lower())]
        for j in range(len(ids) - n + 1):
            owner.setdefault(tuple(ids[j:j + n]), []).append(i)
    shared: set[tuple[int, ...]] = set()
    for doc in eval_texts:
        ids = [vocab.get(w, -1) for w in WORD.findall(doc.lower())]
        run = 0  # known words in a row, ending at j
        for j, x in enumerate(ids):
            run = run + 1 if x >= 0 else 0
            if run >= n:
                g = tuple(ids[j - n + 1:j + 1])
                if g in owner:
                    shared.add(g)
    hit = {i for g in shared for i in owner[g]}
    return len(shared), hit


def shared_beyond_answer(question: str, answer: str, training: Iterable[str], n: int = NGRAM) -> set[tuple[str, ...]]:
    """The n-grams of an item (`question` then `answer`) that a training text also holds, leaving out those that lie
    wholly inside the answer: an item that asks a trained fact in its training text's own words tests the string,
    not the fact (a recall item must return an empty set)."""
    q, a = WORD.findall(question.lower()), WORD.findall(answer.lower())
    words = q + a
    grams = {tuple(words[j:j + n]) for j in range(min(len(q), len(words) - n + 1))}  # each starts in the question
    if not grams:
        return set()
    seen: set[tuple[str, ...]] = set()
    for text in training:
        w = WORD.findall(text.lower())
        seen.update(g for g in (tuple(w[j:j + n]) for j in range(len(w) - n + 1)) if g in grams)
    return seen
