"""`forgetcheck eval`: benchmark one model through lm-eval's Python API, offline, with per-item records and
a content-keyed cache; drift (drift.py) is measured on general text in the same pass.

What one evaluation writes (docs/design.md, "The run folder"):
  * `<out>.json`  an `EvalFile` (schema.py): per task metrics with stderr and `higher_is_better` (from
    lm-eval), item count, chance, suite, kind, and `samples`, the per-item file relative to the JSON's folder;
  * `<out folder>/samples/<label>/<task>.jsonl`  one line per item (see `EvalFile`);
  * `<out folder>/<label>.topk.npz`  the model's top-k next-token distribution on the drift text (drift.py).

Which tasks and which items: suites.py.

Cache: each task's records and metrics are kept under `$FORGETCHECK_HOME/eval_cache/<key>/`, the key hashing
the model's weights and config, the task's rendered config and data files, the limit, the backend, the
device/dtype and the library versions. Evaluating the same model again reads them back unchanged, without
loading the model.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgetcheck import console
from forgetcheck.config import EvalConfig, check, forgetcheck_home, to_dict, validate_eval
from forgetcheck.drift import DRIFT_TOP_K, load_reference, measure_drift
from forgetcheck.errors import BadInput, RuntimeFailure
from forgetcheck.models import ModelRef, content_hash
from forgetcheck.rundir import atomic_write_json, atomic_write_jsonl, package_versions, read_json, read_jsonl
from forgetcheck.schema import EvalFile, write_eval
from forgetcheck.suites import TaskSpec, resolve_tasks, select_items

BOOTSTRAP_ITERS = 1000  # acc stderr is closed-form; this only matters for bootstrapped metrics
CACHE_FORMAT = 4  # 4: records hold every choice's text and the model's picks; WinoGrande's target is the gold index


# ---- per-item records ------------------------------------------------------------------------------------

PROMPT_CHARS = 600  # tail of each multiple-choice context kept in the per-item record (for flip examples)
CHOICE_CHARS = 400  # of each choice (a WinoGrande choice is its whole filled-in sentence)


def gold_index(task, doc: Any, choices: list[str]) -> int | None:
    """The right choice's index, as lm-eval scores it: a task with one context per choice (WinoGrande)
    names its answer with doc_to_text, the others with doc_to_target (an index or the choice's text)."""
    gold = task.doc_to_text(doc) if getattr(task, "multiple_input", 0) else task.doc_to_target(doc)
    if isinstance(gold, str):
        gold = int(gold) if gold.strip().isdigit() else (choices.index(gold) if gold in choices else None)
    return int(gold) if isinstance(gold, int) and 0 <= gold < len(choices) else None


def chosen(task, doc: Any, lls: list[float]) -> dict[str, int]:
    """The model's pick as lm-eval scores it: `acc` the highest log-likelihood, `acc_norm` the highest per
    character of the choice (lm-eval's completion length)."""
    picks = {"acc": max(range(len(lls)), key=lls.__getitem__)}
    try:
        lengths = [float(len(c)) for c in task.doc_to_choice(doc)] if doc is not None else []
    except Exception:  # a task whose choices cannot be rebuilt from the doc: acc only
        lengths = []
    if len(lengths) == len(lls) and all(lengths):
        picks["acc_norm"] = max(range(len(lls)), key=lambda i: lls[i] / lengths[i])
    return picks


def item_text(args: list) -> tuple[str, list[str]]:
    """(question, choices) of one item as the model saw it, from its requests' (context, continuation)
    pairs. Most tasks share one context (the question) and differ in the continuation; a task with one
    context per choice (WinoGrande) shares the continuation, so each choice is its whole filled-in sentence."""
    contexts, conts = [str(a[0]) for a in args], [str(a[1]) for a in args]
    if len(set(contexts)) > 1:
        return "", [(c + x).strip()[-CHOICE_CHARS:] for c, x in zip(contexts, conts)]
    return contexts[0][-PROMPT_CHARS:], [x[:CHOICE_CHARS] for x in conts]


def _records(spec: TaskSpec, samples: list[dict], tok) -> list[dict]:
    rows = []
    for s in sorted(samples, key=lambda x: x["doc_id"]):
        if spec.kind == "multiple_choice":
            lls = [float(r[0]) for r in s["filtered_resps"]]
            greedy = [bool(r[1]) for r in s["filtered_resps"]]
            metrics = {m: float(s[m]) for m in ("acc", "acc_norm") if m in s}
            args = [a for a in (s.get("arguments") or []) if isinstance(a, (list, tuple)) and len(a) == 2]
            prompt, choices = item_text(args) if args else ("", [])
            target = s["target"]
            if not isinstance(target, int) and "doc" in s:  # WinoGrande logs the shared continuation
                target = gold_index(spec.task, s["doc"], choices)
            correct = bool(metrics["acc"]) if "acc" in metrics else lls.index(max(lls)) == target
            row = {"doc_id": int(s["doc_id"]), "doc_hash": s["doc_hash"], "target": target,
                   "loglikelihoods": lls, "is_greedy": greedy, "correct": correct, "metrics": metrics,
                   "chosen": chosen(spec.task, s.get("doc"), lls)}
            if args:  # the item as the model saw it, for the report's flipped items
                row["prompt"], row["choices"] = prompt, choices
            doc = s.get("doc")
            if isinstance(doc, dict) and doc.get("cluster") is not None:
                row["cluster"] = str(doc["cluster"])
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
        if isinstance(s.get("doc"), dict) and s["doc"].get("cluster") is not None:
            rows[-1]["cluster"] = str(s["doc"]["cluster"])  # items sharing a source (compare resamples clusters)
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

    def __init__(self, ref: ModelRef, device: str, dtype: str, cfg: EvalConfig, device_map: str | None = None):
        self.ref, self.device, self.dtype, self.cfg = ref, device, dtype, cfg
        self.device_map = device_map
        self._model = self._tok = self._lm = None
        self.backend_used: str | None = None

    def load(self):
        if self._model is None:
            from forgetcheck import models

            t0 = time.perf_counter()
            self._model, self._tok = models.load(self.ref, device=self.device, dtype=self.dtype,
                                                 device_map=self.device_map)
            where = self.device
            if self.device_map:
                where = f"{sorted({str(d) for d in getattr(self._model, 'hf_device_map', {}).values()})} (device map)"
            console.detail(f"loaded {self.ref.name} on {where} ({self.dtype}) in {time.perf_counter() - t0:.1f} s")
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
            console.say(f"note: --backend fast unavailable ({e}); using lm-eval's HFLM")
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


def _entry(versions: dict):
    """The cache folder of one result: `cache_entry(**key_parts)` (the format and versions always in the key)."""
    return lambda **parts: cache_dir() / _key(fmt=CACHE_FORMAT, versions=versions, **parts)


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


def data_parallel() -> tuple[int, int]:
    """(rank, world) of data-parallel evaluation: this process's place in an initialized process group (the
    ranks of `torchrun ... -m forgetcheck eval`), else (0, 1)."""
    try:
        import torch.distributed as dist
    except ImportError:
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _merged_metrics(spec: TaskSpec, rows: list[dict], names: list[str], hib: dict) -> dict:
    """The task's metrics recomputed from every rank's per-item rows with lm-eval's own aggregations, so N ranks
    report what one process would: acc/acc_norm (mean, closed-form stderr); word/byte perplexity and bits per
    byte (weighted by words / bytes; lm-eval gives them no stderr)."""
    from lm_eval.api.metrics import bits_per_byte, mean, mean_stderr, weighted_perplexity

    out = {}
    for m in names:
        if m in ("acc", "acc_norm"):
            xs = [r["metrics"][m] for r in rows]
            value, stderr = mean(xs), (mean_stderr(xs) if len(xs) > 1 else None)
        elif m == "word_perplexity":
            value, stderr = weighted_perplexity([(r["loglikelihood"], r["words"]) for r in rows]), None
        elif m == "byte_perplexity":
            value, stderr = weighted_perplexity([(r["loglikelihood"], r["bytes"]) for r in rows]), None
        elif m == "bits_per_byte":
            value, stderr = bits_per_byte([(r["loglikelihood"], r["bytes"]) for r in rows]), None
        else:
            raise RuntimeFailure(f"data-parallel evaluation cannot merge metric '{m}' of task {spec.name}: "
                                 f"evaluate it in one process")
        out[m] = {"value": float(value), "stderr": None if stderr is None else float(stderr),
                  "higher_is_better": bool(hib.get(m, True))}
    return out


def _run_group(runner: _Model, group: list[_Pending]) -> list[tuple[_Pending, dict, list[dict], dict]]:
    """Score the tasks of `group` in one simple_evaluate call: (pending, result, per-item rows, timing) each.
    Data-parallel (see `data_parallel`): rank r scores items r, r+N, r+2N, ... of each task's item list, and
    every rank gets all rows back, in doc_id order, with the metrics recomputed from them."""
    from lm_eval import simple_evaluate

    rank, world = data_parallel()
    lm = runner.lm()
    if world == 1:
        samples = {p.spec.name: p.indices for p in group if p.indices}
        mine = list(group)
    else:
        samples = {}
        for p in group:
            every = p.indices if p.indices is not None else list(range(p.n_items))
            samples[p.spec.name] = every[rank::world]
        mine = [p for p in group if samples[p.spec.name]]
    t0 = time.perf_counter()
    out = {"samples": {}, "results": {}, "higher_is_better": {}}
    if mine:
        # lm-eval returns results only where LOCAL_RANK is 0 (its guard for tensor-parallel torchrun); here every
        # rank scores its own items with a single-process model, so each must get its results back
        saved_local = os.environ.pop("LOCAL_RANK", None) if world > 1 else None
        try:
            with _without_env_probe():
                out = simple_evaluate(model=lm, tasks=[p.spec.task for p in mine], task_manager=_bare_task_manager(),
                                      samples={n: samples[n] for n in (p.spec.name for p in mine) if n in samples}
                                      or None, log_samples=True, bootstrap_iters=BOOTSTRAP_ITERS)
        finally:
            if saved_local is not None:
                os.environ["LOCAL_RANK"] = saved_local
    own = {p.spec.name: _records(p.spec, out["samples"][p.spec.name], runner.tokenizer) for p in mine}
    if world > 1:
        import torch.distributed as dist

        mine_meta = {p.spec.name: (own[p.spec.name], sorted(_metrics(out["results"][p.spec.name], {})),
                                   out["higher_is_better"].get(p.spec.name, {})) for p in mine}
        gathered: list[dict] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(gathered, mine_meta)
    wall = time.perf_counter() - t0
    done = []
    total = 0
    for p in group:
        name = p.spec.name
        if world == 1:
            rows = own[name]
            metrics = _metrics(out["results"][name], out["higher_is_better"].get(name, {}))
        else:
            parts = [g[name] for g in gathered if name in g]
            rows = sorted((r for part in parts for r in part[0]), key=lambda r: r["doc_id"])
            metrics = _merged_metrics(p.spec, rows, parts[0][1], parts[0][2])
        result = {"suite": p.spec.suite, "kind": p.spec.kind, "primary_metric": p.spec.primary_metric,
                  "metrics": metrics, "n": len(rows), "chance": p.spec.chance}
        done.append((p, result, rows))
        total += len(rows)
    rate = total / wall if wall > 0 else float("inf")
    joint = f" (scored with {len(group) - 1} other task(s) in one pass: {total} items)" if len(group) > 1 else ""
    ranks = f" on {world} ranks" if world > 1 else ""
    out_rows = []
    for p, result, rows in done:
        # a joint pass interleaves its tasks' requests, so the time and rate are the pass's, not the task's own
        if rank == 0:
            console.detail(f"  {p.spec.name}: {len(rows)} items in {wall:.1f} s ({rate:.2f} items/s){ranks}{joint}")
        out_rows.append((p, result, rows, {"cached": False, "wall_s": round(wall, 3), "items": len(rows),
                                           "items_per_s": round(rate, 3), "joint_tasks": len(group),
                                           "joint_items": total, "ranks": world}))
    return out_rows


def evaluate(model_ref: ModelRef, cfg: EvalConfig, out_file: Path, *, device: str = "cpu",
             reference: Path | None = None, label: str | None = None, tasks_dir: Path | None = None,
             device_map: str | None = None) -> dict:
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
    console.set_total(len(specs) + 1)  # every task, then drift
    versions = _versions()
    runner = _Model(model_ref, device, dtype, cfg, device_map)
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
            console.detail(f"  {spec.name}: cache hit, {len(rows)} items ({cache_dir() / key})")
            console.advance()
            timings[spec.name] = {"cached": True, "wall_s": round(time.perf_counter() - t0, 3), "items": len(rows)}
            done[spec.name] = (result, rows)
        else:
            console.detail(f"  {spec.name}: {n_items} items ({spec.kind}) ...")
            missed.append(_Pending(spec, key, indices, n_items))
    rank, world = data_parallel()
    for group in _joint_groups(missed):
        for p, result, rows, timing in _run_group(runner, group):
            if rank == 0:
                _cache_write(p.key, {**result, "backend_used": runner.backend_used}, rows)
            backends.add(runner.backend_used)
            timings[p.spec.name] = timing
            done[p.spec.name] = (result, rows)
            console.advance()
    if rank != 0:  # data-parallel: rank 0 holds every row and writes the files
        return {}
    tasks: dict[str, dict] = {}
    for spec in specs:  # in the resolved order, whether cached or scored
        result, rows = done[spec.name]
        sample_file = samples_dir / f"{spec.name}.jsonl"
        atomic_write_jsonl(sample_file, rows)
        tasks[spec.name] = {**result, "samples": str(sample_file.relative_to(out_file.parent))}

    drift, drift_timing = measure_drift(runner.load, _entry(versions), out_file, label, mhash, specs, ref_data,
                                        device, dtype, tasks_dir)
    console.advance()
    n_items = sum(t["n"] for t in tasks.values())
    console.note(f"{len(tasks)} tasks, {n_items:,} items ({sum(bool(t['cached']) for t in timings.values())} "
                 f"from the cache)" + (f"; KL from base {drift['kl']['mean']:.4f} nats/token" if "kl" in drift else ""))
    doc: EvalFile = {
        "model": {**model_ref.to_dict(), "content_hash": mhash},
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
    return dict(write_eval(out_file, doc))


# ---- CLI -------------------------------------------------------------------------------------------------

def cmd_eval(model: str, cfg: EvalConfig, out: Path, *, device: str = "auto", reference: Path | None = None,
             tasks_dir: Path | None = None, device_map: str | None = None, verbose: bool = False) -> dict:
    """`forgetcheck eval`: resolve, print the resolved config, evaluate, print a summary table. The libraries'
    output goes to `<out folder>/<out stem>.log.txt` (console.py) unless `verbose`."""
    with console.session(verbose=verbose):
        return _cmd_eval(model, cfg, out, device=device, reference=reference, tasks_dir=tasks_dir,
                         device_map=device_map)


def _cmd_eval(model: str, cfg: EvalConfig, out: Path, *, device: str, reference: Path | None,
              tasks_dir: Path | None, device_map: str | None) -> dict:
    import logging

    from forgetcheck import models, sharding
    from forgetcheck.device import choose_device
    from forgetcheck.rundir import check_output_file
    from forgetcheck.schema import require
    from forgetcheck.suites import task_problems

    ext = sharding.external_ranks()
    problems = validate_eval(cfg)
    if device_map not in (None, "auto", "balanced", "sequential"):
        problems.append(f"unknown --device-map '{device_map}': use auto, balanced or sequential")
    if ext is not None and device_map:
        problems.append("--device-map splits one model over the GPUs, but under torchrun every process scores its "
                        "own items with a whole model: use one or the other")
    for step in (lambda: models.resolve(model, prepare=False, flag="--model"), lambda: choose_device(device),
                 lambda: check_output_file(Path(out), "--out"),
                 lambda: reference is not None and require(read_json(reference), "eval", f"--reference {reference}")):
        try:
            step()
        except BadInput as e:
            problems.append(str(e))
    if not problems:
        problems += task_problems(cfg, tasks_dir)
    check(problems)  # everything refused before a model is built or loaded and before anything is written
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    dev = choose_device(device)
    dev_name, rank = dev.device, 0
    if ext is not None:  # data-parallel: every rank scores its share of the items; rank 0 writes the files
        import torch.distributed as dist

        rank, _, dev_name = sharding.join_external(dev.device)
        if rank != 0:
            dist.barrier()  # rank 0 prepares the model folder first
    ref = models.resolve(model, flag="--model")
    if ext is not None and rank == 0:
        dist.barrier()
    if rank != 0:
        evaluate(ref, cfg, Path(out), device=dev_name, reference=reference, tasks_dir=tasks_dir)
        return {}
    if device_map:
        dev_name = "cuda" if dev_name.startswith("cuda") else dev_name
    log = Path(out).parent / f"{Path(out).stem}.log.txt"
    console.log_to(log)
    console.say(f"eval {ref.name} ({ref.path}{', RANDOM WEIGHTS' if ref.random_weights else ''}); {dev.describe()}; "
          f"suites {','.join(cfg.suites)}; tasks {','.join(cfg.tasks) or 'all of the suites'}; "
          f"limit {cfg.limit if cfg.limit is not None else 'all items'}; backend {cfg.backend}; "
          f"batch size {cfg.batch_size}" + (f"; data-parallel over {ext['world']} processes ({ext['source']})"
                                            if ext else "") + f"; log: {log}")
    with console.stage(f"evaluate {ref.name}"):
        doc = evaluate(ref, cfg, Path(out), device=dev_name, reference=reference, tasks_dir=tasks_dir,
                       device_map=device_map)
    console.say(f"{'task':<28} {'suite':<10} {'n':>5} {'metric':<16} {'value':>10} {'stderr':>8}")
    for name, t in doc["tasks"].items():
        m = t["metrics"].get(t["primary_metric"], {})
        se = m.get("stderr")
        console.say(f"{name:<28} {t['suite']:<10} {t['n']:>5} {t['primary_metric']:<16} {m.get('value', float('nan')):>10.4f} "
              f"{'' if se is None else f'{se:.4f}':>8}")
    dr = doc["drift"]
    line = f"drift text: {dr['text']['source']}; perplexity {dr['perplexity']:.3f}"
    if "kl" in dr:
        line += f"; KL(reference || model) {dr['kl']['mean']:.5f} nats/token (top-{DRIFT_TOP_K} + tail, lower bound)"
    console.say(line)
    console.say(f"wrote {out}")
    return doc
