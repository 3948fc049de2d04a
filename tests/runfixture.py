"""Builder of synthetic run directories (the contract of docs/design.md, "The run folder") for the compare, report and gate tests.

Items are drawn once for the base (seeded); each arm starts as an exact copy of the base's records and is then
changed as asked: `flips={(arm, task): (right_to_wrong, wrong_to_right)}` for multiple-choice tasks,
`ll_shift={(arm, task): nats per item}` for perplexity tasks. So an arm with no changes is an unchanged copy.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np

from forgetcheck.rundir import RunDir, atomic_write_json, atomic_write_jsonl
from forgetcheck.schema import SCHEMA_VERSION

# name -> (suite, kind, primary metric, choices, base accuracy)
DEFAULT_TASKS = {
    "ret_mmlu": ("retention", "multiple_choice", "acc", 4, 0.55),
    "ret_wino": ("retention", "multiple_choice", "acc", 2, 0.70),
    "ret_truthful": ("retention", "multiple_choice", "acc_norm", 4, 0.40),
    "ret_ppl": ("retention", "perplexity", "word_perplexity", 0, 0.0),
    "dom_mmlu_med": ("domain", "multiple_choice", "acc", 4, 0.35),
    "dom_terms": ("domain", "multiple_choice", "acc", 4, 0.30),
    "dom_ppl": ("domain", "perplexity", "word_perplexity", 0, 0.0),
}


def _mc_rows(task: str, n: int, choices: int, acc: float, rng: np.random.Generator, texts: dict) -> list[dict]:
    rows = []
    correct = rng.random(n) < acc
    for i in range(n):
        target = int(rng.integers(0, choices))
        lls = list(-rng.uniform(2, 9, size=choices))
        rows.append({"doc_id": i, "doc_hash": f"{task}-{i:05d}-h", "target": target,
                     "loglikelihoods": lls, "correct": bool(correct[i]), "metrics": {}})
        _set_correct(rows[-1], bool(correct[i]))
        if i in texts:
            rows[-1]["doc"] = {"question": texts[i], "choices": [f"option {c}" for c in range(choices)]}
    return rows


def _set_correct(row: dict, ok: bool) -> None:
    lls = row["loglikelihoods"]
    t = row["target"]
    best_other = max(v for j, v in enumerate(lls) if j != t)
    lls[t] = best_other + 0.5 if ok else best_other - 0.5
    row["correct"] = ok
    row["metrics"] = {"acc": float(ok), "acc_norm": float(ok)}


def _ppl_rows(task: str, n: int, rng: np.random.Generator) -> list[dict]:
    rows = []
    for i in range(n):
        words = int(rng.integers(40, 120))
        nbytes = words * 6
        rows.append({"doc_id": i, "doc_hash": f"{task}-{i:05d}-h", "loglikelihood": float(-3.2 * words * rng.uniform(0.9, 1.1)),
                     "words": words, "bytes": nbytes, "tokens": int(words * 1.3)})
    return rows


def _mc_entry(suite, metric, rows, choices, rel):
    acc = float(np.mean([r["metrics"][metric] for r in rows]))
    se = math.sqrt(acc * (1 - acc) / max(len(rows) - 1, 1))
    metrics = {m: {"value": float(np.mean([r["metrics"][m] for r in rows])), "stderr": se, "higher_is_better": True}
               for m in ("acc", "acc_norm")}
    return {"suite": suite, "kind": "multiple_choice", "primary_metric": metric, "metrics": metrics,
            "n": len(rows), "chance": 1.0 / choices, "samples": rel}


def _ppl_entry(suite, rows, rel, metric="word_perplexity"):
    ll = sum(r["loglikelihood"] for r in rows)
    words = sum(r["words"] for r in rows)
    nbytes = sum(r["bytes"] for r in rows)
    metrics = {"word_perplexity": {"value": math.exp(-ll / words), "stderr": None, "higher_is_better": False},
               "bits_per_byte": {"value": -ll / nbytes / math.log(2), "stderr": None, "higher_is_better": False}}
    return {"suite": suite, "kind": "perplexity", "primary_metric": metric, "metrics": metrics,
            "n": len(rows), "chance": None, "samples": rel}


def make_run(root: Path, *, arms=("sft", "cpt"), tasks: dict | None = None, n: int = 200, seed: int = 0,
             flips: dict | None = None, ll_shift: dict | None = None, texts: dict | None = None,
             random_weights: bool = False, with_train: bool = True, kl: dict | None = None,
             forward_tokens: dict | None = None) -> RunDir:
    """Write a complete synthetic run directory under `root` and return it.

    texts: {task: {doc_id: text}} put into the base's and arms' sample lines as `doc.question`.
    kl: {arm: mean KL} written as the arm eval's drift block.
    forward_tokens: {arm: tokens fed forward} (default: the same for every arm).
    """
    tasks = tasks or DEFAULT_TASKS
    flips, ll_shift, texts, kl = flips or {}, ll_shift or {}, texts or {}, kl or {}
    run = RunDir(root)
    rng = np.random.default_rng(seed)
    base_rows = {}
    for name, (_suite, kind, _metric, choices, acc) in tasks.items():
        base_rows[name] = (_mc_rows(name, n, choices, acc, rng, texts.get(name, {})) if kind == "multiple_choice"
                           else _ppl_rows(name, n, rng))

    seq_len, budget = 64, 4096
    atomic_write_json(run.config, {"schema_version": SCHEMA_VERSION, "base": "tiny-test", "data": "med",
                                   "arms": list(arms), "preset": "quick", "device": "cpu",
                                   "train": {"budget_tokens": budget, "seq_len": seq_len, "micro_batch": 4,
                                             "grad_accum": 1, "lr": 5e-5, "seed": 0},
                                   "eval": {"limit": n, "suites": ["retention", "domain"]},
                                   "gate": {"max_drop": 2.0, "max_mean_drop": 1.0, "alpha": 0.05,
                                            "min_domain_gain": None}})
    atomic_write_json(run.manifest, {"schema_version": SCHEMA_VERSION, "created": "2026-01-01T00:00:00+00:00",
                                     "versions": {"forgetcheck": "0.1.0", "torch": "2.13.0",
                                                  "transformers": "5.24.0", "lm_eval": "0.4.13"},
                                     "git": "0123abc", "device": "cpu", "seed": 0,
                                     "timings": {"eval_base": 12.5, "train_sft": 40.0, "train_cpt": 41.0}})

    def write_eval(label: str, rows_by_task: dict, drift: dict | None):
        entries = {}
        for name, rows in rows_by_task.items():
            suite, kind, metric, choices, _ = tasks[name]
            rel = f"samples/{label}/{name}.jsonl"
            atomic_write_jsonl(run.samples_dir(label) / f"{name}.jsonl", rows)
            entries[name] = (_mc_entry(suite, metric, rows, choices, rel) if kind == "multiple_choice"
                             else _ppl_entry(suite, rows, rel, metric))
        doc = {"schema_version": SCHEMA_VERSION, "kind": "eval",
               "model": {"name": label if label != "base" else "tiny-test", "path": f"ckpt/{label}",
                         "content_hash": f"hash-{label}", "random_weights": random_weights},
               "limit": n, "backend": "fast", "versions": {"lm_eval": "0.4.13"}, "tasks": entries}
        if drift:
            doc["drift"] = drift
        atomic_write_json(run.eval_json(label), doc)

    # Drift on general text: per-block mean NLL (64 blocks of 32 positions, two per document: 32 documents) for
    # every model, and per-block KL for each arm; an arm without a `kl` entry is an unchanged copy (same NLL, KL 0).
    brng = np.random.default_rng(seed + 1)
    base_nll = np.round(math.log(31.0) + brng.normal(0, 0.3, 64), 6)
    kl_shape = brng.uniform(0.5, 1.5, 64)
    blocks = {"size": 32, "sequence": [i // 2 for i in range(64)], "document": [f"article {i // 2}" for i in range(64)],
              "positions": [32] * 64, "nll": base_nll.tolist()}
    write_eval("base", base_rows, {"text": {"source": "general_text", "documents": 32, "tokens_scored": 2048},
                                   "perplexity": 31.0, "mean_nll": math.log(31.0), "blocks": blocks})
    for arm in arms:
        rows_by_task = copy.deepcopy(base_rows)
        for name, rows in rows_by_task.items():
            r2w, w2r = flips.get((arm, name), (0, 0))
            if r2w or w2r:
                right = [r for r in rows if r["correct"]]
                wrong = [r for r in rows if not r["correct"]]
                assert r2w <= len(right) and w2r <= len(wrong), "not enough items to flip"
                for r in right[:r2w]:
                    _set_correct(r, False)
                for r in wrong[:w2r]:
                    _set_correct(r, True)
            shift = ll_shift.get((arm, name))
            if shift:
                for r in rows:
                    r["loglikelihood"] += shift
        k = kl.get(arm, 0.0)  # the shape forgetcheck eval writes: drift-text perplexity, KL from the base
        arm_nll = base_nll + math.log1p(k) * kl_shape if k else base_nll
        drift = {"text": {"source": "general_text", "documents": 32, "sequences": 32, "seq_len": 65,
                          "tokens_scored": 2048},
                 "perplexity": 31.0 * (1 + k), "mean_nll": math.log(31.0 * (1 + k)),
                 "kl": {"mean": k, "median": k / 2, "p95": k * 3, "max": k * 9,
                        "unit": "nats per token", "method": "KL(reference || model) over the top-k tokens"},
                 "blocks": {**blocks, "nll": np.round(arm_nll, 6).tolist(),
                            "kl": np.round(k * kl_shape / kl_shape.mean(), 7).tolist()}}
        write_eval(arm, rows_by_task, drift)
        if with_train:
            fw = (forward_tokens or {}).get(arm, budget)
            steps = 16
            atomic_write_json(run.train_json(arm), {
                "schema_version": SCHEMA_VERSION, "kind": "train", "arm": arm, "base": "tiny-test",
                "tokens_seen": {"forward": fw, "padding": 0 if arm == "cpt" else 310, "label": fw - 200},
                "budget_tokens": budget, "optimizer_steps": steps,
                "loss_curve": [[s, 3.5 * math.exp(-s / (10 if arm == "sft" else 14)) + 1.6] for s in range(1, steps + 1)],
                "lr_curve": [[s, 5e-5 * min(1, s / 2)] for s in range(1, steps + 1)],
                "wall_s": 40.0, "tokens_per_s": fw / 40.0,
                "memory": {"planned": {"weights": 5.4e8, "gradients": 5.4e8, "optimizer_state": 1.08e9,
                                       "activations": 3.0e8, "total": 2.46e9},
                           "measured_peak_bytes": 2.61e9, "method": "VmHWM (/proc/self/status)"},
                "config": {"seq_len": seq_len}, "checkpoint": f"ckpt/{arm}"})
    return run


def lower_target(run: RunDir, arm: str, task: str, nats: float) -> None:
    """Lower the log-likelihood of the right choice by `nats` in every item of `arm`'s records of `task`: a soft
    accuracy drop that varies from item to item (it depends on the other choices) and, below 0.5 nats, flips no
    item (make_run puts the right choice 0.5 nats from the best other)."""
    path = run.samples_dir(arm) / f"{task}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows:
        r["loglikelihoods"][r["target"]] -= nats
    atomic_write_jsonl(path, rows)


def keep_drift_blocks(run: RunDir, count: int) -> None:
    """Keep only the blocks of the first `count` documents of the drift text in every eval file of the run (a
    drift text that short)."""
    for path in sorted((run.root / "eval").glob("*.json")):
        doc = json.loads(path.read_text())
        blocks = doc["drift"]["blocks"]
        kept = list(dict.fromkeys(blocks["document"]))[:count]
        n = sum(d in kept for d in blocks["document"])  # a document's blocks are consecutive
        for key in ("sequence", "document", "positions", "nll", "kl"):
            if key in blocks:
                blocks[key] = blocks[key][:n]
        atomic_write_json(path, doc)


def strip_document_ids(run: RunDir) -> None:
    """The run's eval files as an older forgetcheck wrote them: drift blocks without document ids or positions."""
    for path in sorted((run.root / "eval").glob("*.json")):
        doc = json.loads(path.read_text())
        for key in ("document", "positions"):
            doc["drift"]["blocks"].pop(key)
        atomic_write_json(path, doc)
