"""Pair two sides' lm-eval `--log_samples` outputs (a base and candidates) for `forgetcheck check`.

Pairing: items are matched by lm-eval's own `doc_hash` (sha256 of the document), never by position, so two
runs with different `--limit`s or document orders still pair. Items on one side only are kept in the report
(compare counts them, `pairing.json` lists them), never dropped silently.

Refused, with one line naming the task (the numbers would not measure the model): a task whose resolved
config differs between the two sides (prompt template, few-shot count or sampler, delimiters, metric list,
filters, ...; the `metadata` block, which lm-eval fills with model arguments, and the absolute data-file paths
are not compared: the data is compared item by item through `doc_hash`), a task whose lm-eval version
differs, and a task where the same document was given a different prompt (`prompt_hash`: a chat template or
system instruction on one side only) or a different target.

Pure JSON, like eval/lmeval_outputs.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgetcheck.errors import BadInput
from forgetcheck.eval.lmeval_outputs import LmEvalRun, TaskRun, read_run, task_rows, write_eval
from forgetcheck.rundir import read_json
from forgetcheck.schema import SCHEMA_VERSION

IGNORED_CONFIG_KEYS = ("metadata",)


# ---- checks between the two sides ------------------------------------------------------------------------

def _comparable_config(cfg: dict) -> dict:
    out = {k: v for k, v in cfg.items() if k not in IGNORED_CONFIG_KEYS}
    kwargs = out.get("dataset_kwargs")
    if isinstance(kwargs, dict) and "data_files" in kwargs:
        # where the file lies differs between machines; which documents it holds is checked by doc_hash
        out["dataset_kwargs"] = {k: v for k, v in kwargs.items() if k != "data_files"}
    return out


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                return f"{path}{k}"
            d = _first_difference(a[k], b[k], f"{path}{k}.")
            if d is not None:
                return d
        return None
    return None if a == b else path.rstrip(".") or "(value)"


def _short(v: Any) -> str:
    s = json.dumps(v, ensure_ascii=False, default=str)
    return s if len(s) <= 60 else s[:57] + "..."


def _lookup(d: Any, dotted: str) -> Any:
    for k in dotted.split("."):
        if not isinstance(d, dict) or k not in d:
            return "(absent)"
        d = d[k]
    return d


def check_same_setup(base: TaskRun, cand: TaskRun, cand_label: str) -> None:
    """Refuse (one line naming the task) when the two sides did not run the task the same way."""
    ca, cb = _comparable_config(base.config), _comparable_config(cand.config)
    diff = _first_difference(ca, cb)
    if diff is not None:
        raise BadInput(f"task '{base.name}': the lm-eval task configs differ in '{diff}' (base "
                       f"{_short(_lookup(ca, diff))}, {cand_label} {_short(_lookup(cb, diff))}): evaluate both models "
                       f"with the same task settings (prompt, few-shot, delimiters, metrics) and compare again")
    if base.n_shot != cand.n_shot:
        raise BadInput(f"task '{base.name}': few-shot counts differ (base {base.n_shot}, {cand_label} "
                       f"{cand.n_shot}): evaluate both models with the same --num_fewshot")
    if base.version != cand.version:
        raise BadInput(f"task '{base.name}': task versions differ (base {base.version}, {cand_label} "
                       f"{cand.version}): evaluate both models with the same lm-eval task version")


def check_same_prompts(task: str, base_rows: list[dict], cand_rows: list[dict], cand_label: str) -> None:
    """The same document must have been asked the same way (prompt) and scored against the same target."""
    b = {r["doc_hash"]: r for r in base_rows}
    for r in cand_rows:
        o = b.get(r["doc_hash"])
        if o is None:
            continue
        for key, what in (("prompt_hash", "prompt"), ("target_hash", "target")):
            if key in r and key in o and r[key] != o[key]:
                raise BadInput(f"task '{task}': document {o['doc_id']} was given a different {what} on the two "
                               f"sides (lm-eval {key} differs; a chat template, system instruction or few-shot "
                               f"context on one side only?): evaluate both models with the same lm_eval prompt "
                               f"flags and compare again")


# ---- the pair ----------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """What a samples check will write: validated in full before anything is created."""

    base: LmEvalRun
    candidates: dict[str, LmEvalRun]
    tasks: list[str]
    rows: dict[str, dict[str, tuple[list[dict], dict]]]  # label -> task -> (records, entry)
    pairing: dict  # task -> candidate -> counts and one-sided items
    skipped: list[str]  # one line per task present on one side only


def plan(base_dir: Path, candidates: dict[str, Path], only_tasks: tuple[str, ...] = ()) -> Plan:
    """Read and check every folder. BadInput (one line) on the first problem; nothing is written."""
    base = read_run(base_dir, "--base-samples")
    cands = {name: read_run(p, f"--candidate-samples {name}") for name, p in candidates.items()}
    skipped: list[str] = []
    tasks = sorted(base.tasks)
    if only_tasks:
        unknown = [t for t in only_tasks if t not in base.tasks]
        if unknown:
            raise BadInput(f"--tasks {','.join(unknown)}: not in the base's lm-eval outputs (it has "
                           f"{', '.join(sorted(base.tasks))})")
        tasks = [t for t in tasks if t in only_tasks]
    for name, c in cands.items():
        for t in sorted(set(c.tasks) - set(base.tasks)):
            if not only_tasks or t in only_tasks:
                skipped.append(f"task {t}: only in {name}'s lm-eval outputs, not the base's: not compared")
        for t in tasks:
            if t not in c.tasks:
                skipped.append(f"task {t}: only in the base's lm-eval outputs, not {name}'s: not compared for {name}")
    common = [t for t in tasks if any(t in c.tasks for c in cands.values())]
    if not common:
        raise BadInput("the base and the candidates' lm-eval outputs share no task: evaluate the same tasks on both")
    rows: dict[str, dict] = {"base": {}}
    pairing: dict[str, dict] = {}
    for t in common:
        rows["base"][t] = task_rows(base.tasks[t], "--base-samples")
        for name, c in cands.items():
            if t not in c.tasks:
                continue
            check_same_setup(base.tasks[t], c.tasks[t], name)
            rows.setdefault(name, {})[t] = task_rows(c.tasks[t], f"--candidate-samples {name}")
            check_same_prompts(t, base.tasks[t].samples, c.tasks[t].samples, name)
            pairing.setdefault(t, {})[name] = pair_counts(rows["base"][t][0], rows[name][t][0])
    return Plan(base=base, candidates=cands, tasks=common, rows=rows, pairing=pairing, skipped=skipped)


def pair_counts(base_rows: list[dict], cand_rows: list[dict]) -> dict:
    """Items paired by doc_hash, and those on one side only (doc_id and doc_hash of each)."""
    b = {r["doc_hash"]: r["doc_id"] for r in base_rows}
    c = {r["doc_hash"]: r["doc_id"] for r in cand_rows}
    base_only = sorted((b[h], h) for h in set(b) - set(c))
    cand_only = sorted((c[h], h) for h in set(c) - set(b))
    return {"base": len(base_rows), "candidate": len(cand_rows), "paired": len(set(b) & set(c)),
            "base_only": [{"doc_id": i, "doc_hash": h} for i, h in base_only],
            "candidate_only": [{"doc_id": i, "doc_hash": h} for i, h in cand_only]}


def write_pairing(p: Plan, eval_path) -> dict:
    """Write eval files for the base and every candidate (`eval_path(label)` gives each file's path) and
    return the pairing block (also written by the caller as pairing.json)."""
    write_eval(p.base, [t for t in p.tasks], eval_path("base"), "base", "--base-samples", p.rows["base"])
    for name, c in p.candidates.items():
        tasks = [t for t in p.tasks if t in p.rows.get(name, {})]
        write_eval(c, tasks, eval_path(name), name, f"--candidate-samples {name}", p.rows[name])
    return {"schema_version": SCHEMA_VERSION, "kind": "pairing", "key": "doc_hash (lm-eval)",
            "base": {"folder": str(p.base.folder), "model": p.base.model["name"]},
            "candidates": {n: {"folder": str(c.folder), "model": c.model["name"]} for n, c in p.candidates.items()},
            "tasks": p.pairing, "not_compared": p.skipped}


def one_sided_lines(pairing: dict) -> list[str]:
    """One line per task and candidate with items on one side only."""
    out = []
    for t, per in sorted((pairing.get("tasks") or {}).items()):
        for name, c in per.items():
            if c["base_only"] or c["candidate_only"]:
                out.append(f"task {t}: {c['paired']} items paired with {name}; {len(c['base_only'])} only in the "
                           f"base's outputs, {len(c['candidate_only'])} only in {name}'s (not in the paired diff)")
    return out + list(pairing.get("not_compared") or [])


def load_pairing(path: Path) -> dict | None:
    return read_json(path) if Path(path).is_file() else None
