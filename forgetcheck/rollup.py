"""From per-task results to the run's answers: Holm's correction, suite means, general-text drift, arm against
arm on the same items, and the learning-vs-forgetting summary of each arm (compare.py computes the per-task
results and calls these; methods in forgetcheck/stats.py and docs/verdicts.md).

Pure numpy: never imports torch, transformers or lm-eval.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from forgetcheck.stats import (
    estimate_from_dict,
    holm,
    mean_of,
    mean_of_estimates,
    paired_binary,
    paired_mean,
    ratio_rise,
)


def gated_tasks(tasks: dict, arm: str, keep_uninformative: bool = False) -> list[str]:
    """Retention tasks scored in points that the gate checks for `arm` (uninformative ones left out unless
    kept)."""
    out = []
    for n in sorted(tasks):
        t = tasks[n]
        if t.get("suite") != "retention" or t.get("unit") != "points":
            continue
        if not keep_uninformative and not (t.get("informative") or {}).get("value", True):
            continue
        if arm in (t.get("arms") or {}):
            out.append(n)
    return out


def apply_holm(tasks: dict, arms: list[str], alpha: float) -> None:
    """Holm across the gated retention tasks (accuracy, informative) per arm, for the two-sided test of no
    change; `significant` is each task's own test (p < alpha, the interval excludes 0)."""
    for arm in arms:
        names = gated_tasks(tasks, arm)
        ps = {n: tasks[n]["arms"][arm]["p_value"] for n in names if tasks[n]["arms"][arm].get("p_value") is not None}
        for n, p in holm(ps).items():
            tasks[n]["arms"][arm]["p_holm"] = p
            tasks[n]["arms"][arm]["holm_family"] = len(ps)
        for t in tasks.values():
            a = t["arms"].get(arm)
            if a and a.get("p_value") is not None:
                a["significant"] = a["p_value"] < alpha


def mean_block(tasks: dict, names: list[str], arm: str, metric: str, alpha: float) -> dict | None:
    have = [n for n in names if (tasks[n]["arms"].get(arm) or {}).get("delta") is not None]
    if not have:
        return None
    if metric == "soft":
        ests = [tasks[n]["arms"][arm].get("soft") for n in have]
        if any(e is None for e in ests):
            return None
        base_mean = _mean([tasks[n]["base"].get("soft_score") for n in have])
        arm_mean = _mean([tasks[n]["arms"][arm].get("soft_score") for n in have])
    else:
        ests = [tasks[n]["arms"][arm].get("acc") for n in have]
        base_mean = _mean([base_score(tasks[n]) for n in have])
        arm_mean = _mean([tasks[n]["arms"][arm]["score"] for n in have])
    res: dict[str, Any] = {"n_tasks": len(have), "tasks": have, "base_mean": base_mean, "arm_mean": arm_mean,
                           "delta": float(np.mean([tasks[n]["arms"][arm]["delta"] if metric == "acc"
                                                   else tasks[n]["arms"][arm]["soft"]["point"] for n in have]))}
    if any(e is None for e in ests):
        res.update({"ci": None, "p_value": None, "note": "some tasks lack per-item records: no CI"})
        return res
    est = mean_of_estimates([estimate_from_dict(e) for e in ests])
    res.update(est.to_dict(alpha))
    res["significant"] = res["p_value"] < alpha
    return res


def suite_means(tasks: dict, arms: list[str], alpha: float) -> dict:
    out = {}
    for suite in sorted({t["suite"] for t in tasks.values()}):
        names = [n for n, t in tasks.items() if t["suite"] == suite]
        points = [n for n in names if tasks[n]["unit"] == "points"]
        uninf = [n for n in points if suite == "retention" and not tasks[n]["informative"]["value"]]
        informative = [n for n in points if n not in uninf]
        entry: dict[str, Any] = {"tasks": names, "mean_over": informative, "uninformative": uninf, "means": {}}
        for metric in ("acc", "soft"):
            entry["means"][metric] = {
                "informative": {arm: mean_block(tasks, informative, arm, metric, alpha) for arm in arms},
                "all": {arm: mean_block(tasks, points, arm, metric, alpha) for arm in arms},
            }
        entry["arms"] = entry["means"]["acc"]["informative"]
        out[suite] = entry
    return out


def base_score(t: dict) -> float | None:
    return t["base"].get("score_paired", t["base"].get("score"))


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def drift_block(tasks: dict, arm: str, arm_eval: dict, base_eval: dict, *, alpha: float, n_boot: int,
           seed: int) -> dict:
    """Perplexity tasks of the arm vs base, the eval's KL block, the drift text's perplexity, and the two
    gated drift estimates: the relative rise of the mean NLL per token (percent; equal to the rise of bits
    per byte on the same text) and the mean KL per token, each with a bootstrap of 32-token blocks."""
    ppl = {}
    for n, t in tasks.items():
        a = t["arms"].get(arm)
        if t["unit"] != "points" and a and a.get("score") is not None:
            b = base_score(t)
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
    kl = {k: v for k, v in d["kl"].items()} if isinstance(d.get("kl"), dict) else None
    ab, bb = d.get("blocks") or {}, bd.get("blocks") or {}
    rise = kl_est = None
    notes = []
    if ab.get("nll") and bb.get("nll") and len(ab["nll"]) == len(bb["nll"]):
        rise = ratio_rise(np.array(bb["nll"]), np.array(ab["nll"]), n_boot=n_boot, seed=seed,
                          key=f"drift-nll\x1f{arm}").to_dict(alpha)
        rise["unit"] = "percent"
    elif text is not None:
        notes.append("no per-block NLL in the eval files (written by an older forgetcheck): the perplexity "
                     "rise has no interval; re-run `forgetcheck eval`")
    if ab.get("kl"):
        kl_est = mean_of(np.array(ab["kl"]), n_boot=n_boot, seed=seed, key=f"drift-kl\x1f{arm}").to_dict(alpha)
        kl_est["unit"] = "nats per token"
    elif kl is not None:
        notes.append("no per-block KL in the eval file (written by an older forgetcheck): the KL has no "
                     "interval; re-run `forgetcheck eval`")
    return {"perplexity": ppl, "kl": kl, "text_perplexity": text, "ppl_rise": rise, "kl_mean": kl_est,
            "notes": notes}


def arm_vs_arm(tasks: dict, items: dict, arms: list[str], alpha: float, n_boot: int, seed: int,
                seeds: dict[str, int]) -> dict:
    """Each pair of arms on the same items: (arm a's score) - (arm b's score), per task and per suite mean,
    for accuracy and soft accuracy (positive: a kept or learned more). The statement is about the training
    runs compared: with one seed per arm, about that seed."""
    pairs = []
    for i, a in enumerate(arms):
        for b in arms[i + 1:]:
            per_task: dict[str, dict] = {}
            for n, t in tasks.items():
                ia, ib = items[n].get(a), items[n].get(b)
                if t["unit"] != "points" or not ia or not ib:
                    continue
                ka = {k: j for j, k in enumerate(ia["keys"])}
                common = [(ka[k], j) for j, k in enumerate(ib["keys"]) if k in ka]
                if not common:
                    continue
                xa, xb = [c[0] for c in common], [c[1] for c in common]
                cl = ib["clusters"][xb] if ib["clusters"] is not None else None
                entry = {}
                for metric in ("acc", "soft"):
                    if metric not in ia or metric not in ib:
                        continue
                    va, vb = ia[metric][1][xa], ib[metric][1][xb]
                    if metric == "acc" and np.isin(va, (0.0, 1.0)).all() and np.isin(vb, (0.0, 1.0)).all():
                        est = paired_binary(vb.astype(bool), va.astype(bool), cl)
                    else:
                        est = paired_mean(vb, va, cl, n_boot=n_boot, seed=seed, key=f"{n}\x1f{a}-{b}\x1f{metric}")
                    entry[metric] = est.to_dict(alpha)
                per_task[n] = entry
            suites: dict[str, dict] = {}
            for suite in ("retention", "domain"):
                s_tasks = [n for n in per_task if tasks[n]["suite"] == suite
                           and (suite != "retention" or tasks[n]["informative"]["value"])]
                for metric in ("acc", "soft"):
                    ests = [per_task[n].get(metric) for n in s_tasks]
                    if s_tasks and all(e is not None for e in ests):
                        suites.setdefault(suite, {})[metric] = {
                            **mean_of_estimates([estimate_from_dict(e) for e in ests]).to_dict(alpha),
                            "tasks": s_tasks}
            n_seeds = min(seeds.get(a, 1), seeds.get(b, 1))
            pairs.append({"a": a, "b": b, "tasks": per_task, "suites": suites, "seeds": n_seeds,
                          "note": ("rests on one training seed per arm: it compares these two training runs, "
                                   "not the methods (train with --seeds K to compare methods)")
                          if n_seeds <= 1 else f"{n_seeds} training seeds per arm"})
    return {"pairs": pairs}


def summary(suites: dict, drift: dict, arms: list[str]) -> dict:
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
