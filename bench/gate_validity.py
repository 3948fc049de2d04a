"""Validity of the release gate (forgetcheck.verdict.gate.decide): how often it says PASS, FAIL and INCONCLUSIVE.

    python bench/gate_validity.py [--reps 500] [--real] [--real-limit 50] [--sigmas 0.02,0.05,0.1]

(a) Simulation. Eleven retention tasks (the quick preset's gated count when written; 13 now), per-item 0/1 scores of a base and an arm on
    the same items: every item flips right->wrong or wrong->right with a churn of 8% each way (fine-tuning
    reshuffles answers even when the score does not move), and a true drop adds to the right->wrong rate.
    Scenarios: no change; a drop of 0.5x, 1x and 2x the per-task margin (2 points) on one task; the same on
    every task. At 50, 200 and 1,000 items per task, `--reps` runs each; the gate runs with the default policy
    on accuracy (drift rules off: they have no items here). The rates are printed as a table. Under no change
    FAIL must stay at or below alpha; at a drop exactly at the margin PASS must stay at or below alpha.
(b) Real models (`--real`): smollm2-135m against copies of itself with Gaussian noise (sigma times each
    weight matrix's own standard deviation) added to the weights of blocks 10-19 of 30, and an unchanged
    copy, each scored on the retention suite at `--real-limit` items per task with the drift measured against
    the base; then compared and gated with the default policy (soft accuracy) and with --metric acc. The table
    shows the drift-text perplexity (base -> copy), the KL, each rule's outcome count and the verdicts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from forgetcheck.config import GateConfig  # noqa: E402
from forgetcheck.verdict.gate import decide  # noqa: E402
from forgetcheck.verdict.rollup import mean_block  # noqa: E402
from forgetcheck.verdict.stats import paired_binary  # noqa: E402

N_TASKS = 11
CHURN = 0.08
SIZES = (50, 200, 1000, 5000)
MULTIPLES = (0.5, 1.0, 2.0)


def simulate_compare(n: int, drops: list[float], rng: np.random.Generator, alpha: float) -> dict:
    """A compare dict (the keys decide reads) for one simulated run: `drops[t]` points lost on task t."""
    tasks = {}
    for t, drop in enumerate(drops):
        p_rw, p_wr = CHURN + drop / 200.0, CHURN - drop / 200.0
        u = rng.random(n)
        rw, wr = u < p_rw, (u >= p_rw) & (u < p_rw + p_wr)
        rest = ~(rw | wr)
        right = rest & (rng.random(n) < 0.5)
        base, arm = rw | right, wr | right
        est = paired_binary(base, arm)
        tasks[f"task{t:02d}"] = {"suite": "retention", "unit": "points", "metric": "acc",
                                 "informative": {"value": True},
                                 "base": {"score": 100 * base.mean()},
                                 "arms": {"arm": {"score": 100 * arm.mean(), "delta": est.point,
                                                  "acc": est.to_dict(alpha), "soft": None}}}
    mean = mean_block(tasks, sorted(tasks), "arm", "acc", alpha)
    return {"schema_version": 2, "kind": "compare", "alpha": alpha, "arms": ["arm"], "tasks": tasks,
            "suites": {"retention": {"means": {"acc": {"informative": {"arm": mean}, "all": {"arm": mean}}}}},
            "drift": {}}


def simulation(reps: int, seed: int = 0) -> list[dict]:
    pol = GateConfig(metric="acc", max_ppl_rise=None, max_kl=None)
    rng = np.random.default_rng(seed)
    scenarios = [("no change", [0.0] * N_TASKS)]
    for k in MULTIPLES:
        scenarios.append((f"{k:g}x margin on one task", [k * pol.max_drop] + [0.0] * (N_TASKS - 1)))
    for k in MULTIPLES:
        scenarios.append((f"{k:g}x margin on all tasks", [k * pol.max_drop] * N_TASKS))
    rows = []
    for name, drops in scenarios:
        for n in SIZES:
            counts = {"pass": 0, "fail": 0, "inconclusive": 0}
            for _ in range(reps):
                counts[decide(simulate_compare(n, drops, rng, pol.alpha), pol)["verdict"]] += 1
            rows.append({"scenario": name, "n": n, **{k: v / reps for k, v in counts.items()}})
    return rows


def print_simulation(rows: list[dict], reps: int) -> None:
    print(f"(a) simulation: {N_TASKS} retention tasks, churn {CHURN:.0%} each way, margins 2 points per task and "
          f"1 on the mean, alpha 0.05, metric acc, {reps} runs per row")
    print()
    print("| scenario | items per task | PASS | FAIL | INCONCLUSIVE |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['scenario']} | {r['n']:,} | {r['pass']:.1%} | {r['fail']:.1%} | {r['inconclusive']:.1%} |")
    print()


# ---- (b) real models -------------------------------------------------------------------------------------

def noised_copy(src: str, dst: Path, sigma: float, blocks: range, seed: int = 0) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            parts = name.split(".")
            if "layers" in parts and int(parts[parts.index("layers") + 1]) in blocks and p.ndim == 2 and sigma > 0:
                p.add_(torch.randn(p.shape, generator=g) * sigma * p.std())
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)


def real_models(limit: int, sigmas: list[float], workdir: Path) -> list[dict]:
    from forgetcheck.config import EvalConfig
    from forgetcheck.eval.runner import evaluate
    from forgetcheck.models import registry
    from forgetcheck.verdict.compare import compare_evals
    from forgetcheck.verdict.policy import resolve_policy

    base_ref = registry.resolve("smollm2-135m")
    cfg = EvalConfig(suites=("retention",), limit=limit)
    base_json = workdir / "eval" / "base.json"
    t0 = time.perf_counter()
    evaluate(base_ref, cfg, base_json, label="base", screen=True)  # as `run` and `check` score a base
    print(f"  base evaluated in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    rows = []
    for sigma in [0.0, *sigmas]:
        label = f"noise{sigma:g}".replace(".", "p")
        folder = workdir / "models" / label
        noised_copy(base_ref.path, folder, sigma, range(10, 20))
        t0 = time.perf_counter()
        evaluate(registry.resolve(str(folder)), cfg, workdir / "eval" / f"{label}.json", reference=base_json,
                 label=label)
        print(f"  {label} evaluated in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        c = compare_evals(base_json, {label: workdir / "eval" / f"{label}.json"}, n_boot=1000)
        d = c["drift"][label]
        row = {"copy": "unchanged copy" if sigma == 0 else f"noise sigma {sigma:g} (blocks 10-19)",
               "ppl_base": (d.get("text_perplexity") or {}).get("base"),
               "ppl_arm": (d.get("text_perplexity") or {}).get("arm"),
               "kl": (d.get("kl") or {}).get("mean"),
               "ret_delta_acc": (c["suites"]["retention"]["arms"].get(label) or {}).get("delta"),
               "ret_delta_soft": ((c["suites"]["retention"]["means"]["soft"]["informative"].get(label)) or {})
               .get("delta")}
        for metric in ("soft", "acc"):
            g = decide(c, resolve_policy(None, None, {"metric": metric}))
            st = [r["status"] for r in g["rules"]]
            row[f"verdict_{metric}"] = g["verdict"]
            row[f"rules_{metric}"] = f"{st.count('pass')}/{st.count('fail')}/{st.count('inconclusive')}"
            row[f"drift_{metric}"] = ",".join(f"{r['rule']}:{r['status']}" for r in g["rules"]
                                              if r["rule"] in ("ppl_rise", "kl"))
        rows.append(row)
    return rows


def print_real(rows: list[dict], limit: int) -> None:
    print(f"(b) real models: smollm2-135m vs copies, retention suite at {limit} items per task, default policy")
    print()
    print("| copy | drift-text ppl base -> copy | KL nats/token | retention mean delta acc / soft | "
          "verdict (soft) | rules pass/fail/inc (soft) | drift rules | verdict (acc) |")
    print("|---|---|---:|---|---|---|---|---|")
    for r in rows:
        f = (lambda v, d=2: "n/a" if v is None else f"{v:.{d}f}")  # noqa: E731
        print(f"| {r['copy']} | {f(r['ppl_base'])} -> {f(r['ppl_arm'])} | {f(r['kl'], 3)} | "
              f"{f(r['ret_delta_acc'], 1)} / {f(r['ret_delta_soft'], 1)} | {r['verdict_soft'].upper()} | "
              f"{r['rules_soft']} | {r['drift_soft']} | {r['verdict_acc'].upper()} |")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=500)
    ap.add_argument("--real", action="store_true", help="also run (b) with smollm2-135m (CPU minutes)")
    ap.add_argument("--real-only", action="store_true")
    ap.add_argument("--real-limit", type=int, default=50)
    ap.add_argument("--sigmas", default="0.02,0.05,0.1")
    ap.add_argument("--workdir", type=Path, default=None)
    a = ap.parse_args()
    if not a.real_only:
        t0 = time.perf_counter()
        rows = simulation(a.reps)
        print_simulation(rows, a.reps)
        print(f"(simulation took {time.perf_counter() - t0:.0f} s)\n")
    if a.real or a.real_only:
        work = a.workdir or Path(tempfile.mkdtemp(prefix="gate_validity_"))
        t0 = time.perf_counter()
        rows = real_models(a.real_limit, [float(s) for s in a.sigmas.split(",")], work)
        print_real(rows, a.real_limit)
        print(f"(real models took {time.perf_counter() - t0:.0f} s; files in {work})")


if __name__ == "__main__":
    main()
