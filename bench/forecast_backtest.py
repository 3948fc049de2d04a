"""Backtest of the forgetting forecast: train real runs to the end with their curves, then ask each forecaster,
from the points of the first quarter of the budget only, what the end would be, and compare with the end.

    python bench/forecast_backtest.py train [--out DIR]        # the grid below, smollm2-135m on med (CPU: ~75 min)
    python bench/forecast_backtest.py collect DIR [DIR ...]    # the finished runs' curves -> bench/results/...
    python bench/forecast_backtest.py table [--file F] [--write]  # every forecaster on every run: the table

`train` runs `forgetcheck train --preset forget` once per (peak learning rate, budget) of GRID with the arms
sft, cpt and replay (a mitigation arm), each a run of its own with its forgetting curve (points at steps 2, 4,
6, 8, 16, 24 and 32 of the 32 optimizer steps; the forecast window is the first 8). A finished run is skipped,
so an interrupted `train` goes on where it stopped. `collect` keeps what the table needs from each arm's
curves/<arm>.json and train/<arm>.json (the points, the base, the schedule's learning rates) in
bench/results/forecast_backtest.json, which is committed: `table` and the tests refit from it in seconds.

`table` prints, per forecaster and signal (retention soft accuracy lost; KL on domain text), over the runs: the
median absolute error at the end (and relative to the measured end), the share of runs whose measured end lies
inside the 90% interval (coverage, among the runs with an interval), the share with no forecast or no interval
(abstention), and for the early stop (`forecast.should_stop` on soft accuracy) the false-stop rate over margins
of 1 to 20 points: the (run, margin) pairs that would have stopped though the run ended below the margin, over
all pairs whose run ended below the margin. docs/curves.md, "Backtest", has the table and what it chose.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "forecast_backtest.json"
ARMS = ("sft", "cpt", "replay")
GRID = (  # (name, peak lr, budget tokens, rows per step); every one 32 optimizer steps of 256-token rows
    ("lr6e-4_t16k", 6e-4, 16_384, 2),
    ("lr2e-4_t16k", 2e-4, 16_384, 2),
    ("lr5e-5_t16k", 5e-5, 16_384, 2),  # the quick preset's learning rate and budget
    ("lr1e-4_t32k", 1e-4, 32_768, 4),
    ("lr3e-4_t32k", 3e-4, 32_768, 4),  # the forget preset itself
    ("lr6e-4_t32k", 6e-4, 32_768, 4),
)
DESIGN = ("lr6e-4_t16k", "lr2e-4_t16k", "lr5e-5_t16k")
"""The runs seen when the default's rules were fixed (the forms, MIN_DRIFT_SEEN); the table also reports the
others alone, as a held-out check (lr5e-5_t16k's sft and cpt were seen as an earlier quick-preset run of the same
seed and settings)."""
MARGINS = tuple(range(1, 21))
SIGNALS = ("soft_acc", "kl_domain")
N_BOOT = 200  # the refits train/curve.py's loop takes (curve.FORECAST_BOOT)


def train(out: Path, model: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, lr, budget, micro in GRID:
        run = out / name
        if all((run / "curves" / f"{arm}.json").exists() and (run / "train" / f"{arm}.json").exists()
               for arm in ARMS):
            print(f"{name}: done before, skipped")
            continue
        cmd = [sys.executable, "-m", "forgetcheck", "train", "--base", model, "--data", "med", "--preset", "forget",
               "--arms", ",".join(ARMS), "--lr", str(lr), "--budget-tokens", str(budget),
               "--micro-batch", str(micro), "--out", str(out), "--run-id", name]
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        print(f"{name}: exit {rc} in {time.perf_counter() - t0:.0f} s")
        if rc:
            raise SystemExit(rc)


def collect(runs: list[Path], dest: Path) -> None:
    from forgetcheck.schema import read_curve

    out = []
    for run in runs:
        for path in sorted((run / "curves").glob("*.json")):
            c = read_curve(path)
            if not c["meta"].get("complete") or not (run / "train" / path.name).exists():
                print(f"{run.name}/{c['arm']}: not finished, left out")
                continue
            tr = json.loads((run / "train" / path.name).read_text())
            lrs = [float(v) for _, v in sorted(tr["lr_curve"])]
            out.append({"run": f"{run.name}/{c['arm']}", "arm": c["arm"], "peak_lr": max(lrs),
                        "budget_tokens": c["meta"]["budget_tokens"], "tokens_per_step": c["meta"]["tokens_per_step"],
                        "fit_until_tokens": c["meta"]["fit_until_tokens"], "items": c["meta"]["items"],
                        "lr_factors": [v / max(lrs) for v in lrs], "base": c["base"],
                        "points": [{k: p[k] for k in ("tokens", "step", "train_loss", "soft_acc", "kl_general",
                                                      "kl_domain", "bpb_general", "bpb_domain")}
                                   for p in sorted(c["points"], key=lambda p: p["tokens"])]})
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps({"kind": "forecast_backtest", "runs": out}, indent=1) + "\n")
    print(f"{len(out)} runs -> {dest}")


def series(run: dict, signal: str):
    """(tokens, forgetting, training losses, KL on domain text) of a stored run, the base's point left out."""
    import numpy as np

    from forgetcheck.train.signals import worse

    pts = [p for p in run["points"] if p[signal] is not None and p["kl_domain"] is not None]
    t = np.array([p["tokens"] for p in pts], dtype=float)
    f = worse(signal, np.array([p[signal] for p in pts], dtype=float), float(run["base"].get(signal) or 0.0))
    loss = np.array([np.nan if p["train_loss"] is None else p["train_loss"] for p in pts], dtype=float)
    kl = np.array([p["kl_domain"] for p in pts], dtype=float)
    return t, f, loss, kl


def lr_time(run: dict):
    """The learning-rate integral after the step that ends at `tokens` (what train/curve.py forecasts on)."""
    from forgetcheck.train import forecast

    cum = forecast.lr_integral(run["lr_factors"].__getitem__, len(run["lr_factors"]))
    tps = run["tokens_per_step"]
    return lambda tokens: float(cum[min(max(int(round(tokens / tps)), 0), len(cum) - 1)])


_MEMO: dict = {}


def forecasters() -> dict:
    """name -> f(run, signal) -> forecast.Forecast (None where the forecaster does not apply to the signal)."""
    from forgetcheck.train import forecast

    def tokens_axis(run, signal):
        t, f, _, _ = series(run, signal)
        return forecast.forecast_power_law(t, f, run["budget_tokens"], n_boot=N_BOOT)

    def loss_linear(run, signal):
        if signal != "soft_acc":
            return None
        t, f, loss, _ = series(run, signal)
        return forecast.forecast_loss_linear(t, f, loss, run["budget_tokens"], time=lr_time(run), axis="lr_integral",
                                              n_boot=N_BOOT)

    def forms(run, signal):
        key = (run["run"], signal, "forms")
        if key not in _MEMO:
            t, f, _, kl = series(run, signal)
            _MEMO[key] = forecast.forecast_forms(t, f, kl, run["budget_tokens"], kl_map=signal == "soft_acc",
                                                 time=lr_time(run), axis="lr_integral", n_boot=N_BOOT)
        return _MEMO[key]

    def pick(name):
        return lambda run, signal: forms(run, signal).get(name)

    return {"forms together (default)": pick("forms"),
            "power law, lr integral": pick("power_law"),
            "power law, tokens": tokens_axis,
            "saturating, lr integral": pick("saturating"),
            "loss-linear, lr integral": loss_linear,
            "KL-mapped, lr integral": pick("kl_mapped")}


def measured_end(run: dict, signal: str) -> float | None:
    t, f, _, _ = series(run, signal)
    return float(f[-1]) if len(t) and t[-1] >= run["budget_tokens"] else None


def evaluate(runs: list[dict], name: str, fn, signal: str) -> dict:
    """One forecaster on one signal over the runs: per run the forecast and the end, and the summary."""
    rows = []
    for run in runs:
        end = measured_end(run, signal)
        fc = fn(run, signal)
        if fc is None or end is None:
            continue
        rows.append({"run": run["run"], "end": end, "predicted": fc.predicted, "lo": fc.lo, "hi": fc.hi,
                     "stop_bound": fc.stop_bound, "drift_seen": fc.params.get("drift_seen")})
    return {"forecaster": name, "signal": signal, **summarize(rows)} if rows else {}


def summarize(rows: list[dict]) -> dict:
    """Errors, coverage, abstention and false stops of forecasts (rows: run, end, predicted, lo, hi, stop_bound)."""
    import numpy as np

    from forgetcheck.train.forecast import should_stop

    for r in rows:
        r["inside"] = None if r["lo"] is None else bool(r["lo"] <= r["end"] <= r["hi"])
    made = [r for r in rows if r["predicted"] is not None]
    err = np.array([r["predicted"] - r["end"] for r in made])
    ends = np.array([r["end"] for r in made])
    with_iv = [r for r in rows if r["inside"] is not None]
    below = [(r, m) for r in rows for m in MARGINS if r["end"] < m]
    stops = [(r, m) for r in rows for m in MARGINS if should_stop(_as_forecast(r), m)]
    return {"runs": len(rows), "forecasts": len(made),
            "median_abs_error": float(np.median(np.abs(err))) if made else None,
            "median_rel_error": float(np.median(np.abs(err) / np.maximum(np.abs(ends), 1e-12))) if made else None,
            "with_interval": len(with_iv), "covered": sum(r["inside"] for r in with_iv),
            "abstained": len(rows) - len(with_iv),
            "false_stops": sum(1 for r, m in stops if r["end"] < m), "below_margin_pairs": len(below),
            "stops": len(stops), "rows": rows}


def _as_forecast(row: dict):
    from forgetcheck.train.forecast import Forecast

    return Forecast(model="row", predicted=row["predicted"], lo=row["stop_bound"], hi=row["hi"])


def summary(s: dict) -> dict:
    """The figures forecast.BACKTEST keeps for the default (and the report quotes)."""
    return {k: s[k] for k in ("runs", "with_interval", "covered", "abstained", "false_stops", "below_margin_pairs",
                              "stops")}


def _line(name: str, s: dict, stops: bool) -> str:
    cov = f"{s['covered']}/{s['with_interval']}"
    fs = f"{s['false_stops']}/{s['below_margin_pairs']} of {s['stops']}" if stops else ""
    err = "" if s["median_abs_error"] is None else f"{s['median_abs_error']:9.3f} {s['median_rel_error']:8.0%}"
    return (f"{name:28s} {s['runs']:3d} {err:>18s} {cov:>8s} {s['abstained'] / s['runs']:8.0%} "
            f"{(s['covered'] + s['abstained']) / s['runs']:8.0%} {fs:>14s}")


def default_row(run: dict, signal: str) -> dict | None:
    """The default forecast of a stored run, as the results file keeps it (what the tests compare)."""
    fc = forecasters()["forms together (default)"](run, signal)
    end = measured_end(run, signal)
    if fc is None or end is None:
        return None
    return {"run": run["run"], "end": end, "predicted": fc.predicted, "lo": fc.lo, "hi": fc.hi,
            "stop_bound": fc.stop_bound, "drift_seen": fc.params.get("drift_seen"), "reason": fc.reason}


def table(path: Path, write: bool = False) -> None:
    doc = json.loads(path.read_text())
    runs = doc["runs"]
    held = [r for r in runs if r["run"].split("/")[0] not in DESIGN]
    print(f"{len(runs)} runs from {path} ({len(held)} not seen when the default's rules were fixed)")
    head = (f"{'forecaster':28s} {'n':>3s} {'med |err|':>9s} {'rel':>8s} {'covered':>8s} {'abstain':>8s} "
            f"{'cov+abst':>8s} {'false stops':>14s}")
    fcs = forecasters()
    for signal in SIGNALS:
        print(f"\n== {signal}: forecast at the window's end vs the measured end (90% intervals)")
        print(head)
        for name, fn in fcs.items():
            s = evaluate(runs, name, fn, signal)
            if s:
                print(_line(name, s, signal == "soft_acc"))
        s = evaluate(held, "", fcs["forms together (default)"], signal)
        if s:
            print(_line("default, held-out runs only", s, signal == "soft_acc"))
    print("\nfalse stops: (run, margin) pairs with a margin of 1..20 points that stop though the run ended below "
          "the margin / all pairs whose run ended below it, of all the pairs that stop")
    for name in ("forms together (default)", "power law, lr integral"):
        s = evaluate(runs, name, fcs[name], "soft_acc")
        print(f"\nper run, soft accuracy lost, {name}:")
        for r in s["rows"]:
            iv = "no interval" if r["lo"] is None else f"[{r['lo']:7.2f}, {r['hi']:7.2f}]"
            pr = "   none" if r["predicted"] is None else f"{r['predicted']:7.2f}"
            seen = r.get("drift_seen")
            mark = "" if r["inside"] is None else "inside" if r["inside"] else "MISS"
            print(f"  {r['run']:20s} end {r['end']:6.2f}  forecast {pr} {iv:18s} {mark:6s}"
                  + ("" if seen is None else f" drift seen {seen:.0%}"))
    d = evaluate(runs, "default", fcs["forms together (default)"], "soft_acc")
    k = evaluate(runs, "default", fcs["forms together (default)"], "kl_domain")
    print("\nforecast.BACKTEST =", {"soft_acc": summary(d), "kl_domain": summary(k)})
    if write:  # each run's default forecast beside its points: tests/train/test_backtest.py reads them
        for run in runs:
            run["default"] = {signal: default_row(run, signal) for signal in SIGNALS}
        path.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"each run's default forecast -> {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--out", type=Path, default=Path("runs/forecast_backtest"))
    t.add_argument("--model", default="smollm2-135m")
    c = sub.add_parser("collect")
    c.add_argument("runs", type=Path, nargs="+")
    c.add_argument("--file", type=Path, default=RESULTS)
    tb = sub.add_parser("table")
    tb.add_argument("--file", type=Path, default=RESULTS)
    tb.add_argument("--write", action="store_true", help="keep each run's default forecast in the file")
    a = ap.parse_args()
    if a.cmd == "train":
        train(a.out, a.model)
    elif a.cmd == "collect":
        collect(a.runs, a.file)
    else:
        table(a.file, a.write)


if __name__ == "__main__":
    main()
