"""A run's recall task (`fc_med_recall`): did each arm learn the facts it was trained on?

The domain suite's other tasks ask about held-out terms: *transfer* to facts no arm saw. A small budget teaches the
facts it shows, and a user's first question is whether the model learned its data. So a run also asks multiple-choice
questions about facts that **every** trained arm saw whole within its budget, worded unlike any training text (the
packaged dataset's `recall_mc.jsonl`, data/med.py `recall_items`; no item shares a 13-word sequence with its fact's
training text outside the answer).

Which facts: the rows each arm trains on are rebuilt here by the same packer and settings that feed training
(train/packing.py `build_rows`, seed runs with their own data seed); a unit (a page of facts: one CPT document and the
SFT pairs of the same terms) counts for an arm when every one of its records lies whole inside the arm's rows, and the
recall facts are the units every arm counts. The packer shuffles by unit, so SFT and CPT meet the same units in the
same order and the common units are SFT's (its pairs take about 5x the tokens of CPT's paragraphs per fact).

The run evaluates from its own task folder, `runs/<id>/tasks/` (forgetcheck's rendered tasks and this task, whose
data file lies beside its YAML), so the items are part of the run and the evaluation cache keys them by content.
Every recall item is scored (`all_items`): they are the facts the budget bought, however many. `recall.json` says
how many units and facts each arm trained on whole, and which were asked.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from forgetcheck import config
from forgetcheck.data import domain as dom
from forgetcheck.errors import BadInput
from forgetcheck.eval.suites import RUN_TASK as TASK
from forgetcheck.eval.suites import default_tasks_dir
from forgetcheck.rundir import RunDir, atomic_write_json, atomic_write_jsonl, atomic_write_text
from forgetcheck.train import arms
from forgetcheck.train.packing import build_rows, record_units

SOURCE_FILE = "recall_mc.jsonl"  # in a packaged dataset's folder (data/med.py)
SUITE = "recall"

YAML = """\
# Recall items of this run (written by forgetcheck/train/recall.py): questions about facts that every trained arm
# saw whole within its budget, worded unlike the training text. Every item is scored.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: "{data}"
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  suite: {suite}
  kind: multiple_choice
  chance: 0.25
  primary_metric: acc
  all_items: true
  items: {n}
  source: "{source}"
"""


def tasks_folder(run: RunDir) -> Path:
    return run.root / "tasks"


def wanted(cfg: config.RunConfig) -> bool:
    """Whether the run's evaluation asks for recall: the domain suite, or the task named in --tasks."""
    return TASK in cfg.eval.tasks if cfg.eval.tasks else "domain" in cfg.eval.suites


def prepare(run: RunDir, cfg: config.RunConfig, model_ref, domain) -> tuple[Path | None, str]:
    """Write the run's recall task (once: a resumed run keeps it) and return (the task folder the run evaluates
    from, None for forgetcheck's own; one line for the console)."""
    folder = tasks_folder(run)
    record = run.root / "recall.json"
    if record.exists():
        doc = json.loads(record.read_text())
        _copy_tasks(folder)  # the rendered benchmark YAMLs may have been rebuilt since: the run follows them
        return (folder if doc.get("items") else None), _line(doc)
    doc = plan(cfg, model_ref, domain)
    items = doc.pop("rows")
    if items:
        _copy_tasks(folder)
        data = folder / f"{TASK}.jsonl"
        atomic_write_jsonl(data, items)
        atomic_write_text(folder / f"{TASK}.yaml", YAML.format(
            task=TASK, data=str(data.resolve()).replace('"', '\\"'), suite=SUITE, n=len(items),
            source=f"facts of {domain.name} that every trained arm saw whole within {cfg.train.budget_tokens:,} "
                   f"tokens"))
    atomic_write_json(record, doc)
    return (folder if items else None), _line(doc)


def _line(doc: dict) -> str:
    if not doc.get("items"):
        return f"recall: none ({doc.get('why')})"
    per = ", ".join(f"{a} {v['facts']}" for a, v in doc["arms"].items())
    return (f"recall: {doc['items']} questions on {doc['facts']} facts every arm trained on whole "
            f"(facts seen whole per arm: {per})")


def _copy_tasks(folder: Path) -> None:
    src = default_tasks_dir()
    folder.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith(".") and not f.name.startswith(TASK):
            shutil.copyfile(f, folder / f.name)


def plan(cfg: config.RunConfig, model_ref, domain) -> dict:
    """{items, facts, units, arms: {label: {units, facts}}, why, rows}: the recall questions of this run."""
    labels = [config.seed_run_label(a, i) for a in arms.trained(cfg.arms) for i in range(cfg.train.seeds)]
    source = Path(domain.root) / SOURCE_FILE
    base = {"task": TASK, "items": 0, "facts": 0, "units": [], "arms": {}, "rows": []}
    if not wanted(cfg):
        return {**base, "why": f"the evaluation does not ask for it (the domain suite, or {TASK} in --tasks)"}
    if not source.is_file():
        return {**base, "why": f"--data {cfg.data} has no {SOURCE_FILE} (the packaged datasets have one)"}
    if not labels:
        return {**base, "why": "no arm is trained"}
    from forgetcheck.models.registry import load_tokenizer

    tok = load_tokenizer(model_ref)
    per_label: dict[str, set] = {}
    counts: dict[str, dict] = {}
    done: dict[tuple, tuple[set, int]] = {}
    for label in labels:
        arm, tcfg = config.seed_run_config(label, cfg.train)
        kind = arms.data_kind(arm)
        key = (kind, arm == "replay", tcfg.data_seed)
        if key not in done:
            done[key] = whole_units(arm, tok, getattr(domain, kind), tcfg)
        per_label[label], n_facts = done[key]
        counts[label] = {"units": len(per_label[label]), "facts": n_facts}
    common = set.intersection(*per_label.values())
    rows = [r for r in _read_items(source) if r.get("unit") in common]
    facts = len({r["term_id"] for r in rows})
    why = None if rows else (f"no unit of facts was trained on whole by every arm within {cfg.train.budget_tokens:,} "
                             f"tokens: raise --budget-tokens")
    return {**base, "items": len(rows), "facts": facts, "units": sorted(common, key=str), "arms": counts,
            "why": why, "rows": rows}


def whole_units(arm: str, tok, data_path: Path, cfg: config.TrainConfig) -> tuple[set, int]:
    """(the units whose every record lies whole inside the rows `arm` trains on, the facts they hold): the rows
    rebuilt exactly as training builds them."""
    from forgetcheck.train.loop import optimizer_steps, rows_per_step  # torch: only when a run asks recall

    rows = build_rows(arm, tok, data_path, cfg, optimizer_steps(cfg) * rows_per_step(cfg))
    records = dom.read_cpt(data_path) if arms.data_kind(arm) == "cpt" else dom.read_sft(data_path)
    units = record_units(records)
    if units is None:
        return set(), 0
    size: dict = {}
    for u in units:
        size[u] = size.get(u, 0) + 1
    seen: dict = {}
    for i in rows.whole:
        seen[units[i]] = seen.get(units[i], 0) + 1
    whole = {u for u, n in seen.items() if n == size[u]}
    facts = {t for i, r in enumerate(records) if units[i] in whole
             for t in ([r["term_id"]] if "term_id" in r else r.get("term_ids", []))}
    return whole, len(facts)


def _read_items(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise BadInput(f"{path}:{n}: not valid JSON: rebuild it with `forgetcheck data prepare med "
                                   f"--force`") from None
    return rows
