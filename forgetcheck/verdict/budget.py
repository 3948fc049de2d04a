"""The budget each arm spent (train/<arm>.json) and whether the arms matched: the same optimizer steps and the
same tokens fed forward, within one sequence; an arm stopped early by its forecast is said, not flagged
(compare.json's `budget` block; the report's budget table).
"""

from __future__ import annotations

import json
from typing import Any

from forgetcheck.rundir import RunDir
from forgetcheck.schema import read_config, read_train


def budget_block(run: RunDir, arms: list[str]) -> dict:
    """What each arm spent (train/<arm>.json) and whether the arms matched: same optimizer steps and
    tokens fed forward within one sequence."""
    seq_len = None
    if run.config.exists():
        seq_len = read_config(run.config)["train"]["seq_len"]
    per_arm = {}
    recall = _recall(run)
    for arm in arms:
        p = run.train_json(arm)
        if not p.exists():
            continue
        tr = read_train(p)
        seen = tr["tokens_seen"]
        per_arm[arm] = {"tokens_forward": seen["forward"], "tokens_padding": seen["padding"],
                        "tokens_label": seen["label"], "budget_tokens": tr["budget_tokens"],
                        "optimizer_steps": tr["optimizer_steps"], "planned_steps": tr["planned_steps"],
                        "stopped_early": tr["stopped_early"],
                        "facts_whole": (recall["arms"].get(arm) or {}).get("facts") if recall else None,
                        "recall_facts": recall["facts"] if recall and arm in recall["arms"] else None}
        # Wall-clock figures stay in train/<arm>.json: compare.json holds only what the data decides, so an
        # interrupted-and-resumed run compares identically to an uninterrupted one.
        seq_len = seq_len or tr["config"]["seq_len"]
    out: dict[str, Any] = {"arms": per_arm, "seq_len": seq_len, "matched": None, "reasons": [],
                           "recall": None if recall is None else {k: recall.get(k) for k in ("items", "facts", "why")},
                           "stopped_early": sorted(a for a, v in per_arm.items() if v["stopped_early"])}
    for a in out["stopped_early"]:  # said first: a stopped arm trained less on purpose, not by a fault
        st = per_arm[a]["stopped_early"]
        out["reasons"].append(f"{a} stopped early at step {st['step']} of {st['planned_steps']} "
                              f"(--stop-if-forecast-exceeds): {st['reason']}; it is compared as trained")
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


def _recall(run: RunDir) -> dict | None:
    """The run's recall.json (train/recall.py): the facts each arm trained on whole and those asked; None without one."""
    path = run.root / "recall.json"
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("arms"), dict) else None
