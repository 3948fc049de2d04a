"""Drift: how far a model's next-token distribution on general text moved from a reference model's.

Each evaluation scores the drift text (`drift_text`: the documents of a retention perplexity task, or a few
built-in English paragraphs) and keeps, beside its eval JSON, `<label>.topk.npz`: for every position the
model's top-k next-token log-probabilities, their token ids and the log of the remaining (tail) mass. A later
evaluation given that file as its reference computes KL(reference || model) without loading the reference
model again.

Approximation (recorded as `drift.kl.method`): KL is computed over the reference's top-k tokens plus one tail
bin: sum_i p_i log(p_i / q_i) + p_tail log(p_tail / q_tail), where q_tail is the model's mass outside the
reference's top-k. Merging tokens into one bin can only lower KL (log-sum inequality), so this is a lower
bound of the exact KL; with k=64 the tail usually holds a few percent of the mass and the bound is close. The
value is the mean over all scored positions (nats per token).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from forgetcheck import console
from forgetcheck.errors import BadInput
from forgetcheck.eval.suites import TaskSpec, retention_perplexity_task
from forgetcheck.rundir import atomic_write_json, confined, file_sha256, read_json
from forgetcheck.schema import require

DRIFT_TOP_K = 64
DRIFT_TOKENS = 2048
DRIFT_SEQ_LEN = 256
DRIFT_BLOCK = 32  # positions per block of the stored per-block means (compare resamples blocks for intervals)

BUILTIN_DRIFT_TEXT = (
    "The history of the city goes back more than two thousand years. It began as a small settlement on the "
    "bank of a river, where traders stopped to rest and exchange goods. Over the centuries it grew into a "
    "busy port, and its markets drew merchants from distant countries.",
    "Water boils at one hundred degrees Celsius at sea level, but at lower temperatures on high mountains, "
    "because the air pressure there is lower. This is why cooking pasta takes longer in the mountains.",
    "The committee reviewed the proposal in detail and asked the authors to clarify several points before "
    "a final decision could be made. A revised version is expected early next month.",
    "Most birds build nests in spring. Some use twigs and grass, others mud or feathers, and a few simply "
    "lay their eggs on bare rock. The young usually leave the nest after a few weeks.",
    "When you write a letter to a friend, you can tell them about your week, ask about their family, and "
    "share plans for the holidays. A short note is often enough to keep in touch.",
    "Electric trains replaced steam engines on most lines during the twentieth century. They are quieter, "
    "cleaner and faster, and they can climb steeper hills with heavy loads.",
)


def drift_text(specs: list[TaskSpec], tasks_dir: Path | None = None) -> tuple[list[str], str]:
    """(texts, where they come from): the documents of a retention perplexity task, in dataset order, or
    a small built-in English paragraph set when no such task is available."""
    candidates = [s for s in specs if s.kind == "perplexity" and s.suite == "retention"]
    if not candidates:
        try:
            found = retention_perplexity_task(tasks_dir)
        except BadInput:
            found = None
        candidates = [found] if found is not None else []
    if candidates:
        spec = candidates[0]
        texts = [str(spec.task.doc_to_target(d)) for d in spec.task.eval_docs]
        return texts, f"task {spec.name} (documents in dataset order)"
    return list(BUILTIN_DRIFT_TEXT), "built-in English paragraphs (no retention perplexity task found)"


def drift_token_ids(tok, texts: list[str], n_tokens: int = DRIFT_TOKENS, seq_len: int = DRIFT_SEQ_LEN):
    """[n_seq, seq_len] int64 array: the texts joined by blank lines, tokenized, cut into full rows."""
    import numpy as np

    ids: list[int] = []
    for t in texts:
        ids.extend(tok("\n\n" + t if ids else t, add_special_tokens=False)["input_ids"])
        if len(ids) >= n_tokens:
            break
    ids = ids[:n_tokens]
    seq_len = min(seq_len, len(ids))  # a short text gives one shorter row
    n_seq = len(ids) // seq_len
    return np.asarray(ids[: n_seq * seq_len], dtype=np.int64).reshape(n_seq, seq_len)


def drift_pass(model, ids, device: str, ref: dict | None = None) -> dict:
    """Score the drift rows one at a time (a row's full log-probs are [seq_len, vocab]; never all rows at
    once). Returns per-position `nll` [n_seq, seq_len - 1], the top-k summary (`topk_summary`) and, given a
    reference, per-position `kl` (`kl_topk`)."""
    import numpy as np
    import torch

    rows: dict[str, list] = {"nll": [], "topk_logp": [], "topk_idx": [], "tail_logp": [], "kl": []}
    with torch.inference_mode():
        for i, row in enumerate(ids):
            x = torch.as_tensor(row, device=device).unsqueeze(0)
            logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), dim=-1)
            rows["nll"].append((-logp.gather(-1, x[0, 1:].unsqueeze(-1)).squeeze(-1)).cpu().numpy())
            for k, v in topk_summary(logp).items():
                rows[k].append(v)
            if ref is not None:
                ref_row = {k: ref[k][i] for k in ("topk_logp", "topk_idx", "tail_logp")}
                rows["kl"].append(kl_topk(ref_row, logp).cpu().numpy())
    return {k: np.stack(v) for k, v in rows.items() if v}


def drift_blocks(scored: dict, size: int = DRIFT_BLOCK) -> dict:
    """Per-block means (blocks of `size` consecutive positions within one sequence) of the per-position NLL
    and, given a reference, KL: what compare resamples for the drift rules' intervals."""

    out: dict[str, list] = {"size": size, "sequence": [], "nll": [], "kl": []}
    nll, kl = scored["nll"], scored.get("kl")
    for s in range(nll.shape[0]):
        for b in range(0, nll.shape[1], size):
            out["sequence"].append(s)
            out["nll"].append(round(float(nll[s, b:b + size].mean()), 6))
            if kl is not None:
                out["kl"].append(round(float(kl[s, b:b + size].mean()), 7))
    if kl is None:
        del out["kl"]
    return out


def topk_summary(logp, k: int = DRIFT_TOP_K) -> dict:
    """Top-k log-probs, their token ids, and the log of the remaining (tail) mass, per position (numpy)."""
    import torch

    vals, idx = logp.topk(k, dim=-1)
    tail = torch.logsumexp(logp.scatter(-1, idx, float("-inf")), dim=-1)
    return {"topk_logp": vals.float().cpu().numpy(), "topk_idx": idx.int().cpu().numpy(),
            "tail_logp": tail.float().cpu().numpy()}


def kl_topk(ref: dict, logp) -> Any:
    """Per-position KL(reference || model) over the reference's top-k tokens plus one tail bin (nats);
    a lower bound of the exact KL (see the module docstring). `logp`: the model's log-probs [.., vocab]."""
    import torch

    dev = logp.device
    p_logp = torch.as_tensor(ref["topk_logp"], device=dev).double()
    idx = torch.as_tensor(ref["topk_idx"], device=dev).long()
    p_tail = torch.as_tensor(ref["tail_logp"], device=dev).double()
    # q's top-k values and tail bin are computed in the same precision and by the same operations as the
    # reference's own (topk_summary), so a model identical to the reference has KL exactly 0
    q_logp = logp.float().gather(-1, idx).double()
    q_tail = torch.logsumexp(logp.float().scatter(-1, idx, float("-inf")), dim=-1).double()
    kl = (p_logp.exp() * (p_logp - q_logp)).sum(-1) + p_tail.exp() * (p_tail - q_tail)
    return kl.clamp_min(0.0)


TOPK_ARRAYS = ("input_ids", "topk_logp", "topk_idx", "tail_logp")


def read_topk(npz: Path) -> tuple[dict | None, str | None]:
    """(arrays, None) of a top-k file as `measure_drift` writes it, every array read whole and the shapes
    agreeing with each other; (None, why) when it is damaged or not one (never unpickled)."""
    import zipfile

    import numpy as np

    try:
        with np.load(npz, allow_pickle=False) as z:
            missing = [k for k in TOPK_ARRAYS if k not in z.files]
            if missing:
                return None, f"no {missing[0]} array"
            data = {k: z[k] for k in TOPK_ARRAYS}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        return None, f"not a readable .npz: {type(e).__name__}"
    ids = data["input_ids"]
    if ids.ndim != 2 or ids.shape[1] < 2 or ids.dtype.kind not in "iu":
        return None, f"input_ids has shape {ids.shape} ({ids.dtype})"
    positions = (ids.shape[0], ids.shape[1] - 1)
    if data["tail_logp"].shape != positions or data["topk_logp"].shape[:2] != positions \
            or data["topk_idx"].shape != data["topk_logp"].shape or data["topk_idx"].dtype.kind not in "iu":
        return None, "its arrays' shapes do not agree"
    return data, None


def load_reference(path: Path) -> dict:
    """The reference distribution saved beside an earlier eval JSON (its `drift.topk_file`)."""
    path = Path(path)
    doc = require(read_json(path), "eval", str(path))
    rel = (doc.get("drift") or {}).get("topk_file")
    if rel:  # a run folder may only point inside itself
        confined(path.parent, rel, f"--reference {path}: drift.topk_file")
    if not rel or not (path.parent / rel).is_file():
        raise BadInput(f"--reference {path}: no top-k distribution file beside it ({rel or 'none recorded'}); "
                       f"re-run `forgetcheck eval` on the reference model")
    npz = path.parent / rel
    data, why = read_topk(npz)
    if data is None:
        raise BadInput(f"--reference {path}: its top-k distribution file {npz} is damaged ({why}); re-run "
                       f"`forgetcheck eval` on the reference model")
    data["file"] = str(npz)
    data["hash"] = file_sha256(npz)[:16]
    data["model"] = (doc.get("model") or {}).get("name")
    data["text_source"] = str((doc.get("drift") or {}).get("text", {}).get("source", ""))
    return data


def _cached_drift(d: Path, with_kl: bool) -> dict | None:
    """The drift record of a whole cache entry (drift.json and a readable topk.npz); None when there is none.
    A damaged entry is reported in one line and read as a miss, so it is measured and written again."""
    if not (d / "drift.json").is_file() or not (d / "topk.npz").is_file():
        return None
    try:
        drift = json.loads((d / "drift.json").read_text(encoding="utf-8"))
        why = None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        drift, why = None, f"drift.json is not readable JSON: {type(e).__name__}"
    if why is None and (not isinstance(drift, dict) or not isinstance(drift.get("blocks"), dict)
                        or with_kl and not isinstance(drift.get("kl"), dict)):
        why = "drift.json is not a drift record"
    if why is None:
        why = read_topk(d / "topk.npz")[1]
        why = why and f"topk.npz: {why}"
    if why is None:
        return drift
    console.say(f"note: drift cache entry {d} is damaged ({why}); measuring drift again")
    return None


def measure_drift(load_model: Callable[[], tuple[Any, Any]], cache_entry: Callable[..., Path], out_file: Path,
                  label: str, mhash: str, specs: list[TaskSpec], ref: dict | None, device: str, dtype: str,
                  tasks_dir: Path | None = None) -> tuple[dict, dict]:
    """(drift, timing): the model's perplexity on the drift text, its top-k file (for later references),
    and, given a reference, KL(reference || model). `load_model()` gives (model, tokenizer) and is called
    only on a cache miss; `cache_entry(**key_parts)` is the folder that caches this result."""
    import numpy as np

    npz_path = out_file.parent / f"{label}.topk.npz"
    if ref is not None:
        ids, source = ref["input_ids"], ref["text_source"]
    else:
        texts, source = drift_text(specs, tasks_dir)
        ids = None
    d = cache_entry(kind="drift", model=mhash, k=DRIFT_TOP_K, n=DRIFT_TOKENS, seq=DRIFT_SEQ_LEN, blocks=DRIFT_BLOCK,
                    ref=ref["hash"] if ref else None, device=device.split(":")[0], dtype=dtype,
                    text=hashlib.sha256(ids.tobytes() if ids is not None else "\x00".join(texts).encode()
                                        ).hexdigest())
    t0 = time.perf_counter()
    drift = _cached_drift(d, ref is not None)
    if drift is not None:
        if ref is not None:  # the entry may be another run's: the reference is this run's own file
            drift["kl"] = {**drift["kl"], "reference": ref["model"], "reference_file": ref["file"]}
        console.detail(f"  drift: cache hit ({d})")
        timing = {"cached": True, "wall_s": round(time.perf_counter() - t0, 3)}
    else:
        model, tok = load_model()
        if ids is None:
            ids = drift_token_ids(tok, texts)
        if int(ids.max()) >= model.get_output_embeddings().weight.shape[0]:
            raise BadInput(f"--reference {ref['file']}: its token ids exceed this model's vocabulary; KL needs "
                           f"the same tokenizer as the reference model")
        scored = drift_pass(model, ids, device, ref)
        nll = scored["nll"]
        summary = {k: scored[k] for k in ("topk_logp", "topk_idx", "tail_logp")}
        n_pos = int(nll.size)
        drift = {"text": {"source": source, "sequences": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
                          "tokens_scored": n_pos},
                 "perplexity": float(np.exp(nll.mean())),
                 "mean_nll": float(nll.mean()),
                 "topk_mass": float(np.exp(summary["topk_logp"]).sum(-1).mean()),
                 "blocks": drift_blocks(scored)}
        if ref is not None:
            kl = scored["kl"]
            drift["kl"] = {
                "reference": ref["model"], "reference_file": ref["file"],
                "mean": float(kl.mean()), "median": float(np.median(kl)),
                "p95": float(np.quantile(kl, 0.95)), "max": float(kl.max()),
                "unit": "nats per token",
                "method": (f"KL(reference || model) of the next-token distribution over the reference's top-"
                           f"{DRIFT_TOP_K} tokens plus one bin for the remaining mass, averaged over {n_pos} "
                           f"positions; merging the tail into one bin makes this a lower bound of the exact KL "
                           f"(close when the reference's top-{DRIFT_TOP_K} mass, "
                           f"{float(np.exp(ref['topk_logp']).sum(-1).mean()):.3f} here, is near 1)"),
            }
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".topk.{os.getpid()}.tmp.npz"
        np.savez_compressed(tmp, input_ids=ids, **summary)
        tmp.replace(d / "topk.npz")
        atomic_write_json(d / "drift.json", drift)
        timing = {"cached": False, "wall_s": round(time.perf_counter() - t0, 3)}
        console.detail(f"  drift: {n_pos} positions in {timing['wall_s']:.1f} s")
    npz_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(d / "topk.npz", npz_path)
    return {**drift, "topk_file": npz_path.name, "top_k": DRIFT_TOP_K}, timing
