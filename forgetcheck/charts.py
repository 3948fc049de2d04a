"""Chart geometry for the report's inline SVG: round tick values, a linear scale from data to pixels, tick labels.
Pure Python; report.py and report_curves.py lay out their charts with it."""

from __future__ import annotations

import math


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if hi - lo < 1e-12:
        lo, hi = lo - 1, hi + 1
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t < hi + step * 0.999:
        ticks.append(round(t, 10))
        t += step
    return ticks


class Scale:
    def __init__(self, lo: float, hi: float, px0: float, px1: float, n_ticks: int = 5):
        self.ticks = nice_ticks(lo, hi, n_ticks)
        self.lo, self.hi = self.ticks[0], self.ticks[-1]
        self.px0, self.px1 = px0, px1

    def __call__(self, v: float) -> float:
        return round(self.px0 + (v - self.lo) / (self.hi - self.lo) * (self.px1 - self.px0), 2)


def tick_label(v: float) -> str:
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:g}"
