"""Forgetting while it happens: cheap signals measured at points during training, on fixed items chosen once.

A `CurveReference` is built once from the base model (`build_reference`): its top-k next-token distribution
(eval/drift.py's machinery) on general text and on held-out domain text, its bits per byte on both, and its soft
accuracy on a small fixed set of retention multiple-choice items (`choose_items`). At each point
(`measure_point`) the current model is scored on the same tokens and items, giving a `CurvePoint`:

* `kl_general`, `kl_domain`: KL(base || model) of the next-token distribution, nats per token, averaged over
  the positions (eval/drift.py's top-k + tail-bin bound, exactly 0 for the unchanged model);
* `bpb_general`, `bpb_domain`: bits per byte, the summed next-token NLL / ln 2 / the UTF-8 bytes of the scored
  tokens' decoded text;
* `soft_acc`: mean probability on the correct choice among the choices (softmax of the choices' summed
  log-likelihoods, scored by forgetcheck.eval.fast_lm's lm-eval backend), in points (0-100).

A `Curve` (one arm's points, the base values, the plan) is written as JSON (`write_curve`, schema_version
`CURVE_VERSION`, kind "curve") and read back checked (`read_curve`). `Curve.forgetting` turns a signal into
the forgetting series that train/forecast.py fits. train/curve.py schedules the points and bounds their cost
(`curve_steps`, `plan_sizes`). See docs/curves.md.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from forgetcheck.errors import BadInput
from forgetcheck.eval.drift import DRIFT_TOP_K, drift_pass, drift_token_ids
from forgetcheck.rundir import atomic_write_json, read_json
from forgetcheck.schema import CURVE_VERSION, check_versioned

CURVE_TOKENS = 1024  # tokens of general text and of domain text scored at each point
CURVE_SEQ_LEN = 256
CURVE_ITEMS = 32  # retention multiple-choice items scored at each point
MIN_TOKENS = 256
MIN_ITEMS = 8
MAX_OVERHEAD = 0.25  # all points together, as a fraction of the arm's training time
SIGNALS = ("kl_general", "kl_domain", "bpb_general", "bpb_domain", "soft_acc")
_FIX = "re-run training with curves enabled to write it again"


# ---- the fixed items -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MCItem:
    """One multiple-choice item as the model scores it: `choices` are the continuations of `context`
    (with their leading delimiter, e.g. " Paris", as lm-eval builds them), `target` the right one's index."""

    pool: str
    context: str
    choices: tuple[str, ...]
    target: int


def choose_items(pools: Mapping[str, Sequence[tuple[str, Sequence[str], int]]], n_items: int = CURVE_ITEMS,
                 seed: int = 0) -> list[MCItem]:
    """`n_items` items drawn from the pools ({name: [(context, choices, target), ...]}), the same for the
    same input and seed: each pool is shuffled by its own seeded generator (seed and the pool's name), and
    the pools are taken in turn, in name order, so every pool is represented as evenly as its size allows."""
    import numpy as np

    if n_items < 1:
        raise BadInput(f"curve items: n_items must be >= 1 (got {n_items}); ask for at least one item")
    orders: list[list[MCItem]] = []
    for name in sorted(pools):
        items = []
        for i, triple in enumerate(pools[name]):
            try:
                context, choices, target = triple
                choices, target = tuple(str(c) for c in choices), int(target)
            except (TypeError, ValueError):
                raise BadInput(f"curve items: pool {name!r} item {i} is not a (context, choices, target) triple; "
                               f"give each item as such a triple") from None
            if len(choices) < 2 or not 0 <= target < len(choices):
                raise BadInput(f"curve items: pool {name!r} item {i} has {len(choices)} choices and target "
                               f"{target}; give at least two choices and a target index among them")
            items.append(MCItem(name, str(context), choices, target))
        rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
        orders.append([items[j] for j in rng.permutation(len(items))])
    if not any(orders):
        raise BadInput("curve items: every pool is empty; give at least one retention multiple-choice item")
    out: list[MCItem] = []
    depth = 0
    while len(out) < n_items and any(depth < len(o) for o in orders):
        out.extend(o[depth] for o in orders if depth < len(o))
        depth += 1
    return out[:n_items]


# ---- the base reference ----------------------------------------------------------------------------------

@dataclass
class CurveReference:
    """What the base model gives once: per text kind ("general", "domain") the token rows `input_ids`, the
    top-k summary (`topk_logp`, `topk_idx`, `tail_logp`) and `n_bytes` (UTF-8 bytes of the scored tokens);
    the fixed items; and the base model's own signal values (`base`)."""

    texts: dict[str, dict]
    items: list[MCItem]
    base: dict = field(default_factory=dict)
    top_k: int = DRIFT_TOP_K
    _lm: Any = field(default=None, repr=False, compare=False)  # (model, FastLM) kept between points


def _model_device(model) -> str:
    return str(next(model.parameters()).device)


class _EvalMode:
    """The model in eval mode (no dropout) while measuring; its training mode restored afterwards."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def _bytes_scored(tok, ids) -> int:
    return sum(len(tok.decode([int(t) for t in row[1:]]).encode("utf-8")) for row in ids)


def build_reference(model, tok, general_texts: Sequence[str], domain_texts: Sequence[str],
                    items: Sequence[MCItem], *, n_tokens: int = CURVE_TOKENS, seq_len: int = CURVE_SEQ_LEN,
                    batch_size: int = 16) -> CurveReference:
    """Score the base model once: the reference every point is compared with."""
    import numpy as np

    texts: dict[str, dict] = {}
    device = _model_device(model)
    with _EvalMode(model):
        for kind, src in (("general", general_texts), ("domain", domain_texts)):
            if not src or not any(str(t).strip() for t in src):
                raise BadInput(f"curves: no {kind} text given; give at least a paragraph of {kind} text")
            ids = drift_token_ids(tok, [str(t) for t in src], n_tokens=n_tokens, seq_len=seq_len)
            if ids.size == 0 or ids.shape[1] < 2:
                raise BadInput(f"curves: the {kind} text is too short to score; give at least a sentence")
            scored = drift_pass(model, ids, device)
            texts[kind] = {"input_ids": ids, "n_bytes": _bytes_scored(tok, ids),
                           **{k: scored[k] for k in ("topk_logp", "topk_idx", "tail_logp")},
                           "_nll_sum": float(np.sum(scored["nll"]))}
        ref = CurveReference(texts=texts, items=list(items))
        soft = soft_accuracy(model, tok, ref.items, batch_size=batch_size, ref=ref)
    ref.base = {"bpb_general": _bpb(texts["general"]["_nll_sum"], texts["general"]["n_bytes"]),
                "bpb_domain": _bpb(texts["domain"]["_nll_sum"], texts["domain"]["n_bytes"]),
                "kl_general": 0.0, "kl_domain": 0.0, "soft_acc": soft}
    return ref


def _bpb(nll_sum: float, n_bytes: int) -> float:
    return nll_sum / math.log(2) / max(n_bytes, 1)


def soft_accuracy(model, tok, items: Sequence[MCItem], batch_size: int = 16,
                  ref: CurveReference | None = None) -> float | None:
    """Mean probability (in points, 0-100) on each item's right choice, the probabilities being the softmax
    of the choices' summed log-likelihoods, scored by lm-eval's loglikelihood through forgetcheck.eval.fast_lm
    (each context run once for all its choices). None without items. Given `ref`, the lm-eval wrapper of
    this model object is kept there and reused at the next point (it reads the model's current weights)."""
    if not items:
        return None
    import numpy as np
    from lm_eval.api.instance import Instance

    from forgetcheck.eval.fast_lm import FastLM

    if ref is not None and ref._lm is not None and ref._lm[0] is model:
        lm = ref._lm[1]
    else:
        lm = FastLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
        if ref is not None:
            ref._lm = (model, lm)
    requests, spans = [], []
    for it in items:
        spans.append((len(requests), len(it.choices)))
        requests += [Instance("loglikelihood", {}, (it.context, c), len(requests)) for c in it.choices]
    lls = np.array([ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)], dtype=float)
    probs = []
    for (start, n), it in zip(spans, items):
        x = lls[start: start + n]
        p = np.exp(x - x.max())
        probs.append(p[it.target] / p.sum())
    return float(100.0 * np.mean(probs))


# ---- one point ---------------------------------------------------------------------------------------------

@dataclass
class CurvePoint:
    """The signals at one point of training (after `step` optimizer steps, `tokens` training tokens seen).
    `train_loss`: the caller's (smoothed) training loss there, None at step 0. `measure_s`: seconds spent
    measuring this point."""

    tokens: int
    step: int
    train_loss: float | None
    kl_general: float
    kl_domain: float
    bpb_general: float
    bpb_domain: float
    soft_acc: float | None
    measure_s: float


def measure_point(model, tok, ref: CurveReference, *, tokens: int, step: int, train_loss: float | None = None,
                  batch_size: int = 16) -> CurvePoint:
    """Score the current model on the reference's tokens and items (in eval mode, no gradients; the
    model's training mode is restored)."""
    import numpy as np

    t0 = time.perf_counter()
    device = _model_device(model)
    out: dict[str, Any] = {}
    with _EvalMode(model):
        for kind, r in ref.texts.items():
            scored = drift_pass(model, r["input_ids"], device, r)
            out[f"kl_{kind}"] = float(np.mean(scored["kl"]))
            out[f"bpb_{kind}"] = _bpb(float(np.sum(scored["nll"])), r["n_bytes"])
        soft = soft_accuracy(model, tok, ref.items, batch_size=batch_size, ref=ref)
    return CurvePoint(tokens=int(tokens), step=int(step), train_loss=None if train_loss is None else float(train_loss),
                      soft_acc=soft, measure_s=round(time.perf_counter() - t0, 4), **out)


# ---- the curve file ----------------------------------------------------------------------------------------

@dataclass
class Curve:
    """One arm's points, in order of tokens; `base` the base model's signal values; `meta` how it was
    measured (token and item counts, the budget, the schedule)."""

    arm: str
    points: list[CurvePoint] = field(default_factory=list)
    base: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"schema_version": CURVE_VERSION, "kind": "curve", "arm": self.arm, "base": self.base,
                "meta": self.meta, "points": [asdict(p) for p in self.points]}

    @classmethod
    def from_dict(cls, obj: Any, where: str = "curve") -> Curve:
        check_versioned(obj, "curve", CURVE_VERSION, where, _FIX)
        names = {f.name for f in fields(CurvePoint)}
        points = []
        for i, p in enumerate(obj.get("points") or []):
            if not isinstance(p, dict) or set(p) != names:
                raise BadInput(f"{where}: point {i} does not have the fields {sorted(names)}; {_FIX}")
            points.append(CurvePoint(**p))
        if not isinstance(obj.get("arm"), str):
            raise BadInput(f"{where}: no arm name; {_FIX}")
        return cls(arm=obj["arm"], points=points, base=dict(obj.get("base") or {}), meta=dict(obj.get("meta") or {}))

    def forgetting(self, signal: str = "soft_acc"):
        """(tokens, forgetting, train losses) as numpy arrays, forgetting measured from the base in the
        direction that means worse: soft_acc base − value (points), bpb value − base, KL the value. A point
        without the signal is left out."""
        import numpy as np

        if signal not in SIGNALS:
            raise BadInput(f"curve signal {signal!r} unknown; choose one of {', '.join(SIGNALS)}")
        base = float(self.base.get(signal, 0.0) or 0.0)
        rows = [(p.tokens, getattr(p, signal), p.train_loss) for p in sorted(self.points, key=lambda p: p.tokens)
                if getattr(p, signal) is not None]
        t = np.array([r[0] for r in rows], dtype=float)
        v = np.array([r[1] for r in rows], dtype=float)
        loss = np.array([np.nan if r[2] is None else r[2] for r in rows], dtype=float)
        return t, worse(signal, v, base), loss

    def forgetting_with_kl(self, signal: str):
        """(tokens, forgetting on `signal`, KL on domain text) of the points that measured both, as `forgetting`
        (forecast.forecast_forms fits these: the map through KL pairs them point by point)."""
        import numpy as np

        pts = [p for p in sorted(self.points, key=lambda p: p.tokens)
               if getattr(p, signal) is not None and p.kl_domain is not None]
        base = float(self.base.get(signal, 0.0) or 0.0)
        return (np.array([p.tokens for p in pts], dtype=float),
                worse(signal, np.array([getattr(p, signal) for p in pts], dtype=float), base),
                np.array([p.kl_domain for p in pts], dtype=float))


def worse(signal: str, value, base):
    """A signal's change from the base in the direction that means worse (numbers or numpy arrays): soft_acc
    base − value (points lost), bits per byte value − base, KL the value itself."""
    if signal == "soft_acc":
        return base - value
    return value - base if signal.startswith("bpb") else value


def write_curve(path: Path, curve: Curve) -> None:
    atomic_write_json(Path(path), curve.to_dict())


def read_curve(path: Path) -> Curve:
    return Curve.from_dict(read_json(Path(path)), str(path))
