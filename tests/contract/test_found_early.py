"""Bad input found early, told in one line: through the real command line, a training flag that only the model
reveals as wrong (frozen blocks it lacks, positions it lacks, memory it would need), a seed no generator takes,
a data line that is no Unicode, and lm-eval output folders that are not lm-eval's (wrong types, not UTF-8, too
deep, scores out of range, a document twice) each end with exit 2, exactly one stderr line, no traceback, and
the case folder unchanged. Also: a full disk is one line (exit 3), SIGTERM says what happened (exit 130), an
unreadable $FORGETCHECK_HOME is named as such, and weights forgetcheck writes get the umask's usual mode.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, forgetcheck_cli
from runfixture import make_run
from test_bad_input import snapshot, user_data


@dataclass
class Case:
    id: str
    args: list[str]
    expect: str
    edit: object = None  # fn(tmp) run after the data and lm-eval folders are in place


TINY = ["--base", "tiny-gpt2", "--data", "{tmp}/data", "--device", "cpu", "--out", "{tmp}/runs"]
BIG_STEP = ["--seq-len", "512", "--micro-batch", "10000000", "--budget-tokens", "5120000000"]


def _surrogate(tmp: Path) -> None:
    with open(tmp / "data" / "sft.jsonl", "a") as f:
        f.write('{"prompt": "a lone \\ud800 half", "response": "x"}\n')


def _samples(folder: Path) -> Path:
    return next(folder.glob("samples_*.jsonl"))


def _results(folder: Path) -> Path:
    return next(folder.glob("results_*.json"))


def _edit_rows(fn):
    def edit(tmp: Path) -> None:
        sf = _samples(tmp / "cand")
        rows = [json.loads(line) for line in sf.read_text().splitlines() if line.strip()]
        sf.write_text("".join(json.dumps(r) + "\n" for r in fn(rows)))
    return edit


def _edit_results(fn):
    def edit(tmp: Path) -> None:
        rf = _results(tmp / "cand")
        rf.write_text(json.dumps(fn(json.loads(rf.read_text()))))
    return edit


def _first(**over):
    return lambda rows: [{**rows[0], **over}, *rows[1:]]


def _write(which, data: bytes):
    return lambda tmp: which(tmp / "cand").write_bytes(data)


CHECK = ["check", "--base-samples", "{tmp}/base", "--candidate-samples", "cand={tmp}/cand", "--out", "{tmp}/runs"]

CASES = [
    # -- training flags against the model, found before the base evaluation --------------------------------
    Case("run-freeze-layers-beyond-blocks", ["run", *TINY, "--arms", "freeze", "--freeze-layers", "99"],
         r"--freeze-layers 99 .*only 2 blocks"),
    Case("train-freeze-layers-beyond-blocks", ["train", *TINY, "--arms", "freeze", "--freeze-layers", "99"],
         r"--freeze-layers 99"),
    Case("run-seq-len-beyond-positions", ["run", *TINY, "--seq-len", "1024", "--budget-tokens", "4096"],
         r"--seq-len 1024 .*512 positions"),
    Case("train-seq-len-beyond-positions", ["train", *TINY, "--seq-len", "1024", "--budget-tokens", "4096"],
         r"--seq-len 1024"),
    Case("run-memory-plan-does-not-fit", ["run", *TINY, *BIG_STEP], r"does not fit.*--force"),
    Case("train-memory-plan-does-not-fit", ["train", *TINY, *BIG_STEP], r"does not fit"),
    # -- numbers and text no library takes -------------------------------------------------------------------
    Case("run-seed-64-bits", ["run", *TINY, "--seed", str(2**64)], r"--seed .*4294967295"),
    Case("train-seed-negative", ["train", *TINY, "--seed", "-1"], r"--seed"),
    Case("run-data-lone-surrogate", ["run", *TINY], r"sft.jsonl:21: .*surrogate", _surrogate),
    # -- lm-eval output folders --------------------------------------------------------------------------------
    Case("check-doc-id-text", CHECK, r"doc_id must be a whole number", _edit_rows(_first(doc_id="abc"))),
    Case("check-doc-hash-number", CHECK, r"doc_hash a string", _edit_rows(_first(doc_hash=7))),
    Case("check-configs-list", CHECK, r"'configs' must be an object",
         _edit_results(lambda d: {**d, "configs": list(d["configs"])})),
    Case("check-config-list", CHECK, r"'config' must be an object", _edit_results(lambda d: {**d, "config": [1]})),
    Case("check-results-entry-list", CHECK, r"results of 'planted' must be an object",
         _edit_results(lambda d: {**d, "results": {"planted": [1]}})),
    Case("check-samples-not-utf8", CHECK, r"not UTF-8", _write(_samples, b'{"doc_id": 0, "doc_hash": "\xff\xfe"}\n')),
    Case("check-results-not-utf8", CHECK, r"not UTF-8", _write(_results, b'{"results": {"\xff": 1}}')),
    Case("check-results-too-deep", CHECK, r"too deep",
         _write(_results, b'{"results": {}, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")),
    Case("check-samples-too-deep", CHECK, r"too deep", _write(_samples, b"[" * 100_000 + b"]" * 100_000 + b"\n")),
    Case("check-item-acc-out-of-range", CHECK, r"acc is 5.0, outside \[0, 1\]", _edit_rows(_first(acc=5.0))),
    Case("check-task-acc-out-of-range", CHECK, r"acc,none is 5.0, outside \[0, 1\]",
         _edit_results(lambda d: {**d, "results": {**d["results"],
                                                   "planted": {**d["results"]["planted"], "acc,none": 5.0}}})),
    Case("check-duplicate-doc-hash", CHECK, r"same doc_hash",
         _edit_rows(lambda rows: [rows[0], {**rows[1], "doc_hash": rows[0]["doc_hash"]}, *rows[2:]])),
    Case("check-responses-not-numbers", CHECK, r"document 0 cannot be read",
         _edit_rows(_first(filtered_resps=[["x", "False"]] * 4))),
]


@pytest.fixture(scope="module")
def lmeval_base(tmp_path_factory, tiny_ref) -> Path:
    """Stock lm-eval outputs of tiny-gpt2 on a small planted task (the folder holding results_*.json)."""
    import planted

    root = tmp_path_factory.mktemp("found_early_lmeval")
    tasks = planted.planted_task(root / "tasks", Path(tiny_ref.path), n=8)
    return planted.lmeval_outputs(Path(tiny_ref.path), tasks, root / "lm")


def _run_case(case: Case, root: Path, lmeval: Path) -> tuple[subprocess.CompletedProcess, dict, dict, Path]:
    tmp = root / "case"
    user_data(tmp / "data")
    shutil.copytree(lmeval, tmp / "base")
    shutil.copytree(lmeval, tmp / "cand")
    if case.edit:
        case.edit(tmp)
    before = snapshot(root)
    r = forgetcheck_cli(*[a.replace("{tmp}", str(tmp)) for a in case.args], cwd=tmp, timeout=240)
    return r, before, snapshot(root), tmp


@pytest.fixture(scope="module")
def outcomes(lmeval_base, tmp_path_factory) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    roots = {c.id: tmp_path_factory.mktemp("early") for c in CASES}
    with ThreadPoolExecutor(max_workers=min(4, (os.cpu_count() or 1) + 1)) as pool:
        futures = {c.id: pool.submit(_run_case, c, roots[c.id], lmeval_base) for c in CASES}
        return {k: f.result() for k, f in futures.items()}


def test_case_ids_unique():
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refused_early_in_one_line_and_nothing_changes(case: Case, outcomes: dict):
    r, before, after, tmp = outcomes[case.id]
    lines = r.stderr.strip().splitlines()
    detail = f"\nrc={r.returncode}\nstderr:\n{r.stderr[-3000:]}\nstdout:\n{r.stdout[-1500:]}"
    assert "Traceback" not in r.stderr + r.stdout, detail
    assert r.returncode == 2, detail
    assert len(lines) == 1 and lines[0].startswith("forgetcheck: error: "), detail
    assert re.search(case.expect, lines[0], re.IGNORECASE), f"expected /{case.expect}/" + detail
    assert after == before, f"the case folder changed: {sorted(set(after) ^ set(before))}"
    assert not (tmp / "runs").exists()


# ---- runtime failures and signals -------------------------------------------------------------------------

def test_a_full_disk_is_one_line_exit_3(tmp_path):
    """ENOSPC while gate writes its verdict: exit 3 (the machine's failure), one line naming the fix."""
    run = make_run(tmp_path / "run", n=40)
    from forgetcheck.verdict.compare import compare_run

    compare_run(run, n_boot=200)
    code = ("import errno, os, sys\n"
            "def full(*a, **k): raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(a[-1]))\n"
            "os.replace = full\n"
            "sys.argv = ['forgetcheck', 'gate', sys.argv[1]]\n"
            "from forgetcheck.cli.app import main\nmain()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code, str(run.root)], capture_output=True, text=True, env=env,
                       timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith("forgetcheck: runtime failure: No space left"), r.stderr
    assert "free space" in lines[0] and "gate.json" in lines[0]


def test_sigterm_says_interrupted_exit_130(tmp_path):
    """typer turns the KeyboardInterrupt that SIGTERM raises into exit 130; the message must still appear."""
    user_data(tmp_path / "data")
    argv = [sys.executable, "-m", "forgetcheck", "run", *[a.replace("{tmp}", str(tmp_path)) for a in TINY],
            "--run-id", "r", "--limit", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not (tmp_path / "runs" / "r" / "config.json").exists() and p.poll() is None:
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err, err
    assert err.strip().splitlines() == ["forgetcheck: interrupted; finished stages are kept (resume a run with "
                                        "--resume runs/<id>)"], err


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root reads any folder")
def test_unreadable_home_names_forgetcheck_home(tmp_path):
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models").chmod(0)
    try:
        r = forgetcheck_cli("eval", "--model", "tiny-gpt2", "--tasks", "fc_winogrande", "--limit", "2",
                            "--device", "cpu", "--out", tmp_path / "o.json", env={"FORGETCHECK_HOME": str(home)},
                            no_dac=True, timeout=240)
    finally:
        (home / "models").chmod(0o755)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and "$FORGETCHECK_HOME" in lines[0] and "--out, --run" not in lines[0], r.stderr


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(folder: Path) -> dict[str, int]:
    return {f.name: stat.S_IMODE(f.stat().st_mode) for f in folder.iterdir() if f.is_file()}


def test_converted_weights_get_the_umask_mode(tmp_path, tiny_ref, umask_022):
    """`models --convert` writes its safetensors as any file the user creates (safetensors alone: 0600)."""
    import torch

    model = tmp_path / "model"
    shutil.copytree(tiny_ref.path, model)
    (model / "model.safetensors").unlink()
    torch.save({"transformer.wte.weight": torch.zeros(2, 2)}, model / "pytorch_model.bin")
    r = forgetcheck_cli("models", "--convert", model, "--out", tmp_path / "converted")
    assert r.returncode == 0, r.stderr
    modes = _modes(tmp_path / "converted")
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes


def test_cached_weights_get_the_umask_mode(tmp_path, umask_022):
    """A model folder built into the cache (tiny-gpt2; checkpoints go through the same helper) is 0644."""
    code = "from forgetcheck.models import registry\nprint(registry.resolve('tiny-gpt2').path)\n"
    env = {**os.environ, "FORGETCHECK_HOME": str(tmp_path / "home"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    built = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240)
    assert built.returncode == 0, built.stderr
    modes = _modes(Path(built.stdout.strip().splitlines()[-1]))
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes


def test_a_run_file_nested_too_deep_is_one_line(tmp_path):
    """A compare.json of 100,000 nested lists (a hostile or broken file) is refused in one line, exit 2, by the
    one JSON reader every run file goes through."""
    run = make_run(tmp_path / "run", n=8)
    run.compare.write_text("[" * 100_000 + "]" * 100_000)
    r = forgetcheck_cli("gate", run.root, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr and "nested too deep" in lines[0], r.stderr[-2000:]
