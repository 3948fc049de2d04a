"""Scoring until decided: the sequential bounds keep their error across looks, the gate bets on each look's units,
and only the tasks whose verdict more items could change get them (verdict/sequential.py, docs/verdicts.md
"Until decided")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from forgetcheck.config import GateConfig, LookConfig
from forgetcheck.schema import SCHEMA_VERSION
from forgetcheck.verdict import sequential
from forgetcheck.verdict.stats import bounded_upper, look_orders, look_plans
from tests.conftest import bench_module, one_line_exit_2

REPO = Path(__file__).resolve().parents[2]
RANGE = (-100.0, 100.0)


@pytest.fixture(scope="module")
def gv():
    return bench_module("gate_validity", "gate_validity_seq")


def _looks(rng, mean: float, sizes=(50, 25, 38, 57, 85, 128)):
    """Unit drops in [-100, 100] with the given mean, looks of `sizes` new units: a two-point mixture (most units
    unchanged, a few lose or gain a lot), the shape a normal-theory interval misjudges."""
    out = []
    for n in sizes:
        x = np.where(rng.random(n) < 0.1, rng.choice((-40.0, 40.0), n), rng.normal(0.0, 3.0, n)) + mean
        out.append(np.clip(x, *RANGE))
    return out


def test_looking_after_every_look_keeps_the_pass_error_below_alpha():
    """A drop exactly at the margin: the sequential upper bound, checked after each of six looks, falls below the
    margin in at most alpha of the runs (a fixed-n bound checked the same way falls below it far more often)."""
    rng = np.random.default_rng(7)
    alpha, margin, reps = 0.05, 2.0, 300
    seq_hits = naive_hits = 0
    for r in range(reps):
        looks = _looks(rng, margin)
        plan = sum(len(x) for x in looks)
        streams, ends = look_orders(looks, f"rep{r}", orders=2)
        plans = look_plans(plan, len(streams), "pass")
        seq_hits += bounded_upper(streams, *RANGE, alpha, plan=plans, ends=ends) < margin
        seen = []
        for x in looks:  # a fixed-n t bound re-computed at every look
            seen.extend(x)
            a = np.asarray(seen)
            if a.mean() + 1.645 * a.std(ddof=1) / np.sqrt(len(a)) < margin:
                naive_hits += 1
                break
    assert seq_hits / reps <= alpha + 2 * np.sqrt(alpha * (1 - alpha) / reps)
    assert naive_hits > seq_hits


def test_an_unchanged_model_passes_before_the_cap_and_a_large_drop_fails(gv):
    rng = np.random.default_rng(3)
    sizes = gv.sequential_look_sizes()
    r = gv.sequential_run(0.0, sizes, rng, GateConfig())
    drop_rule = next(x for x in r["gate"]["rules"] if x["task"] == "task00")
    assert drop_rule["values"]["bound"] == "sequential" and drop_rule["values"]["looks"][0] == sizes[0]
    assert gv.item_rules(r["gate"]) != "fail"
    r = gv.sequential_run(8.0, sizes, rng, GateConfig())
    assert gv.item_rules(r["gate"]) == "fail"
    # a FAIL is final: the arm got no more items after it
    assert max(r["items"].values()) < sizes[-1]


def _rule(task, status, **values):
    return {"rule": "task_drop", "arm": "a", "task": task, "status": status, "tier": "critical",
            "values": {"bound": "sequential", "max_drop": 2.0, **values}}


def test_only_tasks_that_could_still_decide_get_the_next_look():
    wide = dict(drop=1.0, drop_upper=6.0, drop_lower=-4.0, drop_upper_normal=3.0, look_units=[50], plan_units=400)
    gate = {"rules": [
        _rule("decided", "pass"),
        _rule("open", "inconclusive", **wide),
        _rule("capped", "inconclusive", **wide),
        {"rule": "retention_mean", "arm": "a", "task": None, "status": "pass", "tier": "critical", "values": {}},
    ]}
    looked = {"a": {"decided": 2, "open": 2, "capped": 6}}
    states = {s.task: s for s in sequential.open_tasks(gate, looked, 6)}
    assert states["open"].open
    assert not states["decided"].open and "decided" in states["decided"].why
    assert not states["capped"].open and "cap" in states["capped"].why
    # a rule sitting at its margin with narrow bounds can reach neither PASS nor FAIL by the cap: it is futile, the
    # arm can no longer PASS, so a task that could only PASS stops; one that could still FAIL goes on
    gate["rules"].append(_rule("at_margin", "inconclusive", drop=2.0, drop_upper=2.6, drop_lower=1.4,
                               drop_upper_normal=2.2, look_units=[300], plan_units=400))
    gate["rules"].append(_rule("falling", "inconclusive", drop=3.5, drop_upper=6.0, drop_lower=1.0,
                               drop_upper_normal=4.5, look_units=[100], plan_units=400))
    looked["a"].update(at_margin=4, falling=3)
    states = {s.task: s for s in sequential.open_tasks(gate, looked, 6)}
    assert not states["at_margin"].open and states["at_margin"].why.startswith("futile")
    assert not states["open"].open and "can no longer PASS" in states["open"].why
    assert states["falling"].open
    # an open retention mean that could still decide keeps every task of the arm growing; a FAIL stops them all
    gate["rules"] = [r for r in gate["rules"] if r["task"] not in ("at_margin", "falling")]
    gate["rules"][3] = {"rule": "retention_mean", "arm": "a", "task": None, "status": "inconclusive",
                        "tier": "critical", "values": {"bound": "sequential", "max_mean_drop": 1.0, **wide}}
    assert {s.task for s in sequential.open_tasks(gate, looked, 6) if s.open} == {"decided", "open"}
    gate["rules"][0]["status"] = "fail"
    assert not any(s.open for s in sequential.open_tasks(gate, looked, 6))


def test_look_sizes_grow_to_the_cap():
    assert sequential.look_sizes(50, 400) == (50, 63, 79, 99, 124, 155, 194, 243, 304, 380, 400)
    assert sequential.look_sizes(50, 400, 1.5) == (50, 75, 113, 170, 255, 383, 400)
    assert sequential.look_sizes(50, 50) == (50,)


@pytest.mark.parametrize("args, words", [
    (["--max-items", "100"], "only apply with --until-decided"),
    (["--until-decided", "--limit", "50", "--max-items", "20"], "--max-items (20) must be at least --limit (50)"),
    (["--until-decided", "--max-minutes", "-1"], "--max-minutes must be a positive"),
])
def test_bad_until_decided_flags_are_one_line(tmp_path, args, words):
    r = subprocess.run([sys.executable, "-m", "forgetcheck", "check", "--base", "tiny-gpt2", "--candidate", "tiny-gpt2",
                        "--out", str(tmp_path), *args], capture_output=True, text=True, timeout=120)
    assert words in one_line_exit_2(r)
    assert not any(tmp_path.iterdir())  # nothing written


def test_until_decided_scores_only_open_tasks_and_records_its_looks(gv, tmp_path):
    """The loop `check --until-decided` runs, with synthetic evaluations in place of models: a task far below its
    margin FAILs and stops the arm, looks.json says why each task stopped, every row is marked with its look, and
    the report shows the looks."""
    from forgetcheck.cli.looks import until_decided
    from forgetcheck.report.html import write_report
    from forgetcheck.rundir import RunDir, atomic_write_json
    from forgetcheck.verdict.gate import gate_run

    sizes = (40, 60, 90, 135, 200)
    names = [gv._task(t) for t in range(3)]
    drops = {names[0]: 12.0, names[1]: 0.0, names[2]: 0.0}
    run = RunDir(tmp_path / "r")
    (run.root / "eval").mkdir(parents=True)
    atomic_write_json(run.config, {"schema_version": SCHEMA_VERSION, "command": "check", "arms": ["arm"],
                                   "eval": {}, "gate": {}})
    rng = np.random.default_rng(11)
    screen = {n: gv.item_records(n, *gv._draw_base(rng, 40, *gv.BASE_BETA), first=10**6) for n in names}
    drift = gv.drift_docs(rng, {"arm": gv.Arm((gv.Change(),) * 3)})
    scored: dict[str, dict[str, int]] = {"base": {}, "arm": {}}
    calls = []

    def look_rows(task: str, k: int):
        r = np.random.default_rng([names.index(task), k])
        new = sizes[k - 1] - (sizes[k - 2] if k > 1 else 0)
        s, rest, target = gv._draw_base(r, new, *gv.BASE_BETA)
        first = sizes[k - 2] if k > 1 else 0
        arm = gv.arm_scores(s, gv.Change(drops[task]), gv.clipped_mean(*gv.BASE_BETA), r)
        return ([{**x, "look": k} for x in gv.item_records(task, s, rest, target, first)],
                [{**x, "look": k} for x in gv.item_records(task, arm, rest, target, first)])

    def evaluate(label: str, taken: dict[str, int]) -> None:
        calls.append((label, dict(taken)))
        scored[label] = {n: taken.get(n, 1) for n in names}
        rows = {lab: {n: [x for k in range(1, scored[lab].get(n, 1) + 1) for x in look_rows(n, k)[i]]
                      for n in names} for i, lab in enumerate(("base", "arm"))}
        base, arms = gv.look_evals(rows, screen, drift, sizes)
        gv.write_evals(run.root, base, arms)

    evaluate("base", {})
    evaluate("arm", {})
    record = until_decided(run, sizes, GateConfig(), LookConfig(True), evaluate, ["arm"], started=0.0)
    gate, code = gate_run(run.root)
    assert code == 1 and gate["verdict"] == "fail"
    failed = next(r for r in gate["rules"] if r["task"] == names[0])
    assert failed["status"] == "fail" and failed["values"]["bound"] == "sequential"
    assert "sequential test" in failed["reason"]
    # the arm stopped at its FAIL, before the cap; each task says why no more items came
    assert record["stop"].startswith("no task")
    assert all(t["why"] == "the arm has FAILed: more items cannot change that" for t in record["arms"]["arm"].values())
    assert max(t["looks"] for t in record["arms"]["arm"].values()) < len(sizes)
    # the base was scored on every look an arm got (the union), the arm only on its own
    assert [c[0] for c in calls[2:]] == ["base", "arm"] * ((len(calls) - 2) // 2)
    rows = [json.loads(x) for x in (run.root / "eval/samples/arm" / f"{names[0]}.jsonl").read_text().splitlines()]
    assert {r["look"] for r in rows} == set(range(1, record["arms"]["arm"][names[0]]["looks"] + 1))
    html = write_report(run).read_text()
    assert 'id="looks"' in html and "the arm has FAILed" in html
