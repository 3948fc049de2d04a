"""`--until-decided` for `check` and `run`: after the first look, more items only where the verdict is still open.

The caller has evaluated the base and every candidate at the first look (runner.evaluate with `looks`). Each round
here compares and gates the run as it stands, asks verdict/sequential.py which (arm, task) pairs more items could
still decide, and scores the next look's new items of those tasks for the candidates that need them and for the
base (the union); every look's items are a cache entry of their own, so nothing is scored twice. It stops when no
task is open or `--max-minutes` has passed, and writes runs/<id>/looks.json: the looks planned, each arm's tasks
with the looks they took, their items and why they stopped. The caller then runs the usual compare, gate and
report (cli/verdict.finish) on the final evaluations.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from forgetcheck import config, console
from forgetcheck.rundir import RunDir, atomic_write_json, read_json


def sizes_for(eval_cfg: config.EvalConfig, lk: config.LookConfig) -> tuple[int, ...]:
    """The items per task at each look (the flags were validated with the command's configuration)."""
    from forgetcheck.verdict.sequential import look_sizes

    return look_sizes(int(eval_cfg.limit), lk.cap(int(eval_cfg.limit)))


def evaluator(run: RunDir, eval_cfg: config.EvalConfig, sizes: tuple[int, ...], models: dict, *, device: str,
              tasks_dir, references: dict, skip: dict | None) -> Callable[[str, dict[str, int]], None]:
    """`until_decided`'s `evaluate`: the base ("base", with its screen items) or an arm (`models[label]`, against
    `references[label]`, without the tasks in `skip`) scored on `taken[task]` looks of each task."""
    from forgetcheck.eval import runner
    from forgetcheck.schema import StageTimer

    def evaluate(label: str, taken: dict[str, int]) -> None:
        base = label == "base"
        with StageTimer(run, f"eval_{label}_looks"):
            runner.evaluate(models[label], eval_cfg, run.eval_json(label), device=device, label=label,
                            reference=None if base else references.get(label), tasks_dir=tasks_dir,
                            skip=None if base else skip, screen=base, looks=runner.Looks(sizes, taken))
    return evaluate


def check_policy(policy: config.GateConfig, lk: config.LookConfig, limit: int | None) -> None:
    """The policy a sequential check gates with (resolved from flags, --policy and defaults) must allow it."""
    config.check(config.validate_looks(lk, limit, policy.metric))


def until_decided(run: RunDir, sizes: tuple[int, ...], policy: config.GateConfig, lk: config.LookConfig,
                  evaluate: Callable[[str, dict[str, int]], None], arms: list[str], started: float) -> dict:
    """Look after look until decided. `evaluate(label, taken)` re-evaluates the base ("base") or an arm with
    `taken[task]` looks of each task (runner.evaluate with `Looks(sizes, taken)`). Returns looks.json's dict."""
    from forgetcheck.verdict import compare, gate, sequential

    taken: dict[str, dict[str, int]] = {arm: {} for arm in arms}
    look = 1
    while True:
        doc = compare.compare_run(run, alpha=policy.alpha)
        verdict = gate.decide(doc, policy)
        looked = {arm: {r["task"]: taken[arm].get(r["task"], 1) for r in verdict["rules"]
                        if r["arm"] == arm and r["rule"] == "task_drop"} for arm in arms}
        states = sequential.open_tasks(verdict, looked, len(sizes))
        grow = [s for s in states if s.open]
        decided = sum(r["status"] != "inconclusive" for r in verdict["rules"])
        console.say(f"  look {look} of at most {len(sizes)} ({sizes[min(look, len(sizes)) - 1]} items per task at "
                    f"most): {decided} of {len(verdict['rules'])} rules decided; "
                    + (f"{len(grow)} task(s) get more items: "
                       + ", ".join(sorted({f'{s.arm}/{s.task}' for s in grow})) if grow else "no task gets more"))
        minutes = (time.perf_counter() - started) / 60
        if not grow:
            stop = "no task whose verdict more items could change is left"
            break
        if lk.max_minutes is not None and minutes >= lk.max_minutes:
            stop = f"--max-minutes {lk.max_minutes:g} reached ({minutes:.1f} min)"
            break
        for s in grow:
            taken[s.arm][s.task] = looked[s.arm][s.task] + 1
        look += 1
        base_taken: dict[str, int] = {}
        for arm in arms:
            for task, k in taken[arm].items():
                base_taken[task] = max(base_taken.get(task, 1), k)
        evaluate("base", base_taken)
        for arm in sorted({s.arm for s in grow}):
            evaluate(arm, taken[arm])
    why = {(s.arm, s.task): s.why for s in states}
    record = {"sizes": list(sizes), "looks_taken": look, "stop": stop,
              "wall_s": round(time.perf_counter() - started, 3), "arms": {}}
    for arm in arms:
        tasks = (read_json(run.eval_json(arm)).get("tasks") or {})
        record["arms"][arm] = {
            task: {"looks": looked[arm].get(task, 1), "items": t.get("n"),
                   "why": why.get((arm, task), "not gated by a sequential rule")}
            for task, t in tasks.items() if task in looked[arm]}
    atomic_write_json(run.root / "looks.json", record)
    console.say(f"  stopped after {look} look(s): {stop}")
    still = [r for r in verdict["rules"] if r["status"] == "inconclusive" and r.get("tier") != "advisory"]
    if still:
        need = (verdict.get("power") or {}).get("items_needed")
        console.say(f"  still open: {', '.join(_name(r) for r in still)}"
                    + (f"; about {need} items per task would decide the item-based ones if nothing changed "
                       f"(--max-items {need})" if need else ""))
    return record


def _name(rule: dict) -> str:
    return f"{rule['arm']} {rule['rule']}" + (f"[{rule['task']}]" if rule.get("task") else "")
