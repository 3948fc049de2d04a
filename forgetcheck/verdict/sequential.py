"""Scoring until decided (`--until-decided`): which tasks get more items after a look, and when to stop.

A sequential check scores every task at the first look (`--limit` items), gates, and then gives more items only to
the tasks whose verdict more items could still change: an arm's task rule that is INCONCLUSIVE (not advisory), and
every task of its retention mean while that rule is. Each look takes `GROWTH` times the items of the one before,
up to the cap (`--max-items`); the base and every candidate are scored on the same new items (eval/suites.py
`look_items`). The gate's sequential bounds (gate.py `_sequential`; docs/verdicts.md, "Until decided") hold
however many looks are taken and whenever the looking stops, so this module may stop a task for any reason: its
rule decided, an arm FAILed (a FAIL is final), the cap or the time budget was reached, or the rule is futile
(`futile`: even at the cap it would very likely still be open). Stopping early never raises an error rate; it
only gives up power, which `FUTILITY_Z` keeps small.

Pure: reads gate.json dicts, never imports torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GROWTH = 1.25
"""Items per task at a look, over the look before. The bounds allow a look after every item; each look costs a
model load and lm-eval's setup per model, so looks are spaced geometrically: from 50 items, 63, 79, 99, 124, 155,
194, 243, 304, 380 ... A finer grid stops closer to where a bound crosses its margin: in bench/gate_validity.py's
sequential table, 1.25 spent 73 % of the fixed design's items where 1.5 spent 79 %, before the arm-level stop
(docs/verdicts.md, "Until decided")."""
FUTILITY_Z = 1.64
"""How optimistic `futile` is about the drop: a rule is stopped as futile only when even a drop this many standard
errors more favourable than the one measured would leave it open at the cap (neither side's bound could cross
the margin), so an unchanged model is stopped for futility in at most about 5% of its looks' worth of bad luck."""


def look_sizes(first: int, cap: int, growth: float = GROWTH) -> tuple[int, ...]:
    """Items per task at each look: `first`, then `growth` times more (rounded up) until `cap`, which is the last."""
    if cap <= first:
        return (first,)
    sizes = [first]
    while sizes[-1] < cap:
        sizes.append(min(cap, max(sizes[-1] + 1, math.ceil(sizes[-1] * growth))))
    return tuple(sizes)


@dataclass
class TaskState:
    """Why one (arm, task) is still open or closed after a look."""

    arm: str
    task: str
    open: bool
    why: str


def _units(v: dict) -> int | None:
    units = v.get("look_units")
    return int(sum(units)) if units else None


def reachable(values: dict, margin: float, z: float | None = None) -> tuple[bool, bool]:
    """(could it still PASS, could it still FAIL) by the cap, if its drop were `z` standard errors more favourable
    to that side than the one measured. The bounds' widths are projected to the cap's units (`plan_units`). A rule
    that does not carry what that needs is taken to reach both."""
    drop, up, lo, normal = (values.get(k) for k in ("drop", "drop_upper", "drop_lower", "drop_upper_normal"))
    units, plan = _units(values), values.get("plan_units")
    if None in (drop, up, lo, normal, units, plan) or units <= 0:
        return True, True
    if plan <= units:
        return False, False  # at the cap: nothing more to score
    z = FUTILITY_Z if z is None else z
    se = max(0.0, normal - drop) / 1.645
    # a bet tuned for `plan` units gives a bound width of about B (plan / n + 1) at n units (its log-capital grows
    # as n lambda (m - mu) - n lambda^2 sigma^2 / 2, with B = lambda sigma^2 / 2): at the cap the width is the
    # present one times 2 / (plan / n + 1); never more than the 1/sqrt(n) of a fixed-n interval
    shrink = min(2.0 / (plan / units + 1.0), math.sqrt(units / plan))
    return (drop - z * se + (up - drop) * shrink < margin, drop + z * se - (drop - lo) * shrink > margin)


def futile(values: dict, margin: float, z: float | None = None) -> bool:
    """Would this rule still be open at the cap even with a drop `z` standard errors more favourable to each side
    (`reachable`)?"""
    return not any(reachable(values, margin, z))


def _at_cap(v: dict) -> bool:
    units, plan = _units(v), v.get("plan_units")
    return units is not None and plan is not None and units >= plan


def _margin(rule: dict) -> float:
    v = rule["values"]
    return v.get("max_mean_drop", 0.0) if rule["rule"] == "retention_mean" else v.get("max_drop", 0.0)


def open_tasks(gate: dict, looked: dict[str, dict[str, int]], n_looks: int) -> list[TaskState]:
    """After a look: every (arm, task) the gate has a task rule for, and whether it gets the next look's items.
    `looked`: {arm: {task: looks taken}}; a task that has taken all `n_looks` is at the cap.

    A task gets more items when its rule is INCONCLUSIVE and could still decide the arm: FAIL (any tier but
    advisory), or PASS while the arm as a whole can still PASS (none of its critical rules is out of reach of a
    PASS). While the arm's retention mean is open and could decide the same way, every task of the mean grows with
    it (its bound needs a draw from every task at each look)."""
    by_arm: dict[str, list[dict]] = {}
    for r in gate["rules"]:
        by_arm.setdefault(r["arm"], []).append(r)
    return [st for arm, rules in by_arm.items() if arm is not None and arm in looked
            for st in _arm_states(arm, rules, looked[arm], n_looks)]


def _arm_states(arm: str, rules: list[dict], taken: dict[str, int], n_looks: int) -> list[TaskState]:
    arm_failed = any(r["status"] == "fail" and r.get("tier") != "advisory" for r in rules)
    seq = [r for r in rules if r["values"].get("bound") == "sequential" and r.get("tier") != "advisory"]
    reach = {id(r): reachable(r["values"], _margin(r)) if r["status"] == "inconclusive" else (False, False)
             for r in seq}
    # the arm can still PASS unless a critical rule that is not yet PASS can no longer reach one
    arm_can_pass = all(r["status"] == "pass" or r.get("tier") == "supporting"
                       or (r["status"] == "inconclusive" and reach.get(id(r), (True, True))[0])
                       for r in rules if r.get("tier") != "advisory" and r["rule"] != "coverage")
    useful = {k: could_fail or (could_pass and arm_can_pass) for k, (could_pass, could_fail) in reach.items()}
    for r in seq:  # a supporting rule's PASS changes nothing: only its FAIL is worth items
        if r.get("tier") == "supporting":
            useful[id(r)] = reach[id(r)][1]
    mean_open = any(r["rule"] == "retention_mean" and r["status"] == "inconclusive" and useful[id(r)] for r in seq)
    mean_tasks = {r["task"] for r in seq if r["rule"] == "task_drop"} if mean_open else set()
    states = []
    for r in rules:
        if r["rule"] != "task_drop" or r["task"] not in taken:
            continue
        task, v = r["task"], r["values"]
        in_mean = task in mean_tasks and taken[task] < n_looks
        if v.get("bound") != "sequential":
            why, is_open = "not sequential (its items are not soft-accuracy units)", False
        elif arm_failed:
            why, is_open = "the arm has FAILed: more items cannot change that", False
        elif taken[task] >= n_looks:
            why, is_open = "at the cap (--max-items)", False
        elif r.get("tier") == "advisory" and not in_mean:
            why, is_open = "advisory: never changes the verdict", False
        elif r["status"] != "inconclusive" and not in_mean:
            why, is_open = f"decided ({r['status'].upper()})", False
        elif r["status"] == "inconclusive" and useful.get(id(r)):
            why, is_open = "open", True
        elif in_mean:
            why, is_open = "the retention mean is still open", True
        elif futile(v, _margin(r)):
            why, is_open = (f"futile: even at the cap ({v.get('plan_units')} units) it would very likely stay open"
                            if not _at_cap(v) else "every item of the task is scored"), False
        else:
            why, is_open = ("the arm can no longer PASS (another rule is out of reach) and this one could only "
                            "PASS"), False
        states.append(TaskState(arm, task, is_open, why))
    return states
