"""Per-item records: what one evaluation keeps of every item it scored, from lm-eval's logged samples.

A multiple-choice record holds the log-likelihood of every choice, the right choice's index (`target`), the
model's pick as `acc` and `acc_norm` score it, the question and every choice's text as the model saw them (for
the report's flipped items) and the item's `cluster` (items sharing a source). A perplexity record holds the
document's log-likelihood and its word, byte and token counts. The line format is `EvalFile` in schema.py.
"""

from __future__ import annotations

from typing import Any

from forgetcheck.eval.suites import TaskSpec
from forgetcheck.schema import CHOICE_CHARS, PROMPT_CHARS


def target_index(target: Any, choices: list[str]) -> int | None:
    """The right choice's index from lm-eval's target: an index (an int or its digits) among `choices`, or the
    text of one choice, compared without surrounding whitespace (a continuation carries the target delimiter,
    " A", where the target is "A"). None when the target names none of them."""
    if isinstance(target, bool):
        return None
    text = str(target).strip()
    if isinstance(target, int) or text.isdecimal():
        index = int(text)
        return index if 0 <= index < len(choices) else None
    stripped = [c.strip() for c in choices]
    return stripped.index(text) if text in stripped else None


def gold_index(task, doc: Any, choices: list[str]) -> int | None:
    """The right choice's index, as lm-eval scores it: a task with one context per choice (WinoGrande)
    names its answer with doc_to_text, the others with doc_to_target (an index or the choice's text)."""
    gold = task.doc_to_text(doc) if getattr(task, "multiple_input", 0) else task.doc_to_target(doc)
    return target_index(gold, choices)


def chosen(task, doc: Any, lls: list[float]) -> dict[str, int]:
    """The model's pick as lm-eval scores it: `acc` the highest log-likelihood, `acc_norm` the highest per
    character of the choice (lm-eval's completion length)."""
    picks = {"acc": max(range(len(lls)), key=lls.__getitem__)}
    try:
        lengths = [float(len(c)) for c in task.doc_to_choice(doc)] if doc is not None else []
    except Exception:  # a task whose choices cannot be rebuilt from the doc: acc only
        lengths = []
    if len(lengths) == len(lls) and all(lengths):
        picks["acc_norm"] = max(range(len(lls)), key=lambda i: lls[i] / lengths[i])
    return picks


def item_text(args: list) -> tuple[str, list[str]]:
    """(question, choices) of one item as the model saw it, from its requests' (context, continuation)
    pairs. Most tasks share one context (the question) and differ in the continuation; a task with one
    context per choice (WinoGrande) shares the continuation, so each choice is its whole filled-in sentence."""
    contexts, conts = [str(a[0]) for a in args], [str(a[1]) for a in args]
    if len(set(contexts)) > 1:
        return "", [(c + x).strip()[-CHOICE_CHARS:] for c, x in zip(contexts, conts)]
    return contexts[0][-PROMPT_CHARS:], [x[:CHOICE_CHARS] for x in conts]


def records(spec: TaskSpec, samples: list[dict], tok) -> list[dict]:
    """One record per item from lm-eval's logged samples (the per-item line format: schema.EvalFile)."""
    rows = []
    for s in sorted(samples, key=lambda x: x["doc_id"]):
        if spec.kind == "multiple_choice":
            lls = [float(r[0]) for r in s["filtered_resps"]]
            greedy = [bool(r[1]) for r in s["filtered_resps"]]
            metrics = {m: float(s[m]) for m in ("acc", "acc_norm") if m in s}
            args = [a for a in (s.get("arguments") or []) if isinstance(a, (list, tuple)) and len(a) == 2]
            prompt, choices = item_text(args) if args else ("", [])
            target = s["target"]
            if not isinstance(target, int) and "doc" in s:  # WinoGrande logs the shared continuation
                target = gold_index(spec.task, s["doc"], choices)
            correct = bool(metrics["acc"]) if "acc" in metrics else lls.index(max(lls)) == target
            row = {"doc_id": int(s["doc_id"]), "doc_hash": s["doc_hash"], "target": target,
                   "loglikelihoods": lls, "is_greedy": greedy, "correct": correct, "metrics": metrics,
                   "chosen": chosen(spec.task, s.get("doc"), lls)}
            if args:  # the item as the model saw it, for the report's flipped items
                row["prompt"], row["choices"] = prompt, choices
            rows.append(row)
        else:
            ll = float(s["filtered_resps"][0])
            text = s["target"]
            words = s["word_perplexity"][1] if "word_perplexity" in s else len(str(text).split())
            nbytes = s["byte_perplexity"][1] if "byte_perplexity" in s else len(str(text).encode("utf-8"))
            row = {"doc_id": int(s["doc_id"]), "doc_hash": s["doc_hash"], "loglikelihood": ll,
                   "words": int(words), "bytes": int(nbytes)}
            if tok is not None:
                row["tokens"] = len(tok(str(text), add_special_tokens=False)["input_ids"])
            rows.append(row)
        if isinstance(s.get("doc"), dict) and s["doc"].get("cluster") is not None:
            rows[-1]["cluster"] = str(s["doc"]["cluster"])  # items sharing a source (compare resamples clusters)
    return rows


def task_metrics(res: dict, hib: dict) -> dict:
    """lm-eval's results of one task as {metric: {value, stderr, higher_is_better}}."""
    out = {}
    for key, value in res.items():
        if "," not in key or "_stderr," in key:
            continue
        metric = key.split(",")[0]
        stderr = res.get(f"{metric}_stderr,{key.split(',', 1)[1]}")
        out[metric] = {"value": float(value),
                       "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                       "higher_is_better": bool(hib.get(metric, True))}
    return out
