"""What train/signals.py costs against training: seconds per curve point and per optimizer step, and the points and
sizes the training loop picks (curve.curve_steps, plan_sizes) to stay within 25% of an arm's training.

    python bench/curve_overhead.py [--model smollm2-135m] [--items 32] [--tokens 1024] [--preset quick]
                                   [--device cpu|cuda] [--repeats 2]

A point is measured at the given sizes on the base model (general text: eval/drift.py's built-in paragraphs
repeated to length; domain text: med-like sentences; items: MMLU-shaped synthetic 4-choice prompts of about 150
tokens, bench/fast_lm_throughput.py's); a training step is train/loop.py's own (loop.accumulate, then the
optimizer optimizer.build_optimizer gives), fp32, on micro_batch x seq_len tokens of the preset, for a CPT-like
batch (every position labelled) and an SFT-like one (a third labelled, the prompt-masked share of the med rows),
repeated `--repeats` times after one warm-up step. Prints the medians, the cost of a training token in forward
tokens of a point for each (curve.TRAIN_TOKEN_COST is set from these; docs/curves.md, "Cost of a point", records
them), and the points and sizes for the preset's budget (config.py's PRESET_VALUES).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--items", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()

    import torch
    from fast_lm_throughput import make_items

    from forgetcheck.config import PRESET_VALUES
    from forgetcheck.eval.drift import BUILTIN_DRIFT_TEXT
    from forgetcheck.models import registry
    from forgetcheck.train import curve, signals

    tr = PRESET_VALUES[a.preset]["train"]
    model, tok = registry.load(registry.resolve(a.model), device=a.device)
    general = list(BUILTIN_DRIFT_TEXT) * 8
    domain = ["The patient presented with fever and a dry cough for three days; chest examination was normal, "
              "and rest, fluids and paracetamol were advised with a follow-up visit after one week."] * 40
    pool = [(prompt, [" " + o for o in opts], i % 4) for i, (prompt, opts) in enumerate(make_items(a.items))]
    items = signals.choose_items({"mmlu_like": pool}, a.items)
    ref = signals.build_reference(model, tok, general, domain, items, n_tokens=a.tokens)
    point_s = []
    for _ in range(a.repeats):
        point_s.append(signals.measure_point(model, tok, ref, tokens=0, step=0).measure_s)

    from forgetcheck.config import TrainConfig
    from forgetcheck.train import loop, optimizer, packing

    opt = optimizer.build_optimizer(model.parameters(), TrainConfig(lr=1e-5))
    x = torch.randint(0, model.config.vocab_size, (tr["micro_batch"], tr["seq_len"]), device=a.device)
    sft_labels = x.clone()
    sft_labels[:, : 2 * tr["seq_len"] // 3] = packing.IGNORE  # a third of each row labelled
    model.train()
    step_s = {"cpt": [], "sft": []}
    for i in range(a.repeats + 1):  # the two kinds alternate, so that a slow spell of the machine hits both
        for arm, labels in (("cpt", x), ("sft", sft_labels)):
            micro = [(x, labels, torch.ones_like(x))] * tr.get("grad_accum", 1)
            t0 = time.perf_counter()
            loop.accumulate(model, micro, loop.label_count(labels) * len(micro))
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i:
                step_s[arm].append(time.perf_counter() - t0)
    step_tokens = tr["micro_batch"] * tr["seq_len"] * tr.get("grad_accum", 1)
    steps = tr["budget_tokens"] // step_tokens
    p = statistics.median(point_s)
    item_tokens = curve.item_tokens(tok, items)
    point_tokens = 2 * a.tokens + sum(item_tokens)
    print(f"{a.model} on {a.device}, preset {a.preset}: one point ({a.tokens} tokens x 2 texts, {a.items} items, "
          f"{point_tokens} forward tokens) {p:.2f} s")
    for arm, times in step_s.items():
        s = statistics.median(times)
        ratio = (s / step_tokens) / (p / point_tokens)
        print(f"  {arm}-like step {s:.2f} s ({steps} steps: train {steps * s:.0f} s); a training token costs "
              f"{ratio:.2f} forward tokens of a point (curve.TRAIN_TOKEN_COST "
              f"{curve.TRAIN_TOKEN_COST})")
    s = statistics.median(step_s["sft"])
    steps_in = curve.curve_steps(steps, tr.get("eval_every", 0))
    # the points and the reference (about one point more), as train/loop.py's CurveTracker plans them
    sizes = curve.plan_sizes(len(steps_in) + 1, steps * step_tokens, item_tokens)
    cost = p * (2 * sizes["n_tokens"] + sum(item_tokens[:sizes["n_items"]])) / point_tokens
    print(f"in training (--eval-every {tr.get('eval_every', 0)}): {len(steps_in)} points at steps {steps_in}, "
          f"{sizes['n_items']} items, {sizes['n_tokens']} tokens: predicted {sizes['predicted_fraction']:.0%} of "
          f"training by the token count, {(len(steps_in) + 1) * cost / (steps * s):.0%} of the SFT-like training by the "
          f"times measured here")


if __name__ == "__main__":
    main()
