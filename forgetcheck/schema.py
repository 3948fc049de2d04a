"""Typed schema of every JSON file in the run folder (docs/design.md, "The run folder"), and typed readers
and writers for them.

Each file carries `schema_version` and `kind`; a reader refuses a version it does not know or a file missing
a key it needs, naming the file and the fix, so a renamed key is an error rather than a blank in the report.
This module imports nothing heavy: compare, report and gate use it on JSON alone.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypedDict

from forgetcheck.config import RunConfig, from_dict, to_dict
from forgetcheck.errors import BadInput
from forgetcheck.rundir import RunDir, atomic_write_json, git_hash, package_versions, read_json

SCHEMA_VERSION = 1
PROMPT_CHARS = 600  # tail of each multiple-choice context kept in the per-item record (for flip examples)
CHOICE_CHARS = 400  # of each choice (a WinoGrande choice is its whole filled-in sentence)


class MetricValue(TypedDict):
    value: float
    stderr: float | None
    higher_is_better: bool


class TaskResult(TypedDict, total=False):
    suite: str  # "retention" | "domain"
    kind: str  # "multiple_choice" | "perplexity"
    primary_metric: str  # e.g. "acc", "word_perplexity"
    metrics: dict[str, MetricValue]
    n: int  # items evaluated
    chance: float | None  # primary metric of random guessing (None for perplexity)
    samples: str  # path of the per-item JSONL, relative to the eval JSON's folder


class EvalFile(TypedDict, total=False):
    """eval/<model>.json. Per-item lines in eval/samples/<model>/<task>.jsonl:
    multiple choice: {doc_id, doc_hash, target, loglikelihoods: [...], correct: bool, metrics: {acc, acc_norm}}
    perplexity:      {doc_id, doc_hash, loglikelihood, words, bytes, tokens}
    """

    schema_version: int
    kind: str  # "eval"
    model: dict[str, Any]  # name, path, content_hash, random_weights
    limit: int | None
    backend: str
    versions: dict[str, str | None]
    tasks: dict[str, TaskResult]
    skipped: dict[str, str]  # tasks of the suites not scored for this model, and why (uninformative at the base)
    missing: dict[str, dict]  # tasks of the suites whose data could not be built: {task: {suite, why}}
    drift: dict[str, Any]  # {"kl": {...}} when a reference (base) distribution was given


class TrainFile(TypedDict, total=False):
    """train/<arm>.json."""

    schema_version: int
    kind: str  # "train"
    arm: str
    base: str
    tokens_seen: dict[str, int]  # forward (padding excluded), padding, label (tokens with loss)
    budget_tokens: int
    optimizer_steps: int
    loss_curve: list[list[float]]  # [[step, loss], ...]
    lr_curve: list[list[float]]  # [[step, lr], ...]
    wall_s: float
    tokens_per_s: float
    memory: dict[str, Any]  # planned (bytes per component), measured_peak_bytes, method
    config: dict[str, Any]
    checkpoint: str
    base_ref: dict[str, Any]  # the resolved --base (models.ModelRef)
    random_weights: bool  # copied from the base: a random-init base makes every result a plumbing check
    data: str  # the domain file the arm read
    tokens_per_step: int
    step_s: list[float]  # wall seconds of each optimizer step
    packing: str  # how rows were built (both arms: wrapped packing, no padding)
    planned_steps: int  # optimizer steps the budget gives (optimizer_steps is fewer when it stopped early)
    stopped_early: dict[str, Any] | None  # step, tokens, planned_steps, reason (--stop-if-forecast-exceeds)
    curve: dict[str, Any] | None  # the forgetting curve's file, points, sizes, overhead and forecast summary


def require(obj: Any, kind: str, path: str = "") -> dict:
    """Check a loaded JSON object is a forgetcheck `kind` file of a version we read."""
    where = path or kind
    if not isinstance(obj, dict):
        raise BadInput(f"{where}: not a forgetcheck {kind} file (expected a JSON object)")
    version = obj.get("schema_version")
    if version is None:
        raise BadInput(f"{where}: no schema_version; is this a forgetcheck {kind} file?")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise BadInput(f"{where}: schema_version {version!r} is not a version number (1, 2, ...): the file was "
                       f"edited or is not forgetcheck's; re-run the command that writes it")
    if version > SCHEMA_VERSION:
        raise BadInput(f"{where}: schema_version {version} is newer than this forgetcheck reads "
                       f"({SCHEMA_VERSION}): upgrade forgetcheck")
    if obj.get("kind") not in (None, kind):
        raise BadInput(f"{where}: is a '{obj.get('kind')}' file, expected '{kind}'")
    return obj


# ---- compare.json and gate.json: typed readers and writers ---------------------------------------------------
#
# Version 2 of both (this forgetcheck) holds three-outcome verdicts: every estimate carries its centre and
# standard error (stats.Estimate), the gate's rules have a `status` (pass | fail | inconclusive) and a power
# statement. Version 1 files (two outcomes, bootstrap percentile CIs beside McNemar p-values) are refused by
# these readers with the fix (`forgetcheck compare RUN` rewrites compare.json from the run's eval files, whose
# format did not change; `forgetcheck gate RUN` then rewrites gate.json).

COMPARE_VERSION = 2
GATE_VERSION = 2


class CompareFile(TypedDict, total=False):
    """compare.json (compare.compare_evals)."""

    schema_version: int  # COMPARE_VERSION
    kind: str  # "compare"
    alpha: float
    ci_level: float
    n_boot: int
    seed: int
    methods: dict[str, str]  # how each kind of estimate was made, in words
    base: dict[str, Any]
    arms: list[str]
    tasks: dict[str, dict[str, Any]]  # per task: informative, base, arms{arm: {delta, ci, p_value, acc, soft}}
    suites: dict[str, dict[str, Any]]  # per suite: means{acc|soft}{informative|all}{arm: estimate}
    drift: dict[str, dict[str, Any]]  # per arm: ppl_rise, kl_mean (estimates), perplexity tasks, kl
    arm_vs_arm: dict[str, Any]
    seed_groups: dict[str, Any] | None  # --seeds K: per arm, its runs and two-level suite estimates
    summary: dict[str, dict[str, Any]]
    run_id: str
    budget: dict[str, Any]


class GateFile(TypedDict, total=False):
    """gate.json (gate.decide)."""

    schema_version: int  # GATE_VERSION
    kind: str  # "gate"
    verdict: str  # "pass" | "fail" | "inconclusive"
    passed: bool  # verdict == "pass"
    exit_code: int  # 0 pass, 1 fail, 4 inconclusive (after --on-inconclusive)
    policy: dict[str, Any]
    arms: dict[str, dict[str, Any]]  # per arm: verdict, failed, inconclusive
    rules: list[dict[str, Any]]  # rule, arm, task, status, passed, reason, values
    excluded: list[dict[str, Any]]  # uninformative tasks left out, with the reason
    not_checked: list[dict[str, Any]]  # drift rules with no drift measured for the arm (lm-eval outputs)
    power: dict[str, Any]  # per arm and overall: sentence, mde, items_needed
    summary: str


def _read_versioned(path, kind: str, version: int, fix: str) -> dict:
    import json
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise BadInput(f"{p} not found: {fix}")
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"{p}: not valid JSON ({e}): {fix}") from None
    check_versioned(obj, kind, version, str(p), fix)
    return obj


CURVE_VERSION = 1
"""runs/<id>/curves/<arm>.json (train/signals.py writes and reads it; report/curves.py reads it as JSON)."""


def check_versioned(obj: Any, kind: str, version: int, where: str, fix: str) -> dict:
    if not isinstance(obj, dict):
        raise BadInput(f"{where}: not a forgetcheck {kind} file (expected a JSON object)")
    if obj.get("kind") not in (None, kind):
        raise BadInput(f"{where}: is a '{obj.get('kind')}' file, expected '{kind}'")
    v = obj.get("schema_version")
    if not isinstance(v, int):
        raise BadInput(f"{where}: no schema_version; is this a forgetcheck {kind} file?")
    if v > version:
        raise BadInput(f"{where}: schema_version {v} is newer than this forgetcheck reads ({version}): "
                       f"upgrade forgetcheck")
    if v < version:
        raise BadInput(f"{where}: schema_version {v} is an older {kind} format (this forgetcheck reads {version}): "
                       f"{fix}")
    return obj


def read_compare(path) -> CompareFile:
    return _read_versioned(path, "compare", COMPARE_VERSION,
                           "recompute it with `forgetcheck compare <run directory>`")  # type: ignore[return-value]


def read_gate(path) -> GateFile:
    return _read_versioned(path, "gate", GATE_VERSION,
                           "recompute it with `forgetcheck gate <run directory>`")  # type: ignore[return-value]


def is_current(path, kind: str) -> bool:
    """Does `path` hold a `kind` file of the version this forgetcheck writes (False: absent or older)?"""
    import json
    from pathlib import Path

    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    want = COMPARE_VERSION if kind == "compare" else GATE_VERSION
    return isinstance(obj, dict) and obj.get("schema_version") == want and obj.get("kind") in (None, kind)


def checked_compare(obj: dict) -> dict:
    """A compare result about to be written: the version and kind this module reads (rundir writes it)."""
    check_versioned(obj, "compare", COMPARE_VERSION, "compare result", "internal error")
    return obj


def checked_gate(obj: dict) -> dict:
    """A gate result about to be written: the version and kind this module reads (rundir writes it)."""
    check_versioned(obj, "gate", GATE_VERSION, "gate result", "internal error")
    return obj
# ---- typed readers and writers: config.json, manifest.json, train/<arm>.json, eval/<model>.json ----------

class ManifestFile(TypedDict, total=False):
    """manifest.json: how the run was made (merged into by each stage: `update_manifest`)."""

    schema_version: int
    kind: str  # "manifest"
    created: str  # ISO time, UTC
    versions: dict[str, str | None]  # tracked package versions
    git: str | None
    run_id: str
    device: str
    seed: int
    model: dict[str, Any]  # the resolved --base (models.ModelRef)
    timings: dict[str, float | list[float]]  # wall seconds per stage; run_sessions: one per session of `run`


REQUIRED = {
    "config": ("arms", "eval", "gate"),  # `run` and `check` both write these
    "manifest": ("versions", "timings"),
    "train": ("arm", "tokens_seen", "budget_tokens", "optimizer_steps", "loss_curve", "memory", "config",
              "checkpoint"),
    "eval": ("model", "tasks"),
}
WRITTEN_BY = {"config": "forgetcheck run", "manifest": "forgetcheck run", "train": "forgetcheck train",
              "eval": "forgetcheck eval"}


def _typed(obj: Any, kind: str, path: Path) -> dict:
    doc = require(obj, kind, str(path))
    missing = [k for k in REQUIRED[kind] if k not in doc]
    if missing:
        raise BadInput(f"{path}: {kind} file without {', '.join(missing)}: written by another forgetcheck version "
                       f"or edited; re-run `{WRITTEN_BY[kind]}` to write it again")
    return doc


def _read(kind: str, path: Path) -> dict:
    return _typed(read_json(path), kind, Path(path))


def _write(kind: str, path: Path, doc: dict) -> dict:
    """Write a `kind` file (schema_version and kind added, required keys checked); returns what was written."""
    full = _typed({"schema_version": SCHEMA_VERSION, "kind": kind, **doc}, kind, Path(path))
    atomic_write_json(path, full)
    return full


def read_run_config(path: Path) -> RunConfig:
    """config.json as the RunConfig it records (`read_config_doc` for the `resolved` block too)."""
    return from_dict(read_config_doc(path), Path(path))


def read_config_doc(path: Path) -> dict:
    return _read("config", path)


def write_config(path: Path, cfg: RunConfig, resolved: dict) -> None:
    _write("config", path, {**to_dict(cfg), "resolved": resolved})


def read_manifest(path: Path) -> ManifestFile:
    return _read("manifest", path)  # type: ignore[return-value]


def read_train(path: Path) -> TrainFile:
    return _read("train", path)  # type: ignore[return-value]


def write_train(path: Path, record: TrainFile) -> TrainFile:
    return _write("train", path, record)  # type: ignore[return-value,arg-type]


def read_eval(path: Path) -> EvalFile:
    return _read("eval", path)  # type: ignore[return-value]


def write_eval(path: Path, doc: EvalFile) -> EvalFile:
    return _write("eval", path, doc)  # type: ignore[return-value,arg-type]


def update_manifest(run: RunDir, **fields: Any) -> dict:
    """Merge `fields` into manifest.json (creating it with versions and git hash), atomically."""
    if run.manifest.exists():
        man = dict(read_manifest(run.manifest))
    else:
        man = {
            "schema_version": SCHEMA_VERSION,
            "kind": "manifest",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": package_versions(),
            "git": git_hash(),
            "timings": {},
        }
    for k, v in fields.items():
        if k == "timings":
            man.setdefault("timings", {}).update(v)
        else:
            man[k] = v
    atomic_write_json(run.manifest, man)
    return man


class StageTimer:
    """`with StageTimer(run, "train_sft"):` records the stage's wall time in manifest.json."""

    def __init__(self, run: RunDir, stage: str):
        self.run, self.stage = run, stage

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            update_manifest(self.run, timings={self.stage: round(time.perf_counter() - self.t0, 3)})
        return False
