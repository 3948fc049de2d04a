"""Flipped items a person can read: each per-item record holds the question and every choice's text (a
WinoGrande item its two filled-in sentences, and the gold index as its target), and the report shows, for each
flip, the question, every choice, the right one and what the base and the arm chose."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import copy_fixture_tasks
from runfixture import make_run

from forgetcheck.config import EvalConfig
from forgetcheck.eval.runner import evaluate
from forgetcheck.report.html import write_report
from forgetcheck.rundir import read_jsonl
from forgetcheck.verdict.compare import compare_run
from forgetcheck.verdict.gate import gate_run

WINO_ITEMS = [
    {"contexts": ["The trophy did not fit in the suitcase because the trophy",
                  "The trophy did not fit in the suitcase because the suitcase"],
     "continuation": "was too big.", "label": 0},
    {"contexts": ["The trophy did not fit in the suitcase because the trophy",
                  "The trophy did not fit in the suitcase because the suitcase"],
     "continuation": "was too small.", "label": 1},
    {"contexts": ["Anna poured water from the bottle into the cup until the bottle",
                  "Anna poured water from the bottle into the cup until the cup"],
     "continuation": "was full.", "label": 1},
]


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    """The multiple-choice fixture task and a WinoGrande-shaped one (one context per choice)."""
    out = copy_fixture_tasks(tmp_path_factory.mktemp("flip_tasks"))
    (out / "wino.jsonl").write_text("".join(json.dumps(d) + "\n" for d in WINO_ITEMS))
    (out / "fc_fixture_wino.yaml").write_text(f"""task: fc_fixture_wino
dataset_path: json
dataset_kwargs:
  data_files:
    test: {out / 'wino.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: label
doc_to_choice: contexts
doc_to_target: continuation
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  suite: retention
  chance: 0.5
""")
    return out


def test_records_hold_the_question_every_choice_and_the_gold_index(tiny_ref, tasks_dir, tmp_path):
    doc = evaluate(tiny_ref, EvalConfig(tasks=("fc_fixture_mc", "fc_fixture_wino"), backend="hf", batch_size=4),
                   tmp_path / "m.json", tasks_dir=tasks_dir)
    mc = read_jsonl(tmp_path / doc["tasks"]["fc_fixture_mc"]["samples"])
    first = json.loads((tasks_dir / "mc.jsonl").read_text().splitlines()[0])
    assert mc[0]["prompt"].endswith(f"Question: {first['question']}\nAnswer:")
    assert [c.strip() for c in mc[0]["choices"]] == first["choices"] and mc[0]["target"] == first["answer"]
    for row in mc:  # the picks agree with lm-eval's own acc and acc_norm for every item
        assert row["chosen"]["acc"] == max(range(4), key=lambda i: row["loglikelihoods"][i])
        assert (row["chosen"]["acc"] == row["target"]) == bool(row["metrics"]["acc"])
        assert (row["chosen"]["acc_norm"] == row["target"]) == bool(row["metrics"]["acc_norm"])

    wino = read_jsonl(tmp_path / doc["tasks"]["fc_fixture_wino"]["samples"])
    assert len(wino) == len(WINO_ITEMS)
    for row, item in zip(wino, WINO_ITEMS):
        # two different sentences, each the context filled with one option plus the shared continuation
        assert row["choices"] == [f"{c} {item['continuation']}" for c in item["contexts"]]
        assert len(set(row["choices"])) == 2
        assert row["target"] == item["label"] and isinstance(row["target"], int)
        best = max(range(2), key=lambda i: row["loglikelihoods"][i])
        assert row["correct"] == (best == item["label"])


def test_report_shows_every_flip_with_its_choices_and_both_picks(tmp_path):
    run = make_run(tmp_path / "r", n=40, flips={("sft", "ret_mmlu"): (3, 2), ("sft", "ret_wino"): (2, 0)})
    for label in ("base", "sft", "cpt"):  # give every item a question and choice texts, as evaluation writes them
        for f in run.samples_dir(label).glob("ret_*.jsonl"):
            rows = read_jsonl(f)
            for r in rows:
                if "loglikelihoods" in r:
                    r["prompt"] = f"Question {r['doc_id']} of {f.stem}?"
                    r["choices"] = [f"choice {r['doc_id']}.{i} <b>" for i in range(len(r["loglikelihoods"]))]
            f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    compare = compare_run(run, n_boot=200)
    gate_run(run.root)
    html = write_report(run).read_text()
    shown = 0
    for task in ("ret_mmlu", "ret_wino"):
        ex = compare["tasks"][task]["arms"]["sft"]["examples"]
        for e in ex["right_to_wrong"] + ex["wrong_to_right"]:
            item = html[html.index(f"Question {e['doc_id']} of {task}?"):]
            item = item[:item.index("</ol>")]
            for i, _ in enumerate(e["choices"]):
                assert f"choice {e['doc_id']}.{i} &lt;b&gt;" in item  # every choice, escaped
            tags = re.findall(r'<span class="text">choice [\d.]+ &lt;b&gt;</span>\s*((?:<span class="tag[^"]*">[^<]*</span>\s*)*)', item)
            assert len(tags) == len(e["choices"])
            assert "right answer" in tags[e["target"]]
            assert "base chose" in tags[e["base_choice"]] and "sft chose" in tags[e["arm_choice"]]
            assert e["base_choice"] != e["arm_choice"]  # a flip: the two picks differ
            shown += 1
    assert shown == 7
