"""Screen BIG-bench multiple-choice tasks: which are clearly above chance for a (small) model, zero-shot.

    python bench/task_screen.py [--model smollm2-135m] [--items 150] [--max-length 256] [--budget-s 900]
                                [--tasks NAME,NAME...] [--md PATH]

Candidates are the JSON tasks of the `bigbench==1.0.0` sdist in `$FORGETCHECK_HOME/downloads/` (read with
`tarfile`, never installed) whose examples carry `target_scores` with exactly one best choice, with at least
100 such examples, in English, short enough (median input <= 700 characters, at most 20 choices), and not
excluded (below, `EXCLUDED`): tasks already in the suites, medical/biology/health tasks (the domain arm trains
on medical text), tasks drawn from Wikipedia claims (the drift text is Wikipedia), bias probes, non-English.

Each task is scored on a fixed seeded sample of up to `--items` examples the way lm-eval's multiple-choice
tasks score: the log-likelihood of each choice (" " + choice) after the context, through forgetcheck's FastLM
(lm-eval's HFLM scoring). acc takes the highest log-likelihood, acc_norm the highest per character. The
context is BIG-bench's own zero-shot prompt (`forgetcheck.bigbench.bigbench_prompt`, which also builds the
tasks' data): task_prefix + example_input_prefix + input + example_output_prefix
(defaults "\\nQ: " and "\\nA: "), or, for a cloze input that ends in a space ("The athlete "), task_prefix +
input. Printed per task: n, acc, acc_norm, chance (mean 1/#choices), the one-sided exact binomial p of acc
against chance (scipy.stats.binomtest) at n, the p expected at 50 items (the same accuracy at n = 50), the
tokens per item and seconds per item. Tasks are screened shortest first (`--tasks`: in the given order)
until `--budget-s` runs out, at most `--per-family` subtasks of one task folder (subject_verb_agreement has 18
English variants, arithmetic 20).
The table is printed and written as Markdown to `--md` (default `$FORGETCHECK_HOME/task_screen.md`).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tarfile
import time
from pathlib import Path

ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks/"
MIN_EXAMPLES = 100
MAX_CHOICES = 20
MAX_MEDIAN_INPUT = 700  # characters
NON_ENGLISH_KEYWORDS = {"non-English", "multilingual", "low-resource language", "translation"}
EXCLUDED = (
    # already in forgetcheck's suites
    "truthful_qa/", "social_iqa/", "strategyqa/", "hyperbaton/", "cause_and_effect/", "general_knowledge/",
    "natural_instructions/",
    # medical / biology / health: the domain arm trains on medical text
    "multiemo/medicine_", "cryobiology", "fact_checker/covid19", "periodic_elements/", "physics/",
    # Wikipedia-derived claims and edits (the drift text is Wikipedia paragraphs)
    "fact_checker/fever", "vitaminc", "which_wiki_edit", "contextual_parametric_knowledge_conflicts",
    # bias probes (their "right" answer is a policy, not knowledge or skill)
    "bbq_lite",
    # not English text
    "_italian", "kannada", "swahili", "hindi", "hinglish", "parsinlu", "kanji", "language_identification",
    "international_phonetic_alphabet",
)
SEED = "forgetcheck-task-screen-v1"


def _scored(example: dict) -> tuple[list[str], int] | None:
    ts = example.get("target_scores")
    if not isinstance(ts, dict) or len(ts) < 2:
        return None
    choices = [str(c).strip() for c in ts]
    top = max(ts.values())
    best = [i for i, v in enumerate(ts.values()) if v == top]
    return (choices, best[0]) if len(best) == 1 and len(set(choices)) == len(choices) else None


def _is_english_lang(name: str) -> bool:
    if name.startswith("multiemo/"):
        return name.split("/")[1].split("_")[-1].startswith("en")
    return True


def candidates(sdist: Path, only: set[str] | None) -> dict[str, dict]:
    """task path (under benchmark_tasks/) -> {keywords, task_prefix, example_input_prefix,
    example_output_prefix, items}."""
    out = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for m in tar:
            if not (m.isfile() and m.name.startswith(ROOT) and m.name.endswith(".json")) or m.size > 30_000_000:
                continue
            name = m.name[len(ROOT):]
            if only is not None and name not in only:
                continue
            if only is None and (any(x in name for x in EXCLUDED) or not _is_english_lang(name)):
                continue
            try:
                doc = json.load(tar.extractfile(m))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if not isinstance(doc, dict) or not isinstance(doc.get("examples"), list):
                continue
            if only is None and NON_ENGLISH_KEYWORDS & set(doc.get("keywords", [])):
                continue
            items = []
            for ex in doc["examples"]:
                if isinstance(ex, dict) and isinstance(ex.get("input"), str) and (s := _scored(ex)):
                    items.append({"input": ex["input"], "choices": s[0], "label": s[1]})
            if len(items) < MIN_EXAMPLES and only is None:
                continue
            if only is None and (max(len(i["choices"]) for i in items) > MAX_CHOICES
                                 or statistics.median(len(i["input"]) for i in items) > MAX_MEDIAN_INPUT):
                continue
            out[name] = {"keywords": doc.get("keywords", []), "task_prefix": doc.get("task_prefix"),
                         "example_input_prefix": doc.get("example_input_prefix"),
                         "example_output_prefix": doc.get("example_output_prefix"), "items": items}
    return out


def context_of(task: dict, item: dict) -> str:
    """BIG-bench's zero-shot prompt for one item: the same function builds forgetcheck's task data."""
    from forgetcheck.bigbench import bigbench_prompt

    return bigbench_prompt(task, item["input"])


def sample(items: list, n: int, salt: str) -> list:
    if len(items) <= n:
        return items
    keep = sorted(random.Random(f"{SEED}:{salt}").sample(range(len(items)), n))
    return [items[i] for i in keep]


def pvalue(k: int, n: int, chance: float) -> float:
    from scipy.stats import binomtest

    return float(binomtest(k, n, chance, alternative="greater").pvalue)


def score_task(lm, name: str, task: dict, n_items: int) -> dict:
    from lm_eval.api.instance import Instance

    items = sample(task["items"], n_items, name)
    reqs, spans = [], []
    for j, item in enumerate(items):
        ctx = context_of(task, item)
        start = len(reqs)
        for idx, choice in enumerate(item["choices"]):
            reqs.append(Instance("loglikelihood", {}, (ctx, " " + choice), idx, metadata=(name, j, 1)))
        spans.append((start, len(reqs)))
    t0 = time.perf_counter()
    out = lm.loglikelihood(reqs, disable_tqdm=True)
    secs = time.perf_counter() - t0
    acc = acc_norm = 0
    for item, (a, b) in zip(items, spans, strict=True):
        ll = [out[i][0] for i in range(a, b)]
        norm = [v / len(" " + c) for v, c in zip(ll, item["choices"], strict=True)]
        acc += max(range(len(ll)), key=ll.__getitem__) == item["label"]
        acc_norm += max(range(len(norm)), key=norm.__getitem__) == item["label"]
    n = len(items)
    chance = sum(1 / len(i["choices"]) for i in items) / n
    tokens = sum(len(lm.tok_encode(context_of(task, i))) for i in items) / n
    return {"task": name, "n": n, "acc": acc / n, "acc_norm": acc_norm / n, "chance": chance,
            "p": pvalue(acc, n, chance), "p50": pvalue(round(50 * acc / n), 50, chance),
            "p50_norm": pvalue(round(50 * acc_norm / n), 50, chance), "tokens": tokens, "s_per_item": secs / n}


def fmt_p(p: float) -> str:
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def table(rows: list[dict]) -> str:
    head = ("| task | n | acc | acc_norm | chance | p (acc > chance) | expected p at 50 (acc) | "
            "expected p at 50 (acc_norm) | context tokens | s/item |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in sorted(rows, key=lambda r: r["p50"]):
        lines.append(f"| {r['task']} | {r['n']} | {100 * r['acc']:.1f} | {100 * r['acc_norm']:.1f} | "
                     f"{100 * r['chance']:.1f} | {fmt_p(r['p'])} | {fmt_p(r['p50'])} | {fmt_p(r['p50_norm'])} | "
                     f"{r['tokens']:.0f} | {r['s_per_item']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--items", type=int, default=150)
    ap.add_argument("--max-length", type=int, default=256, help="context window in tokens (left-truncated)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--budget-s", type=float, default=900, help="stop starting new tasks after this many seconds")
    ap.add_argument("--per-family", type=int, default=3,
                    help="at most this many subtasks of one BIG-bench task folder (the shortest)")
    ap.add_argument("--tasks", default="", help="comma-separated task paths under benchmark_tasks/ (no filters)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--md", default="", help="Markdown output (default $FORGETCHECK_HOME/task_screen.md)")
    args = ap.parse_args()

    import torch

    from forgetcheck import benchdata, models
    from forgetcheck.config import forgetcheck_home
    from forgetcheck.fast_lm import FastLM

    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    given = [t.strip() for t in args.tasks.split(",") if t.strip()]
    only = set(given) or None
    cands = candidates(benchdata.bigbench_sdist(), only)
    if only is None:
        order = sorted(cands, key=lambda k: statistics.median(len(context_of(cands[k], i)) for i in cands[k]["items"]))
    else:  # the given order
        order = [t for t in given if t in cands]
    if only is None:  # --tasks: every given task
        seen: dict[str, int] = {}
        kept = []
        for name in order:
            family = name.split("/")[0]
            seen[family] = seen.get(family, 0) + 1
            if seen[family] <= args.per_family:
                kept.append(name)
        order = kept
    print(f"{len(cands)} candidate tasks, {len(order)} screened (at most {args.per_family} per family) (read in {time.perf_counter() - t_start:.1f} s)", flush=True)
    ref = models.resolve(args.model, flag="--model")
    model, tok = models.load(ref)
    lm = FastLM(model, tokenizer=tok, batch_size=args.batch_size, max_length=args.max_length)
    rows, skipped = [], []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for name in order:
            if time.perf_counter() - t0 > args.budget_s:
                skipped.append(name)
                continue
            r = score_task(lm, name, cands[name], args.items)
            rows.append(r)
            print(f"{name:60s} n={r['n']:4d} acc={100 * r['acc']:5.1f} acc_norm={100 * r['acc_norm']:5.1f} "
                  f"chance={100 * r['chance']:5.1f} p={fmt_p(r['p']):>7s} p@50={fmt_p(r['p50']):>7s} "
                  f"p@50(norm)={fmt_p(r['p50_norm']):>7s} tok={r['tokens']:4.0f} {r['s_per_item']:.3f} s/item",
                  flush=True)
    md = table(rows)
    total = time.perf_counter() - t_start
    note = (f"\n\nModel {args.model}, zero-shot, up to {args.items} seeded items per task, context window "
            f"{args.max_length} tokens, torch threads {torch.get_num_threads()}; {len(rows)} tasks scored in "
            f"{total:.0f} s" + (f"; not reached within the budget: {', '.join(skipped)}" if skipped else "") + ".\n")
    print("\n" + md + note)
    path = Path(args.md) if args.md else forgetcheck_home() / "task_screen.md"
    path.write_text("# BIG-bench task screen (bench/task_screen.py)\n\n" + md + note, encoding="utf-8")
    print(f"written: {path}")
    if not rows:
        sys.exit(3)


if __name__ == "__main__":
    main()
