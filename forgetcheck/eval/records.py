"""Per-item records: what one evaluation keeps of every item it scored, from lm-eval's logged samples.

One converter for both ways samples arrive: from our own lm-eval run (eval/runner.py, with the task object at
hand) and from the samples files of a stock `lm_eval --log_samples` run (eval/lmeval_outputs.py, JSON alone,
where lm-eval's tracker wrote the responses' numbers and booleans and the target as strings and each request's
arguments as a dict).

A multiple-choice record holds the log-likelihood of every choice, the right choice's index (`target`), the
model's pick as `acc` and `acc_norm` score it, the question and every choice's text as the model saw them (for
the report's flipped items) and the item's `cluster` (items sharing a source). A perplexity record holds the
document's log-likelihood and its word, byte and token counts. A generation record (stock outputs only) holds
the target and the model's response. The line format is `EvalFile` in schema.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from forgetcheck.eval.metrics import PERPLEXITY_METRICS, higher_is_better
from forgetcheck.eval.suites import TaskSpec
from forgetcheck.schema import CHOICE_CHARS, PROMPT_CHARS

CHOICE_METRICS = ("acc", "acc_norm")
"""The per-item metrics our own multiple-choice records keep."""


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


def arguments(sample: dict) -> list[list[str]]:
    """The item's requests as lists of strings ((context, continuation) for a multiple-choice item), from the
    tuples lm-eval logs in process or the dict its tracker writes: {"gen_args_0": {"arg_0": ctx, "arg_1": cont}}."""
    args = sample.get("arguments") or []
    if isinstance(args, dict):
        return [[str(v) for _, v in sorted(a.items(), key=_numbered)] for _, a in sorted(args.items(), key=_numbered)]
    return [[str(x) for x in a] if isinstance(a, (list, tuple)) else [str(a)] for a in args]


def _numbered(item: tuple[str, Any]) -> int:
    return int(item[0].split("_")[-1])


def _is_true(x: Any) -> bool:
    return x is True or str(x).lower() == "true"


def item_text(pairs: list[list[str]]) -> tuple[str, list[str]]:
    """(question, choices) of one item as the model saw it, whole, from its requests' (context, continuation)
    pairs. Most tasks share one context (the question) and differ in the continuation; a task with one
    context per choice (WinoGrande) shares the continuation, so each choice is its whole filled-in sentence."""
    contexts, conts = [p[0] for p in pairs], [p[1] for p in pairs]
    if len(set(contexts)) > 1:
        return "", [(c + x).strip() for c, x in zip(contexts, conts)]
    return contexts[0], conts


def shown(prompt: str, choices: list[str], per_choice_context: bool) -> tuple[str, list[str]]:
    """The record's cut of the question (its tail, nearest the answer) and of each choice (a filled-in
    sentence's tail, where the choices differ; else the choice's head)."""
    if per_choice_context:
        return prompt[-PROMPT_CHARS:], [c[-CHOICE_CHARS:] for c in choices]
    return prompt[-PROMPT_CHARS:], [c[:CHOICE_CHARS] for c in choices]


def gold(sample: dict, task, choices: list[str]) -> int | None:
    """The right choice's index. A task with one context per choice (WinoGrande) logs the shared continuation
    as its target and names its answer with doc_to_text, so without the task object it has none."""
    target = sample.get("target")
    if task is not None and getattr(task, "multiple_input", 0) and not isinstance(target, int) \
            and sample.get("doc") is not None:
        target = task.doc_to_text(sample["doc"])
    return target_index(target, choices)


def chosen(task, doc: Any, lls: list[float]) -> dict[str, int]:
    """The model's pick as lm-eval scores it: `acc` the highest log-likelihood, `acc_norm` the highest per
    character of the choice (lm-eval's completion length), which needs the task to rebuild the choices."""
    picks = {"acc": max(range(len(lls)), key=lls.__getitem__)}
    try:
        lengths = [float(len(c)) for c in task.doc_to_choice(doc)] if task is not None and doc is not None else []
    except Exception:  # a task whose choices cannot be rebuilt from the doc: acc only
        lengths = []
    if len(lengths) == len(lls) and all(lengths):
        picks["acc_norm"] = max(range(len(lls)), key=lambda i: lls[i] / lengths[i])
    return picks


def item_metrics(sample: dict, names: Iterable[str]) -> dict[str, float]:
    """The per-item values of the metrics `names` that the sample holds as numbers (a boolean counts as 0 / 1)."""
    return {m: float(sample[m]) for m in sorted(names) if isinstance(sample.get(m), (int, float))}


def choice_record(sample: dict, metric_names: Iterable[str], task) -> dict:
    """A multiple-choice item: every choice's log-likelihood, the right one, the model's picks, the text."""
    resps = sample.get("filtered_resps") or []
    lls = [float(r[0]) if isinstance(r, (list, tuple)) else float(r) for r in resps]
    greedy = [_is_true(r[1]) if isinstance(r, (list, tuple)) and len(r) > 1 else False for r in resps]
    metrics = item_metrics(sample, metric_names)
    pairs = [a for a in arguments(sample) if len(a) == 2]
    prompt, choices = item_text(pairs) if pairs else ("", [])
    target = gold(sample, task, choices)
    correct = bool(metrics["acc"]) if "acc" in metrics else lls.index(max(lls)) == target
    row = {"doc_id": int(sample["doc_id"]), "doc_hash": sample["doc_hash"], "target": target,
           "loglikelihoods": lls, "is_greedy": greedy, "correct": correct, "metrics": metrics,
           "chosen": chosen(task, sample.get("doc"), lls)}
    if pairs:  # the item as the model saw it, for the report's flipped items
        row["prompt"], row["choices"] = shown(prompt, choices, len({p[0] for p in pairs}) > 1)
    return row


def perplexity_record(sample: dict, tokenizer) -> dict:
    """A perplexity document: its log-likelihood and the word, byte (and token) counts it is normalised by,
    as lm-eval counted them for its perplexity metrics (each metric logs a (log-likelihood, count) pair)."""
    text = str(sample.get("target"))
    counted: dict[str, int] = {}
    for metric, count in PERPLEXITY_METRICS.items():
        pair = sample.get(metric)
        if count not in counted and isinstance(pair, (list, tuple)) and len(pair) == 2:
            counted[count] = int(pair[1])
    row = {"doc_id": int(sample["doc_id"]), "doc_hash": sample["doc_hash"],
           "loglikelihood": float((sample.get("filtered_resps") or [math.nan])[0]),
           "words": counted.get("words", len(text.split())), "bytes": counted.get("bytes", len(text.encode("utf-8")))}
    if tokenizer is not None:
        row["tokens"] = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return row


def generation_record(sample: dict, metric_names: Iterable[str], primary: str) -> dict:
    """A generated answer: the target, the model's response, whether the primary metric (else `acc`) scored it
    right."""
    metrics = item_metrics(sample, metric_names)
    resps = sample.get("filtered_resps") or []
    args = arguments(sample)
    row: dict[str, Any] = {"doc_id": int(sample["doc_id"]), "doc_hash": sample["doc_hash"], "metrics": metrics,
                           "target": sample.get("target"),
                           "response": str(resps[0])[:CHOICE_CHARS] if resps else None}
    if args:
        row["prompt"] = args[0][0][-PROMPT_CHARS:]
    scored = next((metrics[m] for m in (primary, "acc") if m in metrics), None)
    if scored is not None:
        row["correct"] = scored == 1.0
    return row


def record(sample: dict, kind: str, *, metric_names: Iterable[str] = CHOICE_METRICS, primary: str = "acc",
           task=None, tokenizer=None) -> dict:
    """One lm-eval sample as a per-item record (schema.EvalFile). `kind`: "multiple_choice", "perplexity" or
    another lm-eval output type (a generation); `metric_names`: the per-item metrics to keep; `task`: lm-eval's
    Task, when at hand (WinoGrande's gold, the `acc_norm` pick); `tokenizer`: counts a perplexity text's tokens."""
    if kind == "multiple_choice":
        row = choice_record(sample, metric_names, task)
    elif kind == "perplexity":
        row = perplexity_record(sample, tokenizer)
    else:
        row = generation_record(sample, metric_names, primary)
    doc = sample.get("doc")
    if isinstance(doc, dict) and doc.get("cluster") is not None:
        row["cluster"] = str(doc["cluster"])  # items sharing a source (compare resamples clusters)
    return row


def records(spec: TaskSpec, samples: list[dict], tokenizer) -> list[dict]:
    """One record per item of one of our own evaluations, in doc_id order."""
    return [record(s, spec.kind, task=spec.task, tokenizer=tokenizer)
            for s in sorted(samples, key=lambda x: x["doc_id"])]


def task_metrics(res: dict, hib: dict, flt: str | None = None) -> dict:
    """lm-eval's results of one task as {metric: {value, stderr, higher_is_better}}: the numbers of filter
    `flt` ("none" for most tasks; every filter when None), each direction as lm-eval's `hib` states it."""
    out = {}
    for key, value in res.items():
        if "," not in key or "_stderr," in key:
            continue
        metric, f = key.split(",", 1)
        if flt is not None and f != flt or not isinstance(value, (int, float)):
            continue
        stderr = res.get(f"{metric}_stderr,{f}")
        out[metric] = {"value": float(value),
                       "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                       "higher_is_better": bool(hib.get(metric, higher_is_better(metric)))}
    return out
