"""gate: rules, reasons, policy resolution, exit codes, JUnit and Markdown, on synthetic run directories."""

from __future__ import annotations

import json
from xml.etree import ElementTree as ET

import pytest
from conftest import forgetcheck_cli
from runfixture import make_run, strip_document_ids

from forgetcheck.config import GateConfig
from forgetcheck.errors import BadInput
from forgetcheck.rundir import read_json
from forgetcheck.schema import read_gate
from forgetcheck.verdict.compare import compare_run
from forgetcheck.verdict.gate import decide, gate_run

N = 200


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
    assert code == 0 and gate["passed"] and gate["verdict"] == "pass" and gate["exit_code"] == 0
    assert all(r["status"] == "pass" for r in gate["rules"])
    kinds = {(r["rule"], r["arm"], r["task"]) for r in gate["rules"]}
    for arm in ("sft", "cpt"):
        assert ("retention_mean", arm, None) in kinds and ("ppl_rise", arm, None) in kinds
        assert ("kl", arm, None) in kinds
        for task in ("ret_mmlu", "ret_wino", "ret_truthful"):
            assert ("task_drop", arm, task) in kinds
    assert not any(r["task"] == "ret_ppl" for r in gate["rules"])  # perplexity is drift, not gated in points
    assert read_json(unchanged.gate) == gate and read_gate(unchanged.gate) == gate
    assert gate["power"]["sentence"].startswith(f"{N} items per task can only rule out")


def test_large_n_no_change_passes_on_accuracy_too(tmp_path):
    run = make_run(tmp_path / "r", n=1000)
    compare_run(run, n_boot=200)
    gate, code = gate_run(run.root, {"metric": "acc"})
    assert code == 0 and gate["verdict"] == "pass", gate["summary"]
    up = [r["values"]["drop_upper"] for r in gate["rules"] if r["rule"] == "task_drop"]
    assert max(up) < 0.5  # 1,000 unchanged items rule out far less than the 2-point margin


def test_planted_regression_fails_naming_the_task(regressed):
    for metric in ("soft", "acc"):
        gate, code = gate_run(regressed.root, {"metric": metric})
        assert code == 1 and gate["verdict"] == "fail" and not gate["passed"]
        failed = [r for r in gate["rules"] if r["status"] == "fail"]
        assert {(r["rule"], r["arm"], r["task"]) for r in failed} == {("task_drop", "sft", "ret_mmlu"),
                                                                       ("retention_mean", "sft", None)}
        r = next(r for r in failed if r["task"] == "ret_mmlu")
        assert "ret_mmlu" in r["reason"] and "sft" in r["reason"] and "Holm p=" in r["reason"]
        assert r["values"]["drop_lower"] > 2 and r["values"]["p_fail_holm"] < 0.05
        assert gate["arms"]["cpt"]["verdict"] == "pass" and gate["arms"]["sft"]["verdict"] == "fail"
    r = next(r for r in gate["rules"] if r["task"] == "ret_mmlu" and r["arm"] == "sft")
    assert "-20.0" not in r["reason"] and "drop +20.0 points" in r["reason"]
    on_disk = read_json(regressed.gate)
    assert len(on_disk["rules"]) == len(gate["rules"]) and all(r["reason"] for r in on_disk["rules"])


def test_small_drop_is_inconclusive_exit_4_and_on_inconclusive(tmp_path):
    # 6 right->wrong, 1 wrong->right on 200 items: a 2.5-point drop, neither ruled out nor shown beyond 2
    run = make_run(tmp_path / "r", n=N, flips={("sft", "ret_wino"): (6, 1)})
    compare_run(run, n_boot=500)
    gate, code = gate_run(run.root, {"metric": "acc"})
    assert code == 4 and gate["verdict"] == "inconclusive" and gate["exit_code"] == 4, gate["summary"]
    rule = next(r for r in gate["rules"] if r["task"] == "ret_wino" and r["arm"] == "sft")
    assert rule["status"] == "inconclusive" and rule["values"]["drop"] == pytest.approx(2.5)
    assert rule["values"]["drop_lower"] < 2 < rule["values"]["drop_upper"]
    assert "cannot rule out" in rule["reason"] and gate["arms"]["cpt"]["verdict"] == "pass"
    for mode, want in (("fail", 1), ("pass", 0)):
        r = forgetcheck_cli("gate", run.root, "--metric", "acc", "--on-inconclusive", mode)
        assert r.returncode == want, r.stdout + r.stderr
        assert f"--on-inconclusive {mode} maps INCONCLUSIVE to {mode.upper()}" in r.stdout
        assert "gate: INCONCLUSIVE" in r.stdout and "power: 200 items per task" in r.stdout
        assert read_json(run.gate)["verdict"] == "inconclusive"
    r = forgetcheck_cli("gate", run.root, "--metric", "acc")
    assert r.returncode == 4 and "INCONCLUSIVE" in r.stdout


def test_wide_margin_passes_a_shown_drop(regressed):
    gate, code = gate_run(regressed.root, {"max_drop": 30.0, "max_mean_drop": 10.0, "metric": "acc"})
    assert code == 0 and gate["policy"]["max_drop"] == 30.0
    rule = next(r for r in gate["rules"] if r["task"] == "ret_mmlu" and r["arm"] == "sft")
    assert rule["status"] == "pass" and "ruled out" in rule["reason"] and rule["values"]["drop_upper"] < 30


def test_min_domain_gain_uses_the_lower_bound(unchanged, regressed):
    gate, code = gate_run(unchanged.root, {"min_domain_gain": 1.0})
    assert code == 1
    failed = [r for r in gate["rules"] if r["status"] == "fail"]
    assert {r["rule"] for r in failed} == {"domain_gain"} and {r["arm"] for r in failed} == {"sft", "cpt"}
    assert "below the required 1 points" in failed[0]["reason"]
    gate_run(unchanged.root)  # restore the default gate.json


def test_decide_on_dict_policy_and_missing_tests():
    compare = {"schema_version": 2, "kind": "compare", "alpha": 0.05, "arms": ["sft"],
               "tasks": {"t": {"suite": "retention", "unit": "points", "metric": "acc", "informative": {"value": True},
                               "base": {"score": 50.0}, "arms": {"sft": {"score": 40.0, "delta": -10.0}}}},
               "suites": {}}
    g = decide(compare, {"max_drop": 2, "max_ppl_rise": None, "max_kl": None})
    assert g["verdict"] == "inconclusive" and g["exit_code"] == 4
    assert "cannot be bounded or tested" in g["rules"][0]["reason"]
    assert decide({"schema_version": 2, "arms": ["sft"], "tasks": {}}, GateConfig())["rules"][0]["rule"] == "coverage"
    with pytest.raises(BadInput, match="unknown gate policy"):
        decide(compare, {"max_dorp": 2})
    with pytest.raises(BadInput, match="alpha"):
        decide(compare, {"alpha": 2})
    for bad in ({"max_drop": float("nan")}, {"max_kl": float("inf")}, {"max_mean_drop": -1.0},
                {"metric": "f1"}, {"on_inconclusive": "maybe"}):
        with pytest.raises(BadInput):
            decide(compare, bad)


def test_drift_rules_fail_a_drifted_arm(tmp_path):
    run = make_run(tmp_path / "r", n=N, kl={"sft": 0.5, "cpt": 0.01})
    compare_run(run, n_boot=500)
    gate, code = gate_run(run.root)
    assert code == 1
    st = {(r["rule"], r["arm"]): r["status"] for r in gate["rules"] if r["rule"] in ("ppl_rise", "kl")}
    assert st == {("ppl_rise", "sft"): "fail", ("kl", "sft"): "fail", ("ppl_rise", "cpt"): "pass",
                  ("kl", "cpt"): "pass"}
    gate, code = gate_run(run.root, {"max_ppl_rise": "off", "max_kl": "off"})
    assert code == 0 and not any(r["rule"] in ("ppl_rise", "kl") for r in gate["rules"])
    r = forgetcheck_cli("gate", run.root, "--max-ppl-rise", "off", "--max-kl", "1.0")
    assert r.returncode == 0, r.stdout


def test_cli_exit_codes_policy_file_and_flag_override(regressed, tmp_path):
    r = forgetcheck_cli("gate", regressed.root)
    assert r.returncode == 1 and "FAIL" in r.stdout and "ret_mmlu" in r.stdout and "power:" in r.stdout
    policy = tmp_path / "gate.toml"
    policy.write_text("[gate]\nmax-drop = 50\nmax_mean_drop = 50\nmetric = \"acc\"\nmax_kl = \"off\"\n"
                      "on_inconclusive = \"fail\"\nkeep_uninformative = true\nmax_ppl_rise = 20\n")
    r = forgetcheck_cli("gate", regressed.root, "--policy", policy)
    assert r.returncode == 0, r.stdout + r.stderr
    pol = read_json(regressed.gate)["policy"]
    assert pol["max_drop"] == 50 and pol["metric"] == "acc" and pol["max_kl"] is None and pol["max_ppl_rise"] == 20
    r = forgetcheck_cli("gate", regressed.root, "--policy", policy, "--max-drop", "2")  # the flag wins over the file
    assert r.returncode == 1 and read_json(regressed.gate)["policy"]["max_drop"] == 2
    r = forgetcheck_cli("gate", regressed.compare)  # a compare.json path works too
    assert r.returncode == 1


def test_cli_bad_input_is_one_line_exit_2(regressed, tmp_path):
    before = regressed.gate.read_bytes()
    for args in ([tmp_path / "missing"], [regressed.root, "--policy", tmp_path / "none.toml"],
                 [regressed.root, "--alpha", "1.5"], [regressed.root, "--max-drop", "nan"],
                 [regressed.root, "--max-mean-drop", "inf"], [regressed.root, "--max-drop", "-1"],
                 [regressed.root, "--max-kl", "-0.1"], [regressed.root, "--max-ppl-rise", "lots"],
                 [regressed.root, "--max-ppl-rise", "nan"], [regressed.root, "--metric", "f1"],
                 [regressed.root, "--on-inconclusive", "maybe"], [regressed.root, "--alpha", "nan"]):
        r = forgetcheck_cli("gate", *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, (args, r.stderr)
    assert regressed.gate.read_bytes() == before  # nothing written on bad input
    for text, word in (("max_drop = 2\nmax_drops = 3\n", "max_drops"), ("max_drop = nan\n", "max_drop"),
                       ("max_kl = -1\n", "max_kl"), ("metric = \"f1\"\n", "metric"),
                       ("keep_uninformative = 1\n", "keep_uninformative")):
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        r = forgetcheck_cli("gate", regressed.root, "--policy", bad)
        assert r.returncode == 2 and word in r.stderr and r.stderr.count("\n") == 1, (text, r.stderr)
    notcompare = tmp_path / "x.json"
    notcompare.write_text(json.dumps({"schema_version": 2, "kind": "eval"}))
    r = forgetcheck_cli("gate", notcompare)
    assert r.returncode == 2 and "expected 'compare'" in r.stderr


def test_old_compare_format(regressed, tmp_path):
    old = tmp_path / "compare.json"
    old.write_text(json.dumps({"schema_version": 1, "kind": "compare", "arms": [], "tasks": {}}))
    r = forgetcheck_cli("gate", old)  # a lone v1 file: refused with the fix
    assert r.returncode == 2 and "older compare format" in r.stderr and "forgetcheck compare" in r.stderr
    saved = regressed.compare.read_bytes()
    regressed.compare.write_text(json.dumps({"schema_version": 1, "kind": "compare"}))
    r = forgetcheck_cli("gate", regressed.root)  # a run directory with an old compare.json: refused too, naming the command
    assert r.returncode == 2 and "older compare format" in r.stderr and "forgetcheck compare" in r.stderr
    regressed.compare.write_bytes(saved)


def test_junit_and_markdown(tmp_path):
    tasks = {"ret_a": ("retention", "multiple_choice", "acc", 2, 0.8),
             "ret_b": ("retention", "multiple_choice", "acc", 2, 0.7),
             "ret_chance": ("retention", "multiple_choice", "acc", 4, 0.25),
             "dom": ("domain", "multiple_choice", "acc", 4, 0.4)}
    run = make_run(tmp_path / "r", tasks=tasks, n=N, flips={("sft", "ret_a"): (40, 0), ("cpt", "ret_b"): (6, 1)})
    compare_run(run, n_boot=300)
    gate, code = gate_run(run.root, {"metric": "acc"}, junit=tmp_path / "gate.xml", markdown=tmp_path / "gate.md")
    assert code == 1
    root = ET.parse(tmp_path / "gate.xml").getroot()
    cases = root.findall(".//testcase")
    assert len(cases) == len(gate["rules"]) + 1  # + the uninformative task, skipped
    failures = [c for c in cases if c.find("failure") is not None]
    skipped = [c for c in cases if c.find("skipped") is not None]
    n_inc = sum(r["status"] == "inconclusive" for r in gate["rules"])
    assert n_inc >= 1 and len(skipped) == n_inc + 1
    assert root.find("testsuite").get("skipped") == str(n_inc + 1)
    assert root.find("testsuite").get("failures") == str(len(failures)) == "2"
    assert any(c.get("name") == "task_drop[ret_a]" and c.get("classname").endswith(".sft") for c in failures)
    inc = next(c for c in skipped if c.get("name") == "task_drop[ret_b]")
    assert inc.get("classname").endswith(".cpt") and inc.find("skipped").get("message").startswith("INCONCLUSIVE: cpt:")
    unin = next(c for c in skipped if c.get("name") == "ret_chance")
    assert "uninformative at this model size" in unin.find("skipped").get("message")
    md = (tmp_path / "gate.md").read_text()
    assert md.startswith("## forgetcheck gate: **FAIL**") and "Power: 200 items per task" in md
    assert md.count("❌") == 2 and md.count("❔") == n_inc and "uninformative ret_chance" in md
    assert [e["task"] for e in gate["excluded"]] == ["ret_chance"]
    assert not any(r["task"] == "ret_chance" for r in gate["rules"])
    kept, _ = gate_run(run.root, {"metric": "acc", "keep_uninformative": True})
    assert any(r["task"] == "ret_chance" for r in kept["rules"])


def test_policy_file_merges_top_level_and_gate_table(tmp_path):
    """Keys at the top and under [gate] both count: strict margins at the top with [gate] on_inconclusive
    must not lose the margins (it did: the [gate] table replaced the file)."""
    from forgetcheck.verdict.policy import load_policy

    p = tmp_path / "gate.toml"
    p.write_text('max_drop = 0.5\nmax_mean_drop = 0.1\n[gate]\non_inconclusive = "fail"\n')
    assert load_policy(p) == {"max_drop": 0.5, "max_mean_drop": 0.1, "on_inconclusive": "fail"}
    p.write_text('max_drop = 0.5\n[gate]\nmax-drop = 3\n')
    with pytest.raises(BadInput, match="max_drop set both at the top level and under \\[gate\\]"):
        load_policy(p)
    p.write_text('max_drop = 3\n[gate]\nmax_drop = 3\n')  # the same value twice is no conflict
    assert load_policy(p) == {"max_drop": 3}


def test_hostile_task_names_give_valid_junit_inert_markdown_and_clean_console(unchanged):
    """A task name from a user's lm-eval folder may hold control characters, HTML and Markdown: the JUnit file
    must stay valid XML, the Markdown summary inert, the console free of escape sequences."""
    from forgetcheck.verdict.text import console_lines, to_junit, to_markdown

    hostile = "ret\x1b[31m\x07<img src=x onerror=alert(1)>![p](http://e.example/x.png)`|"
    cmp = read_json(unchanged.compare)
    cmp["tasks"][hostile] = cmp["tasks"].pop("ret_mmlu")
    gate = decide(cmp, GateConfig())
    assert any(r["task"] == hostile for r in gate["rules"])
    root = ET.fromstring(to_junit(gate))  # expat refuses control characters: this parse is the check
    names = [c.get("name") for c in root.iter("testcase")]
    assert any("\\x1b" in n and "\\x07" in n for n in names) and not any("\x1b" in n for n in names)
    md = to_markdown(gate)
    assert "<img" not in md and "![" not in md and "\x1b" not in md
    assert "&lt;img" in md and "\\!\\[p\\]" in md  # shown as text: no HTML, no image to load
    lines = console_lines(gate)
    assert not any("\x1b" in x or "\x07" in x for x in lines) and any("\\x1b" in x for x in lines)


def test_the_retention_mean_rule_never_vanishes(tmp_path):
    """A gated task without soft-accuracy records (no per-choice log-likelihoods) leaves the arm's retention-mean
    rule present and INCONCLUSIVE, naming the task; the task rule falls back to accuracy. A planted mean drop
    beyond the margin that the soft mean cannot see is never a PASS."""
    run = make_run(tmp_path / "r", n=200, flips={("sft", "ret_mmlu"): (8, 0), ("sft", "ret_wino"): (8, 0)})
    path = run.samples_dir("sft") / "ret_truthful.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({**r, "loglikelihoods": None}) + "\n" for r in rows))
    compare_run(run, n_boot=200)
    gate, code = gate_run(run.root)
    means = [r for r in gate["rules"] if r["rule"] == "retention_mean"]
    assert {r["arm"] for r in means} == {"sft", "cpt"}  # one per arm, whatever its records
    sft = next(r for r in means if r["arm"] == "sft")
    assert sft["status"] == "inconclusive" and "ret_truthful has no soft-accuracy scores" in sft["reason"], sft
    truthful = next(r for r in gate["rules"] if r["arm"] == "sft" and r["task"] == "ret_truthful")
    assert truthful["values"]["metric"] == "acc"
    assert gate["arms"]["sft"]["verdict"] != "pass" and code != 0
    # on accuracy the same run has its mean: the mean rule is computed there
    gate, _ = gate_run(run.root, {"metric": "acc"})
    acc = next(r for r in gate["rules"] if r["rule"] == "retention_mean" and r["arm"] == "sft")
    assert "cannot be computed" not in acc["reason"] and acc["values"]["drop"] > 0


def test_the_summary_counts_checked_rules_and_names_the_unchecked(unchanged):
    """Rules that could not be checked (no drift measured) are not counted among the rules that passed."""
    cmp = read_json(unchanged.compare)
    for arm in cmp["arms"]:
        cmp["drift"][arm] = {"perplexity": {}, "kl": None, "text_perplexity": None, "ppl_rise": None,
                             "kl_mean": None, "notes": []}
    gate = decide(cmp, GateConfig())
    n = len(gate["rules"])
    assert f"of {n} checked rules" in gate["summary"] or f"all {n} checked rules" in gate["summary"]
    assert f"{len(gate['not_checked'])} not checked: " in gate["summary"] and "sft kl" in gate["summary"]
    assert not any(r["rule"] in ("kl", "ppl_rise") for r in gate["rules"])


def test_a_domain_gain_passes_only_on_the_bound_that_holds_whatever_the_pattern(tmp_path):
    from runfixture import lower_target

    run = make_run(tmp_path / "r", n=200)
    for task in ("dom_mmlu_med", "dom_terms"):
        lower_target(run, "sft", task, -0.45)  # the right choice 0.45 nats likelier on every domain item
    compare_run(run, n_boot=200)
    gate, _ = gate_run(run.root, {"min_domain_gain": 1.0})
    sft = next(r for r in gate["rules"] if r["rule"] == "domain_gain" and r["arm"] == "sft")
    cmp = read_json(run.compare)["suites"]["domain"]["means"]["soft"]["all"]["sft"]
    assert sft["status"] == "pass", sft["reason"]
    # the bound it passed on is the bounded one: below the t interval's lower end
    assert 1.0 <= sft["values"]["gain_lower"] < cmp["ci"][0] + (cmp["ci"][1] - cmp["ci"][0]) * 0.05


def test_drift_without_document_ids_is_inconclusive_with_the_fix(tmp_path):
    run = make_run(tmp_path / "r", n=N, kl={"sft": 0.5})  # would FAIL both drift rules with document ids
    strip_document_ids(run)
    compare_run(run, n_boot=200)
    gate, code = gate_run(run.root)
    drift = [r for r in gate["rules"] if r["rule"] in ("ppl_rise", "kl")]
    assert {(r["rule"], r["arm"]) for r in drift} == {(k, a) for k in ("ppl_rise", "kl") for a in ("sft", "cpt")}
    for r in drift:
        assert r["status"] == "inconclusive" and "re-run `forgetcheck eval`" in r["reason"], r
    assert code == 4 and gate["verdict"] == "inconclusive"


def test_a_relative_margin_applies_where_it_is_stricter(unchanged, regressed):
    """--max-relative-drop: each task's margin is min(max_drop, that percent of the base's score on it). The
    unchanged fixture's 200 items rule out 1.6 points: a 3 % margin on a task the base scores 42.7 on (1.28 points)
    is too strict for that, one on 55.1 (1.65 points) is not."""
    base = {name: t["base"].get("soft_score") for name, t in read_json(unchanged.compare)["tasks"].items()}
    gate, code = gate_run(unchanged.root, {"max_relative_drop": 3})
    tasks = [r for r in gate["rules"] if r["rule"] == "task_drop"]
    assert tasks
    for r in tasks:
        v, want = r["values"], min(2.0, 0.03 * base[r["task"]])
        assert v["max_drop"] == pytest.approx(want) and v["max_drop_absolute"] == 2.0
        assert v["margin_from"] == ("relative" if want < 2.0 else "absolute")
        assert r["status"] == ("pass" if v["drop_upper"] < want else "inconclusive"), r["reason"]
        if want < 2.0:
            assert "3% of the base's" in r["reason"]
    assert {r["status"] for r in tasks} == {"pass", "inconclusive"} and code == 4
    assert "3% of the base's score where smaller" in gate["power"]["sentence"]
    loose, code = gate_run(unchanged.root, {"max_relative_drop": 50})  # looser than 2 points everywhere: as without
    assert code == 0 and all(r["values"]["max_drop"] == 2.0 and r["values"]["margin_from"] == "absolute"
                             for r in loose["rules"] if r["rule"] == "task_drop")
    failed, code = gate_run(regressed.root, {"max_relative_drop": 3})
    assert code == 1 and any(r["task"] == "ret_mmlu" and r["status"] == "fail" for r in failed["rules"])


def test_relative_margin_flag_policy_key_and_bad_values(unchanged, tmp_path):
    r = forgetcheck_cli("gate", unchanged.root, "--max-relative-drop", "3")
    assert r.returncode == 4 and read_json(unchanged.gate)["policy"]["max_relative_drop"] == 3
    policy = tmp_path / "gate.toml"
    policy.write_text("max_relative_drop = \"off\"\n")
    r = forgetcheck_cli("gate", unchanged.root, "--policy", policy)
    assert r.returncode == 0 and read_json(unchanged.gate)["policy"]["max_relative_drop"] is None
    before = unchanged.gate.read_bytes()
    for value in ("0", "150", "lots", "nan"):
        r = forgetcheck_cli("gate", unchanged.root, "--max-relative-drop", value)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--max-relative-drop" in r.stderr, (value, r.stderr)
    policy.write_text("max_relative_drop = -5\n")
    r = forgetcheck_cli("gate", unchanged.root, "--policy", policy)
    assert r.returncode == 2 and "max_relative_drop" in r.stderr and r.stderr.count("\n") == 1
    assert unchanged.gate.read_bytes() == before


def test_tiers_advisory_never_changes_the_verdict_supporting_must_not_fail(regressed, unchanged, tmp_path):
    """The regressed fixture drops ret_mmlu by 20 points for sft. Advisory: the rule still says FAIL, in its own
    Holm family and out of the retention mean, and the release PASSes (JUnit: skipped, not failed). Supporting:
    a FAIL still fails the release. Critical (no tiers): as always."""
    gate, code = gate_run(regressed.root, {"tiers": {"ret_mmlu": "advisory"}})
    mmlu = next(r for r in gate["rules"] if r["task"] == "ret_mmlu" and r["arm"] == "sft")
    assert mmlu["status"] == "fail" and mmlu["tier"] == "advisory" and "[advisory]" in mmlu["reason"]
    assert mmlu["values"]["holm_family"] == 1
    others = [r for r in gate["rules"] if r["rule"] == "task_drop" and r["arm"] == "sft" and r["task"] != "ret_mmlu"]
    assert others and all(r["values"]["holm_family"] == len(others) and r["tier"] == "critical" for r in others)
    mean = next(r for r in gate["rules"] if r["rule"] == "retention_mean" and r["arm"] == "sft")
    assert mean["status"] == "pass" and "advisory ret_mmlu left out" in mean["reason"]
    assert code == 0 and gate["verdict"] == "pass", gate["summary"]
    assert "(2 advisory, reported and not counted)" in gate["summary"]  # ret_mmlu of sft and of cpt
    junit = tmp_path / "g.xml"
    r = forgetcheck_cli("gate", regressed.root, "--policy", _toml(tmp_path, 'ret_mmlu = "advisory"'), "--junit", junit)
    assert r.returncode == 0, r.stdout + r.stderr
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("failures") == "0" and any("(advisory)" in c.get("name") for c in suite.iter("testcase"))

    gate, code = gate_run(regressed.root, {"tiers": {"ret_m*": "supporting"}})  # a pattern
    assert code == 1 and next(r for r in gate["rules"] if r["task"] == "ret_mmlu" and r["arm"] == "sft")["tier"] == \
        "supporting"
    assert gate_run(regressed.root)[1] == 1

    # every gated task advisory: nothing counts, so the release is not PASS even with nothing changed
    gate, code = gate_run(unchanged.root, {"tiers": {"ret_*": "advisory"}})
    assert code == 4 and any(r["rule"] == "coverage" and r["status"] == "inconclusive" for r in gate["rules"])


def test_a_supporting_task_that_cannot_rule_harm_out_does_not_hold_the_release(tmp_path):
    # 6 right->wrong, 1 wrong->right on ret_wino: a 2.5-point accuracy drop, INCONCLUSIVE on its own
    run = make_run(tmp_path / "r", n=N, flips={("sft", "ret_wino"): (6, 1)})
    compare_run(run, n_boot=500)
    pol = {"metric": "acc", "max_mean_drop": 5.0}
    assert gate_run(run.root, pol)[1] == 4
    gate, code = gate_run(run.root, {**pol, "tiers": {"ret_wino": "supporting"}})
    wino = next(r for r in gate["rules"] if r["task"] == "ret_wino" and r["arm"] == "sft")
    assert wino["status"] == "inconclusive" and wino["tier"] == "supporting"
    assert code == 0 and gate["verdict"] == "pass", gate["summary"]
    assert "supporting rule(s) could not rule it out" in gate["summary"]


def test_tiers_in_the_policy_file_and_bad_tiers(regressed, tmp_path):
    r = forgetcheck_cli("gate", regressed.root, "--policy", _toml(tmp_path, '"ret_mm*" = "advisory"'))
    assert r.returncode == 0, r.stdout + r.stderr
    assert read_json(regressed.gate)["policy"]["tiers"] == [["ret_mm*", "advisory"]]
    before = regressed.gate.read_bytes()
    for body, word in (('ret_mmlu = "optional"', "optional"), ('ret_mmlu = 3', "tier")):
        r = forgetcheck_cli("gate", regressed.root, "--policy", _toml(tmp_path, body))
        assert r.returncode == 2 and word in r.stderr and r.stderr.count("\n") == 1, (body, r.stderr)
    bad = tmp_path / "flat.toml"
    bad.write_text('tiers = "advisory"\n')
    r = forgetcheck_cli("gate", regressed.root, "--policy", bad)
    assert r.returncode == 2 and "tiers must be a table" in r.stderr and r.stderr.count("\n") == 1
    assert regressed.gate.read_bytes() == before


def _toml(folder, tiers_line: str):
    path = folder / "tiers.toml"
    path.write_text(f"[gate.tiers]\n{tiers_line}\n")
    return path


def test_the_pass_floor_is_said_when_no_outcome_could_pass(tmp_path):
    """At 50 items the bound of a task on which nothing moved is about 6.4 points, above the 2-point margin: no
    outcome short of a gain could PASS. The rule and the power sentence say so; at 200 items they do not."""
    from forgetcheck.verdict.stats import pass_floor

    assert pass_floor(50, 0.05) > 2.0 > pass_floor(200, 0.05)
    run = make_run(tmp_path / "r", n=50)
    compare_run(run, n_boot=200)
    gate, code = gate_run(run.root)
    tasks = [r for r in gate["rules"] if r["rule"] == "task_drop"]
    assert code == 4 and tasks and all(r["status"] == "inconclusive" for r in tasks)
    for r in tasks:
        assert r["values"]["pass_floor"] == pytest.approx(pass_floor(50, 0.05))
        assert "no outcome short of a gain could PASS it" in r["reason"]
    assert "cannot PASS whatever the items show short of a gain" in gate["power"]["sentence"]
    loose, code = gate_run(run.root, {"max_drop": 10.0, "max_mean_drop": 5.0})
    assert code == 0 and "short of a gain" not in loose["power"]["sentence"]


def test_a_policy_with_tiers_a_relative_margin_and_a_missing_required_task(unchanged, tmp_path):
    """The three guards of one policy file together: the relative margin applies where stricter, an advisory task
    is reported and never counted, and a required task that was never evaluated is MISSING: the verdict is never
    PASS while it is, and JUnit and Markdown say both."""
    names = sorted({r["task"] for r in gate_run(unchanged.root)[0]["rules"] if r["rule"] == "task_drop"})
    policy = tmp_path / "gate.toml"
    policy.write_text(f'[gate]\nmax_relative_drop = 50\nrequire_tasks = ["ret_never_run"]\n'
                      f'[gate.tiers]\n"{names[0]}" = "advisory"\n')
    junit, md = tmp_path / "gate.xml", tmp_path / "gate.md"
    r = forgetcheck_cli("gate", unchanged.root, "--policy", policy, "--junit", junit, "--markdown", md)
    gate = read_json(unchanged.gate)
    assert r.returncode == 4 and gate["verdict"] == "inconclusive", r.stdout + r.stderr
    missing = [x for x in gate["rules"] if x["rule"] == "task_missing"]
    assert [x["task"] for x in missing] and all(x["task"] == "ret_never_run" for x in missing)
    advisory = next(x for x in gate["rules"] if x["task"] == names[0] and x["rule"] == "task_drop")
    assert advisory["tier"] == "advisory" and advisory["reason"].count("[advisory]") == 1
    assert all(x["values"]["margin_from"] == "absolute" for x in gate["rules"] if x["rule"] == "task_drop")
    text = md.read_text()
    assert "MISSING task_missing ret_never_run" in text and f"task_drop {names[0]} (advisory)" in text
    assert "ret_never_run" in junit.read_text() and "(advisory)" in junit.read_text()
    # with the required task dropped the same policy passes: MISSING was what held it back
    policy.write_text(f'[gate]\nmax_relative_drop = 50\n[gate.tiers]\n"{names[0]}" = "advisory"\n')
    assert forgetcheck_cli("gate", unchanged.root, "--policy", policy).returncode == 0
