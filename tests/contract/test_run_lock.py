"""A run folder is the run that was started, worked on by one process at a time: `--resume` refuses a base or data
whose content changed since the run started (config.json records their hashes; a folder written before that
resumes with a note), and a second process on a run folder another one holds is refused with one line naming
the folder and the holder's pid, while a killed holder leaves the folder to the next `--resume`. Through the
real command line: exit code, one stderr line, no traceback, the run folder unchanged."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, forgetcheck_cli, one_line_exit_2
from test_bad_input import snapshot, user_data

TINY_RUN = ["--arms", "sft", "--device", "cpu", "--budget-tokens", "256", "--seq-len", "32", "--micro-batch", "2",
            "--lr", "1e-3", "--tasks", "fc_winogrande", "--limit", "3", "--batch-size", "4"]


def _run_args(tmp: Path, run_id: str, model: Path | None = None) -> list[str]:
    return ["run", "--base", str(model or tmp / "model"), "--data", str(tmp / "data"), *TINY_RUN,
            "--out", str(tmp / "runs"), "--run-id", run_id]


def _change_weights(folder: Path) -> None:
    """Rewrite the model's weights with one tensor shifted: still a whole, loadable model, another one."""
    from safetensors.torch import load_file, save_file

    path = next(folder.glob("*.safetensors"))
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_ref):
    """A finished tiny run (runs/r1) of a local model folder and the user's own data."""
    tmp = tmp_path_factory.mktemp("lockrun")
    shutil.copytree(tiny_ref.path, tmp / "model")
    user_data(tmp / "data")
    r = forgetcheck_cli(*_run_args(tmp, "r1"), cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, tmp / "runs" / "r1"


def _refused_resume(tmp: Path, run: Path) -> str:
    before = snapshot(run)
    r = forgetcheck_cli("run", "--resume", str(run), cwd=tmp)
    line = one_line_exit_2(r)
    assert snapshot(run) == before, "a refused --resume changed the run folder"
    return line


# ---- --resume re-checks what the run started from -------------------------------------------------------

def test_config_json_records_the_content_hashes(finished):
    _, run = finished
    hashes = json.loads((run / "config.json").read_text())["resolved"]["hashes"]
    assert len(hashes["model"]) == 16 and set(hashes["data"]) == {"sft.jsonl", "cpt.jsonl"}


def test_changed_base_weights_refuse_the_resume(finished):
    tmp, run = finished
    weights = next((tmp / "model").glob("*.safetensors"))
    original = weights.read_bytes()
    _change_weights(tmp / "model")
    try:
        line = _refused_resume(tmp, run)
    finally:
        weights.write_bytes(original)
    assert f"--base {tmp / 'model'} is not the model the run started from" in line, line
    assert "--data" not in line, line


def test_changed_data_file_refuses_the_resume(finished):
    tmp, run = finished
    sft = tmp / "data" / "sft.jsonl"
    original = sft.read_bytes()
    sft.write_bytes(original + json.dumps({"prompt": "What is x?", "response": "A new line."}).encode() + b"\n")
    try:
        line = _refused_resume(tmp, run)
    finally:
        sft.write_bytes(original)
    assert f"--data {tmp / 'data'}: sft.jsonl changed" in line and "cpt.jsonl" not in line, line


@pytest.mark.parametrize("key", ["base", "data"])
def test_edited_config_json_base_or_data_refuses_the_resume(finished, key):
    tmp, run = finished
    other = tmp / f"other_{key}"
    if not other.exists():
        if key == "base":
            shutil.copytree(tmp / "model", other)
            _change_weights(other)
        else:
            user_data(other)
            (other / "cpt.jsonl").write_text(json.dumps({"text": "Another corpus altogether."}) + "\n")
    cfg_path = run / "config.json"
    original = cfg_path.read_bytes()
    cfg_path.write_text(json.dumps({**json.loads(original), key: str(other)}, indent=2))
    try:
        line = _refused_resume(tmp, run)
    finally:
        cfg_path.write_bytes(original)
    expect = (f"--base {other} is not the model the run started from" if key == "base"
              else f"--data {other}: cpt.jsonl changed")
    assert expect in line, line


def test_run_folder_without_hashes_resumes_with_a_note(finished):
    tmp, run = finished
    cfg_path = run / "config.json"
    original = cfg_path.read_bytes()
    doc = json.loads(original)
    del doc["resolved"]["hashes"]  # as forgetcheck wrote it before the hashes were recorded
    cfg_path.write_text(json.dumps(doc, indent=2))
    try:
        r = forgetcheck_cli("run", "--resume", str(run), cwd=tmp)
    finally:
        cfg_path.write_bytes(original)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (r.stdout + r.stderr).count("could not be checked") == 1, r.stdout


# ---- one process per run folder --------------------------------------------------------------------------

def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    """`python -m forgetcheck ARGS` in the background, as conftest.forgetcheck_cli runs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.Popen([sys.executable, "-m", "forgetcheck", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_until_held(proc: subprocess.Popen, run: Path, timeout: float = 240) -> None:
    """Wait until `proc` holds the run folder's lock and config.json is there, then stop it (SIGSTOP): it keeps
    the lock, and the folder stays as it is while the second process tries."""
    deadline = time.monotonic() + timeout
    lock = run / ".lock"
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the holder ended early (rc {proc.returncode}): {proc.stderr.read()[-3000:]}"
        if (run / "config.json").exists() and lock.exists() and lock.read_text().strip() == str(proc.pid):
            proc.send_signal(signal.SIGSTOP)
            return
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"process {proc.pid} never held {lock}")


def _refused_while_held(args: list[str], cwd: Path, run: Path, holder: int) -> None:
    before = snapshot(run)
    line = one_line_exit_2(forgetcheck_cli(*args, cwd=cwd))
    assert str(run) in line and f"process {holder}" in line, line
    assert snapshot(run) == before, "the refused process changed the run folder"


def test_one_process_per_run_folder_and_a_killed_holder_leaves_it_resumable(finished):
    tmp, _ = finished
    run = tmp / "runs" / "r2"
    first = _start(_run_args(tmp, "r2"), tmp)
    try:
        _wait_until_held(first, run)
        _refused_while_held(_run_args(tmp, "r2"), tmp, run, first.pid)  # two `run --run-id r2`
    finally:
        first.kill()  # SIGKILL, stopped or not: the kernel drops its lock
        first.communicate()

    resumed = _start(["run", "--resume", str(run)], tmp)  # the killed holder left the folder free
    try:
        _wait_until_held(resumed, run)
        _refused_while_held(["run", "--resume", str(run)], tmp, run, resumed.pid)  # two `--resume`
        resumed.send_signal(signal.SIGCONT)
        out, err = resumed.communicate(timeout=600)
    finally:
        if resumed.poll() is None:
            resumed.kill()
            resumed.communicate()
    assert resumed.returncode == 0, err[-3000:]
    assert (run / "gate.json").exists() and "Traceback" not in err


def test_lock_is_refused_while_held_and_free_once_released(tmp_path):
    """The lock itself, in one process and another: a second holder is refused naming the first's pid; once
    the first releases it (or ends), it can be taken again."""
    from forgetcheck.cli.lock import RunLock
    from forgetcheck.errors import BadInput

    run = tmp_path / "runs" / "r1"
    code = (f"import sys, time; from forgetcheck.cli.lock import RunLock; lock = RunLock({str(run)!r}); "
            f"print('held', flush=True); time.sleep(60)")
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert other.stdout.readline().strip() == "held"
        with pytest.raises(BadInput, match=f"in use by forgetcheck process {other.pid}"):
            RunLock(run)
    finally:
        other.kill()
        other.wait()
    with RunLock(run):
        with pytest.raises(BadInput, match=f"process {os.getpid()}"):
            RunLock(run)
    RunLock(run).release()
