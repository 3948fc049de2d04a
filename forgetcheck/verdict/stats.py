"""The statistics behind compare and gate: paired estimates whose interval and test come from one method.

Every estimate is a difference in points (or percent, or nats) with a centre, a standard error and, where the
standard error is estimated from the data's own units, its degrees of freedom; every interval, p-value and bound
is computed from those with the normal or Student t quantile, so an interval that excludes a value always comes
with a test that rejects it at the same level (and back); `Estimate` is the one place where that happens. How
the centre and standard error are obtained depends on the data (docs/verdicts.md):

- 0/1 scores of the same items under two models (accuracy): the Bonett-Price adjusted Wald interval for a
  difference of paired proportions (Bonett & Price 2012, "Adjusted Wald confidence interval for a difference
  of binomial proportions based on paired data"): one pseudo-observation is added to each discordant cell and
  two to the sample size, which keeps the coverage near nominal at n = 50 where the plain Wald interval and the
  exact McNemar test disagree. When items share a source (`clusters`), the variance is multiplied by the design
  effect (cluster-robust over item-level variance of the paired differences, within strata, at least 1).
- continuous per-item scores (soft accuracy: the probability the model gives the correct choice), per-block
  values (KL) and ratios (bits per byte): the cluster-robust (CR1) standard error of the mean over items, i.e.
  the unbiased standard error of the mean of the G cluster totals (clusters: items that share a source,
  documents of the drift text; each item its own cluster otherwise), with a Student t quantile at G - 1 degrees
  of freedom; a ratio is linearised first (delta method). This is exact for normally distributed cluster totals
  at every G, where the plug-in bootstrap standard error with the normal quantile errs toward narrow intervals
  at small G.
- a mean over tasks (a suite): the tasks' items are disjoint and independent, so the variance of the mean of
  the task deltas is the sum of the task variances over the squared task count.
- several training seeds per arm (`--seeds K`): a two-level bootstrap (`two_level_diff`). Each resample draws
  K training runs with replacement, then item clusters with replacement within each task (the same items for
  every run, so the pairing is kept); the statistic is the mean over tasks of the difference of the drawn
  runs' mean scores. Its spread holds both the seed-to-seed and the item-to-item variation, so a comparison
  of two arms is a statement about the methods, not about one training run each.

PASS on a bounded score (soft accuracy) needs more than a large-sample interval: a drop carried by a few items
(a handful of facts forgotten outright) is missed by a sample that happens to hold none of them, and then every
interval built from the sample's spread rules it out. `bounded_upper` gives an upper bound of a mean that holds
for every distribution of per-unit changes within the score's range (a betting confidence bound, Waudby-Smith &
Ramdas 2023), which the gate's PASS uses; `pass_items` says how many units it needs.

One-sided bounds at level 1 - alpha (used by the gate) are the ends of the two-sided 1 - 2 alpha interval.
With a handful of paired units (clusters, items or drift documents) a standard error rests on almost nothing (0
for one item, or whenever every unit moved by the same amount), so an estimate from fewer than `MIN_PAIRED`
units, or with zero spread around a change, says so (`Estimate.evidence_gap`) and the gate decides nothing
from it.
Power: a change of zero is ruled out at margin M with 80% power when M >= (q_{1-alpha} + q_{0.8}) * se;
that margin is the minimal detectable drop (MDE), and since se shrinks as 1/sqrt(n) the items needed to decide
at margin M are n * (MDE / M)^2.

Pure numpy/scipy; no torch.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.stats import binom, norm
from scipy.stats import t as student_t

POWER = 0.8
MIN_PAIRED = 6
"""Fewest paired units (clusters of items, else items; documents of the drift text) an estimate needs before a rule
may PASS or FAIL on it. t at units - 1 df is exact for normal differences at any size, but not for skewed ones, and
Bonett-Price FAILs 4 items that all flipped at p = 0.017: below 6 the evidence is too thin to decide on
(docs/verdicts.md, "Small samples")."""


def z(q: float) -> float:
    return float(norm.ppf(q))


def quantile(q: float, df: int | None = None) -> float:
    """The normal quantile, or Student t's at `df` degrees of freedom."""
    return float(norm.ppf(q)) if df is None else float(student_t.ppf(q, df))


@dataclass(frozen=True)
class Estimate:
    """A difference (positive = better for the arm) with its centre and standard error.

    point:  the plain estimate (what the report prints as the change);
    center: where the interval is centred (Bonett-Price's adjusted difference; else `point`);
    se:     standard error of `center` (0 when every unit agrees, e.g. an unchanged copy);
    df:     degrees of freedom of `se` (clusters - 1) when it is estimated from the units' own spread: the
            quantiles are Student t's; None: the normal quantile (Bonett-Price, means over tasks, bootstraps).
    skew:   the sample skewness of the units' contributions to `center` (cluster totals of its linearisation),
            set for the drift estimates (KL per token and the perplexity rise: positive, right-skewed over
            documents): their bounds and tests then use Hall's skewness-corrected t (`_hall`), whose one-sided
            bounds keep their level where the plain t's do not (docs/verdicts.md, "Drift over documents").
            None: symmetric bounds.
    """

    point: float
    center: float
    se: float
    method: str
    n: int
    clusters: int | None = None
    df: int | None = None
    skew: float | None = None
    extra: dict = field(default_factory=dict)

    # -- intervals and tests from (center, se, df, skew) only ----------------------------------------------
    def q(self, level: float) -> float:
        return quantile(level, self.df)

    def _bound(self, level: float) -> float:
        """The value the difference exceeds with probability `level`'s complement: center - se * t where the
        (skew-corrected) statistic (center - truth) / se sits at its `level` quantile."""
        x = self.q(level)
        if self.skew and self.se > 0:
            x = _hall_inverse(x, self._hall_a())
        return self.center - x * self.se + 0.0

    def _hall_a(self) -> float:
        return float(self.skew) / (3.0 * math.sqrt(max(self.units, 1)))

    def _stat(self, diff: float) -> float:
        """(center - truth) / se on the scale the quantiles are read on (Hall's transform when skewed)."""
        t = diff / self.se
        return _hall(t, self._hall_a()) if self.skew else t

    def ci(self, alpha: float) -> list[float]:
        return [self._bound(1 - alpha / 2), self._bound(alpha / 2)]

    def lower(self, alpha: float) -> float:
        """One-sided (1 - alpha) lower bound of the difference."""
        return self._bound(1 - alpha)

    def upper(self, alpha: float) -> float:
        return self._bound(alpha)

    def p_zero(self) -> float:
        """Two-sided p-value of 'no difference' (< alpha exactly when `ci(alpha)` excludes 0)."""
        if self.se <= 0:
            return _p_two_sided(self.center, self.se, self.df)
        x = self._stat(self.center)
        return float(min(1.0, 2 * min(_sf(x, self.df), _sf(-x, self.df))))

    def p_above(self, value: float) -> float:
        """One-sided p-value of H0 'difference >= value' (small: the difference is below `value`).
        < alpha exactly when `upper(alpha)` < value."""
        if self.se <= 0:
            return _p_less(self.center - value, self.se, self.df)
        return _sf(-self._stat(self.center - value), self.df)

    def p_below(self, value: float) -> float:
        """One-sided p-value of H0 'difference <= value' (small: the difference is above `value`).
        < alpha exactly when `lower(alpha)` > value."""
        if self.se <= 0:
            return _p_less(value - self.center, self.se, self.df)
        return _sf(self._stat(self.center - value), self.df)

    def mde(self, alpha: float, power: float = POWER) -> float:
        """Smallest margin a true change of zero is ruled out at, with `power`."""
        return (self.q(1 - alpha) + self.q(power)) * self.se

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

    def evidence_gap(self, unit: str = "paired item(s)", cluster_unit: str = "cluster(s) of paired items") -> str | None:
        """Why no rule may PASS or FAIL on this estimate ("not enough evidence: ..."), or None when it may:
        fewer than `MIN_PAIRED` units (`unit` names them), or no spread at all around a change (every unit
        moved by exactly the same amount: the interval has zero width). No spread around no change (every unit
        exactly as the base's, e.g. an unchanged copy) is not a gap: the interval [0, 0] is what the data say."""
        what = f"{self.units} {cluster_unit}" if self.clusters is not None else f"{self.n} {unit}"
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
                    n=int(d["n"] or 0), clusters=d["clusters"],
                    df=d["df"] if "df" in d else None,  # no df: written before t quantiles, normal
                    skew=d.get("skew"))  # no skew: symmetric bounds, as before skew corrections


def _hall(t: float, a: float) -> float:
    """Hall's (1992) monotone transform of a studentised mean, t + a t^2 + a^2 t^3 / 3 + a / 2 with
    a = skewness / (3 sqrt(n)): it removes the statistic's skewness to the order that makes one-sided t bounds
    of a skewed mean err by a fraction of alpha (P. Hall, "On the removal of skewness by transformation",
    JRSS B 54, 1992). Written as ((1 + a t)^3 - 1) / (3a) + a / 2, monotone in t for every a."""
    if a == 0:
        return t
    return ((1.0 + a * t) ** 3 - 1.0) / (3.0 * a) + a / 2.0


def _hall_inverse(x: float, a: float) -> float:
    """The t at which `_hall(t, a)` equals x."""
    if a == 0:
        return x
    return (float(np.cbrt(1.0 + 3.0 * a * (x - a / 2.0))) - 1.0) / a


def _skewness(tot: np.ndarray) -> float | None:
    """Sample skewness of the cluster totals of a linearisation (they sum to zero); None without spread."""
    m2 = float((tot ** 2).mean())
    if len(tot) < 3 or m2 <= 0:
        return None
    return float((tot ** 3).mean()) / m2 ** 1.5


def _sf(x: float, df: int | None) -> float:
    return float(norm.sf(x)) if df is None else float(student_t.sf(x, df))


def _p_less(diff: float, se: float, df: int | None = None) -> float:
    """P(T >= -diff/se): the one-sided p of H0 'diff >= 0' against 'diff < 0' (T normal, or t at df)."""
    if se <= 0:
        return 0.0 if diff < 0 else 1.0
    return _sf(-diff / se, df)


def _p_two_sided(center: float, se: float, df: int | None = None) -> float:
    if se <= 0:
        return 1.0 if center == 0 else 0.0
    return float(min(1.0, 2 * _sf(abs(center) / se, df)))


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


def _cluster_index(clusters, n: int) -> tuple[np.ndarray, int]:
    """(cluster index per item, number of clusters G); every item its own cluster when `clusters` is None."""
    if clusters is None:
        return np.arange(n), n
    _, inv = np.unique(np.asarray(clusters), return_inverse=True)
    return inv, int(inv.max()) + 1 if n else 0


def cluster_skew(resid: np.ndarray, clusters, denom: float) -> float | None:
    """Sample skewness of a statistic's contributions (the cluster totals of `resid`, signed as the statistic
    over `denom`): what `Estimate.skew` carries for Hall's corrected bounds."""
    skew = _skewness(_cluster_totals(resid, clusters))
    return None if skew is None else (skew if denom > 0 else -skew)


def _cluster_totals(resid: np.ndarray, clusters) -> np.ndarray:
    """The sum of `resid` within each cluster (each unit alone when `clusters` is None)."""
    inv, g = _cluster_index(clusters, len(resid))
    return np.bincount(inv, weights=resid, minlength=g)


def cluster_robust_se(resid: np.ndarray, clusters, denom: float) -> tuple[float, int]:
    """(CR1 standard error, its degrees of freedom G - 1) of a statistic whose linearisation is
    sum(resid) / denom: sqrt(G / (G - 1) * sum over clusters of (cluster total of resid)^2) / denom. For a mean
    (resid = d - mean(d), denom = n) it is the unbiased standard error of the mean of the cluster totals."""
    n = len(resid)
    tot = _cluster_totals(resid, clusters)
    g = len(tot)
    if g < 2 or denom == 0:
        return 0.0, max(g - 1, 1)
    se = math.sqrt(g / (g - 1) * float((tot ** 2).sum())) / abs(denom)
    scale = max(1.0, float(np.abs(resid).max()) / abs(denom) * math.sqrt(n))
    return (0.0 if se < 1e-12 * scale else se), g - 1


def _n_clusters(clusters) -> int | None:
    return int(len(np.unique(clusters))) if clusters is not None else None


def paired_mean(base: np.ndarray, arm: np.ndarray, clusters=None, *, scale: float = 100.0) -> Estimate:
    """mean(arm) - mean(base) of continuous per-item scores; cluster-robust se, t at clusters - 1 df."""
    d = (np.asarray(arm, float) - np.asarray(base, float)) * scale
    if not len(d):
        return Estimate(point=0.0, center=0.0, se=0.0, method="cluster_robust_t", n=0, clusters=None, df=1)
    point = float(d.mean()) + 0.0
    se, df = cluster_robust_se(d - d.mean(), clusters, len(d))
    return Estimate(point=point, center=point, se=se, method="cluster_robust_t", n=len(d),
                    clusters=_n_clusters(clusters), df=df)


def ratio_rise(base_num: np.ndarray, arm_num: np.ndarray, clusters=None) -> Estimate:
    """Relative rise in percent of sum(arm_num)/sum(denom) over sum(base_num)/sum(denom) (the denominators
    cancel for paired units, e.g. bits per byte over the same bytes); cluster-robust se of the ratio by the delta
    method (residual a - R b over sum(b)), t at clusters - 1 df."""
    bn, an = np.asarray(base_num, float), np.asarray(arm_num, float)
    r = an.sum() / bn.sum()
    point = float((r - 1.0) * 100.0) + 0.0
    resid = (an - r * bn) * 100.0
    se, df = cluster_robust_se(resid, clusters, float(bn.sum()))
    return Estimate(point=point, center=point, se=se, method="cluster_robust_t", n=len(bn),
                    clusters=_n_clusters(clusters), df=df,
                    skew=cluster_skew(resid, clusters, float(bn.sum())) if se > 0 else None)


def mean_of(values: np.ndarray, clusters=None, weights=None) -> Estimate:
    """Mean of per-unit values (e.g. KL per block of positions), weighted by `weights` (e.g. each block's
    positions) when given; cluster-robust se of the weighted mean (residuals w (v - mean) over sum(w)), t at
    clusters - 1 df."""
    v = np.asarray(values, float)
    w = np.ones(len(v)) if weights is None else np.asarray(weights, float)
    point = float((w * v).sum() / w.sum()) + 0.0
    resid = w * (v - point)
    se, df = cluster_robust_se(resid, clusters, float(w.sum()))
    return Estimate(point=point, center=point, se=se, method="cluster_robust_t", n=len(v),
                    clusters=_n_clusters(clusters), df=df,
                    skew=cluster_skew(resid, clusters, float(w.sum())) if se > 0 else None)


def cluster_means(d: np.ndarray, clusters) -> np.ndarray:
    """The mean of `d` within each cluster (each item alone when `clusters` is None): the units a bound that
    holds for every distribution treats as independent draws."""
    d = np.asarray(d, float)
    inv, g = _cluster_index(clusters, len(d))
    return np.bincount(inv, weights=d, minlength=g) / np.bincount(inv, minlength=g)


# ---- a bound that holds whatever the pattern ----------------------------------------------------------------

BET_CAP = 0.9
"""Largest fraction of the most a bet can lose (Waudby-Smith & Ramdas's c). With almost no spread (an unchanged
copy) the units needed to PASS fall as the cap rises: at a 2-point margin on a -100..100 range, alpha 0.05, 198
with 0.75 and 165 with 0.9 (291 and 256 at a spread of 8 points); 1 would let one extreme unit end a bet."""
BET_PRIOR_VAR = 0.01
"""The bet's starting guess of the variance on the 0-1 scale (a standard deviation of 20 points on the -100..100
range), worth one unit. Waudby-Smith & Ramdas's 1/4 is the largest a 0-1 variable can have; paired changes of a
score spread far less, and with 1/4 the first bets stay timid (173 units instead of 165 for an unchanged copy,
280 instead of 256 at a spread of 8 points). Any predictable choice keeps the bound valid; this one only changes
its width."""
BET_ORDERS = 8
"""Seeded orders of the units whose capitals are averaged (an average of test martingales is one): the bound no
longer hangs on the units' order in the file."""


def bounded_upper(streams: list[np.ndarray], lo: float, hi: float, alpha: float, *, plan=None,
                  ends: list[list[int]] | None = None) -> float:
    """One-sided (1 - alpha) upper bound of the common mean of i.i.d. draws in [lo, hi], valid for every
    distribution on that range and every sample size: each stream holds the same draws in another order (or
    another random interleaving of the same draws); the bound is the smallest m at which the average over the
    streams of the betting capital prod(1 + lambda_i (m - y_i)) reaches 1 / alpha (Waudby-Smith & Ramdas 2023,
    "Estimating means of bounded random variables by betting", the predictable plug-in bet for a fixed sample
    size: lambda_i = sqrt(2 log(1/alpha) / (n var_{i-1})), capped at BET_CAP / (1 - m)). Under a true mean at or
    above m the capital is a nonnegative supermartingale with mean at most 1, so it reaches 1 / alpha with
    probability at most alpha (Ville); no normal approximation is involved.

    Sequential looks (`sequential_bound` builds the arguments): `ends` gives, per stream, the positions after each
    look (the units scored by then), and the capital is taken at its highest over the looks; `plan` is the n the
    bets are tuned for, fixed before any look (the units expected at the cap). Ville's inequality bounds the
    chance that the capital ever reaches 1 / alpha, so the bound holds however many looks are taken and whenever
    the looking stops."""
    log_capital = _capital(streams, lo, hi, alpha, plan, ends)
    if log_capital is None:
        return hi
    log_target = math.log(1.0 / alpha)
    left, right = 0.0, 1.0 - 1e-12
    if log_capital(np.array([right]))[0] < log_target:
        return hi
    for _ in range(7):  # the capital rises with m: narrow [left, right] 32-fold a round
        grid = np.linspace(left, right, 33)
        above = np.flatnonzero(log_capital(grid[1:]) >= log_target)
        j = int(above[0]) + 1 if len(above) else 32
        left, right = float(grid[j - 1]), float(grid[j])
    return lo + right * (hi - lo) + 0.0


def bounded_p(streams: list[np.ndarray], lo: float, hi: float, m: float, alpha: float, *, plan=None,
              ends: list[list[int]] | None = None) -> float:
    """The p-value of "the mean is at least m" from the same capital as `bounded_upper` (1 / its highest value,
    at most 1): p <= alpha exactly when that bound is below m. With looks it is an anytime-valid p-value (the
    chance that it ever falls to x is at most x), so Holm's correction across tasks applies to it as to any."""
    log_capital = _capital(streams, lo, hi, alpha, plan, ends)
    if log_capital is None or hi <= lo:
        return 1.0
    u = min(max((m - lo) / (hi - lo), 0.0), 1.0 - 1e-12)
    return float(min(1.0, math.exp(-float(log_capital(np.array([u]))[0]))))


def _capital(streams: list[np.ndarray], lo: float, hi: float, alpha: float, plan,
             ends: list[list[int]] | None):
    """log of the average capital over the streams, at its highest over the looks, as a function of m on the
    0-1 scale (several m at once); None when no stream has a draw."""
    width = hi - lo
    if ends is None:
        ends = [[len(s)] for s in streams]
    kept = [(s, e) for s, e in zip(streams, ends) if len(s)]
    if not kept or width <= 0:
        return None
    log_target = math.log(1.0 / alpha)
    plans = list(plan) if isinstance(plan, (list, tuple)) else [plan] * len(streams)
    plans = [p for p, s in zip(plans, streams) if len(s)]
    bets = []
    for (s, e), p in zip(kept, plans):
        y = np.clip((np.asarray(s, float) - lo) / width, 0.0, 1.0)
        n = len(y)
        i = np.arange(1, n + 1)
        mu = (0.5 + np.cumsum(y)) / (i + 1)
        var = (BET_PRIOR_VAR + np.cumsum((y - mu) ** 2)) / (i + 1)
        var_prev = np.concatenate(([BET_PRIOR_VAR], var[:-1]))
        bets.append((y, np.sqrt(2.0 * log_target / ((p or n) * var_prev)), np.minimum(np.asarray(e, int), n)))

    def log_capital(m: np.ndarray) -> np.ndarray:  # at several m at once: [len(m)]
        cap = (BET_CAP / (1.0 - m))[:, None]
        logs = []
        for y, lam, e in bets:
            terms = np.log1p(np.minimum(lam[None, :], cap) * (m[:, None] - y[None, :]))
            if len(e) == 1 and e[0] == len(y):
                logs.append(terms.sum(axis=1)[:, None])
            else:
                cum = np.concatenate((np.zeros((len(m), 1)), np.cumsum(terms, axis=1)), axis=1)
                logs.append(cum[:, e])
        stacked = np.stack(logs)  # [streams, len(m), looks]
        top = stacked.max(axis=0)  # log of the mean capital over the streams (scipy's logsumexp costs more here)
        mean = top + np.log(np.exp(stacked - top).mean(axis=0))
        return mean.max(axis=1)
    return log_capital


def unit_orders(units: np.ndarray, key: str, orders: int = BET_ORDERS) -> list[np.ndarray]:
    """`orders` seeded permutations of one sample's units (the streams of `bounded_upper`)."""
    rng = np.random.default_rng(stable_seed("orders", key))
    return [rng.permutation(np.asarray(units, float)) for _ in range(orders)]


def interleavings(samples: list[np.ndarray], key: str, orders: int = BET_ORDERS) -> list[np.ndarray]:
    """Streams of draws whose mean is the mean over samples of their means: at each step a sample is chosen
    uniformly at random and its next unit (in a seeded random order) is taken, until the chosen sample has none
    left. Each draw is then one unit of a uniformly chosen task, i.i.d., so `bounded_upper` over these streams
    bounds the mean over tasks (the retention mean) whatever the pattern of changes within or across tasks."""
    rng = np.random.default_rng(stable_seed("interleave", key))
    return [_interleave(samples, rng) for _ in range(orders)]


def _interleave(samples: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    k = len(samples)
    perm = [rng.permutation(np.asarray(s, float)) for s in samples]
    pos = [0] * k
    picks = rng.integers(0, k, size=sum(len(s) for s in samples) + 1)
    stream = []
    for t in picks:
        if pos[t] >= len(perm[t]):
            break
        stream.append(perm[t][pos[t]])
        pos[t] += 1
    return np.asarray(stream)


def look_orders(looks: list[np.ndarray], key: str, orders: int = BET_ORDERS) -> tuple[list[np.ndarray], list[list[int]]]:
    """Streams and look ends for `bounded_upper` over sequential looks at one sample: each stream holds the first
    look's units in a seeded order, then the second look's new units, and so on; a look never reorders an earlier
    one's units, so each stream's capital at a look is its capital at the last look times the new units' bets
    (a supermartingale across looks: the new units are fresh draws)."""
    rng = np.random.default_rng(stable_seed("orders", key))
    ends = [int(e) for e in np.cumsum([len(x) for x in looks])]
    return [np.concatenate([rng.permutation(np.asarray(x, float)) for x in looks]) for _ in range(orders)], \
        [ends] * orders


PASS_PLANS = (1.0, 0.5)
"""The sample sizes a sequential PASS bound's bets are tuned for, as shares of the units at the cap, one per stream
in turn: an average of capitals is a capital, so the bound may hedge between passing at the cap (1) and passing
halfway (0.5), each stream betting as its share says."""
FAIL_PLANS = (0.25,)
"""The same for the FAIL side: a drop beyond the margin should be shown early, and a bet tuned for a quarter of the
cap is bolder in the first looks."""


def look_plans(plan: int, streams: int, side: str) -> list[int]:
    """Per stream, the units its bets are tuned for (`PASS_PLANS` or `FAIL_PLANS` of the cap's `plan`)."""
    shares = PASS_PLANS if side == "pass" else FAIL_PLANS
    return [max(1, round(plan * shares[i % len(shares)])) for i in range(streams)]


def look_interleavings(looks: list[list[np.ndarray]], key: str,
                       orders: int = BET_ORDERS) -> tuple[list[np.ndarray], list[list[int]]]:
    """`interleavings` look by look (`looks[k]`: each task's new units at look k): a look's draws follow the earlier
    looks' in every stream, so the retention mean's bound holds across looks as `look_orders`' does."""
    rng = np.random.default_rng(stable_seed("interleave", key))
    streams, ends = [], []
    for _ in range(orders):
        parts = [_interleave(samples, rng) for samples in looks]
        streams.append(np.concatenate(parts) if parts else np.zeros(0))
        ends.append([int(e) for e in np.cumsum([len(x) for x in parts])])
    return streams, ends


def bounded_width(n: int, sd: float, alpha: float, *, width: float = 200.0) -> float:
    """How far above the sample mean `bounded_upper` sits for n units with standard deviation `sd` (on a range
    `width` wide, centred on 0): the bound computed on a typical such sample (the normal quantiles at
    (i + 1/2) / n, in a seeded order). n and sd are taken to two significant digits (what a power statement
    is rounded to), so a search over n reuses earlier answers."""
    return _bounded_width(round_sig(n), float(f"{sd:.2g}"), alpha, width)


@functools.lru_cache(maxsize=256)
def pass_floor(units: int, alpha: float, width: float = 200.0) -> float:
    """The lowest `bounded_upper` any sample of `units` units without gains can give: that of units that did not
    move at all. A margin at or below it cannot be PASSed at this size, whatever the items show short of an
    improvement (the gate says so: the p-floor of a PASS)."""
    return bounded_upper([np.zeros(max(units, 1))], -width / 2, width / 2, alpha)


def round_sig(n: int) -> int:
    """n to two significant digits (nearest, not up: 1,234 -> 1,200)."""
    if n < 100:
        return int(n)
    mag = 10 ** (len(str(int(n))) - 2)
    return int(round(n / mag) * mag)


@functools.lru_cache(maxsize=4096)
def _bounded_width(n: int, sd: float, alpha: float, width: float) -> float:
    if n <= 0:
        return width / 2
    x = norm.ppf((np.arange(n) + 0.5) / n) * sd
    order = np.empty(n, dtype=int)
    order[0::2], order[1::2] = np.arange(n)[: (n + 1) // 2], np.arange(n)[::-1][: n // 2]
    rng = np.random.default_rng(n)
    x = x[order][rng.permutation(n)] if sd > 0 else x
    x = np.clip(x - x.mean(), -width / 2, width / 2)
    return bounded_upper([x], -width / 2, width / 2, alpha) - float(x.mean())


def pass_power(sd: float, n: int, margin: float, alpha: float, *, width: float = 200.0) -> float:
    """Probability (approximate) that `bounded_upper` rules out a drop of `margin` from `n` units whose standard
    deviation is `sd` when nothing changed: P(mean + width_n < margin) with the mean normal around 0."""
    if n <= 0 or margin <= 0:
        return 0.0
    h = bounded_width(n, sd, alpha, width=width)
    if sd <= 0:
        return 1.0 if h < margin else 0.0
    return _norm_cdf((margin - h) * math.sqrt(n) / sd)


def _norm_cdf(x: float) -> float:
    """The standard normal cdf of one number (scipy's norm.cdf costs ~100 times more per scalar call, and the power
    search calls this thousands of times per gate)."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def pass_mde(sd: float, n: int, alpha: float, *, width: float = 200.0, power: float = POWER) -> float:
    """The smallest margin `bounded_upper` rules out with probability `power` from `n` units of standard
    deviation `sd` when nothing changed: its width plus z_power standard errors of the mean."""
    h = bounded_width(n, sd, alpha, width=width)
    return h + (z(power) * sd / math.sqrt(n) if n > 0 and sd > 0 else 0.0)


def items_for_power(power_at, target: float = POWER, start: int = MIN_PAIRED, cap: int = 10_000_000) -> int | None:
    """Smallest n >= start with power_at(n) >= target (power_at rising in n), or None beyond `cap`."""
    if power_at(start) >= target:
        return start
    lo, hi = start, start * 2
    while power_at(hi) < target:
        lo, hi = hi, hi * 2
        if hi > cap:
            return None
    while hi - lo > max(1, lo // 100):  # to 1%: the answer is rounded to two digits anyway
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if power_at(mid) >= target else (mid, hi)
    return hi


def pass_items(sd: float, margin: float, alpha: float, *, width: float = 200.0, power: float = POWER) -> int | None:
    """Units `bounded_upper` needs to rule out a drop of `margin` with probability `power` when nothing changed
    and the units' standard deviation is `sd` (an unchanged copy, sd 0, still needs 165 units at a 2-point
    margin on a 0-100 score: no sample can rule out a drop carried by a few items it did not draw)."""
    return items_for_power(lambda n: pass_power(sd, n, margin, alpha, width=width), power)


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
