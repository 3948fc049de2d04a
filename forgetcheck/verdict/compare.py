"""Paired comparison of each fine-tuned arm against the base: what was forgotten, what was learned, and
whether each difference is real.

Pure: reads the run directory's JSON and JSONL, writes `compare.json`. Never imports torch, transformers or
lm-eval (CI runs it on JSON alone).

Per task and arm (items paired across models by `doc_hash`, else `doc_id`; methods in forgetcheck/verdict/stats.py and
docs/verdicts.md):
- base and arm score of the task's primary metric, and the *oriented* delta: positive is better, negative
  is worse, whatever the metric's direction (`higher_is_better`). Accuracy-like metrics are in points
  (x100); perplexity metrics keep their own units.
- `acc`: the Bonett-Price estimate for 0/1 scores (design effect for clustered items), `soft`: the paired
  difference of soft accuracy (probability on the correct choice) with a cluster-bootstrap standard error;
  each with its (1 - alpha) interval and the two-sided p-value of the same method (they always agree); Holm's
  correction across the gated retention tasks (accuracy, informative) per arm;
- `informative`: whether the base is significantly above chance (else the task cannot show forgetting), tested
  on the base's screen items, never on the compared ones where the base has screen items (`_screen`);
- flip counts (right->wrong, wrong->right) and a few examples each way.
Suite means (accuracy-like tasks; over informative tasks and over all, for acc and soft; the variance is the
sum of the task variances), general-text drift with intervals (bits-per-byte rise, mean KL), arm against arm
on the same items, the budget each arm spent, and a learning-vs-forgetting summary per arm (Biderman et al.
2024, "LoRA Learns Less and Forgets Less": forgetting = drop of the mean retention score, learning = gain of
the mean domain score).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from forgetcheck.errors import BadInput
from forgetcheck.eval.metrics import BITS_PER_BYTE, PERPLEXITY_METRICS, higher_is_better
from forgetcheck.rundir import RunDir, confined
from forgetcheck.schema import (
    COMPARE_VERSION,
    LMEVAL_MODEL_KIND,
    EvalFile,
    ItemRecord,
    compare_doc,
    item_doc,
    read_config,
    read_eval,
    read_items,
    write_compare,
)
from forgetcheck.verdict import budget, flips, rollup
from forgetcheck.verdict.stats import (
    Estimate,
    above_chance_p,
    bootstrap_se,
    cluster_means,
    paired_binary,
    paired_mean,
    soft_scores,
)

# ---- metrics of a task, from its items ----------------------------------------------------------------------

def metric_scale(metric: str, kind: str | None) -> tuple[float, str]:
    """(scale, unit) of a metric's deltas: points for accuracy-like metrics, own units for perplexity."""
    if metric in PERPLEXITY_METRICS or kind == "perplexity":
        return 1.0, metric
    return 100.0, "points"


class TaskItems:
    """One model's per-item records of one task, as arrays keyed for pairing."""

    def __init__(self, rows: list[ItemRecord], metric: str, kind: str | None):
        self.rows = rows
        self.keys = _pair_keys(rows)
        self.metric, self.kind = metric, kind

    def values(self, idx: list[int]) -> dict[str, np.ndarray]:
        rows = [self.rows[i] for i in idx]
        if self.metric in PERPLEXITY_METRICS:
            return {
                "ll": np.array([float(r["loglikelihood"]) for r in rows]),
                "words": np.array([float(r["words"] or 0) for r in rows]),
                "bytes": np.array([float(r["bytes"] or 0) for r in rows]),
            }
        return {"x": np.array([_item_score(r, self.metric) for r in rows], dtype=float)}


def _item_score(row: ItemRecord, metric: str) -> float:
    m = row["metrics"] or {}
    if metric in m and m[metric] is not None:
        return float(m[metric])
    if metric == "acc" and "correct" in row:
        return float(bool(row["correct"]))
    raise KeyError(metric)


def _pair_keys(rows: list[ItemRecord]) -> list[str]:
    """doc_hash (else doc_id); repeated keys (duplicate documents) get a running suffix in doc_id order."""
    seen: Counter[str] = Counter()
    keys = []
    for r in rows:
        base = r["doc_hash"] or f"id:{r['doc_id']}"
        k = seen[base]
        seen[base] += 1
        keys.append(base if k == 0 else f"{base}#{k}")
    return keys


def corpus_metric(metric: str, v: dict[str, np.ndarray], w: np.ndarray | None = None) -> np.ndarray | float:
    """The task metric from item arrays; with `w` (bootstrap rows of indices) one value per row."""
    if metric in PERPLEXITY_METRICS:
        def tot(a):
            return a.sum() if w is None else a[w].sum(axis=1)

        ll, denom = tot(v["ll"]), tot(v[PERPLEXITY_METRICS[metric]])
        if metric == BITS_PER_BYTE:
            return -ll / denom / math.log(2)
        return np.exp(-ll / denom)
    x = v["x"]
    return x.mean() if w is None else x[w].mean(axis=1)


# ---- loading ---------------------------------------------------------------------------------------------

def load_eval(path: Path) -> EvalFile:
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path} not found: run `forgetcheck eval` (or `forgetcheck run`) to write it")
    return read_eval(path)


class Evaluation(NamedTuple):
    """One model's evaluation as compare reads it: where its eval JSON is (a task's `samples` path is relative to
    its folder), the eval document (typed: `schema.eval_doc`), and, when they are already in memory, each task's
    per-item records (`items`: {task: rows}) and a base's screen items (`screen`: {task: rows}): the validity
    bench's synthetic runs. With `items` None every record is read from the files the document names, as
    `forgetcheck compare` does."""

    path: Path
    doc: EvalFile
    items: dict[str, list[dict]] | None = None
    screen: dict[str, list[dict]] | None = None


def evaluation(source: Path | str | Evaluation) -> Evaluation:
    """An eval JSON file (its records read per task when needed), or an `Evaluation` as given."""
    return source if isinstance(source, Evaluation) else Evaluation(Path(source), load_eval(Path(source)))


def task_items(ev: Evaluation, task: str, entry: dict) -> list[ItemRecord] | None:
    """The task's per-item records in pairing order (doc_id, then doc_hash): from memory when `ev` holds them,
    else from its samples file (`load_items`); None when there are none."""
    if ev.items is None:
        return load_items(ev.path, task, entry)
    rows = ev.items.get(task)
    return _in_order([item_doc(r) for r in rows]) if rows else None


def task_screen(ev: Evaluation, task: str, entry: dict) -> list[ItemRecord] | None:
    """A base's screen items of the task, in order: from memory when `ev` holds its records, else from the screen
    samples file (`load_screen`); None when there are none."""
    if ev.items is None:
        return load_screen(ev.path, task, entry)
    rows = (ev.screen or {}).get(task)
    return _in_order([item_doc(r) for r in rows]) if rows else None


def load_items(eval_path: Path, task: str, entry: dict) -> list[ItemRecord] | None:
    rel = entry["samples"]
    if not rel:
        return None
    # a run folder may only point inside itself: a samples path is relative to the eval JSON's folder
    p = confined(Path(eval_path).parent, rel, f"{eval_path}: tasks.{task}.samples")
    if not p.is_file():
        return None
    return _in_order(read_items(p))


def _in_order(rows: list[ItemRecord]) -> list[ItemRecord]:
    rows.sort(key=lambda r: (_sortable(r["doc_id"]), str(r["doc_hash"])))
    return rows


def load_screen(eval_path: Path, task: str, entry: dict) -> list[ItemRecord] | None:
    """The base's screen items of a task (eval/runner.py: scored for the base only), or None when it has none."""
    screen = entry["screen"]
    if not screen or not screen["samples"]:
        return None
    p = confined(Path(eval_path).parent, screen["samples"], f"{eval_path}: tasks.{task}.screen.samples")
    if not p.is_file():
        return None
    return _in_order(read_items(p)) or None


def _sortable(x):
    return (0, x, "") if isinstance(x, (int, float)) else (1, 0, str(x))


def _metric_value(entry: dict, metric: str) -> tuple[float | None, bool | None]:
    m = entry["metrics"].get(metric)
    if m is None:
        return None, None
    v = m["value"]
    return (float(v) if v is not None else None), m["higher_is_better"]


# ---- one task ----------------------------------------------------------------------------------------------

def compare_task(name: str, base_eval: Evaluation, arm_evals: dict[str, Evaluation], *,
                 alpha: float, n_boot: int, seed: int) -> tuple[dict, dict[str, dict]]:
    """Compare one task for every arm that has it. Returns (entry, {arm: per-item arrays for arm-vs-arm})."""
    base = base_eval.doc
    bentry = base["tasks"][name]
    metric = bentry["primary_metric"] or "acc"
    kind = bentry["kind"] or ("perplexity" if metric in PERPLEXITY_METRICS else "multiple_choice")
    base_value, hib = _metric_value(bentry, metric)
    hib = higher_is_better(metric) if hib is None else bool(hib)
    scale, unit = metric_scale(metric, kind)
    sign = 1.0 if hib else -1.0
    out: dict[str, Any] = {
        "suite": bentry["suite"], "kind": kind, "metric": metric, "higher_is_better": hib,
        "unit": unit, "scale": scale, "chance": _scaled(bentry["chance"], scale),
        "base": {"score": _scaled(base_value, scale), "n": bentry["n"]}, "arms": {}, "notes": [],
        "informative": None,  # below, once the arms' items are known
    }
    paired_items: dict[str, dict] = {}
    base_rows = task_items(base_eval, name, bentry)
    base_items = TaskItems(base_rows, metric, kind) if base_rows else None
    arm_keys: set[str] = set()  # every item some arm was scored on

    for arm, arm_eval in arm_evals.items():
        aev = arm_eval.doc
        if name not in aev["tasks"]:
            why = aev["skipped"].get(name) or aev["missing"].get(name, {"why": None})["why"] or "task not evaluated"
            out.setdefault("unscored", {})[arm] = why  # what the gate and the report read
            out["notes"].append(f"{arm}: not scored: {why}")
            continue
        aentry = aev["tasks"][name]
        arm_value, _ = _metric_value(aentry, metric)
        res: dict[str, Any] = {"score": _scaled(arm_value, scale), "n": aentry["n"]}
        arm_rows = task_items(arm_eval, name, aentry)
        paired = None
        if base_items is not None and arm_rows:
            arm_items = TaskItems(arm_rows, metric, kind)
            arm_keys.update(arm_items.keys)
            try:
                paired = _paired_stats(name, arm, base_items, arm_items, scale=scale, sign=sign, alpha=alpha,
                                       n_boot=n_boot, seed=seed)
            except KeyError as e:
                out["notes"].append(f"{arm}: per-item records lack metric {e}; scores from the aggregate")
        if paired is not None:
            stats, items, base_extra = paired
            if (stats.get("soft") or {}).get("looks") is not None and bentry["looks"]:
                stats["soft"]["plan_units"] = bentry["looks"]["cap_units"]  # what the gate's bets are tuned for
            res.update(stats)
            out["base"].update(base_extra)
            paired_items[arm] = items
        else:
            if base_value is not None and arm_value is not None:
                res["delta"] = sign * (arm_value - base_value) * scale + 0.0
            else:
                res["delta"] = None
            res.update({"ci": None, "p_value": None, "test": None, "n_paired": 0, "source": "aggregate",
                        "acc": None, "soft": None})
            out["notes"].append(f"{arm}: no paired per-item records; delta from aggregate scores, no CI or test")
        out["arms"][arm] = res
    screen_rows = task_screen(base_eval, name, bentry)
    screen = _screen(base_items, TaskItems(screen_rows, metric, kind) if screen_rows else None, arm_keys,
                     lambda: _why_no_screen(base, bentry))
    out["informative"] = _informative(out, screen, alpha)
    return out, paired_items


MIN_SCREEN = 20
"""The fewest separate items the informative test runs on (fewer when the task compares fewer): a screen of a few
items cannot show a task informative (one right item of four choices has p = 0.25), so a task with barely more
items than --limit (fc_us_state_abbreviation: 51 items, 1 screen item at --limit 50) falls back to the compared
items rather than being left out. At 20 items the exact test at alpha 0.05 rejects chance 0.25 from 9 right, chance
0.5 from 15."""


def _screen(base: TaskItems | None, screen: TaskItems | None, arm_keys: set[str],
            why_none) -> tuple[TaskItems | None, dict]:
    """The base items the informative test runs on, and what they are (compare.json `informative`: `items`,
    `separate`, `note`). The gated set must be fixed before the gated items are seen, so the test uses items that
    are never compared: the base's screen items (eval/runner.py); else base items no arm was scored on (lm-eval
    outputs of the base at a larger limit); either only when there are at least MIN_SCREEN of them (or as many as
    the compared items); else, as forgetcheck did before screens, the base's own compared items, with a note
    saying so (`why_none()`: why there were no screen items)."""
    compared = len(base.rows) if base is not None else 0
    few = None
    if screen is not None:
        if len(screen.rows) >= min(MIN_SCREEN, compared or 1):
            return screen, {"items": "screen", "separate": True, "note": None}
        few = (f"only {len(screen.rows)} screen item(s), fewer than {min(MIN_SCREEN, compared)}: the task has few "
               f"items beyond the --limit ones")
    elif base is not None and arm_keys:
        only = [i for i, k in enumerate(base.keys) if k not in arm_keys]
        compared -= len(only)
        if compared and len(only) >= min(MIN_SCREEN, compared):
            rows = [base.rows[i] for i in only]
            return TaskItems(rows, base.metric, base.kind), {"items": "unpaired", "separate": True, "note": None}
    note = (f"screened on the gated items themselves: {few or 'no separate screen items (' + why_none() + ')'}, so "
            f"which tasks are gated depends on the items the gate then judges")
    return base, {"items": "compared", "separate": False, "note": note}


def _why_no_screen(base: EvalFile, entry: dict) -> str:
    """Why a task of a base evaluation has no screen items, in words."""
    asked = base["screen_items"]
    if (base["model"] or {}).get("kind") == LMEVAL_MODEL_KIND:
        return ("the base's lm-eval outputs hold too few items no candidate has; evaluate the base with a larger "
                "--limit than the candidates to screen on the rest")
    if asked is None:
        return ("the base evaluation scored none: it was written by a forgetcheck before screen items, or evaluated "
                "as a compared model (`forgetcheck eval --reference`)")
    if asked == 0:
        return ("no --limit: every item is compared, none is left to screen on" if base["limit"] is None
                else "--screen-items 0")
    if entry["suite"] != "retention" or entry["kind"] != "multiple_choice":
        return "only retention multiple-choice tasks get screen items"
    return f"the --limit {base['limit']} items are every item of the task: none is left to screen on"


SCREEN_WORDS = {"screen": "screen items (never compared with an arm)", "unpaired": "base items no arm was scored on",
                "compared": "compared items"}


def _informative(t: dict, screen: tuple[TaskItems | None, dict], alpha: float) -> dict:
    """Is the base clearly above chance on this task (exact one-sided binomial test at alpha), on the items
    `_screen` chose? A model at chance has nothing to forget: the task cannot show forgetting at this model
    size."""
    chance = t["chance"]
    items, used = screen
    none = {"value": True, "p_value": None, "screen": None, "separate": None, "items": None, "note": None}
    if t["unit"] != "points" or chance is None or items is None:
        return {**none, "reason": "no chance level or per-item records: kept"}
    try:
        x = items.values(list(range(len(items.rows))))["x"]
    except KeyError:
        return {**none, "reason": "per-item scores unreadable: kept"}
    if not np.isin(x, (0.0, 1.0)).all() or not t["higher_is_better"]:
        return {**none, "reason": "not a 0/1 score: kept"}
    k, n = int(x.sum()), len(x)
    p = above_chance_p(k, n, chance / 100.0)
    ok = p < alpha
    return {"value": bool(ok), "p_value": p, "correct": k, "n": n, "screen": n, **used,
            "reason": (f"base {100 * k / n:.1f} vs chance {chance:.1f} on {n} {SCREEN_WORDS[used['items']]} "
                       f"(one-sided binomial p={p:.3g}"
                       + (f" < {alpha:g}): informative" if ok else
                          f" >= {alpha:g}): not above chance, uninformative at this model size")
                       + (f"; {used['note']}" if used["note"] else ""))}


def _scaled(v, scale):
    return None if v is None else float(v) * scale


def _paired_stats(name: str, arm_name: str, base: TaskItems, arm: TaskItems, *, scale: float, sign: float,
                  alpha: float, n_boot: int, seed: int):
    bidx = {k: i for i, k in enumerate(base.keys)}
    pairs = [(bidx[k], j) for j, k in enumerate(arm.keys) if k in bidx]
    if not pairs:
        return None
    bi, ai = [p[0] for p in pairs], [p[1] for p in pairs]
    bv, av = base.values(bi), arm.values(ai)
    n = len(pairs)
    clusters = _clusters([base.rows[i] for i in bi])
    b_score = float(corpus_metric(base.metric, bv)) * scale
    a_score = float(corpus_metric(arm.metric, av)) * scale
    stats: dict[str, Any] = {
        "score": a_score, "n_paired": n, "clusters": None if clusters is None else int(len(np.unique(clusters))),
        "unpaired": {"base_only": len(base.keys) - n, "arm_only": len(arm.keys) - n}, "source": "items",
    }
    base_extra: dict[str, Any] = {"score_paired": b_score}
    items: dict[str, Any] = {"keys": [base.keys[i] for i in bi], "clusters": clusters}
    binary = "x" in bv and np.isin(bv["x"], (0.0, 1.0)).all() and np.isin(av["x"], (0.0, 1.0)).all()
    if "x" in bv:
        bx, ax = bv["x"], av["x"]
        if binary:
            bb, ab = bx.astype(bool), ax.astype(bool)
            if sign < 0:  # a lower-is-better 0/1 metric: "right" is 0
                bb, ab = ~bb, ~ab
            est = paired_binary(bb, ab, clusters, scale=scale)
            r2w, w2r = np.flatnonzero(bb & ~ab), np.flatnonzero(~bb & ab)
            stats["examples"] = {
                "right_to_wrong": [flips.example(base.rows[bi[i]], arm.rows[ai[i]], base.metric)
                                   for i in r2w[:flips.N_EXAMPLES]],
                "wrong_to_right": [flips.example(base.rows[bi[i]], arm.rows[ai[i]], base.metric)
                                   for i in w2r[:flips.N_EXAMPLES]],
            }
            items["acc"] = (bb.astype(float), ab.astype(float))
        else:
            est = paired_mean(sign * bx, sign * ax, clusters, scale=scale)
            items["acc"] = (sign * bx, sign * ax)
        stats["acc"] = est.to_dict(alpha)
        bs = _soft([base.rows[i] for i in bi])
        as_ = _soft([arm.rows[i] for i in ai])
        if bs is not None and as_ is not None:
            soft = paired_mean(bs, as_, clusters, scale=scale)
            stats["soft"] = soft.to_dict(alpha)
            # what the gate's PASS bound (stats.bounded_upper) resamples nothing of but needs whole: the change of
            # each independent unit (cluster mean, else item), in points
            looks = _looks([base.rows[i] for i in bi])
            if looks is None:
                stats["soft"]["unit_deltas"] = [round(float(v), 6) for v in
                                                cluster_means((as_ - bs) * scale, clusters)]
            else:  # a sequential evaluation's: units look by look, in look order (the gate bets on them so)
                units = [cluster_means((as_ - bs)[looks == k] * scale,
                                       None if clusters is None else clusters[looks == k])
                         for k in range(1, int(looks.max()) + 1)]
                stats["soft"]["unit_deltas"] = [round(float(v), 6) for u in units for v in u]
                stats["soft"]["looks"] = [len(u) for u in units]
                stats["soft"]["look_items"] = [int((looks == k).sum()) for k in range(1, int(looks.max()) + 1)]
            stats["soft_score"] = float(as_.mean() * scale)
            base_extra["soft_score"] = float(bs.mean() * scale)
            items["soft"] = (bs, as_)
        else:
            stats["soft"] = None
    else:  # perplexity: a ratio of sums over documents, resampled by document (clusters within the task)
        def stat(w, arr, metric=base.metric):
            return sign * (_weighted_corpus(metric, arr, "a", w) - _weighted_corpus(metric, arr, "b", w)) * scale

        arrays = {f"{p}_{k}": v for p, src in (("a", av), ("b", bv)) for k, v in src.items()}
        se = bootstrap_se(stat, arrays, clusters=clusters, n_boot=n_boot, seed=seed, key=f"{name}\x1f{arm_name}")
        point = sign * (a_score - b_score) + 0.0
        est = Estimate(point=point, center=point, se=se, method="cluster_bootstrap", n=n,
                       clusters=stats["clusters"])
        stats["acc"] = None
        stats["soft"] = None
        stats["estimate"] = est.to_dict(alpha)
    primary = stats["acc"] if stats["acc"] is not None else stats["estimate"]
    stats.update({"delta": primary["point"], "ci": primary["ci"], "p_value": primary["p_value"],
                  "test": primary["method"]})
    if "flips" in primary:
        stats["flips"] = primary["flips"]
    return stats, items, base_extra


def _weighted_corpus(metric: str, arr: dict, prefix: str, w: np.ndarray) -> np.ndarray:
    ll = w @ arr[f"{prefix}_ll"]
    denom = w @ arr[f"{prefix}_{PERPLEXITY_METRICS[metric]}"]
    if metric == BITS_PER_BYTE:
        return -ll / denom / math.log(2)
    return np.exp(-ll / denom)


def _looks(rows: list[ItemRecord]) -> np.ndarray | None:
    """The sequential look of each item (1, 2, ...), or None when the items come from one fixed --limit."""
    if not rows or any(r["look"] is None for r in rows):
        return None
    return np.array([int(r["look"]) for r in rows])


def _clusters(rows: list[ItemRecord]) -> np.ndarray | None:
    """Cluster id per item (items sharing a source), or None when no item names one (items independent)."""
    if not any(r["cluster"] is not None for r in rows):
        return None
    return np.array([str(r["cluster"]) if r["cluster"] is not None else f"\x00item:{i}"
                     for i, r in enumerate(rows)])


def _soft(rows: list[ItemRecord]) -> np.ndarray | None:
    vals = [soft_scores(r["loglikelihoods"], r["target"]) for r in rows]
    if not vals or any(v is None for v in vals):
        return None
    return np.array(vals, dtype=float)


def uninformative_tasks(base_eval: Path, *, alpha: float = 0.05) -> dict[str, str]:
    """{task: why} for the retention tasks of a base evaluation on which the base is not above chance
    (`_informative`): they cannot show forgetting, the gate and the retention mean leave them out by default,
    so `forgetcheck run` does not spend the arms' evaluation on them (the gate's keep_uninformative keeps them)."""
    base = evaluation(base_eval)
    out = {}
    for name, entry in sorted(base.doc["tasks"].items()):
        if entry["suite"] != "retention":
            continue
        t, _ = compare_task(name, base, {}, alpha=alpha, n_boot=100, seed=0)
        inf = t["informative"]
        if t["unit"] == "points" and not inf["value"]:
            where = "screen items" if inf["separate"] else "gated items (no separate screen items)"
            out[name] = (f"the base is not above chance on it ({inf['correct']}/{inf['n']} right on its {where}, "
                         f"chance {t['chance']:.1f}%, one-sided binomial p={inf['p_value']:.3g})")
    return out


def skipped_for(base_eval: Path, gate_cfg, who: str) -> tuple[dict[str, str], str]:
    """What `run` (its arms) and `check` (its candidates) leave out of `who`'s evaluation: ({task: why} of the
    `uninformative_tasks`, or nothing when the policy keeps them), and the console line naming them ('' for
    none)."""
    skip = {} if gate_cfg.keep_uninformative else uninformative_tasks(base_eval, alpha=gate_cfg.alpha)
    line = (f"{len(skip)} retention task(s) skipped for the {who}, the base is at chance on them: "
            f"{', '.join(sorted(skip))} (--keep-uninformative scores and gates them)") if skip else ""
    return skip, line


# ---- the whole comparison -----------------------------------------------------------------------------------

def compare_evals(base_eval: Path | Evaluation, arm_evals: dict[str, Path | Evaluation], *, alpha: float = 0.05,
                  n_boot: int = 2000, seed: int = 0) -> dict:
    """Compare eval files (no train files needed): per-task, suite, drift, arm-vs-arm and learn-vs-forget. Each
    evaluation is an eval JSON path or an `Evaluation` (records already in memory: bench/gate_validity.py)."""
    if not 0 < alpha < 1:
        raise BadInput(f"--alpha must be in (0, 1) (got {alpha})")
    if n_boot < 100:
        raise BadInput(f"--n-boot must be at least 100 (got {n_boot})")
    base = evaluation(base_eval)
    arms = {arm: evaluation(p) for arm, p in arm_evals.items()}
    if not arms:
        raise BadInput("no arm evaluations to compare: evaluate at least one arm (eval/sft.json or eval/cpt.json)")
    tasks, items = {}, {}
    for name in sorted(base.doc["tasks"]):
        tasks[name], items[name] = compare_task(name, base, arms, alpha=alpha, n_boot=n_boot, seed=seed)
    missing = missing_tasks(base, arms, tasks)
    rollup.apply_holm(tasks, list(arms), alpha)
    suites = rollup.suite_means(tasks, list(arms), alpha)
    drift = {arm: rollup.drift_block(tasks, arm, ev.doc, base.doc, alpha=alpha) for arm, ev in arms.items()}
    model = base.doc["model"] or {}
    return {
        "schema_version": COMPARE_VERSION, "kind": "compare",
        "alpha": alpha, "ci_level": 1 - alpha, "n_boot": n_boot, "seed": seed,
        "methods": METHODS,
        "base": {"model": model, "random_weights": bool(model.get("random_weights", False)),
                 "limit": base.doc["limit"], "backend": base.doc["backend"]},
        "arms": list(arms),
        "arm_models": {arm: ev.doc["model"] or {} for arm, ev in arms.items()},
        "tasks": tasks, "missing": missing, "suites": suites, "drift": drift,
        "arm_vs_arm": rollup.arm_vs_arm(tasks, items, list(arms), alpha, n_boot, seed),
        "seed_groups": rollup.seed_groups(tasks, items, list(arms), alpha, n_boot, seed),
        "summary": _summary(suites, drift, list(arms)),
    }


def _summary(suites: dict, drift: dict, arms: list[str]) -> dict:
    typed = compare_doc({"arms": arms, "suites": suites, "drift": drift})
    return rollup.summary(typed["suites"], typed["drift"], arms)


def missing_tasks(base: Evaluation, arms: dict[str, Evaluation], tasks: dict) -> dict[str, dict]:
    """Tasks of the evaluated suites whose data could not be built, for the base or any arm: {task: {suite,
    why, models}}. (A task the base has and an arm lacks is that task's `unscored` entry instead.)"""
    out: dict[str, dict] = {}
    for who, ev in [("base", base.doc)] + [(a, e.doc) for a, e in arms.items()]:
        for name, m in sorted(ev["missing"].items()):
            if name in tasks:
                continue
            entry = out.setdefault(name, {"suite": m["suite"], "why": m["why"], "models": []})
            entry["models"].append(who)
    return out


METHODS = {
    "acc": "Bonett-Price adjusted Wald interval for paired proportions (design effect for clustered items); "
           "the p-value is the Wald test of the same centre and standard error",
    "soft": "paired mean difference of the probability on the correct choice; standard error from a cluster "
            "bootstrap within the task (clusters resampled, both models on the same resample)",
    "suite_mean": "mean of the task deltas; variance = sum of the task variances / tasks^2 (disjoint items)",
    "drift": "relative rise of the drift text's mean NLL per token (= bits per byte on the same bytes) and mean "
             "KL per token over blocks of up to 32 positions within one document; standard error with the "
             "documents as clusters (documents resampled, not blocks)",
    "intervals": "every interval and p-value come from one centre and standard error with the normal quantile, "
                 "so a (1-alpha) interval excludes 0 exactly when p < alpha",
}


def compare_run(run: RunDir | Path | str, *, alpha: float = 0.05, n_boot: int = 2000, seed: int = 0) -> dict:
    """Compare every evaluated arm of a run against its base, write `compare.json`, return it."""
    run = RunDir.existing(run)
    if not run.eval_json("base").exists():
        raise BadInput(f"{run.eval_json('base')} not found: evaluate the base first (`forgetcheck run` or eval)")
    arm_names = _arm_names(run)
    arms = {a: run.eval_json(a) for a in arm_names if run.eval_json(a).exists()}
    result = compare_evals(run.eval_json("base"), arms, alpha=alpha, n_boot=n_boot, seed=seed)
    result["run_id"] = run.run_id
    result["budget"] = budget.budget_block(run, list(arms))
    write_compare(run.compare, result)
    return result


def _arm_names(run: RunDir) -> list[str]:
    names: list[str] = []
    if run.config.exists():
        names = list(read_config(run.config)["arms"] or [])
    for p in sorted((run.root / "eval").glob("*.json")):
        if p.stem != "base" and p.stem not in names:
            names.append(p.stem)
    return names
