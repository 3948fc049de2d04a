"""The release gate: turn compare.json into PASS, FAIL or INCONCLUSIVE, with a reason for every rule.

Pure: reads JSON (and a TOML policy), writes gate.json (+ optional JUnit XML and Markdown). Never imports
torch. A release passes when harm is ruled out, fails when harm beyond the margin is shown, and is
inconclusive when the run cannot tell (docs/verdicts.md has every rule and the validity benchmark):

- `task_drop` (each gated retention task; `metric` = soft or acc): PASS when the one-sided (1 - alpha) upper
  bound of the drop is below `max_drop` (on soft accuracy the bound that holds for every pattern of per-unit
  changes, `stats.bounded_upper`: a drop carried by a few items the sample missed cannot PASS); FAIL when the
  one-sided t test of "drop <= max_drop" rejects at alpha after Holm's correction across the gated tasks of the
  arm; else INCONCLUSIVE.
- `retention_mean`: PASS when the upper bound of the mean drop is below `max_mean_drop` (soft: the same kind of
  bound, over draws of a uniformly chosen task's units); FAIL when its lower bound is above it; else
  INCONCLUSIVE. Present for every arm with gated tasks: INCONCLUSIVE, saying why, when it cannot be computed.
- `domain_gain` (only with `min_domain_gain`): PASS when the lower bound of the mean domain gain reaches it (soft:
  the bound that holds for every pattern); FAIL when the upper bound is below it; else INCONCLUSIVE.
- `ppl_rise` / `kl` (general-text drift, unless set to None): the relative rise of bits per byte on the drift
  text (percent) and the mean KL from the base (nats per token), with the same three outcomes against
  `max_ppl_rise` / `max_kl`.
- `coverage`: an arm with no gated retention task FAILs (a gate that checked nothing must not pass).
- too little evidence: a rule whose estimate rests on fewer than `stats.MIN_PAIRED` paired units (items,
  clusters, drift documents; for a mean, any of its tasks), or on units that all moved by exactly the same amount,
  is INCONCLUSIVE with that reason (`Estimate.evidence_gap`), never PASS or FAIL.

An arm PASSes when every one of its rules passes (an intersection-union test: no multiplicity correction is
needed for PASS), FAILs when one fails, else is INCONCLUSIVE; the release likewise over the arms. Retention
tasks on which the base is not significantly above chance are "uninformative at this model size" and are left
out of the task rules and the mean (`keep_uninformative` keeps them). Exit codes: 0 pass, 1 fail,
4 inconclusive (`on_inconclusive` maps 4 to 1 or 0 for CI systems that need two outcomes, and says so).
Every outcome comes with the power of the whole verdict: the smallest drop each rule can rule out and the items
per task at which every item-based rule would PASS with 80% probability if nothing changed (`_power`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from scipy.stats import norm

from forgetcheck.config import GateConfig, check, validate_gate
from forgetcheck.errors import BadInput
from forgetcheck.rundir import RunDir, atomic_write_text
from forgetcheck.schema import (
    GATE_VERSION,
    CompareFile,
    compare_doc,
    gate_power_arm_doc,
    mean_doc,
    read_compare,
    read_config,
    write_gate,
)
from forgetcheck.verdict.policy import as_policy, check_keys, resolve_policy
from forgetcheck.verdict.rollup import gated_tasks, mean_block
from forgetcheck.verdict.stats import (
    MIN_PAIRED,
    POWER,
    Estimate,
    bounded_p,
    bounded_upper,
    estimate_from_dict,
    holm,
    interleavings,
    items_for_power,
    look_interleavings,
    look_orders,
    look_plans,
    pass_floor,
    pass_mde,
    pass_power,
    round_up,
    unit_orders,
    z,
)
from forgetcheck.verdict.text import _f, _p, signed, to_junit, to_markdown

EXIT = {"pass": 0, "fail": 1, "inconclusive": 4}


def _three(lower_bad: float, upper_bad: float, margin: float) -> str:
    """Outcome of 'the harm is at most `margin`' from the one-sided bounds of the harm."""
    if upper_bad < margin:
        return "pass"
    if lower_bad > margin:
        return "fail"
    return "inconclusive"


def _est(d: dict | None) -> Estimate | None:
    return None if not d or d["se"] is None else estimate_from_dict(d)


def _mean_gap(est: Estimate, tasks: dict, mean: dict, arm: str, metric: str) -> str | None:
    """Why a suite mean cannot decide a rule: its own `evidence_gap`, else the first of its tasks' (the mean's
    variance is the sum of theirs, so it is no better founded than the least-founded task)."""
    gap = est.evidence_gap()
    if gap:
        return gap
    for name in mean["tasks"]:
        if name not in tasks or arm not in tasks[name]["arms"]:
            continue
        part = _est(tasks[name]["arms"][arm][metric])
        part_gap = part.evidence_gap() if part is not None else None
        if part_gap:
            return f"{name}: {part_gap}"
    return None


def _rule(rule: str, arm: str | None, status: str, reason: str, task: str | None = None, **values) -> dict:
    """One gate.json rule: its outcome for one arm (and task), with the reason in words and its numbers."""
    return {"rule": rule, "arm": arm, "task": task, "status": status, "passed": status == "pass",
            "reason": f"{arm}: {reason}" if arm else reason, "values": values}


def _side(alpha: float) -> str:
    return f"one-sided {round((1 - alpha) * 100)}%"


def _metric_label(metric: str) -> str:
    return "soft accuracy" if metric == "soft" else "accuracy"


# ---- the rules: each gives its outcome for one arm ------------------------------------------------------------

def excluded_tasks(tasks: dict, pol: GateConfig) -> list[dict]:
    """Retention tasks on which the base is not above chance: left out of gating unless kept."""
    out = []
    for name in sorted(tasks):
        t = tasks[name]
        inf = t["informative"]
        if t["suite"] == "retention" and t["unit"] == "points" and not inf["value"]:
            out.append({"task": name, "kept": pol.keep_uninformative,
                        "reason": f"{name}: uninformative at this model size ({inf['reason']})"
                                  + ("; kept in by keep_uninformative" if pol.keep_uninformative else
                                     "; left out of gating and of the retention mean")})
    return out


def missing_rules(compare: CompareFile, arm: str, pol: GateConfig) -> list[dict]:
    """`task_missing`: a task the gate needs for the arm and does not have is INCONCLUSIVE, never PASS."""
    return [_rule("task_missing", arm, "inconclusive", f"MISSING: {name} could not be evaluated "
                  f"({_absent_why(compare, name, arm)}), so a drop there cannot be ruled out", name,
                  max_drop=pol.max_drop, metric=pol.metric)
            for name in _missing_for(compare, arm, pol)]


def _absent_why(compare: CompareFile, name: str, arm: str) -> str:
    if name in compare["missing"] and compare["missing"][name]["why"]:
        return compare["missing"][name]["why"]
    if name in compare["tasks"] and compare["tasks"][name]["unscored"][arm]:
        return compare["tasks"][name]["unscored"][arm]
    return "the policy requires it and it was not evaluated"


def unscored_rules(compare: CompareFile, arm: str, pol: GateConfig) -> list[dict]:
    """`task_drop` INCONCLUSIVE for a gated task the arm was not scored on (skipped, not missing)."""
    tasks = compare["tasks"]
    names = gated_tasks(tasks, arm, pol.keep_uninformative)
    absent = _missing_for(compare, arm, pol)
    return [_rule("task_drop", arm, "inconclusive", f"{name} was not scored for this arm "
                  f"({tasks[name]['unscored'][arm]}), so a drop there cannot be ruled out; to score it, run with "
                  f"--keep-uninformative (a new run, or --resume after deleting eval/{arm}.json)", name,
                  max_drop=pol.max_drop, metric=pol.metric)
            for name in sorted(set(gated_tasks(tasks, None, pol.keep_uninformative)) - set(names) - set(absent))]


SOFT_RANGE = (-100.0, 100.0)
"""The most one unit's soft accuracy can fall or rise, in points: the range the PASS bound holds on."""


def _unit_drops(d: dict) -> np.ndarray | None:
    """The drop of each independent unit (cluster, else item) of a soft-accuracy estimate, in points; None when
    the compare result does not carry them."""
    return None if d["unit_deltas"] is None else 0.0 - np.asarray(d["unit_deltas"], dtype=float)


def _mean_unit_drops(tasks: dict, names: list[str], arm: str) -> list[np.ndarray] | None:
    """Each of a suite mean's tasks' soft-accuracy unit drops (what its bound that holds whatever the pattern bets
    on), or None when a task lacks them."""
    softs = [tasks[n]["arms"][arm]["soft"] if n in tasks and arm in tasks[n]["arms"] else None for n in names]
    drops = [None if x is None else _unit_drops(x) for x in softs]
    return None if any(x is None for x in drops) else drops


def _sd(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1)) if len(x) > 1 else 0.0


class _Power:
    """What one rule's PASS would take: its chance of passing at n items per task if nothing changed (`at`), the
    drop it can rule out with 80% power now (`mde`) and the items per task that give that power (`items`)."""

    def __init__(self, n: int, mde: float, at, margin: float):
        self.n, self.mde, self.at = n, mde, at
        self.items = items_for_power(at, POWER)
        self.margin = margin

    def doc(self) -> dict:
        return {"n": self.n, "mde": self.mde, "items_needed": self.items, "p_pass_if_unchanged": self.at(self.n)}


def _normal_power(est: Estimate, margin: float, alpha: float) -> _Power:
    """A normal-approximation rule (accuracy: Bonett-Price): se shrinks as 1/sqrt(n)."""
    def at(n: int) -> float:
        if n <= 0:
            return 0.0
        se = est.se * (est.n / n) ** 0.5
        return 1.0 if se <= 0 else float(norm.cdf(margin / se - z(1 - alpha)))
    return _Power(est.n, est.mde(alpha), at, margin)


def _bounded_power(drops: list[np.ndarray], items: list[int], margin: float, alpha: float) -> _Power:
    """A PASS by `bounded_upper` on the units of one task (one sample) or of the retention mean (several, drawn
    one task at a time): the units' spread if nothing changed is their spread around each task's own mean."""
    sd = float(np.sqrt(np.mean([_sd(x) ** 2 for x in drops])))
    per_item = sum(len(x) for x in drops) / max(1, sum(items))  # units per item (< 1 with clusters)
    n = min(items)
    width = SOFT_RANGE[1] - SOFT_RANGE[0]

    def at(k: int) -> float:
        return pass_power(sd, max(1, round(k * per_item * len(drops))), margin, alpha, width=width)
    return _Power(n, pass_mde(sd, sum(len(x) for x in drops), alpha, width=width), at, margin)


def task_drop_rules(tasks: dict, arm: str, pol: GateConfig) -> tuple[list[dict], dict]:
    """`task_drop` for each gated retention task: PASS when the upper bound of the drop is below max_drop (on soft
    accuracy, the bound that holds for every pattern of per-unit changes), FAIL when Holm's test of 'drop <=
    max_drop' rejects, else INCONCLUSIVE. Returns (rules, {task: its `_Power`})."""
    alpha, metric = pol.alpha, pol.metric
    rules, task_power, p_fail, pending = [], {}, {}, []
    for name in gated_tasks(tasks, arm, pol.keep_uninformative):
        t = tasks[name]
        a = t["arms"][arm]
        d, used = a[metric], metric
        if d is None and metric == "soft" and a["acc"] is not None:
            d, used = a["acc"], "acc"
        est = _est(d)
        base_s = t["base"]["soft_score"] if used == "soft" else t["base"]["score_paired"]
        arm_s = a["soft_score"] if used == "soft" else a["score"]
        label = "soft accuracy" if used == "soft" else t["metric"]
        if est is None:
            drop = None if a["delta"] is None else 0.0 - a["delta"]
            rules.append(_rule("task_drop", arm, "inconclusive", f"{name} {label} {_f(base_s)} -> {_f(arm_s)}: no "
                               "per-item records, so the drop cannot be bounded or tested (re-run `forgetcheck eval`)",
                               name, drop=drop, max_drop=pol.max_drop, metric=used))
            continue
        margin = task_margin(pol, base_s)
        drops = _unit_drops(d) if used == "soft" else None
        power = (_bounded_power([drops], [est.n], margin.points, alpha) if drops is not None
                 else _normal_power(est, margin.points, alpha))
        task_power[name] = power
        gap = est.evidence_gap()
        if gap:
            drop = 0.0 - est.point
            rules.append(_rule("task_drop", arm, "inconclusive", f"{name} {label} {_f(base_s)} -> {_f(arm_s)} (drop "
                               f"{signed(drop)} points): {gap}", name, drop=drop, n=est.n, min_paired=MIN_PAIRED,
                               **margin.values(), metric=used, **_looks_values(d)))
            continue
        seq = _sequential(d, margin.points, alpha, f"{arm}\x1f{name}") if used == "soft" else None
        p_fail[name] = seq["p_fail"] if seq else est.p_above(-margin.points)
        pending.append((name, est, used, label, base_s, arm_s, drops, margin, seq))
    # advisory tasks are their own Holm family: a task that cannot change the verdict spends none of its alpha
    adj = holm({n: p for n, p in p_fail.items() if task_tier(pol, n) != "advisory"})
    advisory = holm({n: p for n, p in p_fail.items() if task_tier(pol, n) == "advisory"})
    family = {n: len(advisory) if n in advisory else len(adj) for n in p_fail}
    adj.update(advisory)
    for name, est, used, label, base_s, arm_s, drops, margin, seq in pending:
        m, says = margin.points, margin.words
        drop = 0.0 - est.point
        up_normal, lo = -est.lower(alpha), -est.upper(alpha)
        if seq:
            up, lo = seq["upper"], seq["lower"]
        elif used == "soft":
            up = (bounded_upper(unit_orders(drops, f"{arm}\x1f{name}"), *SOFT_RANGE, alpha) if drops is not None
                  else None)
        else:
            up = up_normal
        bound = "no bound for every pattern" if up is None else signed(up)
        nums = (f"{name} {label} {_f(base_s)} -> {_f(arm_s)} (drop {signed(drop)} points, {_side(alpha)} bounds "
                f"[{signed(lo)}, {bound}])")
        floor = pass_floor(len(drops), alpha) if drops is not None else None
        vals = {"drop": drop, "drop_upper": up, "drop_upper_normal": up_normal, "drop_lower": lo, "pass_floor": floor,
                "p_fail": p_fail[name], "p_fail_holm": adj[name], "holm_family": family[name], **margin.values(),
                "alpha": alpha, "metric": used, "mde": task_power[name].mde, "n": est.n,
                "bound": "bounded" if used == "soft" else "normal"}
        if seq:
            vals.update(seq["values"])
            nums += f" after {len(seq['values']['look_units'])} look(s), {est.n} items"
        if up is not None and up < m:
            st, why = "pass", (f"a drop beyond {says} is ruled out (upper bound {up:.1f} < "
                               f"{m:.3g}{_ANY_PATTERN if used == 'soft' else ''})")
        elif adj[name] < alpha:
            test = "sequential test" if seq else "test"
            st, why = "fail", (f"dropped more than {says} ({test} of drop <= {m:.3g}: Holm "
                               f"p={_p(adj[name])} < {alpha:g} over {family[name]} gated tasks)")
        elif up is None:
            st, why = "inconclusive", ("this compare result carries no per-unit changes, so a drop carried by a few "
                                       "items cannot be ruled out: re-run `forgetcheck compare` on the run")
        else:
            st, why = "inconclusive", (f"cannot rule out a drop beyond {says} (upper bound "
                                       f"{up:.1f}{_ANY_PATTERN if used == 'soft' else ''}) nor show one (Holm "
                                       f"p={_p(adj[name])}); this run rules out drops of {task_power[name].mde:.1f} "
                                       f"points at 80% power")
            if floor is not None and floor >= m:
                why += (f"; at {len(drops)} units no outcome short of a gain could PASS it (even a task on which no "
                        f"item moved has an upper bound of {floor:.1f})")
        rules.append(_rule("task_drop", arm, st, f"{nums}: {why}", name, **vals))
    return rules, task_power


_ANY_PATTERN = ", whatever the pattern of per-item changes"


def _look_drops(d: dict) -> list[np.ndarray] | None:
    """A sequential evaluation's unit drops look by look (compare.json soft `looks`), or None for a fixed one."""
    if not d.get("looks") or d["unit_deltas"] is None:
        return None
    drops = _unit_drops(d)
    cuts = np.cumsum(d["looks"])[:-1]
    return list(np.split(drops, cuts))


def _looks_values(d: dict | None) -> dict:
    """A rule's look values where its task was evaluated look by look (so `sequential.open_tasks` gives it more
    items even when it has too few to decide yet)."""
    if not d or not d.get("looks"):
        return {}
    return {"bound": "sequential", "looks": d.get("look_items"), "look_units": d["looks"],
            "plan_units": d.get("plan_units")}


def _sequential(d: dict, margin: float, alpha: float, key: str) -> dict | None:
    """A task rule's bounds and FAIL p-value over a sequential evaluation's looks (docs/verdicts.md, "Until
    decided"): betting bounds on the units in look order, each side's capital taken at its highest over the
    looks, with bets tuned for the units at the cap (`plan_units`), so neither side's error grows with the looks;
    `values`: what the rule records of its looks. None for a fixed --limit evaluation."""
    looks = _look_drops(d)
    if looks is None:
        return None
    plan = int(d.get("plan_units") or sum(len(x) for x in looks))
    streams, ends = look_orders(looks, key)
    return {**_look_bounds(streams, ends, plan, alpha, margin), "values": {**_looks_values(d), "plan_units": plan}}


def _look_bounds(streams: list[np.ndarray], ends: list[list[int]], plan: int, alpha: float,
                 margin: float | None = None) -> dict:
    """Both sides of a sequential rule from its streams of unit drops: the upper bound (PASS bets, `look_plans`
    "pass"), the lower bound from the same units as rises (FAIL bets), and with `margin` the FAIL p-value."""
    rising = [-x for x in streams]  # the drop's lower side: an upper bound of the rise
    ups, downs = look_plans(plan, len(streams), "pass"), look_plans(plan, len(streams), "fail")
    out = {"upper": bounded_upper(streams, *SOFT_RANGE, alpha, plan=ups, ends=ends),
           "lower": -bounded_upper(rising, *SOFT_RANGE, alpha, plan=downs, ends=ends)}
    if margin is not None:
        out["p_fail"] = bounded_p(rising, *SOFT_RANGE, -margin, alpha, plan=downs, ends=ends)
    return out


class Margin(NamedTuple):
    """A task rule's margin in points: the policy's `max_drop`, or `max_relative_drop` percent of the base's score
    on the task where that is smaller (`relative`)."""

    points: float
    relative: bool
    pol: GateConfig
    base: float | None

    @property
    def words(self) -> str:
        if not self.relative:
            return f"{self.points:g} points"
        return (f"{self.points:.3g} points ({self.pol.max_relative_drop:g}% of the base's {self.base:.1f}, stricter "
                f"than {self.pol.max_drop:g})")

    def values(self) -> dict:
        """The rule's values: `max_drop` is the margin it used; where the relative one, what it came from."""
        out: dict[str, Any] = {"max_drop": self.points}
        if self.pol.max_relative_drop is not None:
            out.update(margin_from="relative" if self.relative else "absolute",
                       max_relative_drop=self.pol.max_relative_drop, max_drop_absolute=self.pol.max_drop)
        return out


def task_tier(pol: GateConfig, task: str | None) -> str:
    """A task's release tier (GateConfig.tiers): its exact name first, then the first glob pattern that matches;
    `critical` when none does (and for rules of no task: the mean, drift, coverage, domain gain)."""
    if task is None:
        return "critical"
    for pattern, tier in pol.tiers:
        if pattern == task:
            return tier
    for pattern, tier in pol.tiers:
        if fnmatch.fnmatchcase(task, pattern):
            return tier
    return "critical"


def task_margin(pol: GateConfig, base_score: float | None) -> Margin:
    """The margin of a task whose base scores `base_score` points on the metric the rule uses."""
    if pol.max_relative_drop is None or base_score is None:
        return Margin(pol.max_drop, False, pol, base_score)
    rel = pol.max_relative_drop / 100.0 * base_score
    return Margin(rel, True, pol, base_score) if rel < pol.max_drop else Margin(pol.max_drop, False, pol, base_score)


def coverage_rules(tasks: dict, arm: str, pol: GateConfig) -> list[dict]:
    """`coverage`: an arm with no gated retention task is not PASS (a gate that checked nothing must not pass);
    nor one whose gated tasks are all advisory (nothing it checked counts)."""
    gated = gated_tasks(tasks, arm, pol.keep_uninformative)
    if gated and all(task_tier(pol, n) == "advisory" for n in gated):
        return [_rule("coverage", arm, "inconclusive", f"every gated retention task ({', '.join(gated)}) is advisory "
                      "in the policy's tiers, so none counts toward the verdict: make at least one critical")]
    if gated:
        return []
    left_out = gated_tasks(tasks, None, keep_uninformative=True)
    if left_out and not pol.keep_uninformative:
        return [_rule("coverage", arm, "inconclusive", f"every retention task ({', '.join(left_out)}) is "
                      "uninformative at this model size (the base is not above chance): nothing can show "
                      "forgetting; use a larger model or more items, or --keep-uninformative")]
    return [_rule("coverage", arm, "fail", "no retention task with a score to compare: evaluate the retention suite")]


def retention_mean_rules(compare: CompareFile, arm: str, pol: GateConfig) -> tuple[list[dict], _Power | None]:
    """`retention_mean`: the mean drop of the gated retention tasks against max_mean_drop (on soft accuracy, PASS by
    the bound that holds for every pattern of per-unit changes within and across tasks). An arm with gated tasks
    always has this rule: INCONCLUSIVE, saying why, when the mean cannot be computed. Returns (rules, the mean's
    `_Power` or None)."""
    alpha = pol.alpha
    over = "all" if pol.keep_uninformative else "informative"
    tasks = compare["tasks"]
    ret = compare["suites"]["retention"]["means"][pol.metric][over][arm]
    label = f"retention mean {_metric_label(pol.metric)}"
    gated = gated_tasks(tasks, arm, pol.keep_uninformative)
    advisory = [n for n in gated if task_tier(pol, n) == "advisory"]
    if advisory:  # the mean of the tasks that count: advisory ones never move the verdict, through the mean either
        counted = [n for n in gated if n not in advisory]
        if not counted:
            return [], None  # `coverage` says why nothing counts
        ret = mean_doc(mean_block(tasks, counted, arm, pol.metric, alpha))
        label += f" (advisory {', '.join(advisory)} left out)"
    if not ret:
        if not gated:
            return [], None  # `coverage` says why nothing is gated
        return [_rule("retention_mean", arm, "inconclusive", f"{label}: none of the gated tasks ({', '.join(gated)}) "
                      "has a score for this arm, so the mean drop cannot be computed",
                      max_mean_drop=pol.max_mean_drop, metric=pol.metric)], None
    if ret["unavailable"]:
        return [_rule("retention_mean", arm, "inconclusive", f"{label} over {ret['n_tasks']} tasks cannot be "
                      f"computed: {ret['unavailable']}", max_mean_drop=pol.max_mean_drop, metric=pol.metric)], None
    est = _est(ret)
    drop = 0.0 - ret["delta"]
    head = f"{label} over {ret['n_tasks']} tasks {_f(ret['base_mean'])} -> {_f(ret['arm_mean'])} (drop {signed(drop)} points"
    if est is None:
        return [_rule("retention_mean", arm, "inconclusive", f"{head}): some tasks lack per-item records, so the "
                      "mean drop cannot be bounded", drop=drop, max_mean_drop=pol.max_mean_drop)], None
    drops = _mean_unit_drops(tasks, ret["tasks"], arm) if pol.metric == "soft" else None
    if drops is not None:
        power = _bounded_power(drops, [tasks[n]["arms"][arm]["soft"]["n"] for n in ret["tasks"]], pol.max_mean_drop,
                               alpha)
    else:
        power = _normal_power(est, pol.max_mean_drop, alpha)
    gap = _mean_gap(est, tasks, ret, arm, pol.metric)
    if gap:
        return [_rule("retention_mean", arm, "inconclusive", f"{head}): {gap}", drop=drop, n=est.n,
                      min_paired=MIN_PAIRED, max_mean_drop=pol.max_mean_drop, metric=pol.metric,
                      **({"bound": "sequential"} if _mean_looks(tasks, ret["tasks"], arm) else {}))], power
    up_normal, lo = -est.lower(alpha), -est.upper(alpha)
    seq = _sequential_mean(tasks, ret["tasks"], arm, alpha) if pol.metric == "soft" else None
    if seq:
        up, lo = seq["upper"], seq["lower"]
    elif pol.metric == "soft":
        up = (None if drops is None else
              bounded_upper(interleavings(drops, f"{arm}\x1fretention-mean"), *SOFT_RANGE, alpha))
    else:
        up = up_normal
    if up is not None and up < pol.max_mean_drop:
        st = "pass"
    elif lo > pol.max_mean_drop:
        st = "fail"
    else:
        st = "inconclusive"
    any_pattern = _ANY_PATTERN if pol.metric == "soft" else ""
    nums = f"{head}, {_side(alpha)} bounds [{signed(lo)}, {'no bound for every pattern' if up is None else signed(up)}])"
    why = {"pass": f"a mean drop beyond {pol.max_mean_drop:g} points is ruled out{any_pattern}",
           "fail": f"the mean dropped more than {pol.max_mean_drop:g} points (lower bound {lo:.1f})",
           "inconclusive": (f"cannot rule out a mean drop beyond {pol.max_mean_drop:g} points{any_pattern} nor show "
                            f"one; this run rules out mean drops of {power.mde:.1f} points at 80% power")
           if up is not None else ("this compare result carries no per-unit changes, so a drop carried by a few "
                                   "items cannot be ruled out: re-run `forgetcheck compare` on the run")}[st]
    extra = {"bound": "bounded" if pol.metric == "soft" else "normal"}
    if seq:
        extra = {"bound": "sequential", "looks": seq["looks"], "look_units": seq["look_units"],
                 "plan_units": seq["plan_units"]}
        nums += f" over {seq['looks']} look(s) every task reached"
    return [_rule("retention_mean", arm, st, f"{nums}: {why}", drop=drop, drop_upper=up, drop_upper_normal=up_normal,
                  drop_lower=lo, max_mean_drop=pol.max_mean_drop, alpha=alpha, metric=pol.metric, mde=power.mde,
                  **extra)], power


def _mean_looks(tasks: dict, names: list[str], arm: str) -> tuple[list[list[np.ndarray]], list[dict]] | None:
    """The retention mean's tasks' unit drops look by look, over the looks every one of them reached (a draw must
    be a unit of a uniformly chosen task, so a look some task did not take ends the mean's stream), and their soft
    blocks; None unless every task is sequential and the first look is common."""
    softs = [((tasks.get(n) or {}).get("arms") or {}).get(arm, {}).get("soft") for n in names]
    per_task = [_look_drops(x) if x else None for x in softs]
    if not per_task or any(x is None for x in per_task):
        return None
    common = 0
    while all(len(x) > common and len(x[common]) for x in per_task):
        common += 1
    return ([[x[k] for x in per_task] for k in range(common)], softs) if common else None


def _sequential_mean(tasks: dict, names: list[str], arm: str, alpha: float) -> dict | None:
    """The retention mean's bounds over a sequential evaluation's looks (`_mean_looks`): `look_interleavings` of
    its tasks' units, bets tuned for the tasks' units at the cap. None unless every task is sequential."""
    found = _mean_looks(tasks, names, arm)
    if found is None:
        return None
    looks, softs = found
    plan = sum(int(x.get("plan_units") or 0) for x in softs) or sum(len(x["unit_deltas"]) for x in softs)
    streams, ends = look_interleavings(looks, f"{arm}\x1fretention-mean")
    return {**_look_bounds(streams, ends, plan, alpha), "looks": len(looks),
            "look_units": [sum(len(u) for u in look) for look in looks], "plan_units": plan}


def domain_gain_rules(compare: CompareFile, arm: str, pol: GateConfig) -> list[dict]:
    """`domain_gain` (only with min_domain_gain): the lower bound of the mean domain gain must reach it."""
    if pol.min_domain_gain is None:
        return []
    alpha, need = pol.alpha, pol.min_domain_gain
    dom = compare["suites"]["domain"]["means"][pol.metric]["all"][arm]
    if not dom:
        return [_rule("domain_gain", arm, "fail", f"no domain task scored, cannot show a gain of {need:g} points: "
                      "evaluate the domain suite", min_domain_gain=need)]
    if dom["unavailable"]:
        return [_rule("domain_gain", arm, "inconclusive", f"the domain mean cannot be computed: {dom['unavailable']}",
                      min_domain_gain=need)]
    est = _est(dom)
    g = dom["delta"]
    if est is None:
        return [_rule("domain_gain", arm, "inconclusive", f"domain mean gain {signed(g)} points has no interval "
                      "(no per-item records)", gain=g, min_domain_gain=need)]
    gap = _mean_gap(est, compare["tasks"], dom, arm, pol.metric)
    if gap:
        return [_rule("domain_gain", arm, "inconclusive", f"domain mean gain {signed(g)} points: {gap}", gain=g,
                      n=est.n, min_paired=MIN_PAIRED, min_domain_gain=need)]
    lo, up = est.lower(alpha), est.upper(alpha)
    if pol.metric == "soft":  # a PASS must hold whatever the pattern: the gain's lower bound is the bounded one
        drops = _mean_unit_drops(compare["tasks"], dom["tasks"], arm)
        lo = (None if drops is None else
              0.0 - bounded_upper(interleavings(drops, f"{arm}\x1fdomain-mean"), *SOFT_RANGE, alpha))
        if lo is None:
            return [_rule("domain_gain", arm, "inconclusive", f"domain mean gain {signed(g)} points: this compare "
                          "result carries no per-unit changes, so a gain cannot be shown whatever the pattern: "
                          "re-run `forgetcheck compare` on the run", gain=g, min_domain_gain=need)]
    st = "pass" if lo >= need else ("fail" if up < need else "inconclusive")
    nums = (f"domain mean {_metric_label(pol.metric)} {_f(dom['base_mean'])} -> {_f(dom['arm_mean'])} "
            f"(gain {signed(g)} points, {_side(alpha)} bounds [{signed(lo)}, {signed(up)}])")
    why = {"pass": f"the lower bound reaches the required {need:g} points",
           "fail": f"the upper bound is below the required {need:g} points",
           "inconclusive": f"cannot show the required {need:g} points nor rule them out"}[st]
    return [_rule("domain_gain", arm, st, f"{nums}: {why}", gain=g, gain_lower=lo, gain_upper=up,
                  min_domain_gain=need)]


def drift_rules(compare: CompareFile, arm: str, pol: GateConfig) -> tuple[list[dict], list[dict]]:
    """`ppl_rise` and `kl` (unless turned off): the general-text drift against its limit. Returns (rules, the
    rules not checked because no drift was measured for the arm)."""
    alpha = pol.alpha
    dr = compare["drift"][arm]
    rules, not_checked = [], []
    for rule, key, limit, unit, what in (
            ("ppl_rise", "ppl_rise", pol.max_ppl_rise, "%", "general-text bits per byte rise"),
            ("kl", "kl_mean", pol.max_kl, " nats/token", "mean KL from the base on general text")):
        if limit is None:
            continue
        est = _est(dr[key])
        measured = dr["text_perplexity"] is not None or dr["kl"] is not None or dr[key] is not None
        if est is None and not measured:
            not_checked.append({"rule": rule, "arm": arm, "reason": f"{arm}: {what}: no drift was measured for "
                                "this arm (e.g. lm-eval outputs carry none), so the rule was not checked"})
            continue
        if est is None:
            rules.append(_rule(rule, arm, "inconclusive", f"{what}: not measured with an interval (needs per-block "
                               "drift values in both eval files: re-run `forgetcheck eval`)", **{f"max_{rule}": limit}))
            continue
        digits = 1 if rule == "ppl_rise" else 3
        gap = est.evidence_gap("block(s) of the drift text", "document(s) of the drift text")
        if gap:
            rules.append(_rule(rule, arm, "inconclusive", f"{what} {est.point:.{digits}f}{unit}: {gap}",
                               value=est.point, n=est.n, min_paired=MIN_PAIRED, limit=limit))
            continue
        lo, up = est.lower(alpha), est.upper(alpha)
        st = _three(lo, up, limit)
        nums = f"{what} {est.point:.{digits}f}{unit} ({_side(alpha)} bounds [{lo:.{digits}f}, {up:.{digits}f}])"
        why = {"pass": f"ruled out above {limit:g}{unit}", "fail": f"above {limit:g}{unit}",
               "inconclusive": f"cannot rule out nor show a value above {limit:g}{unit}"}[st]
        rules.append(_rule(rule, arm, st, f"{nums}: {why}", value=est.point, lower=lo, upper=up, limit=limit))
    return rules, not_checked


# ---- the verdict: every rule of every arm combined ----------------------------------------------------------

def decide(compare: dict, policy: GateConfig | dict | None = None) -> dict:
    """Apply the policy's rules to a compare result (compare.json, read or just computed). Returns the gate dict
    (written as gate.json)."""
    pol = as_policy(policy)
    check(validate_gate(pol))
    doc = compare_doc(compare)
    tasks, arms = doc["tasks"], doc["arms"]
    rules: list[dict[str, Any]] = []
    not_checked: list[dict[str, Any]] = []
    powers: dict[str, tuple[dict, _Power | None]] = {}
    for arm in arms:
        rules += missing_rules(doc, arm, pol) + unscored_rules(doc, arm, pol)
        drop_rules, task_power = task_drop_rules(tasks, arm, pol)
        # only critical tasks must PASS; the power of the verdict is theirs (and the mean's)
        task_power = {n: p for n, p in task_power.items() if task_tier(pol, n) == "critical"}
        mean_rules, mean_power = retention_mean_rules(doc, arm, pol)
        rules += drop_rules + coverage_rules(tasks, arm, pol) + mean_rules + domain_gain_rules(doc, arm, pol)
        drifts, unchecked = drift_rules(doc, arm, pol)
        rules += drifts
        not_checked += unchecked
        powers[arm] = (task_power, mean_power)
    if not arms:
        rules.append(_rule("coverage", None, "fail", "no arm was compared: nothing to release"))
    for r in rules:
        # a required task is critical whatever the tiers say: the policy needs it to have been scored
        r["tier"] = "critical" if r["rule"] == "task_missing" and r["task"] in pol.require_tasks else \
            task_tier(pol, r["task"])
        if r["tier"] != "critical":
            r["reason"] = r["reason"].replace(f"{r['arm']}: ", f"{r['arm']}: [{r['tier']}] ", 1)
    return _gate(rules, arms, pol, excluded_tasks(tasks, pol), not_checked, _power(powers, rules, pol))


def _gate(rules: list[dict], arms: list[str], pol: GateConfig, excluded: list[dict], not_checked: list[dict],
          power: dict) -> dict:
    """gate.json from the rules: the verdict of every arm and of the run, the exit code and the summary. Each rule
    counts by its tier (`counted`): advisory ones not at all, supporting ones only when they FAIL."""
    per_arm = {arm: _combine([c for r in rules if r["arm"] == arm and (c := counted(r))]) for arm in arms}
    verdict = _combine([c for r in rules if (c := counted(r))])
    code = EXIT[verdict]
    mapped = ""
    if verdict == "inconclusive" and pol.on_inconclusive in ("fail", "pass"):
        code = EXIT[pol.on_inconclusive]
        mapped = f" (exit {code}: --on-inconclusive {pol.on_inconclusive} maps INCONCLUSIVE to {pol.on_inconclusive.upper()})"
    return {
        "schema_version": GATE_VERSION, "kind": "gate", "verdict": verdict, "passed": verdict == "pass",
        "exit_code": code, "exit_note": mapped.strip(" ()"),
        "policy": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(pol).items()},  # as JSON reads back
        "arms": {arm: {"verdict": v, "passed": v == "pass",
                       "failed": [r["reason"] for r in rules if r["arm"] == arm and counted(r) == "fail"],
                       "inconclusive": [r["reason"] for r in rules if r["arm"] == arm and counted(r) == "inconclusive"]}
                 for arm, v in per_arm.items()},
        "rules": rules, "excluded": excluded, "not_checked": not_checked, "power": power,
        "missing": sorted({r["task"] for r in rules if r["rule"] == "task_missing"}),
        "summary": _summary(verdict, rules, arms, not_checked) + mapped,
    }


def counted(rule: dict) -> str | None:
    """What a rule adds to the verdict by its tier: its status (critical), FAIL or nothing (supporting: it must not
    show harm, it need not rule harm out), nothing (advisory)."""
    tier = rule["tier"]
    if tier == "advisory":
        return None
    if tier == "supporting":
        return "fail" if rule["status"] == "fail" else "pass"
    return rule["status"]


def _summary(verdict: str, rules: list[dict], arms: list[str], not_checked: list[dict]) -> str:
    """The verdict in one line; it counts the rules that were checked and names those that were not (and the
    advisory ones, reported but not counted)."""
    advisory = [r for r in rules if counted(r) is None]
    rules = [r for r in rules if counted(r) is not None]
    failed = [r["reason"] for r in rules if counted(r) == "fail"]
    unsure = [r["reason"] for r in rules if counted(r) == "inconclusive"]
    unchecked = (f" ({len(not_checked)} not checked: " + ", ".join(f"{u['arm']} {u['rule']}" for u in not_checked)
                 + ")") if not_checked else ""
    if advisory:
        unchecked += f" ({len(advisory)} advisory, reported and not counted)"
    if verdict == "pass":
        open_support = [r for r in rules if r["tier"] == "supporting" and r["status"] != "pass"]
        if open_support:
            return (f"PASS: every critical rule rules out harm beyond its margin and none of the {len(rules)} checked "
                    f"rules shows harm for {', '.join(arms)} ({len(open_support)} supporting rule(s) could not rule "
                    f"it out, which supporting rules need not){unchecked}")
        return f"PASS: all {len(rules)} checked rules rule out harm beyond their margins for {', '.join(arms)}{unchecked}"
    if verdict == "fail":
        return (f"FAIL: {len(failed)} of {len(rules)} checked rules show harm beyond the margin{unchecked}: "
                + "; ".join(failed))
    return (f"INCONCLUSIVE: {len(unsure)} of {len(rules)} checked rules can neither rule out nor show harm beyond "
            f"the margin{unchecked}: " + "; ".join(unsure))


def _missing_for(compare: CompareFile, arm: str, pol: GateConfig) -> list[str]:
    """Tasks the gate needs for `arm` and does not have: a retention task whose data could not be built, and
    every task the policy requires (`require_tasks`) that was not scored for the arm."""
    tasks = compare["tasks"]
    out = {n for n, m in compare["missing"].items() if m["suite"] == "retention"}
    out |= {n for n in pol.require_tasks if n not in tasks or arm not in tasks[n]["arms"]}
    return sorted(out)


def _combine(statuses: list[str]) -> str:
    if "fail" in statuses:
        return "fail"
    if "inconclusive" in statuses or not statuses:
        return "inconclusive"
    return "pass"


def _joint(parts: list[_Power]):
    """P(every one of these rules passes at n items per task if nothing changed): tasks are disjoint items, so
    their rules are independent; the mean rises and falls with its tasks, so the product is a lower bound."""
    def at(n: int) -> float:
        p = 1.0
        for part in parts:
            p *= part.at(n)
        return p
    return at


def _power(powers: dict[str, tuple[dict, _Power | None]], rules: list[dict], pol: GateConfig) -> dict:
    """The power of the whole verdict: per arm, what each rule can rule out now and its chance of passing if nothing
    changed; the items per task at which every rule that more items can decide passes with 80% probability (the
    arm's, and the release's over all arms); and the rules more items cannot decide (drift, on a fixed text)."""
    out: dict[str, Any] = {"arms": {}, "items_needed": None, "p_pass_if_unchanged": None, "fixed_undecided": []}
    every: list[_Power] = []
    for arm, (task_power, mean_power) in powers.items():
        arm_rules = [r for r in rules if r["arm"] == arm]
        parts = list(task_power.values()) + ([mean_power] if mean_power else [])
        entry: dict[str, Any] = {"tasks": {name: p.doc() for name, p in task_power.items()},
                                 "mean": mean_power.doc() if mean_power else None,
                                 # why a rule could not decide for want of paired units (stats.MIN_PAIRED)
                                 "evidence": [r["reason"] for r in arm_rules if "min_paired" in r["values"]],
                                 "n": None, "mde": None, "mean_mde": None, "items_needed": None,
                                 "p_pass_if_unchanged": None}
        fixed = [r for r in arm_rules if r["rule"] in ("ppl_rise", "kl") and r["status"] == "inconclusive"]
        out["fixed_undecided"] += [f"{arm} {r['rule']}" for r in fixed]
        if task_power:
            n = min(p.n for p in task_power.values())
            joint = _joint(parts)
            entry.update(n=n, mde=max(p.mde for p in task_power.values()),
                         mean_mde=mean_power.mde if mean_power else None,
                         items_needed=items_for_power(joint, POWER), p_pass_if_unchanged=joint(n))
            every += parts
        out["arms"][arm] = entry
    if every:
        joint = _joint(every)
        n = min(a["n"] for a in out["arms"].values() if a["n"] is not None)
        out.update(items_needed=items_for_power(joint, POWER), p_pass_if_unchanged=joint(n))
    # the p-floor of a PASS: critical task rules that no outcome short of a gain could PASS at this size
    floored = [r["values"]["pass_floor"] for r in rules if r["rule"] == "task_drop" and r["status"] == "inconclusive"
               and r["tier"] == "critical" and "pass_floor" in r["values"]
               and r["values"]["pass_floor"] is not None
               and r["values"]["pass_floor"] >= r["values"]["max_drop"]]
    out["sentence"] = _overall_sentence(out, pol, len(every), floored)
    return out


def _overall_sentence(power: dict, pol: GateConfig, n_rules: int, floored: list[float]) -> str:
    """'50 items per task can only rule out soft-accuracy drops larger than 6.1 points on a task (2.2 on the
    retention mean); to PASS if nothing changed (all 28 such rules with 80% probability) about 430 items per task
    are needed at 2 points per task and 1 for the mean; sft kl cannot be decided by more items ...'"""
    have = [p for p in map(gate_power_arm_doc, power["arms"].values()) if p["n"] is not None]
    fixed = power["fixed_undecided"]
    tail = (f"; {', '.join(fixed)} {'is' if len(fixed) == 1 else 'are'} undecided and more items do not change "
            "that (measured on the fixed drift text)") if fixed else ""
    if not have:
        return "no retention task with per-item records was gated: the power of this run cannot be stated" + tail
    need, p_now = power["items_needed"], power["p_pass_if_unchanged"]
    per_task = (f"{pol.max_drop:g} points per task" if pol.max_relative_drop is None else
                f"each task's margin ({pol.max_drop:g} points, or {pol.max_relative_drop:g}% of the base's score where "
                "smaller)")
    margins = f"at {per_task} and {pol.max_mean_drop:g} for the mean"
    to_pass = (f"to PASS if nothing changed (all {n_rules} item-based rules with 80% probability) about "
               f"{round_up(need):,} items per task are needed {margins}" if need is not None else
               "no number of items per task would PASS them all with 80% probability")
    gaps = [g for p in have for g in p["evidence"]]
    if gaps:
        return f"{gaps[0]}; {to_pass}{tail}"
    n = min(p["n"] for p in have)
    mde = max(p["mde"] for p in have)
    mean_mdes = [p["mean_mde"] for p in have if p["mean_mde"] is not None]
    what = "soft-accuracy" if pol.metric == "soft" else "accuracy"
    s = f"{n} items per task can only rule out {what} drops larger than {mde:.1f} points"
    if mean_mdes:
        s += f" on a task ({max(mean_mdes):.1f} on the retention mean)"
    if p_now is not None and p_now >= POWER:
        s += f"; at this size all {n_rules} item-based rules PASS with {p_now:.0%} probability if nothing changed"
    else:
        if floored:
            s += (f"; at this size {len(floored)} task rule(s) cannot PASS whatever the items show short of a gain "
                  f"(a task on which no item moved is bounded at {min(floored):.1f} points or more)")
        s += "; " + to_pass
    return s + tail


def load_compare_for(target: Path) -> tuple[dict, Path, dict | None]:
    """(compare dict, where gate.json goes, the run's config or None) for a run directory or a compare.json.
    A run directory without compare.json gets it computed from its evals; an older format is refused with the
    command that rewrites it."""
    target = Path(target)
    run_config = None
    if target.is_dir():
        run = RunDir(target)
        if run.compare.exists():
            compare = read_compare(run.compare)  # an older format or a damaged file is refused with the fix
        elif run.eval_json("base").exists():
            from forgetcheck.verdict.compare import compare_run

            compare = compare_run(run)
        else:
            raise BadInput(f"{target} holds neither compare.json nor eval/base.json: give a run directory "
                           "written by `forgetcheck run`, or a compare.json")
        if run.config.exists():
            run_config = read_config(run.config)
        return compare, run.gate, run_config
    if target.is_file():
        compare = read_compare(target)
        cfg = target.parent / "config.json"
        if cfg.exists():
            run_config = read_config(cfg)
        return compare, target.parent / "gate.json", run_config
    raise BadInput(f"{target} not found: give a run directory (runs/<id>) or its compare.json")


def gate_run(target: Path | str, policy: GateConfig | dict | None = None, *, policy_file: Path | None = None,
             junit: Path | None = None, markdown: Path | None = None) -> tuple[dict, int]:
    """Gate a run directory (compare.json computed when absent) or a compare.json file. Writes gate.json
    beside compare.json. Returns (gate dict, exit code: 0 pass, 1 fail, 4 inconclusive unless mapped by
    `on_inconclusive`). `policy` (a dict may hold only some keys, None values meaning not given) overrides
    `policy_file`, which overrides the run's config."""
    from forgetcheck.rundir import check_output_file

    for flag, path in (("--junit", junit), ("--markdown", markdown)):  # refused before anything is written
        if path is not None:
            check_output_file(Path(path), flag)
    overrides = dataclasses.asdict(policy) if isinstance(policy, GateConfig) else dict(policy or {})
    check_keys(overrides)
    compare, out, run_config = load_compare_for(Path(target))
    pol = resolve_policy(run_config, policy_file, overrides)
    gate = decide(compare, pol)
    write_gate(out, gate)
    if junit is not None:
        atomic_write_text(Path(junit), to_junit(gate))
    if markdown is not None:
        atomic_write_text(Path(markdown), to_markdown(gate))
    return gate, gate["exit_code"]
