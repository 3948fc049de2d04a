"""`forgetcheck compare | report | gate`: the verdict stages run alone on a run folder, and `finish`, the same
stages as the tail of `run` and `check` (verdict/ and report/ do the work, from JSON only: these commands never
import torch)."""

from __future__ import annotations

from pathlib import Path

import typer

from forgetcheck import console
from forgetcheck.cli.options import VerdictFlags, options
from forgetcheck.rundir import RunDir


def compare(
    run: Path = typer.Argument(..., help="Run directory (runs/<id>) holding eval/base.json and eval/<arm>.json."),
    alpha: float = typer.Option(0.05, "--alpha", help="Significance level; CIs are (1 - alpha)."),
    n_boot: int = typer.Option(2000, "--n-boot", help="Cluster-bootstrap resamples (soft accuracy, perplexity, drift)."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
) -> None:
    """Paired comparison of every arm against the base (and arm against arm): deltas with intervals and tests
    from one method, soft accuracy, drift, flips -> compare.json."""
    from forgetcheck.verdict.compare import compare_run

    with console.session(verbose=True):  # no log file: every line stays on the terminal
        rd = RunDir.existing(run)
        result = compare_run(rd, alpha=alpha, n_boot=n_boot, seed=seed)
        for arm, s in result["summary"].items():
            console.say(f"{arm}: " + summary_line(s))
        console.say(f"wrote {rd.compare}")


def report(
    run: Path = typer.Argument(..., help="Run directory (runs/<id>)."),
) -> None:
    """Write the run's self-contained report.html from its compare.json and gate.json (run those commands first)."""
    from forgetcheck.report.html import write_report

    with console.session(verbose=True):  # no log file: every line stays on the terminal
        console.say(f"wrote {write_report(RunDir.existing(run))}")


@options(verdict=VerdictFlags)
def gate(
    target: Path = typer.Argument(..., help="Run directory (runs/<id>) or a compare.json."),
    verdict: VerdictFlags = VerdictFlags(),
) -> None:
    """Release gate: PASS (exit 0) when harm beyond the margins is ruled out, FAIL (1) when shown,
    INCONCLUSIVE (4) otherwise; every reason and the run's power land in gate.json."""
    from forgetcheck.verdict.gate import gate_run
    from forgetcheck.verdict.text import console_lines

    with console.session(verbose=True):  # no log file: every line stays on the terminal
        result, code = gate_run(target, verdict.overrides(), policy_file=verdict.policy, junit=verdict.junit,
                                markdown=verdict.markdown)
        for line in console_lines(result):
            console.say(line)
    raise typer.Exit(code)


def finish(run: RunDir, policy, *, title: str, policy_file: Path | None = None, previous=None,
           junit: Path | None = None, markdown: Path | None = None) -> tuple[dict, int]:
    """compare -> history (with a previous release) -> gate -> report, as `run` and `check` end; prints each
    arm's verdict, the report, the verdict with its reason, the power and what would decide. `policy`: a
    GateConfig or the policy keys given (over `policy_file` and the run's config.json). Returns (gate.json's
    dict, the gate's exit code)."""
    from forgetcheck.report import html
    from forgetcheck.rundir import read_json
    from forgetcheck.schema import StageTimer
    from forgetcheck.verdict import compare, history, text
    from forgetcheck.verdict.gate import gate_run

    alpha = float(((read_json(run.config).get("gate") or {}).get("alpha")) or 0.05)
    with console.stage(title):
        with StageTimer(run, "compare"):
            result = compare.compare_run(run, alpha=alpha)
        if previous is not None:
            for line in history.summary_lines(history.write_history(run, previous, alpha=alpha)):
                console.say(f"  {line}")
        gate_dict, code = gate_run(run.root, policy, policy_file=policy_file, junit=junit, markdown=markdown)
        report_path = html.write_report(run)
    for arm in result.get("arms") or []:
        s = (result.get("summary") or {}).get(arm) or {}
        console.say(f"  {arm}: {_arm_verdict(gate_dict, arm)}")
        if s:
            console.say(f"      {summary_line(s)}")
    cfg_doc = read_json(run.config)
    limit = (cfg_doc.get("eval") or {}).get("limit")
    sequential = bool((cfg_doc.get("looks") or {}).get("until_decided"))
    console.say(f"report: {report_path}")
    console.say(f"gate:   {run.gate}  -> {str(gate_dict.get('verdict', '')).upper()}: "
                f"{text.verdict_reason(gate_dict)}")
    if gate_dict.get("power"):
        console.say(f"power:  {gate_dict['power']['sentence']}")
    console.say(f"        {text.decide_hint(gate_dict, limit, sequential)}")
    for label, path in (("junit", junit), ("markdown", markdown)):
        if path is not None:
            console.say(f"{label}: {path}")
    return gate_dict, code


def _arm_verdict(gate_dict: dict, arm: str) -> str:
    a = (gate_dict.get("arms") or {}).get(arm) or {}
    if a.get("verdict"):
        return str(a["verdict"]).upper()
    return "PASS" if a.get("passed") else "FAIL"


def summary_line(s: dict) -> str:
    """One arm's learning against forgetting (compare.json `summary`): the retention drop and every learning signal,
    each with its interval."""
    from forgetcheck.schema import LEARNING_SIGNALS

    def val(x, ci, unit):
        digits = 3 if unit == "bits per byte" else 2
        if x is None:
            return "n/a"
        return f"{x:+.{digits}f} {'points' if unit == 'points' else unit}" + (
            f" [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]" if ci else "")

    parts = [f"forgetting {val(s['forgetting'], s['forgetting_ci'], 'points')} (retention mean drop"
             f"{', soft accuracy' if s.get('metric') == 'soft' else ''})"]
    for name, (label, unit, _) in LEARNING_SIGNALS.items():
        g = (s.get("signals") or {}).get(name)
        if g:
            parts.append(f"{label} {val(g['delta'], g['ci'], unit)}")
    if len(parts) == 1:
        parts.append(f"learning {val(s['learning'], s['learning_ci'], 'points')} (domain mean gain)")
    return "; ".join(parts)
