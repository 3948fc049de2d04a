"""BIG-bench tasks as forgetcheck's JSONL items: each builder turns one task (read from the bigbench sdist by
benchdata.py) into items with `choices`/`label` (or WinoGrande's two `contexts`), a seeded subset when the task
is large, and a `cluster` where items share a source; `bigbench_prompt` is BIG-bench's own zero-shot prompt.
"""

from __future__ import annotations

import hashlib
import random
import re

SEED = "forgetcheck-bench-v1"
SUBTASK_ITEMS = 1000  # per subtask of a SMALL_MODEL_TASKS file, seeded
MAX_ITEMS = 2000  # larger BIG-bench sets are sampled (seeded) to this many items; WinoGrande to 1000 pairs


def _sample(items: list, n: int, salt: str) -> list:
    """A seeded subset of n items in their original order (all items when there are fewer)."""
    if len(items) <= n:
        return items
    keep = sorted(random.Random(f"{SEED}:{salt}").sample(range(len(items)), n))
    return [items[i] for i in keep]


def _scored(example: dict) -> tuple[list[str], int] | None:
    """BIG-bench target_scores -> (choices, index of the correct choice); None unless exactly one is correct."""
    ts = example["target_scores"]
    choices = [c.strip() for c in ts]
    best = [i for i, v in enumerate(ts.values()) if v == max(ts.values())]
    return (choices, best[0]) if len(best) == 1 and len(set(choices)) == len(choices) else None


_WINO = re.compile(r"Sentence 1: (.*?)\s*\nAnswer1: (.*?)\.?\s*\nSentence 2: (.*?)\s*\nAnswer2: (.*?)\.?\s*$", re.S)


def build_winogrande(task: dict) -> list[dict]:
    """Each twin pair gives two items in lm-eval's winogrande partial-scoring form: the context is the
    sentence up to the blank with each option filled in, the target is the rest of the sentence."""
    pairs = []
    for ex in task["examples"]:
        m = _WINO.match(ex["target"][0])
        if not m:
            continue
        s1, a1, s2, a2 = (g.strip() for g in m.groups())
        if a1.lower() == a2.lower() or s1.count("_") != 1 or s2.count("_") != 1:
            continue
        pairs.append((s1, a1, s2, a2))
    items = []
    for j, (s1, a1, s2, a2) in enumerate(_sample(pairs, MAX_ITEMS // 2, "winogrande")):
        for sentence, answer in ((s1, 1), (s2, 2)):
            idx = sentence.index("_")
            items.append({"sentence": sentence, "option1": a1, "option2": a2, "answer": answer,
                          "contexts": [sentence[:idx] + a1, sentence[:idx] + a2],
                          "continuation": sentence[idx + 1:].strip(), "label": answer - 1,
                          "cluster": f"winogrande-pair-{j}"})  # the twin sentences share one cluster
    return items


def build_choice_task(task: dict, salt: str) -> list[dict]:
    items = []
    for ex in task["examples"]:
        if scored := _scored(ex):
            items.append({"question": ex["input"].strip(), "choices": scored[0], "label": scored[1]})
    return _sample(items, MAX_ITEMS, salt)


_HYPERBATON = re.compile(r'a " (.*?) " b " (.*?) " \?')


def build_hyperbaton(task: dict) -> list[dict]:
    """Two orderings of the same adjectives; the choices are the phrases themselves."""
    items = []
    for ex in task["examples"]:
        m = _HYPERBATON.search(ex["input"])
        scored = _scored(ex)  # choices are "a" / "b"
        if not m or not scored:
            continue
        label = scored[1]
        a, b = m.group(1).strip(), m.group(2).strip()
        items.append({"question": ex["input"], "choices": [a, b], "label": label})
    return _sample(items, MAX_ITEMS, "hyperbaton")


def build_cause_effect(one: dict, two: dict) -> list[dict]:
    """Both subtasks list the same events in the same order (example i of one_sentence and of two_sentences
    describe one event pair), so item i of each carries the cluster `cause-effect-<i>`."""
    items = []
    for i, ex in enumerate(one["examples"]):
        if not (scored := _scored(ex)):
            continue
        choices, label = scored
        items.append({"query": "Which of these sentences makes more sense?\nAnswer:", "choices": choices,
                      "label": label, "subtask": "one_sentence", "cluster": f"cause-effect-{i}"})
    for i, ex in enumerate(two["examples"]):
        if not (scored := _scored(ex)):
            continue
        choices, label = scored
        order = sorted(range(len(choices)), key=lambda i: choices[i])  # do not always list the cause first
        choices = [choices[i] for i in order]
        items.append({"query": f"Two events: \"{choices[0]}\" and \"{choices[1]}\". Which event caused the other?"
                               f"\nAnswer:", "choices": choices, "label": order.index(label),
                      "subtask": "two_sentences", "cluster": f"cause-effect-{i}"})
    return items


def bigbench_prompt(task: dict, text: str) -> str:
    """BIG-bench's zero-shot prompt for one example: task_prefix + example_input_prefix + input +
    example_output_prefix (BIG-bench's defaults "\nQ: " and "\nA: "), or, for a cloze input that ends in a
    space ("The athlete behind the bike "), task_prefix + input. Stripped: lm-eval joins it to each choice with
    one space."""
    ip, op = task.get("example_input_prefix"), task.get("example_output_prefix")
    prefix = task.get("task_prefix") or ""
    if text.endswith(" ") and ip is None and op is None:
        return (prefix + text).strip()
    ip = "\nQ: " if ip is None else ip
    op = "\nA: " if op is None else op
    return (prefix + ip + text + op).strip()


def build_prompted(subtasks: dict[str, dict], salt: str, cluster_by: str | None = None) -> list[dict]:
    """Items {query, choices, label, subtask[, cluster]} of BIG-bench tasks in their own zero-shot prompt, at
    most SUBTASK_ITEMS (seeded) per subtask. `cluster_by`: items that share a source share a cluster id, by
    "prompt" (subject_verb_agreement lists one sentence start with several verbs) or by "distractors" (the
    same set of wrong choices: metaphor_understanding's lit2met and met2lit pair a sentence with the same ones)."""
    items = []
    for sub, task in subtasks.items():
        rows = []
        for ex in task["examples"]:
            if not (scored := _scored(ex)):
                continue
            choices, label = scored
            row = {"query": bigbench_prompt(task, ex["input"]), "choices": choices, "label": label, "subtask": sub}
            if cluster_by is not None:
                key = row["query"] if cluster_by == "prompt" else "\x00".join(
                    sorted(c for i, c in enumerate(choices) if i != label))
                row["cluster"] = f"{salt}-{hashlib.sha256(key.encode('utf-8')).hexdigest()[:12]}"
            rows.append(row)
        items += _sample(rows, SUBTASK_ITEMS, f"{salt}:{sub}")
    return items


def build_squad_text(squad: dict) -> list[dict]:
    """Paragraphs of one article share its title as their cluster."""
    return [{"title": a["title"], "text": p["context"].strip(), "cluster": a["title"]}
            for a in squad["data"] for p in a["paragraphs"]]


def _chance(items: list[dict]) -> float | None:
    """Expected accuracy of a uniform random guess (None for text without choices)."""
    key = "contexts" if "contexts" in items[0] else "choices"
    if key not in items[0]:
        return None
    return round(sum(1 / len(i[key]) for i in items) / len(items), 4)
