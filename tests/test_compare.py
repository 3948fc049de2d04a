"""compare: paired statistics over synthetic run directories (tests/runfixture.py). No model, no torch."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from runfixture import DEFAULT_TASKS, make_run

from forgetcheck.compare import compare_evals, compare_run, holm, mcnemar_exact
from forgetcheck.errors import BadInput
from forgetcheck.rundir import read_json, read_jsonl

N = 200


@pytest.fixture(scope="module")
def unchanged(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("c") / "unchanged", n=N)
    return run, compare_run(run, n_boot=1000)


@pytest.fixture(scope="module")
def regressed(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("c") / "regressed", n=N,
                   flips={("sft", "ret_mmlu"): (40, 0), ("sft", "ret_wino"): (10, 2), ("sft", "dom_terms"): (0, 30)},
                   ll_shift={("sft", "ret_ppl"): -4.0}, kl={"sft": 0.25, "cpt": 0.01})
    return run, compare_run(run, n_boot=1000)


def test_unchanged_copy_gives_exact_zeros(unchanged):
    run, c = unchanged
    assert run.compare.exists() and read_json(run.compare)["schema_version"] == 1
    assert set(c["tasks"]) == set(DEFAULT_TASKS)
    for name, t in c["tasks"].items():
        for arm in ("sft", "cpt"):
            a = t["arms"][arm]
            assert a["delta"] == 0.0 and math.copysign(1, a["delta"]) == 1, (name, arm, a["delta"])
            assert a["ci"] == [0.0, 0.0]
            assert a["p_value"] == 1.0 and a["p_holm"] == 1.0 and a["significant"] is False
            assert a["n_paired"] == N
            if t["unit"] == "points":
                assert a["flips"] == {"right_to_wrong": 0, "wrong_to_right": 0}
                assert a["examples"] == {"right_to_wrong": [], "wrong_to_right": []}
    for suite in ("retention", "domain"):
        for arm in ("sft", "cpt"):
            s = c["suites"][suite]["arms"][arm]
            assert s["delta"] == 0.0 and s["ci"] == [0.0, 0.0] and s["p_value"] == 1.0
    for arm in ("sft", "cpt"):
        assert c["summary"][arm]["forgetting"] == 0.0 and c["summary"][arm]["learning"] == 0.0


def test_planted_regression_delta_ci_and_flips(regressed):
    _, c = regressed
    a = c["tasks"]["ret_mmlu"]["arms"]["sft"]
    assert a["delta"] == pytest.approx(-40 / N * 100)
    assert a["flips"] == {"right_to_wrong": 40, "wrong_to_right": 0}
    assert a["test"] == "mcnemar_exact" and a["p_value"] == pytest.approx(2 * 0.5**40)
    # Paired per-item differences are -1 on 40 of 200 items: normal-approx 95% CI of the mean difference.
    se = math.sqrt(0.2 * 0.8 / N) * 100
    lo, hi = a["ci"]
    assert lo == pytest.approx(-20 - 1.96 * se, abs=1.5) and hi == pytest.approx(-20 + 1.96 * se, abs=1.5)
    assert hi < 0 and a["significant"] is True
    assert len(a["examples"]["right_to_wrong"]) == 5 and a["examples"]["wrong_to_right"] == []
    ex = a["examples"]["right_to_wrong"][0]
    assert ex["base_choice"] == ex["target"] != ex["arm_choice"]
    # the untouched arm stays exactly at zero on the same task
    assert c["tasks"]["ret_mmlu"]["arms"]["cpt"]["delta"] == 0.0
    # domain gain and the learn/forget summary
    assert c["tasks"]["dom_terms"]["arms"]["sft"]["delta"] == pytest.approx(15.0)
    s = c["summary"]["sft"]
    ret = c["suites"]["retention"]["arms"]["sft"]
    assert ret["delta"] == pytest.approx(np.mean([-20.0, -4.0, 0.0]))  # mean over the 3 accuracy tasks
    assert s["forgetting"] == pytest.approx(-ret["delta"]) and s["forgetting_ci"][0] > 0
    assert s["learning"] == pytest.approx(np.mean([0.0, 15.0])) and s["learning_ci"][0] > 0
    assert s["kl_mean"] == 0.25


def test_mcnemar_matches_hand_computed_value(regressed):
    # b=10 right->wrong, c=2 wrong->right: p = 2 * P(X <= 2 | n=12, 1/2) = 2 * (1 + 12 + 66) / 4096
    expected = 2 * (1 + 12 + 66) / 2**12
    assert mcnemar_exact(10, 2) == pytest.approx(expected, rel=1e-12)
    assert mcnemar_exact(2, 10) == pytest.approx(expected, rel=1e-12)
    assert mcnemar_exact(0, 0) == 1.0
    a = regressed[1]["tasks"]["ret_wino"]["arms"]["sft"]
    assert a["flips"] == {"right_to_wrong": 10, "wrong_to_right": 2}
    assert a["p_value"] == pytest.approx(expected, rel=1e-12)


def test_holm_known_example():
    adj = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005})
    # sorted: d 0.005*4=0.02, a 0.01*3=0.03, c 0.03*2=0.06, b max(0.06, 0.04*1)=0.06 (monotone)
    assert adj == pytest.approx({"d": 0.02, "a": 0.03, "c": 0.06, "b": 0.06})
    assert holm({"x": 0.7, "y": 0.9}) == pytest.approx({"x": 1.0, "y": 1.0})
    assert holm({}) == {}


def test_holm_applied_across_retention_tasks(regressed):
    c = regressed[1]
    ret = {n: t["arms"]["sft"] for n, t in c["tasks"].items() if t["suite"] == "retention"}
    assert {a["p_holm"] for a in ret.values()} and all(a["holm_family"] == len(ret) for a in ret.values())
    assert ret == {n: c["tasks"][n]["arms"]["sft"] for n in ret}
    expected = holm({n: a["p_value"] for n, a in ret.items()})
    for n, a in ret.items():
        assert a["p_holm"] == pytest.approx(expected[n])
        assert a["p_holm"] >= a["p_value"]


def test_perplexity_delta_is_oriented_and_in_own_units(regressed):
    run, c = regressed
    t = c["tasks"]["ret_ppl"]
    assert t["unit"] == "word_perplexity" and t["higher_is_better"] is False
    base = read_jsonl(run.samples_dir("base") / "ret_ppl.jsonl")
    arm = read_jsonl(run.samples_dir("sft") / "ret_ppl.jsonl")
    ppl = lambda rows: math.exp(-sum(r["loglikelihood"] for r in rows) / sum(r["words"] for r in rows))  # noqa: E731
    assert ppl(arm) > ppl(base)
    a = t["arms"]["sft"]
    assert a["score"] == pytest.approx(ppl(arm)) and a["delta"] == pytest.approx(-(ppl(arm) - ppl(base)))
    assert a["ci"][1] < 0 and a["test"] == "paired_bootstrap" and "flips" not in a
    d = c["drift"]["sft"]["perplexity"]["ret_ppl"]
    assert d["ratio"] == pytest.approx(ppl(arm) / ppl(base))
    assert c["drift"]["sft"]["kl"]["mean"] == 0.25
    assert c["drift"]["sft"]["text_perplexity"]["ratio"] == pytest.approx(1.25)


def test_bootstrap_is_seeded_and_deterministic(regressed):
    run, c = regressed
    again = compare_run(run, n_boot=1000)
    assert again["tasks"] == c["tasks"] and again["suites"] == c["suites"]
    other = compare_run(run, n_boot=1000, seed=1)
    assert other["tasks"]["ret_mmlu"]["arms"]["sft"]["ci"] != c["tasks"]["ret_mmlu"]["arms"]["sft"]["ci"]
    compare_run(run, n_boot=1000)  # leave compare.json as the fixture made it


def test_pairs_by_doc_hash_not_order_or_doc_id(tmp_path):
    run = make_run(tmp_path / "r", n=60, flips={("sft", "ret_mmlu"): (6, 0)})
    p = run.samples_dir("sft") / "ret_mmlu.jsonl"
    rows = read_jsonl(p)
    rows = rows[::-1][:-1]  # reversed, and the item with doc_id 0 missing
    for r in rows:
        r["doc_id"] += 1000
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = compare_run(run, n_boot=200)
    a = c["tasks"]["ret_mmlu"]["arms"]["sft"]
    assert a["n_paired"] == 59 and a["unpaired"] == {"base_only": 1, "arm_only": 0}
    base_rows = {r["doc_hash"]: r for r in read_jsonl(run.samples_dir("base") / "ret_mmlu.jsonl")}
    expected = 100 * np.mean([r["metrics"]["acc"] - base_rows[r["doc_hash"]]["metrics"]["acc"] for r in rows])
    assert a["delta"] == pytest.approx(expected)


def test_missing_optional_fields_degrade_gracefully(tmp_path):
    run = make_run(tmp_path / "r", n=40, with_train=False, flips={("sft", "ret_mmlu"): (5, 0)})
    ev = read_json(run.eval_json("sft"))
    del ev["tasks"]["ret_mmlu"]["samples"]  # no per-item records for this arm
    for t in ev["tasks"].values():
        t.pop("chance", None)
        t.pop("n", None)
    ev.pop("drift", None)
    run.eval_json("sft").write_text(json.dumps(ev))
    (run.samples_dir("cpt") / "ret_wino.jsonl").unlink()  # a samples path that does not exist
    c = compare_run(run, n_boot=200)
    a = c["tasks"]["ret_mmlu"]["arms"]["sft"]
    assert a["source"] == "aggregate" and a["ci"] is None and a["p_value"] is None
    assert a["delta"] == pytest.approx(-5 / 40 * 100)
    assert any("no paired per-item records" in n for n in c["tasks"]["ret_mmlu"]["notes"])
    assert c["suites"]["retention"]["arms"]["sft"]["ci"] is None
    assert c["budget"]["arms"] == {} and c["budget"]["matched"] is None
    assert c["drift"]["sft"]["kl"] is None


def test_budget_block_detects_unmatched_arms(tmp_path):
    ok = compare_run(make_run(tmp_path / "ok", n=20, forward_tokens={"sft": 4096, "cpt": 4096 - 63}), n_boot=200)
    assert ok["budget"]["matched"] is True
    bad = compare_run(make_run(tmp_path / "bad", n=20, forward_tokens={"sft": 4096, "cpt": 3000}), n_boot=200)
    assert bad["budget"]["matched"] is False and "1096" in bad["budget"]["reasons"][0]
    assert bad["budget"]["arms"]["cpt"]["tokens_forward"] == 3000


def test_compare_evals_api(regressed):
    run, c = regressed
    res = compare_evals(run.eval_json("base"), {"sft": run.eval_json("sft")}, n_boot=1000)
    assert res["arms"] == ["sft"] and "budget" not in res
    assert res["tasks"]["ret_mmlu"]["arms"]["sft"] == c["tasks"]["ret_mmlu"]["arms"]["sft"]


def test_bad_inputs(tmp_path):
    with pytest.raises(BadInput, match="not found"):
        compare_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="base.json"):
        compare_run(tmp_path / "empty")
    r = subprocess.run([sys.executable, "-m", "forgetcheck", "compare", str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


NO_TORCH = r"""
import sys
sys.argv = ["forgetcheck"]
from pathlib import Path
sys.path.insert(0, {tests!r})
from runfixture import make_run
from forgetcheck.compare import compare_run
from forgetcheck.gate import gate_run
from forgetcheck.report import write_report
from forgetcheck import cli
run = make_run(Path({root!r}), n=30, flips={{("sft", "ret_mmlu"): (10, 0)}})
compare_run(run, n_boot=200)
gate_run(run.root, junit=run.root / "j.xml", markdown=run.root / "g.md")
write_report(run)
for argv in (["compare", str(run.root), "--n-boot", "200"], ["gate", str(run.root)], ["report", str(run.root)]):
    sys.argv = ["forgetcheck", *argv]
    try:
        cli.main()
    except SystemExit:
        pass
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "lm_eval", "datasets", "accelerate"))
print("HEAVY=" + ",".join(heavy))
"""


def test_compare_report_gate_never_import_torch(tmp_path):
    code = NO_TORCH.format(tests=str(Path(__file__).parent), root=str(tmp_path / "run"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    assert r.returncode == 0, r.stderr
    assert "HEAVY=\n" in r.stdout, r.stdout
    assert (tmp_path / "run" / "report.html").exists() and (tmp_path / "run" / "gate.json").exists()
