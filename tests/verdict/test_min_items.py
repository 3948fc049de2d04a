"""No verdict from a handful of paired items: below stats.MIN_PAIRED paired units (items, clusters, drift blocks), or
with every unit moved by exactly the same amount, no rule is PASS or FAIL; at and above the minimum the verdicts
are those of the rules alone. Through the real command line on planted run folders (tests/runfixture.py) and on
stock lm-eval outputs (tests/planted.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import forgetcheck_cli
from runfixture import keep_drift_blocks, lower_target, make_run

from forgetcheck.config import GateConfig
from forgetcheck.rundir import read_json
from forgetcheck.verdict import stats
from forgetcheck.verdict.compare import compare_run
from forgetcheck.verdict.gate import decide
from forgetcheck.verdict.stats import MIN_PAIRED, Estimate

NAMES_MINIMUM = f"fewer than the minimum of {MIN_PAIRED}"
ITEM_RULES = ("task_drop", "retention_mean")


def _planted(root: Path, n: int) -> Path:
    """n items per task; sft's right choices 0.3 nats less likely on ret_mmlu (a soft drop, no flip), cpt an
    unchanged copy; --keep-uninformative in the calls below gates every task whatever n."""
    run = make_run(root, n=n)
    lower_target(run, "sft", "ret_mmlu", 0.3)
    return run.root


def _gate(root: Path, *flags: str):
    r = forgetcheck_cli("gate", root, "--keep-uninformative", *flags)
    assert "Traceback" not in r.stderr, r.stderr
    return r, read_json(root / "gate.json")


@pytest.mark.parametrize("n", sorted({1, 2, 3, MIN_PAIRED - 1}))
@pytest.mark.parametrize("metric", ["soft", "acc"])
def test_below_the_minimum_no_item_rule_passes_or_fails(tmp_path, n, metric):
    root = _planted(tmp_path / "run", n)
    r, gate = _gate(root, "--metric", metric)
    assert r.returncode == 4, r.stdout + r.stderr
    assert gate["verdict"] == "inconclusive" and "INCONCLUSIVE" in r.stdout and NAMES_MINIMUM in r.stdout
    item_rules = [x for x in gate["rules"] if x["rule"] in ITEM_RULES]
    assert {(x["arm"], x["task"]) for x in item_rules if x["rule"] == "task_drop"} == {
        (a, t) for a in ("sft", "cpt") for t in ("ret_mmlu", "ret_wino", "ret_truthful")}
    for x in item_rules:
        assert x["status"] == "inconclusive" and not x["passed"], x
        assert x["reason"].count(NAMES_MINIMUM) == 1 and "not enough evidence" in x["reason"], x["reason"]
        assert x["values"]["min_paired"] == MIN_PAIRED
    # the planted drop is there to be seen, and the one-item interval was the degenerate one
    sft = read_json(root / "compare.json")["tasks"]["ret_mmlu"]["arms"]["sft"]["soft"]
    assert sft["point"] < -2 and (n > 1 or sft["se"] == 0.0)
    # what would decide: never fewer items than the minimum
    assert all(p["items_needed"] >= MIN_PAIRED for p in gate["power"]["arms"].values())
    assert NAMES_MINIMUM in gate["power"]["sentence"]
    for mode in ("fail", "pass"):  # --on-inconclusive still maps it, and says so
        r, _ = _gate(root, "--metric", metric, "--on-inconclusive", mode)
        assert r.returncode == {"fail": 1, "pass": 0}[mode] and f"maps INCONCLUSIVE to {mode.upper()}" in r.stdout


@pytest.mark.parametrize("n", [MIN_PAIRED, MIN_PAIRED + 4, 40])
def test_at_and_above_the_minimum_the_rules_decide_as_before(tmp_path, n, monkeypatch):
    root = _planted(tmp_path / "run", n)
    for metric in ("soft", "acc"):
        r, gate = _gate(root, "--metric", metric)
        assert r.returncode == gate["exit_code"] == {"pass": 0, "fail": 1, "inconclusive": 4}[gate["verdict"]]
        assert "not enough evidence" not in json.dumps(gate)
        # the same rules with no minimum at all: nothing at or above it differs
        compare = read_json(root / "compare.json")
        policy = GateConfig(keep_uninformative=True, metric=metric)
        with monkeypatch.context() as m:
            m.setattr(stats, "MIN_PAIRED", 1)
            unbounded = decide(compare, policy)
        assert decide(compare, policy) == unbounded
        assert [(x["rule"], x["arm"], x["task"], x["status"]) for x in gate["rules"]] == \
            [(x["rule"], x["arm"], x["task"], x["status"]) for x in unbounded["rules"]]
    # an unchanged copy is not short of evidence from the minimum on (every item exactly as the base's is what the
    # data say), but a soft-accuracy PASS needs the items that rule out a drop carried by a few unseen items
    r, gate = _gate(root)
    cpt = [x for x in gate["rules"] if x["arm"] == "cpt" and x["rule"] in ITEM_RULES]
    assert all(x["status"] == "inconclusive" and "whatever the pattern" in x["reason"] for x in cpt), cpt
    assert gate["power"]["arms"]["cpt"]["items_needed"] >= 165


def test_an_unchanged_copy_passes_on_soft_accuracy_with_enough_items(tmp_path):
    """165 units rule out a 2-point drop whatever its pattern when every unit is unchanged (stats.pass_items)."""
    r, gate = _gate(_planted(tmp_path / "run", 200))
    assert gate["arms"]["cpt"]["verdict"] == "pass", gate["arms"]["cpt"]
    rules = [x for x in gate["rules"] if x["arm"] == "cpt" and x["rule"] in ITEM_RULES]
    assert rules and all(x["values"]["bound"] == "bounded" and x["values"]["drop_upper"] < 2 for x in rules)


def test_every_item_moved_by_the_same_amount_is_not_evidence(tmp_path):
    run = make_run(tmp_path / "run", n=40)
    compare_run(run, n_boot=200)
    doc = read_json(run.compare)
    soft = doc["tasks"]["ret_mmlu"]["arms"]["sft"]["soft"]
    soft.update(point=-5.0, center=-5.0, se=0.0, ci=[-5.0, -5.0], p_value=0.0)  # a zero-width interval at -5
    run.compare.write_text(json.dumps(doc))
    r, gate = _gate(run.root)
    assert r.returncode == 4, r.stdout  # not FAIL at p = 0
    rule = next(x for x in gate["rules"] if x["arm"] == "sft" and x["task"] == "ret_mmlu")
    assert rule["status"] == "inconclusive" and "moved by exactly -5" in rule["reason"]
    assert "the spread is zero" in rule["reason"]
    mean = next(x for x in gate["rules"] if x["arm"] == "sft" and x["rule"] == "retention_mean")
    assert mean["status"] == "inconclusive" and "ret_mmlu: not enough evidence" in mean["reason"]
    cpt = [x for x in gate["rules"] if x["arm"] == "cpt" and x["rule"] in ITEM_RULES]
    assert not any("not enough evidence" in x["reason"] for x in cpt)  # no spread around no change is evidence


def test_a_short_drift_text_decides_nothing(tmp_path):
    run = make_run(tmp_path / "run", n=40, kl={"sft": 0.5})
    keep_drift_blocks(run, MIN_PAIRED - 1)
    r, gate = _gate(run.root)
    assert r.returncode == 4, r.stdout  # the KL of 0.5 would FAIL the 0.1 limit on enough blocks
    drift = [x for x in gate["rules"] if x["rule"] in ("ppl_rise", "kl")]
    assert {(x["rule"], x["arm"]) for x in drift} == {(k, a) for k in ("ppl_rise", "kl") for a in ("sft", "cpt")}
    for x in drift:
        # the units are documents (the blocks' clusters), not blocks
        assert x["status"] == "inconclusive" and f"not enough evidence: {MIN_PAIRED - 1} " in x["reason"]
        assert NAMES_MINIMUM in x["reason"]


def test_clusters_count_not_items():
    est = Estimate(point=-1.0, center=-1.0, se=0.5, method="cluster_bootstrap", n=40, clusters=MIN_PAIRED - 1)
    assert f"{MIN_PAIRED - 1} cluster(s) of paired items" in est.evidence_gap()
    assert est.items_needed(100.0, 0.05) >= 40 * MIN_PAIRED / (MIN_PAIRED - 1)
    enough = Estimate(point=-1.0, center=-1.0, se=0.5, method="cluster_bootstrap", n=40, clusters=MIN_PAIRED)
    assert enough.evidence_gap() is None
    assert Estimate(point=0.0, center=0.0, se=0.0, method="cluster_bootstrap", n=MIN_PAIRED).evidence_gap() is None
    assert "moved by exactly" in Estimate(point=0.5, center=0.5, se=0.0, method="x", n=50).evidence_gap()


def test_a_one_item_lm_eval_candidate_is_inconclusive(tmp_path, tiny_ref):
    """The reproduction: lm-eval with --limit 1 for the candidate against a full base run of the same model."""
    import planted

    tasks_dir = planted.planted_task(tmp_path / "tasks", Path(tiny_ref.path))
    base = planted.lmeval_outputs(Path(tiny_ref.path), tasks_dir, tmp_path / "lm_base")
    one = planted.lmeval_outputs(Path(tiny_ref.path), tasks_dir, tmp_path / "lm_one", limit=1)
    r = forgetcheck_cli("check", "--base-samples", base, "--candidate-samples", f"one={one}",
                        "--out", tmp_path / "runs", "--run-id", "one")
    assert r.returncode == 4, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "INCONCLUSIVE" in r.stdout
    gate = read_json(tmp_path / "runs" / "one" / "gate.json")
    rule = next(x for x in gate["rules"] if x["rule"] == "task_drop")
    assert rule["task"] == "planted" and rule["status"] == "inconclusive" and rule["values"]["n"] == 1
    assert NAMES_MINIMUM in rule["reason"]
