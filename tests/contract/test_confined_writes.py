"""No command writes outside its run folder and $FORGETCHECK_HOME, whatever names its inputs carry: a task named
by an absolute path, by '..' or through a symlink in stock lm-eval outputs is refused by `check --base-samples`
before anything is written, and a run folder's `ckpt/<arm>` symlink that leads outside it is refused, not
followed. Each refusal is exit 2, one stderr line, no traceback, and every watched file unchanged."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import copy_fixture_tasks, forgetcheck_cli, one_line_exit_2
from test_bad_input import run_config, snapshot, user_data

from forgetcheck.errors import BadInput
from forgetcheck.rundir import RunDir, confined_file, safe_name
from forgetcheck.schema import SCHEMA_VERSION

DATE = "2024-01-01T00-00-00.000000"
VICTIM = "I am the user's own file\n"




def _samples(task: str) -> list[dict]:
    """Four multiple-choice items as `lm_eval --log_samples` logs them."""
    return [{"doc_id": i, "doc_hash": f"{task}-{i}", "prompt_hash": "p", "target_hash": "t", "target": "0",
             "filter": "none", "acc": 1.0,
             "arguments": {"gen_args_0": {"arg_0": f"Q{i}?", "arg_1": " yes"},
                           "gen_args_1": {"arg_0": f"Q{i}?", "arg_1": " no"}},
             "filtered_resps": [["-1.0", "True"], ["-2.0", "False"]]} for i in range(4)]


def lmeval_folder(folder: Path, task: str, samples_file: Path | None = None) -> Path:
    """A stock lm-eval output folder of one task `task`; its samples file at `samples_file` (default: where
    lm-eval puts it, `samples_<task>_<date>.jsonl`, which a name holding '/' or '..' moves elsewhere)."""
    folder.mkdir(parents=True, exist_ok=True)
    results = {"results": {task: {"acc,none": 1.0, "acc_stderr,none": 0.0}},
               "configs": {task: {"task": task, "output_type": "multiple_choice",
                                  "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}},
               "versions": {task: 1}, "n-shot": {task: 0}, "higher_is_better": {task: {"acc": True}},
               "config": {"model": "hf", "model_args": "pretrained=planted"}}
    (folder / f"results_{DATE}.json").write_text(json.dumps(results))
    sf = samples_file or folder / f"samples_{task}_{DATE}.jsonl"
    sf.parent.mkdir(parents=True, exist_ok=True)
    sf.write_text("".join(json.dumps(r) + "\n" for r in _samples(task)))
    return folder


def _check(tmp: Path, folder: Path) -> subprocess.CompletedProcess:
    return forgetcheck_cli("check", "--base-samples", folder, "--candidate-samples", f"cand={folder}",
                           "--out", tmp / "out", "--run-id", "r1", cwd=tmp)


def _victim(tmp: Path) -> Path:
    victim = tmp / "victim"
    victim.mkdir()
    for name in ("sft.jsonl", "cpt.jsonl"):
        (victim / name).write_text(VICTIM)
    return victim


def test_a_plain_task_name_is_checked_as_before(tmp_path):
    """The planted folder itself is good: the refusals below are the names', nothing else's."""
    r = _check(tmp_path, lmeval_folder(tmp_path / "lm" / "m", "plain_task"))
    assert r.returncode in (0, 4) and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert (tmp_path / "out" / "r1" / "eval" / "samples" / "cand" / "plain_task.jsonl").is_file()


def _absolute(tmp: Path, victim: Path) -> tuple[Path, str]:
    task = str(victim / "sft")  # lm-eval's folder / "samples_/abs/..." is a relative path under the folder
    folder = tmp / "lm" / "m"
    return lmeval_folder(folder, task, folder / f"samples_{task}_{DATE}.jsonl"), task


def _dotdot(tmp: Path, victim: Path) -> tuple[Path, str]:
    # the model folder as deep under tmp as the run's eval/samples/<label>, so one '..' chain reaches the
    # victim from both: tmp/out/r1/eval/samples/<label> and tmp/l1/l2/l3/l4/m
    task = "sub/" + "../" * 6 + "victim/cpt"
    folder = tmp / "l1" / "l2" / "l3" / "l4" / "m"
    (folder / "samples_sub").mkdir(parents=True)
    return lmeval_folder(folder, task, victim / f"cpt_{DATE}.jsonl"), task


def _symlink(tmp: Path, victim: Path) -> tuple[Path, str]:
    task = "link/sft"
    folder = tmp / "lm" / "m"
    folder.mkdir(parents=True)
    (folder / "samples_link").symlink_to(victim)
    return lmeval_folder(folder, task, victim / f"sft_{DATE}.jsonl"), task


@pytest.mark.parametrize("plant", [_absolute, _dotdot, _symlink], ids=["absolute", "dotdot", "symlink"])
def test_task_names_leading_outside_the_run_are_refused_before_any_write(tmp_path, fc_home, plant):
    victim = _victim(tmp_path)
    folder, task = plant(tmp_path, victim)
    before, home_before = snapshot(tmp_path), snapshot(fc_home)
    line = one_line_exit_2(_check(tmp_path, folder))
    assert "--base-samples" in line and repr(task) in line and "rename" in line, line
    assert (victim / "sft.jsonl").read_text() == VICTIM and (victim / "cpt.jsonl").read_text() == VICTIM
    assert snapshot(tmp_path) == before, "a refused check wrote or changed files"
    assert snapshot(fc_home) == home_before
    assert not (tmp_path / "out").exists()


def test_a_ckpt_symlink_leading_outside_the_run_is_not_followed(tmp_path, fc_home):
    user_data(tmp_path / "data")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    run = tmp_path / "runs" / "r1"
    (run / "eval").mkdir(parents=True)
    (run / "ckpt").mkdir()
    (run / "config.json").write_text(json.dumps(run_config(tmp_path), indent=2))
    (run / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, "timings": {}}))
    (run / "eval" / "base.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, "kind": "eval",
                                                        "tasks": {}}))
    (run / "ckpt" / "sft").symlink_to(outside)
    before, home_before = snapshot(tmp_path), snapshot(fc_home)
    line = one_line_exit_2(forgetcheck_cli("run", "--resume", run, cwd=tmp_path))
    assert "ckpt/sft" in line and "outside" in line and "symlink" in line, line
    assert snapshot(tmp_path) == before and snapshot(fc_home) == home_before


# ---- the helpers every such write goes through -------------------------------------------------------------

@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/abs", "a\\b", "a\x00b", None, 3])
def test_a_name_that_is_not_one_file_name_is_refused(name):
    with pytest.raises(BadInput, match="--flag: 'the task'|--flag: .*not one file name"):
        safe_name(name, "--flag: 'the task'", "rename it")


def test_names_joined_into_a_run_stay_inside_it(tmp_path):
    root = tmp_path / "run"
    (root / "eval" / "samples").mkdir(parents=True)
    assert confined_file(root, ("eval", "samples"), "t", ".jsonl", "w", "f") == root / "eval" / "samples" / "t.jsonl"
    (tmp_path / "out").mkdir()
    (root / "eval" / "samples" / "base").symlink_to(tmp_path / "out")
    with pytest.raises(BadInput, match="outside"):
        confined_file(root, ("eval", "samples", "base"), "t", ".jsonl", "w", "f")
    (root / "ckpt").symlink_to(tmp_path / "out")
    with pytest.raises(BadInput, match="outside"):
        RunDir(root).ckpt("sft")
    with pytest.raises(BadInput, match="not one file name"):
        RunDir(root).train_json("../x")


# ---- --tasks-dir code: lm-eval's `!function` runs Python only with --allow-task-code ------------------------

def _code_task(tmp: Path, marker: Path) -> Path:
    """The fixture tasks plus one whose `process_docs` is lm-eval's `!function` of a module beside it that
    leaves `marker` when imported."""
    tasks = copy_fixture_tasks(tmp / "tasks")
    (tasks / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n\n"
                                   f"def process_docs(docs):\n    return docs\n")
    text = (tasks / "fc_fixture_mc.yaml").read_text().replace("task: fc_fixture_mc", "task: fc_code_mc")
    (tasks / "fc_code_mc.yaml").write_text(text + "process_docs: !function evil.process_docs\n")
    return tasks


@pytest.mark.parametrize("command", ["eval", "check"])
def test_task_code_in_a_users_tasks_dir_is_refused_without_the_flag(tmp_path, fc_home, command):
    marker = tmp_path / "RAN"
    tasks = _code_task(tmp_path, marker)
    common = ("--tasks-dir", tasks, "--tasks", "fc_fixture_mc", "--limit", "4", "--device", "cpu")
    args = (("eval", "--model", "tiny-gpt2", "--out", tmp_path / "out" / "m.json") if command == "eval" else
            ("check", "--base", "tiny-gpt2", "--candidate", "again=tiny-gpt2", "--out", tmp_path / "out"))
    before, home_before = snapshot(tmp_path), snapshot(fc_home)
    line = one_line_exit_2(forgetcheck_cli(*args, *common, cwd=tmp_path))
    assert "fc_code_mc.yaml" in line and "!function" in line and "--allow-task-code" in line, line
    assert not marker.exists(), "the task's Python ran"
    assert snapshot(tmp_path) == before and snapshot(fc_home) == home_before


def test_the_flag_lets_task_code_run_and_comments_are_not_code(tmp_path):
    from forgetcheck.eval.suites import task_code_problems

    tasks = _code_task(tmp_path, tmp_path / "RAN")
    assert task_code_problems(tasks, allow_code=True) == []
    (tasks / "fc_code_mc.yaml").write_text((tasks / "fc_code_mc.yaml").read_text().replace(
        "process_docs: !function", "# process_docs: !function"))
    assert task_code_problems(tasks) == []
    (tasks / "_template_yaml").write_text("process_docs: !function evil.process_docs\n")
    (tasks / "fc_code_mc.yaml").write_text("include: _template_yaml\n" + (tasks / "fc_code_mc.yaml").read_text())
    (tasks / "_template_yaml").rename(tmp_path / "_template_yaml")  # included from outside the folder
    (tasks / "fc_code_mc.yaml").write_text((tasks / "fc_code_mc.yaml").read_text().replace(
        "include: _template_yaml", f"include: {tmp_path / '_template_yaml'}"))
    (problem,) = task_code_problems(tasks)
    assert "_template_yaml:1" in problem and "--allow-task-code" in problem


def test_with_the_flag_eval_runs_the_task_code(tmp_path):
    marker = tmp_path / "RAN"
    tasks = _code_task(tmp_path, marker)
    r = forgetcheck_cli("eval", "--model", "tiny-gpt2", "--tasks-dir", tasks, "--tasks", "fc_code_mc", "--limit", "4",
                        "--backend", "hf", "--device", "cpu", "--out", tmp_path / "out" / "m.json", "--allow-task-code",
                        cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert marker.exists() and (tmp_path / "out" / "m.json").is_file()


def test_previous_release_names_never_write_or_read_outside_the_run(tmp_path):
    """`check --previous`: the previous release's eval file names its tasks and their samples files; an absolute,
    `..` or symlinked name is refused before anything is copied (nothing written outside the new run, nothing
    read from outside the previous one)."""
    from runfixture import make_run

    from forgetcheck.verdict.history import Previous, copy_previous

    prev = make_run(tmp_path / "prev", n=8)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.jsonl").write_text("precious\n")
    outside = tmp_path / "secret.jsonl"
    outside.write_text("secret\n")
    eval_file = prev.eval_json("sft")
    doc = json.loads(eval_file.read_text())
    first = next(iter(doc["tasks"]))
    for bad_name, bad_samples in ((str(victim / "keep"), None), ("../../victim/keep", None),
                                  (first, str(outside)), (first, "../../secret.jsonl")):
        planted = json.loads(json.dumps(doc))
        entry = planted["tasks"].pop(first)
        if bad_samples is not None:
            entry["samples"] = bad_samples
        planted["tasks"][bad_name] = entry
        eval_file.write_text(json.dumps(planted))
        new = RunDir(tmp_path / f"new-{len(list(tmp_path.iterdir()))}")
        new.root.mkdir()
        with pytest.raises(BadInput, match="--previous"):
            copy_previous(new, Previous(prev.root, "sft", eval_file))
        assert not (new.root / "history").exists(), "copied something before refusing"
        assert (victim / "keep.jsonl").read_text() == "precious\n" and sorted(p.name for p in victim.iterdir()) == ["keep.jsonl"]
    eval_file.write_text(json.dumps(doc))
    new = RunDir(tmp_path / "new-ok")
    new.root.mkdir()
    assert copy_previous(new, Previous(prev.root, "sft", eval_file)).is_file()  # the planted file was the only problem
