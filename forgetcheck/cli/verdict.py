"""`forgetcheck compare | report | gate`: the verdict stages run alone on a run folder (verdict/ and report/ do
the work, from JSON only: these commands never import torch)."""

from __future__ import annotations

from pathlib import Path

from forgetcheck.rundir import RunDir


def echo(msg: str = "") -> None:
    print(msg)


def cmd_compare(run: Path, *, alpha: float, n_boot: int, seed: int) -> None:
    from forgetcheck.verdict.compare import compare_run

    rd = RunDir.existing(run)
    result = compare_run(rd, alpha=alpha, n_boot=n_boot, seed=seed)
    for arm, s in result["summary"].items():
        fg, ln = s["forgetting"], s["learning"]
        echo(f"{arm}: forgetting {'n/a' if fg is None else f'{fg:+.2f}'} points (retention mean drop), "
             f"learning {'n/a' if ln is None else f'{ln:+.2f}'} points (domain mean gain)")
    echo(f"wrote {rd.compare}")


def cmd_report(run: Path) -> None:
    from forgetcheck.report.html import write_report

    echo(f"wrote {write_report(RunDir.existing(run))}")


def cmd_gate(target: Path, verdict) -> int:
    """The gate's exit code (0 PASS, 1 FAIL, 4 INCONCLUSIVE unless --on-inconclusive maps it)."""
    from forgetcheck.verdict.gate import gate_run
    from forgetcheck.verdict.text import console_lines

    result, code = gate_run(target, verdict.overrides(), policy_file=verdict.policy, junit=verdict.junit,
                            markdown=verdict.markdown)
    for line in console_lines(result):
        echo(line)
    return code
