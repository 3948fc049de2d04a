"""The forecast's backtest (bench/forecast_backtest.py, docs/curves.md "Backtest"): the figures the report quotes
(forecast.BACKTEST) are what the stored runs give, the stored forecasts are what the code forecasts today, and
the default meets the targets it is kept for: its intervals cover the end in at least 80% of the runs it does not
abstain on, and its stop is wrong in at most 5% of the (run, margin) pairs that should go on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from forgetcheck.train import forecast
from tests.conftest import bench_module

REPO = Path(__file__).resolve().parents[2]


def _bench():
    return bench_module("forecast_backtest")


def _runs() -> list[dict]:
    return json.loads((REPO / "bench" / "results" / "forecast_backtest.json").read_text())["runs"]


@pytest.mark.parametrize("signal", ["soft_acc", "kl_domain"])
def test_the_figures_the_report_quotes_are_the_stored_runs(signal):
    bench, runs = _bench(), _runs()
    assert len(runs) >= 12 and len({r["arm"] for r in runs}) >= 3 and len({r["peak_lr"] for r in runs}) >= 3
    assert len({r["budget_tokens"] for r in runs}) >= 2
    rows = [r["default"][signal] for r in runs if r["default"][signal] is not None]
    got = bench.summarize(rows)
    assert {k: got[k] for k in forecast.BACKTEST[signal]} == forecast.BACKTEST[signal]


def test_the_default_meets_its_targets_on_the_backtest():
    b = forecast.BACKTEST["soft_acc"]
    assert b["with_interval"] >= 3  # it forecasts somewhere: an always-abstaining forecaster is no forecaster
    assert b["covered"] >= 0.8 * b["with_interval"]
    assert b["false_stops"] <= 0.05 * b["below_margin_pairs"]


def test_the_stored_forecasts_are_what_the_code_forecasts():
    """Two runs, one it forecasts and one it abstains on, refitted now (the whole set: the slow test below)."""
    bench, runs = _bench(), _runs()
    made = next(r for r in runs if r["default"]["soft_acc"]["predicted"] is not None)
    abstained = next(r for r in runs if r["default"]["soft_acc"]["predicted"] is None)
    for run in (made, abstained):
        assert bench.default_row(run, "soft_acc") == pytest.approx(run["default"]["soft_acc"], rel=1e-9)


@pytest.mark.slow
def test_every_stored_forecast_is_what_the_code_forecasts():
    bench, runs = _bench(), _runs()
    for run in runs:
        for signal in bench.SIGNALS:
            assert bench.default_row(run, signal) == pytest.approx(run["default"][signal], rel=1e-9), run["run"]
