"""Forecast of final forgetting from the first part of a training run (numpy/scipy only; no torch).

Two models are fitted to the forgetting signal F measured at points during training (train/signals.py), using only
the points within the first `fit_fraction` of the token budget (default 0.25). See docs/curves.md.

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

Interval: for the power law, a residual bootstrap. The fit's residuals (centred, inflated by sqrt(n/(n−3))
for the three fitted parameters) are resampled onto the fitted values, the law refitted from the estimate,
and each refit's value at the budget kept (`N_BOOT` refits); for the linear model, a parametric bootstrap
from the ordinary least-squares estimate and covariance of (α, c), combined draw by draw with the final
loss (fixed when given, else the loss extrapolation's own residual-bootstrap draws). The interval is the
central `level` quantile range of the draws (default 90%). A normal approximation of the power law's
covariance is not used: a and t0 are strongly correlated and the curve is far from linear in them, so it
gives absurd intervals. With no residual degree of freedom (as many points as parameters), when fewer than 10
refits converge, or when the refits' interval does not hold the fitted value itself, there is no interval
(lo = hi = None; `reason` says which): the forecast keeps its point value and never stops a run.

Repeated looks: a power-law forecast made for a stop that is checked at `looks` points of a run also keeps
`lo_adjusted`, the lower bound at one-sided level 1 − (1 − level)/2/looks from the same draws (Bonferroni: the
lower side's error split over the looks, valid whatever their dependence); `should_stop` uses it. With one
look it is `lo`. `lo` and `hi` keep their meaning. See docs/curves.md, "Repeated looks".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

FIT_FRACTION = 0.25
LEVEL = 0.90
N_BOOT = 400  # residual-bootstrap refits of the power law (each a least-squares fit from the estimate)
N_BOOT_LINEAR = 4000  # parameter draws of the linear model when the final loss is given (no refit)
MIN_POINTS = 3
POWER_LAW = "shifted_power_law"
LOSS_LINEAR = "loss_linear"
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
        return asdict(self)


def _shape(x, a, s, b):
    return a * ((1.0 + x / s) ** b - 1.0)


def _window(tokens, values, budget_tokens: float, fit_fraction: float, *extra):
    t = np.asarray(tokens, dtype=float)
    arrays = [np.asarray(v, dtype=float) for v in (values, *extra)]
    if budget_tokens <= 0 or not 0 < fit_fraction <= 1:
        raise ValueError(f"budget_tokens must be > 0 and fit_fraction in (0, 1]; got {budget_tokens}, {fit_fraction}")
    until = fit_fraction * budget_tokens
    keep = (t <= until) & np.all([np.isfinite(a) for a in arrays], axis=0) & np.isfinite(t)
    return until, t[keep], [a[keep] for a in arrays]


def _jac(x, a, s, b):
    u = 1.0 + x / s
    ub = u ** b
    return np.column_stack([ub - 1.0, -a * b * ub / u * x / s ** 2, a * ub * np.log(u)])


def _curve_fit(x, y, p0, lower, upper, max_nfev: int = 2000):
    import warnings

    from scipy.optimize import OptimizeWarning, curve_fit

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", OptimizeWarning)
        return curve_fit(_shape, x, y, p0=p0, bounds=(lower, upper), jac=_jac, max_nfev=max_nfev)


def _bounds(y) -> tuple[list[float], list[float]]:
    amp = max(float(np.max(np.abs(y))), 1e-12)
    return [-1e4 * amp, _S_BOUNDS[0], _B_BOUNDS[0]], [1e4 * amp, _S_BOUNDS[1], _B_BOUNDS[1]]


def fit_power_law(tokens, forgetting, scale: float) -> np.ndarray:
    """(a, s, b) of F = a·((1 + t/(s·scale))^b − 1) fitted to the points: least squares from several starting
    points (a grid over s and b, a by linear least squares given them), the best kept."""
    x = np.asarray(tokens, dtype=float) / scale
    y = np.asarray(forgetting, dtype=float)
    lower, upper = _bounds(y)
    best, best_sse = None, math.inf
    for s0 in (0.01, 0.1, 1.0):
        for b0 in (0.5, 1.0):
            g = _shape(x, 1.0, s0, b0)
            a0 = float(np.dot(g, y) / np.dot(g, g)) if np.dot(g, g) > 0 else 0.0
            a0 = float(np.clip(a0, lower[0] * 0.99, upper[0] * 0.99)) or 1e-3 * upper[0]
            try:
                p, _ = _curve_fit(x, y, [a0, s0, b0], lower, upper, max_nfev=400)
            except (RuntimeError, ValueError):
                continue
            sse = float(np.sum((_shape(x, *p) - y) ** 2))
            if sse < best_sse:
                best, best_sse = p, sse
    if best is None:
        raise RuntimeError("the shifted power law did not converge from any starting point")
    return best


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
    """Residual bootstrap: refit (from the fitted parameters) to fitted values plus resampled residuals
    (centred, inflated by sqrt(n / (n − 3)) for the fitted parameters); each refit's value at x_end (a refit
that fails is left out of the quantiles).
    None without a residual degree of freedom."""
    n = len(x)
    if n <= 3:
        return None
    fitted = _shape(x, *p)
    res = y - fitted
    res = (res - res.mean()) * math.sqrt(n / (n - 3))
    if not np.any(np.abs(res) > 1e-12 * max(float(np.max(np.abs(y))), 1e-300)):
        return np.full(n_boot, float(_shape(x_end, *p)))  # an exact fit: every replicate is the same curve
    from scipy.optimize import least_squares

    def resid(q, yb):
        return _shape(x, q[0], math.exp(q[1]), q[2]) - yb

    def jac(q, yb):
        j = _jac(x, q[0], math.exp(q[1]), q[2])
        j[:, 1] *= math.exp(q[1])
        return j

    q0 = np.array([p[0], math.log(p[1]), p[2]])
    out = np.full(n_boot, np.nan)
    for i in range(n_boot):
        yb = fitted + rng.choice(res, size=n, replace=True)
        try:  # Levenberg-Marquardt in (a, log s, b): quick from the estimate, and s stays positive
            with np.errstate(all="ignore"):
                r = least_squares(resid, q0, jac=jac, args=(yb,), method="lm", max_nfev=400)
        except (ValueError, OverflowError):
            continue
        if r.success:
            out[i] = _shape(x_end, r.x[0], math.exp(r.x[1]), r.x[2])
    return out


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
    until, t, (y,) = _window(tokens, forgetting, budget_tokens, fit_fraction)
    y, t = y[t > 0], t[t > 0]
    if len(t) < MIN_POINTS:
        return _not_enough(POWER_LAW, until, budget_tokens, len(t), level, "points after step 0", axis)
    u, end = _on_axis(t, budget_tokens, time)
    if not end > 0 or np.any(u <= 0) or np.any(np.diff(u[np.argsort(t)]) < 0):
        return Forecast(model=POWER_LAW, fit_until_tokens=until, at_tokens=budget_tokens, n_points=len(t),
                        level=level, axis=axis, reason=f"the time axis ({axis}) is not positive and increasing")
    try:
        p = fit_power_law(u, y, end)
    except RuntimeError as e:
        return Forecast(model=POWER_LAW, fit_until_tokens=until, at_tokens=budget_tokens, n_points=len(t),
                        level=level, axis=axis, reason=str(e))
    a, s, b = (float(v) for v in p)
    t0 = s * end
    predicted = float(_shape(1.0, a, s, b))
    if looks < 1:
        raise ValueError(f"looks must be >= 1; got {looks}")
    draws = _power_law_draws(u / end, y, p, 1.0, n_boot, np.random.default_rng(seed))
    lo, hi = _interval(draws, level)
    fitted = _shape(u / end, a, s, b)
    params = {"A": a / t0 ** b, "t0": t0, "b": b, "a": a, "axis_end": end,
              "rmse": float(np.sqrt(np.mean((fitted - y) ** 2)))}
    why = None
    if lo is not None and not lo <= predicted <= hi:  # the refits settle elsewhere than the fit: ill-posed
        lo = hi = None
        why = ("no interval: the bootstrap refits do not bracket the fitted value (the window's points do not "
               "pin the law down)")
    elif lo is None:
        why = ("no interval: as many points as parameters" if len(t) <= 3 else
               "no interval: fewer than 10 of the bootstrap refits converged (the window's points fit the law "
               "too loosely to bound it)")
    out = Forecast(model=POWER_LAW, params=params, predicted=predicted, lo=lo, hi=hi, fit_until_tokens=until,
                   at_tokens=budget_tokens, n_points=len(t), level=level, reason=why, axis=axis, looks=looks)
    if lo is not None:
        out.lo_adjusted = _quantiles(draws, (1.0 - level) / 2.0 / looks)[0]  # 1 − look_level, unrounded
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


def should_stop(forecast: Forecast, margin: float) -> bool:
    """True when the forecast's lower bound (`stop_bound`: corrected for the stop's looks) exceeds `margin`
    (same units as the forgetting signal): the run will very likely forget more than allowed, so continuing is
    wasted compute. No forecast or no interval: False."""
    bound = forecast.stop_bound
    return bound is not None and bound > margin
