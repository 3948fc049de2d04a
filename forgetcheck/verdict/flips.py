"""Flipped items a person can read: for an item the base answered right and an arm wrong (or the reverse),
the question, every choice, the right one, and what each model chose (compare.json's `examples`; the report's
flips section shows them).
"""

from __future__ import annotations

import json

import numpy as np

from forgetcheck.schema import ITEM_TEXT_KEYS, ItemRecord

N_EXAMPLES = 5
"""Flipped items kept per task, arm and direction."""
EXAMPLE_CHARS = 400


def _item_text(row: ItemRecord) -> str | None:
    for key in ITEM_TEXT_KEYS:
        v = row[key]
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


def _choice(row: ItemRecord, metric: str = "acc") -> int | None:
    """The choice the model picked, as the task's metric scores it (acc_norm: length-normalised), when the
    record says; else the highest log-likelihood."""
    chosen = (row["chosen"] or {}).get(metric)
    if isinstance(chosen, int):
        return chosen
    lls = row["loglikelihoods"]
    if not lls:
        return None
    try:
        vals = [float(x[0]) if isinstance(x, (list, tuple)) else float(x) for x in lls]
    except (TypeError, ValueError):
        return None
    return int(np.argmax(vals))


def example(b: ItemRecord, a: ItemRecord, metric: str = "acc") -> dict:
    ex = {"doc_id": b["doc_id"], "doc_hash": b["doc_hash"], "target": b["target"],
          "base_choice": _choice(b, metric), "arm_choice": _choice(a, metric)}
    text = _item_text(b) or _item_text(a)
    if text is not None:
        ex["text"] = text
    choices = b["choices"] or a["choices"]
    if choices:  # every choice's text, for the report's flipped items
        ex["choices"] = [str(c) for c in choices]
    return ex
