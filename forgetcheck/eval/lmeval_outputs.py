"""Read the output folders of stock `lm_eval ... --output_path DIR --log_samples` and turn them into
forgetcheck eval files, so compare, report and gate work on them unchanged (eval/pairing.py pairs two sides).

What lm-eval writes (any backend: hf, vllm, an API, ...): `DIR/<model>/results_<date>.json` (aggregate
metrics, each task's resolved `configs`, `n-shot`, `versions`) and, per task, `samples_<task>_<date>.jsonl`
(one line per document and filter: `doc_id`, `doc_hash`, `prompt_hash`, `target_hash`, the responses and the
per-item metric values).

Pure JSON: never imports torch or lm-eval, so CI can gate existing lm-eval outputs on a machine without them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forgetcheck.errors import BadInput
from forgetcheck.eval.metrics import DEFAULT_PRIMARY
from forgetcheck.eval.records import record, task_metrics
from forgetcheck.rundir import atomic_write_json, atomic_write_jsonl, confined_file, safe_name
from forgetcheck.schema import LMEVAL_MODEL_KIND, SCHEMA_VERSION

RESULTS_RE = re.compile(r"^results_(?P<date>.+)\.json$")
SUITES = ("retention", "domain")
"""Config keys that may differ between the two sides: lm-eval writes the model's arguments into `metadata`."""
TASK_NAME_FIX = ("a task name becomes a file name in the run folder, so it must be one (lm-eval's own are): rename "
                 "the task in its YAML and re-run lm_eval")
LABEL_FIX = "name the candidate with --candidate-samples NAME=DIR"


@dataclass
class TaskRun:
    """One task as one lm-eval run saw it."""

    name: str
    config: dict
    results: dict  # results[task]: "acc,none", "acc_stderr,none", ...
    higher_is_better: dict
    n_shot: Any
    version: Any
    samples_file: Path
    samples: list[dict] = field(default_factory=list)


@dataclass
class LmEvalRun:
    """A folder of lm-eval outputs for one model: its tasks (the newest results file wins per task)."""

    folder: Path
    model: dict
    header: dict  # the newest results file's top-level facts (config, versions, chat template, ...)
    tasks: dict[str, TaskRun]


# ---- reading a folder ------------------------------------------------------------------------------------

def _results_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("results_*.json") if RESULTS_RE.match(p.name))


def find_model_folder(path: Path, flag: str) -> Path:
    """The folder holding results_*.json: `path` itself, or its one model subfolder (lm-eval's
    `--output_path DIR` writes `DIR/<model>/`). A results_*.json file stands for its folder."""
    path = Path(path)
    if path.is_file() and RESULTS_RE.match(path.name):
        return path.parent
    if not path.is_dir():
        raise BadInput(f"{flag} {path}: no such folder; give the --output_path folder of an "
                       f"`lm_eval ... --log_samples` run")
    if _results_files(path):
        return path
    subs = sorted(d for d in path.iterdir() if d.is_dir() and _results_files(d))
    if len(subs) == 1:
        return subs[0]
    if len(subs) > 1:
        raise BadInput(f"{flag} {path} holds the outputs of {len(subs)} models ({', '.join(d.name for d in subs)}): "
                       f"give one of these folders")
    raise BadInput(f"{flag} {path}: no results_*.json there or in a subfolder; give the --output_path folder of "
                   f"an `lm_eval ... --log_samples` run")


def _parse(text: bytes, where: str, flag: str) -> Any:
    """One JSON value; any way it is not one (bytes that are not UTF-8, bad syntax, nesting too deep to
    read) is the user's file to fix."""
    try:
        return json.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadInput(f"{flag}: {where} is not UTF-8 text; re-run lm_eval") from None
    except json.JSONDecodeError as e:
        raise BadInput(f"{flag}: {where} is not valid JSON ({e.msg}); re-run lm_eval") from None
    except RecursionError:
        raise BadInput(f"{flag}: {where} nests JSON too deep to read: not an lm-eval output") from None


# Top-level entries of a results file that readers index by task name or key: each must be an object.
RESULTS_OBJECTS = ("results", "configs", "config", "higher_is_better", "n-shot", "versions")


def _load_json(path: Path, flag: str) -> dict:
    obj = _parse(path.read_bytes(), str(path), flag)
    if not isinstance(obj, dict) or not isinstance(obj.get("results"), dict):
        raise BadInput(f"{flag}: {path} is not an lm-eval results file (no 'results' object)")
    for key in RESULTS_OBJECTS:
        if obj.get(key) is not None and not isinstance(obj[key], dict):
            raise BadInput(f"{flag}: {path}: '{key}' must be an object (got {type(obj[key]).__name__}): not an "
                           f"lm-eval results file")
    for task, values in obj["results"].items():
        if not isinstance(values, dict):
            raise BadInput(f"{flag}: {path}: results of '{task}' must be an object (got {type(values).__name__})")
        _check_ranges(values, f"{flag}: {path}: task '{task}'")
    return obj


# Metrics that are fractions of items: a value outside [0, 1] is a damaged or foreign file, not a score.
FRACTION_METRICS = ("acc", "acc_norm", "exact_match")


def _check_ranges(values: dict, where: str) -> None:
    """Refuse a fraction metric outside [0, 1] (or not finite); keys are `metric` or lm-eval's
    `metric,filter`."""
    for key, value in values.items():
        metric = str(key).split(",")[0]
        if metric not in FRACTION_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not 0 <= value <= 1:  # NaN fails this too
            raise BadInput(f"{where}: {key} is {value}, outside [0, 1]: not a score lm-eval writes")


def read_samples_file(path: Path, flag: str) -> list[dict]:
    rows = []
    for lineno, line in enumerate(path.read_bytes().split(b"\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        row = _parse(line, where, flag)
        if not isinstance(row, dict) or "doc_id" not in row or "doc_hash" not in row:
            raise BadInput(f"{flag}: {where} lacks doc_id/doc_hash: not an lm-eval --log_samples file")
        if isinstance(row["doc_id"], bool) or not isinstance(row["doc_id"], int) \
                or not isinstance(row["doc_hash"], str):
            raise BadInput(f"{flag}: {where}: doc_id must be a whole number and doc_hash a string (got "
                           f"{row['doc_id']!r}, {row['doc_hash']!r}): not an lm-eval --log_samples file")
        _check_ranges(row, f"{flag}: {where}")
        rows.append(row)
    return rows


def read_run(path: Path, flag: str) -> LmEvalRun:
    """Read one model's lm-eval outputs. Every task in a results file must have its samples file."""
    folder = find_model_folder(path, flag)
    files = _results_files(folder)
    if Path(path).is_file():
        files = [Path(path)]
    tasks: dict[str, TaskRun] = {}
    header: dict = {}
    for rf in files:  # oldest first: a newer run of a task replaces an older one
        res = _load_json(rf, flag)
        date = RESULTS_RE.match(rf.name).group("date")
        header = res
        for name, cfg in (res.get("configs") or {}).items():
            safe_name(name, f"{flag}: {rf.name}: task", TASK_NAME_FIX)  # before it names any file read or written
            sf = folder / f"samples_{name}_{date}.jsonl"
            if not sf.is_file():
                raise BadInput(f"{flag}: {rf.name} has task '{name}' but no {sf.name} beside it: run lm_eval with "
                               f"--log_samples (per-item results are what makes the diff paired)")
            tasks[name] = TaskRun(name=name, config=cfg if isinstance(cfg, dict) else {},
                                  results=(res.get("results") or {}).get(name) or {},
                                  higher_is_better=(res.get("higher_is_better") or {}).get(name) or {},
                                  n_shot=(res.get("n-shot") or {}).get(name),
                                  version=(res.get("versions") or {}).get(name), samples_file=sf)
    if not tasks:
        raise BadInput(f"{flag} {folder}: its results files list no task")
    cfg = header.get("config") or {}
    model_args = cfg.get("model_args")
    pretrained = None
    if isinstance(model_args, str):
        for part in model_args.split(","):
            k, _, v = part.partition("=")
            if k.strip() == "pretrained":
                pretrained = v.strip()
    elif isinstance(model_args, dict):
        pretrained = model_args.get("pretrained")
    name = header.get("model_name") or pretrained or folder.name
    model = {"name": str(name), "path": pretrained, "kind": LMEVAL_MODEL_KIND,
             "lm_eval_backend": cfg.get("model"), "content_hash": None,
             "random_weights": _random_weights(pretrained), "folder": str(folder)}
    return LmEvalRun(folder=folder, model=model, header=header, tasks=tasks)


def _random_weights(pretrained: str | None) -> bool:
    """A forgetcheck-built model folder says whether its weights are random (tiny-gpt2)."""
    if not pretrained:
        return False
    marker = Path(pretrained) / "forgetcheck.json"
    try:
        return bool(json.loads(marker.read_text()).get("random_weights", False))
    except (OSError, ValueError):
        return False


# ---- lm-eval samples -> forgetcheck eval files -----------------------------------------------------------

def _kind(cfg: dict) -> str:
    out_type = cfg.get("output_type")
    if out_type == "multiple_choice":
        return "multiple_choice"
    if out_type == "loglikelihood_rolling":
        return "perplexity"
    return str(out_type or "unknown")


def _metric_names(task: TaskRun) -> list[str]:
    names = []
    for key in task.results:
        if "," in key and "_stderr," not in key:
            m = key.split(",")[0]
            if m not in names:
                names.append(m)
    return names


def primary_metric(task: TaskRun) -> str:
    """metadata.primary_metric (forgetcheck's tasks say it), else the config's first metric, else the
    default of the output type, as forgetcheck's evaluation chooses it."""
    meta = task.config.get("metadata") or {}
    names = _metric_names(task)
    for m in (meta.get("primary_metric"), meta.get("primary")):
        if m and m in names:
            return m
    for entry in task.config.get("metric_list") or []:
        m = entry.get("metric") if isinstance(entry, dict) else None
        if isinstance(m, str) and m in names:
            return m
    default = DEFAULT_PRIMARY.get(_kind(task.config), "acc")
    if default in names or not names:
        return default
    return names[0]


def _filter_of(task: TaskRun, metric: str) -> str | None:
    """The lm-eval filter whose results carry `metric` ("none" for most tasks)."""
    for key in task.results:
        if key.split(",")[0] == metric and "," in key:
            return key.split(",", 1)[1]
    return None


def _mean_aggregated(task: TaskRun) -> set[str]:
    """Metrics whose task score is the mean of per-item values (so a paired item diff reproduces it)."""
    out = set()
    listed = task.config.get("metric_list")
    if not listed:
        kind = _kind(task.config)
        return {"acc", "acc_norm"} if kind == "multiple_choice" else set()
    for entry in listed:
        if not isinstance(entry, dict):
            continue
        agg = entry.get("aggregation", "mean")
        if agg == "mean" or (isinstance(agg, str) and re.search(r"\bmean\b", agg)):
            out.add(entry.get("metric"))
    return out


def _suite(task: TaskRun) -> str:
    s = (task.config.get("metadata") or {}).get("suite")
    return s if s in SUITES else "retention"


def task_rows(task: TaskRun, flag: str) -> tuple[list[dict], dict]:
    """(per-item records of the primary metric's filter, the eval file's task entry without `samples`)."""
    rows_raw = task.samples or read_samples_file(task.samples_file, flag)
    task.samples = rows_raw
    primary = primary_metric(task)
    flt = _filter_of(task, primary)
    kind = _kind(task.config)
    chosen = [s for s in rows_raw if flt is None or s.get("filter", flt) == flt]
    _check_unique(chosen, task, flag)
    mean_metrics = _mean_aggregated(task)
    records = sorted((_record(s, kind, mean_metrics, primary, task, flag) for s in chosen),
                     key=lambda r: r["doc_id"])
    chance = None
    if kind == "multiple_choice" and chosen:
        meta_chance = (task.config.get("metadata") or {}).get("chance")
        chance = float(meta_chance) if isinstance(meta_chance, (int, float)) else \
            sum(1.0 / max(1, len(r["loglikelihoods"])) for r in records) / len(records)
    entry = {"suite": _suite(task), "kind": kind, "primary_metric": primary, "metrics": task_metrics(task.results, task.higher_is_better, flt),
             "n": len(records), "chance": chance, "filter": flt,
             "lm_eval": {"results_file": str(task.samples_file.parent / task.samples_file.name.replace(
                 f"samples_{task.name}_", "results_").replace(".jsonl", ".json")),
                 "samples_file": str(task.samples_file), "n_shot": task.n_shot, "version": task.version}}
    return records, entry


def _check_unique(rows: list[dict], task: TaskRun, flag: str) -> None:
    """Items pair by doc_hash, so one side may hold each document once (per filter): a document twice would
    be paired twice in compare but once in pairing.json."""
    seen: dict[str, Any] = {}
    for r in rows:
        if r["doc_hash"] in seen:
            raise BadInput(f"{flag}: {task.samples_file}: documents {seen[r['doc_hash']]} and {r['doc_id']} have "
                           f"the same doc_hash: items pair by doc_hash, so each document may appear once; drop the "
                           f"duplicate from the task's dataset and re-run lm_eval")
        seen[r["doc_hash"]] = r["doc_id"]


def _record(sample: dict, kind: str, metric_names: set[str], primary: str, task: TaskRun, flag: str) -> dict:
    """record(), with a sample it cannot read (responses or counts of the wrong type) refused as input."""
    try:
        return record(sample, kind, metric_names=metric_names, primary=primary)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise BadInput(f"{flag}: {task.samples_file}: document {sample.get('doc_id')!r} cannot be read as a "
                       f"{kind} item ({type(e).__name__}: {e}): not an lm-eval --log_samples file") from None


def write_eval(run: LmEvalRun, tasks: list[str], out_file: Path, label: str, flag: str,
               rows_by_task: dict[str, tuple[list[dict], dict]]) -> dict:
    """Write `out_file` (an EvalFile) and `samples/<label>/<task>.jsonl` beside it."""
    out_file = Path(out_file)
    entries = {}
    for name in tasks:
        rows, entry = rows_by_task[name]
        sample_file = confined_file(out_file.parent, ("samples", safe_name(label, flag, LABEL_FIX)), name,
                                    ".jsonl", f"{flag}: task", TASK_NAME_FIX)
        atomic_write_jsonl(sample_file, rows)
        entries[name] = {**entry, "samples": str(sample_file.relative_to(out_file.parent))}
    header = run.header
    doc = {
        "schema_version": SCHEMA_VERSION, "kind": "eval", "model": run.model,
        "config": {"source": "lm-eval --log_samples", "folder": str(run.folder)},
        "limit": (header.get("config") or {}).get("limit"),
        "backend": f"lm-eval {(header.get('config') or {}).get('model') or '?'}",
        "backend_used": [str((header.get("config") or {}).get("model") or "?")],
        "versions": {"lm_eval": header.get("lm_eval_version"), "transformers": header.get("transformers_version")},
        "tasks": entries,
        "drift": {"note": "no KL drift: lm-eval samples hold no next-token distributions"},
        "timings": {},
    }
    atomic_write_json(out_file, doc)
    return doc
