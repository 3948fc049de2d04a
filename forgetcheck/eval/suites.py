"""Task suites: which lm-eval tasks a command evaluates, and which of their items (`--limit`).

`resolve_tasks` turns an `EvalConfig` (suites or task names) into loaded lm-eval Task objects with what
forgetcheck knows about each (`TaskSpec`: suite, kind, primary metric, chance, a hash of its config and data).

Items: `EvalConfig.limit` picks a deterministic, stratified subset of each task (`select_items`), chosen from
the dataset alone (content hashes and a fixed seed), so every model is scored on the same items. A base's screen
items are the next items of the same order (`select_with_screen`).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import inspect
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgetcheck.config import EvalConfig
from forgetcheck.errors import BadInput
from forgetcheck.eval.metrics import DEFAULT_PRIMARY
from forgetcheck.rundir import file_sha256, safe_name

LIMIT_SEED = "forgetcheck-limit-v1"
"""Mixed into each document's content hash to order items for `--limit` (changing it changes every subset)."""
STRATUM_FIELDS = ("subject", "category", "subtask", "source")
"""Document fields that name a stratum (the first present is used), in addition to the target label."""


# ---- tasks -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskSpec:
    """One task to evaluate: its lm-eval Task object and what forgetcheck knows about it."""

    name: str
    suite: str
    kind: str  # "multiple_choice" | "perplexity"
    primary_metric: str
    chance: float | None
    task: Any  # lm_eval.api.task.Task
    config_hash: str
    source: str  # "forgetcheck" (tasks/) | "lm-eval" (lm-eval's own hub task)
    all_items: bool = False  # every item is scored whatever --limit (a run's recall task: train/recall.py)


def default_tasks_dir() -> Path:
    """forgetcheck's rendered task YAMLs (`benchdata.render_tasks_dir()`)."""
    try:
        from forgetcheck.data import benchmarks
    except ImportError:
        raise BadInput("forgetcheck.data.benchmarks is not installed, so tasks/ cannot be rendered: "
                       "give --tasks-dir DIR with lm-eval task YAMLs") from None
    return Path(benchmarks.render_tasks_dir())


def _entry_cfg(tm, name: str) -> dict:
    entry = tm.task_index.get(name)
    cfg = getattr(entry, "cfg", None) if entry is not None else None
    return cfg if isinstance(cfg, dict) else {}


def _our_task_names(tm) -> list[str]:
    return sorted(n for n in tm.all_tasks if _entry_cfg(tm, n).get("task") == n)


def _suite_of(tm, name: str) -> str | None:
    meta = _entry_cfg(tm, name).get("metadata") or {}
    if meta.get("suite"):
        return meta["suite"]
    try:
        from forgetcheck.data import benchmarks
    except ImportError:
        return None
    try:
        return benchmarks.task_info(name).get("suite")
    except (KeyError, ValueError, BadInput):
        return None


def _hashable(o: Any) -> str:
    """json.dumps default for a task config: functions by name and source text, the rest by str()."""
    if callable(o):
        try:
            src = inspect.getsource(o)
        except (OSError, TypeError):
            src = ""
        return f"{getattr(o, '__module__', '')}.{getattr(o, '__qualname__', repr(o))}:" + hashlib.sha256(
            src.encode()).hexdigest()
    return str(o)


def _data_files(cfg: dict) -> list[Path]:
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    out: list[str] = []
    if isinstance(files, str):
        out = [files]
    elif isinstance(files, list):
        out = [str(f) for f in files]
    elif isinstance(files, dict):
        for v in files.values():
            out.extend([v] if isinstance(v, str) else [str(x) for x in v])
    return [Path(f) for f in out]


def task_config_hash(task) -> str:
    """Hash of the task's resolved config (rendered YAML) and the content of every data file it reads."""
    cfg = task.dump_config()
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=_hashable).encode())
    for f in _data_files(cfg):
        h.update(f.name.encode())
        h.update((file_sha256(f) if f.is_file() else "missing").encode())
    return h.hexdigest()[:16]


def _describe(name: str, task, source: str) -> TaskSpec:
    cfg = task.dump_config()
    meta = cfg.get("metadata") or {}
    info: dict = {}
    if source == "forgetcheck":
        try:
            from forgetcheck.data import benchmarks

            info = dict(benchmarks.task_info(name))
        except (ImportError, KeyError, ValueError, BadInput):
            info = {}
    out_type = cfg.get("output_type")
    if out_type == "multiple_choice":
        kind = "multiple_choice"
    elif out_type == "loglikelihood_rolling":
        kind = "perplexity"
    else:
        raise BadInput(f"task '{name}' has output_type '{out_type}': forgetcheck evaluates multiple_choice and "
                       f"loglikelihood_rolling (perplexity) tasks; drop it from --tasks")
    primary = (info.get("primary_metric") or info.get("primary") or meta.get("primary_metric")
               or meta.get("primary") or DEFAULT_PRIMARY[kind])
    chance = info.get("chance", meta.get("chance"))
    if chance is None and kind == "multiple_choice":
        docs = task.eval_docs
        chance = sum(1.0 / len(task.doc_to_choice(d)) for d in docs) / max(1, len(docs))
    suite = info.get("suite") or meta.get("suite") or "retention"
    return TaskSpec(name, suite, kind, primary, None if chance is None else float(chance), task,
                    task_config_hash(task), source, all_items=bool(meta.get("all_items")))


def _why_missing(name: str, missing_file: Path) -> str:
    """Why a task's data file is absent: the source its last build could not have, else not prepared."""
    try:
        from forgetcheck.data import benchmarks

        why = benchmarks.missing_tasks().get(name)
    except ImportError:
        why = None
    return why or (f"not built: {missing_file} does not exist; fix: `forgetcheck data prepare med` (it builds the "
                   f"benchmark data)")


def resolve_tasks(cfg: EvalConfig, tasks_dir: Path | None = None,
                  missing: dict[str, dict] | None = None) -> list[TaskSpec]:
    """The tasks `cfg` asks for, loaded (datasets read), in a stable order. Unknown names are a BadInput
    with the closest of our names; lm-eval's own hub tasks pass through where the hub can be reached.
    A task of a requested suite whose data could not be built is left out and recorded in `missing`
    ({task: {suite, why}}) when that dict is given; named in --tasks, or without `missing`, it is a BadInput."""
    from lm_eval.tasks import TaskManager

    tasks_dir = Path(tasks_dir) if tasks_dir is not None else default_tasks_dir()
    if not tasks_dir.is_dir():
        raise BadInput(f"task folder {tasks_dir} does not exist: give --tasks-dir DIR with lm-eval task YAMLs")
    tm = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    ours = _our_task_names(tm)
    if cfg.tasks:
        names = []
        for n in cfg.tasks:  # a group of ours (forgetcheck_retention, ...) stands for its tasks
            names += sorted(tm.load([n])["tasks"]) if n in tm.all_tasks and n not in ours else [n]
        names = list(dict.fromkeys(names))
    else:
        names = [n for n in ours if _suite_of(tm, n) in selected_suites(cfg.suites)]
        if not names:
            raise BadInput(f"no task in {tasks_dir} belongs to suite(s) {','.join(cfg.suites)}: "
                           f"give --tasks (known: {', '.join(ours) or 'none'})")
    if RUN_TASK in names and RUN_TASK not in tm.all_tasks:
        raise BadInput(f"task '{RUN_TASK}' asks about the facts a run's arms trained on, so only `forgetcheck run` "
                       f"has it (with a packaged dataset and a budget that holds a whole unit of facts): drop it "
                       f"from --tasks")
    for n in list(names):
        absent = [f for f in _data_files(_entry_cfg(tm, n)) if not f.is_file()] if n in ours else []
        if not absent:
            continue
        why = _why_missing(n, absent[0])
        if missing is None or cfg.tasks:
            raise BadInput(f"task '{n}' cannot be evaluated: {why}; or drop the task from --tasks")
        missing[n] = {"suite": _suite_of(tm, n), "why": why}
        names.remove(n)
    if not names:
        raise BadInput(f"no task of suite(s) {','.join(cfg.suites)} could be built: "
                       + "; ".join(f"{n}: {m['why']}" for n, m in sorted((missing or {}).items())))
    specs = [_describe(n, _load_task(tm, n), "forgetcheck") for n in names if n in ours]
    hub_names = [n for n in names if n not in ours]
    if hub_names:
        specs += _hub_tasks(hub_names, ours)
    order = {n: i for i, n in enumerate(names)}
    return sorted(specs, key=lambda s: order[s.name])


RUN_TASK = "fc_med_recall"  # a run's own task, written into its tasks folder by train/recall.py (recall.TASK)
SUITE_PARTS = {"domain": ("domain", "recall")}
"""A suite asked for by name and the task suites it stands for: `domain` also takes a run's recall task (the facts the
arms trained on: train/recall.py), which is reported apart from the domain's transfer tasks."""


def selected_suites(suites: tuple[str, ...]) -> set[str]:
    return {part for s in suites for part in SUITE_PARTS.get(s, (s,))}


def suite_task_names(suite: str, tasks_dir: Path | None = None) -> list[str]:
    """The names of our tasks in `tasks_dir` that belong to `suite`, from the task index alone (no data read)."""
    from lm_eval.tasks import TaskManager

    tdir = Path(tasks_dir) if tasks_dir is not None else default_tasks_dir()
    tm = TaskManager(include_path=str(tdir), include_defaults=False)
    return [n for n in _our_task_names(tm) if _suite_of(tm, n) == suite]


ALLOW_CODE_FLAG = "--allow-task-code"
TASK_NAME_FIX = "a task's name names its samples file in the run folder: rename the task in its YAML"


def _yaml_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and (p.suffix in (".yaml", ".yml")
                                                                         or p.name.endswith("_yaml")))


def _function_line(path: Path) -> int | None:
    """The line of the first `!function` tag in a YAML file (lm-eval imports and runs the Python it names), or
    None; the tag is found by YAML's own scanner, so a comment or a quoted string that mentions it is not one."""
    import yaml

    try:
        for token in yaml.scan(path.read_text(encoding="utf-8")):
            if isinstance(token, yaml.TagToken) and token.value == ("!", "function"):
                return token.start_mark.line + 1
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None  # not readable as YAML: lm-eval refuses it itself, and runs nothing from it
    return None


def _included(path: Path) -> list[Path]:
    """The files a task YAML pulls in with `include:` (lm-eval reads them as part of the task)."""
    out = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return out
    for m in re.finditer(r"^include:\s*['\"]?([^'\"#\n]+?)['\"]?\s*(?:#.*)?$", text, re.MULTILINE):
        target = Path(m.group(1))
        out.append(target if target.is_absolute() else path.parent / target)
    return out


def task_code_problems(tasks_dir: Path, allow_code: bool = False) -> list[str]:
    """One line when a YAML of the user's `tasks_dir` (or a file it includes) holds lm-eval's `!function`,
    which imports and runs Python from beside it, unless `allow_code` (the --allow-task-code flag). forgetcheck's
    own tasks/ are not checked: they are part of the package."""
    if allow_code:
        return []
    seen: set[Path] = set()
    todo = _yaml_files(tasks_dir)
    found: list[tuple[Path, int]] = []
    while todo:
        f = todo.pop(0)
        key = f.resolve()
        if key in seen or not f.is_file():
            continue
        seen.add(key)
        line = _function_line(f)
        if line is not None:
            found.append((f, line))
        todo += _included(f)
    if not found:
        return []
    (f, line), more = found[0], len(found) - 1
    others = f" (and {more} more file{'s' if more > 1 else ''})" if more else ""
    return [f"--tasks-dir {tasks_dir}: {f}:{line} uses lm-eval's `!function`, which runs Python code{others}; "
            f"pass {ALLOW_CODE_FLAG} if you trust that code, or remove the `!function` entries"]


def task_problems(cfg: EvalConfig, tasks_dir: Path | None = None, *, allow_code: bool = False) -> list[str]:
    """What is wrong with the task names of `cfg` and with a user's `tasks_dir`, found from the task index and
    the YAML text alone (no dataset is read, no model loaded, no task code run), so `run`, `eval`, `train` and
    `check` refuse an unknown task, a task name that is not one file name, or task code not allowed by
    `allow_code` (--allow-task-code) before any work. lm-eval's own hub tasks pass when the hub can be reached
    (resolve_tasks loads them later)."""
    if not cfg.tasks and tasks_dir is None:
        return []
    if tasks_dir is not None and not Path(tasks_dir).is_dir():
        return [f"--tasks-dir {tasks_dir} is not a folder: give a folder of lm-eval task YAMLs"]
    if tasks_dir is not None:
        code = task_code_problems(Path(tasks_dir), allow_code)
        if code:
            return code
    from lm_eval.tasks import TaskManager

    from forgetcheck.models.files import hub_reachable

    tdir = Path(tasks_dir) if tasks_dir is not None else default_tasks_dir()
    tm = TaskManager(include_path=str(tdir), include_defaults=False)
    ours = _our_task_names(tm)
    problems = []
    for n in ours if tasks_dir is not None else ():
        try:
            safe_name(n, f"--tasks-dir {tasks_dir}: task", TASK_NAME_FIX)
        except BadInput as e:
            problems.append(str(e))
    if problems or not cfg.tasks:
        return problems
    unknown = [n for n in cfg.tasks if n not in tm.all_tasks and n != RUN_TASK]
    if not unknown:
        return []
    online = hub_reachable()
    hub = _hub_task_manager().all_tasks if online else ()
    for n in unknown:
        if n in hub:
            continue
        close = difflib.get_close_matches(n, ours, n=3, cutoff=0.5)
        hint = (f"did you mean {', '.join(repr(c) for c in close)}?" if close
                else f"known tasks: {', '.join(ours) or 'none'}")
        where = "" if online else " (lm-eval's hub tasks need the Hugging Face hub, which cannot be reached)"
        problems.append(f"unknown task '{n}' in --tasks: {hint}{where}")
    return problems


def _load_task(tm, name: str):
    loaded = tm.load([name])["tasks"]
    if name not in loaded:
        raise BadInput(f"task '{name}' is a group or tag, not a single task: list its tasks in --tasks")
    return loaded[name]


@functools.lru_cache(maxsize=1)
def _hub_task_manager():
    """lm-eval's own task index (~8 s to build; kept for the process)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _hub_tasks(names: list[str], ours: list[str]) -> list[TaskSpec]:
    from forgetcheck.models.files import hub_reachable

    hub_tm = _hub_task_manager()
    specs = []
    for n in names:
        if n not in hub_tm.all_tasks:
            close = difflib.get_close_matches(n, ours, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else \
                f"known tasks: {', '.join(ours) or 'none'}"
            raise BadInput(f"unknown task '{n}' in --tasks: {hint} (or one of lm-eval's task names)")
        offline = (f"task '{n}' needs the Hugging Face hub, which cannot be reached: {{}}; use forgetcheck's "
                   f"offline tasks ({', '.join(ours) or 'see tasks/'})")
        if not hub_reachable():  # fail at once rather than after datasets' connection timeouts
            raise BadInput(offline.format("no connection to the hub (or HF_HUB_OFFLINE is set)"))
        try:
            task = _load_task(hub_tm, n)
        except BadInput:
            raise
        except Exception as e:  # datasets raises many kinds of errors when the hub is out of reach
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise BadInput(offline.format(first) if not hub_reachable() else
                           f"task '{n}' could not be loaded from the hub: {first}") from None
        specs.append(_describe(n, task, "lm-eval"))
    return specs


def retention_perplexity_task(tasks_dir: Path | None = None) -> TaskSpec | None:
    """The first of our retention-suite perplexity tasks in `tasks_dir` (loaded), or None when there is none."""
    from lm_eval.tasks import TaskManager

    tdir = Path(tasks_dir) if tasks_dir is not None else default_tasks_dir()
    tm = TaskManager(include_path=str(tdir), include_defaults=False)
    for n in _our_task_names(tm):
        c = _entry_cfg(tm, n)
        if (c.get("output_type") == "loglikelihood_rolling" and _suite_of(tm, n) == "retention"
                and all(f.is_file() for f in _data_files(c))):
            return _describe(n, _load_task(tm, n), "forgetcheck")
    return None


# ---- the --limit subset ----------------------------------------------------------------------------------

def doc_hash(doc: Any) -> str:
    """lm-eval's own per-item `doc_hash` (evaluator.py): sha256 of the document as indented JSON."""
    from lm_eval.utils import handle_non_serializable, hash_string

    return hash_string(json.dumps(doc, indent=2, default=handle_non_serializable, ensure_ascii=False))


def _largest_remainder(sizes: dict[Any, int], total: int) -> dict[Any, int]:
    n = sum(sizes.values())
    exact = {k: total * v / n for k, v in sizes.items()}
    alloc = {k: min(sizes[k], math.floor(x)) for k, x in exact.items()}
    order = sorted(sizes, key=lambda k: (-(exact[k] - math.floor(exact[k])), -sizes[k], str(k)))
    while sum(alloc.values()) < total:
        progressed = False
        for k in order:
            if sum(alloc.values()) >= total:
                break
            if alloc[k] < sizes[k]:
                alloc[k] += 1
                progressed = True
        if not progressed:
            break
    return alloc


def select_items(task, limit: int | None, kind: str, key: str | None = None) -> list[int] | None:
    """Indices (sorted) of a deterministic stratified subset of `limit` items; None means every item.

    Strata are the document's subject-like field (`STRATUM_FIELDS`), allotted items in proportion to their
    size (largest remainder). Within a stratum, multiple-choice items are taken round-robin over target
    labels, each label's items ordered by sha256(LIMIT_SEED + doc_hash). Only the dataset decides, so every
    model gets the same items, and a larger limit keeps the items of a smaller one within each stratum.
    `key` (the task's `config_hash`): remember the order in this process (`_order`).
    """
    return select_with_screen(task, limit, 0, kind, key)[0]


def select_with_screen(task, limit: int | None, count: int, kind: str,
                       key: str | None = None) -> tuple[list[int] | None, list[int]]:
    """(`select_items(task, limit, kind)`, the task's screen items): the screen items are the `count` items that
    follow the `limit` ones in the same order (select_items(limit + count) minus select_items(limit)), scored for
    the base only to decide whether the task is informative, never compared with another model. The order is
    nested in practice (a larger limit keeps a smaller one's items), so these are `count` items; where the
    largest-remainder allotment moves an item between strata they are a few fewer, and never one of the `limit`
    items. No screen items without a limit or a count, or when the limit already takes every item."""
    n_docs = len(task.eval_docs)
    if limit is None or limit >= n_docs:
        return None, []
    order = _order(task, kind, key)
    gated = _stratified(order.strata, order.rank, limit)
    if count <= 0:
        return gated, []
    wider = set(range(n_docs)) if limit + count >= n_docs else set(_stratified(order.strata, order.rank,
                                                                               limit + count))
    return gated, sorted(wider - set(gated))


@dataclass(frozen=True)
class _Order:
    docs: list
    rank: dict  # item index -> (sha256(LIMIT_SEED:doc_hash), index)
    strata: dict  # stratum -> target label -> item indices


_ORDERS: dict[tuple[str, str], _Order] = {}


def _order(task, kind: str, key: str | None) -> _Order:
    """The task's documents, their --limit order and strata: a hash of every document, computed once per process
    for a task named by `key` (a sequential check asks for many sizes of every task at every look; hashing
    HellaSwag's 10,042 documents takes seconds)."""
    if key is not None and (key, kind) in _ORDERS:
        return _ORDERS[(key, kind)]
    docs = task.eval_docs
    # a datasets.Dataset converts to Python in one call (row by row iteration costs ~20 us a row)
    docs = docs.to_list() if hasattr(docs, "to_list") else list(docs)
    rank = {}
    strata: dict[str, dict[str, list[int]]] = {}
    with _templates_compiled_once():
        for i, d in enumerate(docs):
            rank[i] = (hashlib.sha256(f"{LIMIT_SEED}:{doc_hash(d)}".encode()).hexdigest(), i)
            stratum = ""
            if isinstance(d, dict):
                stratum = next((str(d[f]) for f in STRATUM_FIELDS if f in d and d[f] is not None), "")
            label = str(task.doc_to_target(d)) if kind == "multiple_choice" else ""
            strata.setdefault(stratum, {}).setdefault(label, []).append(i)
    order = _Order(docs, rank, strata)
    if key is not None:
        if len(_ORDERS) >= 256:
            _ORDERS.clear()
        _ORDERS[(key, kind)] = order
    return order


@contextlib.contextmanager
def _templates_compiled_once():
    """While active, lm-eval's `utils.apply_template` compiles each Jinja template once and renders it per document
    (the same environment, so the same text). lm-eval compiles the template again for every call: asking the
    target of every document of the retention suite (41,000 of them, for the --limit order) took 12.5 s that way and
    1.8 s with each template compiled once (docs/design.md, "Measured constants")."""
    from lm_eval import utils

    original = utils.apply_template
    compiled: dict[str, Any] = {}

    def apply_template(template: str, doc: dict) -> str:
        if template not in compiled:
            compiled[template] = utils.env.from_string(template)
        return compiled[template].render(**doc)

    utils.apply_template = apply_template
    try:
        yield
    finally:
        utils.apply_template = original


def _stratified(strata: dict[str, dict[str, list[int]]], rank: dict, limit: int) -> list[int]:
    alloc = _largest_remainder({s: sum(len(v) for v in labels.values()) for s, labels in strata.items()}, limit)
    chosen: list[int] = []
    for s, labels in strata.items():
        queues = [sorted(v, key=rank.__getitem__) for _, v in sorted(labels.items())]
        queues.sort(key=lambda q: rank[q[0]])
        picked: list[int] = []
        while len(picked) < alloc[s]:
            for q in queues:
                if q and len(picked) < alloc[s]:
                    picked.append(q.pop(0))
        chosen.extend(picked)
    return sorted(chosen)


# ---- sequential looks -------------------------------------------------------------------------------------

CLUSTER_ITEMS = 8
"""Most items of one cluster (items sharing a source) a sequential look scores: a cluster is one unit of the gate's
bound however many of its items are scored, so more than a handful buy little (fc_city_country has a country of
170 cities among 54)."""


def look_items(task, sizes: list[int], kind: str, key: str | None = None) -> tuple[list[list[int]], int]:
    """The new items of each look of a sequential evaluation (`--until-decided`; `sizes`: the items per task at
    each look, the last the cap) and the units (clusters, else items) at the cap. Look k adds the items of
    `select_items(sizes[k])` that no earlier look holds. A task whose items share sources (`cluster`) grows by
    whole clusters instead, taken in a seeded order until the look's size is reached: each look's units are then
    clusters no earlier look touched, independent of the earlier ones (the gate's sequential bounds bet on each
    look's units as fresh draws). A cluster brings at most `CLUSTER_ITEMS` of its items (the first in a seeded
    order; fixed when it is drawn, whatever the models score), so one large source does not take a look's items
    alone. Only the dataset decides, so every model of a check gets the same items."""
    order = _order(task, kind, key)
    docs = order.docs
    clusters: dict[str, list[int]] = {}
    for i, d in enumerate(docs):
        c = d.get("cluster") if isinstance(d, dict) else None
        if c is not None:
            clusters.setdefault(str(c), []).append(i)
    seen: set[int] = set()
    chunks: list[list[int]] = []
    if not clusters:
        for size in sizes:
            chosen = range(len(docs)) if size >= len(docs) else _stratified(order.strata, order.rank, size)
            new = set(chosen) - seen
            chunks.append(sorted(new))
            seen |= new
        return chunks, len(seen)
    loose = [i for i, d in enumerate(docs) if not (isinstance(d, dict) and d.get("cluster") is not None)]
    units = [sorted(v, key=order.rank.__getitem__)[:CLUSTER_ITEMS] for v in clusters.values()] + [[i] for i in loose]
    units.sort(key=lambda u: order.rank[u[0]])
    taken = 0
    for size in sizes:
        new: list[int] = []
        while taken < len(units) and len(seen) + len(new) < size:
            new.extend(units[taken])
            taken += 1
        chunks.append(sorted(new))
        seen |= set(new)
    return chunks, taken
