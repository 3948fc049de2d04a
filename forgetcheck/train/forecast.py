"""Forecast of final forgetting from the first part of a training run (numpy/scipy only; no torch).

Several laws ("forms") are fitted to the forgetting signal F measured at points during training
(train/signals.py), using only the points within the first `fit_fraction` of the token budget (default 0.25),
and the default forecast (`DEFAULT`, what the early stop and the report read) combines them. See docs/curves.md;
its "Backtest" section measured every one on 18 real runs (bench/forecast_backtest.py).

* Shifted power law in tokens t (forgetting follows a power law in the number of update steps):

      F(t) = A·(t + t0)^b − A·t0^b        (F(0) = 0 by construction)

  fitted as F(t) = a·((1 + x/s)^b − 1) with x = t / budget, s = t0 / budget, a = A·t0^b (the same curve; the
  scaled form keeps the three parameters of order one for `scipy.optimize.curve_fit`). Bounds: b in
  [0.02, 3], s in [1e-4, 1e3], |a| <= 1e4·max|F| (a may be negative: a signal that improves). Several starting
  points (a grid over s and b) are tried and the fit with the least squared error is kept.

  The time axis may be other than tokens (`time=`): train/curve.py forecasts on the integral of the
  learning rate (`lr_integral`, the sum of the steps' lr factors, known from the schedule before training),
  because a decaying schedule slows the drift after the window in a way a law in tokens cannot know
  (docs/curves.md, measured on `--preset forget`). With a constant learning rate the two axes are the same.

* Forgetting linear in the training loss L:

      F = c·(L0 − L)

  fitted by least squares as F = α − c·L (L0 = α / c). Its forecast needs the loss at the end of the budget:
  given (`final_loss`) or extrapolated from the fit window's losses with the shifted power law above (on the
  loss drop from the first fitted point, on the same time axis), never below zero (a cross-entropy).

* Saturating: F(t) = A·(1 − exp(−t/τ)), fitted as a·(1 − exp(−x/s)) on the same axis; with τ long against the
  window it is the straight line through the window, so it never forecasts more than that line.

* Through the drift on domain text (Shenfeld et al. 2025): F = c·KL fitted through the origin to the window's
  pairs, times the KL at the budget forecast by the saturating law.

* The forms together (`forecast_forms`, `combine_forms`; the default): the median of their points, an interval
  from the lowest of their lower bounds to the highest of their upper bounds (the doubt about which law holds,
  not only each law's noise), or "cannot tell from this window" when fewer than two forms give an interval or
  the window saw less than `MIN_DRIFT_SEEN` of the domain drift that the saturating law forecasts.

Interval: for the power law and the saturating law, a residual bootstrap. The fit's residuals (centred, inflated by sqrt(n/(n−k))
for the k fitted parameters) are resampled onto the fitted values, the law refitted from the estimate,
and each refit's value at the budget kept (`N_BOOT` refits); for the linear model, a parametric bootstrap
from the ordinary least-squares estimate and covariance of (α, c), combined draw by draw with the final
loss (fixed when given, else the loss extrapolation's own residual-bootstrap draws). The interval is the
central `level` quantile range of the draws (default 90%). A normal approximation of the power law's
covariance is not used: a and t0 are strongly correlated and the curve is far from linear in them, so it
gives absurd intervals. With no residual degree of freedom (as many points as parameters), when fewer than 10
refits converge, or when the refits' interval does not hold the fitted value itself, there is no interval
(lo = hi = None; `reason` says which): the forecast keeps its point value and never stops a run.

Repeated looks: a forecast made for a stop that is checked at `looks` points of a run also keeps
`lo_adjusted`, the lower bound at one-sided level 1 − (1 − level)/2/looks from the same draws (Bonferroni: the
lower side's error split over the looks, valid whatever their dependence); `should_stop` uses it. With one
look it is `lo`. `lo` and `hi` keep their meaning. See docs/curves.md, "Repeated looks".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np

FIT_FRACTION = 0.25
LEVEL = 0.90
N_BOOT = 400  # residual-bootstrap refits of the power law (each a least-squares fit from the estimate)
N_BOOT_LINEAR = 4000  # parameter draws of the linear model when the final loss is given (no refit)
MIN_POINTS = 3
POWER_LAW = "shifted_power_law"
LOSS_LINEAR = "loss_linear"
SATURATING = "saturating"
KL_MAPPED = "kl_mapped"
FORMS = "forms"
MIN_DRIFT_SEEN = 0.5
"""The default forecast abstains unless the window saw at least this share of the drift on domain text that the
saturating law forecasts at the budget: a window whose drift has not bent constrains nothing after it (a
straight line in the learning-rate integral, the least the saturating law can bend, has seen x_window / x_end:
0.39 at the presets' warmup and cosine). Fixed before the backtest's last runs (docs/curves.md, "Backtest")."""
BACKTEST: dict[str, dict] = {
    "soft_acc": {"runs": 18, "with_interval": 8, "covered": 7, "abstained": 10, "false_stops": 0,
                 "below_margin_pairs": 217, "stops": 89},
    "kl_domain": {"runs": 18, "with_interval": 8, "covered": 4, "abstained": 10, "false_stops": 1,
                  "below_margin_pairs": 357, "stops": 3},
}
"""The default forecast's backtest per signal: runs, with_interval, covered, abstained, false_stops (of
below_margin pairs). Printed by bench/forecast_backtest.py table, kept here for the report, checked against the
stored runs by tests/train/test_backtest.py."""
DEFAULT = "forms"
"""The forecast the stop and the report read: the one the backtest supports (docs/curves.md, "Backtest")."""
_SAT_S_BOUNDS = (1e-3, 1e3)
_B_BOUNDS = (0.02, 3.0)
_S_BOUNDS = (1e-4, 1e3)


@dataclass
class Forecast:
    """Forgetting predicted at `at_tokens` (the end of the budget) by `model`, with its interval [lo, hi]
    (`level`, parametric bootstrap). `predicted` is None when there was no forecast; `reason` says why."""

    model: str
    params: dict = field(default_factory=dict)
    predicted: float | None = None
    lo: float | None = None
    hi: float | None = None
    fit_until_tokens: float = 0.0
    at_tokens: float = 0.0
    n_points: int = 0
    level: float = LEVEL
    reason: str | None = None
    axis: str = "tokens"
    looks: int = 1
    lo_adjusted: float | None = None
    draws: np.ndarray | None = field(default=None, repr=False, compare=False)
    """The bootstrap's values at the budget (not written: `to_dict` leaves them out); combined forecasts use them."""

    @property
    def ok(self) -> bool:
        return self.predicted is not None

    @property
    def look_level(self) -> float:
        """One-sided level of `lo_adjusted`: the interval's lower side, its error split over `looks`."""
        return 1.0 - (1.0 - self.level) / 2.0 / self.looks

    @property
    def stop_bound(self) -> float | None:
        """The lower bound the stop compares with its margin: `lo` for one look, else `lo_adjusted`."""
        return self.lo if self.looks <= 1 else self.lo_adjusted

    def to_dict(self) -> dict:
        out = asdict(replace(self, draws=None))
        del out["draws"]
        return out


def _shape(x, a, s, b):
    return a * ((1.0 + x / s) ** b - 1.0)


def _jac(x, a, s, b):
    u = 1.0 + x / s
    ub = u ** b
    return np.column_stack([ub - 1.0, -a * b * ub / u * x / s ** 2, a * ub * np.log(u)])


def _saturating(x, a, s):
    return a * -np.expm1(-x / s)


def _saturating_jac(x, a, s):
    e = np.exp(-x / s)
    return np.column_stack([1.0 - e, -a * e * x / s ** 2])


@dataclass(frozen=True)
class _Law:
    """A law F(x) with F(0) = 0 in x = time / time at the budget: its shape and Jacobian in (a, s, ...) (a the
    amplitude, s a positive time scale), the starting points and the bounds of its fit."""

    name: str
    shape: object
    jac: object
    starts: tuple  # (s, *rest) starting values; a by linear least squares given them
    upper_rest: tuple  # bounds of the parameters after s
    lower_rest: tuple
    s_bounds: tuple


_LAWS = {
    POWER_LAW: _Law(POWER_LAW, _shape, _jac, tuple((s0, b0) for s0 in (0.01, 0.1, 1.0) for b0 in (0.5, 1.0)),
                    (_B_BOUNDS[1],), (_B_BOUNDS[0],), _S_BOUNDS),
    SATURATING: _Law(SATURATING, _saturating, _saturating_jac, ((0.05,), (0.2,), (1.0,), (5.0,)), (), (),
                     _SAT_S_BOUNDS),
}


def _window(tokens, values, budget_tokens: float, fit_fraction: float, *extra):
    t = np.asarray(tokens, dtype=float)
    arrays = [np.asarray(v, dtype=float) for v in (values, *extra)]
    if budget_tokens <= 0 or not 0 < fit_fraction <= 1:
        raise ValueError(f"budget_tokens must be > 0 and fit_fraction in (0, 1]; got {budget_tokens}, {fit_fraction}")
    until = fit_fraction * budget_tokens
    keep = (t <= until) & np.all([np.isfinite(a) for a in arrays], axis=0) & np.isfinite(t)
    return until, t[keep], [a[keep] for a in arrays]


def _curve_fit(law: _Law, x, y, p0, lower, upper, max_nfev: int = 2000):
    import warnings

    from scipy.optimize import OptimizeWarning, curve_fit

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", OptimizeWarning)
        return curve_fit(law.shape, x, y, p0=p0, bounds=(lower, upper), jac=law.jac, max_nfev=max_nfev)


def _bounds(law: _Law, y) -> tuple[list[float], list[float]]:
    amp = max(float(np.max(np.abs(y))), 1e-12)
    return ([-1e4 * amp, law.s_bounds[0], *law.lower_rest], [1e4 * amp, law.s_bounds[1], *law.upper_rest])


def _fit_law(law: _Law, tokens, forgetting, scale: float) -> np.ndarray:
    """The law's (a, s, ...) fitted to the points (time / scale, forgetting): least squares from each of its
    starting points (a by linear least squares given the rest), the best kept."""
    x = np.asarray(tokens, dtype=float) / scale
    y = np.asarray(forgetting, dtype=float)
    lower, upper = _bounds(law, y)
    best, best_sse = None, math.inf
    for start in law.starts:
        g = law.shape(x, 1.0, *start)
        a0 = float(np.dot(g, y) / np.dot(g, g)) if np.dot(g, g) > 0 else 0.0
        a0 = float(np.clip(a0, lower[0] * 0.99, upper[0] * 0.99)) or 1e-3 * upper[0]
        try:
            p, _ = _curve_fit(law, x, y, [a0, *start], lower, upper, max_nfev=400)
        except (RuntimeError, ValueError):
            continue
        sse = float(np.sum((law.shape(x, *p) - y) ** 2))
        if sse < best_sse:
            best, best_sse = p, sse
    if best is None:
        raise RuntimeError(f"the {law.name.replace('_', ' ')} did not converge from any starting point")
    return best


def fit_power_law(tokens, forgetting, scale: float) -> np.ndarray:
    """(a, s, b) of F = a·((1 + t/(s·scale))^b − 1) fitted to the points: least squares from several starting
    points (a grid over s and b, a by linear least squares given them), the best kept."""
    return _fit_law(_LAWS[POWER_LAW], tokens, forgetting, scale)


def _quantiles(draws, *qs: float) -> list[float | None]:
    """The draws' quantiles at `qs`; all None without draws or with fewer than 10 finite ones."""
    draws = np.asarray([] if draws is None else draws, dtype=float)
    draws = draws[np.isfinite(draws)]
    return [float(np.quantile(draws, q)) if draws.size >= 10 else None for q in qs]


def _interval(draws, level: float) -> tuple[float | None, float | None]:
    q = (1.0 - level) / 2.0
    lo, hi = _quantiles(draws, q, 1.0 - q)
    return lo, hi


def _power_law_draws(x, y, p, x_end: float, n_boot: int, rng) -> np.ndarray | None:
    """Residual-bootstrap draws of the shifted power law at x_end (`_law_draws` with POWER_LAW's shape)."""
    return _law_draws(_LAWS[POWER_LAW], x, y, p, x_end, n_boot, rng)


def _law_draws(law: _Law, x, y, p, x_end: float, n_boot: int, rng) -> np.ndarray | None:
    """Residual bootstrap: refit (from the fitted parameters) to fitted values plus resampled residuals
    (centred, inflated by sqrt(n / (n − k)) for the k fitted parameters); each refit's value at x_end (a refit
    that fails is left out of the quantiles). None without a residual degree of freedom."""
    n, k = len(x), len(p)
    if n <= k:
        return None
    fitted = law.shape(x, *p)
    res = y - fitted
    res = (res - res.mean()) * math.sqrt(n / (n - k))
    if not np.any(np.abs(res) > 1e-12 * max(float(np.max(np.abs(y))), 1e-300)):
        return np.full(n_boot, float(law.shape(x_end, *p)))  # an exact fit: every replicate is the same curve
    from scipy.optimize import least_squares

    def params(q):  # the scale parameter s is refit on a log scale, so it stays positive
        return (q[0], _exp(q[1]), *q[2:])

    def resid(q, yb):
        return law.shape(x, *params(q)) - yb

    def jac(q, yb):
        j = law.jac(x, *params(q))
        j[:, 1] *= _exp(q[1])
        return j

    q0 = np.array([p[0], math.log(p[1]), *p[2:]])
    out = np.full(n_boot, np.nan)
    for i in range(n_boot):
        yb = fitted + rng.choice(res, size=n, replace=True)
        try:  # Levenberg-Marquardt: quick from the estimate
            with np.errstate(all="ignore"):
                r = least_squares(resid, q0, jac=jac, args=(yb,), method="lm", max_nfev=400)
                value = law.shape(np.float64(x_end), *params(r.x)) if r.success else np.nan
        except (ValueError, OverflowError, ZeroDivisionError):
            continue
        out[i] = value
    return out


def _exp(v: float) -> float:
    """exp(v), inf past the largest float: a refit that wanders to an s of 0 or inf gives inf or nan (numpy float
    arithmetic), never an exception."""
    try:
        return math.exp(v)
    except OverflowError:
        return math.inf


def _not_enough(model: str, until: float, budget: float, n: int, level: float, what: str,
                axis: str = "tokens") -> Forecast:
    return Forecast(model=model, fit_until_tokens=until, at_tokens=budget, n_points=n, level=level, axis=axis,
                    reason=f"not enough points: {n} {what} within the first {until:.4g} tokens, need at least "
                           f"{MIN_POINTS}; measure more points early in training")


def lr_integral(lr_factor, total_steps: int) -> np.ndarray:
    """cum[k] = the sum of the learning-rate factors (multipliers of the peak lr) of optimizer steps 0..k−1, for
    k = 0..total_steps: the training time in peak-lr steps, known before the first step from the schedule."""
    return np.concatenate([[0.0], np.cumsum([float(lr_factor(i)) for i in range(total_steps)])])


def _on_axis(t: np.ndarray, budget_tokens: float, time) -> tuple[np.ndarray, float]:
    """(the points' times, the budget's time) on the axis `time` maps tokens to (tokens themselves: None)."""
    if time is None:
        return t, float(budget_tokens)
    return np.array([float(time(v)) for v in t]), float(time(budget_tokens))


def forecast_power_law(tokens, forgetting, budget_tokens: float, *, fit_fraction: float = FIT_FRACTION,
                       level: float = LEVEL, n_boot: int = N_BOOT, seed: int = 0, time=None,
                       axis: str = "tokens", looks: int = 1) -> Forecast:
    """Forgetting at `budget_tokens` from the shifted power law fitted to the points (tokens, forgetting)
    with tokens <= fit_fraction·budget_tokens (points at t <= 0 carry no information: F(0) = 0 is built in).

    `time` (a monotone function of tokens, named `axis`) is the law's time axis when given: the points and the
    budget are mapped through it before the fit (e.g. the learning-rate integral, `lr_integral`), so a schedule
    that slows the drift later is known to the forecast; the window is still the first fit_fraction of the
    tokens. The params' t0 is then in the axis's units.

    `looks`: the points at which a stop is checked against this forecast's lower bound; `lo_adjusted` is the
    bound at the Bonferroni-corrected level (`Forecast.look_level`), from the same draws."""
    return _forecast_law(_LAWS[POWER_LAW], tokens, forgetting, budget_tokens, fit_fraction=fit_fraction,
                         level=level, n_boot=n_boot, seed=seed, time=time, axis=axis, looks=looks)


def forecast_saturating(tokens, forgetting, budget_tokens: float, *, fit_fraction: float = FIT_FRACTION,
                        level: float = LEVEL, n_boot: int = N_BOOT, seed: int = 0, time=None,
                        axis: str = "tokens", looks: int = 1) -> Forecast:
    """Forgetting at `budget_tokens` from the saturating law F(t) = A·(1 − exp(−t/τ)) fitted to the window's
    points, as `forecast_power_law` (same window, axis, interval and looks). The law stops growing at A: with
    τ long against the window it is the straight line through the window, so it never forecasts more than
    that line does."""
    return _forecast_law(_LAWS[SATURATING], tokens, forgetting, budget_tokens, fit_fraction=fit_fraction,
                         level=level, n_boot=n_boot, seed=seed, time=time, axis=axis, looks=looks)


def _params(law: _Law, p, end: float, rmse: float) -> dict:
    if law.name == POWER_LAW:
        a, s, b = (float(v) for v in p)
        t0 = s * end
        return {"A": a / t0 ** b, "t0": t0, "b": b, "a": a, "axis_end": end, "rmse": rmse}
    a, s = (float(v) for v in p)
    return {"A": a, "tau": s * end, "axis_end": end, "rmse": rmse}


def _forecast_law(law: _Law, tokens, forgetting, budget_tokens: float, *, fit_fraction: float, level: float,
                  n_boot: int, seed: int, time, axis: str, looks: int) -> Forecast:
    until, t, (y,) = _window(tokens, forgetting, budget_tokens, fit_fraction)
    y, t = y[t > 0], t[t > 0]
    if len(t) < MIN_POINTS:
        return _not_enough(law.name, until, budget_tokens, len(t), level, "points after step 0", axis)
    u, end = _on_axis(t, budget_tokens, time)
    if not end > 0 or np.any(u <= 0) or np.any(np.diff(u[np.argsort(t)]) < 0):
        return Forecast(model=law.name, fit_until_tokens=until, at_tokens=budget_tokens, n_points=len(t),
                        level=level, axis=axis, reason=f"the time axis ({axis}) is not positive and increasing")
    try:
        p = _fit_law(law, u, y, end)
    except RuntimeError as e:
        return Forecast(model=law.name, fit_until_tokens=until, at_tokens=budget_tokens, n_points=len(t),
                        level=level, axis=axis, reason=str(e))
    predicted = float(law.shape(1.0, *p))
    if looks < 1:
        raise ValueError(f"looks must be >= 1; got {looks}")
    draws = _law_draws(law, u / end, y, p, 1.0, n_boot, np.random.default_rng(seed))
    lo, hi = _interval(draws, level)
    fitted = law.shape(u / end, *p)
    params = _params(law, p, end, float(np.sqrt(np.mean((fitted - y) ** 2))))
    why = None
    if lo is not None and not lo <= predicted <= hi:  # the refits settle elsewhere than the fit: ill-posed
        lo = hi = None
        why = ("no interval: the bootstrap refits do not bracket the fitted value (the window's points do not "
               "pin the law down)")
    elif lo is None:
        why = ("no interval: as many points as parameters" if len(t) <= len(p) else
               "no interval: fewer than 10 of the bootstrap refits converged (the window's points fit the law "
               "too loosely to bound it)")
    out = Forecast(model=law.name, params=params, predicted=predicted, lo=lo, hi=hi, fit_until_tokens=until,
                   at_tokens=budget_tokens, n_points=len(t), level=level, reason=why, axis=axis, looks=looks)
    if lo is not None:
        out.lo_adjusted = _quantiles(draws, (1.0 - level) / 2.0 / looks)[0]  # 1 − look_level, unrounded
    out.draws = draws if lo is not None else None
    return out


def forecast_kl_mapped(tokens, forgetting, kl, budget_tokens: float, *, fit_fraction: float = FIT_FRACTION,
                       level: float = LEVEL, n_boot: int = N_BOOT, seed: int = 0, time=None,
                       axis: str = "tokens", looks: int = 1, kl_end: Forecast | None = None) -> Forecast:
    """Forgetting at the budget through the drift on the domain's own text (Shenfeld et al. 2025: forgetting
    follows KL(base ‖ model) on the new task's data): F = c·KL fitted through the origin to the window's points
    (no drift, no forgetting), times the KL at the budget forecast by the saturating law (`forecast_saturating`;
    KL settles as the learning rate decays). Interval: draw by draw, c from a residual bootstrap of the
    regression times the KL law's own bootstrap draws. `kl_end`: that KL forecast when already made."""
    until, t, (y, k) = _window(tokens, forgetting, budget_tokens, fit_fraction, kl)
    keep = t > 0
    t, y, k = t[keep], y[keep], k[keep]
    if len(t) < MIN_POINTS:
        return _not_enough(KL_MAPPED, until, budget_tokens, len(t), level, "points with a KL", axis)
    kk = float(np.dot(k, k))
    if not kk > 0:
        return Forecast(model=KL_MAPPED, fit_until_tokens=until, at_tokens=budget_tokens, n_points=len(t),
                        level=level, axis=axis, reason="no drift in the window: KL is 0 at every point")
    c = float(np.dot(k, y) / kk)
    if kl_end is None:
        kl_end = forecast_saturating(t, k, budget_tokens, fit_fraction=1.0, level=level, n_boot=n_boot, seed=seed,
                                     time=time, axis=axis)
    params = {"c": c, "kl_at_budget": kl_end.predicted}
    if not kl_end.ok:
        return Forecast(model=KL_MAPPED, params=params, fit_until_tokens=until, at_tokens=budget_tokens,
                        n_points=len(t), level=level, axis=axis, reason=f"the KL's law: {kl_end.reason}")
    predicted = c * float(kl_end.predicted)
    lo = hi = draws = None
    if kl_end.draws is not None and len(t) > 1:
        rng = np.random.default_rng([seed, 1])
        res = (y - c * k) * math.sqrt(len(t) / (len(t) - 1))
        cb = np.array([np.dot(k, c * k + rng.choice(res, size=len(t))) / kk for _ in range(len(kl_end.draws))])
        draws = cb * kl_end.draws
        lo, hi = _interval(draws, level)
    out = Forecast(model=KL_MAPPED, params=params, predicted=predicted, lo=lo, hi=hi, fit_until_tokens=until,
                   at_tokens=budget_tokens, n_points=len(t), level=level, axis=axis, draws=draws, looks=looks,
                   reason=None if lo is not None else f"no interval: {kl_end.reason or 'too few points'}")
    if lo is not None:
        out.lo_adjusted = _quantiles(draws, (1.0 - level) / 2.0 / looks)[0]
    return out


def fit_loss_linear(losses, forgetting) -> tuple[np.ndarray, np.ndarray | None]:
    """((c, L0), covariance of (α, c) or None) of F = c·(L0 − L) = α − c·L, ordinary least squares."""
    L = np.asarray(losses, dtype=float)
    y = np.asarray(forgetting, dtype=float)
    X = np.column_stack([np.ones_like(L), -L])
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    alpha, c = (float(v) for v in coef)
    dof = len(y) - 2
    cov = None
    if dof > 0 and np.linalg.matrix_rank(X) == 2:
        sigma2 = float(np.sum((X @ coef - y) ** 2)) / dof
        cov = sigma2 * np.linalg.inv(X.T @ X)
    L0 = alpha / c if c != 0 else float("nan")
    return np.array([c, L0]), cov


def forecast_loss_linear(tokens, forgetting, losses, budget_tokens: float, *, final_loss: float | None = None,
                         fit_fraction: float = FIT_FRACTION, level: float = LEVEL, n_boot: int = N_BOOT,
                         seed: int = 0, time=None, axis: str = "tokens") -> Forecast:
    """Forgetting at the end of the budget from F = c·(L0 − L) fitted to the points within the fit window.
    The loss at the end is `final_loss` when given, else extrapolated: the shifted power law fitted to the
    loss drop L(t1) − L(t) since the first fitted point t1, evaluated at the budget (its own bootstrap draws
    enter the interval) on the time axis `time` (tokens when None; see forecast_power_law), floored at zero."""
    until, t, (y, L) = _window(tokens, forgetting, budget_tokens, fit_fraction, losses)
    if len(t) < MIN_POINTS:
        return _not_enough(LOSS_LINEAR, until, budget_tokens, len(t), level, "points with a training loss", axis)
    (c, L0), cov = fit_loss_linear(L, y)
    rng = np.random.default_rng(seed)
    params = {"c": float(c), "L0": float(L0)}
    if final_loss is None:
        order = np.argsort(t)
        t, y, L = t[order], y[order], L[order]
        u, end = _on_axis(t, budget_tokens, time)
        du, drop = u[1:] - u[0], L[0] - L[1:]
        if len(du) < MIN_POINTS - 1 or not np.all(du > 0):
            return Forecast(model=LOSS_LINEAR, params=params, fit_until_tokens=until, at_tokens=budget_tokens,
                            n_points=len(t), level=level, axis=axis,
                            reason="no final loss given and too few points to extrapolate the loss")
        try:
            lp = fit_power_law(du, drop, end)
        except RuntimeError as e:
            return Forecast(model=LOSS_LINEAR, params=params, fit_until_tokens=until, at_tokens=budget_tokens,
                            n_points=len(t), level=level, axis=axis, reason=f"loss extrapolation failed: {e}")
        x_end = (end - u[0]) / end
        loss_end = max(0.0, float(L[0] - _shape(x_end, *lp)))
        loss_draws = _power_law_draws(du / end, drop, lp, x_end, n_boot, rng)
        loss_draws = None if loss_draws is None else np.maximum(0.0, L[0] - loss_draws)
        params["final_loss_extrapolated"] = loss_end
    else:
        loss_end, loss_draws = float(final_loss), np.full(N_BOOT_LINEAR, float(final_loss))
        params["final_loss_given"] = loss_end
    alpha = c * L0
    predicted = float(alpha - c * loss_end)
    lo = hi = None
    if cov is not None and loss_draws is not None:
        d = rng.multivariate_normal([alpha, c], cov, size=len(loss_draws), method="svd", check_valid="ignore")
        lo, hi = _interval(d[:, 0] - d[:, 1] * loss_draws, level)
    return Forecast(model=LOSS_LINEAR, params=params, predicted=predicted, lo=lo, hi=hi, fit_until_tokens=until,
                    at_tokens=budget_tokens, n_points=len(t), level=level, axis=axis,
                    reason=None if lo is not None else "no interval: too few points for the covariance")


def forecast_forms(tokens, forgetting, kl, budget_tokens: float, *, kl_map: bool = True,
                   fit_fraction: float = FIT_FRACTION, level: float = LEVEL, n_boot: int = N_BOOT, seed: int = 0,
                   time=None, axis: str = "tokens", looks: int = 1) -> dict[str, Forecast]:
    """The default forecast (`DEFAULT`) and the forms it combines, by curve-file key: the shifted power law and
    the saturating law on the signal, with `kl_map` the map through KL on domain text (`kl`: the same points'
    KL(base ‖ model) on the domain's text), and "forms" (`combine_forms`), which abstains when the window saw
    less than `MIN_DRIFT_SEEN` of the domain drift that the saturating law forecasts at the budget."""
    kw = {"fit_fraction": fit_fraction, "level": level, "n_boot": n_boot, "seed": seed, "time": time, "axis": axis}
    forms = {"power_law": forecast_power_law(tokens, forgetting, budget_tokens, looks=looks, **kw),
             "saturating": forecast_saturating(tokens, forgetting, budget_tokens, looks=looks, **kw)}
    drift = forecast_saturating(tokens, kl, budget_tokens, **kw)
    if kl_map:
        forms["kl_mapped"] = forecast_kl_mapped(tokens, forgetting, kl, budget_tokens, looks=looks, kl_end=drift, **kw)
    seen = None
    _, t, (k,) = _window(tokens, kl, budget_tokens, fit_fraction)
    if drift.ok and drift.predicted > 0 and len(t):
        seen = float(k[np.argmax(t)]) / float(drift.predicted)
    return {**forms, FORMS: combine_forms(list(forms.values()), looks=looks, drift_seen=seen)}


def combine_forms(forms: list[Forecast], *, drift_seen: float | None, looks: int = 1) -> Forecast:
    """One forecast from several forms fitted to the same window (`FORMS`): the point is the median of their
    points, the interval runs from the lowest lower bound to the highest upper bound, so it holds the doubt about
    which law is right and not only each law's noise. It abstains (no point, no interval, `reason` says "cannot
    tell") when fewer than two forms give an interval: one law's interval alone is the window's noise around
    that law, or when `drift_seen` (the share of the run's drift on domain text that the window has seen, as
    the saturating law forecasts it) is below `MIN_DRIFT_SEEN` or unknown: a window still in the straight,
    unbent part of the drift holds nothing about where it will bend. `looks` > 1 takes each form's
    `lo_adjusted` for the stop's bound (each form's draws at the Bonferroni level: the lowest of them is at
    least as low as a bound at that level)."""
    made = [f for f in forms if f.ok]
    with_iv = [f for f in made if f.lo is not None]
    base = forms[0]
    out = Forecast(model=FORMS, fit_until_tokens=base.fit_until_tokens, at_tokens=base.at_tokens,
                   n_points=base.n_points, level=base.level, axis=base.axis, looks=looks,
                   params={"forms": {f.model: {"predicted": f.predicted, "lo": f.lo, "hi": f.hi,
                                               **({"reason": f.reason} if f.reason else {})} for f in forms},
                           "drift_seen": drift_seen})
    if drift_seen is None or drift_seen < MIN_DRIFT_SEEN:
        out.reason = ("cannot tell from this window: " + (
            "the drift on domain text has no forecast" if drift_seen is None else
            f"it saw {drift_seen:.0%} of the drift on domain text forecast for the whole budget, less than "
            f"{MIN_DRIFT_SEEN:.0%}: the drift has not bent yet, so nothing in the window says where it will") +
            "; the curve's end will tell")
        return out
    if len(with_iv) < 2:
        out.reason = (f"cannot tell from this window: {len(with_iv)} of the {len(forms)} forms give an interval "
                      f"({'; '.join(f'{f.model}: {f.reason}' for f in forms if f.lo is None)})")
        return out
    out.predicted = float(np.median([f.predicted for f in made]))
    out.lo = min(f.lo for f in with_iv)
    out.hi = max(f.hi for f in with_iv)
    if looks > 1 and any(f.looks != looks or f.lo_adjusted is None for f in with_iv):
        raise ValueError(f"every form needs its lower bound for {looks} looks (forecast them with looks={looks})")
    out.lo_adjusted = min(f.lo_adjusted for f in with_iv) if looks > 1 else out.lo
    return out


def backtest_words(signal: str) -> str:
    """What the backtest measured for the default forecast of `signal` (`BACKTEST`), in words."""
    b = BACKTEST.get(signal)
    if not b:
        return "not backtested on this signal"
    return (f"intervals like this one covered the end in {b['covered']} of {b['with_interval']} backtest runs "
            f"(it abstained in {b['abstained']} of {b['runs']}; docs/curves.md, \"Backtest\")")


def should_stop(forecast: Forecast, margin: float) -> bool:
    """True when the forecast's lower bound (`stop_bound`: corrected for the stop's looks) exceeds `margin`
    (same units as the forgetting signal): the run will very likely forget more than allowed, so continuing is
    wasted compute. No forecast or no interval: False."""
    bound = forecast.stop_bound
    return bound is not None and bound > margin
