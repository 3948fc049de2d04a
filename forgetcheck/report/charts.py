"""Chart geometry for the report's inline SVG: round tick values, a linear scale from data to pixels, tick labels.
Pure Python; report/html.py and report/curves.py lay out their charts with it."""

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


LABEL_CHAR_PX = 7.0  # width of one character of a 12px bold label, about
LABEL_LINE_PX = 14.0


def place_labels(points: list[dict], text: str = "label", dx: float = 9.0, dy: float = -8.0,
                 bottom: float | None = None) -> None:
    """Set `lx`, `ly` on each point (its label's baseline start) so that no two labels overlap: each label
    starts at (cx + dx, cy + dy); one that would cover a label already placed moves down a line at a time
    (points taken top to bottom), or up when that would run past `bottom`."""
    placed: list[tuple[float, float, float, float]] = []

    def clash(x0, y0, x1, y1):
        return any(x0 < b[2] and b[0] < x1 and y0 < b[3] and b[1] < y1 for b in placed)

    for p in sorted(points, key=lambda q: (q["cy"], q["cx"])):
        x, y = p["cx"] + dx, p["cy"] + dy
        width = LABEL_CHAR_PX * len(str(p[text]))
        step = LABEL_LINE_PX
        tries = 0
        while clash(x, y - LABEL_LINE_PX + 3, x + width, y + 3) and tries < 40:
            y += step
            tries += 1
            if bottom is not None and y > bottom and step > 0:  # ran off the plot: search upwards instead
                y, step = p["cy"] + dy - LABEL_LINE_PX, -LABEL_LINE_PX
        p["lx"], p["ly"] = round(x, 2), round(y, 2)
        placed.append((x, y - LABEL_LINE_PX + 3, x + width, y + 3))
