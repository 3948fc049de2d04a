"""Hardening beyond one bad flag: nothing in a run folder or model folder runs code when read (a planted pickle
with a side effect, in a run's resume state and in a model folder, is refused and its side effect never
happens), atomic writes leave no temp file behind (not even one of a killed writer) and create files with the
umask's mode, paths read from a run stay in it, cached models and GGUF files are checked for truncation, and
two evaluations at once on a fresh cache both succeed."""

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
from test_bad_input import plant_pickle, run_config, snapshot, user_data

from forgetcheck.errors import BadInput
from forgetcheck.models import files, registry
from forgetcheck.rundir import atomic_write_text, check_run_id, confined


def _pickle_is_live(path: Path, marker: Path) -> None:
    """The control: unpickling the planted file the old way (weights_only=False) does run its code."""
    code = f"import torch; torch.load({str(path)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert marker.exists(), "the planted pickle is not live, so the test would prove nothing"
    marker.unlink()


# ---- planted pickles ------------------------------------------------------------------------------------

def test_planted_pickle_in_resume_state_is_refused_and_never_runs(tmp_path, fc_home):
    from forgetcheck import config
    from forgetcheck.schema import SCHEMA_VERSION

    user_data(tmp_path / "data")
    run = tmp_path / "runs" / "r1"
    cfg = run_config(tmp_path)
    (run / "eval").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(cfg, indent=2))
    (run / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, "timings": {}}))
    (run / "eval" / "base.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, "kind": "eval",
                                                        "tasks": {}}))
    # a resume state whose meta matches the config, so training would pick it up
    rdir = run / "ckpt" / "sft.resume"
    rdir.mkdir(parents=True)
    train = config.TrainConfig(**cfg["train"])
    (rdir / "meta.json").write_text(json.dumps({"step": 1, "config": config.to_dict(train), "world": 1}))
    marker = tmp_path / "PWNED"
    plant_pickle(rdir / "state.pt", marker)
    _pickle_is_live(rdir / "state.pt", marker)

    before = snapshot(tmp_path)
    r = forgetcheck_cli("run", "--resume", str(run), cwd=tmp_path)
    line = one_line_exit_2(r)
    assert not marker.exists(), "the planted pickle ran its code on --resume"
    assert "state.pt" in line and "refused" in line, line
    after = snapshot(tmp_path)
    # the refusal happens in training, after the (resumed) run folder is known: nothing of the user's changed
    changed = [k for k in before if k in after and before[k] != after[k] and not k.endswith("manifest.json")]
    assert not changed and not (set(before) - set(after)), (changed, set(before) - set(after))


def test_planted_pickle_in_model_folder_is_refused_and_never_runs(tmp_path, tiny_ref):
    model = tmp_path / "model"
    shutil.copytree(tiny_ref.path, model)
    (model / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    plant_pickle(model / "pytorch_model.bin", marker)
    _pickle_is_live(model / "pytorch_model.bin", marker)

    before = snapshot(tmp_path)
    r = forgetcheck_cli("eval", "--model", str(model), "--out", str(tmp_path / "out" / "m.json"), "--device", "cpu",
            cwd=tmp_path)
    line = one_line_exit_2(r)
    assert "pickle" in line and "--convert" in line, line
    assert not marker.exists()
    # the offered conversion refuses it too, without running it
    r = forgetcheck_cli("models", "--convert", str(model), "--out", str(tmp_path / "conv"), cwd=tmp_path)
    assert "refused" in one_line_exit_2(r)
    assert not marker.exists()
    assert snapshot(tmp_path) == before


def test_convert_copies_plain_pickle_weights_to_safetensors(tmp_path, tiny_ref):
    import torch
    from safetensors.torch import load_file

    model = tmp_path / "model"
    shutil.copytree(tiny_ref.path, model)
    weights = load_file(str(model / "model.safetensors"))
    (model / "model.safetensors").unlink()
    torch.save(weights, model / "pytorch_model.bin")
    r = forgetcheck_cli("models", "--convert", str(model), "--out", str(tmp_path / "conv"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    back = load_file(str(tmp_path / "conv" / "model.safetensors"))
    assert set(back) == set(weights) and all(torch.equal(back[k], weights[k]) for k in weights)
    assert not list((tmp_path / "conv").glob("*.bin"))
    ref = registry.resolve(str(tmp_path / "conv"), prepare=False)
    assert ref.kind == "local"


# ---- run folder paths -----------------------------------------------------------------------------------

@pytest.mark.parametrize("run_id", ["r1", "2026-01-01_x.y", "a" * 128])
def test_safe_run_ids_pass(run_id):
    assert check_run_id(run_id) == run_id


@pytest.mark.parametrize("run_id", ["", ".", "..", "../x", "a/b", "/abs", ".hidden", "a b", "a" * 129, "-x"])
def test_unsafe_run_ids_are_refused(run_id):
    with pytest.raises(BadInput, match="--run-id"):
        check_run_id(run_id)


def test_paths_read_from_a_run_stay_inside_it(tmp_path):
    root = tmp_path / "run"
    (root / "eval" / "samples").mkdir(parents=True)
    (tmp_path / "outside.jsonl").write_text("{}\n")
    assert confined(root / "eval", "samples/x.jsonl", "eval") == root / "eval" / "samples" / "x.jsonl"
    (root / "eval" / "link.jsonl").symlink_to(tmp_path / "outside.jsonl")
    for rel in ("../../outside.jsonl", str(tmp_path / "outside.jsonl"), "link.jsonl", "", None, 3):
        with pytest.raises(BadInput):
            confined(root / "eval", rel, "eval/base.json samples")


# ---- atomic writes --------------------------------------------------------------------------------------

def _temps(folder: Path) -> list[str]:
    return sorted(f.name for f in folder.iterdir() if f.name.endswith(".tmp"))


def test_failed_atomic_write_removes_its_temp_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "result.json"
    atomic_write_text(target, "old\n")

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(target, "new\n")
    assert target.read_text() == "old\n"
    assert _temps(tmp_path) == []


def test_temp_of_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "result.json"
    code = (f"import os, time, sys; sys.path.insert(0, {str(REPO)!r})\n"
            "from forgetcheck import rundir\n"
            "os.replace = lambda a, b: time.sleep(600)\n"  # hangs between writing the temp and renaming it
            f"rundir.atomic_write_text(rundir.Path({str(target)!r}), 'half')\n")
    p = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.time() + 60
        while not _temps(tmp_path) and time.time() < deadline:
            time.sleep(0.1)
        assert _temps(tmp_path), "the writer never created its temp file"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert len(_temps(tmp_path)) == 1 and not target.exists()  # kill -9 leaves it, nothing can run then
    atomic_write_text(target, "whole\n")
    assert target.read_text() == "whole\n"
    assert _temps(tmp_path) == []


def test_sigterm_during_a_write_removes_the_temp(tmp_path):
    target = tmp_path / "result.json"
    code = (f"import os, time, sys, signal; sys.path.insert(0, {str(REPO)!r})\n"
            "from forgetcheck import rundir\n"
            "from forgetcheck.cli import app\n"
            "signal.signal(signal.SIGTERM, app._terminated)\n"
            "os.replace = lambda a, b: time.sleep(600)\n"
            f"rundir.atomic_write_text(rundir.Path({str(target)!r}), 'half')\n")
    p = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not _temps(tmp_path) and time.time() < deadline:
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=60)
    assert _temps(tmp_path) == [] and not target.exists()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "x.json", "{}\n")
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == mode


# ---- cached models, GGUF --------------------------------------------------------------------------------

def test_truncated_cached_model_is_detected_and_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGETCHECK_HOME", str(tmp_path / "home"))
    ref = registry.resolve("tiny-gpt2")
    weights = Path(ref.path) / "model.safetensors"
    whole = weights.read_bytes()
    assert registry.folder_problem(Path(ref.path)) is None
    weights.write_bytes(whole[: len(whole) - 1000])
    assert "truncated" in registry.folder_problem(Path(ref.path))
    assert not [r for r in registry.describe_aliases() if r["name"] == "tiny-gpt2"][0]["ready"]
    registry.resolve("tiny-gpt2")  # rebuilds
    assert weights.read_bytes() == whole  # seed 0: the same weights again
    (Path(ref.path) / registry.MARKER).unlink()  # a build that died before its completion marker
    assert registry.folder_problem(Path(ref.path)) is not None


def _tiny_gguf(path: Path) -> None:
    import numpy as np
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.arange(4096, dtype=np.float32).reshape(64, 64))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_checks_find_truncation_and_garbage(tmp_path):
    g = tmp_path / "m.gguf"
    _tiny_gguf(g)
    files.check_gguf(g, "--base m.gguf")  # whole: passes
    data = g.read_bytes()
    g.write_bytes(data[:-100])
    with pytest.raises(BadInput, match="truncated|corrupt"):
        files.check_gguf(g, "--base m.gguf")
    g.write_bytes(data[:40])
    with pytest.raises(BadInput, match="corrupt or truncated"):
        files.check_gguf(g, "--base m.gguf")
    g.write_bytes(b"\x00" * 64)
    with pytest.raises(BadInput, match="not a GGUF"):
        files.check_gguf(g, "--base m.gguf")


# ---- concurrency ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_evaluations_at_once_on_a_fresh_cache_both_succeed(tmp_path, fc_home):
    """Two `forgetcheck eval` processes start together on an empty cache: both build the tiny model, render the
    task YAMLs, fill the eval cache and write their results; both must succeed with the same numbers."""
    from forgetcheck.data import benchmarks

    benchmarks.prepare_bench()  # the benchmark data (shared, read-only); everything else starts empty
    home = tmp_path / "home"
    home.mkdir()
    (home / "bench").symlink_to(Path(fc_home) / "bench", target_is_directory=True)
    env = {"FORGETCHECK_HOME": str(home)}
    procs = []
    for i in range(2):
        argv = [sys.executable, "-m", "forgetcheck", "eval", "--model", "tiny-gpt2", "--tasks",
                "fc_winogrande,fc_general_text_ppl", "--limit", "3", "--device", "cpu", "--out",
                str(tmp_path / f"out{i}" / "base.json")]
        procs.append(subprocess.Popen(argv, cwd=tmp_path, env={**os.environ, **env, "HF_HUB_OFFLINE": "1",
                                                                "PYTHONPATH": str(REPO)},
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, f"rc={p.returncode}\n{err[-3000:]}\n{out[-1000:]}"
    docs = [json.loads((tmp_path / f"out{i}" / "base.json").read_text()) for i in range(2)]
    assert docs[0]["tasks"].keys() == docs[1]["tasks"].keys() == {"fc_winogrande", "fc_general_text_ppl"}
    for t in docs[0]["tasks"]:
        assert docs[0]["tasks"][t]["metrics"] == docs[1]["tasks"][t]["metrics"]
    leftovers = [str(p) for p in home.rglob("*") if p.name.endswith(".tmp") or ".old-" in p.name]
    assert leftovers == []
