"""Paired comparison of each fine-tuned arm against the base: what was forgotten, what was learned, and
whether each difference is real.

Pure: reads the run directory's JSON and JSONL, writes `compare.json`. Never imports torch, transformers or
lm-eval (CI runs it on JSON alone).

Per task and arm (items paired across models by `doc_hash`, else `doc_id`):
- base and arm score of the task's primary metric, and the *oriented* delta: positive is better, negative
  is worse, whatever the metric's direction (`higher_is_better`). Accuracy-like metrics are in points
  (x100); perplexity metrics keep their own units.
- a (1 - alpha) confidence interval of the delta by paired bootstrap over items (the same resampled items
  for base and arm, and for every arm: seeded, vectorised);
- the exact McNemar p-value for 0/1 metrics (a two-sided binomial test on the discordant pairs), else a
  bootstrap p-value; Holm's correction across the tasks of a suite, per arm;
- flip counts (right->wrong, wrong->right) and a few examples each way.
Suite means (accuracy-like tasks only; perplexity is reported as drift), their bootstrap CI (items resampled
within each task, the task deltas averaged), perplexity and KL drift, the budget each arm spent, and a
learning-vs-forgetting summary per arm (Biderman et al. 2024, "LoRA Learns Less and Forgets Less":
forgetting = drop of the mean retention score, learning = gain of the mean domain score).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import binomtest

from forgetcheck.errors import BadInput
from forgetcheck.rundir import RunDir, atomic_write_json, read_json
from forgetcheck.schema import SCHEMA_VERSION, require

PERPLEXITY_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")
N_EXAMPLES = 5
EXAMPLE_CHARS = 400
_BOOT_CHUNK_CELLS = 4_000_000  # resampled indices held at once (n_boot x n_items), bounds memory


# ---- statistics ------------------------------------------------------------------------------------------

def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1)."""
    order = sorted(pvalues, key=lambda k: (pvalues[k], k))
    m, running, out = len(order), 0.0, {}
    for i, key in enumerate(order):
        running = max(running, min(1.0, (m - i) * pvalues[key]))
        out[key] = running
    return out


def mcnemar_exact(right_to_wrong: int, wrong_to_right: int) -> float:
    """Exact two-sided McNemar p-value: binomial test of the discordant pairs against 1/2."""
    n = right_to_wrong + wrong_to_right
    if n == 0:
        return 1.0
    return float(binomtest(right_to_wrong, n, 0.5, alternative="two-sided").pvalue)


def bootstrap_p(replicates: np.ndarray) -> float:
    """Two-sided bootstrap p-value of 'the delta is 0' from the replicates' sign (1.0 when all are 0)."""
    n = len(replicates)
    le = (np.count_nonzero(replicates <= 0) + 1) / (n + 1)
    ge = (np.count_nonzero(replicates >= 0) + 1) / (n + 1)
    return float(min(1.0, 2 * min(le, ge)))


def percentile_ci(replicates: np.ndarray, alpha: float) -> list[float]:
    lo, hi = np.quantile(replicates, [alpha / 2, 1 - alpha / 2])
    return [float(lo), float(hi)]


def _stable_seed(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(parts).encode()).digest()[:8], "little")


def resample_indices(n: int, n_boot: int, seed: int, key: str):
    """Yield chunks of bootstrap index rows for one task: the same rows for every arm (paired)."""
    rng = np.random.default_rng([seed, _stable_seed(key)])
    rows = max(1, _BOOT_CHUNK_CELLS // max(n, 1))
    done = 0
    while done < n_boot:
        k = min(rows, n_boot - done)
        yield rng.integers(0, n, size=(k, n))
        done += k


# ---- metrics of a task, from its items ----------------------------------------------------------------------

def metric_scale(metric: str, kind: str | None) -> tuple[float, str]:
    """(scale, unit) of a metric's deltas: points for accuracy-like metrics, own units for perplexity."""
    if metric in PERPLEXITY_METRICS or kind == "perplexity":
        return 1.0, metric
    return 100.0, "points"


class TaskItems:
    """One model's per-item records of one task, as arrays keyed for pairing."""

    def __init__(self, rows: list[dict], metric: str, kind: str | None):
        self.rows = rows
        self.keys = _pair_keys(rows)
        self.metric, self.kind = metric, kind

    def values(self, idx: list[int]) -> dict[str, np.ndarray]:
        rows = [self.rows[i] for i in idx]
        if self.metric in PERPLEXITY_METRICS:
            return {
                "ll": np.array([float(r["loglikelihood"]) for r in rows]),
                "words": np.array([float(r.get("words") or 0) for r in rows]),
                "bytes": np.array([float(r.get("bytes") or 0) for r in rows]),
            }
        return {"x": np.array([_item_score(r, self.metric) for r in rows], dtype=float)}


def _item_score(row: dict, metric: str) -> float:
    m = row.get("metrics") or {}
    if metric in m and m[metric] is not None:
        return float(m[metric])
    if metric == "acc" and "correct" in row:
        return float(bool(row["correct"]))
    raise KeyError(metric)


def _pair_keys(rows: list[dict]) -> list[str]:
    """doc_hash (else doc_id); repeated keys (duplicate documents) get a running suffix in doc_id order."""
    seen: dict[str, int] = {}
    keys = []
    for r in rows:
        base = r.get("doc_hash") or f"id:{r.get('doc_id')}"
        k = seen.get(base, 0)
        seen[base] = k + 1
        keys.append(base if k == 0 else f"{base}#{k}")
    return keys


def corpus_metric(metric: str, v: dict[str, np.ndarray], w: np.ndarray | None = None) -> np.ndarray | float:
    """The task metric from item arrays; with `w` (bootstrap rows of indices) one value per row."""
    if metric in PERPLEXITY_METRICS:
        def tot(a):
            return a.sum() if w is None else a[w].sum(axis=1)

        ll, denom = tot(v["ll"]), tot(v["words"] if metric == "word_perplexity" else v["bytes"])
        if metric == "bits_per_byte":
            return -ll / denom / math.log(2)
        return np.exp(-ll / denom)
    x = v["x"]
    return x.mean() if w is None else x[w].mean(axis=1)


# ---- loading ---------------------------------------------------------------------------------------------

def load_eval(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path} not found: run `forgetcheck eval` (or `forgetcheck run`) to write it")
    return require(read_json(path), "eval", str(path))


def load_items(eval_path: Path, task: str, entry: dict) -> list[dict] | None:
    rel = entry.get("samples")
    if not rel:
        return None
    p = Path(eval_path).parent / rel
    if not p.is_file():
        return None
    rows = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise BadInput(f"{p}:{lineno}: not valid JSON ({e.msg}); re-run `forgetcheck eval`") from None
    rows.sort(key=lambda r: (_sortable(r.get("doc_id")), str(r.get("doc_hash"))))
    return rows


def _sortable(x):
    return (0, x, "") if isinstance(x, (int, float)) else (1, 0, str(x))


def _metric_value(entry: dict, metric: str) -> tuple[float | None, bool | None]:
    m = (entry.get("metrics") or {}).get(metric) or {}
    v = m.get("value")
    return (float(v) if v is not None else None), m.get("higher_is_better")


def _default_hib(metric: str) -> bool:
    return metric not in ("word_perplexity", "byte_perplexity", "bits_per_byte")


def _item_text(row: dict) -> str | None:
    for key in ("doc", "prompt", "text", "question", "context", "arguments"):
        v = row.get(key)
        if v is None:
            continue
        if isinstance(v, str):
            s = v
        elif isinstance(v, dict):
            parts = [f"{k}: {val}" for k, val in v.items() if isinstance(val, (str, int, float, list))]
            s = " | ".join(str(p) for p in parts)
        else:
            s = json.dumps(v, ensure_ascii=False, default=str)
        s = " ".join(s.split())
        return s if len(s) <= EXAMPLE_CHARS else s[: EXAMPLE_CHARS - 1] + "…"
    return None


def _choice(row: dict, metric: str = "acc") -> int | None:
    """The choice the model picked, as the task's metric scores it (acc_norm: length-normalised), when the
    record says; else the highest log-likelihood."""
    chosen = (row.get("chosen") or {}).get(metric)
    if isinstance(chosen, int):
        return chosen
    lls = row.get("loglikelihoods")
    if not lls:
        return None
    try:
        vals = [float(x[0]) if isinstance(x, (list, tuple)) else float(x) for x in lls]
    except (TypeError, ValueError):
        return None
    return int(np.argmax(vals))


def _example(b: dict, a: dict, metric: str = "acc") -> dict:
    ex = {"doc_id": b.get("doc_id"), "doc_hash": b.get("doc_hash"), "target": b.get("target"),
          "base_choice": _choice(b, metric), "arm_choice": _choice(a, metric)}
    text = _item_text(b) or _item_text(a)
    if text is not None:
        ex["text"] = text
    choices = b.get("choices") or a.get("choices")
    if choices:  # every choice's text, for the report's flipped items
        ex["choices"] = [str(c) for c in choices]
    return ex


# ---- one task ----------------------------------------------------------------------------------------------

def compare_task(name: str, base_eval: tuple[Path, dict], arm_evals: dict[str, tuple[Path, dict]], *,
                 alpha: float, n_boot: int, seed: int) -> tuple[dict, dict[str, np.ndarray]]:
    """Compare one task for every arm that has it. Returns (entry, {arm: bootstrap replicates of delta})."""
    base_path, base = base_eval
    bentry = base["tasks"][name]
    metric = bentry.get("primary_metric") or "acc"
    kind = bentry.get("kind") or ("perplexity" if metric in PERPLEXITY_METRICS else "multiple_choice")
    base_value, hib = _metric_value(bentry, metric)
    hib = _default_hib(metric) if hib is None else bool(hib)
    scale, unit = metric_scale(metric, kind)
    sign = 1.0 if hib else -1.0
    out: dict[str, Any] = {
        "suite": bentry.get("suite", "retention"), "kind": kind, "metric": metric, "higher_is_better": hib,
        "unit": unit, "scale": scale, "chance": _scaled(bentry.get("chance"), scale),
        "base": {"score": _scaled(base_value, scale), "n": bentry.get("n")}, "arms": {}, "notes": [],
    }
    reps: dict[str, np.ndarray] = {}
    base_rows = load_items(base_path, name, bentry)
    base_items = TaskItems(base_rows, metric, kind) if base_rows else None

    for arm, (apath, aev) in arm_evals.items():
        aentry = (aev.get("tasks") or {}).get(name)
        if aentry is None:
            out["notes"].append(f"{arm}: task not evaluated")
            continue
        arm_value, _ = _metric_value(aentry, metric)
        res: dict[str, Any] = {"score": _scaled(arm_value, scale), "n": aentry.get("n")}
        arm_rows = load_items(apath, name, aentry)
        paired = None
        if base_items is not None and arm_rows:
            arm_items = TaskItems(arm_rows, metric, kind)
            try:
                paired = _paired_stats(name, base_items, arm_items, scale=scale, sign=sign, alpha=alpha,
                                       n_boot=n_boot, seed=seed)
            except KeyError as e:
                out["notes"].append(f"{arm}: per-item records lack metric {e}; scores from the aggregate")
        if paired is not None:
            stats, rep, base_score = paired
            res.update(stats)
            out["base"]["score_paired"] = base_score
            reps[arm] = rep
        else:
            if base_value is not None and arm_value is not None:
                res["delta"] = sign * (arm_value - base_value) * scale + 0.0
            else:
                res["delta"] = None
            res.update({"ci": None, "p_value": None, "test": None, "n_paired": 0, "source": "aggregate"})
            out["notes"].append(f"{arm}: no paired per-item records; delta from aggregate scores, no CI or test")
        out["arms"][arm] = res
    return out, reps


def _scaled(v, scale):
    return None if v is None else float(v) * scale


def _paired_stats(name: str, base: TaskItems, arm: TaskItems, *, scale: float, sign: float, alpha: float,
                  n_boot: int, seed: int):
    bidx = {k: i for i, k in enumerate(base.keys)}
    pairs = [(bidx[k], j) for j, k in enumerate(arm.keys) if k in bidx]
    if not pairs:
        return None
    bi, ai = [p[0] for p in pairs], [p[1] for p in pairs]
    bv, av = base.values(bi), arm.values(ai)
    n = len(pairs)
    b_score = float(corpus_metric(base.metric, bv)) * scale
    a_score = float(corpus_metric(arm.metric, av)) * scale
    delta = sign * (a_score - b_score) + 0.0  # + 0.0: an unchanged lower-is-better metric gives 0.0, not -0.0
    chunks = [sign * (corpus_metric(arm.metric, av, w) - corpus_metric(base.metric, bv, w)) * scale
              for w in resample_indices(n, n_boot, seed, name)]
    rep = np.concatenate(chunks) + 0.0
    stats: dict[str, Any] = {
        "score": a_score, "delta": float(delta), "ci": percentile_ci(rep, alpha), "n_paired": n,
        "unpaired": {"base_only": len(base.keys) - n, "arm_only": len(arm.keys) - n}, "source": "items",
    }
    binary = "x" in bv and np.isin(bv["x"], (0.0, 1.0)).all() and np.isin(av["x"], (0.0, 1.0)).all()
    if binary:
        bx, ax = bv["x"].astype(bool), av["x"].astype(bool)
        if sign < 0:  # a lower-is-better 0/1 metric: "right" is 0
            bx, ax = ~bx, ~ax
        r2w, w2r = np.flatnonzero(bx & ~ax), np.flatnonzero(~bx & ax)
        stats["test"] = "mcnemar_exact"
        stats["p_value"] = mcnemar_exact(len(r2w), len(w2r))
        stats["flips"] = {"right_to_wrong": int(len(r2w)), "wrong_to_right": int(len(w2r))}
        stats["examples"] = {
            "right_to_wrong": [_example(base.rows[bi[i]], arm.rows[ai[i]], base.metric) for i in r2w[:N_EXAMPLES]],
            "wrong_to_right": [_example(base.rows[bi[i]], arm.rows[ai[i]], base.metric) for i in w2r[:N_EXAMPLES]],
        }
    else:
        stats["test"] = "paired_bootstrap"
        stats["p_value"] = bootstrap_p(rep)
    return stats, rep, b_score


# ---- the whole comparison -----------------------------------------------------------------------------------

def compare_evals(base_eval: Path, arm_evals: dict[str, Path], *, alpha: float = 0.05, n_boot: int = 2000,
                  seed: int = 0) -> dict:
    """Compare eval files (no train files needed): per-task, suite, drift and learn-vs-forget blocks."""
    if not 0 < alpha < 1:
        raise BadInput(f"--alpha must be in (0, 1) (got {alpha})")
    if n_boot < 100:
        raise BadInput(f"n_boot must be at least 100 (got {n_boot})")
    base = (Path(base_eval), load_eval(base_eval))
    arms = {arm: (Path(p), load_eval(p)) for arm, p in arm_evals.items()}
    if not arms:
        raise BadInput("no arm evaluations to compare: evaluate at least one arm (eval/sft.json or eval/cpt.json)")
    tasks, reps = {}, {}
    for name in sorted(base[1].get("tasks") or {}):
        tasks[name], reps[name] = compare_task(name, base, arms, alpha=alpha, n_boot=n_boot, seed=seed)
    _apply_holm(tasks, list(arms))
    suites = _suites(tasks, reps, list(arms), alpha)
    drift = {arm: _drift(tasks, arm, ev, base[1]) for arm, (_, ev) in arms.items()}
    model = base[1].get("model") or {}
    return {
        "schema_version": SCHEMA_VERSION, "kind": "compare",
        "alpha": alpha, "ci_level": 1 - alpha, "n_boot": n_boot, "seed": seed,
        "base": {"model": model, "random_weights": bool(model.get("random_weights", False)),
                 "limit": base[1].get("limit"), "backend": base[1].get("backend")},
        "arms": list(arms),
        "arm_models": {arm: ev.get("model") or {} for arm, (_, ev) in arms.items()},
        "tasks": tasks, "suites": suites, "drift": drift,
        "summary": _summary(suites, drift, list(arms)),
    }


def _apply_holm(tasks: dict, arms: list[str]) -> None:
    """Holm across the tasks of each suite, per arm; `significant` is the corrected test at alpha (set later)."""
    for arm in arms:
        for suite in sorted({t["suite"] for t in tasks.values()}):
            ps = {n: t["arms"][arm]["p_value"] for n, t in tasks.items()
                  if t["suite"] == suite and arm in t["arms"] and t["arms"][arm].get("p_value") is not None}
            for n, p in holm(ps).items():
                tasks[n]["arms"][arm]["p_holm"] = p
                tasks[n]["arms"][arm]["holm_family"] = len(ps)


def _suites(tasks: dict, reps: dict, arms: list[str], alpha: float) -> dict:
    out = {}
    for suite in sorted({t["suite"] for t in tasks.values()}):
        names = [n for n, t in tasks.items() if t["suite"] == suite]
        points = [n for n in names if tasks[n]["unit"] == "points"]
        entry: dict[str, Any] = {"tasks": names, "mean_over": points, "arms": {}}
        for n in names:
            t = tasks[n]
            for arm in arms:
                a = t["arms"].get(arm)
                if a and a.get("p_holm") is not None:
                    a["significant"] = a["p_holm"] < alpha
        for arm in arms:
            have = [n for n in points if arm in tasks[n]["arms"] and tasks[n]["arms"][arm].get("delta") is not None]
            if not have:
                entry["arms"][arm] = None
                continue
            base_mean = _mean([_base_score(tasks[n]) for n in have])
            arm_mean = _mean([tasks[n]["arms"][arm]["score"] for n in have])
            delta = float(np.mean([tasks[n]["arms"][arm]["delta"] for n in have]))
            boot = [reps[n][arm] for n in have if arm in reps.get(n, {})]
            res = {"n_tasks": len(have), "base_mean": base_mean, "arm_mean": arm_mean, "delta": delta,
                   "ci": None, "p_value": None}
            if len(boot) == len(have):
                rep = np.mean(np.stack(boot), axis=0)
                res["ci"] = percentile_ci(rep, alpha)
                res["p_value"] = bootstrap_p(rep)
                res["significant"] = res["p_value"] < alpha
            else:
                res["note"] = "some tasks lack per-item records: no CI"
            entry["arms"][arm] = res
        out[suite] = entry
    return out


def _base_score(t: dict) -> float | None:
    return t["base"].get("score_paired", t["base"].get("score"))


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _drift(tasks: dict, arm: str, arm_eval: dict, base_eval: dict) -> dict:
    """Perplexity tasks of the arm vs base, the eval's KL block, and the drift text's perplexity."""
    ppl = {}
    for n, t in tasks.items():
        a = t["arms"].get(arm)
        if t["unit"] != "points" and a and a.get("score") is not None:
            b = _base_score(t)
            ppl[n] = {"suite": t["suite"], "metric": t["metric"], "base": b, "arm": a["score"],
                      "delta": a.get("delta"), "ci": a.get("ci"),
                      "ratio": (a["score"] / b) if b else None}
    d = arm_eval.get("drift") or {}
    bd = base_eval.get("drift") or {}
    text = None
    if isinstance(d.get("perplexity"), (int, float)) and isinstance(bd.get("perplexity"), (int, float)):
        text = {"base": float(bd["perplexity"]), "arm": float(d["perplexity"]),
                "ratio": float(d["perplexity"]) / float(bd["perplexity"]) if bd["perplexity"] else None,
                "source": (d.get("text") or {}).get("source"),
                "tokens": (d.get("text") or {}).get("tokens_scored")}
    kl = d.get("kl") if isinstance(d.get("kl"), dict) else None
    return {"perplexity": ppl, "kl": kl, "text_perplexity": text}


def _summary(suites: dict, drift: dict, arms: list[str]) -> dict:
    out = {}
    for arm in arms:
        ret = (suites.get("retention") or {}).get("arms", {}).get(arm)
        dom = (suites.get("domain") or {}).get("arms", {}).get(arm)
        kl = drift.get(arm, {}).get("kl") or {}
        out[arm] = {
            "forgetting": 0.0 - ret["delta"] if ret else None,
            "forgetting_ci": [0.0 - ret["ci"][1], 0.0 - ret["ci"][0]] if ret and ret.get("ci") else None,
            "forgetting_significant": bool(ret.get("significant")) if ret else None,
            "learning": dom["delta"] if dom else None,
            "learning_ci": dom["ci"] if dom else None,
            "learning_significant": bool(dom.get("significant")) if dom else None,
            "kl_mean": kl.get("mean"),
        }
    return out


def budget_block(run: RunDir, arms: list[str]) -> dict:
    """What each arm spent (train/<arm>.json) and whether the arms matched: same optimizer steps and
    tokens fed forward within one sequence."""
    seq_len = None
    if run.config.exists():
        seq_len = ((read_json(run.config).get("train") or {}).get("seq_len"))
    per_arm = {}
    for arm in arms:
        p = run.train_json(arm)
        if not p.exists():
            continue
        tr = require(read_json(p), "train", str(p))
        seen = tr.get("tokens_seen") or {}
        per_arm[arm] = {"tokens_forward": seen.get("forward"), "tokens_padding": seen.get("padding"),
                        "tokens_label": seen.get("label"), "budget_tokens": tr.get("budget_tokens"),
                        "optimizer_steps": tr.get("optimizer_steps")}
        # Wall-clock figures stay in train/<arm>.json: compare.json holds only what the data decides, so an
        # interrupted-and-resumed run compares identically to an uninterrupted one.
        seq_len = seq_len or (tr.get("config") or {}).get("seq_len")
    out: dict[str, Any] = {"arms": per_arm, "seq_len": seq_len, "matched": None, "reasons": []}
    if len(per_arm) < 2:
        out["reasons"].append("fewer than two arms trained: nothing to match")
        return out
    fw = [v["tokens_forward"] for v in per_arm.values()]
    steps = [v["optimizer_steps"] for v in per_arm.values()]
    budgets = [v["budget_tokens"] for v in per_arm.values()]
    ok = True
    if None in fw:
        ok = False
        out["reasons"].append("tokens_seen.forward missing for an arm")
    elif seq_len and max(fw) - min(fw) > seq_len:
        ok = False
        out["reasons"].append(f"tokens fed forward differ by {max(fw) - min(fw)} (> one sequence, {seq_len})")
    if len(set(steps)) > 1:
        ok = False
        out["reasons"].append(f"optimizer steps differ: {dict(zip(per_arm, steps))}")
    if len(set(budgets)) > 1:
        ok = False
        out["reasons"].append(f"budgets differ: {dict(zip(per_arm, budgets))}")
    out["matched"] = ok
    return out


def compare_run(run: RunDir | Path | str, *, alpha: float = 0.05, n_boot: int = 2000, seed: int = 0) -> dict:
    """Compare every evaluated arm of a run against its base, write `compare.json`, return it."""
    run = RunDir.existing(run)
    if not run.eval_json("base").exists():
        raise BadInput(f"{run.eval_json('base')} not found: evaluate the base first (`forgetcheck run` or eval)")
    arm_names = _arm_names(run)
    arms = {a: run.eval_json(a) for a in arm_names if run.eval_json(a).exists()}
    result = compare_evals(run.eval_json("base"), arms, alpha=alpha, n_boot=n_boot, seed=seed)
    result["run_id"] = run.run_id
    result["budget"] = budget_block(run, list(arms))
    atomic_write_json(run.compare, result)
    return result


def _arm_names(run: RunDir) -> list[str]:
    names: list[str] = []
    if run.config.exists():
        names = list(read_json(run.config).get("arms") or [])
    for p in sorted((run.root / "eval").glob("*.json")):
        if p.stem != "base" and p.stem not in names:
            names.append(p.stem)
    return names
