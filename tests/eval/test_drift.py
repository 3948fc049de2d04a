"""The drift text as the drift rules read it (eval/drift.py): one row per document, each block inside one
document with that document's id, the same rows for a later evaluation against the saved top-k file, and an
older top-k file (no document ids) refused in one line. The tiny random GPT-2; no lm-eval scoring."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import forgetcheck_cli, one_line_exit_2

from forgetcheck.errors import BadInput
from forgetcheck.eval.drift import (
    DRIFT_BLOCK,
    DRIFT_DOC_TOKENS,
    DRIFT_DOCS,
    drift_blocks,
    drift_documents,
    drift_pass,
    drift_text,
    load_reference,
    scored_mask,
)
from forgetcheck.schema import SCHEMA_VERSION

WORDS = ("the river city market bank trade ship harbour king church school village mountain valley winter "
         "summer bridge railway station museum").split()
ARTICLES = 40


def _paragraph(a: int, p: int) -> str:
    n = 12 + (a * 11 + p * 5) % 80  # 12 to 91 words: some rows cut at DRIFT_DOC_TOKENS, some shorter
    return " ".join(WORDS[(a * 3 + p + j * 7) % len(WORDS)] for j in range(n)).capitalize() + "."


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    """A retention perplexity task of 40 articles, 2 paragraphs each, a paragraph's article in `cluster`: the
    articles' first paragraphs, then their second ones, with one article's second paragraph early, and a
    paragraph too short to score."""
    root = tmp_path_factory.mktemp("clustered")
    rows = [{"text": _paragraph(a, 0), "cluster": f"article {a}"} for a in range(ARTICLES)]
    rows.insert(1, {"text": _paragraph(0, 1), "cluster": "article 0"})  # not a new document
    rows.insert(3, {"text": ".", "cluster": "article x"})  # under 2 tokens: no row
    rows += [{"text": _paragraph(a, 1), "cluster": f"article {a}"} for a in range(1, ARTICLES)]
    (root / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "fc_clustered_ppl.yaml").write_text(
        "task: fc_clustered_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {root / 'text.jsonl'}\ntest_split: test\noutput_type: loglikelihood_rolling\n"
        "doc_to_text: \"\"\ndoc_to_target: text\nmetric_list:\n  - metric: bits_per_byte\n"
        "metadata:\n  version: 1.0\n  suite: retention\n  chance: null\n")
    return root, rows


@pytest.fixture(scope="module")
def tiny(tiny_ref):
    from forgetcheck.models import registry

    model, tok = registry.load(tiny_ref)
    return model.eval(), tok


@pytest.fixture(scope="module")
def text(clustered, tiny):
    texts, docs, _ = drift_text([], clustered[0])
    return drift_documents(tiny[1], texts, docs)


def test_drift_text_knows_each_documents_id(clustered):
    root, rows = clustered
    texts, docs, source = drift_text([], root)
    assert texts == [r["text"] for r in rows] and docs == [r["cluster"] for r in rows]
    assert "fc_clustered_ppl" in source


def test_drift_text_is_one_row_per_document_and_spans_32_or_more(clustered, tiny, text):
    _, rows = clustered
    tok = tiny[1]
    assert DRIFT_DOCS >= 32
    docs = text["document"].tolist()
    assert len(docs) == len(set(docs)) == ARTICLES >= 32  # every article once, the too-short one left out
    first: dict[str, str] = {}
    for r in rows:
        first.setdefault(r["cluster"], r["text"])
    for i, d in enumerate(docs):  # the first DRIFT_DOC_TOKENS tokens of the document's first paragraph
        ids = tok(first[d], add_special_tokens=False)["input_ids"][:DRIFT_DOC_TOKENS]
        n = int(text["lengths"][i])
        assert n == len(ids) and text["input_ids"][i, :n].tolist() == ids and not text["input_ids"][i, n:].any()
    assert text["lengths"].max() == DRIFT_DOC_TOKENS > text["lengths"].min()
    fewer = drift_documents(tok, [r["text"] for r in rows], [r["cluster"] for r in rows], n_docs=5)
    assert fewer["document"].tolist() == docs[:5]


def test_every_block_lies_in_one_document_and_carries_its_id(tiny, text):
    model, _ = tiny
    ids, lengths = text["input_ids"], text["lengths"]
    scored = drift_pass(model, ids, "cpu", None, lengths)
    for j in (0, int(np.argmin(lengths)), len(lengths) - 1):  # several rows to a pass: as if scored alone
        n = int(lengths[j])
        alone = drift_pass(model, ids[j:j + 1, :n], "cpu")
        assert scored["nll"][j, :n - 1] == pytest.approx(alone["nll"][0], abs=1e-4)
        assert not scored["nll"][j, n - 1:].any() and not scored["topk_logp"][j, n - 1:].any()
    b = drift_blocks(scored, lengths, text["document"])
    assert len(b["sequence"]) == len(b["document"]) == len(b["positions"]) == len(b["nll"])
    assert all(d == text["document"][s] for s, d in zip(b["sequence"], b["document"]))  # one document each
    assert all(0 < p <= DRIFT_BLOCK for p in b["positions"])
    per_row = np.bincount(b["sequence"], weights=b["positions"])
    assert per_row.tolist() == (lengths - 1).tolist()  # every scored position in exactly one block
    assert len(set(b["document"])) == ARTICLES
    mask = scored_mask(lengths, ids.shape[1])
    assert np.average(b["nll"], weights=b["positions"]) == pytest.approx(scored["nll"][mask].mean(), rel=1e-5)


def _old_reference(folder) -> tuple:
    """An eval JSON and the top-k file an older forgetcheck wrote beside it: no lengths, no document ids."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    np.savez_compressed(folder / "old.topk.npz", input_ids=rng.integers(0, 50, (2, 8)),
                        topk_logp=np.full((2, 7, 4), -2.0, np.float32), topk_idx=np.zeros((2, 7, 4), np.int32),
                        tail_logp=np.full((2, 7), -1.0, np.float32))
    path = folder / "old.json"
    path.write_text(json.dumps({"schema_version": SCHEMA_VERSION, "kind": "eval", "model": {"name": "old"},
                                "tasks": {}, "drift": {"topk_file": "old.topk.npz", "perplexity": 9.0,
                                                       "text": {"source": "x", "tokens_scored": 14}}}))
    return path


def test_an_older_top_k_file_is_refused_in_one_line(tmp_path, tiny_ref, tasks_dir):
    path = _old_reference(tmp_path / "ref")
    with pytest.raises(BadInput) as e:
        load_reference(path)
    msg = str(e.value)
    assert "\n" not in msg and "no document ids" in msg and "re-run `forgetcheck eval` on the reference" in msg
    r = forgetcheck_cli("eval", "--model", "tiny-gpt2", "--tasks", "fc_fixture_ppl", "--tasks-dir", tasks_dir,
                        "--out", tmp_path / "x.json", "--reference", path)
    line = one_line_exit_2(r)
    assert "no document ids" in line and "re-run `forgetcheck eval` on the reference model" in line
    assert not (tmp_path / "x.json").exists()
