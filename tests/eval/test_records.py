"""One converter of lm-eval samples to per-item records: a sample as lm-eval logs it in process (our runner) and
as its tracker writes it to a samples file (stock `lm_eval --log_samples`, read by `check`) give the same record."""

from __future__ import annotations

import json

import pytest

from forgetcheck.eval.metrics import DEFAULT_PRIMARY, PERPLEXITY_METRICS, higher_is_better
from forgetcheck.eval.records import record, target_index
from forgetcheck.schema import CHOICE_CHARS, PROMPT_CHARS


def as_written(sample: dict) -> dict:
    """The sample as lm-eval's EvaluationTracker writes it: each request's arguments a numbered dict, the
    responses' numbers and booleans strings, the target a string; then through JSON."""
    out = dict(sample)
    out["arguments"] = {f"gen_args_{i}": {f"arg_{j}": x for j, x in enumerate(a)}
                        for i, a in enumerate(sample["arguments"])}
    out["filtered_resps"] = [[str(x) for x in r] if isinstance(r, tuple) else str(r) for r in sample["filtered_resps"]]
    out["target"] = str(sample["target"])
    return json.loads(json.dumps(out))


def choice_sample(context: str, choices: list[str], target, lls: list[float], doc: dict | None = None) -> dict:
    best = max(range(len(lls)), key=lls.__getitem__)
    return {"doc_id": 3, "doc_hash": "h3", "doc": doc or {"q": "?"}, "target": target,
            "arguments": [(context, f" {c}") for c in choices],
            "filtered_resps": [(ll, i == 0) for i, ll in enumerate(lls)],
            "acc": float(best == target_index(target, [f" {c}" for c in choices])), "acc_norm": 0.0}


def test_target_index_reads_an_index_its_digits_or_a_choices_text():
    choices = [" A", " B", " C"]
    assert [target_index(t, choices) for t in (2, "1", " 0 ", "B", "C ")] == [2, 1, 0, 1, 2]
    assert [target_index(t, choices) for t in (3, "-1", "D", True, None, "")] == [None] * 6


@pytest.mark.parametrize("target", [1, "B"])
def test_a_sample_in_process_and_as_written_give_the_same_record(target):
    sample = choice_sample("Question: which?\nAnswer:", ["A", "B", "C"], target, [-3.0, -1.0, -2.0])
    mine = record(sample, "multiple_choice")
    assert record(as_written(sample), "multiple_choice", metric_names={"acc", "acc_norm"}) == mine
    assert mine == {"doc_id": 3, "doc_hash": "h3", "target": 1, "loglikelihoods": [-3.0, -1.0, -2.0],
                    "is_greedy": [True, False, False], "correct": True, "metrics": {"acc": 1.0, "acc_norm": 0.0},
                    "chosen": {"acc": 1}, "prompt": "Question: which?\nAnswer:", "choices": [" A", " B", " C"]}


def test_prompt_and_choices_are_cut_to_the_schemas_lengths():
    long_choice = "x" * (CHOICE_CHARS + 50)
    sample = choice_sample("q" * (PROMPT_CHARS + 50) + "tail", [long_choice, "short"], 0, [-1.0, -2.0])
    for row in (record(sample, "multiple_choice"), record(as_written(sample), "multiple_choice")):
        assert row["prompt"] == ("q" * (PROMPT_CHARS + 50) + "tail")[-PROMPT_CHARS:]
        assert row["choices"] == [(" " + long_choice)[:CHOICE_CHARS], " short"]


class PerChoiceContextTask:
    """lm-eval's WinoGrande shape: one context per choice, the answer named by doc_to_text."""

    multiple_input = 1

    def doc_to_text(self, doc):
        return doc["answer"]

    def doc_to_choice(self, doc):
        return doc["options"]


def test_one_context_per_choice_keeps_filled_in_sentences_and_needs_the_task_for_its_gold():
    doc = {"answer": 1, "options": ["Ann", "Bob"]}
    sample = {"doc_id": 0, "doc_hash": "w", "doc": doc, "target": "left early.",
              "arguments": [("Ann said that Ann", " left early."), ("Ann said that Bob", " left early.")],
              "filtered_resps": [(-5.0, False), (-4.0, False)], "acc": 1.0}
    ours = record(sample, "multiple_choice", task=PerChoiceContextTask())
    stock = record(as_written(sample), "multiple_choice", metric_names={"acc"})
    for row in (ours, stock):
        assert row["prompt"] == "" and row["choices"] == ["Ann said that Ann left early.", "Ann said that Bob left early."]
        assert row["correct"] is True
    assert ours["target"] == 1 and ours["chosen"] == {"acc": 1, "acc_norm": 1}
    assert stock["target"] is None and stock["chosen"] == {"acc": 1}  # the shared continuation names no choice


def test_perplexity_counts_come_from_lm_evals_metric_pairs():
    text = "two words"
    sample = {"doc_id": 1, "doc_hash": "p", "doc": {"text": text, "cluster": 7}, "target": text,
              "arguments": [(text,)], "filtered_resps": [-12.5],
              "word_perplexity": (-12.5, 5), "byte_perplexity": (-12.5, 40), "bits_per_byte": (-12.5, 40)}
    expect = {"doc_id": 1, "doc_hash": "p", "loglikelihood": -12.5, "words": 5, "bytes": 40, "cluster": "7"}
    assert record(sample, "perplexity") == record(as_written(sample), "perplexity") == expect
    only_bpb = {k: v for k, v in sample.items() if k not in ("word_perplexity", "byte_perplexity")}
    assert record(only_bpb, "perplexity")["bytes"] == 40
    assert record(only_bpb, "perplexity")["words"] == 2  # no pair: counted from the text


def test_a_generation_is_right_by_its_primary_metric():
    sample = {"doc_id": 2, "doc_hash": "g", "target": "Paris", "arguments": [("Capital?", {"until": ["\n"]})],
              "filtered_resps": [" Paris"], "exact_match": 1.0}
    row = record(as_written(sample), "generate_until", metric_names={"exact_match"}, primary="exact_match")
    assert row == {"doc_id": 2, "doc_hash": "g", "metrics": {"exact_match": 1.0}, "target": "Paris",
                   "response": " Paris", "prompt": "Capital?", "correct": True}


def test_perplexity_metrics_are_lower_is_better_and_name_their_count():
    assert set(PERPLEXITY_METRICS.values()) == {"words", "bytes"}
    assert DEFAULT_PRIMARY["perplexity"] in PERPLEXITY_METRICS and not higher_is_better(DEFAULT_PRIMARY["perplexity"])
    assert higher_is_better(DEFAULT_PRIMARY["multiple_choice"])
