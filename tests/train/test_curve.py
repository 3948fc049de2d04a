"""train/curve.py in the training loop, on the tiny random GPT-2 (CPU): the schedule, the overhead-bounded
sizes, early stop on a synthetic power-law curve leaving a loadable checkpoint and saying why (train record,
curve file, compare's budget block, report), and the report's curve section. Curve points surviving --resume
are checked in tests/train/test_train.py's resume test."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
from planted import TASK_YAML, WORDS
from runfixture import make_run

from forgetcheck.config import TrainConfig, validate_train
from forgetcheck.data.domain import DomainData
from forgetcheck.report.html import write_report
from forgetcheck.rundir import RunDir, atomic_write_json
from forgetcheck.train import curve, forecast, loop, optimizer, signals
from forgetcheck.verdict import budget, compare
from forgetcheck.verdict.gate import gate_run


def planted_tasks(root: Path) -> Path:
    """A retention multiple-choice task (tests/planted.py's YAML) to draw the curve's fixed items from."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    with open(root / "planted.jsonl", "w") as f:
        for i in range(20):
            f.write(json.dumps({"question": f"Which word is number {i}?", "choices": rng.sample(WORDS, 4),
                                "answer": i % 4}) + "\n")
    (root / "planted.yaml").write_text(TASK_YAML.format(data=root / "planted.jsonl"))
    return root


def test_schedule_is_dense_in_the_forecast_window_and_ends_at_the_last_step():
    assert curve.curve_steps(32, 8) == [2, 4, 6, 8, 16, 24, 32]
    assert curve.curve_steps(64, 8) == [2, 4, 6, 8, 10, 12, 14, 16, 24, 32, 40, 48, 56, 64]
    assert curve.curve_steps(6, 2) == [1, 2, 4, 6]
    assert curve.curve_steps(50, 0) == []


def test_the_stop_is_planned_for_one_look_at_the_window_end():
    assert curve.stop_steps(curve.curve_steps(32, 8), 8) == [8]  # points 2, 4, 6, 8 | 16, 24, 32
    assert curve.stop_steps(curve.curve_steps(20, 12), 5) == [12]  # points 3 | 12, 20: the first past step 5
    t = curve.CurveTracker("sft", replace(TrainConfig(), eval_every=8), RunDir(Path("unused")), total_steps=32,
                           tokens_per_step=256)
    assert (t.stop_steps, t.looks) == ([8], 1)


def _planted_tracker(tmp_path, monkeypatch, margin: float) -> tuple[curve.CurveTracker, list]:
    """A tracker of 32 steps (points 2, 4, 6, 8 in the window, then 16, 24, 32) whose soft accuracy falls as
    tokens^0.5 to 8 points lost at the end, with no model: every forecast it makes is logged (looks asked)."""
    cfg = replace(TrainConfig(), eval_every=8, stop_if_forecast_exceeds=margin)
    t = curve.CurveTracker("sft", cfg, RunDir(tmp_path), total_steps=32, tokens_per_step=256)
    t.curve = signals.Curve(arm="sft", base={"soft_acc": 40.0}, meta={"forecast": None, "stopped_early": None})

    def point(model, tok, ref, *, tokens, step, train_loss=None):
        drop = 8.0 * (step / 32) ** 0.5 + 0.05 * (-1) ** (step // 2)
        kl_domain = 0.3 * (1 - math.exp(-step / 6))  # a drift that bends within the window: the forecast is made
        return signals.CurvePoint(tokens, step, train_loss, 0.01 * step, kl_domain, 1.0, 1.0, 40.0 - drop, 0.01)

    looks, real = [], forecast.forecast_power_law

    def logged(*a, **kw):
        looks.append(kw.get("looks", 1))
        return real(*a, **kw)

    monkeypatch.setattr(signals, "measure_point", point)
    monkeypatch.setattr(forecast, "forecast_power_law", logged)
    monkeypatch.setattr(curve, "FORECAST_SIGNALS", ("soft_acc",))
    monkeypatch.setattr(curve, "FORECAST_BOOT", 100)
    return t, looks


def _train(t: curve.CurveTracker) -> int:
    """Steps 1..32 as the loop calls them; the step it stopped at."""
    for step in range(1, t.total_steps + 1):
        if t.after_step(None, None, step, [(step, 3.0 - 0.01 * step)]):
            return step
    return t.total_steps


def test_the_stop_is_checked_once_at_the_planned_look(tmp_path, monkeypatch, capsys):
    t, looks = _planted_tracker(tmp_path, monkeypatch, margin=100.0)  # never crossed: the run goes on
    assert _train(t) == 32 and t.stopped is None
    assert looks == [1]  # one forecast for the stop, at step 8, asked for one look; none at 16, 24, 32
    fc = t.curve.meta["forecast"]
    pl = fc["signals"]["soft_acc"]["power_law"]
    assert fc["made_at_step"] == 8 and pl["looks"] == 1 and pl["lo_adjusted"] == pl["lo"] is not None
    assert fc["seconds"] > 0  # the arm waited for the fits: said in the file
    assert ("sft: no early stop at step 8: its lower bound at 95% (the lowest lower side of the forms' 90% "
            "intervals; one look, at the forecast window's end: no correction)") in capsys.readouterr().out


def test_a_clear_stop_records_its_looks_and_level(tmp_path, monkeypatch, capsys):
    t, _ = _planted_tracker(tmp_path, monkeypatch, margin=2.0)  # the forecast is about 8 points lost
    assert _train(t) == 8
    st = t.stopped
    fc = t.curve.meta["forecast"]
    pl = fc["signals"]["soft_acc"][fc["default"]]  # the stop reads the default forecast: the forms together
    assert fc["default"] == "forms" and set(fc["signals"]["soft_acc"]) >= {"power_law", "saturating", "kl_mapped"}
    assert (st["looks"], st["look_level"]) == (1, pytest.approx(0.95)) and st["lower_bound"] == pl["lo_adjusted"] > 2.0
    assert pl["lo"] == min(f["lo"] for f in pl["params"]["forms"].values())
    assert "its lower bound at 95% (the lowest lower side of the forms' 90% intervals; one look" in st["reason"]
    assert "exceeds --stop-if-forecast-exceeds 2; intervals like this one covered the end in" in st["reason"]
    assert signals.read_curve(t.run.curve_json("sft")).meta["stopped_early"] == st  # in the curve file too
    assert "sft: stopped early: forecast at step 8 of 32" in capsys.readouterr().out
    # several looks: the level and the bound said are the corrected ones
    eight = {**pl, "looks": 8, "lo_adjusted": 1.5}
    assert curve.stop_bound_words(eight) == ("lower bound at 99.4% (the lowest lower side of the forms' 90% intervals; "
                                             "Bonferroni over 8 looks) 1.50")


def test_sizes_keep_the_predicted_overhead_within_the_bound():
    items = [150] * 32
    full = curve.plan_sizes(4, 10**7, items)  # plenty of training: full size, a small fraction
    assert (full["n_items"], full["n_tokens"], full["note"]) == (32, 1024, "")
    cut = curve.plan_sizes(8, 32 * 1024, items)  # 7 points and the reference over 32 steps of 1024
    assert cut["n_items"] < 32 and cut["n_tokens"] < 1024 and cut["predicted_fraction"] <= 0.25
    tiny = curve.plan_sizes(7, 2048, items)  # even the floors do not fit: said, not hidden
    assert (tiny["n_items"], tiny["n_tokens"]) == (8, 256) and "even the smallest" in tiny["note"]


def test_new_flags_are_validated():
    assert any("--eval-every" in p for p in validate_train(TrainConfig(eval_every=-1)))
    assert any("needs the forgetting curves" in p for p in validate_train(TrainConfig(stop_if_forecast_exceeds=2.0)))
    assert any("finite number" in p for p in validate_train(TrainConfig(eval_every=4,
                                                                        stop_if_forecast_exceeds=float("nan"))))
    assert not validate_train(TrainConfig(eval_every=4, stop_if_forecast_exceeds=2.0))


def test_early_stop_on_a_forgetting_power_law_keeps_a_loadable_checkpoint(tiny_ref, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    root = tmp_path / "domain"
    root.mkdir()
    with open(root / "cpt.jsonl", "w") as f:
        for i in range(24):
            f.write(json.dumps({"text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(20))}) + "\n")
    domain = DomainData(name="fx", root=root, sft=None, cpt=root / "cpt.jsonl", heldout=None, packaged=False)
    real = signals.measure_point
    cfg = TrainConfig(budget_tokens=16 * 2 * 32, seq_len=32, micro_batch=2, lr=1e-3, eval_every=4,
                      stop_if_forecast_exceeds=2.0)
    cum = forecast.lr_integral(optimizer.lr_lambda(16, cfg), 16)  # the forecast's time axis: the lr integral

    def forgetting(model, tok, ref, *, tokens, step, train_loss=None, **kw):  # falls as (lr integral)^0.5
        p = real(model, tok, ref, tokens=tokens, step=step, train_loss=train_loss, **kw) if step == 1 else None
        drop = 8.0 * 2 ** 0.5 * (cum[step] / cum[16]) ** 0.5 + 0.05 * (-1) ** step
        kl_domain = 0.3 * (1 - math.exp(-cum[step] / 2))  # a drift that bends within the window
        return signals.CurvePoint(tokens=tokens, step=step, train_loss=train_loss, kl_general=0.01 * step,
                                 kl_domain=kl_domain, bpb_general=1.0, bpb_domain=1.0,
                                 soft_acc=ref.base["soft_acc"] - drop, measure_s=p.measure_s if p else 0.01)

    monkeypatch.setattr(signals, "measure_point", forgetting)
    monkeypatch.setattr(curve, "FORECAST_SIGNALS", ("soft_acc",))  # the one that decides; fewer refits
    monkeypatch.setattr(curve, "FORECAST_BOOT", 100)
    run = RunDir(tmp_path / "run")
    rec = loop.train_arm("cpt", tiny_ref, domain, cfg, run, tasks_dir=planted_tasks(tmp_path / "tasks"))
    assert rec["optimizer_steps"] == 4 and rec["planned_steps"] == 16  # the window's end: steps 1-4 of 16
    assert rec["stopped_early"]["step"] == 4 and "--stop-if-forecast-exceeds 2" in rec["stopped_early"]["reason"]
    fc = rec["curve"]["forecast"]["soft_acc"]
    assert fc["axis"] == "lr_integral" and fc["model"] == "forms" and fc["lo"] > 2.0
    assert fc["power_law"]["predicted"] == pytest.approx(8 * 2 ** 0.5, rel=0.1)  # the law's value at the end
    assert fc["measured"] is None  # the budget's end was never reached
    out = capsys.readouterr().out  # said on the terminal: why it stopped, what the curve cost
    assert "cpt: stopped early: forecast at step 4 of 16" in out
    assert "curve cpt: 4 points, measuring took" in out and "% of the" in out
    assert loop._curve_note(rec["curve"]) == f"; curve 4 points, {rec['curve']['overhead']['fraction']:.0%} extra time"
    model = AutoModelForCausalLM.from_pretrained(run.ckpt("cpt"))  # an ordinary HF checkpoint
    assert model.config.vocab_size > 0
    measured = signals.read_curve(run.curve_json("cpt"))
    assert [p.step for p in measured.points] == [1, 2, 3, 4] and measured.meta["stopped_early"]["step"] == 4
    assert measured.meta["items"] == 8 and measured.meta["items_from"].startswith("tasks planted")
    # compare's budget block says the arm stopped early, in words, first
    block = budget.budget_block(run, ["cpt"])
    assert block["stopped_early"] == ["cpt"] and block["reasons"][0].startswith("cpt stopped early at step 4 of 16")


def _curve(arm: str, drops: list[float], fc: dict | None) -> dict:
    points = [{"tokens": 256 * (i + 1), "step": i + 1, "train_loss": 3.0 - 0.1 * i, "kl_general": 0.01 * (i + 1),
               "kl_domain": 0.02 * (i + 1), "bpb_general": 1.0 + 0.01 * i, "bpb_domain": 2.0 - 0.05 * i,
               "soft_acc": 40.0 - d, "measure_s": 1.0} for i, d in enumerate(drops)]
    meta = {"forecast": fc, "sizes": {"n_items": 16, "n_tokens": 512, "predicted_fraction": 0.2},
            "overhead": {"fraction": 0.18, "train_s": 100.0}, "stopped_early": None}
    return {"schema_version": 1, "kind": "curve", "arm": arm, "meta": meta, "points": points,
            "base": {"soft_acc": 40.0, "bpb_general": 1.0, "bpb_domain": 2.0, "kl_general": 0.0, "kl_domain": 0.0}}


def test_report_draws_every_arm_on_one_chart_and_the_forecast_beside_the_measured(tmp_path):
    run = make_run(tmp_path / "run", n=60)
    fc = {"made_at_tokens": 512, "at_tokens": 1024, "signals": {"soft_acc": {
        "power_law": {"predicted": 3.1, "lo": 2.0, "hi": 4.5, "reason": None, "inside": True},
        "measured": 3.4}}}
    atomic_write_json(run.curve_json("sft"), _curve("sft", [1.0, 2.0, 2.6, 3.4], fc))
    atomic_write_json(run.curve_json("cpt"), _curve("cpt", [0.2, 0.4, 0.5, 0.6], None))
    compare.compare_run(run, n_boot=200)
    gate_run(run.root)
    html = write_report(run).read_text(encoding="utf-8")
    assert 'id="chart-curve-soft_acc"' in html and 'id="chart-curve-bpb_domain"' in html
    section = html[html.index('id="chart-curve-soft_acc"'):html.index('id="chart-curve-bpb_domain"')]
    assert section.count("<polyline") == 2  # both arms on the one chart
    table = html[html.index('id="forecast-table"'):]
    assert "3.100" in table and "[2.000, 4.500]" in table and "3.400" in table and "0.300" in table


def test_report_reads_the_default_forecast_and_quotes_its_backtest(tmp_path, monkeypatch):
    monkeypatch.setattr(forecast, "BACKTEST", {"soft_acc": {"runs": 18, "with_interval": 6, "covered": 5,
                                                            "abstained": 12}})
    run = make_run(tmp_path / "run", n=60)
    forms = {"predicted": 3.0, "lo": 1.5, "hi": 6.0, "reason": None, "inside": True, "axis": "lr_integral"}
    pl = {"predicted": 9.0, "lo": 8.0, "hi": 10.0, "reason": None, "inside": False, "axis": "lr_integral"}
    fc = {"made_at_tokens": 512, "at_tokens": 1024, "default": "forms",
          "signals": {"soft_acc": {"forms": forms, "power_law": pl, "measured": 3.4}}}
    cannot = {**fc, "signals": {"soft_acc": {"power_law": pl, "measured": 0.6, "forms": {
        "predicted": None, "lo": None, "hi": None, "inside": None, "axis": "lr_integral",
        "reason": "cannot tell from this window: it saw 40% of the drift"}}}}
    atomic_write_json(run.curve_json("sft"), _curve("sft", [1.0, 2.0, 2.6, 3.4], fc))
    atomic_write_json(run.curve_json("cpt"), _curve("cpt", [0.2, 0.4, 0.5, 0.6], cannot))
    compare.compare_run(run, n_boot=200)
    gate_run(run.root)
    html = write_report(run).read_text(encoding="utf-8")
    chart = html[html.index('id="chart-curve-soft_acc"'):html.index('id="chart-curve-bpb_domain"')]
    assert chart.count("sft forecast") == 1 and "cpt forecast" not in chart  # the default's mark; none abstained
    assert "intervals like this one covered the end in 5 of 6 backtest runs (it abstained in 12 of 18" in html
    table = html[html.index('id="forecast-table"'):]
    assert "the forms together (default)" in table and "cannot tell from this window" in table


def test_resumed_run_keeps_points_up_to_its_step(tmp_path):
    run = RunDir(tmp_path)
    t = curve.CurveTracker("sft", replace(TrainConfig(), eval_every=2), run, total_steps=6,
                                    tokens_per_step=256)
    c = signals.Curve(arm="sft", meta={"steps": t.steps},
                     points=[signals.CurvePoint(256 * s, s, 1.0, 0, 0, 1, 1, 40, 0.1) for s in (1, 2, 4)])
    signals.write_curve(run.curve_json("sft"), c)
    assert [p.step for p in t._partial(2).points] == [1, 2]
    assert t._partial(0) is None


def test_resume_refuses_a_changed_eval_every(tmp_path):
    from forgetcheck.cli.resume import resume_conflicts
    from forgetcheck.config import RunConfig

    saved = RunConfig(train=TrainConfig(eval_every=8))
    problems, _ = resume_conflicts(saved, {"eval_every": 4}, tmp_path / "run")
    assert problems and "--eval-every 4 differs" in problems[0]
    assert resume_conflicts(saved, {"eval_every": 8}, tmp_path / "run") == ([], {})
