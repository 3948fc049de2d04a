"""Validity of the release gate at its defaults: how often `forgetcheck gate` says PASS, FAIL and INCONCLUSIVE.

    python bench/gate_validity.py [--reps 400] [--sizes 50,200] [--power-reps 400] [--jobs 1]
    python bench/gate_validity.py --real-only [--real-limit 50] [--sigmas 0.05,0.1,0.16] [--draws 3]

(a) Simulation (docs/verdicts.md, "Validity benchmark"). Every simulated run goes through the code paths of
    `forgetcheck gate`: synthetic per-item records (schema.ItemRecord: each choice's log-likelihood, the 0/1
    `acc`) and eval documents with the drift text's per-block values -> compare.compare_evals (given the
    records in memory, `compare.Evaluation`, instead of reading them from files; everything after the reading
    is the same code) -> gate.decide with `GateConfig()`, the defaults: soft accuracy, margins 2 points per task,
    1 on the retention mean, 10 % bits-per-byte rise and 0.1 nats/token KL, alpha 0.05, Holm across the gated
    tasks.
    Each run has 12 gated retention tasks of 4 choices and the drift text. A task's base soft score (the
    probability on the right choice) is Beta(2, 1) over (0, 1) (mean 2/3; the wrong choices share the rest at
    Dirichlet(1, 1, 1) proportions, so the base is right on 86 % of items); an arm changes 40 % of items not at
    all (saturated or untouched) and every other item by a symmetric amount (normal, sd 12 points, cut at the
    item's distance to 0 or 1 so the change stays symmetric; 8 points over all items, which puts a task's
    normal-approximation MDE at 50 items at 2.8 points, near the median, 2.7, of the real demo's task rules):
    the true mean change is exactly 0. A drop is added on top with its true mean exactly at the margin:
    `diffuse` (every changed item loses the same share of its score) or `concentrated` (a few items lose most
    of their score: 3 % forgotten outright, ~67 points each). The base also scores as many screen items per task,
    never compared (`forgetcheck run`'s default `--screen-items`): the informative test runs on them. The drift
    text is 64 documents of 2 blocks of 32 positions (`blocks.document` names each block's document: the drift
    intervals take documents as clusters): per-block NLL with a document effect, the arm's NLL the base's times (1 + rise) times a document and a
    block factor of mean 1, and per-block KL the limit times a document and a block factor of mean 1 (Gamma).
    The scenarios, the rule each puts at its margin and the target are in `scenarios()`. The table gives, per
    scenario and items per task, the verdict's rates, the watched rule's PASS and FAIL, whether the target is
    met, and the simulation error (two standard errors of a 5 % rate); then the power check (`power_check`).
(b) Real models (`--real`, `--real-only`): smollm2-135m against copies of itself with Gaussian noise (sigma times
    each weight matrix's own standard deviation) added to the weights of blocks 10-19 of 30 (`--draws K`
    different noise seeds per sigma), and an unchanged copy, each scored on the retention suite at
    `--real-limit` items per task with the drift measured against the base; then compared and gated with the
    default policy (soft accuracy) and with --metric acc. The table shows the drift-text perplexity (base ->
    copy), the KL, each rule's outcome count and the verdicts.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import beta as beta_dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from forgetcheck.config import GateConfig  # noqa: E402
from forgetcheck.schema import ITEM_DEFAULTS, SCHEMA_VERSION, eval_doc  # noqa: E402
from forgetcheck.verdict.compare import Evaluation, compare_evals  # noqa: E402
from forgetcheck.verdict.gate import decide  # noqa: E402
from forgetcheck.verdict.stats import round_up, stable_seed  # noqa: E402

# ---- (a) simulation -------------------------------------------------------------------------------------------

N_TASKS = 12
CHOICES = 4
BASE_BETA = (2.0, 1.0)
"""Base soft score of an item of a gated task: mean 2/3, spread over (0, 1)."""
WEAK_BETA = (1.0, 2.3)
"""The weakly informative task's (scenario "screen"): mean 0.30, the base right on about 34 % of items against
25 % chance, so the screen (compare.uninformative_tasks' binomial test) keeps it in about a third of the runs at
50 items and most runs at 200."""
S_RANGE = (0.001, 0.999)
"""Base soft scores are kept inside this range (every log-likelihood finite)."""
ZERO_SHARE = 0.4
NOISE_SD = 12.0
"""Points: the symmetric change of an item that moves, before it is cut to stay inside [0, 100] (the standard
deviation of the change over all items is then 8 points)."""
FORGOTTEN = 1e-6
"""Soft score an item forgotten outright keeps (a finite log-likelihood)."""

DRIFT_DOCS, BLOCKS_PER_DOC, BLOCK = 64, 2, 32
NLL_BASE, NLL_DOC_SD, NLL_BLOCK_SD = math.log(21.6), 0.35, 0.25
"""Per-block mean NLL of the base (nats): perplexity about 21.6 (smollm2-135m reads the drift text at 25.6; the rise
is relative, so the level hardly matters), a document effect and a block effect."""
RISE_DOC_SD, RISE_BLOCK_SD = 0.06, 0.05
"""Spread of the arm's relative NLL change between documents and between blocks of a document."""
KL_DOC_CV, KL_BLOCK_CV = 0.30, 0.25
"""Coefficient of variation of the per-block KL between documents and within one (0.39 in all, about what the
noised real copies show, docs/verdicts.md (b)); the document share of the variance is 0.57."""
KL_SKEWED_SD = 0.8
"""Log-sd of the per-document KL factor in the long-tailed drift scenario (a fine-tune that moved a few topics far
and the rest little): skewness 3.7 over all documents, about 2 in a sample of 64."""
KL_CLEAN = 0.04
"""Mean KL of an arm whose drift is not at issue (the quick preset's fine-tunes: 0.043 and 0.055)."""


@dataclass(frozen=True)
class Change:
    """A task's true change in one arm: `drop` points off its mean soft score, diffuse or concentrated (each
    carrier keeps 1 - `lost` of its score)."""

    drop: float = 0.0
    kind: str = "diffuse"
    lost: float = 1.0


@dataclass(frozen=True)
class Drift:
    rise: float = 0.0  # percent, of bits per byte
    kl: float = KL_CLEAN
    kl_doc_sd: float | None = None  # per-document KL factor lognormal with this log-sd (else Gamma, KL_DOC_CV)


@dataclass(frozen=True)
class Arm:
    changes: tuple[Change, ...] = (Change(),) * N_TASKS
    drift: Drift = Drift()


@dataclass(frozen=True)
class Scenario:
    """One row group of the table: the arms, which rule sits at its margin (`watch`: arm, rule, task) and the
    target (`target`: "fail" = the verdict FAILs at most alpha of the time, "pass" = PASSes at most alpha)."""

    name: str
    arms: dict[str, Arm] = field(default_factory=lambda: {"arm": Arm()})
    weak: bool = False  # the last task's base barely above chance (scenario "screen")
    watch: tuple[str, str, str | None] | None = None
    target: str = "fail"


def _task(i: int) -> str:
    return f"task{i:02d}"


def _one(change: Change, where: int = 0) -> tuple[Change, ...]:
    return tuple(change if i == where else Change() for i in range(N_TASKS))



def scenarios(pol: GateConfig) -> list[Scenario]:
    m, mm = pol.max_drop, pol.max_mean_drop
    clean = Arm()
    one_at = Arm(_one(Change(m, "concentrated", 1.0)))
    return [
        Scenario("no change"),
        Scenario(f"one task {m:g} points down, diffuse", {"arm": Arm(_one(Change(m)))}, watch=("arm", "task_drop", _task(0)),
                 target="pass"),
        Scenario(f"one task {m:g} points down, 3 % of items forgotten (~67 points each)", {"arm": one_at},
                 watch=("arm", "task_drop", _task(0)), target="pass"),
        Scenario(f"every task {mm:g} point down, diffuse", {"arm": Arm((Change(mm),) * N_TASKS)},
                 watch=("arm", "retention_mean", None), target="pass"),
        Scenario(f"every task {mm:g} point down, 3 % of items lose half (~33 points each)",
                 {"arm": Arm((Change(mm, "concentrated", 0.5),) * N_TASKS)}, watch=("arm", "retention_mean", None),
                 target="pass"),
        Scenario(f"every task {mm:g} point down, 1.5 % of items forgotten (~67 points each)",
                 {"arm": Arm((Change(mm, "concentrated", 1.0),) * N_TASKS)}, watch=("arm", "retention_mean", None),
                 target="pass"),
        Scenario(f"KL exactly {pol.max_kl:g} nats/token (documents differ), rest unchanged",
                 {"arm": Arm(drift=Drift(kl=pol.max_kl))}, watch=("arm", "kl", None), target="pass"),
        Scenario(f"KL exactly {pol.max_kl:g} nats/token, long-tailed over documents "
                 f"(lognormal, log-sd {KL_SKEWED_SD:g})",
                 {"arm": Arm(drift=Drift(kl=pol.max_kl, kl_doc_sd=KL_SKEWED_SD))}, watch=("arm", "kl", None),
                 target="pass"),
        Scenario(f"bits per byte up exactly {pol.max_ppl_rise:g} % (documents differ), rest unchanged",
                 {"arm": Arm(drift=Drift(rise=pol.max_ppl_rise))}, watch=("arm", "ppl_rise", None), target="pass"),
        Scenario("screen: weak task (base 34 %, chance 25 %), nothing changed", weak=True,
                 watch=("arm", "task_drop", _task(N_TASKS - 1))),
        Scenario(f"screen: weak task {m:g} points down, diffuse, rest unchanged", {"arm": Arm(_one(Change(m), N_TASKS - 1))},
                 weak=True, watch=("arm", "task_drop", _task(N_TASKS - 1)), target="pass"),
        Scenario("two arms, both unchanged", {"a": clean, "b": clean}),
        Scenario(f"two arms, b: one task {m:g} points down, 3 % forgotten", {"a": clean, "b": one_at},
                 watch=("b", "task_drop", _task(0)), target="pass"),
    ]


@functools.cache
def clipped_mean(a: float, b: float) -> float:
    """E[clip(s, *S_RANGE)] for s ~ Beta(a, b): the population mean base score the drops are sized on."""
    lo, hi = S_RANGE
    d = beta_dist(a, b)
    inner = d.expect(lambda x: x, lb=lo, ub=hi)
    return float(lo * d.cdf(lo) + inner + hi * d.sf(hi))


def arm_scores(s: np.ndarray, change: Change, mean_s: float, rng: np.random.Generator) -> np.ndarray:
    """The arm's soft score of each item given the base's `s`: 40 % unchanged, the rest moved symmetrically
    (true mean change 0), then the drop, sized so that the population mean drop is exactly `change.drop`."""
    n = len(s)
    moved = rng.random(n) >= ZERO_SHARE
    cap = 0.99 * np.minimum(s, 1.0 - s)
    d = np.minimum(np.abs(rng.normal(0.0, NOISE_SD / 100.0, n)), cap) * rng.choice((-1.0, 1.0), n)
    a = s + np.where(moved, d, 0.0)
    if change.drop <= 0:
        return a
    if change.kind == "diffuse":  # every moved item keeps 1 - f of its score; E[a] = E[s] for moved items
        f = change.drop / 100.0 / ((1.0 - ZERO_SHARE) * mean_s)
        return np.where(moved, a * (1.0 - f), a)
    share = change.drop / 100.0 / (change.lost * (mean_s - FORGOTTEN))
    if share > 1:
        raise ValueError(f"{change}: the drop does not fit in [0, 100]")
    carriers = rng.random(n) < share
    return np.where(carriers, s * (1.0 - change.lost) + FORGOTTEN * change.lost, a)


_NONES = {k: v for k, v in ITEM_DEFAULTS.items() if v is None}


def item_records(task: str, s: np.ndarray, rest: np.ndarray, target: np.ndarray, first: int = 0) -> list[dict]:
    """Per-item records as the eval writes them: every choice's log-likelihood (the right one's probability `s`,
    the wrong ones sharing 1 - s in the proportions `rest`) and `acc` (the right choice scored highest); doc ids
    from `first` (a base's screen items follow its compared ones)."""
    n, k = rest.shape[0], rest.shape[1] + 1
    probs = np.empty((n, k))
    other = np.ones((n, k), dtype=bool)
    other[np.arange(n), target] = False
    probs[~other] = s
    probs[other] = (rest * (1.0 - s)[:, None]).ravel()
    ll = np.log(np.maximum(probs, 1e-300))
    acc = (s > (rest * (1.0 - s)[:, None]).max(axis=1)).astype(float)
    return [{**_NONES, "doc_id": first + i, "doc_hash": f"{task}-{first + i:05d}", "target": int(target[i]),
             "loglikelihoods": ll[i].tolist(), "metrics": {"acc": float(acc[i])}, "chosen": {}}
            for i in range(n)]


def _draw_base(rng: np.random.Generator, n: int, a: float, b: float):
    """`n` base items of a task: soft scores, the wrong choices' shares and the right choice's index."""
    return np.clip(rng.beta(a, b, n), *S_RANGE), rng.dirichlet(np.ones(CHOICES - 1), n), rng.integers(0, CHOICES, n)


def _acc_entry(rows: list[dict]) -> dict:
    return {"acc": {"value": float(np.mean([r["metrics"]["acc"] for r in rows])), "stderr": None,
                    "higher_is_better": True}}


def _gamma(rng: np.random.Generator, cv: float, size: int) -> np.ndarray:
    return rng.gamma(1.0 / cv ** 2, cv ** 2, size)


def drift_docs(rng: np.random.Generator, arms: dict[str, Arm]) -> dict[str, dict]:
    """The eval files' `drift` of the base and each arm: per-block NLL (and KL for the arms) of 64 documents of 2
    blocks, each block naming its document (`blocks.document`) and its positions."""
    doc = np.repeat(np.arange(DRIFT_DOCS), BLOCKS_PER_DOC)
    nb = len(doc)
    base = NLL_BASE + rng.normal(0.0, NLL_DOC_SD, DRIFT_DOCS)[doc] + rng.normal(0.0, NLL_BLOCK_SD, nb)
    common = {"size": BLOCK, "sequence": doc.tolist(), "document": [f"d{j:03d}" for j in doc],
              "positions": [BLOCK] * nb}
    text = {"source": "synthetic drift text", "sequences": DRIFT_DOCS, "tokens_scored": nb * BLOCK}
    out = {"base": {"text": text, "perplexity": float(np.exp(base.mean())), "mean_nll": float(base.mean()),
                    "blocks": {**common, "nll": base.tolist()}}}
    for label, arm in arms.items():
        factor = 1.0 + rng.normal(0.0, RISE_DOC_SD, DRIFT_DOCS)[doc] + rng.normal(0.0, RISE_BLOCK_SD, nb)
        nll = base * (1.0 + arm.drift.rise / 100.0) * factor
        sd = arm.drift.kl_doc_sd
        per_doc = (rng.lognormal(-sd * sd / 2.0, sd, DRIFT_DOCS) if sd is not None
                   else _gamma(rng, KL_DOC_CV, DRIFT_DOCS))  # mean 1 either way
        kl = arm.drift.kl * per_doc[doc] * _gamma(rng, KL_BLOCK_CV, nb)
        out[label] = {"text": text, "perplexity": float(np.exp(nll.mean())), "mean_nll": float(nll.mean()),
                      "kl": {"mean": float(kl.mean()), "unit": "nats per token"},
                      "blocks": {**common, "nll": nll.tolist(), "kl": kl.tolist()}}
    return out


def simulate_evals(n: int, sc: Scenario, rng: np.random.Generator) -> tuple[Evaluation, dict[str, Evaluation]]:
    """One simulated run: the base's and each arm's evaluation (eval document and per-item records)."""
    labels = ["base", *sc.arms]
    items: dict[str, dict[str, list[dict]]] = {label: {} for label in labels}
    screen: dict[str, list[dict]] = {}
    n_tasks = len(next(iter(sc.arms.values())).changes)
    for t in range(n_tasks):
        name = _task(t)
        a, b = WEAK_BETA if sc.weak and t == n_tasks - 1 else BASE_BETA
        s, rest, target = _draw_base(rng, n, a, b)
        items["base"][name] = item_records(name, s, rest, target)
        for label, arm in sc.arms.items():
            items[label][name] = item_records(name, arm_scores(s, arm.changes[t], clipped_mean(a, b), rng), rest,
                                              target)
        # the base's screen items: as many more items of the task (EvalConfig's default), never compared
        screen[name] = item_records(name, *_draw_base(rng, n, a, b), first=n)
    drift = drift_docs(rng, sc.arms)
    evals = {}
    for label in labels:
        tasks = {name: {"suite": "retention", "kind": "multiple_choice", "primary_metric": "acc", "n": n,
                        "chance": 1.0 / CHOICES, "samples": f"samples/{label}/{name}.jsonl",
                        "metrics": _acc_entry(rows),
                        "screen": {"samples": f"samples/base/screen/{name}.jsonl", "n": n,
                                   "metrics": _acc_entry(screen[name])} if label == "base" else None}
                 for name, rows in items[label].items()}
        doc = eval_doc({"schema_version": SCHEMA_VERSION, "kind": "eval", "model": {"name": label}, "limit": n,
                        "screen_items": n if label == "base" else None, "backend": "synthetic", "tasks": tasks,
                        "drift": drift[label]})
        evals[label] = Evaluation(Path(f"synthetic/eval/{label}.json"), doc, items[label],
                                  screen if label == "base" else None)
    return evals.pop("base"), evals


def simulate_gate(n: int, sc: Scenario, rng: np.random.Generator, pol: GateConfig | None = None) -> dict:
    """gate.json of one simulated run of scenario `sc` at `n` items per task (the gate's default policy)."""
    base, arms = simulate_evals(n, sc, rng)
    return decide(compare_evals(base, arms), pol or GateConfig())


def watched(gate: dict, watch: tuple[str, str, str | None]) -> str:
    """The outcome of the watched rule: pass, fail, inconclusive, or "not gated" (a task the screen left out)."""
    arm, rule, task = watch
    for r in gate["rules"]:
        if r["arm"] == arm and r["rule"] == rule and (task is None or r["task"] == task):
            return r["status"]
    return "not gated"


def simulate(sc: Scenario, n: int, reps: int, seed: int = 0) -> dict:
    """`reps` runs of scenario `sc` at `n` items per task (seeded by the scenario, n and `seed`, so a row does
    not depend on which rows ran before it): the verdict's rates and the watched rule's."""
    rng = np.random.default_rng([seed, stable_seed(sc.name), n])
    verdicts = {"pass": 0, "fail": 0, "inconclusive": 0}
    rule = {"pass": 0, "fail": 0, "inconclusive": 0, "not gated": 0}
    for _ in range(reps):
        gate = simulate_gate(n, sc, rng)
        verdicts[gate["verdict"]] += 1
        if sc.watch:
            rule[watched(gate, sc.watch)] += 1
    return {"scenario": sc.name, "n": n, "reps": reps, "target": sc.target, "watch": sc.watch,
            **{k: v / reps for k, v in verdicts.items()}, "rule": {k: v / reps for k, v in rule.items()}}


def sim_error(reps: int, alpha: float = 0.05) -> float:
    """Two standard errors of a rate of `alpha` estimated from `reps` runs: the slack a target gets."""
    return 2.0 * math.sqrt(alpha * (1.0 - alpha) / reps)


def met(row: dict, alpha: float = 0.05) -> bool:
    """Is the row's target met within the simulation error: FAIL (no change) or PASS (at the margin), of the
    verdict and of the watched rule, at most alpha + `sim_error`?"""
    limit = alpha + sim_error(row["reps"], alpha)
    key = row["target"]
    return row[key] <= limit and (row["watch"] is None or row["rule"][key] <= limit)


def _job(args):
    if args[0] == "power":
        return power_check(*args[1:])
    sc, n, reps, seed = args
    return simulate(sc, n, reps, seed)


def simulation(reps: int, sizes: tuple[int, ...] = (50, 200), seed: int = 0, jobs: int = 1, power_reps: int = 0,
               only: tuple[str, ...] = ()) -> tuple[list[dict], dict | None]:
    """Every scenario (those whose name holds one of `only`, if given) at every size, and the power check
    (`power_reps` > 0), on `jobs` processes. Returns (rows, the power check or None)."""
    work: list[tuple] = [(sc, n, reps, seed) for sc in scenarios(GateConfig()) for n in sizes
                         if not only or any(w in sc.name for w in only)]
    if power_reps > 0:
        work.insert(0, ("power", power_reps, seed))  # the longest job first
    if jobs <= 1:
        out = [_job(w) for w in work]
    else:
        from multiprocessing import Pool

        with Pool(jobs) as pool:
            out = pool.map(_job, work, chunksize=1)
    return [r for r in out if "scenario" in r], next((r for r in out if "scenario" not in r), None)


def write_evals(folder: Path, base: Evaluation, arms: dict[str, Evaluation]) -> tuple[Path, dict[str, Path]]:
    """A simulated run's evaluations as files under `folder` (eval/<label>.json and the per-item records under
    eval/samples/<label>/), as `forgetcheck eval` lays them out: what compare_evals reads from disk."""
    from forgetcheck.rundir import atomic_write_json, atomic_write_jsonl

    paths = {}
    for label, ev in {"base": base, **arms}.items():
        path = folder / "eval" / f"{label}.json"
        for name, entry in ev.doc["tasks"].items():
            atomic_write_jsonl(path.parent / entry["samples"], ev.items[name])
            if entry["screen"]:
                atomic_write_jsonl(path.parent / entry["screen"]["samples"], ev.screen[name])
        atomic_write_json(path, ev.doc)
        paths[label] = path
    return paths.pop("base"), paths


def power_check(reps: int, seed: int = 0, probe_runs: int = 20) -> dict:
    """The power sentence against the simulation: the items per task that gate.json (`power.items_needed`) says
    make every item-based rule PASS with 80 % probability if nothing changed, read from one 50-item run of the
    "no change" scenario (and its spread over `probe_runs` such runs); then `reps` runs at that size."""
    sc = Scenario("no change")
    rng = np.random.default_rng([seed, stable_seed("power"), 50])
    needed = [simulate_gate(50, sc, rng)["power"]["items_needed"] for _ in range(probe_runs)]
    n = int(needed[0])
    rng = np.random.default_rng([seed, stable_seed("power"), n])
    verdict_pass = items_pass = 0
    for _ in range(reps):
        gate = simulate_gate(n, sc, rng)
        verdict_pass += gate["verdict"] == "pass"
        items_pass += all(r["status"] == "pass" for r in gate["rules"] if r["rule"] in ("task_drop", "retention_mean"))
    return {"n": n, "needed": needed, "reps": reps, "pass": verdict_pass / reps, "items_pass": items_pass / reps}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def print_simulation(rows: list[dict], power: dict | None, reps: int) -> None:
    pol = GateConfig()
    print(f"(a) simulation: {N_TASKS} gated retention tasks and the drift text, the default gate (soft accuracy, "
          f"margins {pol.max_drop:g} / {pol.max_mean_drop:g} points, {pol.max_ppl_rise:g} %, {pol.max_kl:g} "
          f"nats/token, alpha {pol.alpha:g}, Holm), {reps} runs per row")
    print()
    print("| scenario | items per task | PASS | FAIL | INCONCLUSIVE | rule at its margin: PASS / FAIL | target | sim error |")
    print("|---|---:|---:|---:|---:|---|---|---:|")
    for r in rows:
        rule = "-"
        if r["watch"]:
            arm, name, task = r["watch"]
            what = f"{name} {task}" if task else name
            if len(r["rule"]) and r["rule"]["not gated"]:
                what += f" (gated in {_pct(1 - r['rule']['not gated'])})"
            rule = f"{what}: {_pct(r['rule']['pass'])} / {_pct(r['rule']['fail'])}"
        goal = f"{'FAIL' if r['target'] == 'fail' else 'PASS'} <= 5%: {'met' if met(r) else 'NOT MET'}"
        print(f"| {r['scenario']} | {r['n']:,} | {_pct(r['pass'])} | {_pct(r['fail'])} | {_pct(r['inconclusive'])} | "
              f"{rule} | {goal} | {100 * sim_error(r['reps']):.1f} pts |")
    print()
    if power:
        nd = sorted(power["needed"])
        print(f"power check: a 50-item run with nothing changed says {power['n']:,} items per task (the power "
              f"sentence: about {round_up(power['n']):,}) make every "
              f"item-based rule PASS with 80% probability (over {len(nd)} such runs: median {nd[len(nd) // 2]:,}, "
              f"range {nd[0]:,}-{nd[-1]:,}); at {power['n']:,} items, {power['reps']} runs: every item-based rule "
              f"PASSes in {_pct(power['items_pass'])}, the verdict PASSes in {_pct(power['pass'])} (sim error "
              f"{100 * 2 * math.sqrt(0.8 * 0.2 / power['reps']):.1f} points)")
        print()


# ---- (a') sequential: scoring until decided -------------------------------------------------------------------

SEQ_TASKS = 4
"""Gated tasks of a sequential run (fewer than the fixed table's 12: each run gates once per look)."""
SEQ_FIRST, SEQ_CAP = 50, 400


def seq_scenarios(pol: GateConfig) -> list[tuple[str, float]]:
    """(name, drop of task00 in points, diffuse; the other tasks unchanged): the issue's four."""
    m = pol.max_drop
    return [("no change", 0.0), (f"task00 {m / 2:g} points down (half the margin)", m / 2),
            (f"task00 {m:g} points down (the margin)", m), (f"task00 {2 * m:g} points down (twice the margin)", 2 * m)]


def sequential_run(drop: float, sizes: tuple[int, ...], rng: np.random.Generator, pol: GateConfig,
                   futility: bool = True) -> dict:
    """One run scored until decided: every task gets its first look, then more items only while
    `sequential.open_tasks` says so (the code `forgetcheck check --until-decided` runs), each look's new items
    drawn fresh for the base and the arm (rows marked with their `look`). Returns the last gate.json, the items
    each task was scored on and the looks taken."""
    from forgetcheck.verdict import sequential

    changes = (Change(drop),) + (Change(),) * (SEQ_TASKS - 1)
    mean_s = clipped_mean(*BASE_BETA)
    names = [_task(t) for t in range(SEQ_TASKS)]
    rows: dict[str, dict[str, list[dict]]] = {"base": {n: [] for n in names}, "arm": {n: [] for n in names}}
    screen = {n: item_records(n, *_draw_base(rng, SEQ_FIRST, *BASE_BETA), first=10**6) for n in names}
    drift = drift_docs(rng, {"arm": Arm(changes)})
    taken = {n: 0 for n in names}
    grow = set(names)
    while True:
        for t, n in enumerate(names):
            if n not in grow:
                continue
            k = taken[n]
            new = sizes[k] - (sizes[k - 1] if k else 0)
            s, rest, target = _draw_base(rng, new, *BASE_BETA)
            first = sizes[k - 1] if k else 0
            rows["base"][n] += [{**r, "look": k + 1} for r in item_records(n, s, rest, target, first)]
            rows["arm"][n] += [{**r, "look": k + 1} for r in
                               item_records(n, arm_scores(s, changes[t], mean_s, rng), rest, target, first)]
            taken[n] = k + 1
        base, arms = look_evals(rows, screen, drift, sizes)
        gate = decide(compare_evals(base, arms), pol)
        states = sequential.open_tasks(gate, {"arm": dict(taken)}, len(sizes))
        if not futility:
            states = [st if st.open or not st.why.startswith("futile") else
                      sequential.TaskState(st.arm, st.task, True, "open") for st in states]
        grow = {st.task for st in states if st.open}
        if not grow:
            return {"gate": gate, "items": {n: sizes[taken[n] - 1] for n in names}, "looks": dict(taken)}


def look_evals(rows: dict[str, dict[str, list[dict]]], screen: dict[str, list[dict]], drift: dict,
               sizes: tuple[int, ...]) -> tuple[Evaluation, dict[str, Evaluation]]:
    """The evaluations of a sequential run as `forgetcheck eval --until-decided` writes them: each task's rows (each
    marked with its `look`) and its `looks` entry (every item its own unit, so the cap's units are its items)."""
    evals = {}
    for label, by_task in rows.items():
        tasks = {n: {"suite": "retention", "kind": "multiple_choice", "primary_metric": "acc", "n": len(r),
                     "chance": 1.0 / CHOICES, "samples": f"samples/{label}/{n}.jsonl", "metrics": _acc_entry(r),
                     "looks": {"sizes": list(sizes), "items": [], "cap_items": sizes[-1], "cap_units": sizes[-1]},
                     "screen": {"samples": f"samples/base/screen/{n}.jsonl", "n": len(screen[n]),
                                "metrics": _acc_entry(screen[n])} if label == "base" else None}
                 for n, r in by_task.items()}
        doc = eval_doc({"schema_version": SCHEMA_VERSION, "kind": "eval", "model": {"name": label},
                        "limit": sizes[0], "screen_items": sizes[0] if label == "base" else None,
                        "backend": "synthetic", "tasks": tasks, "drift": drift[label]})
        evals[label] = Evaluation(Path(f"synthetic/eval/{label}.json"), doc, by_task,
                                  screen if label == "base" else None)
    return evals.pop("base"), evals


def item_rules(gate: dict) -> str:
    """The item-based rules together (task_drop and retention_mean): fail if one FAILs, pass if all PASS."""
    st = [r["status"] for r in gate["rules"] if r["rule"] in ("task_drop", "retention_mean")]
    return "fail" if "fail" in st else "pass" if st and all(x == "pass" for x in st) else "inconclusive"


def seq_simulate(name: str, drop: float, reps: int, seed: int = 0, futility: bool = True,
                 futility_z: float | None = None, growth: float | None = None) -> dict:
    from forgetcheck.verdict import sequential

    global SEQ_GROWTH
    SEQ_GROWTH = growth
    if futility_z is not None:
        sequential.FUTILITY_Z = futility_z
    pol = GateConfig()
    sizes = sequential_look_sizes()
    rng = np.random.default_rng([seed, stable_seed("seq", name)])
    out = {"pass": 0, "fail": 0, "inconclusive": 0}
    watch = {"pass": 0, "fail": 0, "inconclusive": 0}
    mean_items, watch_items = [], []
    for _ in range(reps):
        r = sequential_run(drop, sizes, rng, pol, futility)
        out[item_rules(r["gate"])] += 1
        watch[watched(r["gate"], ("arm", "task_drop", _task(0)))] += 1
        mean_items.append(float(np.mean(list(r["items"].values()))))
        watch_items.append(r["items"][_task(0)])
    return {"scenario": name, "drop": drop, "reps": reps, **{k: v / reps for k, v in out.items()},
            "rule": {k: v / reps for k, v in watch.items()}, "items_mean": float(np.mean(mean_items)),
            "items_p90": float(np.percentile(mean_items, 90)), "watch_mean": float(np.mean(watch_items)),
            "watch_p90": float(np.percentile(watch_items, 90))}


def sequential_look_sizes() -> tuple[int, ...]:
    from forgetcheck.verdict.sequential import GROWTH, look_sizes

    return look_sizes(SEQ_FIRST, SEQ_CAP, SEQ_GROWTH or GROWTH)


SEQ_GROWTH: float | None = None  # --growth: the looks' growth (default verdict/sequential.GROWTH)


def fixed_power(n: int, reps: int, seed: int = 0) -> float:
    """How often the fixed design at `n` items per task PASSes every item-based rule of an unchanged arm (the
    same SEQ_TASKS tasks): the power a sequential design is matched against."""
    sc = Scenario("no change", {"arm": Arm((Change(),) * SEQ_TASKS)})
    rng = np.random.default_rng([seed, stable_seed("seq-fixed"), n])
    return sum(item_rules(simulate_gate(n, sc, rng)) == "pass" for _ in range(reps)) / reps


def _seq_job(args):
    if args[0] == "fixed":
        return ("fixed", args[1], fixed_power(*args[1:]))
    return seq_simulate(*args)


def sequential_table(reps: int, seed: int = 0, jobs: int = 1, fixed_sizes: tuple[int, ...] = (200, 250, 300, 350, 400, 450),
                     futility: bool = True, futility_z: float | None = None, growth: float | None = None) -> dict:
    """The sequential scenarios and the fixed design's power at `fixed_sizes` (the no-change PASS rate), on
    `jobs` processes."""
    pol = GateConfig()
    global SEQ_GROWTH
    SEQ_GROWTH = growth
    work: list[tuple] = [(name, drop, reps, seed, futility, futility_z, growth) for name, drop in seq_scenarios(pol)]
    work += [("fixed", n, reps, seed) for n in fixed_sizes]
    if jobs <= 1:
        out = [_seq_job(w) for w in work]
    else:
        from multiprocessing import Pool

        with Pool(jobs) as pool:
            out = pool.map(_seq_job, work, chunksize=1)
    rows = [r for r in out if isinstance(r, dict)]
    fixed = {n: p for tag, n, p in (r for r in out if isinstance(r, tuple))}
    from forgetcheck.verdict.sequential import FUTILITY_Z

    return {"rows": rows, "fixed": fixed, "sizes": sequential_look_sizes(), "reps": reps, "futility": futility,
            "futility_z": FUTILITY_Z if futility_z is None else futility_z}


def matched_n(fixed: dict[int, float], power: float) -> float | None:
    """The fixed items per task with `power` (linear between the simulated sizes); None outside them."""
    ns = sorted(fixed)
    for a, b in zip(ns, ns[1:]):
        pa, pb = fixed[a], fixed[b]
        if min(pa, pb) <= power <= max(pa, pb) and pa != pb:
            return a + (power - pa) * (b - a) / (pb - pa)
    if ns and power <= fixed[ns[0]]:
        return float(ns[0])
    return None


def print_sequential(t: dict) -> None:
    rows, fixed = t["rows"], t["fixed"]
    power = next(r["pass"] for r in rows if r["drop"] == 0)
    n_fix = matched_n(fixed, power)
    print(f"(a') sequential: {SEQ_TASKS} gated tasks, task00 carries the drop (diffuse), looks at "
          f"{', '.join(map(str, t['sizes']))} items per task, futility stop "
          f"{'at z ' + format(t['futility_z'], 'g') if t['futility'] else 'off'}, "
          f"{t['reps']} runs per row")
    print("fixed design, no change, every item-based rule PASSes: "
          + ", ".join(f"{n}: {_pct(p)}" for n, p in sorted(fixed.items())))
    print(f"sequential no-change PASS {_pct(power)} -> fixed design with the same power: "
          + (f"{n_fix:.0f} items per task" if n_fix else "outside the simulated sizes"))
    print(f"{'scenario':<40} {'PASS':>6} {'FAIL':>6} {'task00 P/F':>12} {'items mean':>10} {'p90':>5} "
          f"{'task00':>7} {'vs fixed':>8}")
    ratios = []
    for r in rows:
        ratio = r["items_mean"] / n_fix if n_fix else float("nan")
        ratios.append(ratio)
        print(f"{r['scenario']:<40} {_pct(r['pass']):>6} {_pct(r['fail']):>6} "
              f"{_pct(r['rule']['pass']) + '/' + _pct(r['rule']['fail']):>12} {r['items_mean']:>10.0f} "
              f"{r['items_p90']:>5.0f} {r['watch_mean']:>7.0f} {100 * ratio:>7.0f}%")
    print(f"mean over the scenarios: {100 * float(np.mean(ratios)):.0f}% of the fixed design's items; "
          f"largest {100 * float(np.max(ratios)):.0f}%")


# ---- (b) real models -------------------------------------------------------------------------------------

def add_noise(model, sigma: float, blocks: range, seed: int = 0) -> None:
    """Add Gaussian noise in place: sigma times each weight matrix's own standard deviation, in the transformer
    blocks `blocks` (bench/drift_topk.py noises its copies the same way)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            parts = name.split(".")
            if "layers" in parts and int(parts[parts.index("layers") + 1]) in blocks and p.ndim == 2 and sigma > 0:
                p.add_(torch.randn(p.shape, generator=g) * sigma * p.std())


def noised_copy(src: str, dst: Path, sigma: float, blocks: range, seed: int = 0) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32)
    add_noise(model, sigma, blocks, seed)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)


def real_models(limit: int, sigmas: list[float], workdir: Path, draws: int = 1) -> list[dict]:
    """Each copy scored, compared with the base and gated: the unchanged copy once, each sigma `draws` times with
    noise seeds 0 .. draws - 1."""
    from forgetcheck.config import EvalConfig
    from forgetcheck.eval.runner import evaluate
    from forgetcheck.models import registry
    from forgetcheck.verdict.policy import resolve_policy

    base_ref = registry.resolve("smollm2-135m")
    cfg = EvalConfig(suites=("retention",), limit=limit)
    base_json = workdir / "eval" / "base.json"
    t0 = time.perf_counter()
    evaluate(base_ref, cfg, base_json, label="base", screen=True)  # as `run` and `check` score a base
    print(f"  base evaluated in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    rows = []
    for sigma, seed in [(0.0, 0)] + [(s, k) for s in sigmas for k in range(draws)]:
        label = (f"noise{sigma:g}".replace(".", "p") + (f"_seed{seed}" if draws > 1 else "")) if sigma else "unchanged"
        folder = workdir / "models" / label
        noised_copy(base_ref.path, folder, sigma, range(10, 20), seed=seed)
        t0 = time.perf_counter()
        evaluate(registry.resolve(str(folder)), cfg, workdir / "eval" / f"{label}.json", reference=base_json,
                 label=label)
        print(f"  {label} evaluated in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        c = compare_evals(base_json, {label: workdir / "eval" / f"{label}.json"}, n_boot=1000)
        d = c["drift"][label]
        row = {"copy": "unchanged copy" if sigma == 0 else
               f"noise sigma {sigma:g} (blocks 10-19)" + (f", draw {seed + 1} (seed {seed})" if draws > 1 else ""),
               "sigma": sigma, "seed": seed,
               "ppl_base": (d.get("text_perplexity") or {}).get("base"),
               "ppl_arm": (d.get("text_perplexity") or {}).get("arm"),
               "kl": (d.get("kl") or {}).get("mean"),
               "kl_ci": (d.get("kl_mean") or {}).get("ci"), "kl_skew": (d.get("kl_mean") or {}).get("skew"),
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
    print("| copy | drift-text ppl base -> copy | KL nats/token [95% CI] (skewness over documents) | "
          "retention mean delta acc / soft | verdict (soft) | rules pass/fail/inc (soft) | drift rules | verdict (acc) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = (lambda v, d=2: "n/a" if v is None else f"{v:.{d}f}")  # noqa: E731
        ci = f" [{f(r['kl_ci'][0], 3)}, {f(r['kl_ci'][1], 3)}]" if r["kl_ci"] else ""
        skew = f" ({f(r['kl_skew'], 1)})" if r["kl_skew"] is not None else ""
        print(f"| {r['copy']} | {f(r['ppl_base'])} -> {f(r['ppl_arm'])} | {f(r['kl'], 3)}{ci}{skew} | "
              f"{f(r['ret_delta_acc'], 1)} / {f(r['ret_delta_soft'], 1)} | {r['verdict_soft'].upper()} | "
              f"{r['rules_soft']} | {r['drift_soft']} | {r['verdict_acc'].upper()} |")
    print()
    ranges = _draw_ranges(rows)
    if ranges:
        print("| sigma | draws | KL nats/token (range) | retention mean soft delta (range) | verdicts (soft) |")
        print("|---:|---:|---|---|---|")
        for sigma, r in ranges.items():
            print(f"| {sigma:g} | {r['draws']} | {r['kl']} | {r['soft']} | {r['verdicts']} |")
        print()


def _draw_ranges(rows: list[dict]) -> dict[float, dict]:
    """Per sigma with several draws: the range of the KL and the retention mean's soft change, and the verdicts."""
    out = {}
    for sigma in sorted({r["sigma"] for r in rows if r["sigma"]}):
        group = [r for r in rows if r["sigma"] == sigma]
        if len(group) < 2:
            continue

        def span(key, d, group=group):
            vals = [r[key] for r in group if r[key] is not None]
            return f"{min(vals):.{d}f} .. {max(vals):.{d}f}" if vals else "n/a"
        verdicts = [r["verdict_soft"].upper() for r in group]
        out[sigma] = {"draws": len(group), "kl": span("kl", 3), "soft": span("ret_delta_soft", 1),
                      "verdicts": ", ".join(f"{v} x{verdicts.count(v)}" for v in sorted(set(verdicts)))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=400, help="simulated runs per row (400: a 5%% rate +- 2.2 points)")
    ap.add_argument("--sizes", default="50,200", help="items per task of the simulated rows")
    ap.add_argument("--power-reps", type=int, default=400, help="runs of the power check (0: skip it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1, help="processes for the simulation rows")
    ap.add_argument("--only", default="", help="comma-separated words: only the scenarios whose name holds one")
    ap.add_argument("--real", action="store_true", help="also run (b) with smollm2-135m (CPU minutes)")
    ap.add_argument("--real-only", action="store_true")
    ap.add_argument("--real-limit", type=int, default=50)
    ap.add_argument("--sigmas", default="0.05,0.1,0.16")
    ap.add_argument("--draws", type=int, default=1, help="noise draws per sigma, each with its own seed")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--sequential", action="store_true", help="only the sequential table (a')")
    ap.add_argument("--no-futility", action="store_true", help="sequential: never stop a rule as futile")
    ap.add_argument("--growth", type=float, default=None, help="sequential: items at a look over the look before "
                    "(verdict/sequential.GROWTH)")
    ap.add_argument("--futility-z", type=float, default=None, help="sequential: the futility stop's optimism "
                    "(verdict/sequential.FUTILITY_Z)")
    a = ap.parse_args()
    if a.sequential:
        t0 = time.perf_counter()
        print_sequential(sequential_table(a.reps, a.seed, a.jobs, futility=not a.no_futility,
                                          futility_z=a.futility_z, growth=a.growth))
        print(f"(sequential table took {time.perf_counter() - t0:.0f} s)")
        return
    if not a.real_only:
        t0 = time.perf_counter()
        rows, power = simulation(a.reps, tuple(int(x) for x in a.sizes.split(",")), a.seed, a.jobs, a.power_reps,
                                 tuple(w for w in a.only.split(",") if w))
        print_simulation(rows, power, a.reps)
        print(f"(simulation took {time.perf_counter() - t0:.0f} s)\n")
    if a.real or a.real_only:
        work = a.workdir or Path(tempfile.mkdtemp(prefix="gate_validity_"))
        t0 = time.perf_counter()
        rows = real_models(a.real_limit, [float(s) for s in a.sigmas.split(",")], work, a.draws)
        print_real(rows, a.real_limit)
        print(f"(real models took {time.perf_counter() - t0:.0f} s; files in {work})")


if __name__ == "__main__":
    main()
