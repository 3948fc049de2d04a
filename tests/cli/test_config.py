"""The config is validated in full before any heavy work, and every problem is reported at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from forgetcheck import config
from forgetcheck.config import from_dict as config_from_dict
from forgetcheck.errors import BadInput


def test_every_problem_reported_at_once():
    cfg = config.RunConfig(arms=("sft", "dpo"), device="tpu",
                      train=config.TrainConfig(precision="fp8", optim="sgd", grad_accum=0),
                      eval=config.EvalConfig(suites=("retention", "vibes"), limit=0))
    problems = config.validate(cfg)
    text = "; ".join(problems)
    for needle in ("dpo", "tpu", "fp8", "sgd", "--grad-accum", "vibes", "--limit"):
        assert needle in text
    with pytest.raises(BadInput) as e:
        config.check(problems)
    assert f"({len(problems)} problems)" in str(e.value)


def test_budget_smaller_than_one_step_is_refused():
    t = config.TrainConfig(budget_tokens=100, seq_len=64, micro_batch=4)
    assert any("less than one optimizer step" in p for p in config.validate_train(t))


def test_preset_then_flags():
    train, ev = config.apply_preset("quick", {"lr": 1e-4, "seq_len": None}, {"limit": 5})
    assert train.lr == 1e-4 and train.seq_len == config.PRESET_VALUES["quick"]["train"]["seq_len"]
    assert ev.limit == 5
    with pytest.raises(BadInput, match="--preset"):
        config.apply_preset("huge", {}, {})


def test_config_roundtrips_through_json():
    cfg = config.RunConfig(base="tiny-gpt2", arms=("cpt",), eval=config.EvalConfig(tasks=("a", "b"), limit=3))
    back = config_from_dict(json.loads(json.dumps({"schema_version": 1, **config.to_dict(cfg)})))
    assert back == cfg


def test_cli_bad_flags_exit_2_one_line(fc_home):
    r = subprocess.run([sys.executable, "-m", "forgetcheck", "run", "--base", "tiny-gpt2", "--data", "med",
                        "--arms", "sft,dpo", "--precision", "fp8"],
                       capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "dpo" in lines[0] and "fp8" in lines[0] and "Traceback" not in r.stderr


def test_resume_may_change_every_gate_threshold_and_nothing_else(tmp_path):
    from forgetcheck.cli.resume import resume_conflicts
    from forgetcheck.config import GateConfig, RunConfig

    saved = RunConfig(base="tiny-gpt2", data="med", gate=GateConfig())
    problems, changes = resume_conflicts(saved, {"metric": "acc", "max_kl": "off", "max_ppl_rise": "25",
                                                 "max_drop": 3.0, "keep_uninformative": True}, tmp_path / "r1")
    assert problems == []
    assert changes == {"metric": "acc", "max_kl": None, "max_ppl_rise": 25.0, "max_drop": 3.0,
                       "keep_uninformative": True}
    problems, _ = resume_conflicts(saved, {"base": "smollm2-135m"}, tmp_path / "r1")
    assert len(problems) == 1 and "--base" in problems[0]


def test_run_flags_carry_keep_uninformative_into_the_gate_config():
    """`run --keep-uninformative` must reach cfg.gate: it decides whether the arms are scored on at-chance tasks."""
    from forgetcheck.cli.options import GateFlags

    assert GateFlags(keep_uninformative=True).config().keep_uninformative is True
    assert GateFlags().config().keep_uninformative is False


def test_screen_items_follow_the_limit_and_reach_every_command_that_scores_a_base():
    """--screen-items (EvalConfig.screen_items): as many as --limit unless given, 0 turns them off, no --limit
    leaves none; refused below 0; `run`, `eval` and `check` take it, a resumed run keeps it."""
    from forgetcheck.cli.options import EvalFlags
    from forgetcheck.cli.resume import resume_conflicts

    _, quick = config.apply_preset("quick", {}, EvalFlags().overrides())
    assert quick.screen_items is None and quick.screen_count() == quick.limit == 50
    _, ev = config.apply_preset("quick", {}, EvalFlags(limit=20).overrides())
    assert ev.screen_count() == 20
    _, ev = config.apply_preset("quick", {}, EvalFlags(screen_items=0).overrides())
    assert ev.screen_count() == 0
    _, ev = config.apply_preset("quick", {}, EvalFlags(screen_items=80).overrides())
    assert ev.screen_count() == 80 and ev.limit == 50
    _, full = config.apply_preset("full", {}, EvalFlags().overrides())
    assert full.limit is None and full.screen_count() == 0
    assert any("--screen-items" in p for p in config.validate_eval(config.EvalConfig(screen_items=-1)))
    cfg = config.RunConfig(eval=config.EvalConfig(limit=50, screen_items=10))
    assert config_from_dict(json.loads(json.dumps({"schema_version": 1, **config.to_dict(cfg)}))) == cfg
    problems, _ = resume_conflicts(config.RunConfig(), {"screen_items": 10}, "runs/r1")
    assert len(problems) == 1 and "--screen-items 10 differs" in problems[0]
