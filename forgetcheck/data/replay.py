"""The general, pretraining-like English text that the `replay` arm mixes into its token stream.

Source: the prose of the Python documentation that every CPython installation ships as the standard-library
module `pydoc_data.topics` (the text `help()` shows: the language reference's sections on statements,
expressions, data model, ...; PSF License). It is installed with Python itself, so it is offline and needs no
download; it is ordinary English expository prose (not question/answer, not medical), and no evaluation text
of forgetcheck comes from it. Grammar rules and code examples (indented blocks) and section underlines are
dropped; wrapped lines are joined; paragraphs under 12 words are dropped. See tasks/README.md (data card).

Disjointness from every evaluation text is enforced when the file is built: a paragraph that shares any
13-word sequence (lower-cased `\\w+` words, as in the GPT-3 paper's contamination check) with any document of
the benchmark files (`$FORGETCHECK_HOME/bench/*.jsonl`: every retention and domain task, and the drift/perplexity
text `general_text.jsonl`) or with the held-out files of a prepared `med` is dropped, and the number
dropped is recorded in the manifest. `overlap_count` recomputes the check (tests/train/test_arms.py).

Built into `$FORGETCHECK_HOME/data/general/replay.jsonl` (+ manifest.json) once; the text depends on the Python
version, which the manifest records.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from forgetcheck.config import forgetcheck_home
from forgetcheck.data.overlap import NGRAM, WORD, evaluation_texts, overlap_count
from forgetcheck.rundir import atomic_write_json, atomic_write_jsonl

BUILD_VERSION = 1
MIN_WORDS = 12
SOURCE = ("CPython standard library `pydoc_data.topics` (the Python documentation's topic texts), "
          "Python {v}; PSF License")
LICENCE = "PSF-2.0 (Python Software Foundation License)"
_UNDERLINE = re.compile(r"^\s*([*=\-~^\"#+])\1{2,}\s*$")


def general_dir() -> Path:
    return forgetcheck_home() / "data" / "general"


def replay_file() -> Path:
    return general_dir() / "replay.jsonl"


def paragraphs() -> list[tuple[str, str]]:
    """(topic, paragraph) pairs of the documentation prose, in a fixed order (sorted topics)."""
    from pydoc_data.topics import topics

    out: list[tuple[str, str]] = []
    for name in sorted(topics):
        lines = topics[name].splitlines()
        block: list[str] = []
        for i, line in enumerate(lines + [""]):
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            if not line.strip() or line.startswith("   ") or _UNDERLINE.match(line) or _UNDERLINE.match(nxt):
                # a blank line, an indented (code/grammar) line, a title or its underline ends a paragraph
                text = " ".join(x.strip() for x in block).strip()
                block = []
                if len(WORD.findall(text)) >= MIN_WORDS:
                    out.append((name, text))
                continue
            block.append(line)
    return out


def is_built() -> bool:
    man = general_dir() / "manifest.json"
    if not (man.exists() and replay_file().exists()):
        return False
    m = json.loads(man.read_text())
    return m.get("build_version") == BUILD_VERSION and m.get("python") == _py()


def _py() -> str:
    return ".".join(map(str, sys.version_info[:3]))


def build(*, force: bool = False) -> dict:
    """Write replay.jsonl (paragraphs that share no 13-gram with any evaluation document) and its manifest."""
    from forgetcheck.data import benchmarks

    man_path = general_dir() / "manifest.json"
    if is_built() and not force:
        return json.loads(man_path.read_text())
    benchmarks.prepare_bench()
    paras = paragraphs()
    files = benchmarks.evaluation_files()
    n_shared, hit = overlap_count((t for _, t in paras), evaluation_texts(files))
    kept = [{"id": i, "topic": topic, "text": text} for i, (topic, text) in enumerate(paras) if i not in hit]
    general_dir().mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(replay_file(), kept)
    manifest = {"schema_version": 1, "build_version": BUILD_VERSION, "python": _py(),
                "source": SOURCE.format(v=_py()), "licence": LICENCE, "paragraphs": len(paras),
                "kept": len(kept), "dropped_overlap": len(hit), "shared_ngrams_dropped": n_shared,
                "ngram": NGRAM, "words": sum(len(WORD.findall(r["text"])) for r in kept),
                "checked_against": [str(p.name) for p in files]}
    atomic_write_json(man_path, manifest)
    return manifest


def load(*, prepare: bool = True) -> list[str]:
    """The replay paragraphs (built first when missing and `prepare`)."""
    from forgetcheck.errors import BadInput

    if not is_built():
        if not prepare:
            raise BadInput("the replay text is not built yet: run `forgetcheck data prepare med` (or any run "
                           "with --arms replay builds it)")
        build()
    with open(replay_file(), encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]
