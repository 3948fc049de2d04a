"""`--seeds K`: every arm trained K times with shifted data-order seeds, and arms compared with a two-level
bootstrap (training runs, then items), so an arm-vs-arm statement is about the methods, not one run each."""

from __future__ import annotations

import json

import numpy as np
import pytest
from runfixture import make_run

from forgetcheck import config
from forgetcheck.cli import train
from forgetcheck.report.html import chart_summary, write_report
from forgetcheck.rundir import RunDir
from forgetcheck.verdict.compare import compare_run
from forgetcheck.verdict.gate import gate_run
from forgetcheck.verdict.stats import paired_mean, two_level_diff


def test_seed_run_labels_round_trip_and_leave_other_labels_alone():
    for arm in ("sft", "cpt", "lora"):
        assert config.seed_run_label(arm, 0) == arm
        for i in (1, 2, 17):
            assert config.seed_run_of(config.seed_run_label(arm, i)) == (arm, i)
    for label in ("wise-0.5", "sft_s0", "sft_s01", "mine_s1", "sft_sx", "base"):
        assert config.seed_run_of(label) == (label, 0)
    cfg = config.TrainConfig(seed=3, data_seed=5, seeds=3)
    arm, rc = config.seed_run_config("cpt_s2", cfg)
    assert arm == "cpt" and (rc.seed, rc.data_seed) == (5, 7)
    assert config.seed_run_config("cpt", cfg) == ("cpt", cfg)
    assert any("--seeds" in p for p in config.validate_train(config.TrainConfig(seeds=0)))


def test_two_level_interval_holds_the_seed_to_seed_spread():
    rng = np.random.default_rng(0)
    n = 400
    base = (rng.random(n) < 0.6).astype(float)
    # three training runs that forget very different amounts (right -> wrong on 0%, 10%, 30% of the items)
    runs = np.stack([np.where(rng.random(n) < p, 0.0, base) for p in (0.0, 0.10, 0.30)])
    one = two_level_diff([runs], [base[None, :]], n_boot=2000, seed=1, key="t")
    assert one.point == pytest.approx((runs.mean() - base.mean()) * 100)
    items_only = paired_mean(base, runs.mean(axis=0))
    assert one.se > 2 * items_only.se  # the runs disagree: the seed level adds most of the variance
    # identical runs: the seed level adds nothing, the item level remains
    same = two_level_diff([np.stack([runs[1]] * 3)], [base[None, :]], n_boot=2000, seed=1, key="t")
    assert same.se == pytest.approx(paired_mean(base, runs[1]).se, rel=0.15)
    assert same.method == "two_level_bootstrap" and same.extra["runs"] == [3, 1]


def test_compare_groups_seed_runs_and_compares_methods(tmp_path):
    arms = ("sft", "sft_s1", "sft_s2", "cpt", "cpt_s1", "cpt_s2")
    # sft forgets on the retention tasks, by an amount that varies from run to run; cpt forgets little
    flips = {("sft", "ret_mmlu"): (20, 2), ("sft_s1", "ret_mmlu"): (8, 2), ("sft_s2", "ret_mmlu"): (30, 1),
             ("sft", "ret_wino"): (12, 3), ("sft_s1", "ret_wino"): (25, 2), ("sft_s2", "ret_wino"): (6, 4),
             ("cpt", "ret_mmlu"): (3, 2), ("cpt_s1", "ret_mmlu"): (2, 3), ("cpt_s2", "ret_mmlu"): (4, 2)}
    run = make_run(tmp_path / "r", arms=arms, flips=flips)
    c = compare_run(run)
    groups = c["seed_groups"]
    assert set(groups) == {"sft", "cpt"} and groups["sft"]["labels"] == ["sft", "sft_s1", "sft_s2"]
    ret = groups["sft"]["suites"]["retention"]["acc"]
    assert ret["method"] == "two_level_bootstrap" and ret["point"] < 0
    # the group's point is the mean of its runs' suite means (over the same informative tasks)
    runs_mean = np.mean([c["suites"]["retention"]["arms"][lab]["delta"] for lab in groups["sft"]["labels"]])
    assert ret["point"] == pytest.approx(runs_mean, abs=1e-9)
    assert groups["sft"]["summary"]["forgetting"] == pytest.approx(-ret["point"])
    pairs = c["arm_vs_arm"]["pairs"]
    assert [(p["a"], p["b"]) for p in pairs] == [("sft", "cpt")]  # methods, not 15 pairs of runs
    p = pairs[0]
    assert p["seeds"] == 3 and "two-level" in p["note"] and p["a_runs"] == ["sft", "sft_s1", "sft_s2"]
    est = p["suites"]["retention"]["acc"]
    assert est["method"] == "two_level_bootstrap" and est["point"] < 0  # sft kept less than cpt
    # the report draws one point per arm, over its runs
    pts = chart_summary(c)
    assert set(pts) == {"sft", "cpt"} and pts["sft"]["seeds"] == 3
    gate_run(run.root)
    html = write_report(run).read_text()
    assert "sft (3 seeds)" in html and "two-level" in html


def test_one_seed_keeps_run_level_statements(tmp_path):
    run = make_run(tmp_path / "r", flips={("sft", "ret_mmlu"): (10, 2)})
    c = compare_run(run)
    assert c["seed_groups"] is None
    (p,) = c["arm_vs_arm"]["pairs"]
    assert p["seeds"] == 1 and "one training seed" in p["note"]
    assert p["suites"]["retention"]["acc"]["method"] == "mean_of_tasks"


def test_seed_run_trains_on_its_own_data_order(tiny_ref, tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    with open(root / "sft.jsonl", "w") as f:
        for i in range(24):
            f.write(json.dumps({"prompt": f"Question {i} about nerves?", "response": f"Answer {i} " * (2 + i % 5)})
                    + "\n")
    cfg = config.TrainConfig(budget_tokens=4 * 2 * 32, seq_len=32, micro_batch=2, grad_accum=1, lr=1e-3, seeds=2)
    run = RunDir(tmp_path / "run")
    recs = train.cmd_train(str(tiny_ref.path), str(root), ("sft",), cfg, run, device="cpu")
    assert [r["arm"] for r in recs] == ["sft", "sft_s1"]
    a, b = recs
    assert a["method"] == b["method"] == "sft" and (a["seed_run"], b["seed_run"]) == (0, 1)
    assert b["config"]["data_seed"] == a["config"]["data_seed"] + 1 and b["config"]["seed"] == a["config"]["seed"] + 1
    assert a["optimizer_steps"] == b["optimizer_steps"]
    assert abs(a["tokens_seen"]["forward"] - b["tokens_seen"]["forward"]) <= cfg.seq_len
    assert a["loss_curve"] != b["loss_curve"]  # another data order: another run
    assert (run.ckpt("sft_s1") / "config.json").exists()
