"""Benchmark data and the lm-eval task YAMLs in tasks/: they hold no absolute paths, their metadata matches
the data, and every task loads in lm-eval's TaskManager and scores a tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from forgetcheck import benchdata, bigbench, data
from forgetcheck.config import repo_root
from forgetcheck.errors import BadInput

TASKS = repo_root() / "tasks"
PPL_METRICS = {"word_perplexity", "byte_perplexity", "bits_per_byte"}


def _yamls() -> dict[str, dict]:
    return {f.name: yaml.safe_load(f.read_text()) for f in sorted(TASKS.glob("*.yaml"))}


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


@pytest.fixture(scope="module")
def bench(fc_home):
    if not (benchdata.downloads_dir() / benchdata.BIGBENCH_SDIST).exists():
        pytest.skip(f"{benchdata.BIGBENCH_SDIST} is not in the user's cache downloads/: run `make install` "
                    f"(or `forgetcheck data prepare med`) once")
    data.prepare_dataset("med")
    return benchdata.prepare_bench()


def test_yamls_are_portable_and_complete():
    docs = _yamls()
    tasks = {d["task"]: d for d in docs.values() if "task" in d and "group" not in d}
    groups = {d["group"]: d["task"] for d in docs.values() if "group" in d}
    assert set(groups) == {"forgetcheck_retention", "forgetcheck_domain"}
    grouped = [t for g in groups.values() for t in g]
    assert sorted(grouped) == sorted(tasks)  # every task in exactly one suite
    for text in (f.read_text() for f in TASKS.iterdir() if f.suffix == ".yaml" or f.name.endswith("_yaml")):
        assert not re.search(r"""["'\s](/root|/home|/tmp|/work|~/)""", text)
        assert "!function" not in text
    for name, d in tasks.items():
        path = d["dataset_kwargs"]["data_files"]["test"]
        assert path.startswith("${FORGETCHECK_HOME}/"), name
        meta = d["metadata"]
        assert meta["suite"] in benchdata.SUITES and meta["kind"] in ("multiple_choice", "perplexity")
        assert name in groups[f"forgetcheck_{meta['suite']}"]
        metrics = {m["metric"] for m in d.get("metric_list", [])} or {"acc"}  # MMLU's come from its template
        assert meta["primary_metric"] in metrics, name
        assert (meta["kind"] == "perplexity") == (d.get("output_type") == "loglikelihood_rolling")
        assert meta["source"] and meta["licence"] and meta["items"] > 0


def test_suite_tasks_and_task_info():
    retention = benchdata.suite_tasks("retention")
    domain = benchdata.suite_tasks("domain")
    assert len(retention) >= 10 and {"fc_mmlu_medical", "fc_med_terms", "fc_med_text_ppl"} == set(domain)
    info = benchdata.task_info("fc_winogrande")
    assert info["suite"] == "retention" and info["chance"] == 0.5 and info["kind"] == "multiple_choice"
    ppl = benchdata.task_info("fc_squad_shifts_ppl")
    assert ppl["kind"] == "perplexity" and ppl["chance"] is None and ppl["higher_is_better"] is False
    assert "${" not in ppl["data_file"]
    with pytest.raises(BadInput, match="fc_winogrande"):
        benchdata.task_info("winogrand")
    with pytest.raises(BadInput):
        benchdata.suite_tasks("everything")


def test_metadata_matches_built_data(bench):
    files = bench["files"]
    for name in benchdata.suite_tasks("retention") + benchdata.suite_tasks("domain"):
        info = benchdata.task_info(name)
        rows = _lines(Path(info["data_file"]))
        assert info["items"] == len(rows), name
        if info["kind"] == "multiple_choice":
            key = "contexts" if "contexts" in rows[0] else "choices"
            chance = sum(1 / len(r[key]) for r in rows) / len(rows)
            assert info["chance"] == pytest.approx(chance, abs=1e-3), name
            fname = Path(info["data_file"]).name
            if fname in files:
                assert files[fname]["items"] == len(rows)


def test_mmlu_split_keeps_medicine_out_of_retention(bench):
    home = benchdata.bench_dir()
    medical = set(benchdata.MEDICAL_SUBJECTS)
    total = 0
    for cat in benchdata.MMLU_CATEGORIES:
        rows = _lines(home / f"mmlu_{cat}.jsonl")
        assert rows and not {r["subject"] for r in rows} & medical
        total += len(rows)
    med_rows = _lines(home / "mmlu_medical.jsonl")
    assert {r["subject"] for r in med_rows} == medical
    assert total + len(med_rows) == 14042  # the full MMLU test set, header rows skipped
    assert all(0 <= r["answer"] < 4 and len(r["choices"]) == 4 for r in med_rows)


def test_render_is_idempotent(bench):
    out = benchdata.render_tasks_dir()
    files = sorted(out.iterdir())
    stamps = [f.stat().st_mtime_ns for f in files]
    assert benchdata.render_tasks_dir() == out
    assert [f.stat().st_mtime_ns for f in sorted(out.iterdir())] == stamps
    text = (out / "fc_med_terms.yaml").read_text()
    assert "${FORGETCHECK_HOME}" not in text and str(Path(benchdata.forgetcheck_home()).resolve()) in text


def test_every_task_loads_and_scores_in_lm_eval(bench, tiny_ref):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from forgetcheck import models

    model, tok = models.load(tiny_ref)
    tm = TaskManager(include_path=str(benchdata.render_tasks_dir()), include_defaults=False)
    names = benchdata.suite_tasks("retention") + benchdata.suite_tasks("domain")
    out = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=8), tasks=names,
                                  task_manager=tm, limit=2, log_samples=True)
    for name in names:
        info = benchdata.task_info(name)
        res = out["results"][name]
        assert f"{info['primary_metric']},none" in res, (name, res)
        assert out["configs"][name]["metadata"]["suite"] == info["suite"]
        samples = out["samples"][name]
        assert len(samples) == 2
        if info["kind"] == "multiple_choice":
            for s in samples:
                for context, continuation in s["arguments"]:
                    assert continuation.startswith(" ") and not continuation.startswith("  "), (name, continuation)
                    assert context and not context.endswith(" "), name
        else:
            assert set(res) >= {f"{m},none" for m in PPL_METRICS}


SMALL_MODEL = {  # task -> (data file, subtasks, items, chance)
    "fc_subject_verb_agreement": ("subject_verb_agreement", ["namepp", "nounpp"], 2000, 0.5),
    "fc_metaphor_understanding": ("metaphor_understanding", ["lit2met", "met2lit"], 234, 0.25),
    "fc_unit_identification": ("unit_identification", ["unit_identification"], 1000, 0.3333),
    "fc_unit_conversion": ("unit_conversion", ["different_systems"], 1000, 0.2),
    "fc_wikihow_step_inference": ("wikihow_step_inference", ["step_inference"], 1000, 0.25),
    "fc_unscramble_words": ("unscramble_words", ["reorder_words"], 100, 0.1247),
    "fc_movie_recommendation": ("movie_recommendation", ["movie_recommendation"], 500, 0.25),
    "fc_phrase_relatedness": ("phrase_relatedness", ["phrase_relatedness"], 100, 0.25),
    "fc_emoji_movie": ("emoji_movie", ["emoji_movie"], 100, 0.2),
    "fc_arithmetic_addition": ("arithmetic_addition", ["1_digit_addition"], 100, 0.1579),
    "fc_arithmetic_multiplication": ("arithmetic_multiplication", ["1_digit_multiplication"], 100, 0.1552),
}


def test_small_model_tasks_build_as_bigbench_prompts(bench):
    assert set(SMALL_MODEL) <= set(benchdata.suite_tasks("retention"))
    assert {f"fc_{f}" for f in benchdata.SMALL_MODEL_TASKS} == set(SMALL_MODEL)
    for name, (fname, subtasks, items, chance) in SMALL_MODEL.items():
        rows = _lines(benchdata.bench_dir() / f"{fname}.jsonl")
        info = benchdata.task_info(name)
        assert info["items"] == len(rows) == items == bench["files"][f"{fname}.jsonl"]["items"], name
        assert info["chance"] == chance == bench["files"][f"{fname}.jsonl"]["chance"], name
        assert {r["subtask"] for r in rows} == set(subtasks), name
        for r in rows:
            assert 0 <= r["label"] < len(r["choices"]) and len(set(r["choices"])) == len(r["choices"]) >= 2
            assert r["query"] == r["query"].strip() and all(c == c.strip() and c for c in r["choices"])
    # the prompt is BIG-bench's own: a cloze input continues directly, others get its Q:/A: defaults
    svA = _lines(benchdata.bench_dir() / "subject_verb_agreement.jsonl")[0]
    assert not svA["query"].startswith("Q:") and svA["choices"][svA["label"]].endswith("s")
    arith = _lines(benchdata.bench_dir() / "arithmetic_addition.jsonl")
    assert arith[0]["query"].startswith("Q: What is ") and arith[0]["query"].endswith("\nA:")
    assert bigbench.bigbench_prompt({"task_prefix": "Say:"}, "x y ") == "Say:x y"
    assert bigbench.bigbench_prompt({"example_output_prefix": "\nIntent: "}, "Utterance: hi") == "Q: Utterance: hi\nIntent:"


def test_small_model_task_clusters_join_shared_sources(bench):
    sva = _lines(benchdata.bench_dir() / "subject_verb_agreement.jsonl")
    by_cluster: dict[str, set[str]] = {}
    for r in sva:
        by_cluster.setdefault(r["cluster"], set()).add(r["query"])
    assert all(len(q) == 1 for q in by_cluster.values())  # one sentence start per cluster
    assert len(by_cluster) < len(sva)  # and several verbs per sentence start
    met = _lines(benchdata.bench_dir() / "metaphor_understanding.jsonl")
    subtasks_of: dict[str, set[str]] = {}
    for r in met:
        subtasks_of.setdefault(r["cluster"], set()).add(r["subtask"])
    # lit2met and met2lit pair most sentences with the same distractors: those items share a cluster
    assert sum(s == {"lit2met", "met2lit"} for s in subtasks_of.values()) >= 50


def test_small_model_tasks_share_no_13gram_with_training_or_drift_text(bench):
    from forgetcheck import general_text

    texts = [general_text.evaluation_texts([benchdata.bench_dir() / f"{f}.jsonl"]) for f, *_ in SMALL_MODEL.values()]
    texts = [t for group in texts for t in group]
    med = benchdata.forgetcheck_home() / "data" / "med"
    others = [benchdata.bench_dir() / "squad_shifts_text.jsonl", med / "cpt.jsonl", med / "heldout.jsonl",
              med / "heldout_mc.jsonl"]
    assert all(p.exists() for p in others)
    n_shared, hit = general_text.overlap_count(texts, general_text.evaluation_texts(others))
    assert n_shared == 0 and not hit
    n_shared, hit = general_text.overlap_count(texts, (p for _, p in general_text.paragraphs()))  # replay text
    assert n_shared == 0 and not hit
