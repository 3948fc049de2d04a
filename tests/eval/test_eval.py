"""`forgetcheck eval` on the tiny random GPT-2 and two fixture tasks (tests/fixtures/tasks): the same numbers as
stock lm-eval, cached re-evaluation, the same --limit items for every model, clear errors, and KL drift."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from conftest import FIXTURE_TASKS

from forgetcheck.config import EvalConfig
from forgetcheck.errors import BadInput
from forgetcheck.rundir import read_json, read_jsonl

MC, PPL = "fc_fixture_mc", "fc_fixture_ppl"


@pytest.fixture(scope="module")
def base_eval(tiny_ref, tasks_dir, tmp_path_factory):
    from forgetcheck.eval.runner import evaluate

    out = tmp_path_factory.mktemp("run") / "eval" / "base.json"
    cfg = EvalConfig(tasks=(MC, PPL), backend="hf", batch_size=4)
    doc = evaluate(tiny_ref, cfg, out, tasks_dir=tasks_dir)
    return out, doc


@pytest.fixture(scope="module")
def perturbed_ref(tiny_ref, tmp_path_factory):
    """A copy of the tiny model with every weight nudged: a different model with the same tokenizer."""
    import torch

    from forgetcheck.models import registry

    model, tok = registry.load(tiny_ref)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    folder = tmp_path_factory.mktemp("perturbed") / "tiny-perturbed"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return registry.resolve(str(folder))


@pytest.fixture(scope="module")
def stock(tiny_ref, tasks_dir):
    """Stock lm-eval on the same YAMLs and model folder: per task, {doc_id: logged sample}."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model="hf", model_args=f"pretrained={tiny_ref.path},dtype=float32", tasks=[MC, PPL],
                          task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
                          device="cpu", batch_size=4, log_samples=True, bootstrap_iters=0)
    return {t: {s["doc_id"]: s for s in out["samples"][t]} for t in (MC, PPL)}


@pytest.mark.parametrize("backend", ["hf", "fast"])
def test_matches_stock_lm_eval(backend, base_eval, stock, tiny_ref, tasks_dir, tmp_path):
    from forgetcheck.eval.runner import evaluate

    out, doc = base_eval
    if backend != "hf":
        out = tmp_path / f"{backend}.json"
        doc = evaluate(tiny_ref, EvalConfig(tasks=(MC, PPL), backend=backend, batch_size=4), out,
                       tasks_dir=tasks_dir)
    fast_available = importlib.util.find_spec("forgetcheck.eval.fast_lm") is not None
    assert doc["backend_used"] == [backend if fast_available else "hf"]
    mc = read_jsonl(out.parent / doc["tasks"][MC]["samples"])
    assert doc["tasks"][MC]["n"] == len(mc) == len(stock[MC]) == 14
    for row in mc:
        s = stock[MC][row["doc_id"]]
        assert row["doc_hash"] == s["doc_hash"]
        assert row["correct"] == bool(s["acc"])
        assert row["loglikelihoods"] == pytest.approx([r[0] for r in s["filtered_resps"]], abs=1e-4)
    ppl = read_jsonl(out.parent / doc["tasks"][PPL]["samples"])
    assert len(ppl) == len(stock[PPL]) == 8
    for row in ppl:
        s = stock[PPL][row["doc_id"]]
        assert row["loglikelihood"] == pytest.approx(s["filtered_resps"][0], abs=1e-4)
        assert (row["words"], row["bytes"]) == (s["word_perplexity"][1], s["byte_perplexity"][1])
    acc = doc["tasks"][MC]["metrics"]["acc"]
    assert acc["value"] == pytest.approx(sum(r["correct"] for r in mc) / len(mc))
    assert acc["higher_is_better"] is True and acc["stderr"] is not None
    assert doc["tasks"][PPL]["metrics"]["word_perplexity"]["higher_is_better"] is False
    assert doc["tasks"][MC]["chance"] == 0.25 and doc["tasks"][MC]["suite"] == "retention"


def test_missed_tasks_share_one_lm_eval_call(base_eval):
    """Both fixture tasks missed the cache, so one simple_evaluate call scored them; lm-eval's environment
    probe, skipped during that call, is restored for other callers."""
    import lm_eval.evaluator as ev
    from lm_eval.loggers.utils import add_env_info, get_git_commit_hash

    _, doc = base_eval
    timings = doc["timings"]["tasks"]
    assert {t["joint_tasks"] for t in timings.values()} == {2}
    assert {t["joint_items"] for t in timings.values()} == {sum(t["n"] for t in doc["tasks"].values())}
    assert ev.add_env_info is add_env_info and ev.get_git_commit_hash is get_git_commit_hash


def test_joint_groups_cap_items():
    from types import SimpleNamespace

    from forgetcheck.eval.runner import _joint_groups, _Pending

    pending = [_Pending(spec=SimpleNamespace(name=f"t{i}"), key=str(n), indices=None, n_items=n)
               for i, n in enumerate((50, 50, 3000, 10, 1990, 5))]
    groups = _joint_groups(pending, max_items=2000)
    assert [[p.n_items for p in g] for g in groups] == [[50, 50], [3000], [10, 1990], [5]]
    # a task's screen items never share a call with its gated items (lm-eval keys a call's samples by task)
    a, b = SimpleNamespace(name="a"), SimpleNamespace(name="b")
    pending = [_Pending(a, "1", [0], 1), _Pending(b, "2", [0], 1), _Pending(a, "3", [1], 1, "screen"),
               _Pending(b, "4", [1], 1, "screen")]
    assert [[p.key for p in g] for g in _joint_groups(pending)] == [["1", "2"], ["3", "4"]]


def test_screen_items_are_scored_for_a_base_only_and_cached_apart(tiny_ref, tasks_dir, tmp_path, capsys):
    """A base's screen items (retention multiple-choice tasks only) are the next items of the --limit order, in a
    file of their own; the gated items' cache entry is the same with or without them (read back, not rescored),
    and the screen items have entries of their own, keyed by their count."""
    from forgetcheck.eval.runner import evaluate
    from forgetcheck.eval.suites import resolve_tasks, select_items

    cfg = EvalConfig(tasks=(MC, PPL), limit=4, backend="hf", batch_size=4)  # a limit no other test uses
    plain = evaluate(tiny_ref, cfg, tmp_path / "plain.json", tasks_dir=tasks_dir)
    assert "screen_items" not in plain and all("screen" not in t for t in plain["tasks"].values())
    assert not any(t["cached"] for t in plain["timings"]["tasks"].values())

    base = evaluate(tiny_ref, cfg, tmp_path / "base.json", tasks_dir=tasks_dir, screen=True)
    assert base["screen_items"] == 4 and "screen" not in base["tasks"][PPL]  # perplexity: no screen
    screen = base["tasks"][MC]["screen"]
    assert screen["n"] == 4 and screen["samples"] == f"samples/base/screen/{MC}.jsonl"
    gated = read_jsonl(tmp_path / base["tasks"][MC]["samples"])
    rows = read_jsonl(tmp_path / screen["samples"])
    assert gated == read_jsonl(tmp_path / plain["tasks"][MC]["samples"]) and base["tasks"][MC]["n"] == 4
    task = resolve_tasks(EvalConfig(tasks=(MC,)), tasks_dir)[0].task
    assert [r["doc_id"] for r in rows] == sorted(set(select_items(task, 8, "multiple_choice"))
                                                 - set(select_items(task, 4, "multiple_choice")))
    assert base["timings"]["tasks"][MC]["cached"] is True  # the gated items: the plain evaluation's entry
    assert base["timings"]["screen"][MC]["cached"] is False

    # the screen items are what the model scores on those items in an ordinary evaluation
    wide = evaluate(tiny_ref, EvalConfig(tasks=(MC,), limit=8, backend="hf", batch_size=4), tmp_path / "wide.json",
                    tasks_dir=tasks_dir)
    by_id = {r["doc_id"]: r for r in read_jsonl(tmp_path / wide["tasks"][MC]["samples"])}
    for r in rows:
        assert r["doc_hash"] == by_id[r["doc_id"]]["doc_hash"] and r["correct"] == by_id[r["doc_id"]]["correct"]
        assert r["loglikelihoods"] == pytest.approx(by_id[r["doc_id"]]["loglikelihoods"], abs=1e-4)

    capsys.readouterr()
    again = evaluate(tiny_ref, cfg, tmp_path / "again.json", tasks_dir=tasks_dir, screen=True)
    assert again["timings"]["screen"][MC]["cached"] is True and "loaded tiny-gpt2" not in capsys.readouterr().out
    assert read_jsonl(tmp_path / again["tasks"][MC]["screen"]["samples"]) == rows
    fewer = evaluate(tiny_ref, EvalConfig(tasks=(MC,), limit=4, screen_items=2, backend="hf", batch_size=4),
                     tmp_path / "fewer.json", tasks_dir=tasks_dir, screen=True)
    assert fewer["timings"]["screen"][MC]["cached"] is False and fewer["tasks"][MC]["screen"]["n"] == 2
    off = evaluate(tiny_ref, EvalConfig(tasks=(MC,), limit=4, screen_items=0, backend="hf", batch_size=4),
                   tmp_path / "off.json", tasks_dir=tasks_dir, screen=True)
    assert off["screen_items"] == 0 and "screen" not in off["tasks"][MC] and "screen" not in off["timings"]


def test_second_evaluation_hits_cache(base_eval, tiny_ref, tasks_dir, capsys):
    from forgetcheck.eval.runner import evaluate

    out, doc = base_eval
    capsys.readouterr()
    again = out.parent / "again.json"
    doc2 = evaluate(tiny_ref, EvalConfig(tasks=(MC, PPL), backend="hf", batch_size=4), again, tasks_dir=tasks_dir)
    printed = capsys.readouterr().out
    assert printed.count("cache hit") == 3  # both tasks and the drift measurement
    assert "loaded tiny-gpt2" not in printed  # the model was not even loaded
    for task in (MC, PPL):
        assert read_jsonl(again.parent / doc2["tasks"][task]["samples"]) == \
            read_jsonl(out.parent / doc["tasks"][task]["samples"])
        assert doc2["tasks"][task]["metrics"] == doc["tasks"][task]["metrics"]
    assert doc2["drift"]["perplexity"] == doc["drift"]["perplexity"]
    assert all(t["cached"] for t in doc2["timings"]["tasks"].values()) and doc2["timings"]["drift"]["cached"]


def test_limit_picks_the_same_stratified_items_for_every_model(tiny_ref, perturbed_ref, tasks_dir, tmp_path):
    from forgetcheck.eval.runner import evaluate

    cfg = EvalConfig(tasks=(MC,), limit=5, backend="hf", batch_size=4)
    a = evaluate(tiny_ref, cfg, tmp_path / "a.json", tasks_dir=tasks_dir)
    b = evaluate(perturbed_ref, cfg, tmp_path / "b.json", tasks_dir=tasks_dir)
    rows_a = read_jsonl(tmp_path / a["tasks"][MC]["samples"])
    rows_b = read_jsonl(tmp_path / b["tasks"][MC]["samples"])
    assert [(r["doc_id"], r["doc_hash"]) for r in rows_a] == [(r["doc_id"], r["doc_hash"]) for r in rows_b]
    assert len(rows_a) == 5
    assert [r["loglikelihoods"] for r in rows_a] != [r["loglikelihoods"] for r in rows_b]  # different models
    # stratified: 5 items over 4 subjects (4, 4, 4, 2 items) reach every subject
    docs = [json.loads(line) for line in (FIXTURE_TASKS / "mc.jsonl").read_text().splitlines()]
    assert {docs[r["doc_id"]]["subject"] for r in rows_a} == {"geography", "science", "math", "history"}


def test_unknown_task_suggests_the_closest(tasks_dir):
    from forgetcheck.eval.suites import resolve_tasks

    with pytest.raises(BadInput, match=r"unknown task 'fc_fixture_mcq'.*did you mean 'fc_fixture_mc'"):
        resolve_tasks(EvalConfig(tasks=("fc_fixture_mcq",)), tasks_dir)


def test_hub_task_offline_is_one_clear_error(tasks_dir, monkeypatch):
    from forgetcheck.eval.suites import resolve_tasks

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(BadInput, match=r"task 'hellaswag' needs the Hugging Face hub, which cannot be reached"):
        resolve_tasks(EvalConfig(tasks=("hellaswag",)), tasks_dir)


def test_cli_bad_input_exits_2_with_one_line(tasks_dir, tmp_path, monkeypatch, capsys):
    from forgetcheck.cli.app import main

    for extra in (["--limit", "0"], ["--tasks", "fc_fixture_mcq", "--tasks-dir", str(tasks_dir)]):
        monkeypatch.setattr(sys, "argv", ["forgetcheck", "eval", "--model", "tiny-gpt2",
                                          "--out", str(tmp_path / "x.json"), *extra])
        with pytest.raises(SystemExit) as exit_info:
            main()
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("forgetcheck: error:")
    assert "did you mean 'fc_fixture_mc'" in err
    assert not (tmp_path / "x.json").exists()


def test_kl_drift_against_self_is_zero_and_against_a_perturbed_copy_positive(base_eval, tiny_ref, perturbed_ref,
                                                                           tasks_dir):
    from forgetcheck.eval.runner import evaluate

    out, doc = base_eval
    assert (out.parent / doc["drift"]["topk_file"]).is_file()
    assert "kl" not in doc["drift"] and doc["drift"]["perplexity"] > 1
    cfg = EvalConfig(tasks=(PPL,), backend="hf", batch_size=4)
    same = evaluate(tiny_ref, cfg, out.parent / "same.json", reference=out, tasks_dir=tasks_dir)
    other = evaluate(perturbed_ref, cfg, out.parent / "other.json", reference=out, tasks_dir=tasks_dir)
    assert same["drift"]["kl"]["mean"] < 1e-5
    assert other["drift"]["kl"]["mean"] > 1e-3
    assert "lower bound" in other["drift"]["kl"]["method"]
    assert other["drift"]["text"] == doc["drift"]["text"]  # scored on the reference's own tokens
    assert doc["drift"]["text"]["documents"] == 8  # the fixture's texts carry no cluster: one document each
    for key in ("document", "positions"):  # the same blocks, so compare pairs them document by document
        assert other["drift"]["blocks"][key] == doc["drift"]["blocks"][key]
    assert len(set(doc["drift"]["blocks"]["document"])) == 8
    assert other["drift"]["perplexity"] != doc["drift"]["perplexity"]


def test_written_files_follow_the_schema(base_eval):
    from forgetcheck.schema import SCHEMA_VERSION, require

    out, doc = base_eval
    on_disk = require(read_json(out), "eval", str(out))
    assert on_disk["schema_version"] == SCHEMA_VERSION and on_disk["tasks"].keys() == {MC, PPL}
    assert doc["tasks"][MC]["samples"] == f"samples/{out.stem}/{MC}.jsonl"
    mc_row = read_jsonl(out.parent / doc["tasks"][MC]["samples"])[0]
    assert {"doc_id", "doc_hash", "target", "loglikelihoods", "correct", "metrics"} <= mc_row.keys()
    assert len(mc_row["loglikelihoods"]) == 4 and set(mc_row["metrics"]) == {"acc", "acc_norm"}
    ppl_row = read_jsonl(out.parent / doc["tasks"][PPL]["samples"])[0]
    assert {"doc_id", "doc_hash", "loglikelihood", "words", "bytes", "tokens"} <= ppl_row.keys()


def test_suites_select_tasks_by_their_yaml_metadata(tasks_dir):
    from forgetcheck.eval.suites import resolve_tasks

    specs = resolve_tasks(EvalConfig(suites=("retention",)), tasks_dir)
    assert [(s.name, s.kind, s.primary_metric) for s in specs] == [
        (MC, "multiple_choice", "acc"), (PPL, "perplexity", "word_perplexity")]
    with pytest.raises(BadInput, match="no task .* belongs to suite"):
        resolve_tasks(EvalConfig(suites=("domain",)), tasks_dir)
