"""gate: rules, reasons, policy resolution, exit codes, JUnit and Markdown, on synthetic run directories."""

from __future__ import annotations

import json
import subprocess
import sys
from xml.etree import ElementTree as ET

import pytest
from runfixture import make_run

from forgetcheck.compare import compare_run
from forgetcheck.config import GateConfig
from forgetcheck.errors import BadInput
from forgetcheck.gate import decide, gate_run
from forgetcheck.rundir import read_json

N = 200


def cli(*args):
    return subprocess.run([sys.executable, "-m", "forgetcheck", "gate", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def unchanged(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("g") / "unchanged", n=N)
    compare_run(run, n_boot=500)
    return run


@pytest.fixture(scope="module")
def regressed(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("g") / "regressed", n=N, flips={("sft", "ret_mmlu"): (40, 0)})
    compare_run(run, n_boot=500)
    return run


def test_unchanged_copy_passes(unchanged):
    gate, code = gate_run(unchanged.root)
    assert code == 0 and gate["passed"] and gate["verdict"] == "pass"
    assert all(r["passed"] for r in gate["rules"])
    kinds = {(r["rule"], r["arm"], r["task"]) for r in gate["rules"]}
    for arm in ("sft", "cpt"):
        assert ("retention_mean", arm, None) in kinds
        for task in ("ret_mmlu", "ret_wino", "ret_truthful"):
            assert ("task_drop", arm, task) in kinds
    assert not any(r["task"] == "ret_ppl" for r in gate["rules"])  # perplexity is drift, not gated in points
    assert read_json(unchanged.gate) == gate


def test_planted_regression_fails_naming_the_task(regressed):
    gate, code = gate_run(regressed.root)
    assert code == 1 and not gate["passed"]
    failed = [r for r in gate["rules"] if not r["passed"]]
    assert {(r["rule"], r["arm"], r["task"]) for r in failed} == {("task_drop", "sft", "ret_mmlu"),
                                                                   ("retention_mean", "sft", None)}
    reason = next(r["reason"] for r in failed if r["task"] == "ret_mmlu")
    assert "ret_mmlu" in reason and "sft" in reason and "-20.0" in reason and "significant" in reason
    assert gate["arms"]["cpt"]["passed"] and not gate["arms"]["sft"]["passed"]
    on_disk = read_json(regressed.gate)
    assert len(on_disk["rules"]) == len(gate["rules"]) and all(r["reason"] for r in on_disk["rules"])


def test_small_nonsignificant_drop_passes(tmp_path):
    # 6 right->wrong, 1 wrong->right on 200 items: a 2.5-point drop (> max 2) but McNemar p = 2*8/128 = 0.125
    run = make_run(tmp_path / "r", n=N, flips={("sft", "ret_wino"): (6, 1)})
    compare_run(run, n_boot=500)
    gate, code = gate_run(run.root)
    assert code == 0, gate["summary"]
    rule = next(r for r in gate["rules"] if r["task"] == "ret_wino" and r["arm"] == "sft")
    assert rule["passed"] and "not significant" in rule["reason"] and rule["values"]["drop"] == pytest.approx(2.5)


def test_significant_drop_below_threshold_passes(regressed):
    gate, code = gate_run(regressed.root, {"max_drop": 25.0, "max_mean_drop": 10.0})
    assert code == 0 and gate["policy"]["max_drop"] == 25.0
    rule = next(r for r in gate["rules"] if r["task"] == "ret_mmlu" and r["arm"] == "sft")
    assert "within max 25" in rule["reason"]


def test_min_domain_gain(unchanged):
    gate, code = gate_run(unchanged.root, {"min_domain_gain": 1.0})
    assert code == 1
    failed = [r for r in gate["rules"] if not r["passed"]]
    assert {r["rule"] for r in failed} == {"domain_gain"} and {r["arm"] for r in failed} == {"sft", "cpt"}
    assert "below the required 1 points" in failed[0]["reason"]
    gate_run(unchanged.root)  # restore the default gate.json


def test_decide_on_dict_policy_and_missing_tests():
    compare = {"schema_version": 1, "kind": "compare", "alpha": 0.05, "arms": ["sft"],
               "tasks": {"t": {"suite": "retention", "unit": "points", "metric": "acc",
                               "base": {"score": 50.0}, "arms": {"sft": {"score": 40.0, "delta": -10.0}}}},
               "suites": {}}
    g = decide(compare, {"max_drop": 2})
    assert not g["passed"] and "cannot be tested" in g["rules"][0]["reason"]
    assert decide({"schema_version": 1, "arms": ["sft"], "tasks": {}}, GateConfig())["rules"][0]["rule"] == "coverage"
    with pytest.raises(BadInput, match="unknown gate policy"):
        decide(compare, {"max_dorp": 2})
    with pytest.raises(BadInput, match="alpha"):
        decide(compare, {"alpha": 2})


def test_cli_exit_codes_policy_file_and_flag_override(regressed, tmp_path):
    r = cli(regressed.root)
    assert r.returncode == 1 and "FAIL" in r.stdout and "ret_mmlu" in r.stdout
    policy = tmp_path / "gate.toml"
    policy.write_text("[gate]\nmax-drop = 50\nmax_mean_drop = 50\n")
    r = cli(regressed.root, "--policy", policy)
    assert r.returncode == 0, r.stdout + r.stderr
    assert read_json(regressed.gate)["policy"]["max_drop"] == 50
    r = cli(regressed.root, "--policy", policy, "--max-drop", "2")  # the flag wins over the file
    assert r.returncode == 1 and read_json(regressed.gate)["policy"]["max_drop"] == 2
    r = cli(regressed.compare)  # a compare.json path works too
    assert r.returncode == 1


def test_cli_bad_input_is_one_line_exit_2(regressed, tmp_path):
    for args in ([tmp_path / "missing"], [regressed.root, "--policy", tmp_path / "none.toml"],
                 [regressed.root, "--alpha", "1.5"]):
        r = cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("max_drop = 2\nmax_drops = 3\n")
    r = cli(regressed.root, "--policy", bad)
    assert r.returncode == 2 and "max_drops" in r.stderr
    notcompare = tmp_path / "x.json"
    notcompare.write_text(json.dumps({"schema_version": 1, "kind": "eval"}))
    r = cli(notcompare)
    assert r.returncode == 2 and "expected 'compare'" in r.stderr


def test_junit_and_markdown(regressed, tmp_path):
    gate, code = gate_run(regressed.root, junit=tmp_path / "gate.xml", markdown=tmp_path / "gate.md")
    root = ET.parse(tmp_path / "gate.xml").getroot()
    cases = root.findall(".//testcase")
    assert len(cases) == len(gate["rules"])
    failures = [c for c in cases if c.find("failure") is not None]
    assert len(failures) == 2 and root.find("testsuite").get("failures") == "2"
    assert any(c.get("name") == "task_drop[ret_mmlu]" and c.get("classname").endswith(".sft") for c in failures)
    md = (tmp_path / "gate.md").read_text()
    assert md.startswith("## forgetcheck gate: **FAIL**")
    assert md.count("❌") == 2 and md.count("✅") == len(gate["rules"]) - 2 and "ret_mmlu" in md


def test_drop_equal_to_threshold_passes_despite_float_noise(tmp_path):
    # 3 of 150 items flipped: 100 * (-3/150) is -2.0000000000000036 in floating point, exactly the max 2
    run = make_run(tmp_path / "r", n=150, flips={("sft", "ret_wino"): (40, 37)})
    c = compare_run(run, n_boot=200)
    assert c["tasks"]["ret_wino"]["arms"]["sft"]["delta"] == pytest.approx(-2.0)
    gate, code = gate_run(run.root, {"max_drop": 2.0, "alpha": 0.9})
    rule = next(r for r in gate["rules"] if r["task"] == "ret_wino" and r["arm"] == "sft")
    assert rule["passed"] and "within max 2" in rule["reason"]
