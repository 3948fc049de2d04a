"""`--resume`: which flags typed beside it may differ from the run's config.json, and the one message for each
flag that may not (docs/design.md, "Where each validation rule lives").
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from forgetcheck.config import GateConfig, LookConfig, RunConfig, TrainConfig, split_csv
from forgetcheck.verdict.policy import OFF_KEYS, margin_value

RESUME_MAY_CHANGE = ("max_drop", "max_relative_drop", "max_mean_drop", "alpha", "min_domain_gain", "metric",
                     "max_ppl_rise", "max_kl", "keep_uninformative", "force")
"""Flags that may differ from the run's config.json on `--resume`: the gate's thresholds (compare, report and
gate run again over the finished results, and config.json records the new values) and --force (whether a
memory plan that does not fit may start). Every other flag given with --resume must repeat the recorded value:
a resumed run is the run that was started, so its results stay comparable."""

# CLI parameter name -> (section of RunConfig or None, field)
_RESUME_FIELDS = {
    "base": (None, "base"), "data": (None, "data"), "arms": (None, "arms"), "preset": (None, "preset"),
    "device": (None, "device"), "suite": ("eval", "suites"), "tasks": ("eval", "tasks"), "limit": ("eval", "limit"),
    "backend": ("eval", "backend"), "screen_items": ("eval", "screen_items"),
    **{f.name: ("gate", f.name) for f in dataclasses.fields(GateConfig) if "help" in f.metadata},  # its flags
    **{f.name: ("train", f.name) for f in dataclasses.fields(TrainConfig)},
    **{f.name: ("looks", f.name) for f in dataclasses.fields(LookConfig)},
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shown(v) -> str:
    return ",".join(v) if isinstance(v, tuple) else str(v)


def _as_config_value(name: str, value):
    if name in ("arms", "suite", "tasks"):
        return split_csv(value) if isinstance(value, str) else tuple(value or ())
    if name in OFF_KEYS and isinstance(value, str):
        return margin_value(_flag(name), value)
    return value


def resume_conflicts(saved: RunConfig, given: dict, run_root: Path) -> tuple[list[str], dict]:
    """(problems, gate changes) of flags given on the command line with `--resume` (`given`: CLI parameter
    name -> value, only those the user typed). A flag that repeats the recorded value is fine; one of
    RESUME_MAY_CHANGE is a change to apply; any other difference is a problem naming the flag and both values."""
    problems, gate_changes = [], {}
    for name, value in given.items():
        if name in ("resume",):
            continue
        if name == "run_id":
            if value != Path(run_root).name:
                problems.append(f"--run-id {value} with --resume {run_root}: the resumed run's id is "
                                f"{Path(run_root).name}; drop --run-id")
            continue
        if name == "out":
            if Path(value).resolve() != Path(run_root).resolve().parent:
                problems.append(f"--out {value} with --resume {run_root}: a resumed run stays in "
                                f"{Path(run_root).parent}; drop --out")
            continue
        if name not in _RESUME_FIELDS:
            continue
        section, fld = _RESUME_FIELDS[name]
        old = getattr(getattr(saved, section) if section else saved, fld)
        new = _as_config_value(name, value)
        same = (old == new) or (isinstance(old, float) and isinstance(new, (int, float)) and
                                math.isclose(old, new, rel_tol=1e-12, abs_tol=0.0))
        if same:
            continue
        if name in RESUME_MAY_CHANGE:
            gate_changes[name] = new
            continue
        problems.append(f"{_flag(name)} {_shown(new)} differs from the resumed run's {_shown(old)} (config.json): a "
                        f"resumed run keeps its settings (only {', '.join(_flag(n) for n in RESUME_MAY_CHANGE)} "
                        f"may change); drop {_flag(name)}, or start a new run with another --run-id")
    return problems, gate_changes
