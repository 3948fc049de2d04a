"""report: one self-contained HTML file from the run directory's JSON; escaped; renders in a real browser."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from runfixture import make_run

from forgetcheck.errors import BadInput
from forgetcheck.report.html import write_report
from forgetcheck.verdict.compare import compare_run
from forgetcheck.verdict.gate import gate_run

XSS = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("rep") / "run", n=120, random_weights=True,
                   flips={("sft", "ret_mmlu"): (30, 2), ("cpt", "dom_terms"): (1, 12)},
                   ll_shift={("sft", "ret_ppl"): -3.0}, kl={"sft": 0.2, "cpt": 0.04},
                   texts={"ret_mmlu": {i: f'Q{i} {XSS} & "quoted" <b>bold</b>' for i in range(120)}})
    compare_run(run, n_boot=500)
    gate_run(run.root)
    return run, write_report(run).read_text(encoding="utf-8")


def test_writes_self_contained_report(report):
    run, html = report
    assert run.report.exists() and html.startswith("<!DOCTYPE html>")
    # no external resource of any kind: no http(s) or protocol-relative reference, no <link>, no url()
    assert not re.search(r"https?://", html)
    assert not re.search(r"""(?:src|href|action)\s*=\s*["']?\s*//""", html)
    assert "<link" not in html and "url(" not in html and "@import" not in html
    assert "default-src 'none'" in html


def test_flipped_item_text_is_escaped(report):
    _, html = report
    assert XSS not in html and "<b>bold</b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;b&gt;bold&lt;/b&gt;" in html
    assert html.count("<script") == 1  # the report's own check script, nothing from the data
    # that one script is the only one the CSP allows, by its hash
    script = re.search(r"<script>(.*?)</script>", html, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in html


def test_verdict_first_and_sections(report):
    run, html = report
    gate = json.loads(run.gate.read_text())
    assert not gate["passed"]
    verdict = html.index('id="verdict"')
    for later in ('id="learn-forget"', 'id="task-table"', 'id="flips"', 'id="chart-loss"', 'id="budget-table"',
                  'id="chart-memory"', 'id="config-json"', 'id="versions-table"'):
        assert verdict < html.index(later), later
    assert "Source: gate.json" in html
    assert 'id="random-weights"' in html and "RANDOM WEIGHTS" in html
    assert "arms matched" in html and "▼ drop" in html
    # the banner says which outcome and why, with the power sentence; every failed or open rule is shown
    assert gate["verdict"] == "fail" and 'class="card verdict fail"' in html
    assert '<div id="verdict-why"><b>FAIL</b>: ' in html
    assert "Power</b>: 120 items per task can only rule out" in html
    for r in gate["rules"]:
        if not r["passed"]:
            assert r["reason"].replace('"', "&#34;").replace("<", "&lt;").replace(">", "&gt;") in html
    # one interval and one test per line, from the same method: no Holm p beside an unadjusted interval
    assert "p (Holm)" not in html and "Bonett–Price" in html
    assert 'id="arm-vs-arm"' in html and "lost" in html and "one training seed" in html


def test_missing_compare_or_gate_names_the_command_and_writes_nothing(tmp_path):
    run = make_run(tmp_path / "r", n=200)  # an unchanged copy PASSes soft accuracy from 165 items
    with pytest.raises(BadInput, match="forgetcheck compare"):
        write_report(run)
    assert not run.compare.exists() and not run.gate.exists() and not run.report.exists()
    compare_run(run, n_boot=200)
    with pytest.raises(BadInput, match="forgetcheck gate"):
        write_report(run)
    assert not run.gate.exists() and not run.report.exists()
    r = subprocess.run([sys.executable, "-m", "forgetcheck", "report", str(run.root)], capture_output=True, text=True)
    assert r.returncode == 2 and "forgetcheck gate" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    gate_run(run.root)
    html = write_report(run).read_text()
    assert '<div class="big pass">PASS</div>' in html and "Source: gate.json" in html
    assert "RANDOM WEIGHTS" not in html


def test_inconclusive_banner_and_uninformative_tasks(tmp_path):
    tasks = {"ret_a": ("retention", "multiple_choice", "acc", 2, 0.8),
             "ret_chance": ("retention", "multiple_choice", "acc", 4, 0.25),
             "dom": ("domain", "multiple_choice", "acc", 4, 0.4)}
    run = make_run(tmp_path / "r", tasks=tasks, n=40, flips={("sft", "ret_a"): (3, 1)})
    compare_run(run, n_boot=200)
    gate, code = gate_run(run.root, {"metric": "acc"})
    assert code == 4
    html = write_report(run).read_text()
    assert '<div class="big inconclusive">INCONCLUSIVE</div>' in html and "can neither rule out nor show" in html
    assert 'id="uninformative"' in html and "ret_chance: uninformative at this model size" in html
    assert "Power</b>: 40 items per task" in html
    # the fixture's base has no screen items: the report says the tasks were screened on their gated items
    assert 'id="screened-on-gated"' in html and "ret_a, ret_chance: screened on the gated items themselves" in html


def test_old_compare_or_gate_format_is_refused_with_the_fix(tmp_path):
    run = make_run(tmp_path / "r", n=40)
    compare_run(run, n_boot=200)
    run.gate.write_text(json.dumps({"schema_version": 1, "kind": "gate", "passed": True}))
    with pytest.raises(BadInput, match="older gate format.*forgetcheck gate"):
        write_report(run)
    gate_run(run.root)
    run.compare.write_text(json.dumps({"schema_version": 1, "kind": "compare"}))
    with pytest.raises(BadInput, match="older compare format.*forgetcheck compare"):
        write_report(run)
    assert not run.report.exists()


def test_report_survives_missing_optional_files(tmp_path):
    run = make_run(tmp_path / "r", n=30, with_train=False)
    run.manifest.unlink()
    ev = json.loads(run.eval_json("sft").read_text())
    for t in ev["tasks"].values():
        t.pop("samples")
        t.pop("chance")
    run.eval_json("sft").write_text(json.dumps(ev))
    compare_run(run, n_boot=200)
    gate_run(run.root)
    html = write_report(run).read_text()
    assert "No training records" in html and "No memory records" in html and "No loss curves" in html
    with pytest.raises(BadInput):
        write_report(tmp_path / "nope")


def test_report_cli(report):
    run, _ = report
    r = subprocess.run([sys.executable, "-m", "forgetcheck", "report", str(run.root)], capture_output=True, text=True)
    assert r.returncode == 0 and "report.html" in r.stdout


# ---- a real browser ---------------------------------------------------------------------------------------

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--enable-logging=stderr", "--v=0"]


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: CI must run `make install-browser` before the tests")
        pytest.skip("chromium is not installed (`make install-browser`)")
    return exe


def open_in_browser(path: Path, profile: Path) -> tuple[str, list[str]]:
    """(DOM after load, console messages) of a local page in headless chromium."""
    r = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", path.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    console = [line for line in r.stderr.splitlines() if ":CONSOLE" in line]
    return r.stdout, console


def test_browser_detects_console_errors(tmp_path):
    """The check below can fail: a page with a console error, a throw and a blocked resource is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><head><meta http-equiv='Content-Security-Policy' content=\"default-src "
                   "'none'; script-src 'unsafe-inline'\"></head><body><script>console.error('boom');"
                   "throw new Error('bang')</script></body></html>")
    _, console = open_in_browser(bad, tmp_path / "profile")
    assert any("boom" in c for c in console) and any("bang" in c for c in console)


def test_report_loads_in_chromium_and_charts_render(report, tmp_path):
    run, html = report
    dom, console = open_in_browser(run.report, tmp_path / "profile")
    assert console == [], console
    n_charts = html.count('class="chart')
    assert n_charts >= 3
    assert f'data-charts="{n_charts}/{n_charts}"' in dom  # the inline check ran and every chart drew shapes
    for chart in ("chart-learn-forget", "chart-loss", "chart-memory"):
        tag = re.search(rf'<svg[^>]*id="{chart}"[^>]*>', dom).group(0)
        assert 'data-ok="1"' in tag, tag
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom


def test_arms_at_the_same_point_get_labels_that_do_not_overlap():
    """Two arms that forgot and learned the same (e.g. wise-1 and sft) must both stay readable."""
    from forgetcheck.report.charts import LABEL_LINE_PX, place_labels

    pts = [{"cx": 100.0, "cy": 120.0, "label": "sft"}, {"cx": 100.0, "cy": 120.0, "label": "wise-1"},
           {"cx": 104.0, "cy": 122.0, "label": "cpt"}, {"cx": 400.0, "cy": 120.0, "label": "lora"}]
    place_labels(pts, bottom=300)
    near = sorted(p["ly"] for p in pts[:3])
    assert all(b - a >= LABEL_LINE_PX - 1e-9 for a, b in zip(near, near[1:]))
    assert pts[3]["ly"] == pytest.approx(112.0)  # a label with room stays beside its point
    low = [{"cx": 50.0, "cy": 298.0, "label": f"arm{i}"} for i in range(3)]
    place_labels(low, bottom=300)  # no room below: the others go above
    ys = sorted(p["ly"] for p in low)
    assert len(set(ys)) == 3 and max(ys) <= 300


def test_a_task_the_arms_were_not_scored_on_keeps_its_row_and_says_why(tmp_path):
    tasks = {"ret_a": ("retention", "multiple_choice", "acc", 2, 0.8),
             "ret_chance": ("retention", "multiple_choice", "acc", 4, 0.25)}
    run = make_run(tmp_path / "r", tasks=tasks, n=40)
    why = "the base is not above chance on it: base 25.0 vs chance 25.0"
    for arm in ("sft", "cpt"):
        p = run.eval_json(arm)
        if not p.exists():
            continue
        doc = json.loads(p.read_text())
        doc["tasks"].pop("ret_chance")
        doc["skipped"] = {"ret_chance": why}
        p.write_text(json.dumps(doc))
    compare_run(run, n_boot=200)
    gate, _ = gate_run(run.root, {"metric": "acc"})
    assert [e["task"] for e in gate["excluded"]] == ["ret_chance"]
    html = write_report(run).read_text()
    row = html[html.index('<td class="task">ret_chance'):]
    row = row[:row.index("</tr>")]
    assert "uninformative" in row and f"not scored for sft, cpt: {why}" in row and row.count(why) == 1


def test_report_of_a_finished_run_renders_its_session_timings(tmp_path):
    """`forgetcheck run` records run_sessions (a list: one entry per session of a resumed run) in the manifest
    after its report; `forgetcheck report RUN` afterwards must still render (it crashed formatting the list)."""
    from forgetcheck.schema import update_manifest

    run = make_run(tmp_path / "r", n=40)
    compare_run(run, n_boot=200)
    gate_run(run.root)
    update_manifest(run, timings={"eval_base": 12.5, "run_sessions": [100.0, 50.25], "run_total": 150.25})
    r = subprocess.run([sys.executable, "-m", "forgetcheck", "report", str(run.root)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-1500:]
    html = run.report.read_text()
    table = html[html.index('id="timings-table"'):]
    table = table[:table.index("</table>")]
    for row in ("eval_base</td><td class=\"n\">12.5 s", "run_sessions 1</td><td class=\"n\">100.0 s",
                "run_sessions 2</td><td class=\"n\">50.2 s", "run_total</td><td class=\"n\">150.2 s"):
        assert row in table, table


def test_learning_chart_reads_recall_and_draws_the_other_signals_below(tmp_path):
    """With recall questions the chart's learning axis is recall, the report says why, and transfer and the domain
    text's bits per byte get charts of their own; every signal is on each arm's card with its interval."""
    from runfixture import DEFAULT_TASKS

    tasks = {**DEFAULT_TASKS, "dom_bpb": ("domain", "perplexity", "bits_per_byte", 0, 0.0),
             "rec_facts": ("recall", "multiple_choice", "acc", 4, 0.30)}
    run = make_run(tmp_path / "run", tasks=tasks, n=120, flips={("sft", "rec_facts"): (0, 30)},
                   ll_shift={("cpt", "dom_bpb"): 2.0})
    compare_run(run, n_boot=300)
    gate_run(run.root)
    html = write_report(run).read_text(encoding="utf-8")
    main = html[html.index('id="chart-learn-forget"'):]
    assert "learning: recall gain (points)" in main[:main.index("</svg>")]
    assert "The chart uses recall by default" in html
    for signal in ("transfer", "domain_bpb"):
        assert f'id="chart-learn-forget-{signal}"' in html and f'data-signal="{signal}"' in html
    assert html.count('class="learning-signal"') == 6  # 3 signals x 2 arms
    assert "bits per byte" in html and html.count('id="wise-curve"') <= 1
    # the budget table says how many facts each arm saw whole, when the run has recall.json
    assert "Facts seen whole" not in html
    (run.root / "recall.json").write_text(json.dumps({"items": 9, "facts": 7, "why": None, "units": [3, 1],
                                                      "arms": {"sft": {"units": 2, "facts": 7},
                                                               "cpt": {"units": 5, "facts": 31}}}))
    compare_run(run, n_boot=300)
    html = write_report(run).read_text(encoding="utf-8")
    table = html[html.index('id="budget-table"'):]
    table = table[:table.index("</table>")]
    assert "Facts seen whole" in table and ">31<" in table and ">7<" in table
    assert "recall asks 9 questions about the 7" in html
