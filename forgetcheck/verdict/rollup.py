"""From per-task results to the run's answers: Holm's correction, suite means, general-text drift, arm against
arm on the same items, and the learning-vs-forgetting summary of each arm (verdict/compare.py computes the per-task
results and calls these; methods in forgetcheck/verdict/stats.py and docs/verdicts.md).

Pure numpy: never imports torch, transformers or lm-eval.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from forgetcheck.config import seed_run_of
from forgetcheck.verdict.stats import (
    estimate_from_dict,
    holm,
    mean_of,
    mean_of_estimates,
    paired_binary,
    paired_mean,
    ratio_rise,
    two_level_diff,
)


def gated_tasks(tasks: dict, arm: str | None, keep_uninformative: bool = False) -> list[str]:
    """Retention tasks scored in points that the gate checks for `arm` (uninformative ones left out unless
    kept); those the arm was scored on, or all of them with arm None."""
    out = []
    for n in sorted(tasks):
        t = tasks[n]
        if t["suite"] != "retention" or t["unit"] != "points":
            continue
        if not keep_uninformative and not t["informative"]["value"]:
            continue
        if arm is None or arm in t["arms"]:
            out.append(n)
    return out


def apply_holm(tasks: dict, arms: list[str], alpha: float) -> None:
    """Holm across the gated retention tasks (accuracy, informative) per arm, for the two-sided test of no
    change; `significant` is each task's own test (p < alpha, the interval excludes 0)."""
    for arm in arms:
        names = gated_tasks(tasks, arm)
        ps = {n: tasks[n]["arms"][arm]["p_value"] for n in names if tasks[n]["arms"][arm]["p_value"] is not None}
        for n, p in holm(ps).items():
            tasks[n]["arms"][arm]["p_holm"] = p
            tasks[n]["arms"][arm]["holm_family"] = len(ps)
    for t in tasks.values():
        for a in t["arms"].values():
            if a["p_value"] is not None:
                a["significant"] = a["p_value"] < alpha


def arm_results(tasks: dict, names: list[str], arm: str) -> dict[str, dict]:
    """{task: the arm's result} for the tasks of `names` the arm was scored on."""
    return {n: tasks[n]["arms"][arm] for n in names if arm in tasks[n]["arms"]}


def mean_block(tasks: dict, names: list[str], arm: str, metric: str, alpha: float) -> dict | None:
    """The arm's change of the mean over `names` (the tasks it was scored on) in `metric`; None when no task has a
    delta. On soft accuracy a task without soft records makes the mean `unavailable` (saying which), never
    silently absent: the gate then says why its retention-mean rule could not decide."""
    have = [n for n, a in arm_results(tasks, names, arm).items() if a["delta"] is not None]
    if not have:
        return None
    if metric == "soft":
        lacking = [n for n in have if tasks[n]["arms"][arm]["soft"] is None]
        if lacking:
            return {"n_tasks": len(have), "tasks": have, "base_mean": None, "arm_mean": None, "delta": None,
                    "ci": None, "p_value": None,
                    "unavailable": (f"{', '.join(lacking)} {'has' if len(lacking) == 1 else 'have'} no soft-accuracy "
                                    "scores (per-item log-likelihoods of every choice), so the mean cannot be taken "
                                    "on soft accuracy; re-evaluate with per-item records, or gate with --metric acc")}
        ests = [tasks[n]["arms"][arm]["soft"] for n in have]
        base_mean = _mean([tasks[n]["base"]["soft_score"] for n in have])
        arm_mean = _mean([tasks[n]["arms"][arm]["soft_score"] for n in have])
    else:
        ests = [tasks[n]["arms"][arm]["acc"] for n in have]
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
    """The base's score on the items paired with the arms (its whole score when nothing was paired)."""
    return t["base"].get("score_paired", t["base"]["score"])


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def drift_block(tasks: dict, arm: str, arm_eval: dict, base_eval: dict, *, alpha: float) -> dict:
    """Perplexity tasks of the arm vs base, the eval's KL block, the drift text's perplexity, and the two
    gated drift estimates: the relative rise of the mean NLL per token (percent; equal to the rise of bits
    per byte on the same text) and the mean KL per token, both over the stored blocks weighted by their
    positions, with the documents (the blocks' `document` ids) as clusters: positions of one article are not
    independent, so documents are resampled, not blocks. Eval files whose blocks carry no document ids
    (written by an older forgetcheck) give no interval, with a note."""
    ppl = {}
    for n, a in arm_results(tasks, [n for n, t in tasks.items() if t["unit"] != "points"], arm).items():
        if a["score"] is not None:
            t = tasks[n]
            b = base_score(t)
            ppl[n] = {"suite": t["suite"], "metric": t["metric"], "base": b, "arm": a["score"],
                      "delta": a["delta"], "ci": a["ci"],
                      "ratio": (a["score"] / b) if b else None}
    d = arm_eval["drift"]
    bd = base_eval["drift"]
    text = None
    if isinstance(d["perplexity"], (int, float)) and isinstance(bd["perplexity"], (int, float)):
        text = {"base": float(bd["perplexity"]), "arm": float(d["perplexity"]),
                "ratio": float(d["perplexity"]) / float(bd["perplexity"]) if bd["perplexity"] else None,
                "source": d["text"]["source"],
                "tokens": d["text"]["tokens_scored"]}
    kl = {k: v for k, v in d["kl"].items()} if isinstance(d["kl"], dict) else None
    ab, bb = d["blocks"], bd["blocks"]
    rise = kl_est = None
    notes = []
    older = ("no document ids on the drift blocks (eval file written by an older forgetcheck), so documents "
             "cannot be resampled and blocks of one article are not independent: the {what} has no interval; "
             "re-run `forgetcheck eval`")
    if ab["nll"] and bb["nll"]:
        if not (_with_documents(ab) and _with_documents(bb)):
            notes.append(older.format(what="perplexity rise"))
        elif (ab["document"], ab["positions"]) != (bb["document"], bb["positions"]):
            notes.append("the arm's drift blocks are not the base's (other documents or token counts: another "
                         "tokenizer, or an arm not evaluated with `--reference` the base's eval JSON): the "
                         "perplexity rise has no interval")
        else:
            pos = np.asarray(ab["positions"], float)
            rise = ratio_rise(np.asarray(bb["nll"], float) * pos, np.asarray(ab["nll"], float) * pos,
                              clusters=np.asarray(ab["document"])).to_dict(alpha)
            rise["unit"] = "percent"
    elif text is not None:
        notes.append("no per-block NLL in the eval files (written by an older forgetcheck): the perplexity "
                     "rise has no interval; re-run `forgetcheck eval`")
    if ab["kl"]:
        if _with_documents(ab, "kl"):
            kl_est = mean_of(np.asarray(ab["kl"], float), clusters=np.asarray(ab["document"]),
                             weights=np.asarray(ab["positions"], float)).to_dict(alpha)
            kl_est["unit"] = "nats per token"
        else:
            notes.append(older.format(what="KL"))
    elif kl is not None:
        notes.append("no per-block KL in the eval file (written by an older forgetcheck): the KL has no "
                     "interval; re-run `forgetcheck eval`")
    return {"perplexity": ppl, "kl": kl, "text_perplexity": text, "ppl_rise": rise, "kl_mean": kl_est,
            "notes": notes}


def _with_documents(blocks: dict, values: str = "nll") -> bool:
    """The blocks carry a document id and a position count for each of their `values`."""
    n = len(blocks[values] or [])
    return (isinstance(blocks["document"], list) and isinstance(blocks["positions"], list)
            and len(blocks["document"]) == len(blocks["positions"]) == n)


def seed_run_groups(arms: list[str]) -> dict[str, list[str]]:
    """Each arm's training runs (`--seeds`): {arm: [arm, arm_s1, ...]} in the order given."""
    groups: dict[str, list[str]] = {}
    for label in arms:
        groups.setdefault(seed_run_of(label)[0], []).append(label)
    return groups


def _aligned(items_t: dict, labels: list[str], metric: str):
    """([runs, items] scores of `labels`, [1, items] base scores, clusters) on the items every label has,
    in the first label's order; None when a label lacks per-item `metric` scores for the task."""
    if any(label not in items_t or metric not in items_t[label] for label in labels):
        return None
    its = [items_t[label] for label in labels]
    common = set(its[0]["keys"]).intersection(*(set(it["keys"]) for it in its[1:]))
    order = [k for k in its[0]["keys"] if k in common]
    if not order:
        return None
    positions = [{k: j for j, k in enumerate(it["keys"])} for it in its]  # one index per run, not one per item
    idx = [[pos[k] for k in order] for pos in positions]
    runs = np.stack([it[metric][1][ix] for it, ix in zip(its, idx)])
    base = its[0][metric][0][idx[0]][None, :]
    cl = its[0]["clusters"][idx[0]] if its[0]["clusters"] is not None else None
    return runs, base, cl


def _suite_tasks(tasks: dict, suite: str) -> list[str]:
    """The tasks a suite mean is over: points tasks, informative ones for retention."""
    return [n for n, t in tasks.items() if t["suite"] == suite and t["unit"] == "points"
            and (suite != "retention" or t["informative"]["value"])]


def seed_groups(tasks: dict, items: dict, arms: list[str], alpha: float, n_boot: int, seed: int) -> dict | None:
    """With several training runs per arm (`--seeds K`): per arm, the change of each suite mean against the
    base with a two-level bootstrap (runs, then items), and the learning-vs-forgetting point it gives. None
    when every arm was trained once."""
    groups = seed_run_groups(arms)
    if all(len(labels) < 2 for labels in groups.values()):
        return None
    out = {}
    for arm, labels in groups.items():
        entry: dict[str, Any] = {"labels": labels, "seeds": len(labels), "suites": {}}
        acc: dict[str, dict | None] = {"retention": None, "domain": None}  # the summary's two points
        for suite in ("retention", "domain"):
            for metric in ("acc", "soft"):
                parts = [(n, _aligned(items[n], labels, metric)) for n in _suite_tasks(tasks, suite)]
                parts = [(n, p) for n, p in parts if p is not None]
                if not parts:
                    continue
                est = two_level_diff([p[0] for _, p in parts], [p[1] for _, p in parts], [p[2] for _, p in parts],
                                     n_boot=n_boot, seed=seed, key=f"group\x1f{arm}\x1f{suite}\x1f{metric}")
                entry["suites"].setdefault(suite, {})[metric] = {**est.to_dict(alpha), "tasks": [n for n, _ in parts]}
                if metric == "acc":
                    acc[suite] = entry["suites"][suite][metric]
        ret, dom = acc["retention"], acc["domain"]
        entry["summary"] = {
            "forgetting": 0.0 - ret["point"] if ret else None,
            "forgetting_ci": [0.0 - ret["ci"][1], 0.0 - ret["ci"][0]] if ret else None,
            "learning": dom["point"] if dom else None,
            "learning_ci": dom["ci"] if dom else None,
        }
        out[arm] = entry
    return out


def arm_vs_arm(tasks: dict, items: dict, arms: list[str], alpha: float, n_boot: int, seed: int) -> dict:
    """Each pair of arms on the same items: (arm a's score) - (arm b's score), per task and per suite mean,
    for accuracy and soft accuracy (positive: a kept or learned more). With one training run per arm the
    statement is about those two runs; with several (`--seeds`), each side is all of its arm's runs and the
    interval comes from a two-level bootstrap (runs, then items), so it is about the methods."""
    groups = seed_run_groups(arms)
    multi = any(len(labels) > 1 for labels in groups.values())
    sides = list(groups.items()) if multi else [(a, [a]) for a in arms]
    pairs = []
    for i, (a, la) in enumerate(sides):
        for b, lb in sides[i + 1:]:
            per_task: dict[str, dict] = {}
            joint: dict[str, dict] = {"acc": {}, "soft": {}}
            for n, t in tasks.items():
                if t["unit"] != "points":
                    continue
                entry = {}
                for metric in ("acc", "soft"):
                    al = _aligned(items[n], la + lb, metric)
                    if al is None:
                        continue
                    runs, _, cl = al
                    xa, xb = runs[:len(la)], runs[len(la):]
                    joint[metric][n] = (xa, xb, cl)
                    if multi:
                        est = two_level_diff([xa], [xb], [cl], n_boot=n_boot, seed=seed,
                                             key=f"{n}\x1f{a}-{b}\x1f{metric}")
                    elif metric == "acc" and np.isin(xa, (0.0, 1.0)).all() and np.isin(xb, (0.0, 1.0)).all():
                        est = paired_binary(xb[0].astype(bool), xa[0].astype(bool), cl)
                    else:
                        est = paired_mean(xb[0], xa[0], cl)
                    entry[metric] = est.to_dict(alpha)
                if entry:
                    per_task[n] = entry
            suites: dict[str, dict] = {}
            for suite in ("retention", "domain"):
                s_tasks = [n for n in _suite_tasks(tasks, suite) if n in per_task]
                for metric in ("acc", "soft"):
                    if not s_tasks or any(metric not in per_task[n] for n in s_tasks):
                        continue
                    if multi:
                        parts = [joint[metric][n] for n in s_tasks]
                        est = two_level_diff([p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts],
                                             n_boot=n_boot, seed=seed, key=f"{suite}\x1f{a}-{b}\x1f{metric}")
                    else:
                        est = mean_of_estimates([estimate_from_dict(per_task[n][metric]) for n in s_tasks])
                    suites.setdefault(suite, {})[metric] = {**est.to_dict(alpha), "tasks": s_tasks}
            n_seeds = min(len(la), len(lb))
            pairs.append({"a": a, "b": b, "a_runs": la, "b_runs": lb, "tasks": per_task, "suites": suites,
                          "seeds": n_seeds,
                          "note": ("rests on one training seed per arm: it compares these two training runs, "
                                   "not the methods (train with --seeds K to compare methods)")
                          if n_seeds <= 1 else f"{n_seeds} training seeds per arm; two-level bootstrap "
                                               f"(seeds, then items)"})
    return {"pairs": pairs}


def _signal(block: dict | None) -> dict | None:
    if not block or block.get("delta") is None:
        return None
    ci = block.get("ci")
    return {"delta": block["delta"], "ci": ci,
            "significant": bool(ci is not None and (ci[0] > 0 or ci[1] < 0))}


def summary(suites: dict, drift: dict, arms: list[str]) -> dict:
    """Learning against forgetting per arm, from the typed suites and drift of compare.json (`schema.compare_doc`).

    Scores are soft accuracy (the gate's default metric, less noisy than 0/1 accuracy on the same items) where
    every arm has it, else accuracy. Learning has three signals (`LEARNING_SIGNALS`); `learning` is the default
    one, drawn on the chart: recall where the run asked recall questions (the facts the training showed, the
    first thing a fine-tuned model must have learned), else transfer."""
    def means(suite: str, metric: str, over: str) -> dict:
        return ((suites.get(suite) or {}).get("means") or {}).get(metric, {}).get(over) or {}

    metric = "soft" if arms and all((means("retention", "soft", "informative").get(a) or {}).get("ci")
                                    for a in arms) else "acc"
    has_recall = any(means("recall", metric, "all").get(a) for a in arms)
    default = "recall" if has_recall else "transfer"
    out = {}
    for arm in arms:
        ret = means("retention", metric, "informative").get(arm)
        ppl = [p for n, p in sorted(drift[arm]["perplexity"].items())
               if p["suite"] == "domain" and p["metric"] == "bits_per_byte"]
        signals = {"recall": _signal(means("recall", metric, "all").get(arm)),
                   "transfer": _signal(means("domain", metric, "all").get(arm)),
                   "domain_bpb": _signal(ppl[0]) if ppl else None}
        chosen = signals[default]
        out[arm] = {
            "metric": metric,
            "forgetting": 0.0 - ret["delta"] if ret and ret.get("delta") is not None else None,
            "forgetting_ci": [0.0 - ret["ci"][1], 0.0 - ret["ci"][0]] if ret and ret.get("ci") else None,
            "forgetting_significant": bool(ret["significant"]) if ret and "significant" in ret else None,
            "learning": chosen["delta"] if chosen else None,
            "learning_ci": chosen["ci"] if chosen else None,
            "learning_significant": chosen["significant"] if chosen else None,
            "learning_signal": default,
            "signals": signals,
            "kl_mean": (drift[arm]["kl"] or {}).get("mean"),
        }
    return out
