"""Domain data: the packaged `med` dataset (built into the test session's FORGETCHECK_HOME) and `--data DIR`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import forgetcheck_cli

from forgetcheck.data import domain
from forgetcheck.data.med import build_med, regex_tokens
from forgetcheck.errors import BadInput


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def med(fc_home):
    manifest = domain.prepare_dataset("med")
    d = domain.load_domain("med")
    return d, manifest


def test_med_sizes_and_manifest(med):
    d, man = med
    assert d.packaged and d.root == domain.data_dir("med")
    sft = domain.read_sft(d.sft)
    cpt = domain.read_cpt(d.cpt)
    assert len(sft) >= 5000
    cpt_tokens = sum(regex_tokens(r["text"]) for r in cpt)
    assert cpt_tokens >= 300_000
    # The manifest states what is in the files.
    assert man["sft"]["pairs"] == len(sft)
    assert man["cpt"]["documents"] == len(cpt)
    assert man["cpt"]["tokens_regex"] == cpt_tokens
    assert set(sft[0]) >= {"id", "prompt", "response", "term_id", "template"}
    assert set(cpt[0]) >= {"id", "text", "term_ids"}
    templates = {r["template"] for r in sft}
    assert len(templates) >= 6 and {"hpo_definition_to_term", "icd_code_to_description"} <= templates
    assert len({r["id"] for r in sft}) == len(sft)


def test_med_splits_share_terms_and_heldout_is_disjoint(med):
    d, _ = med
    sft_terms = {r["term_id"] for r in domain.read_sft(d.sft)}
    cpt_terms = {t for r in domain.read_cpt(d.cpt) for t in r["term_ids"]}
    assert sft_terms == cpt_terms  # the arms differ in shape, not content
    held = domain.read_cpt(d.heldout)
    held_terms = {t for r in held for t in r["term_ids"]}
    mc = _jsonl(d.root / "heldout_mc.jsonl")
    mc_terms = {r["term_id"] for r in mc}
    assert held_terms and mc_terms <= held_terms
    assert not held_terms & sft_terms
    # No held-out term's definition appears anywhere in the training text.
    train_text = (d.cpt.read_text(encoding="utf-8") + d.sft.read_text(encoding="utf-8"))
    sample = [r["definition"] for r in mc[:200] if len(r["definition"]) > 60]
    leaked = [s for s in sample if json.dumps(s)[1:-1] in train_text]
    assert sample and not leaked, leaked[:3]


def test_heldout_mc_items_are_well_formed(med):
    d, man = med
    mc = _jsonl(d.root / "heldout_mc.jsonl")
    assert len(mc) == man["heldout"]["mc_items"] >= 500
    text_of = {r["term_ids"][0]: r["text"] for r in domain.read_cpt(d.heldout) if r["source"] == "hpo"}
    for item in mc:
        assert len(item["choices"]) == 4 and len({c.lower() for c in item["choices"]}) == 4
        answer = item["choices"][item["label"]]
        assert f"{answer} ({item['term_id']})" in text_of[item["term_id"]]  # the held-out term's own name
    labels = [i["label"] for i in mc]
    assert min(labels.count(k) for k in range(4)) > len(mc) / 8  # answers are not all in one position


def test_prepare_is_idempotent_and_deterministic(med, tmp_path):
    d, _ = med
    before = (d.root / "sft.jsonl").stat().st_mtime_ns
    domain.prepare_dataset("med")  # already built: nothing is rewritten
    assert (d.root / "sft.jsonl").stat().st_mtime_ns == before
    rebuilt = tmp_path / "again"
    rebuilt.mkdir()
    build_med(rebuilt, model_tokens=False)
    for f in ("sft.jsonl", "cpt.jsonl", "heldout.jsonl", "heldout_mc.jsonl", "recall_mc.jsonl"):
        digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (d.root / f, rebuilt / f)]
        assert digest[0] == digest[1], f
    assert not [p for p in d.root.parent.iterdir() if p.name.startswith(".med.")]  # no temp dirs left


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_user_folder_loads(tmp_path):
    _write(tmp_path / "sft.jsonl", [json.dumps({"prompt": "What is 2+2?", "response": "4"}),
                                    "", json.dumps({"prompt": "Hi", "response": "Hello", "extra": 1})])
    _write(tmp_path / "cpt.jsonl", [json.dumps({"text": "Some domain text."})])
    d = domain.load_domain(str(tmp_path))
    assert not d.packaged and d.heldout is None
    assert d.sft == (tmp_path / "sft.jsonl").resolve() and d.cpt == (tmp_path / "cpt.jsonl").resolve()
    rows = domain.read_sft(d.sft)
    assert [r["response"] for r in rows] == ["4", "Hello"]
    assert domain.read_cpt(d.cpt)[0]["text"] == "Some domain text."
    # cpt.jsonl alone is a valid dataset too
    only = tmp_path / "only_cpt"
    only.mkdir()
    _write(only / "cpt.jsonl", [json.dumps({"text": "x"})])
    assert domain.load_domain(str(only)).sft is None


def test_malformed_lines_are_all_reported_with_file_and_line(tmp_path):
    _write(tmp_path / "sft.jsonl", [
        json.dumps({"prompt": "ok", "response": "ok"}),
        "{not json",
        json.dumps({"prompt": "no response"}),
        json.dumps({"prompt": 3, "response": "x"}),
        json.dumps({"prompt": "  ", "response": "x"}),
        json.dumps(["a", "list"]),
    ])
    _write(tmp_path / "cpt.jsonl", [json.dumps({"text": "fine"}), json.dumps({"txt": "typo"})])
    with pytest.raises(BadInput) as e:
        domain.load_domain(str(tmp_path))
    msg = str(e.value)
    assert "(6 problems)" in msg
    for where in ("sft.jsonl:2:", "sft.jsonl:3: missing field 'response'", "sft.jsonl:4: field 'prompt' must be a string (got int)",
                  "sft.jsonl:5: field 'prompt' is empty", "sft.jsonl:6:", "cpt.jsonl:2: missing field 'text'"):
        assert where in msg
    assert "sft.jsonl:1:" not in msg and "cpt.jsonl:1:" not in msg


def test_problem_listing_is_capped(tmp_path):
    _write(tmp_path / "cpt.jsonl", ["oops"] * 25)
    with pytest.raises(BadInput) as e:
        domain.load_domain(str(tmp_path))
    msg = str(e.value)
    assert "(25 problems)" in msg and "and 15 more" in msg
    assert "cpt.jsonl:10:" in msg and "cpt.jsonl:11:" not in msg


def test_unknown_or_empty_data_is_bad_input(tmp_path, monkeypatch):
    with pytest.raises(BadInput, match="med"):
        domain.load_domain(str(tmp_path / "nosuch"))
    with pytest.raises(BadInput, match="neither sft.jsonl nor cpt.jsonl"):
        domain.load_domain(str(tmp_path))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(BadInput, match="is a file"):
        domain.load_domain(str(tmp_path / "file.txt"))
    _write(tmp_path / "sft.jsonl", [""])
    with pytest.raises(BadInput, match="no records"):
        domain.load_domain(str(tmp_path))
    monkeypatch.setenv("FORGETCHECK_HOME", str(tmp_path / "fresh_home"))
    with pytest.raises(BadInput, match="forgetcheck data prepare med"):
        domain.load_domain("med")




def test_cli_prepare_unknown_dataset_exits_2_with_one_line():
    r = forgetcheck_cli("data", "prepare", "nosuch")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert "nosuch" in lines[0] and "med" in lines[0]


def test_cli_list_shows_packaged_and_own_folder_usage(med):
    r = forgetcheck_cli("data", "list")
    assert r.returncode == 0, r.stderr
    assert "med" in r.stdout and "prepared at" in r.stdout
    assert f"{med[1]['sft']['pairs']:,}" in r.stdout
    assert "--data DIR" in r.stdout
