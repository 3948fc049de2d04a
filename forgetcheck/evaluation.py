"""`forgetcheck eval`: benchmark one model through lm-eval's Python API, offline, with per-item records,
a content-keyed cache, and drift (KL divergence from a reference model) on general text.

What one evaluation writes (DESIGN.md run directory):
  * `<out>.json`  an `EvalFile` (schema.py): per task metrics with stderr and `higher_is_better` (from
    lm-eval), item count, chance, suite, kind, and `samples`, the per-item file relative to the JSON's folder;
  * `<out folder>/samples/<label>/<task>.jsonl`  one line per item (see `EvalFile`);
  * `<out folder>/<label>.topk.npz`  the model's top-k next-token distribution on the drift text, so a later
    evaluation with `reference=<this json>` computes KL(this || that) without loading this model again.

Items: `EvalConfig.limit` picks a deterministic, stratified subset of each task (`select_items`), chosen from
the dataset alone (content hashes and a fixed seed), so every model is scored on the same items.

Cache: each task's records and metrics are kept under `$FORGETCHECK_HOME/eval_cache/<key>/`, the key hashing
the model's weights and config, the task's rendered config and data files, the limit, the backend, the
device/dtype and the library versions. Evaluating the same model again reads them back unchanged, without
loading the model.

Drift approximation (recorded as `drift.kl.method`): for every position of the drift text the reference keeps
its top-k next-token log-probabilities, their token ids and the log of the remaining (tail) probability mass.
KL(reference || model) is computed over these k+1 bins: sum_i p_i log(p_i / q_i) over the reference's top-k
tokens plus p_tail log(p_tail / q_tail), where q_tail is the model's mass outside the reference's top-k. Merging
tokens into one bin can only lower KL (log-sum inequality), so this is a lower bound of the exact KL; with
k=64 the tail usually holds a few percent of the mass and the bound is close. The value is the mean over all
scored positions (nats per token).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import difflib
import functools
import hashlib
import inspect
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgetcheck.config import EvalConfig, check, forgetcheck_home, to_dict, validate_eval
from forgetcheck.errors import BadInput
from forgetcheck.models import ModelRef, content_hash
from forgetcheck.rundir import (
    atomic_write_json,
    atomic_write_jsonl,
    file_sha256,
    package_versions,
    read_json,
    read_jsonl,
)
from forgetcheck.schema import SCHEMA_VERSION, require

LIMIT_SEED = "forgetcheck-limit-v1"
"""Mixed into each document's content hash to order items for `--limit` (changing it changes every subset)."""
STRATUM_FIELDS = ("subject", "category", "subtask", "source")
"""Document fields that name a stratum (the first present is used), in addition to the target label."""

DRIFT_TOP_K = 64
DRIFT_TOKENS = 2048
DRIFT_SEQ_LEN = 256
DRIFT_BLOCK = 32  # positions per block of the stored per-block means (compare resamples blocks for intervals)
BOOTSTRAP_ITERS = 1000  # acc stderr is closed-form; this only matters for bootstrapped metrics
CACHE_FORMAT = 2

BUILTIN_DRIFT_TEXT = (
    "The history of the city goes back more than two thousand years. It began as a small settlement on the "
    "bank of a river, where traders stopped to rest and exchange goods. Over the centuries it grew into a "
    "busy port, and its markets drew merchants from distant countries.",
    "Water boils at one hundred degrees Celsius at sea level, but at lower temperatures on high mountains, "
    "because the air pressure there is lower. This is why cooking pasta takes longer in the mountains.",
    "The committee reviewed the proposal in detail and asked the authors to clarify several points before "
    "a final decision could be made. A revised version is expected early next month.",
    "Most birds build nests in spring. Some use twigs and grass, others mud or feathers, and a few simply "
    "lay their eggs on bare rock. The young usually leave the nest after a few weeks.",
    "When you write a letter to a friend, you can tell them about your week, ask about their family, and "
    "share plans for the holidays. A short note is often enough to keep in touch.",
    "Electric trains replaced steam engines on most lines during the twentieth century. They are quieter, "
    "cleaner and faster, and they can climb steeper hills with heavy loads.",
)


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


def default_tasks_dir() -> Path:
    """forgetcheck's rendered task YAMLs (`benchdata.render_tasks_dir()`)."""
    try:
        from forgetcheck import benchdata
    except ImportError:
        raise BadInput("forgetcheck.benchdata is not installed, so tasks/ cannot be rendered: "
                       "give --tasks-dir DIR with lm-eval task YAMLs") from None
    return Path(benchdata.render_tasks_dir())


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
        from forgetcheck import benchdata
    except ImportError:
        return None
    try:
        return benchdata.task_info(name).get("suite")
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
            from forgetcheck import benchdata

            info = dict(benchdata.task_info(name))
        except (ImportError, KeyError, ValueError, BadInput):
            info = {}
    out_type = cfg.get("output_type")
    if out_type == "multiple_choice":
        kind, default_primary = "multiple_choice", "acc"
    elif out_type == "loglikelihood_rolling":
        kind, default_primary = "perplexity", "word_perplexity"
    else:
        raise BadInput(f"task '{name}' has output_type '{out_type}': forgetcheck evaluates multiple_choice and "
                       f"loglikelihood_rolling (perplexity) tasks; drop it from --tasks")
    primary = (info.get("primary_metric") or info.get("primary") or meta.get("primary_metric")
               or meta.get("primary") or default_primary)
    chance = info.get("chance", meta.get("chance"))
    if chance is None and kind == "multiple_choice":
        docs = task.eval_docs
        chance = sum(1.0 / len(task.doc_to_choice(d)) for d in docs) / max(1, len(docs))
    suite = info.get("suite") or meta.get("suite") or "retention"
    return TaskSpec(name, suite, kind, primary, None if chance is None else float(chance), task,
                    task_config_hash(task), source)


def resolve_tasks(cfg: EvalConfig, tasks_dir: Path | None = None) -> list[TaskSpec]:
    """The tasks `cfg` asks for, loaded (datasets read), in a stable order. Unknown names are a BadInput
    with the closest of our names; lm-eval's own hub tasks pass through where the hub can be reached."""
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
        names = [n for n in ours if _suite_of(tm, n) in cfg.suites]
        if not names:
            raise BadInput(f"no task in {tasks_dir} belongs to suite(s) {','.join(cfg.suites)}: "
                           f"give --tasks (known: {', '.join(ours) or 'none'})")
    for n in names:
        missing = [f for f in _data_files(_entry_cfg(tm, n)) if not f.is_file()] if n in ours else []
        if missing:
            raise BadInput(f"task '{n}' reads {missing[0]}, which does not exist: run `forgetcheck data prepare "
                           f"med` (it builds the benchmark data), or drop the task from --tasks")
    specs = [_describe(n, _load_task(tm, n), "forgetcheck") for n in names if n in ours]
    hub_names = [n for n in names if n not in ours]
    if hub_names:
        specs += _hub_tasks(hub_names, ours)
    order = {n: i for i, n in enumerate(names)}
    return sorted(specs, key=lambda s: order[s.name])


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
    from forgetcheck.models import hub_reachable

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


def select_items(task, limit: int | None, kind: str) -> list[int] | None:
    """Indices (sorted) of a deterministic stratified subset of `limit` items; None means every item.

    Strata are the document's subject-like field (`STRATUM_FIELDS`), allotted items in proportion to their
    size (largest remainder). Within a stratum, multiple-choice items are taken round-robin over target
    labels, each label's items ordered by sha256(LIMIT_SEED + doc_hash). Only the dataset decides, so every
    model gets the same items, and a larger limit keeps the items of a smaller one within each stratum.
    """
    docs = task.eval_docs
    # a datasets.Dataset converts to Python in one call (row by row iteration costs ~20 us a row)
    docs = docs.to_list() if hasattr(docs, "to_list") else list(docs)
    if limit is None or limit >= len(docs):
        return None
    rank = {}
    strata: dict[str, dict[str, list[int]]] = {}
    for i, d in enumerate(docs):
        rank[i] = (hashlib.sha256(f"{LIMIT_SEED}:{doc_hash(d)}".encode()).hexdigest(), i)
        stratum = ""
        if isinstance(d, dict):
            stratum = next((str(d[f]) for f in STRATUM_FIELDS if f in d and d[f] is not None), "")
        label = str(task.doc_to_target(d)) if kind == "multiple_choice" else ""
        strata.setdefault(stratum, {}).setdefault(label, []).append(i)
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


# ---- per-item records ------------------------------------------------------------------------------------

PROMPT_CHARS = 600  # tail of each multiple-choice context kept in the per-item record (for flip examples)

def _records(spec: TaskSpec, samples: list[dict], tok) -> list[dict]:
    rows = []
    for s in sorted(samples, key=lambda x: x["doc_id"]):
        if spec.kind == "multiple_choice":
            lls = [float(r[0]) for r in s["filtered_resps"]]
            greedy = [bool(r[1]) for r in s["filtered_resps"]]
            metrics = {m: float(s[m]) for m in ("acc", "acc_norm") if m in s}
            target = s["target"]
            correct = bool(metrics["acc"]) if "acc" in metrics else lls.index(max(lls)) == target
            row = {"doc_id": int(s["doc_id"]), "doc_hash": s["doc_hash"], "target": target,
                   "loglikelihoods": lls, "is_greedy": greedy, "correct": correct, "metrics": metrics}
            args = s.get("arguments") or []
            if args and isinstance(args[0], (list, tuple)) and len(args[0]) == 2:
                # The item as the model saw it, for the report's flip examples (shared context, then choices).
                row["prompt"] = str(args[0][0])[-PROMPT_CHARS:]
                row["choices"] = [str(a[1])[:200] for a in args]
            if isinstance(s.get("doc"), dict) and s["doc"].get("cluster") is not None:
                row["cluster"] = str(s["doc"]["cluster"])  # items sharing a source (compare resamples clusters)
            rows.append(row)
        else:
            ll = float(s["filtered_resps"][0])
            text = s["target"]
            words = s["word_perplexity"][1] if "word_perplexity" in s else len(str(text).split())
            nbytes = s["byte_perplexity"][1] if "byte_perplexity" in s else len(str(text).encode("utf-8"))
            row = {"doc_id": int(s["doc_id"]), "doc_hash": s["doc_hash"], "loglikelihood": ll,
                   "words": int(words), "bytes": int(nbytes)}
            if tok is not None:
                row["tokens"] = len(tok(str(text), add_special_tokens=False)["input_ids"])
            rows.append(row)
    return rows


def _metrics(res: dict, hib: dict) -> dict:
    out = {}
    for key, value in res.items():
        if "," not in key or "_stderr," in key:
            continue
        metric = key.split(",")[0]
        stderr = res.get(f"{metric}_stderr,{key.split(',', 1)[1]}")
        out[metric] = {"value": float(value),
                       "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                       "higher_is_better": bool(hib.get(metric, True))}
    return out


# ---- the model -------------------------------------------------------------------------------------------

def model_hash(ref: ModelRef) -> str:
    if ref.kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(ref.path, "config.json")
        if isinstance(cached, str):
            return content_hash(Path(cached).parent)
        return "hub:" + ref.path
    return content_hash(ref.path)


class _Model:
    """Loads the model once, on first need (a run fully served by the cache never loads it)."""

    def __init__(self, ref: ModelRef, device: str, dtype: str, cfg: EvalConfig):
        self.ref, self.device, self.dtype, self.cfg = ref, device, dtype, cfg
        self._model = self._tok = self._lm = None
        self.backend_used: str | None = None

    def load(self):
        if self._model is None:
            from forgetcheck import models

            t0 = time.perf_counter()
            self._model, self._tok = models.load(self.ref, device=self.device, dtype=self.dtype)
            print(f"loaded {self.ref.name} on {self.device} ({self.dtype}) in {time.perf_counter() - t0:.1f} s",
                  flush=True)
        return self._model, self._tok

    @property
    def tokenizer(self):
        return self.load()[1]

    def lm(self):
        if self._lm is None:
            model, tok = self.load()
            cls, self.backend_used = lm_class(self.cfg.backend)
            self._lm = cls(pretrained=model, tokenizer=tok, batch_size=self.cfg.batch_size)
        return self._lm


def lm_class(backend: str):
    """(lm-eval LM class, backend name actually used). `fast` falls back to stock HFLM when
    forgetcheck.fast_lm is not available, and says so."""
    from lm_eval.models.huggingface import HFLM

    if backend == "fast":
        try:
            from forgetcheck.fast_lm import FastLM
        except ImportError as e:
            print(f"note: --backend fast unavailable ({e}); using lm-eval's HFLM", flush=True)
            return HFLM, "hf"
        return FastLM, "fast"
    return HFLM, "hf"


def eval_dtype(device: str) -> tuple[str, str]:
    """(dtype, why). Always fp32: log-likelihood differences between a base and its fine-tunes are small,
    and bf16 rounding would be of the same order."""
    return "float32", ("fp32 on CPU" if device == "cpu" else "fp32 for exact log-likelihoods")


# ---- cache -----------------------------------------------------------------------------------------------

def _versions() -> dict:
    v = package_versions()
    return {k: v.get(k) for k in ("forgetcheck", "torch", "transformers", "lm_eval")}


def _key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def cache_dir() -> Path:
    return forgetcheck_home() / "eval_cache"


def _cache_read(key: str) -> tuple[dict, list[dict]] | None:
    d = cache_dir() / key
    if not (d / "result.json").is_file() or not (d / "samples.jsonl").is_file():
        return None
    return read_json(d / "result.json"), read_jsonl(d / "samples.jsonl")


def _cache_write(key: str, result: dict, rows: list[dict]) -> None:
    d = cache_dir() / key
    atomic_write_jsonl(d / "samples.jsonl", rows)
    atomic_write_json(d / "result.json", result)  # written last: its presence means the entry is whole


def _bare_task_manager():
    """A TaskManager that indexes nothing: simple_evaluate gets loaded Task objects and, given no manager,
    would index lm-eval's 14k hub tasks (~8 s) for nothing."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False)


# ---- evaluation ------------------------------------------------------------------------------------------

JOINT_ITEMS = 2000
"""Cache-missed tasks are scored together, in one `simple_evaluate` call, up to this many items per call: one
call pays lm-eval's setup once and lets the backend batch (and share contexts) across tasks. A larger task runs
alone, so a long evaluation still caches its finished tasks as it goes (an interrupted run resumes from them)."""


@dataclass(frozen=True)
class _Pending:
    spec: TaskSpec
    key: str  # cache key
    indices: list[int] | None  # the --limit subset, None for every item
    n_items: int


def _joint_groups(pending: list[_Pending], max_items: int = JOINT_ITEMS) -> list[list[_Pending]]:
    """Consecutive tasks packed into groups of at most `max_items` items (a larger task is a group alone)."""
    groups: list[list[_Pending]] = []
    for p in pending:
        if groups and sum(q.n_items for q in groups[-1]) + p.n_items <= max_items:
            groups[-1].append(p)
        else:
            groups.append([p])
    return groups


@contextlib.contextmanager
def _without_env_probe():
    """For the duration of one simple_evaluate call, skip what lm-eval does after scoring to describe the
    environment: `git describe` in the current folder and torch's collect_env (several subprocesses: pip,
    lscpu, nvidia-smi, ...), which costs 0.5-1.6 s per call on the 2-core dev machine and is not stored by
    forgetcheck (it records versions, git hash and device in manifest.json). Restored afterwards: other callers get stock lm-eval."""
    import lm_eval.evaluator as ev

    saved = ev.get_git_commit_hash, ev.add_env_info
    ev.get_git_commit_hash, ev.add_env_info = (lambda: None), (lambda storage: None)
    try:
        yield
    finally:
        ev.get_git_commit_hash, ev.add_env_info = saved


def _run_group(runner: _Model, group: list[_Pending]) -> list[tuple[_Pending, dict, list[dict], dict]]:
    """Score the tasks of `group` in one simple_evaluate call: (pending, result, per-item rows, timing) each."""
    from lm_eval import simple_evaluate

    lm = runner.lm()
    samples = {p.spec.name: p.indices for p in group if p.indices}
    t0 = time.perf_counter()
    with _without_env_probe():
        out = simple_evaluate(model=lm, tasks=[p.spec.task for p in group], task_manager=_bare_task_manager(),
                              samples=samples or None, log_samples=True, bootstrap_iters=BOOTSTRAP_ITERS)
    wall = time.perf_counter() - t0
    done = []
    total = 0
    for p in group:
        name = p.spec.name
        rows = _records(p.spec, out["samples"][name], runner.tokenizer)
        result = {"suite": p.spec.suite, "kind": p.spec.kind, "primary_metric": p.spec.primary_metric,
                  "metrics": _metrics(out["results"][name], out["higher_is_better"].get(name, {})),
                  "n": len(rows), "chance": p.spec.chance}
        done.append((p, result, rows))
        total += len(rows)
    rate = total / wall if wall > 0 else float("inf")
    joint = f" (scored with {len(group) - 1} other task(s) in one pass: {total} items)" if len(group) > 1 else ""
    out_rows = []
    for p, result, rows in done:
        # a joint pass interleaves its tasks' requests, so the time and rate are the pass's, not the task's own
        print(f"  {p.spec.name}: {len(rows)} items in {wall:.1f} s ({rate:.2f} items/s){joint}", flush=True)
        out_rows.append((p, result, rows, {"cached": False, "wall_s": round(wall, 3), "items": len(rows),
                                           "items_per_s": round(rate, 3), "joint_tasks": len(group),
                                           "joint_items": total}))
    return out_rows


def evaluate(model_ref: ModelRef, cfg: EvalConfig, out_file: Path, *, device: str = "cpu",
             reference: Path | None = None, label: str | None = None, tasks_dir: Path | None = None) -> dict:
    """Evaluate `model_ref` on the tasks of `cfg`, write `out_file` (EvalFile) and the per-item files, and
    return the EvalFile dict. `reference`: an earlier eval JSON (the base) to measure KL drift against.
    `tasks_dir`: lm-eval task YAMLs to use instead of forgetcheck's rendered tasks/."""
    check(validate_eval(cfg))
    out_file = Path(out_file)
    label = label or out_file.stem
    dtype, dtype_reason = eval_dtype(device)
    # hashing the weights (file reads and sha256, both outside the GIL) overlaps the mostly single-threaded
    # task loading
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        hashing = pool.submit(model_hash, model_ref)
        specs = resolve_tasks(cfg, tasks_dir)
        ref_data = load_reference(reference) if reference is not None else None
        mhash = hashing.result()
    versions = _versions()
    runner = _Model(model_ref, device, dtype, cfg)
    samples_dir = out_file.parent / "samples" / label
    done: dict[str, tuple[dict, list[dict]]] = {}
    timings: dict[str, dict] = {}
    backends: set[str] = set()
    missed: list[_Pending] = []
    for spec in specs:
        indices = select_items(spec.task, cfg.limit, spec.kind)
        n_items = len(indices) if indices is not None else len(spec.task.eval_docs)
        key = _key(fmt=CACHE_FORMAT, model=mhash, task=spec.config_hash, limit=cfg.limit, backend=cfg.backend,
                   device=device.split(":")[0], dtype=dtype, versions=versions)
        t0 = time.perf_counter()
        hit = _cache_read(key)
        if hit is not None:
            result, rows = hit
            backends.add(result.pop("backend_used"))
            print(f"  {spec.name}: cache hit, {len(rows)} items ({cache_dir() / key})", flush=True)
            timings[spec.name] = {"cached": True, "wall_s": round(time.perf_counter() - t0, 3), "items": len(rows)}
            done[spec.name] = (result, rows)
        else:
            print(f"  {spec.name}: {n_items} items ({spec.kind}) ...", flush=True)
            missed.append(_Pending(spec, key, indices, n_items))
    for group in _joint_groups(missed):
        for p, result, rows, timing in _run_group(runner, group):
            _cache_write(p.key, {**result, "backend_used": runner.backend_used}, rows)
            backends.add(runner.backend_used)
            timings[p.spec.name] = timing
            done[p.spec.name] = (result, rows)
    tasks: dict[str, dict] = {}
    for spec in specs:  # in the resolved order, whether cached or scored
        result, rows = done[spec.name]
        sample_file = samples_dir / f"{spec.name}.jsonl"
        atomic_write_jsonl(sample_file, rows)
        tasks[spec.name] = {**result, "samples": str(sample_file.relative_to(out_file.parent))}

    drift, drift_timing = measure_drift(runner, mhash, out_file, label, specs, ref_data, versions, device, dtype,
                                        tasks_dir)
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "kind": "eval",
        "model": {"name": model_ref.name, "path": model_ref.path, "kind": model_ref.kind,
                  "content_hash": mhash, "random_weights": model_ref.random_weights},
        "config": to_dict(cfg),
        "limit": cfg.limit,
        "backend": cfg.backend,
        "backend_used": sorted(b for b in backends if b),
        "device": device,
        "dtype": dtype,
        "dtype_reason": dtype_reason,
        "versions": versions,
        "tasks": tasks,
        "drift": drift,
        "timings": {"tasks": timings, "drift": drift_timing},
    }
    atomic_write_json(out_file, doc)
    return doc


# ---- drift -----------------------------------------------------------------------------------------------

def drift_text(specs: list[TaskSpec], tasks_dir: Path | None = None) -> tuple[list[str], str]:
    """(texts, where they come from): the documents of a retention perplexity task, in dataset order, or
    a small built-in English paragraph set when no such task is available."""
    candidates = [s for s in specs if s.kind == "perplexity" and s.suite == "retention"]
    if not candidates:
        try:
            from lm_eval.tasks import TaskManager

            tdir = Path(tasks_dir) if tasks_dir is not None else default_tasks_dir()
            tm = TaskManager(include_path=str(tdir), include_defaults=False)
            for n in _our_task_names(tm):
                c = _entry_cfg(tm, n)
                if c.get("output_type") == "loglikelihood_rolling" and _suite_of(tm, n) == "retention":
                    candidates = [_describe(n, _load_task(tm, n), "forgetcheck")]
                    break
        except BadInput:
            candidates = []
    if candidates:
        spec = candidates[0]
        texts = [str(spec.task.doc_to_target(d)) for d in spec.task.eval_docs]
        return texts, f"task {spec.name} (documents in dataset order)"
    return list(BUILTIN_DRIFT_TEXT), "built-in English paragraphs (no retention perplexity task found)"


def drift_token_ids(tok, texts: list[str], n_tokens: int = DRIFT_TOKENS, seq_len: int = DRIFT_SEQ_LEN):
    """[n_seq, seq_len] int64 array: the texts joined by blank lines, tokenized, cut into full rows."""
    import numpy as np

    ids: list[int] = []
    for t in texts:
        ids.extend(tok("\n\n" + t if ids else t, add_special_tokens=False)["input_ids"])
        if len(ids) >= n_tokens:
            break
    ids = ids[:n_tokens]
    seq_len = min(seq_len, len(ids))  # a short text gives one shorter row
    n_seq = len(ids) // seq_len
    return np.asarray(ids[: n_seq * seq_len], dtype=np.int64).reshape(n_seq, seq_len)


def drift_pass(model, ids, device: str, ref: dict | None = None) -> dict:
    """Score the drift rows one at a time (a row's full log-probs are [seq_len, vocab]; never all rows at
    once). Returns per-position `nll` [n_seq, seq_len - 1], the top-k summary (`topk_summary`) and, given a
    reference, per-position `kl` (`kl_topk`)."""
    import numpy as np
    import torch

    rows: dict[str, list] = {"nll": [], "topk_logp": [], "topk_idx": [], "tail_logp": [], "kl": []}
    with torch.inference_mode():
        for i, row in enumerate(ids):
            x = torch.as_tensor(row, device=device).unsqueeze(0)
            logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), dim=-1)
            rows["nll"].append((-logp.gather(-1, x[0, 1:].unsqueeze(-1)).squeeze(-1)).cpu().numpy())
            for k, v in topk_summary(logp).items():
                rows[k].append(v)
            if ref is not None:
                ref_row = {k: ref[k][i] for k in ("topk_logp", "topk_idx", "tail_logp")}
                rows["kl"].append(kl_topk(ref_row, logp).cpu().numpy())
    return {k: np.stack(v) for k, v in rows.items() if v}


def drift_blocks(scored: dict, size: int = DRIFT_BLOCK) -> dict:
    """Per-block means (blocks of `size` consecutive positions within one sequence) of the per-position NLL
    and, given a reference, KL: what compare resamples for the drift rules' intervals."""

    out: dict[str, list] = {"size": size, "sequence": [], "nll": [], "kl": []}
    nll, kl = scored["nll"], scored.get("kl")
    for s in range(nll.shape[0]):
        for b in range(0, nll.shape[1], size):
            out["sequence"].append(s)
            out["nll"].append(round(float(nll[s, b:b + size].mean()), 6))
            if kl is not None:
                out["kl"].append(round(float(kl[s, b:b + size].mean()), 7))
    if kl is None:
        del out["kl"]
    return out


def topk_summary(logp, k: int = DRIFT_TOP_K) -> dict:
    """Top-k log-probs, their token ids, and the log of the remaining (tail) mass, per position (numpy)."""
    import torch

    vals, idx = logp.topk(k, dim=-1)
    tail = torch.logsumexp(logp.scatter(-1, idx, float("-inf")), dim=-1)
    return {"topk_logp": vals.float().cpu().numpy(), "topk_idx": idx.int().cpu().numpy(),
            "tail_logp": tail.float().cpu().numpy()}


def kl_topk(ref: dict, logp) -> Any:
    """Per-position KL(reference || model) over the reference's top-k tokens plus one tail bin (nats);
    a lower bound of the exact KL (see the module docstring). `logp`: the model's log-probs [.., vocab]."""
    import torch

    dev = logp.device
    p_logp = torch.as_tensor(ref["topk_logp"], device=dev).double()
    idx = torch.as_tensor(ref["topk_idx"], device=dev).long()
    p_tail = torch.as_tensor(ref["tail_logp"], device=dev).double()
    q = logp.double()
    q_logp = q.gather(-1, idx)
    q_tail = torch.logsumexp(q.scatter(-1, idx, float("-inf")), dim=-1)
    kl = (p_logp.exp() * (p_logp - q_logp)).sum(-1) + p_tail.exp() * (p_tail - q_tail)
    return kl.clamp_min(0.0)


def load_reference(path: Path) -> dict:
    """The reference distribution saved beside an earlier eval JSON (its `drift.topk_file`)."""
    import numpy as np

    path = Path(path)
    doc = require(read_json(path), "eval", str(path))
    rel = (doc.get("drift") or {}).get("topk_file")
    if not rel or not (path.parent / rel).is_file():
        raise BadInput(f"--reference {path}: no top-k distribution file beside it ({rel or 'none recorded'}); "
                       f"re-run `forgetcheck eval` on the reference model")
    npz = path.parent / rel
    with np.load(npz) as z:
        data = {k: z[k] for k in z.files}
    data["file"] = str(npz)
    data["hash"] = file_sha256(npz)[:16]
    data["model"] = (doc.get("model") or {}).get("name")
    data["text_source"] = str((doc.get("drift") or {}).get("text", {}).get("source", ""))
    return data


def measure_drift(runner: _Model, mhash: str, out_file: Path, label: str, specs: list[TaskSpec],
                  ref: dict | None, versions: dict, device: str, dtype: str,
                  tasks_dir: Path | None = None) -> tuple[dict, dict]:
    """(drift, timing): the model's perplexity on the drift text, its top-k file (for later references),
    and, given a reference, KL(reference || model). Cached like the tasks."""
    import numpy as np

    npz_path = out_file.parent / f"{label}.topk.npz"
    if ref is not None:
        ids, source = ref["input_ids"], ref["text_source"]
    else:
        texts, source = drift_text(specs, tasks_dir)
        ids = None
    key_parts = dict(fmt=CACHE_FORMAT, kind="drift", model=mhash, k=DRIFT_TOP_K, n=DRIFT_TOKENS,
                     seq=DRIFT_SEQ_LEN, blocks=DRIFT_BLOCK, ref=ref["hash"] if ref else None, device=device.split(":")[0], dtype=dtype,
                     versions=versions,
                     text=hashlib.sha256(ids.tobytes() if ids is not None else "\x00".join(texts).encode()
                                         ).hexdigest())
    key = _key(**key_parts)
    d = cache_dir() / key
    t0 = time.perf_counter()
    if (d / "drift.json").is_file() and (d / "topk.npz").is_file():
        drift = read_json(d / "drift.json")
        print(f"  drift: cache hit ({d})", flush=True)
        timing = {"cached": True, "wall_s": round(time.perf_counter() - t0, 3)}
    else:

        model, tok = runner.load()
        if ids is None:
            ids = drift_token_ids(tok, texts)
        if int(ids.max()) >= model.get_output_embeddings().weight.shape[0]:
            raise BadInput(f"--reference {ref['file']}: its token ids exceed this model's vocabulary; KL needs "
                           f"the same tokenizer as the reference model")
        scored = drift_pass(model, ids, device, ref)
        nll = scored["nll"]
        summary = {k: scored[k] for k in ("topk_logp", "topk_idx", "tail_logp")}
        n_pos = int(nll.size)
        drift = {"text": {"source": source, "sequences": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
                          "tokens_scored": n_pos},
                 "perplexity": float(np.exp(nll.mean())),
                 "mean_nll": float(nll.mean()),
                 "topk_mass": float(np.exp(summary["topk_logp"]).sum(-1).mean()),
                 "blocks": drift_blocks(scored)}
        if ref is not None:
            kl = scored["kl"]
            drift["kl"] = {
                "reference": ref["model"], "reference_file": ref["file"],
                "mean": float(kl.mean()), "median": float(np.median(kl)),
                "p95": float(np.quantile(kl, 0.95)), "max": float(kl.max()),
                "unit": "nats per token",
                "method": (f"KL(reference || model) of the next-token distribution over the reference's top-"
                           f"{DRIFT_TOP_K} tokens plus one bin for the remaining mass, averaged over {n_pos} "
                           f"positions; merging the tail into one bin makes this a lower bound of the exact KL "
                           f"(close when the reference's top-{DRIFT_TOP_K} mass, "
                           f"{float(np.exp(ref['topk_logp']).sum(-1).mean()):.3f} here, is near 1)"),
            }
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".topk.{os.getpid()}.tmp.npz"
        np.savez_compressed(tmp, input_ids=ids, **summary)
        tmp.replace(d / "topk.npz")
        atomic_write_json(d / "drift.json", drift)
        timing = {"cached": False, "wall_s": round(time.perf_counter() - t0, 3)}
        print(f"  drift: {n_pos} positions in {timing['wall_s']:.1f} s", flush=True)
    npz_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(d / "topk.npz", npz_path)
    return {**drift, "topk_file": npz_path.name, "top_k": DRIFT_TOP_K}, timing


# ---- CLI -------------------------------------------------------------------------------------------------

def cmd_eval(model: str, cfg: EvalConfig, out: Path, *, device: str = "auto", reference: Path | None = None,
             tasks_dir: Path | None = None) -> dict:
    """`forgetcheck eval`: resolve, print the resolved config, evaluate, print a summary table."""
    import logging

    from forgetcheck import models
    from forgetcheck.device import choose_device

    check(validate_eval(cfg))
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    ref = models.resolve(model)
    dev = choose_device(device)
    print(f"eval {ref.name} ({ref.path}{', RANDOM WEIGHTS' if ref.random_weights else ''}); {dev.describe()}; "
          f"suites {','.join(cfg.suites)}; tasks {','.join(cfg.tasks) or 'all of the suites'}; "
          f"limit {cfg.limit if cfg.limit is not None else 'all items'}; backend {cfg.backend}; "
          f"batch size {cfg.batch_size}", flush=True)
    doc = evaluate(ref, cfg, Path(out), device=dev.device, reference=reference, tasks_dir=tasks_dir)
    print(f"\n{'task':<28} {'suite':<10} {'n':>5} {'metric':<16} {'value':>10} {'stderr':>8}")
    for name, t in doc["tasks"].items():
        m = t["metrics"].get(t["primary_metric"], {})
        se = m.get("stderr")
        print(f"{name:<28} {t['suite']:<10} {t['n']:>5} {t['primary_metric']:<16} {m.get('value', float('nan')):>10.4f} "
              f"{'' if se is None else f'{se:.4f}':>8}")
    dr = doc["drift"]
    line = f"\ndrift text: {dr['text']['source']}; perplexity {dr['perplexity']:.3f}"
    if "kl" in dr:
        line += f"; KL(reference || model) {dr['kl']['mean']:.5f} nats/token (top-{DRIFT_TOP_K} + tail, lower bound)"
    print(line)
    print(f"wrote {out}")
    return doc
