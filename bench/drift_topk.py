"""How far the drift rule's top-k + tail-bin KL falls below the exact KL, and what a larger k costs.

    python bench/drift_topk.py [--sigmas 0.05,0.1] [--ks 64,128,256,512] [--timing-reps 3] [--timing-only]

smollm2-135m (the base) against copies with Gaussian noise (sigma times each weight matrix's own standard
deviation) added to blocks 10-19 of 30, the copies bench/gate_validity.py builds (the same generator, seed and
order, here made in memory), on the drift text as `forgetcheck eval` reads it (eval/drift.py: `drift_text`,
`drift_documents`). Both models score the same rows in the same passes as `drift_pass`; at every scored
position it takes the exact KL(base || copy) over the whole vocabulary and, for each k, the top-k + tail-bin
KL (`kl_topk` over `topk_summary(base, k)`: what a reference file of top-k would give). Printed per k: the base's
mass outside its top k, each copy's top-k KL against the exact one (and the gap), the size of the top-k file an
evaluation writes (`<label>.topk.npz`, compressed) and the seconds the top-k summary and the KL take over the
text (on top of the forward passes). With `--timing-reps N`, the wall time of the drift pass (`drift_pass`,
without and with a reference) on the old text (the first 2,048 tokens of the joined documents, rows of 256) and
on the new one (one row per document), N times each, alternating, on this machine's CPU.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gate_validity import add_noise  # noqa: E402
from forgetcheck.eval import drift  # noqa: E402
from forgetcheck.models import registry  # noqa: E402


def noised(model, sigma: float, blocks: range = range(10, 20), seed: int = 0):
    """A copy of `model` with the noise of bench/gate_validity.py's `noised_copy`."""
    out = copy.deepcopy(model)
    add_noise(out, sigma, blocks, seed)
    return out


def log_probs(model, ids, lengths):
    """(rows, mask of scored positions, log-probs [rows, width - 1, vocab]) pass by pass, as `drift.drift_pass`
    batches them."""
    import torch

    n_seq, width = ids.shape
    per_pass = max(1, round(drift.DRIFT_SEQ_LEN / width))
    with torch.inference_mode():
        for start in range(0, n_seq, per_pass):
            rows = slice(start, start + per_pass)
            w = int(lengths[rows].max())
            x = torch.as_tensor(ids[rows, :w])
            logp = torch.log_softmax(model(input_ids=x).logits[:, :-1].float(), dim=-1)
            mask = torch.as_tensor(drift.scored_mask(lengths[rows], w))
            yield rows, mask, logp


def topk_vs_exact(base, copies: dict, text: dict, ks: list[int]) -> dict:
    """Per copy the mean exact KL and top-k KL at each k; the base's tail mass at each k; the seconds of the
    top-k summary and the KL per copy; and per row and position (0 where not scored) the exact KL, the top-k
    KL at the first k and both models' NLL, for the standard errors of `layouts`."""
    ids, lengths = text["input_ids"], text["lengths"]
    n_seq, width = ids.shape
    grid = {(name, s): np.zeros((n_seq, width - 1)) for name in ("exact", "topk", "nll_base", "nll_arm")
            for s in copies}
    approx = {(s, k): [] for s in copies for k in ks}
    tail = {k: [] for k in ks}
    cost = dict.fromkeys(ks, 0.0)
    arm_passes = {s: log_probs(m, ids, lengths) for s, m in copies.items()}
    for rows, mask, lp_b in log_probs(base, ids, lengths):
        w = lp_b.shape[1]
        m = mask.numpy()
        nxt = torch_next_tokens(ids[rows, 1:w + 1])
        for s, gen in arm_passes.items():
            _, _, lp_a = next(gen)
            grid[("exact", s)][rows, :w] = np.where(m, (lp_b.exp() * (lp_b - lp_a)).sum(-1).double().numpy(), 0)
            grid[("nll_base", s)][rows, :w] = np.where(m, -lp_b.gather(-1, nxt).squeeze(-1).numpy(), 0)
            grid[("nll_arm", s)][rows, :w] = np.where(m, -lp_a.gather(-1, nxt).squeeze(-1).numpy(), 0)
            for k in ks:
                t0 = time.perf_counter()
                summ = drift.topk_summary(lp_b, k)
                kl = drift.kl_topk(summ, lp_a)
                cost[k] += time.perf_counter() - t0
                approx[(s, k)].append(kl[mask].numpy())
                if k == ks[0]:
                    grid[("topk", s)][rows, :w] = np.where(m, kl.numpy(), 0)
                if s == next(iter(copies)):
                    tail[k].append(np.exp(summ["tail_logp"])[m])
    n = float(drift.scored_mask(lengths, width).sum())
    return {"exact": {s: float(grid[("exact", s)].sum() / n) for s in copies},
            "topk": {key: float(np.concatenate(v).mean()) for key, v in approx.items()},
            "tail": {k: float(np.concatenate(v).mean()) for k, v in tail.items()},
            "seconds": {k: v / len(copies) for k, v in cost.items()}, "grid": grid}


def torch_next_tokens(ids):
    import torch

    return torch.as_tensor(ids).unsqueeze(-1)


def cluster_se(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(R, its cluster-robust standard error) of R = sum(a) / sum(b) over documents (one value of a and b each):
    sqrt(G / (G - 1) * sum_g (a_g - R b_g)^2) / sum(b)."""
    r = a.sum() / b.sum()
    g = len(a)
    return float(r), float(np.sqrt(g / (g - 1) * ((a - r * b) ** 2).sum()) / b.sum())


def layouts(grid: dict, lengths: np.ndarray, copies: list[float]) -> list[dict]:
    """The KL mean and the NLL rise with their standard errors, documents as clusters, had the drift text
    held the first `docs` documents at `cap` tokens each (a row's first positions are the same whatever the
    cap: each row is scored alone)."""
    out = []
    for docs, cap in ((32, 65), (64, 33), (64, 65)):
        rows = slice(0, docs)
        m = drift.scored_mask(np.minimum(lengths[rows], cap), grid[("exact", copies[0])].shape[1] + 1)
        row = {"docs": docs, "cap": cap, "positions": int(m.sum())}
        for s in copies:
            pos = m.sum(1).astype(float)
            sums = {k: (grid[(k, s)][rows] * m).sum(1) for k in ("exact", "topk", "nll_base", "nll_arm")}
            row[("kl", s)] = cluster_se(sums["topk"], pos)
            r, se = cluster_se(sums["nll_arm"], sums["nll_base"])
            row[("rise", s)] = (100 * (r - 1), 100 * se)
        out.append(row)
    return out


def npz_bytes(model, text: dict, k: int, work: Path) -> int:
    """Size of the top-k file an evaluation at this k writes for `model`."""
    s = drift.drift_pass(model, text["input_ids"], "cpu", None, text["lengths"], k=k)
    f = work / f"k{k}.npz"
    np.savez_compressed(f, **text, **{n: s[n] for n in ("topk_logp", "topk_idx", "tail_logp")})
    return f.stat().st_size


def timing(model, tok, texts, docs, reps: int) -> dict:
    layouts = {"old: first 2,048 tokens joined, rows of 256":
               (drift.drift_token_ids(tok, texts, n_tokens=2048, seq_len=256), None),
               f"new: {drift.DRIFT_DOCS} documents, one row each (<= {drift.DRIFT_DOC_TOKENS} tokens)": None}
    t = drift.drift_documents(tok, texts, docs)
    layouts[list(layouts)[1]] = (t["input_ids"], t["lengths"])
    drift.drift_pass(model, layouts[list(layouts)[0]][0][:1], "cpu")  # warm-up
    out = {name: {"tokens": int(ids.size if lengths is None else lengths.sum()), "pass": [], "pass_kl": [],
                  "cpu": [], "cpu_kl": []} for name, (ids, lengths) in layouts.items()}
    for _ in range(reps):
        for name, (ids, lengths) in layouts.items():
            t0, c0 = time.perf_counter(), time.process_time()
            s = drift.drift_pass(model, ids, "cpu", None, lengths)
            t1, c1 = time.perf_counter(), time.process_time()
            drift.drift_pass(model, ids, "cpu", s, lengths)
            out[name]["pass"].append(t1 - t0)
            out[name]["pass_kl"].append(time.perf_counter() - t1)
            out[name]["cpu"].append(c1 - c0)
            out[name]["cpu_kl"].append(time.process_time() - c1)
    return out


def print_timing(model, tok, texts, docs, reps: int) -> None:
    print(f"drift pass on CPU ({reps} runs each, alternating; wall seconds min / median, CPU seconds of this "
          f"process min):")
    for name, v in timing(model, tok, texts, docs, reps).items():
        print(f"  {name}: {v['tokens']} tokens; pass {min(v['pass']):.1f} / {statistics.median(v['pass']):.1f} "
              f"(CPU {min(v['cpu']):.1f}); with a reference (KL) {min(v['pass_kl']):.1f} / "
              f"{statistics.median(v['pass_kl']):.1f} (CPU {min(v['cpu_kl']):.1f})")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sigmas", default="0.05,0.1")
    ap.add_argument("--ks", default="64,128,256,512")
    ap.add_argument("--timing-reps", type=int, default=0)
    ap.add_argument("--timing-only", action="store_true", help="only the drift pass's wall time")
    a = ap.parse_args()
    import torch

    torch.manual_seed(0)
    ks = [int(k) for k in a.ks.split(",")]
    sigmas = [float(s) for s in a.sigmas.split(",")]
    t_start = time.perf_counter()
    base, tok = registry.load(registry.resolve("smollm2-135m"))
    base.eval()
    texts, docs, source = drift.drift_text([], None)
    text = drift.drift_documents(tok, texts, docs)
    n_pos = int(text["lengths"].sum() - len(text["lengths"]))
    print(f"drift text: {source}; {len(set(text['document'].tolist()))} documents, {n_pos} scored positions; "
          f"torch threads {torch.get_num_threads()}")
    if a.timing_only:
        ks, sigmas = [], []
    copies = {s: noised(base, s).eval() for s in sigmas}
    r = topk_vs_exact(base, copies, text, ks) if ks else None
    if r is None:
        print_timing(base, tok, texts, docs, a.timing_reps or 3)
        print(f"(took {time.perf_counter() - t_start:.0f} s)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {k: npz_bytes(base, text, k, Path(tmp)) for k in ks}
    print()
    head = " | ".join(f"sigma {s:g}: top-k KL (exact {r['exact'][s]:.4f}), gap" for s in sigmas)
    print(f"| k | base's mass outside its top k | {head} | top-k file (MB) | top-k + KL seconds |")
    print("|---:|---:|" + "---:|" * len(sigmas) + "---:|---:|")
    for k in ks:
        cells = " | ".join(f"{r['topk'][(s, k)]:.4f}, {100 * (r['topk'][(s, k)] / r['exact'][s] - 1):+.1f} %"
                           for s in sigmas)
        print(f"| {k} | {100 * r['tail'][k]:.1f} % | {cells} | {sizes[k] / 1e6:.2f} | {r['seconds'][k]:.2f} |")
    print()
    print(f"standard errors with the documents as clusters (top-{ks[0]} KL; NLL rise in percent), had the text held "
          "the first `docs` documents at `cap` tokens:")
    print("| docs x cap | positions | " + " | ".join(f"sigma {s:g}: KL, se | NLL rise %, se" for s in sigmas) + " |")
    print("|---|---:|" + "---:|---:|" * len(sigmas))
    for row in layouts(r["grid"], text["lengths"], sigmas):
        cells = " | ".join(f"{row[('kl', s)][0]:.4f}, {row[('kl', s)][1]:.4f} | "
                           f"{row[('rise', s)][0]:.2f}, {row[('rise', s)][1]:.2f}" for s in sigmas)
        print(f"| {row['docs']} x {row['cap']} | {row['positions']} | {cells} |")
    print()
    if a.timing_reps:
        print_timing(base, tok, texts, docs, a.timing_reps)
    print(f"(took {time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
