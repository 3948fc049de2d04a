"""The statistics behind compare and gate: paired estimates whose interval and test come from one method.

Every estimate is a difference in points (or percent, or nats) with a centre and a standard error, and every
interval, p-value and bound is computed from that pair with the normal quantile, so an interval that excludes
a value always comes with a test that rejects it at the same level (and back); `Estimate` is the one place
where that happens. How the centre and standard error are obtained depends on the data (docs/verdicts.md):

- 0/1 scores of the same items under two models (accuracy): the Bonett-Price adjusted Wald interval for a
  difference of paired proportions (Bonett & Price 2012, "Adjusted Wald confidence interval for a difference
  of binomial proportions based on paired data"): one pseudo-observation is added to each discordant cell and
  two to the sample size, which keeps the coverage near nominal at n = 50 where the plain Wald interval and the
  exact McNemar test disagree. When items share a source (`clusters`), the variance is multiplied by the design
  effect (cluster-robust over item-level variance of the paired differences, within strata, at least 1).
- continuous per-item scores (soft accuracy: the probability the model gives the correct choice) and ratios
  (perplexity, bits per byte, KL): a cluster bootstrap within strata (clusters of items resampled with
  replacement inside each stratum; the same resampled clusters for both models, so the pairing is kept)
  gives the standard error; the centre is the plain estimate.
- a mean over tasks (a suite): the tasks' items are disjoint and independent, so the variance of the mean of
  the task deltas is the sum of the task variances over the squared task count.
- several training seeds per arm (`--seeds K`): a two-level bootstrap (`two_level_diff`). Each resample draws
  K training runs with replacement, then item clusters with replacement within each task (the same items for
  every run, so the pairing is kept); the statistic is the mean over tasks of the difference of the drawn
  runs' mean scores. Its spread holds both the seed-to-seed and the item-to-item variation, so a comparison
  of two arms is a statement about the methods, not about one training run each.

One-sided bounds at level 1 - alpha (used by the gate) are the ends of the two-sided 1 - 2 alpha interval.
Every one of these intervals is a large-sample interval: with a handful of paired units (clusters, items or drift
blocks) the bootstrap standard error shrinks to nothing (0 for one item, or whenever every unit moved by the same
amount) and the normal quantile is too narrow, so an estimate from fewer than `MIN_PAIRED` units, or with zero
spread around a change, says so (`Estimate.evidence_gap`) and the gate decides nothing from it.
Power: a change of zero is ruled out at margin M with 80% power when M >= (z_{1-alpha} + z_{0.8}) * se;
that margin is the minimal detectable drop (MDE), and since se shrinks as 1/sqrt(n) the items needed to decide
at margin M are n * (MDE / M)^2.

Pure numpy/scipy; no torch.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.stats import binom, norm

POWER = 0.8
MIN_PAIRED = 6
"""Fewest paired units (clusters of items, else items; blocks of the drift text) an estimate needs before a rule
may PASS or FAIL on it: from 6 on, a one-sided 95% bound from the plug-in bootstrap standard error and the normal
quantile errs at most twice as often as it should for normally distributed differences (9.7% at 6, 10.8% at 5,
15.6% at 3; docs/verdicts.md, "Small samples")."""


def z(q: float) -> float:
    return float(norm.ppf(q))


@dataclass(frozen=True)
class Estimate:
    """A difference (positive = better for the arm) with its centre and standard error.

    point:  the plain estimate (what the report prints as the change);
    center: where the interval is centred (Bonett-Price's adjusted difference; else `point`);
    se:     standard error of `center` (0 when every resample agrees, e.g. an unchanged copy).
    """

    point: float
    center: float
    se: float
    method: str
    n: int
    clusters: int | None = None
    extra: dict = field(default_factory=dict)

    # -- intervals and tests from (center, se) only --------------------------------------------------------
    def ci(self, alpha: float) -> list[float]:
        h = z(1 - alpha / 2) * self.se
        return [self.center - h + 0.0, self.center + h + 0.0]

    def lower(self, alpha: float) -> float:
        """One-sided (1 - alpha) lower bound of the difference."""
        return self.center - z(1 - alpha) * self.se + 0.0

    def upper(self, alpha: float) -> float:
        return self.center + z(1 - alpha) * self.se + 0.0

    def p_zero(self) -> float:
        """Two-sided p-value of 'no difference' (< alpha exactly when `ci(alpha)` excludes 0)."""
        return _p_two_sided(self.center, self.se)

    def p_above(self, value: float) -> float:
        """One-sided p-value of H0 'difference >= value' (small: the difference is below `value`).
        < alpha exactly when `upper(alpha)` < value."""
        return _p_less(self.center - value, self.se)

    def p_below(self, value: float) -> float:
        """One-sided p-value of H0 'difference <= value' (small: the difference is above `value`).
        < alpha exactly when `lower(alpha)` > value."""
        return _p_less(value - self.center, self.se)

    def mde(self, alpha: float, power: float = POWER) -> float:
        """Smallest margin a true change of zero is ruled out at, with `power`."""
        return (z(1 - alpha) + z(power)) * self.se

    def items_needed(self, margin: float, alpha: float, power: float = POWER) -> int | None:
        """Items (same design) at which the MDE equals `margin` (None when it cannot be said); with fewer than
        `MIN_PAIRED` units, never fewer items than hold that many."""
        if margin <= 0 or self.n <= 0:
            return None
        m = self.mde(alpha, power)
        need = self.n if m == 0 else int(math.ceil(self.n * (m / margin) ** 2))
        if self.units < MIN_PAIRED:
            need = max(need, int(math.ceil(MIN_PAIRED * self.n / max(self.units, 1))))
        return need

    # -- whether the estimate can decide at all -----------------------------------------------------------
    @property
    def units(self) -> int:
        """The independent paired units the standard error rests on: clusters when items share a source."""
        return self.clusters if self.clusters is not None else self.n

    def evidence_gap(self, unit: str = "paired item(s)") -> str | None:
        """Why no rule may PASS or FAIL on this estimate ("not enough evidence: ..."), or None when it may:
        fewer than `MIN_PAIRED` units (`unit` names them), or no spread at all around a change (every unit
        moved by exactly the same amount: the interval has zero width). No spread around no change (every unit
        exactly as the base's, e.g. an unchanged copy) is not a gap: the interval [0, 0] is what the data say."""
        what = f"{self.units} cluster(s) of paired items" if self.clusters is not None else f"{self.n} {unit}"
        if self.units < MIN_PAIRED:
            return (f"not enough evidence: {what}, fewer than the minimum of {MIN_PAIRED} a rule needs to PASS or "
                    'FAIL (docs/verdicts.md, "Small samples")')
        if self.se <= 0 and self.center != 0:
            return (f"not enough evidence: each of the {what} moved by exactly {self.center:+.3g}, so the spread "
                    'is zero and the interval has no width (docs/verdicts.md, "Small samples")')
        return None

    def to_dict(self, alpha: float) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        d.update(extra)
        d["ci"] = self.ci(alpha)
        d["p_value"] = self.p_zero()
        d["mde"] = self.mde(alpha)
        return d


def estimate_from_dict(d: dict) -> Estimate:
    return Estimate(point=float(d["point"]), center=float(d["center"]), se=float(d["se"]), method=d["method"],
                    n=int(d["n"] or 0), clusters=d["clusters"])


def _p_less(diff: float, se: float) -> float:
    """P(N(0,1) >= -diff/se): the one-sided p of H0 'diff >= 0' against 'diff < 0'."""
    if se <= 0:
        return 0.0 if diff < 0 else 1.0
    return float(norm.sf(-diff / se))


def _p_two_sided(center: float, se: float) -> float:
    if se <= 0:
        return 1.0 if center == 0 else 0.0
    return float(min(1.0, 2 * norm.sf(abs(center) / se)))


# ---- paired 0/1 scores -------------------------------------------------------------------------------------

def design_effect(d: np.ndarray, clusters: np.ndarray | None, strata: np.ndarray | None = None) -> float:
    """Cluster-robust over item-level variance of the mean of `d` (within strata), at least 1."""
    if clusters is None or len(d) < 2:
        return 1.0
    strata = np.zeros(len(d), dtype=int) if strata is None else strata
    v_item = v_clu = 0.0
    for s in np.unique(strata):
        m = strata == s
        ds, cs = d[m], clusters[m]
        n_h = len(ds)
        if n_h < 2:
            continue
        mu = ds.mean()
        v_item += n_h / (n_h - 1) * float(((ds - mu) ** 2).sum())
        _, inv = np.unique(cs, return_inverse=True)
        tot = np.bincount(inv, weights=ds - mu)
        g = len(tot)
        if g >= 2:
            v_clu += g / (g - 1) * float((tot ** 2).sum())
    if v_item <= 0:
        return 1.0
    return max(1.0, v_clu / v_item)


def paired_binary(base: np.ndarray, arm: np.ndarray, clusters: np.ndarray | None = None, *,
                  scale: float = 100.0) -> Estimate:
    """Bonett-Price adjusted Wald estimate of mean(arm) - mean(base) for 0/1 scores of the same items."""
    b = np.asarray(base, dtype=bool)
    a = np.asarray(arm, dtype=bool)
    n = len(b)
    r2w = int(np.count_nonzero(b & ~a))  # right -> wrong
    w2r = int(np.count_nonzero(~b & a))
    p_r2w, p_w2r = (r2w + 1) / (n + 2), (w2r + 1) / (n + 2)
    center = p_w2r - p_r2w
    var = max(p_r2w + p_w2r - center ** 2, 0.0) / (n + 2)
    deff = design_effect(a.astype(float) - b.astype(float), clusters)
    se = math.sqrt(var * deff)
    point = (w2r - r2w) / n if n else 0.0
    n_clu = int(len(np.unique(clusters))) if clusters is not None else None
    return Estimate(point=point * scale + 0.0, center=center * scale + 0.0, se=se * scale, method="bonett_price",
                    n=n, clusters=n_clu, extra={"design_effect": round(deff, 4),
                                                 "flips": {"right_to_wrong": r2w, "wrong_to_right": w2r}})


# ---- cluster bootstrap -------------------------------------------------------------------------------------

def stable_seed(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(parts).encode()).digest()[:8], "little")


def cluster_weights(clusters: np.ndarray | None, n: int, n_boot: int, rng: np.random.Generator,
                    strata: np.ndarray | None = None) -> np.ndarray:
    """[n_boot, n] multiplicity of each item in each resample: clusters drawn with replacement inside each
    stratum (every item of a drawn cluster counts once per draw)."""
    cl = np.arange(n) if clusters is None else np.asarray(clusters)
    st = np.zeros(n, dtype=int) if strata is None else np.asarray(strata)
    w = np.zeros((n_boot, n))
    for s in np.unique(st):
        idx = np.flatnonzero(st == s)
        _, inv = np.unique(cl[idx], return_inverse=True)
        g = int(inv.max()) + 1
        draws = rng.integers(0, g, size=(n_boot, g))
        counts = np.zeros((n_boot, g))
        np.add.at(counts, (np.repeat(np.arange(n_boot), g), draws.ravel()), 1.0)
        w[:, idx] = counts[:, inv]
    return w


def bootstrap_se(stat, arrays: dict[str, np.ndarray], *, clusters=None, strata=None, n_boot: int = 1000,
                 seed: int = 0, key: str = "") -> float:
    """Standard error of `stat(weights, arrays)` over cluster-bootstrap resamples. `stat` takes item weights
    [n_boot, n] (or [n] of ones for the point) and returns one value per row."""
    n = len(next(iter(arrays.values())))
    rng = np.random.default_rng([seed, stable_seed(key)])
    reps = []
    chunk = max(1, 2_000_000 // max(n, 1))
    done = 0
    while done < n_boot:
        k = min(chunk, n_boot - done)
        reps.append(stat(cluster_weights(clusters, n, k, rng, strata), arrays))
        done += k
    r = np.concatenate(reps)
    sd = float(np.std(r, ddof=1)) if len(r) > 1 else 0.0
    return 0.0 if sd < 1e-12 else sd


def paired_mean(base: np.ndarray, arm: np.ndarray, clusters=None, *, scale: float = 100.0, n_boot: int = 1000,
                seed: int = 0, key: str = "") -> Estimate:
    """mean(arm) - mean(base) of continuous per-item scores; se by cluster bootstrap."""
    d = (np.asarray(arm, float) - np.asarray(base, float)) * scale

    def stat(w, arr):
        return (w @ arr["d"]) / w.sum(axis=1)

    se = bootstrap_se(stat, {"d": d}, clusters=clusters, n_boot=n_boot, seed=seed, key=key)
    point = float(d.mean()) + 0.0 if len(d) else 0.0
    n_clu = int(len(np.unique(clusters))) if clusters is not None else None
    return Estimate(point=point, center=point, se=se, method="cluster_bootstrap", n=len(d), clusters=n_clu)


def ratio_rise(base_num: np.ndarray, arm_num: np.ndarray, denom: np.ndarray | None = None, clusters=None, *,
               n_boot: int = 1000, seed: int = 0, key: str = "") -> Estimate:
    """Relative rise in percent of sum(arm_num)/sum(denom) over sum(base_num)/sum(denom) (the denominators
    cancel for paired items, e.g. bits per byte over the same bytes); se by cluster bootstrap."""
    bn, an = np.asarray(base_num, float), np.asarray(arm_num, float)

    def stat(w, arr):
        return ((w @ arr["a"]) / (w @ arr["b"]) - 1.0) * 100.0

    point = float((an.sum() / bn.sum() - 1.0) * 100.0) + 0.0
    se = bootstrap_se(stat, {"a": an, "b": bn}, clusters=clusters, n_boot=n_boot, seed=seed, key=key)
    n_clu = int(len(np.unique(clusters))) if clusters is not None else None
    return Estimate(point=point, center=point, se=se, method="cluster_bootstrap", n=len(bn), clusters=n_clu)


def mean_of(values: np.ndarray, clusters=None, *, n_boot: int = 1000, seed: int = 0, key: str = "") -> Estimate:
    """Mean of per-unit values (e.g. KL per block of positions); se by cluster bootstrap."""
    v = np.asarray(values, float)

    def stat(w, arr):
        return (w @ arr["v"]) / w.sum(axis=1)

    se = bootstrap_se(stat, {"v": v}, clusters=clusters, n_boot=n_boot, seed=seed, key=key)
    point = float(v.mean()) + 0.0
    n_clu = int(len(np.unique(clusters))) if clusters is not None else None
    return Estimate(point=point, center=point, se=se, method="cluster_bootstrap", n=len(v), clusters=n_clu)


def two_level_diff(a: list[np.ndarray], b: list[np.ndarray], clusters: list[np.ndarray | None] | None = None, *,
                   scale: float = 100.0, n_boot: int = 2000, seed: int = 0, key: str = "") -> Estimate:
    """Mean over tasks of (mean score of side a's runs - mean score of side b's runs), with a two-level
    bootstrap standard error (runs drawn with replacement on each side, then item clusters within each task).
    `a[t]`, `b[t]`: [runs, items] per-item scores of task t, the same items in the same order on both sides
    (b may be the base: one run). `clusters[t]`: cluster id per item of task t, or None (items independent)."""
    if not a or len(a) != len(b):
        raise ValueError("two_level_diff needs the same tasks on both sides")
    a = [np.atleast_2d(np.asarray(x, float)) for x in a]
    b = [np.atleast_2d(np.asarray(x, float)) for x in b]
    clusters = clusters or [None] * len(a)
    ka, kb, n_tasks = a[0].shape[0], b[0].shape[0], len(a)
    point = float(np.mean([x.mean() - y.mean() for x, y in zip(a, b)]) * scale) + 0.0
    rng = np.random.default_rng([seed, stable_seed(key)])
    wa = rng.multinomial(ka, np.full(ka, 1.0 / ka), size=n_boot) / ka  # [n_boot, runs]: weight of each run
    wb = rng.multinomial(kb, np.full(kb, 1.0 / kb), size=n_boot) / kb
    reps = np.zeros(n_boot)
    for x, y, cl in zip(a, b, clusters):
        w = cluster_weights(cl, x.shape[1], n_boot, rng)
        w /= w.sum(axis=1, keepdims=True)
        reps += ((w @ x.T) * wa).sum(axis=1) - ((w @ y.T) * wb).sum(axis=1)
    reps *= scale / n_tasks
    sd = float(np.std(reps, ddof=1)) if n_boot > 1 else 0.0
    return Estimate(point=point, center=point, se=0.0 if sd < 1e-12 else sd, method="two_level_bootstrap",
                    n=min(x.shape[1] for x in a), extra={"n_tasks": n_tasks, "runs": [ka, kb]})


def mean_of_estimates(ests: list[Estimate]) -> Estimate:
    """Mean of independent estimates (disjoint item sets): variances summed over the squared count."""
    k = len(ests)
    return Estimate(point=sum(e.point for e in ests) / k + 0.0, center=sum(e.center for e in ests) / k + 0.0,
                    se=math.sqrt(sum(e.se ** 2 for e in ests)) / k, method="mean_of_tasks",
                    n=min(e.n for e in ests), extra={"n_tasks": k})


# ---- multiplicity, chance --------------------------------------------------------------------------------

def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1)."""
    order = sorted(pvalues, key=lambda k: (pvalues[k], k))
    m, running, out = len(order), 0.0, {}
    for i, key in enumerate(order):
        running = max(running, min(1.0, (m - i) * pvalues[key]))
        out[key] = running
    return out


def above_chance_p(correct: int, n: int, chance: float) -> float:
    """Exact one-sided binomial p-value of 'the score is at or below chance' (small: clearly above chance)."""
    if n <= 0:
        return 1.0
    return float(binom.sf(correct - 1, n, chance))


def soft_scores(loglikelihoods: list, target) -> float | None:
    """Probability (0..1) the model puts on the correct choice among the choices: softmax of the choices'
    log-likelihoods at the target. None when the target is not one choice index."""
    if not loglikelihoods or isinstance(target, bool) or not isinstance(target, (int, np.integer)):
        return None
    try:
        ll = np.array([float(x[0]) if isinstance(x, (list, tuple)) else float(x) for x in loglikelihoods])
    except (TypeError, ValueError):
        return None
    if not 0 <= target < len(ll) or not np.isfinite(ll).all():
        return None
    ll = ll - ll.max()
    p = np.exp(ll)
    return float(p[int(target)] / p.sum())


def round_up(n: int) -> int:
    """Up to two significant digits (482 -> 490, 12345 -> 13000)."""
    if n < 100:
        return int(n)
    mag = 10 ** (len(str(int(n))) - 2)
    return int(math.ceil(n / mag) * mag)
