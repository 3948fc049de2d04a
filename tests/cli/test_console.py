"""A quiet console: a command prints one line per stage and its own summary; lm-eval's, datasets' and
transformers' output lands in the log file unless --verbose; `eval --preset` picks the preset's items."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def _eval(tasks_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "forgetcheck", "eval", "--model", "tiny-gpt2", "--tasks",
                           "fc_fixture_mc,fc_fixture_ppl", "--tasks-dir", str(tasks_dir), "--backend", "hf",
                           "--batch-size", "4", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=600)


def test_eval_console_is_quiet_and_the_log_holds_the_rest(tasks_dir, tmp_path, fc_home):
    out = tmp_path / "quiet" / "m.json"
    r = _eval(tasks_dir, out, "--preset", "quick")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    # the header, one closing line for the stage, the table (header + 2 tasks), drift, "wrote"
    assert len(lines) <= 8, r.stdout
    assert any(line.startswith("evaluate tiny-gpt2: 2 tasks") for line in lines)
    assert r.stderr.strip() == "", r.stderr[-2000:]  # lm-eval's logging and warnings went to the log
    log = (out.parent / "m.log.txt").read_text()
    assert "fc_fixture_mc: 14 items (multiple_choice)" in log  # forgetcheck's detail lines
    assert "Generating test split" in log and "Running loglikelihood requests" in log  # the libraries' output
    doc = json.loads(out.read_text())
    assert doc["limit"] == 50 and doc["config"]["limit"] == 50  # the quick preset's limit, as `run` uses it


def test_eval_verbose_shows_the_libraries_output(tasks_dir, tmp_path, fc_home):
    out = tmp_path / "loud" / "m.json"
    r = _eval(tasks_dir, out, "--preset", "quick", "--limit", "3", "--verbose")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "fc_fixture_mc: 3 items (multiple_choice)" in r.stdout
    assert json.loads(out.read_text())["limit"] == 3  # a flag given wins over the preset


def test_bad_input_stays_one_line_and_creates_no_log(tasks_dir, tmp_path, fc_home):
    out = tmp_path / "bad" / "m.json"
    r = _eval(tasks_dir, out, "--preset", "huge")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--preset" in r.stderr
    assert not out.parent.exists()
