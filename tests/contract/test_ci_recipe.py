"""docs/ci.md's GitHub Actions workflow, run as a script: its `run:` steps in order with GitHub's step rules
(bash -e -o pipefail, `if: always()`, step outputs, $GITHUB_OUTPUT and $GITHUB_STEP_SUMMARY), on the tiny
model. Checks every file the `uses:` steps read (the cache folder, the uploaded report, the JUnit file), the
job summary, and the exit codes: a damaged candidate fails the job with the gate's code 1, an unchanged one
passes, and the second run reads the base's evaluation from the cached $FORGETCHECK_HOME."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree as ET

import planted
import pytest
import yaml

from forgetcheck.rundir import read_json

ROOT = Path(__file__).resolve().parents[2]
SKIPPED_RUN_STEPS = ("Install forgetcheck",)  # the test machine has it installed (make install)
EXPR = re.compile(r"\$\{\{\s*(.+?)\s*\}\}")


def workflow() -> dict:
    text = (ROOT / "docs" / "ci.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1, "docs/ci.md must hold exactly one yaml block: the workflow"
    return yaml.safe_load(blocks[0])


def _evaluate(text: str, ctx: dict) -> str:
    """GitHub's `${{ ... }}` expressions, the few this workflow uses; anything else fails the test."""

    def one(m: re.Match) -> str:
        expr = m.group(1)
        if expr.startswith("hashFiles("):
            return "hash"
        value = ctx
        for part in expr.split("."):
            assert isinstance(value, dict) and part in value, f"unsupported expression ${{{{ {expr} }}}}"
            value = value[part]
        return str(value)

    return EXPR.sub(one, text)


def _read_output(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        k, sep, v = line.partition("=")
        if sep:
            out[k] = v
    return out


def run_workflow(workspace: Path, run_id: str, overrides: dict) -> dict:
    """Run the job like a runner would. Returns what happened: steps, job outcome, files the uses: steps read."""
    wf = workflow()
    (job,) = wf["jobs"].values()
    workspace.mkdir(parents=True, exist_ok=True)
    ctx: dict = {"github": {"workspace": str(workspace), "run_id": run_id, "run_attempt": "1"},
                 "runner": {"os": "Linux"}, "steps": {}, "env": {}}
    env = dict(os.environ)
    env.pop("FORGETCHECK_HOME", None)  # the workflow sets its own
    for k, v in {**(wf.get("env") or {}), **(job.get("env") or {})}.items():
        ctx["env"][k] = _evaluate(str(v), ctx)
    ctx["env"].update(overrides)
    env.update(ctx["env"])
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    summary, output = workspace / f"summary-{run_id}.md", workspace / f"output-{run_id}"
    summary.write_text("")
    env["GITHUB_STEP_SUMMARY"] = str(summary)
    failed = False
    steps, uses = [], {}
    for step in job["steps"]:
        cond = step.get("if", "success()")
        if cond not in ("always()", "success()"):
            raise AssertionError(f"unsupported if: {cond}")
        if failed and cond != "always()":
            steps.append((step.get("name") or step.get("uses"), "skipped"))
            continue
        if "uses" in step:
            uses[step["uses"].split("@")[0]] = {k: _evaluate(str(v), ctx) for k, v in (step.get("with") or {}).items()}
            steps.append((step["uses"], "used"))
            continue
        if step.get("name") in SKIPPED_RUN_STEPS:
            steps.append((step["name"], "skipped"))
            continue
        output.write_text("")
        script = _evaluate(step["run"], ctx)
        r = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script], cwd=workspace,
                           env={**env, "GITHUB_OUTPUT": str(output)}, capture_output=True, text=True, timeout=600)
        if step.get("id"):
            ctx["steps"][step["id"]] = {"outputs": _read_output(output)}
        steps.append((step.get("name"), r.returncode, r.stdout + r.stderr))
        failed = failed or r.returncode != 0
    return {"failed": failed, "steps": steps, "uses": uses, "summary": summary.read_text(), "ctx": ctx}


def _ran(result: dict, name: str):
    return next(s for s in result["steps"] if s[0] == name)


def test_workflow_steps_are_the_documented_ones():
    wf = workflow()
    (job,) = wf["jobs"].values()
    uses = [s["uses"].split("@")[0] for s in job["steps"] if "uses" in s]
    assert {"actions/cache", "actions/upload-artifact", "mikepenz/action-junit-report"} <= set(uses)
    assert any("forgetcheck check" in s.get("run", "") for s in job["steps"])
    assert wf["env"]["FORGETCHECK_HOME"].startswith("${{ github.workspace }}")


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_ref):
    tmp = tmp_path_factory.mktemp("ci")
    tasks_dir = planted.planted_task(tmp / "tasks", Path(tiny_ref.path), n=48)
    same, damaged = planted.copies(Path(tiny_ref.path), tmp / "models")
    return {"tasks": tasks_dir, "same": same, "damaged": damaged, "base": Path(tiny_ref.path)}


def test_ci_recipe_runs_and_gates(tmp_path, models):
    workspace = tmp_path / "repo"
    # margins of 8 points: a soft-accuracy PASS at the default 2 needs >= 165 items whatever the pattern; 48
    # unchanged items rule out 6.7, and the damaged copy's drop (~11 of the tiny model's ~36) is shown beyond 8
    flags = f"--tasks planted --tasks-dir {models['tasks']} --device cpu --max-drop 8 --max-mean-drop 8"
    common = {"BASE_MODEL": str(models["base"]), "CHECK_FLAGS": flags}

    # first run, cold cache: the damaged candidate fails the gate
    first = run_workflow(workspace, "101", {**common, "CANDIDATE": f"candidate={models['damaged']}"})
    check = _ran(first, "forgetcheck check")
    assert check[1] == 0, check[2]  # the step itself never fails ...
    assert first["ctx"]["steps"]["check"]["outputs"]["exit_code"] == "1"  # ... it hands the gate's code on
    assert first["failed"] and _ran(first, "Fail the job on the gate's verdict")[1] == 1
    assert _ran(first, "Install forgetcheck")[1] == "skipped"
    assert "FAIL" in first["summary"] and "planted" in first["summary"]
    run1 = workspace / "runs" / "ci-101-1"
    for path in first["uses"]["actions/upload-artifact"]["path"].split():
        assert (workspace / path).is_file(), path
    assert (workspace / first["uses"]["actions/upload-artifact"]["path"].split()[0]) == run1 / "report.html"
    junit = ET.parse(workspace / first["uses"]["mikepenz/action-junit-report"]["report_paths"]).getroot()
    assert int(junit.get("failures")) >= 1 and junit.iter("testcase")
    cache = Path(first["uses"]["actions/cache"]["path"])
    assert cache == workspace / ".forgetcheck-cache" and (cache / "eval_cache").is_dir()
    assert read_json(run1 / "eval" / "base.json")["timings"]["tasks"]["planted"]["cached"] is False

    # second run, the cache restored: the base comes from it; the unchanged candidate passes
    second = run_workflow(workspace, "102", {**common, "CANDIDATE": f"candidate={models['same']}"})
    assert second["ctx"]["steps"]["check"]["outputs"]["exit_code"] == "0"
    assert not second["failed"], second["steps"]
    assert "PASS" in second["summary"] and "FAIL" not in second["summary"]
    run2 = workspace / "runs" / "ci-102-1"
    assert read_json(run2 / "eval" / "base.json")["timings"]["tasks"]["planted"]["cached"] is True
    assert "planted: cache hit" in _ran(second, "forgetcheck check")[2]
    assert (run2 / "report.html").is_file() and (run2 / "junit.xml").is_file()


def test_bad_input_still_summarises_and_fails_the_job(tmp_path):
    workspace = tmp_path / "repo"
    result = run_workflow(workspace, "103", {"BASE_MODEL": "tiny-gpt2", "CANDIDATE": f"c={tmp_path / 'missing'}",
                                             "CHECK_FLAGS": "--limit 5"})
    assert result["ctx"]["steps"]["check"]["outputs"]["exit_code"] == "2"
    assert "stopped before the gate (exit 2)" in result["summary"]
    assert result["failed"] and _ran(result, "Fail the job on the gate's verdict")[1] == 2
    assert not (workspace / "runs").exists()
