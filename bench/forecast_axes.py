"""How well the forecast at a quarter of the budget predicted the end, on a finished run's curves, with two time
axes for the shifted power law: training tokens and the integral of the learning rate (the sum of the lr factors
of the steps taken, `forecast.lr_integral`; what train/curve.py forecasts with, since a schedule's decay slows
the drift, which a power law in tokens cannot know). Works on runs made before the curve files kept both.

    python bench/forecast_axes.py RUN_FOLDER [--signals soft_acc,kl_general,kl_domain]

Reads runs/<id>/curves/<arm>.json and train/<arm>.json (its lr_curve); fits the points of the forecast
window (the curve's meta: fit_until_tokens) on each axis and prints, per arm and signal, the forecast, its 90%
interval, the value measured at the end of the budget, the miss, and the same for the curve's last point before
the end, so a bend after the window shows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--signals", default="soft_acc,kl_general,kl_domain")
    a = ap.parse_args()

    import numpy as np

    from forgetcheck.train import forecast, signals

    for path in sorted((a.run / "curves").glob("*.json")):
        curve = signals.read_curve(path)
        tr = json.loads((a.run / "train" / path.name).read_text())
        lr = [float(v) for _, v in sorted(tr["lr_curve"])]  # the lr of optimizer steps 1..n
        factors = [v / max(lr) for v in lr]
        cum = forecast.lr_integral(factors.__getitem__, len(factors))  # cum[k]: after k steps
        until = curve.meta["fit_until_tokens"]
        budget = curve.meta["budget_tokens"]
        tps = curve.meta["tokens_per_step"]
        print(f"== {curve.arm}: window up to {until} tokens of {budget}; lr integral there "
              f"{cum[until // tps]:.2f} of {cum[-1]:.2f} (peak-lr steps)")
        for sig in a.signals.split(","):
            t, f, _ = curve.forgetting(sig)
            if len(t) == 0:
                continue
            measured = float(f[-1]) if t[-1] >= budget else None
            x = np.array([cum[int(v) // tps] for v in t])
            x_end = cum[-1]
            for name, xs, end, frac in (("tokens", t, budget, until / budget),
                                        ("lr integral", x, x_end, cum[until // tps] / x_end + 1e-9)):
                fc = forecast.forecast_power_law(xs, f, end, fit_fraction=frac, n_boot=200)
                if fc.predicted is None:
                    print(f"   {sig:10s} {name:11s} no forecast: {fc.reason}")
                    continue
                iv = "none" if fc.lo is None else f"[{fc.lo:.3f}, {fc.hi:.3f}]"
                miss = "" if measured is None else f", miss {measured - fc.predicted:+.3f}"
                inside = "" if measured is None or fc.lo is None else f", inside: {fc.lo <= measured <= fc.hi}"
                print(f"   {sig:10s} {name:11s} forecast {fc.predicted:.3f} {iv}; measured "
                      f"{'n/a' if measured is None else f'{measured:.3f}'}{miss}{inside}")


if __name__ == "__main__":
    main()
