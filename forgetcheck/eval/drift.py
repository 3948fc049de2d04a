"""Drift: how far a model's next-token distribution on general text moved from a reference model's.

The drift text (`drift_text`, `drift_documents`) is one row per document: the first `DRIFT_DOC_TOKENS` tokens of
the first paragraph of each of the first `DRIFT_DOCS` documents (articles: the `cluster` of the retention
perplexity task's rows, else one document per text; a few built-in English paragraphs when there is no such
task). A row never holds two documents, so every per-block value stored in the eval JSON (`drift.blocks`,
blocks of `DRIFT_BLOCK` positions within a row) carries its document's id, and compare resamples documents,
not blocks: positions of one article are not independent evidence. Rows are scored several to a forward pass
(right-padded; a causal model never looks at the padding after a position).

Each evaluation keeps, beside its eval JSON, `<label>.topk.npz`: the drift text's token ids, each row's length
and document id, and for every position the model's top-k next-token log-probabilities, their token ids and
the log of the remaining (tail) mass. A later evaluation given that file as its reference scores the same rows
(so it gets the same blocks and documents) and computes KL(reference || model) without loading the reference
model again.

Approximation (recorded as `drift.kl.method`): KL is computed over the reference's top-k tokens plus one tail
bin: sum_i p_i log(p_i / q_i) + p_tail log(p_tail / q_tail), where q_tail is the model's mass outside the
reference's top-k. Merging tokens into one bin can only lower KL (log-sum inequality), so this is a lower
bound of the exact KL, and not a close one: on the Wikipedia drift text SmolLM2-135M leaves about 11 % of its
mass outside its top 64, and the bound reads about 18 % below the exact KL of noised copies (a nearly constant
fraction; within 5 % only from k = 1,024, a 16 times larger top-k file: bench/drift_topk.py, docs/verdicts.md,
"The drift text and the KL bound"). The value is the mean over all scored positions (nats per token).
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
DRIFT_DOCS = 64  # documents of the drift text, one row each (docs/design.md, "Measured constants")
DRIFT_DOC_TOKENS = 65  # tokens of a document at most: 64 scored positions, two blocks of 32
DRIFT_TOKENS = DRIFT_DOCS * DRIFT_DOC_TOKENS  # the drift text's tokens at most (4,160)
DRIFT_SEQ_LEN = 256  # tokens per forward pass (rows of `drift_token_ids`; documents are scored 4 to a pass)
DRIFT_BLOCK = 32  # positions per block of the stored per-block means (blocks never span two documents)
DRIFT_LAYOUT = 2  # 1: rows of 256 tokens cut from the joined texts; 2: one row per document (cache key)

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


def drift_text(specs: list[TaskSpec], tasks_dir: Path | None = None) -> tuple[list[str], list[str], str]:
    """(texts, each text's document id, where they come from): the documents of a retention perplexity task, in
    dataset order (a row's `cluster`, its article, is its document; a row without one is a document of its
    own), or a small built-in English paragraph set (one document per paragraph) when no such task is
    available."""
    candidates = [s for s in specs if s.kind == "perplexity" and s.suite == "retention"]
    if not candidates:
        try:
            found = retention_perplexity_task(tasks_dir)
        except BadInput:
            found = None
        candidates = [found] if found is not None else []
    if candidates:
        spec = candidates[0]
        texts, docs = [], []
        for i, d in enumerate(spec.task.eval_docs):
            texts.append(str(spec.task.doc_to_target(d)))
            cluster = d.get("cluster") if isinstance(d, dict) else None
            docs.append(str(cluster) if cluster not in (None, "") else f"#{i}")
        return texts, docs, f"task {spec.name} (documents in dataset order)"
    texts = list(BUILTIN_DRIFT_TEXT)
    return (texts, [f"#{i}" for i in range(len(texts))],
            "built-in English paragraphs (no retention perplexity task found)")


def drift_documents(tok, texts: list[str], docs: list[str], n_docs: int = DRIFT_DOCS,
                    doc_tokens: int = DRIFT_DOC_TOKENS) -> dict:
    """The drift text as one row per document: the first `doc_tokens` tokens of the first text of each of the
    first `n_docs` documents (a document's later texts, and texts of fewer than 2 tokens, are passed over).
    Returns `input_ids` [rows, longest row] int64, right-padded with 0; `lengths` [rows] (tokens of each row);
    `document` [rows] (each row's document id, str)."""
    import numpy as np

    rows: list[list[int]] = []
    ids_of: list[str] = []
    seen: set[str] = set()
    for text, doc in zip(texts, docs):
        if len(rows) >= n_docs:
            break
        if doc in seen:
            continue
        ids = tok(text, add_special_tokens=False)["input_ids"][:doc_tokens]
        if len(ids) < 2:
            continue
        seen.add(doc)
        rows.append(ids)
        ids_of.append(doc)
    width = max((len(r) for r in rows), default=0)
    out = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return {"input_ids": out, "lengths": np.asarray([len(r) for r in rows], dtype=np.int64),
            "document": np.asarray(ids_of, dtype=str)}


def drift_token_ids(tok, texts: list[str], n_tokens: int = DRIFT_TOKENS, seq_len: int = DRIFT_SEQ_LEN):
    """[n_seq, seq_len] int64 array: the texts joined by blank lines, tokenized, cut into full rows (rows span
    documents: the training curve's general and domain text, train/signals.py; the drift rules read
    `drift_documents`)."""
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


def drift_pass(model, ids, device: str, ref: dict | None = None, lengths=None, k: int = DRIFT_TOP_K) -> dict:
    """Score the drift rows, as many to a forward pass as fit in about `DRIFT_SEQ_LEN` tokens (a pass's full
    log-probs are [rows, width, vocab]; never all rows at once). `lengths`: each row's tokens (right-padded
    rows; None: every row full). Returns per-position `nll` [n_seq, width - 1], the top-`k` summary
    (`topk_summary`) and, given a reference, per-position `kl` (`kl_topk`); positions past a row's length
    hold 0."""
    import numpy as np
    import torch

    n_seq, width = ids.shape
    lengths = np.full(n_seq, width, dtype=np.int64) if lengths is None else np.asarray(lengths)
    per_pass = max(1, round(DRIFT_SEQ_LEN / max(width, 1)))
    parts: dict[str, list] = {"nll": [], "topk_logp": [], "topk_idx": [], "tail_logp": [], "kl": []}
    with torch.inference_mode():
        for start in range(0, n_seq, per_pass):
            rows = slice(start, start + per_pass)
            w = int(lengths[rows].max())
            x = torch.as_tensor(ids[rows, :w], device=device)
            logp = torch.log_softmax(model(input_ids=x).logits[:, :-1].float(), dim=-1)
            got = {"nll": (-logp.gather(-1, x[:, 1:].unsqueeze(-1)).squeeze(-1)).cpu().numpy(),
                   **topk_summary(logp, k)}
            if ref is not None:
                ref_rows = {a: ref[a][rows, :w - 1] for a in ("topk_logp", "topk_idx", "tail_logp")}
                got["kl"] = kl_topk(ref_rows, logp).cpu().numpy()
            for name, v in got.items():  # back to the full width, zero past each row's length
                full = np.zeros((v.shape[0], width - 1, *v.shape[2:]), dtype=v.dtype)
                full[:, :w - 1] = v
                for j, n in enumerate(lengths[rows]):
                    full[j, n - 1:] = 0
                parts[name].append(full)
    return {name: np.concatenate(v) for name, v in parts.items() if v}


def scored_mask(lengths, width: int):
    """[rows, width - 1] True at the positions a row of `lengths` tokens scores."""
    import numpy as np

    return np.arange(width - 1)[None, :] < (np.asarray(lengths)[:, None] - 1)


def drift_blocks(scored: dict, lengths=None, document=None, size: int = DRIFT_BLOCK) -> dict:
    """Per-block means (blocks of at most `size` consecutive scored positions within one row, so within one
    document; a row's last block may be shorter) of the per-position NLL and, given a reference, KL, with each
    block's row (`sequence`), document id and number of positions: what compare resamples, by document, for
    the drift rules' intervals."""
    nll, kl = scored["nll"], scored.get("kl")
    n_seq, n_pos = nll.shape
    lengths = [n_pos + 1] * n_seq if lengths is None else [int(n) for n in lengths]
    document = [f"#{s}" for s in range(n_seq)] if document is None else [str(d) for d in document]
    out: dict[str, Any] = {"size": size, "sequence": [], "document": [], "positions": [], "nll": [], "kl": []}
    for s in range(n_seq):
        scored_here = lengths[s] - 1
        for b in range(0, scored_here, size):
            e = min(b + size, scored_here)
            out["sequence"].append(s)
            out["document"].append(document[s])
            out["positions"].append(e - b)
            out["nll"].append(round(float(nll[s, b:e].mean()), 6))
            if kl is not None:
                out["kl"].append(round(float(kl[s, b:e].mean()), 7))
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


TOPK_ARRAYS = ("input_ids", "lengths", "document", "topk_logp", "topk_idx", "tail_logp")
NO_DOCUMENTS = "no document ids (written by an older forgetcheck)"


def read_topk(npz: Path) -> tuple[dict | None, str | None]:
    """(arrays, None) of a top-k file as `measure_drift` writes it, every array read whole and the shapes
    agreeing with each other; (None, why) when it is damaged or not one (never unpickled), or when it is an
    older file without document ids (why: `NO_DOCUMENTS`)."""
    import zipfile

    import numpy as np

    try:
        with np.load(npz, allow_pickle=False) as z:
            missing = [k for k in TOPK_ARRAYS if k not in z.files]
            if missing and {"lengths", "document"} & set(missing) and "input_ids" in z.files:
                return None, NO_DOCUMENTS
            if missing:
                return None, f"no {missing[0]} array"
            data = {k: z[k] for k in TOPK_ARRAYS}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        return None, f"not a readable .npz: {type(e).__name__}"
    ids = data["input_ids"]
    if ids.ndim != 2 or ids.shape[1] < 2 or ids.dtype.kind not in "iu":
        return None, f"input_ids has shape {ids.shape} ({ids.dtype})"
    n_seq, width = ids.shape
    lengths, document = data["lengths"], data["document"]
    if lengths.shape != (n_seq,) or lengths.dtype.kind not in "iu" or (n_seq and (
            int(lengths.min()) < 2 or int(lengths.max()) > width)):
        return None, f"lengths has shape {lengths.shape} ({lengths.dtype}) or a length outside [2, {width}]"
    if document.shape != (n_seq,) or document.dtype.kind != "U":
        return None, f"document has shape {document.shape} ({document.dtype})"
    positions = (n_seq, width - 1)
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
    if why == NO_DOCUMENTS:
        raise BadInput(f"--reference {path}: its top-k distribution file {npz} has {why}, so the drift blocks "
                       f"cannot be resampled by document; re-run `forgetcheck eval` on the reference model")
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
        text = {k: ref[k] for k in ("input_ids", "lengths", "document")}
        source = ref["text_source"]
        digest = hashlib.sha256(b"".join(text[k].tobytes() for k in ("input_ids", "lengths"))
                                + "\x00".join(text["document"].tolist()).encode())
    else:
        texts, docs, source = drift_text(specs, tasks_dir)
        text = None
        digest = hashlib.sha256("\x00".join(texts).encode() + b"\x01" + "\x00".join(docs).encode())
    d = cache_entry(kind="drift", model=mhash, k=DRIFT_TOP_K, layout=DRIFT_LAYOUT, docs=DRIFT_DOCS,
                    doc_tokens=DRIFT_DOC_TOKENS, pass_tokens=DRIFT_SEQ_LEN, blocks=DRIFT_BLOCK,
                    ref=ref["hash"] if ref else None, device=device.split(":")[0], dtype=dtype,
                    text=digest.hexdigest())
    t0 = time.perf_counter()
    drift = _cached_drift(d, ref is not None)
    if drift is not None:
        if ref is not None:  # the entry may be another run's: the reference is this run's own file
            drift["kl"] = {**drift["kl"], "reference": ref["model"], "reference_file": ref["file"]}
        console.detail(f"  drift: cache hit ({d})")
        timing = {"cached": True, "wall_s": round(time.perf_counter() - t0, 3)}
    else:
        model, tok = load_model()
        if text is None:
            text = drift_documents(tok, texts, docs)
            if text["input_ids"].size == 0:
                raise BadInput(f"the drift text ({source}) has no document of 2 tokens or more")
        ids, lengths = text["input_ids"], text["lengths"]
        if int(ids.max()) >= model.get_output_embeddings().weight.shape[0]:
            raise BadInput(f"--reference {ref['file']}: its token ids exceed this model's vocabulary; KL needs "
                           f"the same tokenizer as the reference model")
        scored = drift_pass(model, ids, device, ref, lengths)
        mask = scored_mask(lengths, ids.shape[1])
        nll = scored["nll"][mask]
        summary = {k: scored[k] for k in ("topk_logp", "topk_idx", "tail_logp")}
        n_pos = int(nll.size)
        drift = {"text": {"source": source, "documents": len(set(text["document"].tolist())),
                          "doc_tokens": DRIFT_DOC_TOKENS, "sequences": int(ids.shape[0]),
                          "seq_len": int(ids.shape[1]), "tokens_scored": n_pos},
                 "perplexity": float(np.exp(nll.mean())),
                 "mean_nll": float(nll.mean()),
                 "topk_mass": float(np.exp(summary["topk_logp"][mask]).sum(-1).mean()),
                 "blocks": drift_blocks(scored, lengths, text["document"])}
        if ref is not None:
            kl = scored["kl"][mask]
            ref_mass = float(np.exp(ref["topk_logp"][mask]).sum(-1).mean())
            drift["kl"] = {
                "reference": ref["model"], "reference_file": ref["file"],
                "mean": float(kl.mean()), "median": float(np.median(kl)),
                "p95": float(np.quantile(kl, 0.95)), "max": float(kl.max()),
                "unit": "nats per token",
                "method": (f"KL(reference || model) of the next-token distribution over the reference's top-"
                           f"{DRIFT_TOP_K} tokens plus one bin for the remaining mass, averaged over {n_pos} "
                           f"positions; merging the tail into one bin makes this a lower bound of the exact KL "
                           f"(the reference's top-{DRIFT_TOP_K} mass is {ref_mass:.3f} here; docs/verdicts.md, "
                           f"\"The drift text and the KL bound\", has the measured gap)"),
            }
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".topk.{os.getpid()}.tmp.npz"
        np.savez_compressed(tmp, **text, **summary)
        tmp.replace(d / "topk.npz")
        atomic_write_json(d / "drift.json", drift)
        timing = {"cached": False, "wall_s": round(time.perf_counter() - t0, 3)}
        console.detail(f"  drift: {n_pos} positions in {timing['wall_s']:.1f} s")
    npz_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(d / "topk.npz", npz_path)
    return {**drift, "topk_file": npz_path.name, "top_k": DRIFT_TOP_K}, timing
