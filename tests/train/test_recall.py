"""Recall items (train/recall.py, data/med.py `recall_items`): questions only about facts every arm trained on whole,
worded unlike their training text; the packer feeds SFT and CPT the same facts in the same order."""

from __future__ import annotations

import json

import pytest

from forgetcheck import config
from forgetcheck.data import domain
from forgetcheck.data.overlap import shared_beyond_answer
from forgetcheck.train import recall
from forgetcheck.train.loop import optimizer_steps, rows_per_step
from forgetcheck.train.packing import build_rows, epoch_order, record_units


@pytest.fixture(scope="module")
def med(fc_home):
    domain.prepare_dataset("med")
    return domain.load_domain("med")


@pytest.fixture(scope="module")
def tok(tiny_ref):
    from forgetcheck.models.registry import load_tokenizer

    return load_tokenizer(tiny_ref)


def _cfg(budget: int, arms=("sft", "cpt"), **train) -> config.RunConfig:
    t, e = config.apply_preset("quick", {"budget_tokens": budget, "seq_len": 128, "micro_batch": 4, **train}, {})
    return config.RunConfig(arms=arms, train=t, eval=e)


def _stream(arm: str, tok, med, cfg: config.RunConfig) -> str:
    """Everything `arm` trains on, decoded: the rows as training builds them."""
    path = med.cpt if arm == "cpt" else med.sft
    rows = build_rows(arm, tok, path, cfg.train, optimizer_steps(cfg.train) * rows_per_step(cfg.train))
    return tok.decode(rows.input_ids.reshape(-1).tolist())


@pytest.fixture(scope="module")
def small(med, tiny_ref, tok):
    cfg = _cfg(8192)
    doc = recall.plan(cfg, tiny_ref, med)
    return cfg, doc, {a: _stream(a, tok, med, cfg) for a in ("sft", "cpt")}


def test_recall_asks_only_facts_that_every_arm_trained_on_whole(med, small, tiny_ref):
    cfg, doc, streams = small
    items = doc["rows"]
    assert items and doc["items"] == len(items) and doc["facts"] == len({r["term_id"] for r in items})
    assert doc["arms"]["cpt"]["facts"] > doc["arms"]["sft"]["facts"] >= doc["facts"]  # cpt packs more facts
    asked = {r["term_id"] for r in items}
    sft = domain.read_sft(med.sft)
    cpt = domain.read_cpt(med.cpt)
    # every training record of every asked fact lies in the rows, in both arms, whole
    for r in sft:
        if r["term_id"] in asked:
            assert r["prompt"] in streams["sft"] and r["response"] in streams["sft"], r["id"]
    for r in cpt:
        if asked & set(r["term_ids"]):
            assert r["text"] in streams["cpt"], r["id"]
    # a fact just past the budget: its records are not (all) in the SFT rows, and it is never asked
    order = list(dict.fromkeys(r["unit"] for r in sft))
    units = epoch_order(len(order), cfg.train.data_seed, order)  # the unit order the packer uses
    first_out = next(order[i] for i in units if order[i] not in doc["units"])
    outside = [r for r in sft if r["unit"] == first_out]
    assert not all(r["response"] in streams["sft"] for r in outside)
    assert not {r["term_id"] for r in outside} & asked
    # a larger budget asks more facts, and every fact of the smaller one
    bigger = recall.plan(_cfg(16384), tiny_ref, med)
    assert asked < {r["term_id"] for r in bigger["rows"]}


def test_recall_items_do_not_repeat_their_training_text(med, small):
    _, doc, streams = small
    items = doc["rows"]
    kinds = {r["kind"] for r in items}
    assert {"icd_code", "hpo_parent"} <= kinds
    for r in items:
        answer = r["choices"][r["label"]]
        assert len(r["choices"]) == 4 and len({c.lower() for c in r["choices"]}) == 4
        # the answer is the fact as trained (it appears in the rows; a CPT sentence lower-cases a name mid-way) ...
        assert all(answer.lower() in text.lower() for text in streams.values()), r["id"]
        # ... but no 13-word sequence of the item outside the answer is in either arm's rows
        assert not shared_beyond_answer(r["question"], answer, streams.values()), r["id"]
    # the check is not vacuous: an item asked in its training pair's own words is caught
    sft = [x for x in domain.read_sft(med.sft) if x["template"] == "hpo_definition_to_term"
           and x["term_id"] == next(i["term_id"] for i in items if i["kind"].startswith("hpo"))]
    if sft:
        assert shared_beyond_answer(sft[0]["prompt"], "x", streams.values())
    planted = "Question: " + " ".join(streams["cpt"].split()[:20]) + "?\nAnswer:"
    assert shared_beyond_answer(planted, "x", [streams["cpt"]])


def test_sft_and_cpt_meet_the_same_units_in_the_same_order(med):
    sft, cpt = domain.read_sft(med.sft), domain.read_cpt(med.cpt)
    su, cu = record_units(sft), record_units(cpt)
    assert su is not None and cu is not None and set(su) == set(cu)
    for seed in (0, 7):
        a = list(dict.fromkeys(su[i] for i in epoch_order(len(sft), seed, su)))
        b = list(dict.fromkeys(cu[i] for i in epoch_order(len(cpt), seed, cu)))
        assert a == b
        seq = [su[i] for i in epoch_order(len(sft), seed, su)]
        assert sum(x != y for x, y in zip(seq, seq[1:])) == len(a) - 1  # a unit's records stay together


def test_records_without_units_are_shuffled_one_by_one():
    assert record_units([{"text": "a", "unit": 1}, {"text": "b"}]) is None
    assert record_units([{"text": "a", "unit": True}]) is None
    assert sorted(epoch_order(10, 3)) == list(range(10)) and epoch_order(10, 3) != list(range(10))


def test_no_recall_when_no_unit_fits_or_data_has_none(med, tiny_ref, tmp_path):
    doc = recall.plan(_cfg(512, seq_len=64, micro_batch=2), tiny_ref, med)
    assert doc["items"] == 0 and "raise --budget-tokens" in doc["why"]
    own = tmp_path / "own"
    own.mkdir()
    (own / "sft.jsonl").write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    doc = recall.plan(_cfg(8192), tiny_ref, domain.load_domain(str(own)))
    assert doc["items"] == 0 and "recall_mc.jsonl" in doc["why"]


def test_a_run_asks_its_recall_questions_of_every_model_and_reads_them_as_learning(med, tmp_path, fc_home):
    from forgetcheck.cli.run import run_pipeline
    from forgetcheck.rundir import RunDir, read_json

    cfg = config.RunConfig(
        base="tiny-gpt2", data="med", out_dir=str(tmp_path), run_id="r", device="cpu",
        train=config.TrainConfig(budget_tokens=8192, seq_len=128, micro_batch=4, lr=1e-3, eval_every=0),
        eval=config.EvalConfig(tasks=("fc_element_symbol", "fc_med_recall", "fc_med_text_ppl"), limit=4,
                               batch_size=8))
    assert run_pipeline(cfg) == 0
    run = RunDir(tmp_path / "r")
    doc = read_json(run.root / "recall.json")
    assert doc["items"] > 4 and doc["arms"]["sft"]["facts"] >= doc["facts"] > 0
    for label in ("base", "sft", "cpt"):  # every item, whatever --limit, for every model
        assert read_json(run.eval_json(label))["tasks"]["fc_med_recall"]["n"] == doc["items"]
    c = read_json(run.compare)
    assert c["tasks"]["fc_med_recall"]["suite"] == "recall" and "recall" in c["suites"]
    assert c["summary"]["sft"]["learning_signal"] == "recall"
    assert c["summary"]["sft"]["signals"]["domain_bpb"]["ci"] is not None
    assert c["budget"]["arms"]["cpt"]["facts_whole"] == doc["arms"]["cpt"]["facts"]
    assert "learning: recall gain (points)" in run.report.read_text(encoding="utf-8")
