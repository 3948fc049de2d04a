"""Bad input through the real command line, table-driven: every case runs `python -m forgetcheck ...` in a
subprocess and must end with exit code 2, exactly one stderr line (`forgetcheck: error: ...`) naming the problem,
no traceback, and nothing created or changed: the case folder (earlier results, run folders, --out) hashes the
same before and after, file modes included.

Each case is one class of bad input: run ids, output paths, device/precision/optimizer, tasks and suites,
numbers, model folders and files (pickle weights, corrupt config/gguf, truncated weights), domain data,
--resume, and the JSON that compare/report/gate read (shape, schema_version, paths that leave the run folder),
gate's policy and output paths, plan's flags, command-line usage. Only the tiny random GPT-2 and synthetic run
folders are used (fast).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import FIXTURE_TASKS, forgetcheck_cli
from runfixture import make_run

from forgetcheck import config
from forgetcheck.schema import SCHEMA_VERSION

# ---- running the CLI ------------------------------------------------------------------------------------

def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under `root` with its kind, mode and content hash (symlinks by target)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            out[rel] = ("dir", stat.S_IMODE(st.st_mode))
        else:
            out[rel] = ("file", stat.S_IMODE(st.st_mode), hashlib.sha256(p.read_bytes()).hexdigest())
    return out


# ---- what a case starts from ----------------------------------------------------------------------------

def user_data(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sft.jsonl").write_text("".join(json.dumps({"prompt": f"What is term {i}?",
                                                          "response": f"Term {i} is a disorder."}) + "\n"
                                              for i in range(20)))
    (folder / "cpt.jsonl").write_text("".join(json.dumps({"text": f"Term {i} names a disorder of organ {i % 7}."})
                                              + "\n" for i in range(20)))
    return folder


def run_config(tmp: Path, **over) -> dict:
    """A config.json as `forgetcheck run` writes it (tiny model, the case's own data folder)."""
    cfg = config.RunConfig(base="tiny-gpt2", data=str(tmp / "data"), out_dir=str(tmp / "runs"), run_id="r1",
                      device="cpu", train=config.TrainConfig(budget_tokens=256, seq_len=32, micro_batch=2, lr=1e-3),
                      eval=config.EvalConfig(tasks=("fc_winogrande",), limit=3, batch_size=4))
    d = {"schema_version": SCHEMA_VERSION, **config.to_dict(cfg), "resolved": {}}
    for k, v in over.items():
        d[k] = v
    return d


@dataclass
class Case:
    id: str
    args: list[str]
    setup: tuple[str, ...] = ()
    expect: str = ""  # regex the error line must match (names the problem / the flag / the fix)
    hide: tuple[str, ...] = ()
    env: dict = field(default_factory=dict)
    custom: Callable[[Path], None] | None = None
    no_dac: bool = False


def _corrupt(path: Path, text: str) -> None:
    path.write_text(text)


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


class _Evil:  # pickled into the planted files: unpickling it would create the marker file
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_pickle(path: Path, marker: Path) -> None:
    """A torch-format file whose unpickling runs `touch marker` (what a hostile run/model folder holds)."""
    import torch

    torch.save({"model": _Evil(str(marker))}, path)


def _build(tmp: Path, name: str, assets: dict) -> None:
    if name == "data":
        user_data(tmp / "data")
    elif name == "model":  # a copy of the tiny model folder
        shutil.copytree(assets["tiny"], tmp / "model")
    elif name == "run":  # a finished synthetic run with compare.json
        shutil.copytree(assets["run"], tmp / "runs" / "r1", symlinks=True)
    elif name == "resumable":  # a run folder of `forgetcheck run` (config.json, manifest) to --resume
        user_data(tmp / "data")
        rd = tmp / "runs" / "r1"
        rd.mkdir(parents=True)
        (rd / "config.json").write_text(json.dumps(run_config(tmp), indent=2))
        (rd / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, "timings": {}}))
    elif name == "file":
        (tmp / "afile").write_text("not a folder\n")
    elif name == "rodir":
        (tmp / "ro").mkdir()
        (tmp / "ro").chmod(0o555)
    else:
        raise AssertionError(name)


def _cfg_edit(**over):
    def edit(tmp: Path) -> None:
        p = tmp / "runs" / "r1" / "config.json"
        d = json.loads(p.read_text())
        d.update(over)
        p.write_text(json.dumps(d))
    return edit


def _json_edit(rel: str, fn):
    def edit(tmp: Path) -> None:
        p = tmp / rel
        p.write_text(json.dumps(fn(json.loads(p.read_text()))))
    return edit


def _samples_to(path_fn):
    """Point the base eval's first task's `samples` somewhere else; remove compare.json so it is recomputed."""
    def edit(tmp: Path) -> None:
        rd = tmp / "runs" / "r1"
        p = rd / "eval" / "base.json"
        d = json.loads(p.read_text())
        first = sorted(d["tasks"])[0]
        secret = tmp / "secret.jsonl"
        secret.write_text(json.dumps({"doc_id": 0, "doc_hash": "x", "target": 0, "loglikelihoods": [0, -1],
                                      "correct": True, "metrics": {"acc": 1.0}, "prompt": "SECRET"}) + "\n")
        d["tasks"][first]["samples"] = path_fn(tmp, rd)
        p.write_text(json.dumps(d))
        for f in ("compare.json", "report.html", "gate.json"):
            (rd / f).unlink(missing_ok=True)
    return edit


def _pickle_model(tmp: Path) -> None:
    m = tmp / "model"
    (m / "model.safetensors").unlink()
    import torch

    torch.save({"transformer.wte.weight": torch.zeros(2, 2)}, m / "pytorch_model.bin")


def _evil_model(tmp: Path) -> None:
    m = tmp / "model"
    (m / "model.safetensors").unlink()
    plant_pickle(m / "pytorch_model.bin", tmp / "PWNED")


def _gguf(content: bytes):
    def make(tmp: Path) -> None:
        (tmp / "m.gguf").write_bytes(content)
    return make


def _truncated_gguf(tmp: Path) -> None:
    # a valid header (magic, version 3, 1 tensor, 0 kv) whose tensor table is cut off
    import struct

    (tmp / "m.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + b"\x05\x00")


R = "{tmp}/runs/r1"
TINY = ["--base", "tiny-gpt2", "--data", "{tmp}/data", "--device", "cpu", "--out", "{tmp}/runs"]
EVAL = ["eval", "--model", "tiny-gpt2", "--tasks", "fc_fixture_mc", "--tasks-dir", "{tasks}", "--limit", "2",
        "--device", "cpu"]

CASES: list[Case] = [
    # -- run ids: one safe folder name under --out (run and train) -----------------------------------------
    *[Case(f"run-id-{name}", ["run", *TINY, "--run-id", rid], ("data",), r"--run-id")
      for name, rid in [("dotdot", "../../x"), ("absolute", "{tmp}/abs"), ("nested", "a/b"), ("empty", ""),
                        ("dot", "."), ("space", "my run"), ("newline", "a\nb"), ("long", "x" * 300)]],
    *[Case(f"train-run-id-{name}", ["train", *TINY, "--run-id", rid], ("data",), r"--run-id")
      for name, rid in [("dotdot", "../x"), ("absolute", "/tmp/fc-abs")]],
    # -- output paths: a file, under a file, read-only, an existing run --------------------------------------
    Case("run-out-is-file", ["run", *TINY[:-1], "{tmp}/afile", "--run-id", "r"], ("data", "file"), r"--out .*file"),
    Case("run-out-under-file", ["run", *TINY[:-1], "{tmp}/afile/sub", "--run-id", "r"], ("data", "file"), r"--out"),
    Case("run-out-read-only", ["run", *TINY[:-1], "{tmp}/ro", "--run-id", "r"], ("data", "rodir"), r"writable",
         no_dac=True),
    Case("run-id-exists", ["run", *TINY, "--run-id", "r1"], ("resumable",), r"already holds a run.*--resume"),
    Case("train-out-is-file", ["train", *TINY[:-1], "{tmp}/afile"], ("data", "file"), r"--out"),
    Case("train-run-is-file", ["train", *TINY[:-2], "--run", "{tmp}/afile"], ("data", "file"), r"--run"),
    Case("eval-out-is-dir", [*EVAL, "--out", "{tmp}/outdir"], (), r"--out .*folder",
         custom=lambda t: (t / "outdir").mkdir()),
    Case("eval-out-under-file", [*EVAL, "--out", "{tmp}/afile/base.json"], ("file",), r"--out"),
    Case("eval-out-read-only", [*EVAL, "--out", "{tmp}/ro/base.json"], ("rodir",), r"writable", no_dac=True),
    # -- device, precision, optimizer: refused before any run folder or model --------------------------------
    Case("run-fp16-on-cpu", ["run", *TINY, "--run-id", "r", "--precision", "fp16-mixed"], ("data",),
         r"fp16-mixed.*bf16-mixed"),
    Case("train-fp16-on-cpu", ["train", *TINY, "--run-id", "r", "--precision", "fp16-mixed"], ("data",),
         r"fp16-mixed"),
    Case("run-adamw8bit-no-library", ["run", *TINY, "--run-id", "r", "--optim", "adamw8bit"], ("data",),
         r"adamw8bit.*torchao", hide=("torchao", "bitsandbytes")),
    Case("train-adamw8bit-no-library", ["train", *TINY, "--run-id", "r", "--optim", "adamw8bit"], ("data",),
         r"adamw8bit", hide=("torchao", "bitsandbytes")),
    Case("run-unknown-precision", ["run", *TINY, "--run-id", "r", "--precision", "fp8"], ("data",), r"--precision"),
    Case("run-unknown-optim", ["run", *TINY, "--run-id", "r", "--optim", "sgd"], ("data",), r"--optim"),
    Case("run-cuda-without-gpu", ["run", *TINY[:-4], "--device", "cuda", *TINY[-2:], "--run-id", "r"], ("data",),
         r"--device", env={"CUDA_VISIBLE_DEVICES": ""}),
    Case("run-unknown-device", ["run", *TINY[:-4], "--device", "tpu", *TINY[-2:], "--run-id", "r"], ("data",),
         r"--device"),
    Case("eval-unknown-device", [*EVAL[:-1], "tpu", "--out", "{tmp}/o.json"], (), r"--device"),
    Case("train-cuda-without-gpu", ["train", *TINY[:-4], "--device", "cuda:3", *TINY[-2:]], ("data",), r"--device",
         env={"CUDA_VISIBLE_DEVICES": ""}),
    # -- tasks, suites, eval settings ----------------------------------------------------------------------
    Case("run-unknown-task", ["run", *TINY, "--run-id", "r", "--tasks", "no_such_task"], ("data",),
         r"unknown task 'no_such_task'"),
    Case("eval-unknown-task", [*EVAL[:4], "no_such_task", *EVAL[5:], "--out", "{tmp}/o.json"], (),
         r"unknown task"),
    Case("run-unknown-suite", ["run", *TINY, "--run-id", "r", "--suite", "nonsense"], ("data",), r"suite"),
    Case("eval-unknown-suite", ["eval", "--model", "tiny-gpt2", "--suite", "nonsense", "--out", "{tmp}/o.json"], (),
         r"suite"),
    Case("eval-limit-zero", [*EVAL[:-3], "0", "--device", "cpu", "--out", "{tmp}/o.json"], (), r"--limit"),
    Case("run-limit-negative", ["run", *TINY, "--run-id", "r", "--limit", "-3"], ("data",), r"--limit"),
    Case("eval-batch-size-zero", [*EVAL, "--batch-size", "0", "--out", "{tmp}/o.json"], (), r"--batch-size"),
    Case("eval-unknown-backend", [*EVAL, "--backend", "vllm", "--out", "{tmp}/o.json"], (), r"--backend"),
    Case("run-unknown-backend", ["run", *TINY, "--run-id", "r", "--backend", "vllm"], ("data",), r"--backend"),
    Case("eval-tasks-dir-missing", [*EVAL[:6], "{tmp}/nope", *EVAL[7:], "--out", "{tmp}/o.json"], (),
         r"--tasks-dir"),
    Case("eval-reference-missing", [*EVAL, "--out", "{tmp}/o.json", "--reference", "{tmp}/nope.json"], (),
         r"nope.json"),
    Case("eval-reference-not-eval", [*EVAL, "--out", "{tmp}/o.json", "--reference", R + "/compare.json"], ("run",),
         r"compare.json"),
    # -- training numbers ------------------------------------------------------------------------------------
    *[Case(f"run-{flag.strip('-')}-{name}", ["run", *TINY, "--run-id", "r", flag, value], ("data",), flag)
      for flag, name, value in [("--budget-tokens", "zero", "0"), ("--seq-len", "tiny", "4"),
                                ("--micro-batch", "zero", "0"), ("--lr", "nan", "nan"), ("--lr", "inf", "inf"),
                                ("--nproc", "zero", "0"), ("--save-every", "negative", "-1"),
                                ("--budget-tokens", "text", "lots")]],
    Case("train-lr-nan", ["train", *TINY, "--lr", "nan"], ("data",), r"--lr"),
    Case("train-budget-below-one-step", ["train", *TINY, "--budget-tokens", "10"], ("data",), r"--budget-tokens"),
    Case("run-unknown-preset", ["run", *TINY, "--run-id", "r", "--preset", "huge"], ("data",), r"--preset"),
    Case("run-unknown-arm", ["run", *TINY, "--run-id", "r", "--arms", "dpo"], ("data",), r"--arms"),
    Case("train-arm-twice", ["train", *TINY, "--arms", "sft,sft"], ("data",), r"--arms"),
    # -- gate thresholds given to run ------------------------------------------------------------------------
    *[Case(f"run-{flag.strip('-')}-{name}", ["run", *TINY, "--run-id", "r", flag, value], ("data",), flag)
      for flag, name, value in [("--max-drop", "nan", "nan"), ("--max-mean-drop", "inf", "inf"),
                                ("--alpha", "one", "1"), ("--min-domain-gain", "nan", "nan")]],
    # -- model: folders, files, hub ids (run, train, eval, plan) --------------------------------------------
    Case("eval-model-missing", ["eval", "--model", "{tmp}/nope", "--out", "{tmp}/o.json"], (), r"--model"),
    Case("eval-model-empty", ["eval", "--model", "", "--out", "{tmp}/o.json"], (), r"--model"),
    Case("eval-model-no-config", ["eval", "--model", "{tmp}/model", "--out", "{tmp}/o.json"], ("model",),
         r"config.json", custom=lambda t: (t / "model" / "config.json").unlink()),
    Case("eval-model-corrupt-config", [*EVAL[:2], "{tmp}/model", *EVAL[3:], "--out", "{tmp}/o.json"], ("model",),
         r"config.json.*not valid JSON", custom=lambda t: _corrupt(t / "model" / "config.json", "{ not json")),
    Case("run-model-corrupt-config", ["run", "--base", "{tmp}/model", *TINY[2:], "--run-id", "r"],
         ("data", "model"), r"config.json", custom=lambda t: _corrupt(t / "model" / "config.json", "[1, 2")),
    Case("run-model-config-list", ["run", "--base", "{tmp}/model", *TINY[2:], "--run-id", "r"],
         ("data", "model"), r"model_type", custom=lambda t: _corrupt(t / "model" / "config.json", "[1, 2]")),
    Case("eval-model-unknown-type", [*EVAL[:2], "{tmp}/model", *EVAL[3:], "--out", "{tmp}/o.json"], ("model",),
         r"model_type 'evil_arch'", custom=_json_edit("model/config.json", lambda d: {**d, "model_type": "evil_arch"})),
    Case("eval-model-truncated-weights", [*EVAL[:2], "{tmp}/model", *EVAL[3:], "--out", "{tmp}/o.json"],
         ("model",), r"truncated", custom=lambda t: _truncate(t / "model" / "model.safetensors")),
    Case("run-model-truncated-weights", ["run", "--base", "{tmp}/model", *TINY[2:], "--run-id", "r"],
         ("data", "model"), r"truncated", custom=lambda t: _truncate(t / "model" / "model.safetensors", 0.9)),
    Case("eval-model-no-weights", [*EVAL[:2], "{tmp}/model", *EVAL[3:], "--out", "{tmp}/o.json"], ("model",),
         r"safetensors", custom=lambda t: (t / "model" / "model.safetensors").unlink()),
    Case("eval-model-pickle-weights", [*EVAL[:2], "{tmp}/model", *EVAL[3:], "--out", "{tmp}/o.json"], ("model",),
         r"pickle.*--convert", custom=_pickle_model),
    Case("run-model-pickle-weights", ["run", "--base", "{tmp}/model", *TINY[2:], "--run-id", "r"],
         ("data", "model"), r"pickle.*--convert", custom=_pickle_model),
    Case("eval-model-malicious-pickle", [*EVAL[:2], "{tmp}/model", *EVAL[3:], "--out", "{tmp}/o.json"], ("model",),
         r"pickle", custom=_evil_model),
    Case("convert-malicious-pickle", ["models", "--convert", "{tmp}/model", "--out", "{tmp}/converted"], ("model",),
         r"refused", custom=_evil_model),
    Case("convert-without-out", ["models", "--convert", "{tmp}/model"], ("model",), r"--out"),
    Case("gguf-missing", [*EVAL[:2], "{tmp}/nope.gguf", *EVAL[3:], "--out", "{tmp}/o.json"], (),
         r"no such .gguf.*smollm2-135m"),
    Case("gguf-not-gguf", [*EVAL[:2], "{tmp}/m.gguf", *EVAL[3:], "--out", "{tmp}/o.json"], (), r"not a GGUF",
         custom=_gguf(b"PK\x03\x04 this is a zip, not a model")),
    Case("gguf-empty", ["run", "--base", "{tmp}/m.gguf", *TINY[2:], "--run-id", "r"], ("data",), r"GGUF",
         custom=_gguf(b"")),
    Case("gguf-truncated", ["run", "--base", "{tmp}/m.gguf", *TINY[2:], "--run-id", "r"], ("data",),
         r"corrupt or truncated", custom=_truncated_gguf),
    Case("plan-gguf-corrupt", ["plan", "--base", "{tmp}/m.gguf"], (), r"GGUF", custom=_gguf(b"GGUF\xff\xff")),
    Case("hub-id-offline", ["run", "--base", "no-such-org/no-such-model", *TINY[2:], "--run-id", "r"], ("data",),
         r"hub"),
    Case("train-model-missing", ["train", "--base", "{tmp}/nope", *TINY[2:]], ("data",), r"--base"),
    # -- domain data -----------------------------------------------------------------------------------------
    Case("run-data-missing", ["run", *TINY[:3], "{tmp}/nodata", *TINY[4:], "--run-id", "r"], (), r"--data"),
    Case("run-data-is-file", ["run", *TINY[:3], "{tmp}/afile", *TINY[4:], "--run-id", "r"], ("file",), r"--data"),
    Case("run-data-bad-jsonl", ["run", *TINY, "--run-id", "r"], ("data",), r"sft.jsonl",
         custom=lambda t: _corrupt(t / "data" / "sft.jsonl", "{broken\n")),
    Case("run-data-lacks-arm", ["run", *TINY, "--run-id", "r"], ("data",), r"cpt",
         custom=lambda t: (t / "data" / "cpt.jsonl").unlink()),
    Case("data-prepare-unknown", ["data", "prepare", "nosuch"], (), r"nosuch"),
    # -- --resume ----------------------------------------------------------------------------------------------
    Case("resume-missing", ["run", "--resume", "{tmp}/nope"], (), r"--resume"),
    Case("resume-no-config", ["run", "--resume", "{tmp}/empty"], (), r"config.json",
         custom=lambda t: (t / "empty").mkdir()),
    Case("resume-config-corrupt", ["run", "--resume", R], ("resumable",), r"config.json",
         custom=lambda t: _corrupt(t / "runs" / "r1" / "config.json", "{oops")),
    Case("resume-config-list", ["run", "--resume", R], ("resumable",), r"config.json",
         custom=lambda t: _corrupt(t / "runs" / "r1" / "config.json", "[]")),
    Case("resume-config-unknown-key", ["run", "--resume", R], ("resumable",), r"unknown.*evil",
         custom=_cfg_edit(evil=1)),
    Case("resume-config-unknown-train-key", ["run", "--resume", R], ("resumable",), r"unknown.*turbo",
         custom=lambda t: _json_edit("runs/r1/config.json",
                                     lambda d: {**d, "train": {**d["train"], "turbo": True}})(t)),
    Case("resume-config-version-99", ["run", "--resume", R], ("resumable",), r"schema_version 99",
         custom=_cfg_edit(schema_version=99)),
    Case("resume-config-version-string", ["run", "--resume", R], ("resumable",), r"schema_version",
         custom=_cfg_edit(schema_version="1")),
    Case("resume-config-bad-value", ["run", "--resume", R], ("resumable",), r"--lr",
         custom=lambda t: _json_edit("runs/r1/config.json",
                                     lambda d: {**d, "train": {**d["train"], "lr": -1}})(t)),
    Case("resume-flag-differs", ["run", "--resume", R, "--lr", "0.5"], ("resumable",), r"--lr 0.5 differs .* 0.001"),
    Case("resume-base-differs", ["run", "--resume", R, "--base", "smollm2-135m"], ("resumable",),
         r"--base smollm2-135m differs .* tiny-gpt2"),
    Case("resume-run-id-differs", ["run", "--resume", R, "--run-id", "other"], ("resumable",), r"--run-id"),
    # -- compare / report / gate inputs ---------------------------------------------------------------------
    *[Case(f"{cmd}-compare-{name}", [cmd, R], ("run",), rx, custom=_json_edit("runs/r1/compare.json", fn))
      for cmd in ("report", "gate")
      for name, fn, rx in [("list", lambda d: [d], r"compare.json"),
                           ("no-fields", lambda d: {"schema_version": 1, "kind": "compare"}, r"compare.json"),
                           ("version-string", lambda d: {**d, "schema_version": "1"}, r"schema_version"),
                           ("version-99", lambda d: {**d, "schema_version": 99}, r"schema_version 99"),
                           ("wrong-kind", lambda d: {**d, "kind": "eval"}, r"compare")]],
    Case("gate-compare-not-json", ["gate", R + "/compare.json"], ("run",), r"not valid JSON",
         custom=lambda t: _corrupt(t / "runs" / "r1" / "compare.json", "\x00\x01binary")),
    Case("compare-base-eval-corrupt", ["compare", R], ("run",), r"base.json",
         custom=lambda t: _corrupt(t / "runs" / "r1" / "eval" / "base.json", "{")),
    Case("compare-run-missing", ["compare", "{tmp}/nope"], (), r"nope"),
    Case("compare-n-boot-small", ["compare", R, "--n-boot", "5"], ("run",), r"--n-boot"),
    Case("compare-alpha-nan", ["compare", R, "--alpha", "nan"], ("run",), r"--alpha"),
    Case("compare-samples-escape", ["compare", R], ("run",), r"outside",
         custom=_samples_to(lambda t, rd: "../../secret.jsonl")),
    Case("compare-samples-absolute", ["compare", R], ("run",), r"relative path inside",
         custom=_samples_to(lambda t, rd: str(t / "secret.jsonl"))),
    Case("gate-samples-escape", ["gate", R], ("run",), r"outside",
         custom=_samples_to(lambda t, rd: "../../../secret.jsonl")),
    Case("compare-samples-symlink-out", ["compare", R], ("run",), r"outside",
         custom=lambda t: (_samples_to(lambda t, rd: "samples/leak.jsonl")(t),
                           (t / "runs" / "r1" / "eval" / "samples").mkdir(exist_ok=True),
                           (t / "runs" / "r1" / "eval" / "samples" / "leak.jsonl").symlink_to(t / "secret.jsonl"))),
    Case("report-gate-json-list", ["report", R], ("run",), r"gate.json",
         custom=lambda t: _corrupt(t / "runs" / "r1" / "gate.json", "[]")),
    Case("gate-max-drop-nan", ["gate", R, "--max-drop", "nan"], ("run",), r"--max-drop"),
    Case("gate-alpha-zero", ["gate", R, "--alpha", "0"], ("run",), r"--alpha"),
    Case("gate-junit-dir", ["gate", R, "--junit", "{tmp}/outdir"], ("run",), r"--junit",
         custom=lambda t: (t / "outdir").mkdir()),
    Case("gate-markdown-under-file", ["gate", R, "--markdown", "{tmp}/afile/g.md"], ("run", "file"),
         r"--markdown"),
    Case("gate-policy-dir", ["gate", R, "--policy", "{tmp}/outdir"], ("run",), r"--policy",
         custom=lambda t: (t / "outdir").mkdir()),
    Case("gate-policy-missing", ["gate", R, "--policy", "{tmp}/nope.toml"], ("run",), r"--policy"),
    Case("gate-policy-bad-toml", ["gate", R, "--policy", "{tmp}/p.toml"], ("run",), r"TOML",
         custom=lambda t: _corrupt(t / "p.toml", "max_drop = = 2")),
    Case("gate-policy-unknown-key", ["gate", R, "--policy", "{tmp}/p.toml"], ("run",), r"unknown gate policy key",
         custom=lambda t: _corrupt(t / "p.toml", "max_dorp = 2\n")),
    Case("gate-policy-nan", ["gate", R, "--policy", "{tmp}/p.toml"], ("run",), r"max_drop",
         custom=lambda t: _corrupt(t / "p.toml", "max_drop = nan\n")),
    Case("gate-target-missing", ["gate", "{tmp}/nope"], (), r"nope"),
    # -- plan ------------------------------------------------------------------------------------------------
    *[Case(f"plan-params-{name}", ["plan", "--params", value], (), r"--params")
      for name, value in [("nan", "nan"), ("inf", "inf"), ("negative", "-1"), ("zero", "0"), ("huge", "1e30"),
                          ("text", "seven")]],
    Case("plan-both", ["plan", "--params", "7e9", "--base", "tiny-gpt2"], (), r"exactly one"),
    Case("plan-micro-batch-zero", ["plan", "--params", "7e9", "--micro-batch", "0"], (), r"--micro-batch"),
    Case("plan-nproc-zero", ["plan", "--params", "7e9", "--nproc", "0"], (), r"--nproc"),
    Case("plan-unknown-precision", ["plan", "--params", "7e9", "--precision", "fp4"], (), r"--precision"),
    # -- check (models trained elsewhere) --------------------------------------------------------------------
    Case("check-run-id-escapes", ["check", "--base", "tiny-gpt2", "--candidate", "{tmp}/model", "--out", "{tmp}/runs",
                                  "--run-id", "../x", "--device", "cpu"], ("model",), r"--run-id"),
    Case("check-out-is-file", ["check", "--base", "tiny-gpt2", "--candidate", "{tmp}/model", "--out", "{tmp}/afile",
                               "--device", "cpu"], ("model", "file"), r"--out"),
    Case("check-candidate-pickle", ["check", "--base", "tiny-gpt2", "--candidate", "{tmp}/model", "--out",
                                    "{tmp}/runs", "--device", "cpu"], ("model",), r"pickle", custom=_evil_model),
    Case("check-unknown-task", ["check", "--base", "tiny-gpt2", "--candidate", "{tmp}/model", "--out", "{tmp}/runs",
                                "--tasks", "no_such_task", "--device", "cpu"], ("model",), r"unknown task"),
    # -- usage ---------------------------------------------------------------------------------------------
    Case("unknown-command", ["frobnicate"], (), r"frobnicate|command"),
    Case("unknown-option", ["gate", R, "--max-dorp", "1"], ("run",), r"--max-dorp|option"),
]


def _plan_must_not_name_budget(case: Case, err: str) -> None:
    if case.args and case.args[0] == "plan":
        assert "--budget-tokens" not in err, err


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_ref) -> dict:
    from forgetcheck.verdict.compare import compare_run
    from forgetcheck.verdict.gate import gate_run

    root = tmp_path_factory.mktemp("bad_input_assets")
    run = make_run(root / "run", n=40)
    compare_run(run, n_boot=200)
    gate_run(run.root)
    tasks = root / "tasks"
    tasks.mkdir()
    for f in FIXTURE_TASKS.iterdir():
        (tasks / f.name).write_text(f.read_text().replace("${FIXTURES}", str(tasks)))
    return {"tiny": Path(tiny_ref.path), "run": run.root, "tasks": tasks}


def test_enough_cases_and_unique_ids():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 60


@dataclass
class Outcome:
    tmp: Path
    result: subprocess.CompletedProcess | None
    before: dict
    after: dict
    error: str = ""


def _run_case(case: Case, root: Path, assets: dict) -> Outcome:
    tmp = root / "case"  # the hashed folder is root, so `--run-id ../../x` under {tmp}/runs stays in it
    tmp.mkdir(parents=True)
    for name in case.setup:
        _build(tmp, name, assets)
    if case.custom:
        case.custom(tmp)
    args = [a.replace("{tmp}", str(tmp)).replace("{tasks}", str(assets["tasks"])) for a in case.args]
    before = snapshot(root)
    try:
        r = forgetcheck_cli(*args, cwd=tmp, hide=case.hide, env=case.env, no_dac=case.no_dac, timeout=240)
    except subprocess.TimeoutExpired as e:
        return Outcome(tmp, None, before, snapshot(root), f"timed out after {e.timeout} s: not refused early")
    return Outcome(tmp, r, before, snapshot(root))


@pytest.fixture(scope="module")
def outcomes(assets, tmp_path_factory) -> dict[str, Outcome]:
    """Every case run once, a few at a time (each is its own interpreter, mostly waiting on imports)."""
    from concurrent.futures import ThreadPoolExecutor

    roots = {c.id: tmp_path_factory.mktemp("bad") for c in CASES}
    with ThreadPoolExecutor(max_workers=min(4, (os.cpu_count() or 1) + 1)) as pool:
        futures = {c.id: pool.submit(_run_case, c, roots[c.id], assets) for c in CASES}
        return {k: f.result() for k, f in futures.items()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_with_one_line_and_nothing_changes(case: Case, outcomes: dict):
    o = outcomes[case.id]
    assert not o.error, o.error
    r = o.result
    lines = r.stderr.strip().splitlines()
    detail = f"\nrc={r.returncode}\nstderr:\n{r.stderr[-3000:]}\nstdout:\n{r.stdout[-1500:]}"
    assert "Traceback" not in r.stderr + r.stdout, detail
    assert r.returncode == 2, detail
    assert len(lines) == 1 and lines[0].startswith("forgetcheck: error: "), detail
    if case.expect:
        assert re.search(case.expect, lines[0], re.IGNORECASE | re.DOTALL), f"expected /{case.expect}/" + detail
    _plan_must_not_name_budget(case, lines[0])
    before, after = o.before, o.after
    assert after == before, (f"the case folder changed: added {sorted(set(after) - set(before))}, removed "
                             f"{sorted(set(before) - set(after))}, changed "
                             f"{sorted(k for k in before if k in after and before[k] != after[k])}")
    assert not (o.tmp / "PWNED").exists(), "a planted pickle ran its code"
    assert not Path("/tmp/fc-abs").exists()
