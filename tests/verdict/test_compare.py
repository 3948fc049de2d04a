"""compare and stats: paired statistics over synthetic run directories (tests/runfixture.py) and on small tables
enumerated exhaustively. No model, no torch."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from runfixture import DEFAULT_TASKS, make_run, strip_document_ids

from forgetcheck.errors import BadInput
from forgetcheck.rundir import read_json, read_jsonl
from forgetcheck.schema import COMPARE_VERSION, compare_doc, read_compare
from forgetcheck.verdict.compare import compare_evals, compare_run
from forgetcheck.verdict.stats import (
    Estimate,
    above_chance_p,
    design_effect,
    estimate_from_dict,
    holm,
    mean_of_estimates,
    paired_binary,
    paired_mean,
    soft_scores,
)

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
    assert run.compare.exists() and read_json(run.compare)["schema_version"] == COMPARE_VERSION
    assert read_json(run.compare)["tasks"] == c["tasks"]
    assert read_compare(run.compare)["tasks"] == compare_doc(c)["tasks"]
    assert set(c["tasks"]) == set(DEFAULT_TASKS)
    for name, t in c["tasks"].items():
        for arm in ("sft", "cpt"):
            a = t["arms"][arm]
            assert a["delta"] == 0.0 and math.copysign(1, a["delta"]) == 1, (name, arm, a["delta"])
            assert a["p_value"] == 1.0 and a["significant"] is False
            assert a["n_paired"] == N
            if t["unit"] == "points":
                # Bonett-Price: centred on 0, a pseudo-count per discordant cell keeps the interval open
                lo, hi = a["ci"]
                assert lo == pytest.approx(-hi) and 0 < hi < 2.0
                assert a["flips"] == {"right_to_wrong": 0, "wrong_to_right": 0}
                assert a["examples"] == {"right_to_wrong": [], "wrong_to_right": []}
                assert a["soft"]["point"] == 0.0 and a["soft"]["ci"] == [0.0, 0.0]
                if t["suite"] == "retention":  # Holm across the gated retention tasks only
                    assert a["p_holm"] == 1.0 and a["holm_family"] == 3
                else:
                    assert "p_holm" not in a
            else:
                assert a["ci"] == [0.0, 0.0] and "p_holm" not in a  # perplexity is not gated: not in Holm
    for suite in ("retention", "domain"):
        for arm in ("sft", "cpt"):
            s = c["suites"][suite]["arms"][arm]
            assert s["delta"] == 0.0 and s["p_value"] == 1.0
            assert c["suites"][suite]["means"]["soft"]["informative"][arm]["ci"] == [0.0, 0.0]
    for arm in ("sft", "cpt"):
        assert c["summary"][arm]["forgetting"] == 0.0 and c["summary"][arm]["learning"] == 0.0
        assert c["drift"][arm]["ppl_rise"]["point"] == 0.0 and c["drift"][arm]["kl_mean"]["ci"] == [0.0, 0.0]


def test_planted_regression_delta_ci_and_flips(regressed):
    _, c = regressed
    a = c["tasks"]["ret_mmlu"]["arms"]["sft"]
    assert a["delta"] == pytest.approx(-40 / N * 100)
    assert a["flips"] == {"right_to_wrong": 40, "wrong_to_right": 0}
    assert a["test"] == "bonett_price" and a["p_value"] < 1e-6
    # Paired per-item differences are -1 on 40 of 200 items: normal-approx 95% CI of the mean difference.
    se = math.sqrt(0.2 * 0.8 / N) * 100
    lo, hi = a["ci"]
    assert lo == pytest.approx(-20 - 1.96 * se, abs=1.5) and hi == pytest.approx(-20 + 1.96 * se, abs=1.5)
    assert hi < 0 and a["significant"] is True
    assert a["soft"]["point"] < 0 and a["soft"]["ci"][1] < 0 and a["soft"]["p_value"] < 0.05
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
    # the summary reads soft accuracy, the gate's metric, where every arm has it
    soft = c["suites"]["retention"]["means"]["soft"]["informative"]["sft"]
    assert s["metric"] == "soft" and s["forgetting"] == pytest.approx(-soft["delta"]) and s["forgetting_ci"][0] > 0
    dom = c["suites"]["domain"]["means"]["soft"]["all"]["sft"]
    assert s["learning_signal"] == "transfer" and s["learning"] == pytest.approx(dom["delta"])
    assert s["learning_ci"][0] > 0 and s["signals"]["recall"] is None
    assert s["kl_mean"] == 0.25
    # arm against arm on the same items: cpt lost less than sft on retention, the pair says it rests on one seed
    pair = c["arm_vs_arm"]["pairs"][0]
    assert (pair["a"], pair["b"]) == ("sft", "cpt")
    assert pair["suites"]["retention"]["acc"]["point"] == pytest.approx(ret["delta"])
    assert pair["suites"]["retention"]["acc"]["ci"][1] < 0 and "one training seed" in pair["note"]


def test_learning_signals_recall_transfer_and_domain_text(tmp_path):
    """Recall is its own suite and the summary's default learning signal; transfer (the domain suite) and the fall of
    bits per byte on domain text are reported beside it, each with its interval."""
    from runfixture import DEFAULT_TASKS

    tasks = {**DEFAULT_TASKS, "dom_bpb": ("domain", "perplexity", "bits_per_byte", 0, 0.0),
             "rec_facts": ("recall", "multiple_choice", "acc", 4, 0.30)}
    run = make_run(tmp_path / "r", tasks=tasks, n=N, flips={("sft", "rec_facts"): (0, 40), ("sft", "ret_mmlu"): (30, 0)},
                   ll_shift={("sft", "dom_bpb"): 2.0})
    c = compare_run(run, n_boot=500)
    assert c["suites"]["recall"]["tasks"] == ["rec_facts"]
    assert "rec_facts" not in c["suites"]["domain"]["tasks"]  # the domain mean stays transfer alone
    s, cpt = c["summary"]["sft"], c["summary"]["cpt"]
    assert s["learning_signal"] == "recall"
    rec = c["suites"]["recall"]["means"]["soft"]["all"]["sft"]
    assert s["learning"] == pytest.approx(rec["delta"]) and rec["delta"] > 0 and s["signals"]["recall"]["significant"]
    assert s["signals"]["transfer"]["delta"] == pytest.approx(c["suites"]["domain"]["means"]["soft"]["all"]["sft"]["delta"])
    bpb = s["signals"]["domain_bpb"]
    assert bpb["delta"] == pytest.approx(c["tasks"]["dom_bpb"]["arms"]["sft"]["delta"]) and bpb["ci"] is not None
    assert s["forgetting"] > 0 and s["forgetting_ci"][0] > 0
    assert cpt["signals"]["recall"]["delta"] == 0.0 and not cpt["signals"]["recall"]["significant"]
    assert compare_doc(c)["summary"]["sft"]["signals"]["recall"]["delta"] == s["signals"]["recall"]["delta"]


def test_bonett_price_matches_hand_computed_value(regressed):
    # b=10 right->wrong, c=2 wrong->right of 200: p_rw = 11/202, p_wr = 3/202 (one pseudo-count per cell)
    b = np.array([1] * 10 + [0] * 2 + [1] * 100 + [0] * 88, bool)
    a = np.array([0] * 10 + [1] * 2 + [1] * 100 + [0] * 88, bool)
    e = paired_binary(b, a)
    center = (3 - 11) / 202
    se = math.sqrt((14 / 202 - center ** 2) / 202)
    assert e.point == pytest.approx(-4.0) and e.center == pytest.approx(100 * center)
    assert e.se == pytest.approx(100 * se)
    assert e.ci(0.05) == pytest.approx([100 * (center - 1.959964 * se), 100 * (center + 1.959964 * se)], rel=1e-5)
    t = regressed[1]["tasks"]["ret_wino"]["arms"]["sft"]
    assert t["flips"] == {"right_to_wrong": 10, "wrong_to_right": 2}
    assert t["acc"]["center"] == pytest.approx(100 * center) and t["acc"]["se"] == pytest.approx(100 * se)


def test_interval_excluding_zero_always_comes_with_p_below_alpha():
    """Every paired 2x2 table with n <= 30 (and a sample of larger ones), at three levels: the interval
    excludes 0 exactly when p < alpha, and the one-sided bounds agree with the one-sided tests at any margin."""
    tables = [(n, b, c) for n in range(1, 31) for b in range(n + 1) for c in range(n + 1 - b)]
    rng = np.random.default_rng(0)
    tables += [(n, int(b), int(c)) for n in (50, 200, 1000) for b, c in rng.integers(0, n // 2, size=(200, 2))]
    checked = 0
    for n, b, c in tables:
        base = np.array([1] * b + [0] * c + [0] * (n - b - c), bool)
        arm = np.array([0] * b + [1] * c + [0] * (n - b - c), bool)
        e = paired_binary(base, arm)
        for alpha in (0.01, 0.05, 0.2):
            lo, hi = e.ci(alpha)
            p = e.p_zero()
            if abs(abs(e.center) - 1.959964 * e.se) < 1e-9:
                continue  # exactly on the boundary: floating point decides
            assert (lo > 0 or hi < 0) == (p < alpha), (n, b, c, alpha, lo, hi, p)
            for margin in (-5.0, 0.0, 2.0, 10.0):
                assert (e.upper(alpha) < margin) == (e.p_above(margin) < alpha)
                assert (e.lower(alpha) > margin) == (e.p_below(margin) < alpha)
            checked += 1
    assert checked > 5000


def test_bonett_price_coverage_at_small_n():
    """Simulated coverage of the 95% interval at n = 50 stays near nominal where the plain Wald one does not."""
    rng = np.random.default_rng(1)
    n, reps, covered = 50, 4000, 0
    p_rw, p_wr = 0.10, 0.04  # true difference -6 points
    for _ in range(reps):
        u = rng.random(n)
        base = (u < p_rw) | ((u >= p_rw + p_wr) & (u < 0.6))
        arm = ((u >= p_rw) & (u < p_rw + p_wr)) | ((u >= p_rw + p_wr) & (u < 0.6))
        lo, hi = paired_binary(base, arm).ci(0.05)
        covered += lo <= -6.0 <= hi
    assert 0.93 <= covered / reps <= 0.98


def test_clusters_widen_the_interval_and_mean_of_tasks():
    base = np.array([1, 1, 0, 0] * 25, bool)
    arm = np.array([0, 0, 0, 0] * 25, bool)  # twins flip together
    iid = paired_binary(base, arm)
    twins = paired_binary(base, arm, np.repeat(np.arange(50), 2))
    assert twins.extra["design_effect"] > 1.5 and twins.se > iid.se and twins.clusters == 50
    assert design_effect(np.zeros(10), None) == 1.0
    m = mean_of_estimates([Estimate(-2, -2, 3, "x", 50), Estimate(0, 0, 4, "x", 50)])
    assert m.point == -1 and m.se == pytest.approx(2.5)
    e = paired_mean(np.zeros(40), np.full(40, 0.1))
    assert e.point == pytest.approx(10.0) and e.se == 0.0 and e.ci(0.05) == [10.0, 10.0]


def test_soft_accuracy_and_chance():
    assert soft_scores([0.0, 0.0], 1) == pytest.approx(0.5)
    assert soft_scores([math.log(3), 0.0], 0) == pytest.approx(0.75)
    assert soft_scores([1.0, 2.0], [0]) is None and soft_scores([], 0) is None
    assert above_chance_p(25, 50, 0.5) > 0.4 and above_chance_p(40, 50, 0.5) < 1e-4


def test_holm_known_example():
    adj = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005})
    # sorted: d 0.005*4=0.02, a 0.01*3=0.03, c 0.03*2=0.06, b max(0.06, 0.04*1)=0.06 (monotone)
    assert adj == pytest.approx({"d": 0.02, "a": 0.03, "c": 0.06, "b": 0.06})
    assert holm({"x": 0.7, "y": 0.9}) == pytest.approx({"x": 1.0, "y": 1.0})
    assert holm({}) == {}


def test_holm_applied_across_gated_tasks_only(regressed):
    c = regressed[1]
    ret = {n: t["arms"]["sft"] for n, t in c["tasks"].items() if t["suite"] == "retention" and t["unit"] == "points"}
    assert all(a["holm_family"] == len(ret) == 3 for a in ret.values())
    assert "p_holm" not in c["tasks"]["ret_ppl"]["arms"]["sft"]  # never gated: not in the family
    expected = holm({n: a["p_value"] for n, a in ret.items()})
    for n, a in ret.items():
        assert a["p_holm"] == pytest.approx(expected[n])
        assert a["p_holm"] >= a["p_value"]


def test_uninformative_task_left_out_of_the_mean(tmp_path):
    tasks = {"ret_easy": ("retention", "multiple_choice", "acc", 4, 0.6),
             "ret_chance": ("retention", "multiple_choice", "acc", 4, 0.25),
             "dom": ("domain", "multiple_choice", "acc", 4, 0.3)}
    run = make_run(tmp_path / "r", tasks=tasks, n=100, flips={("sft", "ret_chance"): (10, 0)})
    c = compare_run(run, n_boot=200)
    assert c["tasks"]["ret_easy"]["informative"]["value"] is True
    inf = c["tasks"]["ret_chance"]["informative"]
    assert inf["value"] is False and inf["p_value"] >= 0.05 and "uninformative" in inf["reason"]
    s = c["suites"]["retention"]
    assert s["uninformative"] == ["ret_chance"] and s["mean_over"] == ["ret_easy"]
    assert s["arms"]["sft"]["delta"] == 0.0  # the chance-level task's drop is not in the gated mean
    assert s["means"]["acc"]["all"]["sft"]["delta"] == pytest.approx(-5.0)
    assert "p_holm" not in c["tasks"]["ret_chance"]["arms"]["sft"]


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
    assert a["ci"][1] < 0 and a["test"] == "cluster_bootstrap" and "flips" not in a
    d = c["drift"]["sft"]["perplexity"]["ret_ppl"]
    assert d["ratio"] == pytest.approx(ppl(arm) / ppl(base))
    assert c["drift"]["sft"]["kl"]["mean"] == 0.25
    assert c["drift"]["sft"]["text_perplexity"]["ratio"] == pytest.approx(1.25)
    rise = c["drift"]["sft"]["ppl_rise"]
    assert rise["unit"] == "percent" and rise["ci"][0] > 0 and rise["point"] == pytest.approx(
        100 * math.log(1.25) / math.log(31.0), rel=0.1)
    assert c["drift"]["sft"]["kl_mean"]["point"] == pytest.approx(0.25) and c["drift"]["sft"]["kl_mean"]["se"] > 0


def test_bootstrap_is_seeded_and_deterministic(regressed):
    run, c = regressed
    again = compare_run(run, n_boot=1000)
    assert again["tasks"] == c["tasks"] and again["suites"] == c["suites"]
    other = compare_run(run, n_boot=1000, seed=1)
    # soft accuracy's interval is analytic (cluster-robust, t); the perplexity task's is still a bootstrap
    assert other["tasks"]["ret_mmlu"]["arms"]["sft"]["soft"]["ci"] == c["tasks"]["ret_mmlu"]["arms"]["sft"]["soft"]["ci"]
    assert other["tasks"]["ret_ppl"]["arms"]["sft"]["estimate"]["ci"] != c["tasks"]["ret_ppl"]["arms"]["sft"]["estimate"]["ci"]
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
    assert c["drift"]["sft"]["kl"] is None and c["drift"]["sft"]["ppl_rise"] is None


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
from forgetcheck.verdict.compare import compare_run
from forgetcheck.verdict.gate import gate_run
from forgetcheck.report.html import write_report
from forgetcheck.cli import app
run = make_run(Path({root!r}), n=30, flips={{("sft", "ret_mmlu"): (10, 0)}})
compare_run(run, n_boot=200)
gate_run(run.root, junit=run.root / "j.xml", markdown=run.root / "g.md")
write_report(run)
for argv in (["compare", str(run.root), "--n-boot", "200"], ["gate", str(run.root)], ["report", str(run.root)]):
    sys.argv = ["forgetcheck", *argv]
    try:
        app.main()
    except SystemExit:
        pass
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "lm_eval", "datasets", "accelerate"))
print("HEAVY=" + ",".join(heavy))
"""


def test_compare_report_gate_never_import_torch(tmp_path):
    code = NO_TORCH.format(tests=str(Path(__file__).parents[1]), root=str(tmp_path / "run"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert r.returncode == 0, r.stderr
    assert "HEAVY=\n" in r.stdout, r.stdout
    assert (tmp_path / "run" / "report.html").exists() and (tmp_path / "run" / "gate.json").exists()


# ---- drift: documents resampled, not blocks ----------------------------------------------------------------

def test_drift_estimates_resample_the_documents(regressed):
    _, c = regressed
    for key in ("ppl_rise", "kl_mean"):
        est = c["drift"]["sft"][key]
        assert est["n"] == 64 and est["clusters"] == 32  # 64 blocks of 32 documents (tests/runfixture.py)


def test_drift_blocks_of_unequal_size_weigh_by_their_positions():
    from forgetcheck.verdict.rollup import drift_block

    docs = [f"d{i // 2}" for i in range(20)]
    positions = [32, 5] * 10  # each document: a full block and a short tail
    rng = np.random.default_rng(0)
    base_nll = rng.uniform(2.5, 3.5, 20)
    arm_nll = base_nll + rng.uniform(0.0, 0.4, 20)
    kl = rng.uniform(0.01, 0.2, 20)

    def ev(nll, with_kl):
        blocks = {"size": 32, "document": docs, "positions": positions, "nll": nll.tolist(),
                  "kl": kl.tolist() if with_kl else None}
        return {"drift": {"perplexity": 20.0, "text": {"source": "t", "tokens_scored": sum(positions)},
                          "kl": {"mean": 0.1} if with_kl else None, "blocks": blocks}}

    d = drift_block({}, "sft", ev(arm_nll, True), ev(base_nll, False), alpha=0.05)
    pos = np.asarray(positions, float)
    assert d["ppl_rise"]["point"] == pytest.approx(100 * ((arm_nll * pos).sum() / (base_nll * pos).sum() - 1))
    assert d["kl_mean"]["point"] == pytest.approx((kl * pos).sum() / pos.sum())
    assert d["kl_mean"]["point"] != pytest.approx(kl.mean())  # not the unweighted mean of the blocks
    assert d["kl_mean"]["clusters"] == d["ppl_rise"]["clusters"] == 10
    assert 0 < d["kl_mean"]["se"] < 0.05 and d["notes"] == []


def test_drift_blocks_without_document_ids_give_no_interval(tmp_path):
    run = make_run(tmp_path / "r", n=60, kl={"sft": 0.5})
    strip_document_ids(run)
    c = compare_run(run, n_boot=200)
    d = c["drift"]["sft"]
    assert d["ppl_rise"] is None and d["kl_mean"] is None  # never as if the blocks were independent
    assert d["text_perplexity"]["ratio"] == pytest.approx(1.5) and d["kl"]["mean"] == 0.5  # still reported
    assert len(d["notes"]) == 2
    assert all("no document ids" in n and "re-run `forgetcheck eval`" in n for n in d["notes"])


def test_a_skewed_drift_at_its_limit_is_not_passed_more_than_alpha():
    """Per-document KL is right-skewed: when a sample's mean falls low its spread falls too, so the plain t upper
    bound sits under the truth more often than alpha. Hall's skew-corrected bound (what drift estimates carry:
    `skew`) keeps a KL exactly at its limit from PASSing much more than 5 % of the time."""
    from forgetcheck.verdict.stats import mean_of

    rng = np.random.default_rng(7)
    docs = np.repeat(np.arange(64), 2)
    limit, reps = 0.1, 2000
    corrected = plain = 0
    for _ in range(reps):
        per_doc = rng.lognormal(-0.32, 0.8, 64)  # mean 1; skewness about 3 (about 2 in a sample of 64)
        kl = limit * per_doc[docs] * rng.gamma(16.0, 1 / 16.0, 128)
        est = mean_of(kl, clusters=docs, weights=np.full(128, 32.0))
        assert est.skew is not None and est.skew > 0
        corrected += est.upper(0.05) < limit
        plain += est.point + est.q(0.95) * est.se < limit
    assert corrected / reps < 0.085 < 0.09 < plain / reps  # measured at this seed: 7.7 % against 10.5 %


def test_skew_corrected_bounds_agree_with_their_tests():
    """A skewed estimate's bounds and p-values are one rule: upper(alpha) < v exactly when p_above(v) < alpha,
    and the interval leans toward the long tail."""
    e = Estimate(point=0.1, center=0.1, se=0.01, method="cluster_robust_t", n=128, clusters=64, df=63, skew=2.0)
    sym = Estimate(point=0.1, center=0.1, se=0.01, method="cluster_robust_t", n=128, clusters=64, df=63)
    assert e.p_above(e.upper(0.05)) == pytest.approx(0.05) and e.p_below(e.lower(0.05)) == pytest.approx(0.05)
    lo, hi = e.ci(0.05)
    assert hi - e.center > e.center - lo  # longer on the right
    assert e.upper(0.05) > sym.upper(0.05) and e.lower(0.05) > sym.lower(0.05)
    assert sym.ci(0.05) == pytest.approx([0.1 - sym.q(0.975) * 0.01, 0.1 + sym.q(0.975) * 0.01])
    assert estimate_from_dict(e.to_dict(0.05)).upper(0.05) == pytest.approx(e.upper(0.05))
