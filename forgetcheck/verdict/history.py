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
from forgetcheck.rundir import RunDir, atomic_write_json, read_json
from forgetcheck.schema import SCHEMA_VERSION, require

LABEL = "previous"
HISTORY_FILE = "history.json"


@dataclass(frozen=True)
class Previous:
    run: Path  # the earlier run folder
    arm: str  # the released candidate's arm name there
    eval_file: Path

    def describe(self) -> dict:
        return {"run": str(self.run), "run_id": self.run.name, "arm": self.arm, "eval": str(self.eval_file)}


def _passed(gate: dict, arm: str) -> bool:
    a = (gate.get("arms") or {}).get(arm) or {}
    if "verdict" in a:
        return str(a["verdict"]).lower() == "pass"
    return bool(a.get("passed"))


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
    gate = read_json(run.gate) if run.gate.exists() else {}
    passed = [a for a in arms if _passed(gate, a)]
    if len(passed) == 1:
        return Previous(p, passed[0], run.eval_json(passed[0]))
    raise BadInput(f"--previous {value}: it holds {len(arms)} candidates ({', '.join(arms)})"
                   f"{' and ' + str(len(passed)) + ' passed its gate' if gate else ''}: name the released one as "
                   f"--previous {p / 'eval' / (arms[0] + '.json')}")


def copy_previous(run: RunDir, prev: Previous) -> Path:
    """Copy the previous release's eval file and per-item records into `run/history/`. Returns the new file."""
    doc = require(read_json(prev.eval_file), "eval", str(prev.eval_file))
    dest = run.root / "history" / f"{LABEL}.json"
    tasks = {}
    for name, entry in (doc.get("tasks") or {}).items():
        entry = dict(entry)
        rel = entry.get("samples")
        src = prev.eval_file.parent / rel if rel else None
        if src is not None and src.is_file():
            target = dest.parent / "samples" / LABEL / f"{name}.jsonl"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
            entry["samples"] = str(target.relative_to(dest.parent))
        else:
            entry.pop("samples", None)
        tasks[name] = entry
    model = dict(doc.get("model") or {})
    model["released_as"] = f"{prev.run.name}/{prev.arm}"
    atomic_write_json(dest, {**doc, "model": model, "tasks": tasks, "drift": {}})
    return dest


def write_history(run: RunDir, prev: Previous, *, alpha: float = 0.05, n_boot: int = 2000, seed: int = 0) -> dict:
    """Compare every candidate of `run` against the previous release; write and return history.json."""
    from forgetcheck.verdict.compare import compare_evals

    prev_file = copy_previous(run, prev)
    arms = [p.stem for p in sorted((run.root / "eval").glob("*.json")) if p.stem != "base"]
    config = read_json(run.config) if run.config.exists() else {}
    order = [a for a in config.get("arms") or [] if a in arms] + [a for a in arms if a not in (config.get("arms") or [])]
    result = compare_evals(prev_file, {a: run.eval_json(a) for a in order}, alpha=alpha, n_boot=n_boot, seed=seed)
    doc = {"schema_version": SCHEMA_VERSION, "kind": "history", "previous": prev.describe(),
           "eval": str(prev_file.relative_to(run.root)), "compare": result}
    atomic_write_json(run.root / HISTORY_FILE, doc)
    return doc


def summary_lines(hist: dict) -> list[str]:
    """One line per candidate: retention mean against the previous release, and its significant task drops."""
    c = hist["compare"]
    prev = hist["previous"]
    out = []
    for arm in c.get("arms") or []:
        ret = ((c.get("suites") or {}).get("retention") or {}).get("arms", {}).get(arm)
        drops = [n for n, t in sorted((c.get("tasks") or {}).items())
                 if (t.get("arms") or {}).get(arm, {}).get("significant") and (t["arms"][arm].get("delta") or 0) < 0]
        mean = "no retention mean" if not ret else f"retention mean {ret['delta']:+.2f} points"
        out.append(f"{arm} vs previous release {prev['run_id']}/{prev['arm']}: {mean}; "
                   + (f"significant drops on {', '.join(drops)}" if drops else "no significant task drop"))
    return out


def view(run: RunDir) -> dict | None:
    """What the report shows of history.json (None when the run has none)."""
    path = run.root / HISTORY_FILE
    if not path.is_file():
        return None
    hist = read_json(path)
    c = hist.get("compare") or {}
    arms = list(c.get("arms") or [])
    rows = []
    for name, t in sorted((c.get("tasks") or {}).items(), key=lambda kv: (kv[1].get("suite") != "retention",
                                                                        kv[1].get("unit") != "points", kv[0])):
        for arm in arms:
            a = (t.get("arms") or {}).get(arm)
            if a is None:
                continue
            sig = bool(a.get("significant"))
            d = a.get("delta")
            rows.append({"task": name, "suite": t.get("suite"), "metric": t.get("metric"), "unit": t.get("unit"),
                         "arm": arm, "previous": t["base"].get("score_paired", t["base"].get("score")),
                         "score": a.get("score"), "delta": d, "ci": a.get("ci"), "p_holm": a.get("p_holm"),
                         "n_paired": a.get("n_paired"), "drop": sig and d is not None and d < 0,
                         "gain": sig and d is not None and d > 0})
    means = []
    for suite, s in sorted((c.get("suites") or {}).items()):
        for arm in arms:
            m = (s.get("arms") or {}).get(arm)
            if m:
                means.append({"suite": suite, "arm": arm, **m})
    return {"previous": hist.get("previous") or {}, "rows": rows, "means": means, "arms": arms,
            "alpha": c.get("alpha"), "ci_level": c.get("ci_level"), "lines": summary_lines(hist)}
