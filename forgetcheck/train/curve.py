"""The forgetting curve of one arm while it trains: when to measure, on what, what it costs, the forecast at a
quarter of the budget and the early stop (docs/curves.md, "In the training loop").

`CurveTracker` is what train/loop.py's loop talks to. Before the first step (`start`) it fixes everything once on
the base model: the retention multiple-choice items (`retention_pools`: built from the lm-eval task documents
of the run's retention suite with each task's doc_to_text / doc_to_choice / doc_to_target and its
target_delimiter, as lm-eval itself builds the requests), the general text (eval/drift.py's `drift_text`) and the
held-out domain text (the domain's heldout.jsonl), and the sizes that keep the measuring within
`MAX_OVERHEAD` of the arm's training time (`plan_sizes`). After each optimizer step (`after_step`) it measures
a point when the schedule (`curve_steps`) says so and writes runs/<id>/curves/<arm>.json at once (so the
points survive an interruption; a resumed arm keeps the points up to its resumed step). At the first point at
or past the forecast window (the first `forecast.FIT_FRACTION` of the budget) it forecasts the forgetting at
the end of the budget, and it says stop when `--stop-if-forecast-exceeds` is crossed (forecast.should_stop;
checked at that one point, `stop_steps`, so the bound's level needs no correction for repeated looks).
`finish` puts the measured end values beside the forecasts and returns the summary train/<arm>.json keeps.
"""

from __future__ import annotations

import math
import time
import zlib
from pathlib import Path

from forgetcheck import config, console
from forgetcheck.errors import BadInput
from forgetcheck.eval.records import target_index
from forgetcheck.rundir import RunDir
from forgetcheck.schema import FORECAST_MODELS
from forgetcheck.train import forecast, signals

TRAIN_TOKEN_COST = 2.2
"""Forward-pass tokens of measuring that cost as much as one training token (forward + backward + optimizer
step). A cheap training step makes a point dear in comparison, so the plan prices training at the cheapest
end of what was measured and the overhead bound holds for every arm (measured: docs/curves.md, "Cost of a
point"; bench/curve_overhead.py measures it on another model or machine)."""
POOL_DOCS = 64  # documents per retention task considered for the fixed items (a seeded sample)
FORECAST_SIGNALS = ("soft_acc", "kl_general", "kl_domain", "bpb_general")
"""Signals forecast at the end of the forecast window (soft_acc also by the loss-linear model)."""
FORECAST_BOOT = 200
"""Bootstrap refits per power-law forecast: half of forecast.N_BOOT, because the arm waits while the loop
forecasts several signals on two axes, refit by refit (their cost: docs/curves.md, "Cost of a point")."""
STOP_SIGNAL = "soft_acc"  # --stop-if-forecast-exceeds is in points of retention soft accuracy lost


def curve_steps(total_steps: int, eval_every: int, fit_fraction: float = forecast.FIT_FRACTION) -> list[int]:
    """The optimizer steps after which a point is measured: every `eval_every` steps and the last step, and
    every max(1, eval_every // 4) steps within the forecast window (the first `fit_fraction` of the steps),
    where the forecast needs its points. Step 0 is the base itself (curves.build_reference), not measured."""
    if eval_every <= 0 or total_steps < 1:
        return []
    fit_end = max(1, math.floor(fit_fraction * total_steps))
    dense = max(1, eval_every // 4)
    steps = set(range(dense, fit_end + 1, dense)) | set(range(eval_every, total_steps + 1, eval_every))
    return sorted(steps | {total_steps})


def stop_steps(steps: list[int], fit_end: int) -> list[int]:
    """The curve points at which the early stop is checked: the first at or past the forecast window's end
    (`fit_end` steps), where the one forecast is made. Their number is the looks the stop's lower bound is
    corrected for (Bonferroni, forecast.forecast_power_law's `looks`): one, since the forecast is fitted to the
    window's points only and a later check would compare the same bound (docs/curves.md, "Repeated looks")."""
    return [s for s in steps if s >= fit_end][:1]


def stop_bound_words(fc: dict) -> str:
    """The bound the stop compares, in words: its one-sided level, the interval whose lower side it is, and
    the looks it is corrected for (`fc`: a forecast.Forecast as a dict)."""
    f = forecast.Forecast(**fc)
    how = ("one look, at the forecast window's end: no correction" if f.looks == 1
           else f"Bonferroni over {f.looks} looks")
    side = (f"the lowest lower side of the forms' {f.level:.0%} intervals" if f.model == forecast.FORMS
            else f"the {f.level:.0%} interval's lower side")
    return f"lower bound at {100 * f.look_level:.3g}% ({side}; {how}) {_f(f.stop_bound)}"


# ---- the fixed items and texts -------------------------------------------------------------------------------

def _mc_triple(task, doc) -> tuple[str, list[str], int] | None:
    """(context, continuations, target index) as lm-eval builds a multiple-choice request from `doc`, or None
    for a document this cannot express (several contexts, several targets)."""
    context = task.doc_to_text(doc)
    if not isinstance(context, str):  # multiple_input (WinoGrande-style): one context per choice
        return None
    desc = getattr(task.config, "description", None) or ""
    if desc:
        from lm_eval.utils import apply_template

        context = apply_template(desc, doc) + context
    choices = task.doc_to_choice(doc)
    target = task.doc_to_target(doc)
    target = None if isinstance(target, list) else target_index(target, choices)
    if target is None:
        return None
    delim = getattr(task.config, "target_delimiter", " ")
    return context, [f"{delim}{c}" for c in choices], target


def retention_pools(eval_cfg: config.EvalConfig, tasks_dir: Path | None, seed: int) -> tuple[dict, str]:
    """({task: [(context, continuations, target), ...]}, where from) for the retention multiple-choice tasks of
    `eval_cfg` (a seeded sample of `POOL_DOCS` documents per task)."""
    import numpy as np

    from forgetcheck.eval import suites

    names = list(eval_cfg.tasks) or suites.suite_task_names("retention", tasks_dir)
    pools: dict[str, list] = {}
    skipped = []
    for name in names:  # one at a time: a task whose data is missing is left out, not the whole pool
        try:
            s = suites.resolve_tasks(config.EvalConfig(tasks=(name,)), tasks_dir)[0]
        except (BadInput, OSError, ValueError):
            skipped.append(name)
            continue
        if s.suite != "retention" or s.kind != "multiple_choice":
            continue
        docs = s.task.eval_docs
        docs = docs.to_list() if hasattr(docs, "to_list") else list(docs)
        rng = np.random.default_rng([seed, zlib.crc32(s.name.encode("utf-8"))])
        triples = [t for i in rng.permutation(len(docs))[:POOL_DOCS] if (t := _mc_triple(s.task, docs[i]))]
        if triples:
            pools[s.name] = triples
    where = f"tasks {', '.join(sorted(pools)) or 'none'} (retention multiple choice)"
    return pools, where + (f"; left out, data missing: {', '.join(skipped)}" if skipped else "")


def domain_texts(domain) -> tuple[list[str], str]:
    """Held-out domain text (heldout.jsonl), else the domain's raw text (cpt.jsonl; then it is trained on by
    cpt, which the curve's meta says)."""
    from forgetcheck.data.domain import read_cpt, read_sft

    def texts(path: Path | None, read, field: str) -> list[str]:
        return [str(r[field]) for r in read(path)] if path is not None and Path(path).is_file() else []

    held = texts(getattr(domain, "heldout", None), read_cpt, "text")
    if held:
        return held, "heldout.jsonl (not trained on)"
    cpt = texts(getattr(domain, "cpt", None), read_cpt, "text")
    if cpt:
        return cpt[::-1], "cpt.jsonl from its end (no heldout.jsonl: text the cpt arm may train on)"
    sft = texts(getattr(domain, "sft", None), read_sft, "response")
    return sft[::-1], "sft.jsonl responses from the end (no heldout.jsonl or cpt.jsonl)"


def item_tokens(tok, items) -> list[int]:
    """Forward tokens of each item at a point: its context and every continuation (what `plan_sizes` prices)."""
    return [len(tok(it.context)["input_ids"]) + sum(len(tok(c)["input_ids"]) for c in it.choices) for it in items]


def plan_sizes(n_points: int, train_tokens: int, item_tokens: list[int], *, max_fraction: float = signals.MAX_OVERHEAD,
               n_tokens: int = signals.CURVE_TOKENS, seq_len: int = signals.CURVE_SEQ_LEN) -> dict:
    """Items and text tokens per point such that all points together cost at most `max_fraction` of the
    training, in forward tokens: a training token costs TRAIN_TOKEN_COST, a point 2 x text tokens plus its
    items' tokens (context and continuations, `item_tokens`, in item order). Both are cut by the same factor
    (floors curves.MIN_ITEMS and MIN_TOKENS); the note says when even the floors do not fit."""
    full_items = len(item_tokens)
    allowed = max_fraction * train_tokens * TRAIN_TOKEN_COST / max(1, n_points)

    def cost(k, t):
        return 2 * t + sum(item_tokens[:k])

    f = min(1.0, allowed / max(1, cost(full_items, n_tokens)))
    k = min(full_items, max(min(signals.MIN_ITEMS, full_items), int(full_items * f)))
    t = max(signals.MIN_TOKENS, (int(n_tokens * f) // seq_len) * seq_len)
    while k > min(signals.MIN_ITEMS, full_items) and cost(k, t) > allowed:
        k -= 1
    predicted = n_points * cost(k, t) / (train_tokens * TRAIN_TOKEN_COST)
    note = "" if f >= 1 else f"cut to {k} items and {t} tokens per text to stay within {max_fraction:.0%}"
    if predicted > max_fraction * 1.001:
        note += f"; even the smallest points are predicted at {predicted:.0%} of the training time"
    return {"n_items": k, "n_tokens": t, "predicted_fraction": round(predicted, 4), "note": note.lstrip("; ")}


# ---- the tracker -----------------------------------------------------------------------------------------------

class CurveTracker:
    """One arm's curve during training (see the module docstring). `enabled` is False without --eval-every or
    under FSDP (several processes: the curve is not measured there)."""

    def __init__(self, label: str, cfg: config.TrainConfig, run: RunDir, *, total_steps: int, tokens_per_step: int,
                 world: int = 1, domain=None, tasks_dir: Path | None = None, lr_factor=None):
        self.label, self.cfg, self.run = label, cfg, run
        # The forecast's time axis: the learning-rate integral of the schedule (optimizer.lr_lambda, passed by
        # train/loop.py), known before the first step; tokens when no schedule is given.
        self.lr_cum = forecast.lr_integral(lr_factor, total_steps) if lr_factor is not None else None
        self.total_steps, self.tokens_per_step = total_steps, tokens_per_step
        self.budget = total_steps * tokens_per_step  # the tokens at the last step: where the forecast points
        self.steps = curve_steps(total_steps, cfg.eval_every)
        self.enabled = bool(self.steps) and world == 1
        self.why_off = "" if self.enabled else ("--eval-every 0" if not self.steps else
                                                "several processes (FSDP): curves are measured with --nproc 1")
        self.domain, self.tasks_dir = domain, tasks_dir
        self.curve: signals.Curve | None = None
        self.ref = None
        self.stopped: dict | None = None
        self.session_point_s = 0.0
        self.fit_end = max(1, math.floor(forecast.FIT_FRACTION * total_steps))
        self.stop_steps = stop_steps(self.steps, self.fit_end)
        self.looks = max(1, len(self.stop_steps))  # planned looks at the stop, known before the first step

    # -- before the first step, on the base model
    def start(self, model, tok, resumed_step: int) -> None:
        if not self.enabled:
            return
        t0 = time.perf_counter()
        eval_cfg = self._eval_config()
        # The curve never stops training: without the benchmark data (`forgetcheck data prepare` not run) it
        # goes on without soft accuracy and on the built-in general text, and its meta says why.
        try:
            pools, items_from = retention_pools(eval_cfg, self.tasks_dir, self.cfg.seed)
        except (BadInput, OSError, ValueError) as e:
            pools, items_from = {}, f"none ({_first_line(e)})"
        items = signals.choose_items(pools, signals.CURVE_ITEMS, seed=self.cfg.seed) if pools else []
        from forgetcheck.eval.drift import BUILTIN_DRIFT_TEXT, drift_text

        try:
            general, _, general_from = drift_text([], self.tasks_dir)
        except (BadInput, OSError, ValueError) as e:
            general, general_from = list(BUILTIN_DRIFT_TEXT), f"built-in English paragraphs ({_first_line(e)})"
        dom, dom_from = domain_texts(self.domain)
        if not dom:
            dom, dom_from = general[::-1], "none in the domain data: general text from its end"
        # the reference (the same items and texts, scored once on the base) costs about one more point
        sizes = plan_sizes(len(self.steps) + 1, self.budget, item_tokens(tok, items))
        old = self._partial(resumed_step)
        if old is not None and old.meta.get("sizes"):
            sizes = old.meta["sizes"]  # a resumed arm measures what it measured before
        items = items[:sizes["n_items"]]
        self.ref = signals.build_reference(model, tok, general, dom, items, n_tokens=sizes["n_tokens"])
        ref_s = round(time.perf_counter() - t0, 3)
        meta = {"steps": self.steps, "eval_every": self.cfg.eval_every, "tokens_per_step": self.tokens_per_step,
                "budget_tokens": self.budget, "fit_fraction": forecast.FIT_FRACTION,
                "fit_until_tokens": self.fit_end * self.tokens_per_step, "sizes": sizes,
                "items": len(items), "items_from": items_from, "general_from": general_from,
                "domain_from": dom_from, "tokens_general": int(self.ref.texts["general"]["input_ids"].size),
                "tokens_domain": int(self.ref.texts["domain"]["input_ids"].size),
                "reference_s": ((old.meta.get("reference_s") or []) if old else []) + [ref_s],
                "complete": False, "forecast": None, "stopped_early": None}
        if old is not None:
            meta["forecast"] = old.meta.get("forecast") if resumed_step >= self.fit_end else None
        self.curve = signals.Curve(arm=self.label, points=old.points if old else [], base=dict(self.ref.base),
                                  meta=meta)
        self._write()
        console.detail(f"curve {self.label}: {len(self.steps)} points at steps {self.steps}; {len(items)} items "
                       f"({items_from}), {sizes['n_tokens']} tokens of general and of domain text per point; "
                       f"predicted overhead {sizes['predicted_fraction']:.0%} of training"
                       + (f" ({sizes['note']})" if sizes["note"] else ""))

    def _eval_config(self) -> config.EvalConfig:
        from forgetcheck.schema import read_run_config

        ev = read_run_config(self.run.config).eval if self.run.config.exists() else config.EvalConfig()
        return config.EvalConfig(suites=("retention",), tasks=ev.tasks, limit=None)

    def _partial(self, resumed_step: int) -> signals.Curve | None:
        path = self.run.curve_json(self.label)
        if resumed_step == 0 or not path.exists():
            return None
        old = signals.read_curve(path)
        if old.meta.get("steps") != self.steps:
            return None
        old.points = [p for p in old.points if p.step <= resumed_step]
        return old

    def _write(self) -> None:
        signals.write_curve(self.run.curve_json(self.label), self.curve)

    # -- after each optimizer step
    def after_step(self, model, tok, step: int, loss_curve: list) -> bool:
        """Measure a point when due; returns True when the arm should stop here (the forecast crossed
        --stop-if-forecast-exceeds)."""
        if not self.enabled or step not in self.steps:
            return False
        recent = [v for s, v in loss_curve[-max(1, self.cfg.eval_every // 4):]]
        p = signals.measure_point(model, tok, self.ref, tokens=step * self.tokens_per_step, step=step,
                                 train_loss=float(sum(recent) / len(recent)) if recent else None)
        self.session_point_s += p.measure_s
        self.curve.points = [q for q in self.curve.points if q.step != step] + [p]
        stop = False
        if step in self.stop_steps and self.curve.meta.get("forecast") is None:
            self.curve.meta["forecast"] = self._forecast(step)
            stop = self._should_stop(step)
        self._write()
        return stop

    def _time(self, tokens: float) -> float:
        """The learning-rate integral (in peak-lr steps) after the step that ends at `tokens`."""
        k = int(round(tokens / self.tokens_per_step))
        return float(self.lr_cum[min(max(k, 0), len(self.lr_cum) - 1)])

    def _forecast(self, step: int) -> dict:
        t0 = time.perf_counter()
        axis = {} if self.lr_cum is None else {"time": self._time, "axis": "lr_integral"}
        out = {"made_at_step": step, "made_at_tokens": step * self.tokens_per_step, "at_tokens": self.budget,
               "axis": axis.get("axis", "tokens"), "default": forecast.DEFAULT, "signals": {}}
        for sig in FORECAST_SIGNALS:
            t, f, loss = self.curve.forgetting(sig)
            if len(t) == 0:
                continue
            tk, fk, kl = self.curve.forgetting_with_kl(sig)
            looks = self.looks if sig == STOP_SIGNAL else 1
            forms = forecast.forecast_forms(tk, fk, kl, self.budget, kl_map=sig == STOP_SIGNAL, n_boot=FORECAST_BOOT,
                                            looks=looks, **axis)
            entry = {key: fc.to_dict() for key, fc in forms.items()}
            if sig == "soft_acc":
                entry["loss_linear"] = forecast.forecast_loss_linear(t, f, loss, self.budget, n_boot=FORECAST_BOOT,
                                                                     **axis).to_dict()
            out["signals"][sig] = entry
        # the arm waits while the laws are refitted (mostly the power law's refits, docs/curves.md "Cost of a point")
        out["seconds"] = round(time.perf_counter() - t0, 3)
        console.detail(f"curve {self.label}: forecast at step {step} took {out['seconds']:.1f} s")
        return out

    def _should_stop(self, step: int) -> bool:
        margin = self.cfg.stop_if_forecast_exceeds
        fc = ((self.curve.meta["forecast"]["signals"].get(STOP_SIGNAL) or {}).get(forecast.DEFAULT))
        if margin is None or not fc:
            return False
        f = forecast.Forecast(**fc)
        if f.stop_bound is None:
            console.detail(f"{self.label}: no early stop at step {step}: the forecast has no interval ({f.reason})")
            return False
        crossed = forecast.should_stop(f, margin)
        if not crossed or step >= self.total_steps:
            console.detail(f"{self.label}: no early stop at step {step}: its {stop_bound_words(fc)} "
                           f"{'exceeds' if crossed else 'does not exceed'} --stop-if-forecast-exceeds {margin:g}"
                           + (" (the last step: nothing left to save)" if crossed else ""))
            return False
        self.stopped = {"step": step, "tokens": step * self.tokens_per_step, "planned_steps": self.total_steps,
                        "looks": f.looks, "look_level": f.look_level, "lower_bound": f.stop_bound,
                        "reason": f"forecast at step {step} of {self.total_steps}: retention soft accuracy will drop "
                                  f"by {fc['predicted']:.2f} points at {self.budget} tokens "
                                  f"({fc['level']:.0%} interval [{fc['lo']:.2f}, {fc['hi']:.2f}]); its "
                                  f"{stop_bound_words(fc)} exceeds --stop-if-forecast-exceeds {margin:g}; "
                                  f"{forecast.backtest_words(STOP_SIGNAL)}"}
        self.curve.meta["stopped_early"] = self.stopped
        console.say(f"{self.label}: stopped early: {self.stopped['reason']}")
        return True

    # -- at the end of the arm
    def finish(self, train_s: float) -> dict | None:
        """Measured end values beside the forecasts; the curve file marked complete. Returns the summary for
        train/<arm>.json (None when curves were off)."""
        if not self.enabled:
            return {"enabled": False, "why": self.why_off} if self.cfg.eval_every else None
        fc = self.curve.meta.get("forecast")
        if fc:
            for sig, entry in fc["signals"].items():
                t, f, _ = self.curve.forgetting(sig)
                measured = float(f[-1]) if len(t) and t[-1] >= self.budget else None
                entry["measured"] = measured
                for model_fc in (entry.get(m) for m in FORECAST_MODELS):
                    if model_fc and measured is not None and model_fc.get("predicted") is not None:
                        model_fc["error"] = measured - model_fc["predicted"]
                        model_fc["inside"] = (model_fc["lo"] is not None
                                              and model_fc["lo"] <= measured <= model_fc["hi"])
                if measured is None:
                    entry["note"] = "no measured value at the end of the budget (the arm stopped early)"
        self.curve.meta["complete"] = True
        point_s = sum(p.measure_s for p in self.curve.points)
        ref_s = sum(self.curve.meta.get("reference_s") or [])
        overhead = point_s + ref_s
        self.curve.meta["overhead"] = {"points_s": round(point_s, 3), "reference_s": round(ref_s, 3),
                                       "train_s": round(train_s, 3),
                                       "fraction": round(overhead / train_s, 4) if train_s > 0 else None}
        self._write()
        summary = {"enabled": True, "file": str(self.run.curve_json(self.label).relative_to(self.run.root)),
                   "points": len(self.curve.points), "sizes": self.curve.meta["sizes"],
                   "overhead": self.curve.meta["overhead"], "forecast": _forecast_summary(fc)}
        o = self.curve.meta["overhead"]
        console.detail(f"curve {self.label}: {len(self.curve.points)} points, measuring took {overhead:.1f} s = "
                     f"{(o['fraction'] or 0):.0%} of the {train_s:.1f} s of training "
                     f"(predicted {self.curve.meta['sizes']['predicted_fraction']:.0%})")
        s = summary["forecast"].get(STOP_SIGNAL) if summary["forecast"] else None
        if s and s.get("predicted") is not None:
            console.detail(f"curve {self.label}: forecast at {fc['made_at_tokens']} tokens of retention soft accuracy lost "
                         f"at {fc['at_tokens']}: {s['predicted']:.2f} [{_f(s['lo'])}, {_f(s['hi'])}] points; measured "
                         f"{_f(s.get('measured'))}")
        elif s:
            console.detail(f"curve {self.label}: no forecast of retention soft accuracy lost at {fc['at_tokens']} "
                           f"tokens ({s.get('reason')}); measured {_f(s.get('measured'))}")
        return summary


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _forecast_summary(fc: dict | None) -> dict:
    """Per signal: the default forecast (the one the stop reads), its interval and the measured value, and each
    other model's forecast and interval (train/<arm>.json's short form)."""
    if not fc:
        return {}
    out = {}
    default = fc.get("default", "power_law")
    for sig, e in fc["signals"].items():
        d = e.get(default) or {}
        out[sig] = {"model": default, "predicted": d.get("predicted"), "lo": d.get("lo"), "hi": d.get("hi"),
                    "measured": e.get("measured"), "made_at_tokens": fc["made_at_tokens"],
                    "at_tokens": fc["at_tokens"], "reason": d.get("reason"), "axis": d.get("axis", "tokens")}
        for model in FORECAST_MODELS:
            if model != default and e.get(model):
                m = e[model]
                out[sig][model] = {"predicted": m.get("predicted"), "lo": m.get("lo"), "hi": m.get("hi")}
    return out
