"""`forgetcheck eval`: benchmark one model through lm-eval's Python API, offline, with per-item records and
a content-keyed cache; drift (eval/drift.py) is measured on general text in the same pass.

What one evaluation writes (docs/design.md, "The run folder"):
  * `<out>.json`  an `EvalFile` (schema.py): per task metrics with stderr and `higher_is_better` (from
    lm-eval), item count, chance, suite, kind, and `samples`, the per-item file relative to the JSON's folder;
  * `<out folder>/samples/<label>/<task>.jsonl`  one line per item (see `EvalFile`);
  * `<out folder>/samples/<label>/screen/<task>.jsonl`  the base's screen items (`screen=True`: retention
    multiple-choice tasks, `EvalConfig.screen_items` more items of the --limit order), recorded under the task's
    `screen` entry and never compared with another model: compare decides on them alone whether the task is
    informative (docs/verdicts.md, "Uninformative tasks");
  * `<out folder>/<label>.topk.npz`  the model's top-k next-token distribution on the drift text (eval/drift.py).

Which tasks and which items: eval/suites.py.

Per-item records: eval/records.py. Cache (each task's records and metrics, keyed by content): eval/cache.py; a
task's screen items are an entry of their own (its key adds `part` and the screen count to the compared items'
key), so the compared items' entry is the same with or without them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from forgetcheck import console
from forgetcheck.config import EvalConfig, check, to_dict, validate_eval
from forgetcheck.errors import RuntimeFailure
from forgetcheck.eval import cache, records
from forgetcheck.eval.drift import load_reference, measure_drift
from forgetcheck.eval.metrics import BITS_PER_BYTE, PERPLEXITY_METRICS, higher_is_better
from forgetcheck.eval.suites import TaskSpec, look_items, resolve_tasks, select_items, select_with_screen
from forgetcheck.models.registry import ModelRef, content_hash
from forgetcheck.rundir import atomic_write_jsonl
from forgetcheck.schema import EvalFile, write_eval

BOOTSTRAP_ITERS = 1000  # acc stderr is closed-form; this only matters for bootstrapped metrics


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
            from forgetcheck.models import registry

            t0 = time.perf_counter()
            self._model, self._tok = registry.load(self.ref, device=self.device, dtype=self.dtype,
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
    forgetcheck.eval.fast_lm is not available, and says so."""
    from lm_eval.models.huggingface import HFLM

    if backend == "fast":
        try:
            from forgetcheck.eval.fast_lm import FastLM
        except ImportError as e:
            console.say(f"note: --backend fast unavailable ({e}); using lm-eval's HFLM")
            return HFLM, "hf"
        return FastLM, "fast"
    return HFLM, "hf"


def eval_dtype(device: str) -> tuple[str, str]:
    """(dtype, why). Always fp32: log-likelihood differences between a base and its fine-tunes are small,
    and bf16 rounding would be of the same order."""
    return "float32", ("fp32 on CPU" if device == "cpu" else "fp32 for exact log-likelihoods")


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
    indices: list[int] | None  # the --limit subset (or the screen items), None for every item
    n_items: int
    part: str = "gated"  # "gated": the items every model is scored on; "screen": the base's screen items
    look: int = 0  # a sequential evaluation's look (1, 2, ...) whose new items these are; 0: not sequential


@dataclass(frozen=True)
class Looks:
    """A sequential evaluation (`--until-decided`, cli/sequential.py): `sizes` are the items per task at each look
    (the first is `--limit`, the last the cap) and `taken` how many looks of each task to score (1 where not
    named). Each look's new items (suites.look_items) are a cache entry of their own, so a later look scores only
    what is new, and every model of a check gets the same items at each look."""

    sizes: tuple[int, ...]
    taken: dict[str, int]

    def of(self, task: str) -> int:
        return self.taken.get(task, 1)


def _joint_groups(pending: list[_Pending], max_items: int = JOINT_ITEMS) -> list[list[_Pending]]:
    """Consecutive tasks packed into groups of at most `max_items` items (a larger task is a group alone); a task
    is in a group once (its screen items go to another call than its gated ones: lm-eval keys a call by task)."""
    groups: list[list[_Pending]] = []
    for p in pending:
        if (groups and sum(q.n_items for q in groups[-1]) + p.n_items <= max_items
                and all(q.spec.name != p.spec.name for q in groups[-1])):
            groups[-1].append(p)
        else:
            groups.append([p])
    return groups


@contextlib.contextmanager
def _without_env_probe():
    """For the duration of one simple_evaluate call, skip what lm-eval does after scoring to describe the
    environment: `git describe` in the current folder and torch's collect_env (several subprocesses: pip,
    lscpu, nvidia-smi, ...): seconds per call that buy nothing, since forgetcheck records versions, git hash and
    device in manifest.json itself (cost measured: docs/design.md, "Measured constants"). Restored afterwards:
    other callers get stock lm-eval."""
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
        if m in records.CHOICE_METRICS:
            xs = [r["metrics"][m] for r in rows]
            value, stderr = mean(xs), (mean_stderr(xs) if len(xs) > 1 else None)
        elif m in PERPLEXITY_METRICS:
            pairs = [(r["loglikelihood"], r[PERPLEXITY_METRICS[m]]) for r in rows]
            value, stderr = (bits_per_byte if m == BITS_PER_BYTE else weighted_perplexity)(pairs), None
        else:
            raise RuntimeFailure(f"data-parallel evaluation cannot merge metric '{m}' of task {spec.name}: "
                                 f"evaluate it in one process")
        out[m] = {"value": float(value), "stderr": None if stderr is None else float(stderr),
                  "higher_is_better": bool(hib.get(m, higher_is_better(m)))}
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
    own = {p.spec.name: records.records(p.spec, out["samples"][p.spec.name], runner.tokenizer) for p in mine}
    if world > 1:
        import torch.distributed as dist

        mine_meta = {p.spec.name: (own[p.spec.name], sorted(records.task_metrics(out["results"][p.spec.name], {})),
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
            metrics = records.task_metrics(out["results"][name], out["higher_is_better"].get(name, {}))
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
            console.detail(f"  {_what(p)}: {len(rows)} items in {wall:.1f} s ({rate:.2f} items/s){ranks}{joint}")
        out_rows.append((p, result, rows, {"cached": False, "wall_s": round(wall, 3), "items": len(rows),
                                           "items_per_s": round(rate, 3), "joint_tasks": len(group),
                                           "joint_items": total, "ranks": world}))
    return out_rows


def _what(p: _Pending) -> str:
    if p.look:
        return f"{p.spec.name} (look {p.look})"
    return f"{p.spec.name} (screen items)" if p.part == "screen" else p.spec.name


def _timing(timings: dict, task: str, t: dict) -> None:
    """A task's timing; a sequential task's looks add up (cached only when every look was)."""
    if task not in timings:
        timings[task] = t
        return
    was = timings[task]
    timings[task] = {"cached": bool(was.get("cached")) and bool(t.get("cached")),
                     "wall_s": round(was.get("wall_s", 0.0) + t.get("wall_s", 0.0), 3),
                     "items": was.get("items", 0) + t.get("items", 0)}


def _joined_looks(spec: TaskSpec, parts: list[tuple[int, dict, list[dict]]]) -> tuple[dict, list[dict]]:
    """One task's looks as one result: the rows in look order, each marked with its `look`, and the metrics
    recomputed over all of them with lm-eval's aggregations (as data-parallel ranks are merged)."""
    rows = [{**r, "look": k} for k, _, rs in sorted(parts, key=lambda x: x[0]) for r in rs]
    first = parts[0][1]
    hib = {m: v["higher_is_better"] for m, v in first["metrics"].items()}
    return {**first, "metrics": _merged_metrics(spec, rows, list(first["metrics"]), hib), "n": len(rows)}, rows


def screens(spec: TaskSpec) -> bool:
    """Whether a base scores screen items of this task: retention multiple-choice tasks, the ones the gate leaves
    out when the base is at chance on them (compare._informative)."""
    return spec.suite == "retention" and spec.kind == "multiple_choice"


def evaluate(model_ref: ModelRef, cfg: EvalConfig, out_file: Path, *, device: str = "cpu",
             reference: Path | None = None, label: str | None = None, tasks_dir: Path | None = None,
             device_map: str | None = None, skip: dict[str, str] | None = None, screen: bool = False,
             looks: Looks | None = None) -> dict:
    """Evaluate `model_ref` on the tasks of `cfg`, write `out_file` (EvalFile) and the per-item files, and
    return the EvalFile dict. `reference`: an earlier eval JSON (the base) to measure KL drift against.
    `tasks_dir`: lm-eval task YAMLs to use instead of forgetcheck's rendered tasks/. `skip`: {task: why} not
    scored (recorded under `skipped`; the drift text is still read from the suites' tasks). `screen`: this is a
    base: also score `cfg.screen_count()` screen items of each retention multiple-choice task (`screens`; with
    `looks`, the items after the cap's, so no look ever compares one). `looks`: score each task's first
    `looks.of(task)` looks instead of the --limit items; each row records its `look`."""
    check(validate_eval(cfg))
    out_file = Path(out_file)
    label = label or out_file.stem
    dtype, dtype_reason = eval_dtype(device)
    # hashing the weights (file reads and sha256, both outside the GIL) overlaps the mostly single-threaded
    # task loading
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        hashing = pool.submit(model_hash, model_ref)
        missing: dict[str, dict] = {}
        specs = resolve_tasks(cfg, tasks_dir, missing)
        ref_data = load_reference(reference) if reference is not None else None
        mhash = hashing.result()
    skipped = {s.name: (skip or {})[s.name] for s in specs if s.name in (skip or {})}
    scored = [s for s in specs if s.name not in skipped]
    versions = cache.versions()
    runner = _Model(model_ref, device, dtype, cfg, device_map)
    samples_dir = out_file.parent / "samples" / label
    done: dict[tuple[str, str, int], tuple[dict, list[dict]]] = {}  # (part, task, look) -> (result, rows)
    timings: dict[str, dict[str, dict]] = {"gated": {}, "screen": {}}
    backends: set[str] = set()
    pieces: list[_Pending] = []
    n_screen = cfg.screen_count() if screen else 0
    look_plan: dict[str, dict] = {}
    for spec in scored:
        common = dict(fmt=cache.CACHE_FORMAT, model=mhash, task=spec.config_hash, backend=cfg.backend,
                      device=device.split(":")[0], dtype=dtype, versions=versions)
        if spec.all_items:  # a run's recall task: every item (the facts the budget bought), never in looks
            pieces.append(_Pending(spec, cache.key(limit=None, **common), None, len(spec.task.eval_docs)))
            screen_idx = []
        elif looks is not None and cfg.limit is not None:
            chunks, cap_units = look_items(spec.task, list(looks.sizes), spec.kind, spec.config_hash)
            plain = select_items(spec.task, looks.sizes[0], spec.kind, spec.config_hash)
            taken = chunks[:looks.of(spec.name)]
            look_plan[spec.name] = {"sizes": list(looks.sizes), "items": [len(c) for c in taken],
                                    "cap_items": sum(len(c) for c in chunks), "cap_units": cap_units}
            for k, chunk in enumerate(taken, 1):
                if not chunk:
                    continue
                # the first look of a task without clusters is its --limit subset: the same entry as a fixed run's
                key = (cache.key(limit=cfg.limit, **common) if k == 1 and chunk == plain
                       else cache.key(part="look", items=cache.key(items=chunk), **common))
                pieces.append(_Pending(spec, key, chunk, len(chunk), look=k))
            screen_idx = []
            if n_screen and screens(spec):
                _, after = select_with_screen(spec.task, looks.sizes[-1], n_screen, spec.kind, spec.config_hash)
                compared = {i for c in chunks for i in c}
                screen_idx = [i for i in after if i not in compared]
        else:
            indices, screen_idx = select_with_screen(spec.task, cfg.limit, n_screen if screens(spec) else 0,
                                                     spec.kind, spec.config_hash)
            n_items = len(indices) if indices is not None else len(spec.task.eval_docs)
            pieces.append(_Pending(spec, cache.key(limit=cfg.limit, **common), indices, n_items))
        if screen_idx:
            # its own entry: the gated items' key stays what every model (and a base without screen items) uses
            skey = cache.key(limit=cfg.limit if looks is None else looks.sizes[-1], part="screen", screen=n_screen,
                             **common)
            pieces.append(_Pending(spec, skey, screen_idx, len(screen_idx), "screen"))
    console.set_total(len(pieces) + 1)  # every task (and its screen items), then drift
    missed: list[_Pending] = []
    for p in pieces:
        what = _what(p)
        t0 = time.perf_counter()
        hit = cache.read(p.key)
        if hit is not None:
            result, rows = hit
            backends.add(result.pop("backend_used"))
            console.detail(f"  {what}: cache hit, {len(rows)} items ({cache.cache_dir() / p.key})")
            console.advance()
            _timing(timings[p.part], p.spec.name, {"cached": True, "wall_s": round(time.perf_counter() - t0, 3),
                                                   "items": len(rows)})
            done[(p.part, p.spec.name, p.look)] = (result, rows)
        else:
            console.detail(f"  {what}: {p.n_items} items ({p.spec.kind}) ...")
            missed.append(p)
    missed.sort(key=lambda p: p.part != "gated")  # the gated items first; the screen items in calls of their own
    rank, world = data_parallel()
    for group in _joint_groups(missed):
        for p, result, rows, timing in _run_group(runner, group):
            if rank == 0:
                cache.write(p.key, {**result, "backend_used": runner.backend_used}, rows)
            backends.add(runner.backend_used)
            _timing(timings[p.part], p.spec.name, timing)
            done[(p.part, p.spec.name, p.look)] = (result, rows)
            console.advance()
    if rank != 0:  # data-parallel: rank 0 holds every row and writes the files
        return {}
    tasks: dict[str, dict] = {}
    for spec in scored:  # in the resolved order, whether cached or scored
        if spec.name in look_plan:
            result, rows = _joined_looks(spec, [(k, *done[key]) for key in sorted(done) for k in [key[2]]
                                                if key[:2] == ("gated", spec.name)])
            result["looks"] = look_plan[spec.name]
        else:
            result, rows = done[("gated", spec.name, 0)]
        sample_file = samples_dir / f"{spec.name}.jsonl"
        atomic_write_jsonl(sample_file, rows)
        tasks[spec.name] = {**result, "samples": str(sample_file.relative_to(out_file.parent))}
        if ("screen", spec.name, 0) in done:
            sresult, srows = done[("screen", spec.name, 0)]
            screen_file = samples_dir / "screen" / f"{spec.name}.jsonl"
            atomic_write_jsonl(screen_file, srows)
            tasks[spec.name]["screen"] = {"samples": str(screen_file.relative_to(out_file.parent)), "n": len(srows),
                                          "metrics": sresult["metrics"]}

    drift, drift_timing = measure_drift(runner.load, cache.entry(versions), out_file, label, mhash, specs, ref_data,
                                        device, dtype, tasks_dir)
    console.advance()
    n_items = sum(t["n"] for t in tasks.values())
    n_screened = sum(t["screen"]["n"] for t in tasks.values() if "screen" in t)
    n_cached = sum(bool(t["cached"]) for t in timings["gated"].values())
    console.note(f"{len(tasks)} tasks, {n_items:,} items ({n_cached} from the cache)"
                 + (f"; {n_screened:,} screen items (base only: which tasks are informative)" if n_screened else "")
                 + (f"; {len(skipped)} skipped (the base is at chance on them)" if skipped else "")
                 + (f"; {len(missing)} MISSING (data not built: {', '.join(sorted(missing))})" if missing else "")
                 + (f"; KL from base {drift['kl']['mean']:.4f} nats/token" if "kl" in drift else ""))
    doc: EvalFile = {
        "model": {**model_ref.to_dict(), "content_hash": mhash},
        "config": to_dict(cfg),
        "limit": cfg.limit,
        **({"screen_items": n_screen} if screen else {}),
        **({"looks": {"sizes": list(looks.sizes)}} if looks is not None and look_plan else {}),  # a base's: what it asked for (0: none)
        "backend": cfg.backend,
        "backend_used": sorted(b for b in backends if b),
        "device": device,
        "dtype": dtype,
        "dtype_reason": dtype_reason,
        "versions": versions,
        "tasks": tasks,
        **({"skipped": skipped} if skipped else {}),
        **({"missing": missing} if missing else {}),
        "drift": drift,
        "timings": {"tasks": timings["gated"], **({"screen": timings["screen"]} if timings["screen"] else {}),
                    "drift": drift_timing},
    }
    return dict(write_eval(out_file, doc))
