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

GROWTH = 1.5
"""Items per task at a look, over the look before. The bounds allow a look after every item; each look costs a
model load and lm-eval's setup per model, so looks are spaced geometrically: from 50 items, 75, 113, 170, 255,
383, 575 ..."""
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


def futile(values: dict, margin: float, z: float | None = None) -> bool:
    """Would this rule still be open at the cap even if its drop were `z` standard errors more favourable to each
    side? The bounds' widths are projected to the cap's units (`plan_units`). False when the
    rule does not carry what that needs (it is then kept open)."""
    drop, up, lo, normal = (values.get(k) for k in ("drop", "drop_upper", "drop_lower", "drop_upper_normal"))
    units, plan = _units(values), values.get("plan_units")
    if None in (drop, up, lo, normal, units, plan) or units <= 0 or plan <= units:
        return False
    z = FUTILITY_Z if z is None else z
    se = max(0.0, normal - drop) / 1.645
    # a bet tuned for `plan` units gives a bound width of about B (plan / n + 1) at n units (its log-capital grows
    # as n lambda (m - mu) - n lambda^2 sigma^2 / 2, with B = lambda sigma^2 / 2): at the cap the width is the
    # present one times 2 / (plan / n + 1); never more than the 1/sqrt(n) of a fixed-n interval
    shrink = min(2.0 / (plan / units + 1.0), math.sqrt(units / plan))
    could_pass = drop - z * se + (up - drop) * shrink < margin
    could_fail = drop + z * se - (drop - lo) * shrink > margin
    return not (could_pass or could_fail)


def open_tasks(gate: dict, looked: dict[str, dict[str, int]], n_looks: int) -> list[TaskState]:
    """After a look: every (arm, task) the gate decided on, and whether it gets the next look's items. `looked`:
    {arm: {task: looks taken}}; a task that has taken all `n_looks` is at the cap."""
    states: list[TaskState] = []
    by_arm: dict[str, list[dict]] = {}
    for r in gate["rules"]:
        by_arm.setdefault(r["arm"], []).append(r)
    for arm, rules in by_arm.items():
        if arm is None or arm not in looked:
            continue
        taken = looked[arm]
        arm_failed = any(r["status"] == "fail" and r.get("tier") != "advisory" for r in rules)
        mean_open = [r for r in rules if r["rule"] == "retention_mean" and r["status"] == "inconclusive"
                     and r["values"].get("bound") == "sequential"]
        mean_tasks = set()
        if mean_open and not futile(mean_open[0]["values"], mean_open[0]["values"].get("max_mean_drop", 0.0)):
            mean_tasks = {r["task"] for r in rules if r["rule"] == "task_drop" and r["values"].get("bound") ==
                          "sequential" and r.get("tier") != "advisory"}
        for r in rules:
            if r["rule"] != "task_drop" or r["task"] not in taken:
                continue
            task, v = r["task"], r["values"]
            if v.get("bound") != "sequential":
                why, is_open = "not sequential (its items are not soft-accuracy units)", False
            elif arm_failed:
                why, is_open = "the arm has FAILed: more items cannot change that", False
            elif taken[task] >= n_looks:
                why, is_open = "at the cap (--max-items)", False
            elif r["status"] != "inconclusive" and task not in mean_tasks:
                why, is_open = f"decided ({r['status'].upper()})", False
            elif r.get("tier") == "advisory" and task not in mean_tasks:
                why, is_open = "advisory: never changes the verdict", False
            elif r["status"] == "inconclusive" and futile(v, v.get("max_drop", 0.0)) and task not in mean_tasks:
                why, is_open = "futile: even at the cap it would very likely stay open", False
            else:
                why = "open" if r["status"] == "inconclusive" else "the retention mean is still open"
                is_open = True
            states.append(TaskState(arm, task, is_open, why))
    return states
