"""Typed schema of every JSON file in the run folder (docs/design.md, "The run folder"), and typed readers
and writers for them.

Each file carries `schema_version` and `kind`; a reader refuses a version it does not know or a file missing
a key it needs, naming the file and the fix, so a renamed key is an error rather than a blank in the report.
This module imports nothing heavy: compare, report and gate use it on JSON alone.
"""

from __future__ import annotations

import copy
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypedDict

from forgetcheck.config import RunConfig, from_dict, to_dict
from forgetcheck.errors import BadInput
from forgetcheck.rundir import RunDir, atomic_write_json, git_hash, package_versions, read_json, read_jsonl

SCHEMA_VERSION = 1
LMEVAL_MODEL_KIND = "lm-eval samples"  # an eval file's model.kind when it was read from lm-eval --log_samples outputs
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
    screen: ScreenItems | None  # a base's screen items of the task (None: none scored, or an older file)
    looks: TaskLooks | None  # a sequential evaluation's looks at the task (None: a fixed --limit)


class TaskLooks(TypedDict):
    """eval/<model>.json tasks.<task>.looks (`--until-decided`, eval/runner.Looks): each row of the task's samples
    file records the `look` that added it."""

    sizes: list[int]  # items per task planned at each look; the last is the cap
    items: list[int]  # new items of each look this model was scored on
    cap_items: int  # items of the task at the cap
    cap_units: int  # independent units (clusters, else items) at the cap: what the gate's bets are tuned for


class ScreenItems(TypedDict):
    """eval/base.json tasks.<task>.screen: items of the task beyond the compared ones, scored for the base only
    (retention multiple-choice tasks, `--screen-items`): compare decides on them alone whether the task is
    informative, and never pairs them with another model."""

    samples: str | None  # their per-item JSONL (samples/<label>/screen/<task>.jsonl), relative to the eval JSON
    n: int | None
    metrics: dict[str, MetricValue]


class EvalFile(TypedDict, total=False):
    """eval/<model>.json. Per-item lines in eval/samples/<model>/<task>.jsonl:
    multiple choice: {doc_id, doc_hash, target, loglikelihoods: [...], correct: bool, metrics: {acc, acc_norm}}
    perplexity:      {doc_id, doc_hash, loglikelihood, words, bytes, tokens}
    """

    schema_version: int
    kind: str  # "eval"
    model: dict[str, Any]  # name, path, content_hash, random_weights
    limit: int | None
    screen_items: int | None  # a base's screen items asked per retention MC task (0: none; None: not a base, or older)
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

COMPARE_VERSION = 3  # 3: t-based intervals (df), per-unit soft changes for the PASS bound, unavailable means
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
    obj = read_json(Path(path), fix=fix)
    check_versioned(obj, kind, version, str(path), fix)
    return obj


CURVE_VERSION = 1
"""runs/<id>/curves/<arm>.json (train/signals.py writes and reads it; report/curves.py reads it: `read_curve`)."""


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


COMPARE_FIX = "recompute it with `forgetcheck compare <run directory>`"
GATE_FIX = "recompute it with `forgetcheck gate <run directory>`"
COMPARE_FIELDS = {"arms": list, "tasks": dict, "suites": dict}


def read_compare(path) -> CompareFile:
    """compare.json, checked (a compare file of the version this forgetcheck writes, with its fields) and
    typed: every field present (`compare_doc`)."""
    path = Path(path)
    obj = _read_versioned(path, "compare", COMPARE_VERSION, COMPARE_FIX)
    for key, typ in COMPARE_FIELDS.items():
        if not isinstance(obj.get(key), typ):
            raise BadInput(f"{path}: '{key}' is missing or not a JSON {'list' if typ is list else 'object'}: the "
                           f"file is damaged or not forgetcheck's; re-run `forgetcheck compare`")
    return compare_doc(obj)


def write_compare(path: Path, obj: dict) -> None:
    """Write a compare result (compare.compare_run) as compare.json, after checking its version and kind."""
    check_versioned(obj, "compare", COMPARE_VERSION, "compare result", "internal error")
    atomic_write_json(path, obj)


def read_gate(path) -> GateFile:
    """gate.json, checked and typed: every field present (`gate_doc`)."""
    return gate_doc(_read_versioned(path, "gate", GATE_VERSION, GATE_FIX))


def write_gate(path: Path, obj: dict) -> None:
    """Write a gate result (gate.decide) as gate.json, after checking its version and kind."""
    check_versioned(obj, "gate", GATE_VERSION, "gate result", "internal error")
    atomic_write_json(path, obj)


# ---- typed views: every field a reader (verdict/, report/) uses, present with its default -------------------
#
# A run file omits a key its writer had nothing for (no soft accuracy for a perplexity task, no `significant`
# without a test). The `*_doc` functions below return a copy with every such key filled in with the value its
# absence means, so code reads fields directly; the files themselves are written unchanged.


def _filled(obj: Any, defaults: dict) -> dict:
    """A copy of `obj` (None: empty) with every key of `defaults` present, absent ones set to a fresh copy of
    their default; the keys `obj` has keep their order and values."""
    out = dict(obj or {})
    for key, value in defaults.items():
        if key not in out:
            out[key] = copy.deepcopy(value)
    return out


class ItemRecord(TypedDict):
    """One line of eval/samples/<model>/<task>.jsonl (`correct` and the perplexity sums only where written)."""

    doc_id: Any
    doc_hash: str | None
    target: int | None
    loglikelihoods: list | None
    words: float | None
    bytes: float | None
    metrics: dict[str, float | None]
    chosen: dict[str, int]  # the choice each metric scored (acc_norm: length-normalised)
    choices: list | None
    cluster: Any
    look: int | None  # the sequential look that added the item (`--until-decided`); None: a fixed --limit
    doc: Any  # the question, in whichever of these keys the record carries it
    prompt: Any
    text: Any
    question: Any
    context: Any
    arguments: Any


ITEM_TEXT_KEYS = ("doc", "prompt", "text", "question", "context", "arguments")
ITEM_DEFAULTS = {"doc_id": None, "doc_hash": None, "target": None, "loglikelihoods": None, "words": None,
                 "bytes": None, "metrics": {}, "chosen": {}, "choices": None, "cluster": None, "look": None,
                 **dict.fromkeys(ITEM_TEXT_KEYS)}


def item_doc(row: dict) -> ItemRecord:
    return _filled(row, ITEM_DEFAULTS)  # type: ignore[return-value]


def read_items(path: Path) -> list[ItemRecord]:
    """A task's per-item records, typed."""
    return [item_doc(row) for row in read_jsonl(path)]


class EvalDrift(TypedDict):
    """eval/<model>.json `drift`: the drift text's perplexity, its KL block and per-block values."""

    perplexity: float | None
    text: dict[str, Any]  # source, documents, tokens_scored
    kl: dict[str, Any] | None
    blocks: dict[str, list | None]  # per block: document (id), positions, nll, kl (older files: no document)


def eval_drift_doc(obj: Any) -> EvalDrift:
    doc = _filled(obj, {"perplexity": None, "text": {}, "kl": None, "blocks": {}})
    doc["text"] = _filled(doc["text"], {"source": None, "tokens_scored": None})
    doc["blocks"] = _filled(doc["blocks"], {"document": None, "positions": None, "nll": None, "kl": None})
    return doc  # type: ignore[return-value]


TASK_RESULT_DEFAULTS = {"suite": "retention", "kind": None, "primary_metric": None, "metrics": {}, "n": None,
                        "chance": None, "samples": None, "screen": None, "looks": None}


def eval_doc(obj: Any) -> EvalFile:
    """An eval file with every field (and every task's) present."""
    doc = _filled(obj, {"model": {}, "limit": None, "screen_items": None, "backend": None, "tasks": {}, "skipped": {},
                        "missing": {}, "drift": {}})
    doc["tasks"] = {name: _metric_entries(_filled(t, TASK_RESULT_DEFAULTS)) for name, t in (doc["tasks"] or {}).items()}
    for t in doc["tasks"].values():
        if t["screen"] is not None:
            t["screen"] = _metric_entries(_filled(t["screen"], {"samples": None, "n": None, "metrics": {}}))
    doc["missing"] = {name: _filled(m, {"suite": None, "why": None}) for name, m in (doc["missing"] or {}).items()}
    doc["skipped"] = doc["skipped"] or {}
    doc["drift"] = eval_drift_doc(doc["drift"])
    return doc  # type: ignore[return-value]


def _metric_entries(task: dict) -> dict:
    task["metrics"] = {m: _filled(v, {"value": None, "stderr": None, "higher_is_better": None})
                       for m, v in (task["metrics"] or {}).items()}
    return task


class TrainMemory(TypedDict):
    planned: dict[str, float]  # bytes per component, and `total`
    measured_peak_bytes: int | None
    method: str | None


def train_doc(obj: Any) -> TrainFile:
    """A train file with every field the verdict and the report read present."""
    doc = _filled(obj, {"tokens_seen": {}, "budget_tokens": None, "optimizer_steps": None, "planned_steps": None,
                        "stopped_early": None, "loss_curve": [], "memory": {}, "config": {}, "tokens_per_s": None})
    doc["tokens_seen"] = _filled(doc["tokens_seen"], {"forward": None, "padding": None, "label": None})
    doc["memory"] = _filled(doc["memory"], {"planned": {}, "measured_peak_bytes": None, "method": None})
    doc["memory"]["planned"] = _filled(doc["memory"]["planned"], {"total": None})
    doc["config"] = _filled(doc["config"], {"seq_len": None})
    if doc["stopped_early"]:
        doc["stopped_early"] = _filled(doc["stopped_early"], {"step": None, "planned_steps": None, "reason": None})
    return doc  # type: ignore[return-value]


def read_curve(path: Path) -> dict:
    """curves/<arm>.json, checked and typed (`curve_doc`)."""
    return curve_doc(check_versioned(read_json(path), "curve", CURVE_VERSION, str(path),
                                     "re-run training with --eval-every to write it again"))


CURVE_SIGNALS = ("train_loss", "kl_general", "kl_domain", "bpb_general", "bpb_domain", "soft_acc")


def curve_doc(obj: Any) -> dict:
    """A curve file with `base`, `points` (every signal, None where not measured) and `meta` (schedule sizes,
    overhead, forecast of every signal) present."""
    doc = _filled(obj, {"base": {}, "points": [], "meta": {}})
    doc["base"] = _filled(doc["base"], dict.fromkeys(CURVE_SIGNALS))
    doc["points"] = [_filled(point, dict.fromkeys(CURVE_SIGNALS)) for point in doc["points"] or []]
    meta = doc["meta"] = _filled(doc["meta"], {"forecast": {}, "overhead": {}, "sizes": {}, "stopped_early": None})
    meta["overhead"] = _filled(meta["overhead"], {"fraction": None, "train_s": 0})
    meta["sizes"] = _filled(meta["sizes"], {"n_items": None, "n_tokens": None, "predicted_fraction": 0})
    if meta["stopped_early"]:
        meta["stopped_early"] = _filled(meta["stopped_early"], {"reason": None})
    fc = meta["forecast"] = _filled(meta["forecast"], {"signals": {}, "made_at_tokens": None, "at_tokens": None,
                                                       "default": "power_law"})
    fc["signals"] = _filled({name: _forecast_signal(e) for name, e in (fc["signals"] or {}).items()},
                            {name: _forecast_signal(None) for name in CURVE_SIGNALS})
    return doc


FORECAST_MODELS = ("power_law", "power_law_tokens", "loss_linear", "saturating", "kl_mapped", "forms")
"""The forecasts a curve file keeps per signal (train/curve.py), by key: the laws on the learning-rate integral,
the power law on tokens beside it, and the forms combined (train/forecast.py's `combine_forms`); the
forecast's `default` names the one the stop and the report read."""


def _forecast_signal(entry: Any) -> dict:
    sig = _filled(entry, {"measured": None, "note": None, **dict.fromkeys(FORECAST_MODELS)})
    for model in FORECAST_MODELS:
        if sig[model]:
            sig[model] = _filled(sig[model], {"predicted": None, "lo": None, "hi": None, "inside": None,
                                              "reason": None, "axis": "tokens"})
    return sig


# compare.json: the blocks below are what compare.compare_evals writes; a key it leaves out gets the value its
# absence means.

COMPARE_ARM_DEFAULTS = {"score": None, "n": None, "delta": None, "ci": None, "p_value": None, "test": None,
                        "n_paired": 0, "source": None, "acc": None, "soft": None, "soft_score": None,
                        "estimate": None, "significant": False, "p_holm": None, "holm_family": None, "flips": {},
                        "examples": {}}
COMPARE_BASE_DEFAULTS = {"score": None, "n": None, "soft_score": None}
INFORMATIVE_DEFAULT = {"value": True, "p_value": None, "reason": None, "screen": None, "separate": None,
                       "items": None, "note": None}
"""compare.json tasks.<task>.informative: the test's outcome, and which base items it ran on: `screen` of them,
`separate` (true: items never compared with an arm; false: the compared items themselves, with the `note`
saying why), `items` naming them ("screen": the base's screen items; "unpaired": base items no arm has;
"compared": the compared items); None in a file written before screens were recorded, or where no test ran."""
MEAN_DEFAULTS = {"n_tasks": None, "tasks": [], "base_mean": None, "arm_mean": None, "delta": None, "ci": None,
                 "p_value": None, "se": None, "df": None, "significant": False, "unavailable": None}
ESTIMATE_DEFAULTS = {"clusters": None, "df": None, "skew": None}
SOFT_DEFAULTS = {**ESTIMATE_DEFAULTS, "unit_deltas": None, "looks": None, "look_items": None, "plan_units": None}
"""compare.json soft blocks: `unit_deltas` (each independent unit's change, in points); from a sequential evaluation
also `looks` (units of each look, in the order of `unit_deltas`), `look_items` (items of each look) and
`plan_units` (units at the cap, which the gate's bets are tuned for); None otherwise."""
LEARNING_SIGNALS = {
    "recall": ("recall gain", "points",
               "the gain of the mean score on questions about facts every arm trained on (fc_med_recall): what the "
               "budget taught, on the same facts for every arm"),
    "transfer": ("domain transfer gain", "points",
                 "the gain of the domain suite's mean score on held-out facts and exams no arm saw: whether what was "
                 "learned carries over"),
    "domain_bpb": ("domain text gain", "bits per byte",
                   "the fall of bits per byte on held-out domain text (the domain suite's perplexity task)"),
}
"""The learning signals of the learning-vs-forgetting summary: (label, unit, what it measures)."""

SUMMARY_DEFAULTS = {"forgetting": None, "forgetting_ci": None, "forgetting_significant": None, "learning": None,
                    "learning_ci": None, "learning_significant": None, "kl_mean": None, "metric": "acc",
                    "learning_signal": "transfer", "signals": {}}
DRIFT_DEFAULTS = {"perplexity": {}, "kl": None, "text_perplexity": None, "ppl_rise": None, "kl_mean": None,
                  "notes": []}
MEAN_METRICS, MEAN_OVER = ("acc", "soft"), ("informative", "all")


def compare_arm_doc(obj: Any) -> dict:
    """One arm's result on one task (compare.json tasks.<task>.arms.<arm>)."""
    arm = _filled(obj, COMPARE_ARM_DEFAULTS)
    for key, defaults in (("acc", ESTIMATE_DEFAULTS), ("soft", SOFT_DEFAULTS), ("estimate", ESTIMATE_DEFAULTS)):
        if arm[key] is not None:
            arm[key] = _filled(arm[key], defaults)
    arm["examples"] = _filled(arm["examples"], {"right_to_wrong": [], "wrong_to_right": []})
    return arm


def compare_task_doc(obj: Any) -> dict:
    """One task of compare.json: its base (`score_paired` is the score on the items paired with the arms, the
    whole score when nothing was paired), arms, informative test and why an arm was not scored."""
    task = _filled(obj, {"suite": "retention", "kind": None, "metric": None, "unit": None, "scale": None,
                         "higher_is_better": True, "chance": None, "base": {}, "arms": {}, "notes": [],
                         "informative": INFORMATIVE_DEFAULT, "unscored": {}})
    base = task["base"] = _filled(task["base"], COMPARE_BASE_DEFAULTS)
    if "score_paired" not in base:
        base["score_paired"] = base["score"]
    task["informative"] = _filled(task["informative"], INFORMATIVE_DEFAULT)
    task["arms"] = {arm: compare_arm_doc(a) for arm, a in task["arms"].items()}
    return task


NOT_EVALUATED = "task not evaluated"


def _unscored_reasons(task: dict, arms: list[str]) -> dict:
    """Why each of `arms` the task has no result for was not scored ("task not evaluated" when unrecorded)."""
    return _filled(task["unscored"], {arm: NOT_EVALUATED for arm in arms if arm not in task["arms"]})


def mean_doc(obj: Any) -> dict | None:
    """A suite mean of one arm (None: no task of the suite had a delta)."""
    return None if obj is None else _filled(obj, MEAN_DEFAULTS)


def suite_doc(obj: Any, arms: list[str]) -> dict:
    """One suite of compare.json: its means per metric and task set, one (possibly None) per arm."""
    suite = _filled(obj, {"tasks": [], "mean_over": [], "uninformative": [], "means": {}, "arms": {}})
    means = {m: _filled(suite["means"].get(m), dict.fromkeys(MEAN_OVER, {})) for m in MEAN_METRICS}
    suite["means"] = {m: {over: _filled({a: mean_doc(v) for a, v in means[m][over].items()}, dict.fromkeys(arms))
                          for over in MEAN_OVER} for m in MEAN_METRICS}
    suite["arms"] = _filled({a: mean_doc(v) for a, v in suite["arms"].items()}, dict.fromkeys(arms))
    return suite


def drift_doc(obj: Any) -> dict:
    """One arm's general-text drift in compare.json."""
    drift = _filled(obj, DRIFT_DEFAULTS)
    for key in ("ppl_rise", "kl_mean"):
        if drift[key] is not None:
            drift[key] = _filled(drift[key], ESTIMATE_DEFAULTS)
    drift["kl"] = _filled(drift["kl"], {"mean": None}) if drift["kl"] is not None else None
    return drift


def _arm_pair_doc(obj: Any) -> dict:
    """One pair of arms on the same items: per suite (retention, domain) an estimate per metric, or None."""
    pair = _filled(obj, {"suites": {}, "note": ""})
    pair["suites"] = _filled({s: _filled(e, dict.fromkeys(MEAN_METRICS)) for s, e in pair["suites"].items()},
                             {s: dict.fromkeys(MEAN_METRICS) for s in ("retention", "domain")})
    return pair


def compare_doc(obj: Any) -> CompareFile:
    """A compare result (read from compare.json, or just computed) with every field present, for every task,
    suite (retention and domain), arm and drift block."""
    doc = _filled(obj, {"alpha": 0.05, "ci_level": 0.95, "arms": [], "base": {}, "tasks": {}, "missing": {},
                        "suites": {}, "drift": {}, "arm_vs_arm": {}, "seed_groups": None, "summary": {},
                        "run_id": None, "budget": {}})
    arms = list(doc["arms"])
    doc["base"] = _filled(doc["base"], {"model": {}, "random_weights": False, "limit": None, "backend": None})
    doc["tasks"] = {name: compare_task_doc(t) for name, t in doc["tasks"].items()}
    for task in doc["tasks"].values():
        task["unscored"] = _unscored_reasons(task, arms)
    doc["missing"] = {name: _filled(m, {"suite": None, "why": None, "models": []}) for name, m in doc["missing"].items()}
    names = list(doc["suites"]) + [name for name in ("retention", "domain") if name not in doc["suites"]]
    doc["suites"] = {name: suite_doc(doc["suites"].get(name), arms) for name in names}
    doc["drift"] = _filled({a: drift_doc(d) for a, d in doc["drift"].items()}, {a: drift_doc(None) for a in arms})
    doc["arm_vs_arm"] = _filled(doc["arm_vs_arm"], {"pairs": []})
    doc["arm_vs_arm"]["pairs"] = [_arm_pair_doc(p) for p in doc["arm_vs_arm"]["pairs"]]
    doc["summary"] = _filled({a: _filled(s, SUMMARY_DEFAULTS) for a, s in doc["summary"].items()},
                             {a: dict(SUMMARY_DEFAULTS) for a in arms})
    doc["budget"] = _filled(doc["budget"], {"arms": {}, "seq_len": None, "matched": None, "reasons": []})
    return doc  # type: ignore[return-value]


def history_doc(obj: Any) -> dict:
    """history.json (`forgetcheck check --previous`): the previous release and the typed comparison against it."""
    doc = _filled(obj, {"previous": {}, "eval": None, "compare": {}})
    doc["previous"] = _filled(doc["previous"], {"run": None, "run_id": None, "arm": None, "eval": None})
    doc["compare"] = compare_doc(doc["compare"])
    return doc


def read_history(path: Path) -> dict:
    """history.json, checked and typed (`history_doc`)."""
    return history_doc(require(read_json(path), "history", str(path)))


GATE_POWER_ARM_DEFAULTS = {"evidence": [], "tasks": {}, "mean": None, "n": None, "mde": None, "items_needed": None,
                           "mean_mde": None, "p_pass_if_unchanged": None}


def gate_power_arm_doc(obj: Any) -> dict:
    """What one arm's run can detect (gate.json power.arms.<arm>)."""
    return _filled(obj, GATE_POWER_ARM_DEFAULTS)


def gate_doc(obj: Any) -> GateFile:
    """A gate result with every field present, for every rule, arm and power statement."""
    doc = _filled(obj, {"verdict": "inconclusive", "passed": False, "exit_code": 4, "exit_note": "", "policy": {},
                        "arms": {}, "rules": [], "excluded": [], "not_checked": [], "power": {}, "missing": [],
                        "summary": ""})
    doc["policy"] = _filled(doc["policy"], {"max_relative_drop": None, "tiers": []})  # absent: written before them
    doc["rules"] = [_filled(r, {"arm": None, "task": None, "values": {}, "tier": "critical"}) for r in doc["rules"]]
    doc["excluded"] = [_filled(e, {"kept": False}) for e in doc["excluded"]]
    doc["arms"] = {a: _filled(v, {"verdict": None, "passed": False, "failed": [], "inconclusive": []})
                   for a, v in doc["arms"].items()}
    power = doc["power"] = _filled(doc["power"], {"arms": {}, "sentence": "", "items_needed": None,
                                                  "p_pass_if_unchanged": None, "fixed_undecided": []})
    power["arms"] = {a: gate_power_arm_doc(p) for a, p in power["arms"].items()}
    return doc  # type: ignore[return-value]


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


def config_doc(obj: Any) -> dict:
    """config.json with the sections the verdict and the report read present (`train`, `eval`, `gate`)."""
    doc = _filled(obj, {"arms": [], "train": {}, "eval": {}, "gate": {}})
    doc["train"] = _filled(doc["train"], {"seq_len": None, "wise_from": "sft"})
    return doc


def read_run_config(path: Path) -> RunConfig:
    """config.json as the RunConfig it records (`read_config_doc` for the `resolved` block too)."""
    return from_dict(read_config_doc(path), Path(path))


def read_config_doc(path: Path) -> dict:
    """config.json as written (checked); `read_config` for the typed view."""
    return _read("config", path)


def read_config(path: Path) -> dict:
    """config.json, checked and typed (`config_doc`)."""
    return config_doc(read_config_doc(path))


def write_config(path: Path, cfg: RunConfig, resolved: dict) -> None:
    _write("config", path, {**to_dict(cfg), "resolved": resolved})


def read_manifest(path: Path) -> ManifestFile:
    """manifest.json, typed: the fields the report shows present."""
    return _filled(_read("manifest", path), {"versions": {}, "timings": {}, "git": None, "device": None,
                                              "created": None})  # type: ignore[return-value]


def read_train(path: Path) -> TrainFile:
    """train/<arm>.json, typed (`train_doc`)."""
    return train_doc(_read("train", path))


def write_train(path: Path, record: TrainFile) -> TrainFile:
    return _write("train", path, record)  # type: ignore[return-value,arg-type]


def read_eval(path: Path) -> EvalFile:
    """eval/<model>.json, typed (`eval_doc`)."""
    return eval_doc(_read("eval", path))


def write_eval(path: Path, doc: EvalFile) -> EvalFile:
    return _write("eval", path, doc)  # type: ignore[return-value,arg-type]


def update_manifest(run: RunDir, **fields: Any) -> dict:
    """Merge `fields` into manifest.json (creating it with versions and git hash), atomically."""
    if run.manifest.exists():
        man = _read("manifest", run.manifest)
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
