"""train/forecast.py: the shifted power law and the loss-linear model recover known parameters, the interval
covers the truth, too few points give no forecast, and the early-stop rule fires only on a curve that will
forget more than the margin."""

from __future__ import annotations

import numpy as np
import pytest

from forgetcheck.train import forecast
from forgetcheck.train.forecast import Forecast, forecast_loss_linear, forecast_power_law, should_stop

BUDGET = 1e8
T = np.geomspace(1e5, 2.5e7, 12)  # the first quarter of the budget, log-spaced


def law(t, A, t0, b):
    return A * ((t + t0) ** b - t0 ** b)


def test_power_law_recovers_its_parameters_without_noise():
    f = forecast_power_law(T, law(T, 0.01, 2e6, 0.5), BUDGET, n_boot=20)
    assert f.ok and f.model == forecast.POWER_LAW and f.n_points == 12 and f.fit_until_tokens == 0.25 * BUDGET
    assert f.params["A"] == pytest.approx(0.01, rel=1e-4)
    assert f.params["t0"] == pytest.approx(2e6, rel=1e-4)
    assert f.params["b"] == pytest.approx(0.5, rel=1e-4)
    assert f.predicted == pytest.approx(law(BUDGET, 0.01, 2e6, 0.5), rel=1e-6)  # 86.85
    assert f.lo == pytest.approx(f.predicted, rel=1e-6) and f.hi == pytest.approx(f.predicted, rel=1e-6)


def test_power_law_with_noise_covers_the_truth_and_ignores_points_past_the_window():
    truth = law(BUDGET, 0.01, 2e6, 0.5)
    y = law(T, 0.01, 2e6, 0.5) + np.random.default_rng(2).normal(0, 0.02 * law(T[-1], 0.01, 2e6, 0.5), T.size)
    f = forecast_power_law(T, y, BUDGET, n_boot=60)
    assert f.lo < truth < f.hi
    assert f.predicted == pytest.approx(truth, rel=0.1)
    assert f.params["b"] == pytest.approx(0.5, abs=0.1)
    # points after the first quarter do not enter the fit
    late = np.array([5e7, 9e7])
    g = forecast_power_law(np.r_[T, late], np.r_[y, [1e6, -1e6]], BUDGET, n_boot=60)
    assert g.n_points == 12 and g.predicted == pytest.approx(f.predicted, rel=1e-9)


def test_too_few_points_give_no_forecast_and_three_give_no_interval():
    f = forecast_power_law(T[:2], law(T[:2], 0.01, 2e6, 0.5), BUDGET)
    assert not f.ok and f.predicted is None and "not enough points" in f.reason and f.n_points == 2
    assert not should_stop(f, margin=-1e9)
    zero = forecast_power_law([0.0, *T[:2]], [0.0, *law(T[:2], 0.01, 2e6, 0.5)], BUDGET)
    assert not zero.ok  # a point at t = 0 adds nothing (F(0) = 0 is built in)
    g = forecast_power_law(T[:3], law(T[:3], 0.01, 2e6, 0.5), BUDGET)
    assert g.ok and g.lo is None and g.hi is None and not should_stop(g, margin=-1e9)
    json_ready = Forecast(**g.to_dict())
    assert json_ready == g


def test_early_stop_fires_on_a_curve_that_will_exceed_the_margin_and_not_on_one_that_will_not():
    rng = np.random.default_rng(5)
    steep = law(T, 0.01, 2e6, 0.5)  # reaches 86.9 at the budget
    flat = law(T, 0.002, 2e6, 0.5)  # reaches 17.4
    margin = 40.0
    assert steep[-1] < margin  # nothing measured so far exceeds the margin: only the forecast can tell
    f_steep = forecast_power_law(T, steep + rng.normal(0, 0.3, T.size), BUDGET, n_boot=60)
    f_flat = forecast_power_law(T, flat + rng.normal(0, 0.3, T.size), BUDGET, n_boot=60)
    assert should_stop(f_steep, margin) and f_steep.lo > margin
    assert not should_stop(f_flat, margin) and f_flat.hi < margin


def test_a_stop_checked_at_several_looks_compares_the_bonferroni_lower_bound():
    """Planted: a lower bound past the margin at 95% (the 90% interval's lower side) but not at the
    Bonferroni level over 8 looks (99.375%, one-sided): no stop; with one look the same bound stops."""
    planted = Forecast(model=forecast.POWER_LAW, predicted=5.0, lo=2.5, hi=7.0, looks=8, lo_adjusted=1.5)
    assert planted.look_level == pytest.approx(1 - 0.05 / 8) and planted.stop_bound == 1.5
    assert not should_stop(planted, margin=2.0)
    assert should_stop(Forecast(**{**planted.to_dict(), "looks": 1}), margin=2.0)
    assert not should_stop(Forecast(**{**planted.to_dict(), "lo_adjusted": None}), margin=-1e9)
    # from the bootstrap draws: the same draws (seed), so lo and hi keep their meaning; only the stop's bound moves
    y = law(T, 0.002, 2e6, 0.5) + np.random.default_rng(7).normal(0, 0.5, T.size)
    one = forecast_power_law(T, y, BUDGET, n_boot=100)
    eight = forecast_power_law(T, y, BUDGET, n_boot=100, looks=8)
    assert (eight.lo, eight.hi, eight.predicted) == (one.lo, one.hi, one.predicted) and one.lo_adjusted == one.lo
    assert eight.lo_adjusted < eight.lo
    margin = (eight.lo + eight.lo_adjusted) / 2
    assert should_stop(one, margin) and not should_stop(eight, margin)
    with pytest.raises(ValueError, match="looks"):
        forecast_power_law(T, y, BUDGET, n_boot=20, looks=0)


def test_a_clear_case_still_stops_after_the_correction():
    steep = law(T, 0.01, 2e6, 0.5) + np.random.default_rng(5).normal(0, 0.3, T.size)  # reaches 86.9
    f = forecast_power_law(T, steep, BUDGET, n_boot=100, looks=8)
    assert f.lo_adjusted < f.lo and should_stop(f, margin=40.0) and f.lo_adjusted > 40.0


def test_loss_linear_recovers_its_slope_and_forecasts_from_a_given_final_loss():
    L = 3.0 - 0.4 * (1 - np.exp(-T / 1e7))
    F = 2.5 * (3.0 - L) + np.random.default_rng(3).normal(0, 0.005, T.size)
    f = forecast_loss_linear(T, F, L, BUDGET, final_loss=2.5)
    assert f.model == forecast.LOSS_LINEAR and f.ok and f.n_points == 12
    assert f.params["c"] == pytest.approx(2.5, rel=0.03)
    assert f.params["L0"] == pytest.approx(3.0, abs=0.01)
    assert f.lo < 2.5 * 0.5 < f.hi and f.predicted == pytest.approx(1.25, rel=0.03)


def test_loss_linear_extrapolates_a_power_law_loss():
    drop = law(T, 1e-3, 2e6, 0.4)  # the loss falls along a shifted power law
    L = 3.0 - drop
    f = forecast_loss_linear(T, 1.5 * drop, L, BUDGET, n_boot=50)
    truth = 1.5 * law(BUDGET, 1e-3, 2e6, 0.4)
    assert f.params["c"] == pytest.approx(1.5, rel=1e-6)
    assert f.predicted == pytest.approx(truth, rel=0.02)
    missing = forecast_loss_linear(T[:2], drop[:2], L[:2], BUDGET)
    assert not missing.ok and "not enough points" in missing.reason


def test_the_lr_integral_axis_knows_a_decaying_schedule_that_tokens_cannot():
    """Forgetting that is a power law in the learning-rate integral bends after the window under a cosine
    schedule: the law on that axis recovers the end value; the same law in tokens overshoots it."""
    import math

    steps, tps = 64, 1000
    factor = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / (steps - 1))) for i in range(steps)]
    cum = forecast.lr_integral(lambda i: factor[i], steps)
    assert cum[0] == 0 and cum[1] == pytest.approx(1.0) and cum[-1] == pytest.approx(sum(factor))
    k = np.arange(1, steps // 4 + 1)
    y = law(cum[k], 0.8, 3.0, 0.6)
    truth = law(cum[-1], 0.8, 3.0, 0.6)

    def time(tokens):
        return cum[int(round(tokens / tps))]

    lr = forecast_power_law(k * tps, y, steps * tps, n_boot=20, time=time, axis="lr_integral")
    tok = forecast_power_law(k * tps, y, steps * tps, n_boot=20)
    assert lr.axis == "lr_integral" and tok.axis == "tokens"
    assert lr.predicted == pytest.approx(truth, rel=1e-3)
    assert tok.predicted > 1.2 * truth  # the decay after the window is invisible in tokens
    assert Forecast(**lr.to_dict()) == lr


def test_the_extrapolated_final_loss_is_never_negative():
    """A loss falling steeply in the window would cross zero at the budget: the loss-linear model floors it."""
    t = np.linspace(1e6, 2.5e7, 8)
    loss = 3.0 - 1e-7 * t  # 0.5 at the window's end, -7 at the budget
    f = forecast_loss_linear(t, 4.0 * (3.0 - loss), loss, BUDGET, n_boot=40)
    assert f.params["final_loss_extrapolated"] >= 0.0
    assert f.predicted <= 4.0 * 3.0 + 1e-6 and (f.hi is None or f.hi <= 4.0 * 3.0 + 1e-6)


def test_an_interval_that_does_not_hold_its_own_forecast_is_not_given():
    """Four points that accelerate (measured: general-text bits per byte of sft at --preset forget, on the
    schedule's lr integral) pin the law down so loosely that the refits settle away from the fit: the 90%
    refit range was [0.046, 0.093] around a forecast of 0.297. No interval then, and the reason says so."""
    tokens = np.array([2048.0, 4096.0, 6144.0, 8192.0])
    y = np.array([-0.0076521, 0.00423725, 0.01510141, 0.03032393])
    cum = {2048.0: 1 / 3 + 2 / 3, 4096.0: 2 + 1.0, 6144.0: 3 + 0.99717 + 0.98872, 8192.0: 4.98589 + 0.97475 + 0.95544}
    end = 20.7  # the lr integral of the 32 steps, near enough

    def time(v):
        return cum[v] if v in cum else end

    f = forecast_power_law(tokens, y, 32768.0, n_boot=200, time=time, axis="lr_integral")
    assert f.ok and f.predicted > 0.2
    assert f.lo is None and f.hi is None and "do not bracket" in f.reason
    assert not should_stop(f, margin=-1e9)


def sat(t, A, tau):
    return A * (1 - np.exp(-t / tau))


def test_the_saturating_law_recovers_its_asymptote_and_never_passes_the_window_line():
    f = forecast.forecast_saturating(T, sat(T, 12.0, 2e7), BUDGET, n_boot=20)
    assert f.ok and f.model == forecast.SATURATING and f.n_points == 12
    assert f.params["A"] == pytest.approx(12.0, rel=1e-4) and f.params["tau"] == pytest.approx(2e7, rel=1e-4)
    assert f.predicted == pytest.approx(sat(BUDGET, 12.0, 2e7), rel=1e-6)
    # a window that is still a straight line: the law can only continue the line, never bend upwards
    line = forecast.forecast_saturating(T, 1e-6 * T, BUDGET, n_boot=20)
    assert line.predicted == pytest.approx(1e-6 * BUDGET, rel=0.02) and line.predicted <= 1e-6 * BUDGET * 1.0001
    assert Forecast(**f.to_dict()) == f and "draws" not in f.to_dict()


def test_the_kl_map_scales_the_drift_forecast_by_the_window_ratio():
    kl = sat(T, 0.3, 3e7)
    rng = np.random.default_rng(4)
    f = forecast.forecast_kl_mapped(T, 20.0 * kl + rng.normal(0, 0.05, T.size), kl, BUDGET, n_boot=60)
    assert f.model == forecast.KL_MAPPED and f.params["c"] == pytest.approx(20.0, rel=0.02)
    assert f.params["kl_at_budget"] == pytest.approx(sat(BUDGET, 0.3, 3e7), rel=1e-4)
    assert f.lo < 20.0 * sat(BUDGET, 0.3, 3e7) < f.hi
    flat = forecast.forecast_kl_mapped(T, np.zeros(T.size), np.zeros(T.size), BUDGET)
    assert not flat.ok and "no drift" in flat.reason


def test_the_forms_together_span_every_forms_interval_and_abstain_with_fewer_than_two():
    a = Forecast(model="a", predicted=5.0, lo=4.0, hi=6.0, lo_adjusted=4.0)
    b = Forecast(model="b", predicted=9.0, lo=7.0, hi=12.0, lo_adjusted=7.0)
    c = Forecast(model="c", predicted=30.0, reason="no interval: as many points as parameters")
    f = forecast.combine_forms([a, b, c], drift_seen=0.8)
    assert (f.model, f.predicted, f.lo, f.hi, f.stop_bound) == (forecast.FORMS, 9.0, 4.0, 12.0, 4.0)
    assert f.params["forms"]["c"]["reason"].startswith("no interval")
    one = forecast.combine_forms([a, c], drift_seen=0.8)
    assert not one.ok and one.lo is None and one.reason.startswith("cannot tell from this window: 1 of the 2")
    assert not should_stop(one, margin=-1e9)
    # several looks: the stop compares the lowest corrected bound
    a8, b8 = (Forecast(**{**x.to_dict(), "looks": 8, "lo_adjusted": x.lo - 1}) for x in (a, b))
    assert forecast.combine_forms([a8, b8], looks=8, drift_seen=0.8).stop_bound == 3.0
    with pytest.raises(ValueError, match="looks"):
        forecast.combine_forms([a, b], looks=8, drift_seen=0.8)
    # a window that saw too little of the drift, or whose drift has no forecast: cannot tell
    for seen in (0.3, None):
        assert forecast.combine_forms([a, b], drift_seen=seen).reason.startswith("cannot tell from this window")


def _forget_schedule_time(tokens_per_step: int):
    from forgetcheck.config import TrainConfig
    from forgetcheck.train import optimizer

    cum = forecast.lr_integral(optimizer.lr_lambda(32, TrainConfig()), 32)  # the presets' warmup and cosine
    return lambda v: float(cum[int(round(v / tokens_per_step))])


def test_the_default_does_not_stop_the_run_the_power_law_stopped_wrongly():
    """Planted from docs/curves.md's --preset forget run: sft's window (soft accuracy lost at 2,048-8,192 of
    32,768 tokens; its KL on general text standing in for the domain drift). It ended at 10.06. The power law's
    lower bound, 11.40, would have stopped it at a margin of 10; the forms together keep the doubt about the law
    and do not."""
    t = np.array([2048.0, 4096.0, 6144.0, 8192.0])
    lost, kl = np.array([1.29, 3.63, 5.06, 6.73]), np.array([0.027, 0.119, 0.163, 0.216])
    out = forecast.forecast_forms(t, lost, kl, 32768.0, time=_forget_schedule_time(1024), axis="lr_integral",
                                  n_boot=200)
    assert should_stop(out["power_law"], margin=10.0)  # the old default: a wrong stop
    f = out[forecast.DEFAULT]
    assert f.ok and f.lo <= 10.06 <= f.hi and not should_stop(f, margin=10.0)
    assert f.params["drift_seen"] > forecast.MIN_DRIFT_SEEN


def test_the_default_stops_a_run_that_forgets_far_past_the_margin_and_abstains_on_an_unbent_window():
    """Planted from the backtest's lr6e-4_t16k/sft (bench/forecast_backtest.py): 22.4 points lost at the window's
    end, 35.7 at the budget. A margin of 15 stops it at the window; the same forgetting with a drift that is still
    a straight line in the learning-rate integral abstains, and never stops."""
    t = np.array([1024.0, 2048.0, 3072.0, 4096.0])
    lost, kl = np.array([-0.41, 6.19, 16.10, 22.41]), np.array([0.228, 0.411, 0.648, 0.792])
    time = _forget_schedule_time(512)
    out = forecast.forecast_forms(t, lost, kl, 16384.0, time=time, axis="lr_integral", n_boot=200)
    f = out[forecast.DEFAULT]
    assert f.lo <= 35.74 <= f.hi and should_stop(f, margin=15.0) and not should_stop(f, margin=f.lo + 0.01)
    straight = np.array([0.1 * time(v) for v in t])  # the drift's law sees 39% of its end: a straight line
    g = forecast.forecast_forms(t, lost, straight, 16384.0, time=time, axis="lr_integral", n_boot=200)
    assert not g[forecast.DEFAULT].ok and g[forecast.DEFAULT].reason.startswith("cannot tell from this window")
    assert g[forecast.DEFAULT].params["drift_seen"] == pytest.approx(time(4096) / time(16384), rel=0.02)
    assert not should_stop(g[forecast.DEFAULT], margin=-1e9)


def test_refits_that_wander_to_a_zero_time_scale_are_dropped_not_raised():
    """Found on noise like a random model's curve: a falling signal whose bootstrap refits of the saturating law
    drove its time scale to 0 (exp underflow), and the value at the budget divided by zero. Such refits are left
    out; the forecast is made."""
    t = np.array([1024.0, 2048.0, 3072.0, 4096.0])
    y = np.array([1.0008174349330625, 0.857551882367185, 0.478690205329478, -0.20415931614108573])
    out = forecast.forecast_forms(t, y, 0.1 * y + 0.01 * np.sign(y) + 0.05, 16384.0, kl_map=False,
                                  time=_forget_schedule_time(512), axis="lr_integral", n_boot=200)
    assert out["saturating"].ok and set(out) == {"power_law", "saturating", "forms"}
