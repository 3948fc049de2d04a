"""Release history for `forgetcheck check --previous runs/<id>`: the previous release beside the new candidates.

The previous release is one candidate of an earlier check (or an arm of an earlier run). Its eval file and
per-item records are copied into the new run (`history/previous.json`, `history/samples/previous/`), so the run
stays self-contained, and each new candidate is compared against it with compare's own paired statistics
(`compare.compare_evals`, the previous release in the place of the base). The result is `history.json`; the
report shows it as "Against the previous release", so a regression since the last release shows even when the
candidate is still within the margin against the base. The gate is unchanged: it gates against the base.

Pure JSON (never imports torch).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from forgetcheck.errors import BadInput
from forgetcheck.rundir import RunDir, atomic_write_json, confined, confined_file, read_json
from forgetcheck.schema import (
    SCHEMA_VERSION,
    compare_doc,
    gate_doc,
    read_config,
    read_eval,
    read_history,
    require,
)

LABEL = "previous"
HISTORY_FILE = "history.json"


@dataclass(frozen=True)
class Previous:
    run: Path  # the earlier run folder
    arm: str  # the released candidate's arm name there
    eval_file: Path

    def describe(self) -> dict:
        return {"run": str(self.run), "run_id": self.run.name, "arm": self.arm, "eval": str(self.eval_file)}


def _passed(arm: dict) -> bool:
    """Did the arm pass its gate (gate.json arms.<arm>; an older gate.json says only `passed`)?"""
    if arm["verdict"] is not None:
        return str(arm["verdict"]).lower() == "pass"
    return bool(arm["passed"])


def resolve_previous(value: str) -> Previous:
    """`runs/<id>` (its one candidate, or the one that passed its gate) or `runs/<id>/eval/<arm>.json`."""
    p = Path(value)
    if p.is_file():
        if p.suffix != ".json":
            raise BadInput(f"--previous {value}: give a run folder (runs/<id>) or its eval/<arm>.json")
        doc = read_json(p)
        require(doc, "eval", str(p))
        if p.stem == "base":
            raise BadInput(f"--previous {value}: that is the base's evaluation; give the released candidate's "
                           f"eval/<arm>.json")
        run = p.parent.parent if p.parent.name == "eval" else p.parent
        return Previous(run, p.stem, p)
    run = RunDir.existing(p, flag="--previous", what="runs/<id> of the last released check")
    arms = sorted(e.stem for e in (p / "eval").glob("*.json") if e.stem != "base")
    if not arms:
        raise BadInput(f"--previous {value}: no candidate evaluation in {p / 'eval'}; give the folder of a "
                       f"finished `forgetcheck check` or `run`")
    if len(arms) == 1:
        return Previous(p, arms[0], run.eval_json(arms[0]))
    gated = run.gate.exists()
    gate = gate_doc(read_json(run.gate) if gated else {})  # any version: only whether each arm passed is read
    passed = [a for a in arms if a in gate["arms"] and _passed(gate["arms"][a])]
    if len(passed) == 1:
        return Previous(p, passed[0], run.eval_json(passed[0]))
    raise BadInput(f"--previous {value}: it holds {len(arms)} candidates ({', '.join(arms)})"
                   f"{' and ' + str(len(passed)) + ' passed its gate' if gated else ''}: name the released one as "
                   f"--previous {p / 'eval' / (arms[0] + '.json')}")


def copy_previous(run: RunDir, prev: Previous) -> Path:
    """Copy the previous release's eval file and per-item records into `run/history/`. Returns the new file."""
    typed = read_eval(prev.eval_file)
    doc = read_json(prev.eval_file)  # copied as written, beside the samples' new paths
    dest = run.root / "history" / f"{LABEL}.json"
    where = f"--previous {prev.eval_file}"
    fix = "give the eval file forgetcheck wrote for the previous release (runs/<id>/eval/<arm>.json)"
    copies = {}  # every path checked before anything is copied: task names and samples paths come from the file
    for name, task in typed["tasks"].items():
        rel = task["samples"]
        src = confined(prev.eval_file.parent, rel, f"{where}: tasks.{name}.samples", fix=fix) if rel else None
        if src is not None and src.is_file():
            copies[name] = src, confined_file(dest.parent, ("samples", LABEL), name, ".jsonl", f"{where}: task", fix)
    tasks = {}
    for name in typed["tasks"]:
        entry = dict(doc["tasks"][name])
        if name in copies:
            src, target = copies[name]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
            entry["samples"] = str(target.relative_to(dest.parent))
        else:
            entry.pop("samples", None)
        tasks[name] = entry
    model = dict(typed["model"] or {})
    model["released_as"] = f"{prev.run.name}/{prev.arm}"
    atomic_write_json(dest, {**doc, "model": model, "tasks": tasks, "drift": {}})
    return dest


def write_history(run: RunDir, prev: Previous, *, alpha: float = 0.05, n_boot: int = 2000, seed: int = 0) -> dict:
    """Compare every candidate of `run` against the previous release; write and return history.json."""
    from forgetcheck.verdict.compare import compare_evals

    prev_file = copy_previous(run, prev)
    arms = [p.stem for p in sorted((run.root / "eval").glob("*.json")) if p.stem != "base"]
    planned = (read_config(run.config)["arms"] or []) if run.config.exists() else []
    order = [a for a in planned if a in arms] + [a for a in arms if a not in planned]
    result = compare_evals(prev_file, {a: run.eval_json(a) for a in order}, alpha=alpha, n_boot=n_boot, seed=seed)
    doc = {"schema_version": SCHEMA_VERSION, "kind": "history", "previous": prev.describe(),
           "eval": str(prev_file.relative_to(run.root)), "compare": result}
    atomic_write_json(run.root / HISTORY_FILE, doc)
    return doc


def summary_lines(hist: dict) -> list[str]:
    """One line per candidate: retention mean against the previous release, and its significant task drops."""
    c = compare_doc(hist["compare"])
    prev = hist["previous"]
    out = []
    for arm in c["arms"]:
        ret = c["suites"]["retention"]["arms"][arm]
        drops = [n for n, t in sorted(c["tasks"].items())
                 if arm in t["arms"] and t["arms"][arm]["significant"] and (t["arms"][arm]["delta"] or 0) < 0]
        mean = "no retention mean" if not ret else f"retention mean {ret['delta']:+.2f} points"
        out.append(f"{arm} vs previous release {prev['run_id']}/{prev['arm']}: {mean}; "
                   + (f"significant drops on {', '.join(drops)}" if drops else "no significant task drop"))
    return out


def view(run: RunDir) -> dict | None:
    """What the report shows of history.json (None when the run has none)."""
    path = run.root / HISTORY_FILE
    if not path.is_file():
        return None
    hist = read_history(path)
    c = hist["compare"]
    arms = list(c["arms"])
    rows = []
    for name, t in sorted(c["tasks"].items(), key=lambda kv: (kv[1]["suite"] != "retention",
                                                             kv[1]["unit"] != "points", kv[0])):
        for arm, a in t["arms"].items():
            sig = bool(a["significant"])
            d = a["delta"]
            rows.append({"task": name, "suite": t["suite"], "metric": t["metric"], "unit": t["unit"],
                         "arm": arm, "previous": t["base"]["score_paired"],
                         "score": a["score"], "delta": d, "ci": a["ci"], "p_holm": a["p_holm"],
                         "n_paired": a["n_paired"], "drop": sig and d is not None and d < 0,
                         "gain": sig and d is not None and d > 0})
    means = []
    for suite, s in sorted(c["suites"].items()):
        for arm in arms:
            m = s["arms"][arm]
            if m:
                means.append({"suite": suite, "arm": arm, **m})
    return {"previous": hist["previous"], "rows": rows, "means": means, "arms": arms,
            "alpha": c["alpha"], "ci_level": c["ci_level"], "lines": summary_lines(hist)}
