"""The report's forgetting-curve section: learning and forgetting against training tokens, every arm on one
chart per signal, the forecast made at the end of the forecast window beside the value measured at the end of
the budget, and why an arm stopped early. Reads runs/<id>/curves/<arm>.json (train/signals.py's schema) as JSON only.
"""

from __future__ import annotations

import math
from typing import Any

from forgetcheck.report.charts import Scale, tick_label
from forgetcheck.rundir import RunDir
from forgetcheck.schema import FORECAST_MODELS, read_curve
from forgetcheck.train.forecast import backtest_words  # numpy only: the backtest's figures
from forgetcheck.train.signals import worse  # torch-free: the direction rule train/signals.py's forecasts use

PANELS = (  # signal, title, y label, sign (+1: forgetting as stored, -1: learning = the drop of the signal)
    ("soft_acc", "Forgetting: retention soft accuracy lost", "points lost", +1),
    ("bpb_domain", "Learning: domain bits per byte gained", "bits/byte gained", -1),
    ("kl_general", "Drift: KL(base ‖ arm) on general text", "nats/token", +1),
)
MODEL_NAMES = {"power_law": "shifted power law", "power_law_tokens": "shifted power law",
               "loss_linear": "linear in training loss", "saturating": "saturating law",
               "kl_mapped": "through KL on domain text", "forms": "the forms together (default)"}
AXIS_NAMES = {"lr_integral": " (lr integral)", "tokens": " (tokens)"}  # what a forecast was fitted against
SIGNAL_NAMES = {"soft_acc": "retention soft accuracy lost (points)", "kl_general": "KL on general text (nats/token)",
                "kl_domain": "KL on domain text (nats/token)", "bpb_general": "general bits per byte rise"}


def _series(curve: dict, signal: str, sign: int) -> list[tuple[float, float]]:
    """(tokens, value) from the base (0, 0) on: soft_acc base − value, bits per byte value − base (times
    `sign`: −1 turns a drop into learning), KL the value."""
    base = curve["base"][signal]
    out = [(0.0, 0.0)]
    for p in sorted(curve["points"], key=lambda p: p["tokens"]):
        v = p[signal]
        if v is None or not math.isfinite(v) or (signal != "kl_general" and base is None):
            continue
        out.append((float(p["tokens"]), sign * worse(signal, v, base)))
    return out if len(out) > 1 else []


def _panel(curves: dict[str, dict], colors: dict, signal: str, title: str, ylabel: str, sign: int) -> dict | None:
    series = []
    for arm, c in curves.items():
        pts = _series(c, signal, sign)
        if pts:
            series.append({"arm": arm, "curve": pts, "color": colors[arm],
                           "fc": _forecast_mark(c, signal) if sign > 0 else None})
    if not series:
        return None
    w, h, ml, mr, mt, mb = 420, 260, 64, 16, 16, 44
    xs = [x for s in series for x, _ in s["curve"]]
    ys = [y for s in series for _, y in s["curve"]]
    ys += [v for s in series if s["fc"] for v in (s["fc"]["lo"], s["fc"]["hi"], s["fc"]["predicted"]) if v is not None]
    xs += [s["fc"]["at"] for s in series if s["fc"]]
    sx = Scale(0.0, max(xs), ml, w - mr)
    sy = Scale(min(0.0, min(ys)), max(ys), h - mb, mt)
    for s in series:
        s["points"] = " ".join(f"{sx(x)},{sy(y)}" for x, y in s["curve"])
        s["dots"] = [{"x": sx(x), "y": sy(y)} for x, y in s["curve"][1:]]
        fc = s.pop("fc")
        s["mark"] = None
        if fc and fc["predicted"] is not None:
            s["mark"] = {"x": sx(fc["at"]), "y": sy(fc["predicted"]),
                         "y0": sy(fc["lo"]) if fc["lo"] is not None else None,
                         "y1": sy(fc["hi"]) if fc["hi"] is not None else None, "fit_x": sx(fc["fit_until"])}
        del s["curve"]
    return {"id": signal, "title": title, "ylabel": ylabel, "w": w, "h": h, "series": series, "left": ml,
            "right": w - mr, "top": mt, "bottom": h - mb, "y0": sy(0.0),
            "xticks": [{"v": tick_label(t), "x": sx(t)} for t in sx.ticks],
            "yticks": [{"v": tick_label(t), "y": sy(t)} for t in sy.ticks]}


def _forecast_mark(curve: dict, signal: str) -> dict | None:
    fc = curve["meta"]["forecast"]
    m = fc["signals"][signal][fc["default"]]  # schema: "power_law" for files written before the forms
    if m is None or m["predicted"] is None:
        return None
    return {"predicted": m["predicted"], "lo": m["lo"], "hi": m["hi"], "at": float(fc["at_tokens"]),
            "fit_until": float(fc["made_at_tokens"] or 0.0)}


def forecast_rows(curves: dict[str, dict], colors: dict) -> list[dict]:
    """One row per arm, signal and model: the forecast made at the end of the window, its interval, the value
    measured at the end of the budget, the miss, and whether the interval held it."""
    rows = []
    for arm, c in curves.items():
        fc = c["meta"]["forecast"]
        for signal, e in fc["signals"].items():
            for model in FORECAST_MODELS:
                m = e[model]
                if not m:
                    continue
                measured = e["measured"]
                name = MODEL_NAMES[model] + AXIS_NAMES.get(m["axis"], "")
                default = model == fc["default"]
                rows.append({"arm": arm, "color": colors[arm], "signal": SIGNAL_NAMES.get(signal, signal),
                             "model": name,
                             "made_at": fc["made_at_tokens"], "at": fc["at_tokens"],
                             "predicted": m["predicted"], "lo": m["lo"], "hi": m["hi"],
                             "measured": measured,
                             "error": None if measured is None or m["predicted"] is None else measured - m["predicted"],
                             "inside": m["inside"], "reason": m["reason"] or e["note"] or "",
                             "default": default, "backtest": backtest_words(signal) if default else ""})
    return rows


def curves_view(run: RunDir, arms: list[str], colors: dict) -> dict[str, Any]:
    """What the template's curve section needs; empty when no arm has a curve file."""
    curves = {}
    for arm in arms:
        p = run.curve_json(arm)
        if p.exists():
            curves[arm] = read_curve(p)
    if not curves:
        return {"curve_panels": [], "curve_rows": [], "curve_notes": [], "curve_backtest": ""}
    notes = []
    for arm, c in curves.items():
        meta = c["meta"]
        o = meta["overhead"]
        sizes = meta["sizes"]
        if o["fraction"] is not None:
            notes.append(f"{arm}: {len(c['points'])} points ({sizes['n_items']} items, "
                         f"{sizes['n_tokens']} tokens of each text); measuring cost {o['fraction']:.0%} of the "
                         f"{o['train_s']:.0f} s of training (predicted {sizes['predicted_fraction']:.0%})")
        if meta["stopped_early"]:
            notes.append(f"{arm} STOPPED EARLY: {meta['stopped_early']['reason']}")
    panels = [p for p in (_panel(curves, colors, *spec) for spec in PANELS) if p]
    return {"curve_panels": panels, "curve_rows": forecast_rows(curves, colors), "curve_notes": notes,
            "curve_backtest": f"for retention soft accuracy lost, {backtest_words('soft_acc')}"}
