"""Micro-benchmark: stock lm-eval HFLM vs forgetcheck's FastLM on synthetic 4-choice MMLU-like requests.

    python bench/fast_lm_throughput.py [--model smollm2-135m] [--items 32] [--repeats 3] [--batch-size 16]
                                       [--threads N] [--device cpu|cuda] [--dtype float32|bfloat16]

Each item is an MMLU-shaped prompt of about 150 tokens (subject header, question, four lettered options,
"Answer:") with four continuations, scored in two variants: the letters " A".." D" (one token each: stock
HFLM already reuses one pass for these through its one-token logits cache) and the options' short phrases
(several tokens each: stock HFLM runs the context once per choice). The two backends run side by side,
alternating, `--repeats` times; the median requests/s of each and their ratio are printed, with the largest
per-request loglikelihood difference and whether every is_greedy agreed. A third variant, `rolling`, scores
`--items` perplexity documents of 30 to 400 words (the spread of the med and SQuAD perplexity tasks) with
loglikelihood_rolling: stock HFLM batches `--batch-size` windows in document order, each batch padded to its
longest; FastLM sorts and batches all windows at once. Throughput is also given from
process CPU time, which a busy shared machine disturbs less than wall-clock time (`--threads 1` steadier still).
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import time

WORDS = ("cell membrane protein energy market price law court river mountain theory evidence ancient empire "
         "voltage current planet orbit poem author treaty nation enzyme acid market supply demand equation "
         "variable function memory language culture climate carbon ocean species gene neuron signal").split()
SUBJECTS = ["high school biology", "macroeconomics", "world history", "electrical engineering", "philosophy"]


def make_items(n: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    """(prompt, four option phrases) per item; prompts of about 150 GPT-2/SmolLM2 tokens."""
    rng = random.Random(seed)

    def phrase(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    items = []
    for _ in range(n):
        subject = rng.choice(SUBJECTS)
        options = [phrase(rng.randint(2, 5)) for _ in range(4)]
        question = ". ".join(phrase(rng.randint(8, 14)).capitalize() for _ in range(rng.randint(7, 9))) + "?"
        prompt = (f"The following are multiple choice questions (with answers) about {subject}.\n\n{question}\n"
                  + "".join(f"{letter}. {opt}\n" for letter, opt in zip("ABCD", options, strict=True))
                  + "Answer:")
        items.append((prompt, options))
    return items


def make_requests(items, variant: str):
    from lm_eval.api.instance import Instance

    if variant == "rolling":  # one document per item, of a spread of lengths, in a fixed shuffled order
        rng = random.Random(len(items))
        return [Instance("loglikelihood_rolling", {}, (" ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 400))),),
                         0, metadata=("fixture", doc_id, 1)) for doc_id in range(len(items))]
    reqs = []
    for doc_id, (prompt, options) in enumerate(items):
        choices = [" A", " B", " C", " D"] if variant == "letters" else [" " + o for o in options]
        for idx, choice in enumerate(choices):
            reqs.append(Instance("loglikelihood", {}, (prompt, choice), idx, metadata=("fixture", doc_id, 1)))
    return reqs


def timed(lm, reqs) -> tuple[float, float, list]:
    """(wall seconds, process CPU seconds, results)."""
    t0, c0 = time.perf_counter(), time.process_time()
    if reqs[0].request_type == "loglikelihood_rolling":
        out = [(ll, True) for ll in lm.loglikelihood_rolling(reqs, disable_tqdm=True)]
    else:
        out = lm.loglikelihood(reqs, disable_tqdm=True)
    return time.perf_counter() - t0, time.process_time() - c0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--items", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--variants", default="letters,phrases,rolling")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()

    import torch
    from lm_eval.models.huggingface import HFLM

    from forgetcheck.eval.fast_lm import FastLM
    from forgetcheck.models import registry

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = registry.load(registry.resolve(args.model), device=args.device, dtype=args.dtype)
    hf = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size)
    fast = FastLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size)
    items = make_items(args.items)
    n_tokens = sum(len(tok(p)["input_ids"]) for p, _ in items) / len(items)
    print(f"model {args.model} on {args.device} ({args.dtype}, torch threads {torch.get_num_threads()}), "
          f"{args.items} items x 4 choices, mean prompt {n_tokens:.0f} tokens, batch size {args.batch_size}, "
          f"median of {args.repeats}")
    print("req/s from wall-clock time, and from process CPU time (steadier on a shared machine)")
    print(f"{'variant':<9} {'HFLM req/s':>11} {'FastLM req/s':>13} {'ratio':>6} {'CPU ratio':>9}  {'max |dLL|':>9}  "
          "greedy agree")
    for variant in args.variants.split(","):
        reqs = make_requests(items, variant)
        timed(fast, reqs[:8])  # warm-up (allocator, kernels)
        runs = {"hf": [], "fast": []}
        for _ in range(args.repeats):  # side by side, alternating
            for name, lm in (("hf", hf), ("fast", fast)):
                wall, cpu, out = timed(lm, reqs)
                runs[name].append((wall, cpu, out))
        a, b = runs["hf"][-1][2], runs["fast"][-1][2]
        diff = max(abs(x[0] - y[0]) for x, y in zip(a, b, strict=True))
        agree = all(x[1] == y[1] for x, y in zip(a, b, strict=True))

        rate = {(n, k): len(reqs) / statistics.median(r[k] for r in runs[n]) for n in runs for k in (0, 1)}

        walls = "; ".join(f"{n}: {', '.join(f'{r[0]:.1f}' for r in runs[n])}" for n in runs)
        print(f"{variant:<9} {rate['hf', 0]:>11.2f} {rate['fast', 0]:>13.2f} {rate['fast', 0] / rate['hf', 0]:>5.2f}x "
              f"{rate['fast', 1] / rate['hf', 1]:>8.2f}x  {diff:>9.2e}  {agree}   (wall s {walls})", flush=True)


if __name__ == "__main__":
    main()
