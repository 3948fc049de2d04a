"""Throughput of `forgetcheck eval` (backend fast, and optionally hf) against stock lm-eval, same items, timed in
alternating rounds.

    python bench/eval_throughput.py [--model smollm2-135m] [--tasks a,b,c | --suite retention] [--limit 20]
                                    [--repeats 3] [--engines stock,fast | stock,hf,fast]

Each engine scores the same tasks and the same items (forgetcheck's deterministic --limit subset, passed to
stock lm-eval as `samples=`) with the same model folder, fp32, on the same device:
  * `lm-eval hf (stock)`: `lm_eval.simple_evaluate(model="hf", model_args="pretrained=<folder>,dtype=float32")`;
  * `forgetcheck hf`:   `forgetcheck.eval.runner.evaluate(..., EvalConfig(backend="hf"))` (stock HFLM inside);
  * `forgetcheck fast`: the same with `backend="fast"` (forgetcheck.eval.fast_lm.FastLM).
Wall time includes loading the model for every engine, and for forgetcheck choosing its --limit items (stock
lm-eval is handed them); forgetcheck's drift measurement (not done by stock lm-eval) is timed separately and left
out. forgetcheck runs with an empty eval cache every time. Items/s counts benchmark items; tokens/s counts the
tokens of every (context + continuation) request as lm-eval builds them, the same work units for all engines.

The engines run in turn, round after round (stock, fast, stock, fast, ...): a change of machine speed (another
job, a thermal limit) lands on both engines of a round, so each round's ratio stock wall / engine wall is the
figure, and the table reports their median with the min-max range, with the 1-minute load average before each
round. After the table, each forgetcheck engine's per-item results (first round) are compared with stock
lm-eval's: the largest loglikelihood difference and the number of items whose correctness or is_greedy flags
differ.

`--profile` runs each engine once instead, counting its forward passes, padded tokens and forward seconds, then
prints the floor: the fastest any exact engine could be on this machine. Its tokens are the distinct fed positions
of the fast engine's requests (rolling windows included): each request feeds HFLM's left-truncated window
`(context + continuation)[-(max_length + 1):]` less its last token, and a prefix trie over all of them counts every
position that an engine sharing every common prefix must still run. Its rate is the model body's best dense forward
rate measured in the same process after the engines (the transformer without the vocabulary projection, fp32,
random ids, shapes BODY_SHAPES, median of 3 after a warm-up, the lowest ms/token). Their product, the floor
forward seconds, leaves out the vocabulary projection and scoring, so it is a lower bound; the bound on the ratio
is stock wall / floor forward (no fixed cost at all) and stock wall / (floor forward + fast's measured rest).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_TASKS = "fc_mmlu_stem,fc_social_iqa,fc_hellaswag"
STOCK = "lm-eval hf (stock)"
ENGINES = {"stock": STOCK, "hf": "forgetcheck hf", "fast": "forgetcheck fast"}


def _stock(ref, tasks_dir: Path, names: list[str], samples: dict, batch_size: int, device: str):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    t0 = time.perf_counter()
    out = simple_evaluate(model="hf", model_args=f"pretrained={ref.path},dtype=float32", tasks=names,
                          task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
                          samples=samples or None, batch_size=batch_size, device=device, log_samples=True,
                          bootstrap_iters=1000)
    return time.perf_counter() - t0, out


def _forgetcheck(ref, tasks_dir: Path, names: list[str], limit: int, backend: str, batch_size: int,
                 device: str) -> tuple[float, float, dict]:
    """(wall without drift, drift wall, eval doc + its per-item rows under "rows"), with an empty cache (a
    throwaway FORGETCHECK_HOME)."""
    from forgetcheck.config import EvalConfig
    from forgetcheck.eval.runner import evaluate
    from forgetcheck.rundir import read_jsonl

    saved = os.environ.get("FORGETCHECK_HOME")
    with tempfile.TemporaryDirectory(prefix="fc-bench-") as tmp:
        os.environ["FORGETCHECK_HOME"] = tmp
        try:
            t0 = time.perf_counter()
            doc = evaluate(ref, EvalConfig(tasks=tuple(names), limit=limit, backend=backend, batch_size=batch_size),
                           Path(tmp) / "eval" / f"{backend}.json", device=device, tasks_dir=tasks_dir)
            wall = time.perf_counter() - t0
            doc["rows"] = {n: read_jsonl(Path(tmp) / "eval" / t["samples"]) for n, t in doc["tasks"].items()}
        finally:
            if saved is None:
                os.environ.pop("FORGETCHECK_HOME", None)
            else:
                os.environ["FORGETCHECK_HOME"] = saved
    drift_s = doc["timings"]["drift"]["wall_s"]
    return wall - drift_s, drift_s, doc


def _request_tokens(tok, out: dict, names: list[str]) -> int:
    """Tokens of every request lm-eval built: context + continuation (multiple choice), the text (rolling)."""
    n = 0
    for name in names:
        for s in out["samples"][name]:
            for args in s["arguments"]:
                n += len(tok("".join(str(a) for a in args), add_special_tokens=False)["input_ids"])
    return n


def agreement(stock: dict, doc: dict) -> dict:
    """Per-item comparison of a forgetcheck evaluation with stock lm-eval's logged samples: the largest
    loglikelihood difference (multiple choice: every choice; perplexity: the document's sum), and how many
    items differ in correctness (acc) or in a choice's is_greedy flag."""
    worst_mc = worst_ppl = worst_rel = 0.0
    flips = greedy = items = 0
    for name, rows in doc["rows"].items():
        by_id = {s["doc_id"]: s for s in stock["samples"][name]}
        for row in rows:
            s = by_id[row["doc_id"]]
            items += 1
            if "loglikelihoods" in row:
                ref = [float(r[0]) for r in s["filtered_resps"]]
                worst_mc = max(worst_mc, *(abs(a - b) for a, b in zip(ref, row["loglikelihoods"], strict=True)))
                flips += row["correct"] != bool(s["acc"])
                greedy += [bool(r[1]) for r in s["filtered_resps"]] != row["is_greedy"]
            else:
                ref = float(s["filtered_resps"][0])
                worst_ppl = max(worst_ppl, abs(ref - row["loglikelihood"]))
                worst_rel = max(worst_rel, abs(ref - row["loglikelihood"]) / max(1.0, abs(ref)))
    return {"items": items, "max_abs_diff_mc": worst_mc, "max_abs_diff_ppl": worst_ppl, "max_rel_diff_ppl": worst_rel,
            "correct_differs": flips, "greedy_differs": greedy}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default=DEFAULT_TASKS)
    p.add_argument("--suite", default=None, help="Every task of this suite (overrides --tasks).")
    p.add_argument("--limit", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3, help="Rounds (each engine once per round).")
    p.add_argument("--engines", default="stock,fast", help="Comma list of stock, hf, fast; stock always runs.")
    p.add_argument("--profile", action="store_true",
                   help="Instead of the rounds: one run of stock and fast, counting their forward passes, padded "
                        "tokens and forward seconds (where the time goes).")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)

    from forgetcheck.config import EvalConfig
    from forgetcheck.data import benchmarks
    from forgetcheck.device import choose_device
    from forgetcheck.eval.suites import resolve_tasks, select_items
    from forgetcheck.models import registry

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    names = (benchmarks.suite_tasks(a.suite) if a.suite
             else [t.strip() for t in a.tasks.split(",") if t.strip()])
    ours = [b for b in ("hf", "fast") if b in a.engines.split(",")]
    ref = registry.resolve(a.model)
    dev = choose_device(a.device)
    tasks_dir = benchmarks.render_tasks_dir()
    specs = resolve_tasks(EvalConfig(tasks=tuple(names)), tasks_dir)
    samples = {s.name: idx for s in specs if (idx := select_items(s.task, a.limit, s.kind)) is not None}
    print(f"model {ref.name}; {dev.describe()}; tasks {', '.join(names)}; limit {a.limit}; batch size "
          f"{a.batch_size}; {a.repeats} round(s) of {', '.join([STOCK] + [ENGINES[b] for b in ours])}; "
          f"torch threads {torch_threads()}, {os.cpu_count()} CPUs", flush=True)

    if a.profile:
        model, _ = registry.load(ref, device=dev.device)
        return profile(ref, tasks_dir, names, samples, a.limit, a.batch_size, dev.device, model)
    # imports and the model's files warm before any timing: the first engine of the first round would pay them
    import lm_eval.models.huggingface  # noqa: F401

    registry.load(ref, device=dev.device)
    walls: dict[str, list[float]] = {STOCK: [], **{ENGINES[b]: [] for b in ours}}
    loads: list[float] = []
    drift_walls: list[float] = []
    items = tokens = None
    agree: dict[str, dict] = {}
    for r in range(a.repeats):
        loads.append(os.getloadavg()[0])
        print(f"\n--- round {r + 1}/{a.repeats} (load average {loads[-1]:.1f})", flush=True)
        wall, out = _stock(ref, tasks_dir, names, samples, a.batch_size, dev.device)
        walls[STOCK].append(wall)
        if items is None:
            items = sum(len(out["samples"][n]) for n in names)
            tokens = _request_tokens(registry.load_tokenizer(ref), out, names)
        for backend in ours:
            wall, drift_s, doc = _forgetcheck(ref, tasks_dir, names, a.limit, backend, a.batch_size, dev.device)
            assert sum(t["n"] for t in doc["tasks"].values()) == items, "engines scored different item counts"
            walls[ENGINES[backend]].append(wall)
            drift_walls.append(drift_s)
            if r == 0:
                agree[ENGINES[backend]] = agreement(out, doc)
        print("    " + "; ".join(f"{e}: {w[-1]:.1f} s" for e, w in walls.items()), flush=True)

    print(f"\n{items} items, {tokens} request tokens per engine; {a.repeats} round(s); model load included, "
          f"forgetcheck's drift pass ({statistics.median(drift_walls):.1f} s median) excluded; load average "
          f"{min(loads):.1f}-{max(loads):.1f} before the rounds\n")
    print(f"{'engine':<22} {'wall s':>8} {'items/s':>9} {'tokens/s':>10}   {'stock / engine, per round':<28}")
    for engine, ws in walls.items():
        w = statistics.median(ws)
        ratios = [s / x for s, x in zip(walls[STOCK], ws)]
        spread = f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]"
        print(f"{engine:<22} {w:>8.1f} {items / w:>9.2f} {tokens / w:>10.0f}   {spread:<28}")
    print("\nper-item agreement with stock lm-eval (first round):")
    for engine, g in agree.items():
        print(f"  {engine}: {g['items']} items; max |loglikelihood diff| multiple choice {g['max_abs_diff_mc']:.2e}, "
              f"perplexity (document sums) {g['max_abs_diff_ppl']:.2e} ({g['max_rel_diff_ppl']:.1e} relative); "
              f"correctness differs on {g['correct_differs']} item(s), is_greedy on {g['greedy_differs']}")
    return 0


def profile(ref, tasks_dir: Path, names: list[str], samples: dict, limit: int, batch_size: int, device: str,
            model) -> int:
    """One run of each engine with its model calls counted: passes, padded tokens (rows x columns), seconds;
    then the floor: the distinct fed positions of fast's requests times `model`'s best dense body ms/token."""
    from lm_eval.models.huggingface import HFLM

    from forgetcheck.eval.fast_lm import FastLM, hflm_window

    counts = {}

    def counting(cls, name: str, engine: str):
        original = getattr(cls, name)
        c = counts.setdefault(engine, {"passes": 0, "tokens": 0, "s": 0.0})

        def wrapper(self, inps, *args, **kwargs):
            t0 = time.perf_counter()
            out = original(self, inps, *args, **kwargs)
            c["passes"] += 1
            c["tokens"] += inps.numel()
            c["s"] += time.perf_counter() - t0
            return out

        setattr(cls, name, wrapper)
        return original

    trie: dict = {}
    fed = {"requests": 0, "tokens": 0, "positions": 0}
    fast_requests = FastLM._loglikelihood_tokens

    def feeding(self, requests, *args, **kwargs):
        """Every request's fed tokens (HFLM's left-truncated window less its last token, as plan_rows) into
        one prefix trie over the whole run: its node count is the number of distinct fed positions."""
        for _, context, continuation in requests:
            window = hflm_window(context, continuation, self.max_length)
            node = trie
            for t in window[:-1]:
                child = node.get(t)
                if child is None:
                    child = node[t] = {}
                    fed["positions"] += 1
                node = child
            fed["requests"] += 1
            fed["tokens"] += len(window) - 1
        return fast_requests(self, requests, *args, **kwargs)

    choice = item_choice_seconds(tasks_dir, names, limit)
    stock_call = counting(HFLM, "_model_call", STOCK)
    fast_call = counting(FastLM, "_forward", ENGINES["fast"])
    FastLM._loglikelihood_tokens = feeding
    try:
        walls = {STOCK: _stock(ref, tasks_dir, names, samples, batch_size, device)[0],
                 ENGINES["fast"]: _forgetcheck(ref, tasks_dir, names, limit, "fast", batch_size, device)[0]}
    finally:
        HFLM._model_call, FastLM._forward = stock_call, fast_call
        FastLM._loglikelihood_tokens = fast_requests
    print(f"\n{'engine':<22} {'wall s':>7} {'passes':>7} {'tokens':>8} {'forward s':>10} {'ms/token':>9} "
          f"{'rest s':>7}")
    for engine, c in counts.items():
        w = walls[engine]
        print(f"{engine:<22} {w:>7.1f} {c['passes']:>7} {c['tokens']:>8} {c['s']:>10.1f} "
              f"{1e3 * c['s'] / max(1, c['tokens']):>9.2f} {w - c['s']:>7.1f}")
    print(f"choosing the --limit items of every task: {choice['once']:.1f} s with each Jinja template compiled once "
          f"(forgetcheck), {choice['per_call']:.1f} s compiling it on every call (lm-eval's apply_template); same "
          f"items: {choice['same']}")
    print("tokens: rows x columns of every forward pass (padding included); forward s: inside the model calls "
          "(stock: logits at every position; fast: at the scored positions only); rest: loading, task building, "
          "item choice, log-softmax and scoring, records")

    best_ms, shape = body_ms_per_token(model, device)
    c = counts[ENGINES["fast"]]
    floor_s = fed["positions"] * best_ms / 1e3
    fast_rest = walls[ENGINES["fast"]] - c["s"]
    print(f"\nthe fastest any exact engine could be on this machine: {fed['positions']} distinct fed positions "
          f"(a prefix trie over the fed tokens of fast's {fed['requests']} requests, {fed['tokens']} tokens "
          f"unshared; fast ran {c['tokens']} padded) x {best_ms:.2f} ms/token (the model body's best dense rate, "
          f"shape [{shape[0]},{shape[1]}]) = {floor_s:.1f} s of forward")
    print(f"bound on stock / engine: {walls[STOCK] / floor_s:.2f}x with no fixed cost at all (stock wall "
          f"{walls[STOCK]:.1f} s / {floor_s:.1f} s), {walls[STOCK] / (floor_s + fast_rest):.2f}x with fast's "
          f"measured rest (/ ({floor_s:.1f} + {fast_rest:.1f}) s); measured: "
          f"{walls[STOCK] / walls[ENGINES['fast']]:.2f}x")
    print("distinct fed positions: what an exact engine must run at least, every fed token of every request "
          "(rolling windows included) with shared prefixes run once; body ms/token: the transformer body alone, "
          "fp32, random ids, best median of 3 over the shapes tried, so the vocabulary projection and scoring "
          "are left out and the floor is a lower bound")
    return 0


BODY_SHAPES = ((32, 64), (16, 128), (8, 256), (4, 512))


def body_ms_per_token(model, device: str, shapes=BODY_SHAPES, repeats: int = 3) -> tuple[float, tuple[int, int]]:
    """The model body's (the transformer without the vocabulary projection) best dense forward rate: for each
    [rows, columns] shape, one warm-up pass on random token ids then the median of `repeats` timings, fp32,
    inference mode; (lowest ms/token, its shape)."""
    import torch

    body = model.base_model
    vocab = model.config.vocab_size
    best = (float("inf"), shapes[0])
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for rows, cols in shapes:
            ids = torch.randint(0, vocab, (rows, cols), generator=gen).to(device)
            times = []
            for i in range(repeats + 1):
                if str(device).startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                body(input_ids=ids, use_cache=False)
                if str(device).startswith("cuda"):
                    torch.cuda.synchronize()
                if i:
                    times.append(time.perf_counter() - t0)
            best = min(best, (1e3 * statistics.median(times) / (rows * cols), (rows, cols)))
    return best


def item_choice_seconds(tasks_dir: Path, names: list[str], limit: int) -> dict:
    """Seconds to choose the --limit items of every task (fresh task objects each way, so no order is remembered),
    with forgetcheck's compiled-once templates and with lm-eval's compile-per-call."""
    import contextlib

    from forgetcheck.config import EvalConfig
    from forgetcheck.eval import suites

    def timed() -> tuple[float, dict]:
        specs = suites.resolve_tasks(EvalConfig(tasks=tuple(names)), tasks_dir)
        t0 = time.perf_counter()
        items = {s.name: suites.select_items(s.task, limit, s.kind) for s in specs}
        return time.perf_counter() - t0, items

    once, a = timed()
    compiled_once = suites._templates_compiled_once
    suites._templates_compiled_once = contextlib.nullcontext
    try:
        per_call, b = timed()
    finally:
        suites._templates_compiled_once = compiled_once
    return {"once": once, "per_call": per_call, "same": a == b}


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main())
