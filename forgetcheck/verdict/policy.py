"""The gate's policy: margins, level, metric and options, from (in increasing precedence) the defaults, the
run's config.json, a gate.toml file and command-line flags; every key known and every value checked here.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from forgetcheck.config import GateConfig, check, validate_gate
from forgetcheck.errors import BadInput
from forgetcheck.rundir import read_text

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

POLICY_KEYS = tuple(f.name for f in dataclasses.fields(GateConfig))
STRING_KEYS = {"metric": ("acc", "soft"), "on_inconclusive": ("fail", "pass", "inconclusive")}
BOOL_KEYS = ("keep_uninformative",)
LIST_KEYS = ("require_tasks",)
OFF_KEYS = ("max_relative_drop", "max_ppl_rise", "max_kl")
"""Margins that also take "off" (a flag or the policy file): the rule or the guard turned off."""


def check_keys(values: dict, where: str | None = None) -> None:
    """The one home of "unknown policy key": BadInput naming the unknown keys and the known ones."""
    unknown = set(values) - set(POLICY_KEYS)
    if unknown:
        raise BadInput(f"{where + ': ' if where else ''}unknown gate policy key(s) {', '.join(sorted(unknown))}; "
                       f"known: {', '.join(POLICY_KEYS)}")


def as_policy(policy: GateConfig | dict | None) -> GateConfig:
    if policy is None:
        return GateConfig()
    if isinstance(policy, GateConfig):
        return policy
    check_keys(policy)
    return GateConfig(**policy)


def load_policy(path: Path) -> dict:
    """A gate.toml: keys at the top level and/or under [gate] (merged); '-' or '_' in names. Numbers must be finite and
    >= 0 (`min_domain_gain` may be negative); `max_relative_drop`/`max_ppl_rise`/`max_kl` may be "off"; `metric` is acc|soft,
    `on_inconclusive` fail|pass|inconclusive, `keep_uninformative` true|false, `require_tasks` a list of task
    names, `tiers` a table of task names or glob patterns to critical|supporting|advisory."""
    path = Path(path)
    keys = ", ".join(POLICY_KEYS)
    text = read_text(path, where=f"--policy {path}", kind="TOML file", missing_fix=f"give a TOML file with keys {keys}",
                     fix=f"give a TOML file with keys {keys}")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise BadInput(f"--policy {path}: not valid TOML ({e})") from None
    # keys at the top level and under [gate] are merged, never one table dropped for the other; a key set in
    # both to different values is refused (which one was meant cannot be told)
    gate = data.pop("gate", {})
    if not isinstance(gate, dict):
        raise BadInput(f"--policy {path}: 'gate' must be a table ([gate]) of policy keys (got {gate!r})")
    top = {k.replace("-", "_"): v for k, v in data.items()}
    out = {k.replace("-", "_"): v for k, v in gate.items()}
    clash = sorted(k for k in set(top) & set(out) if top[k] != out[k])
    if clash:
        raise BadInput(f"--policy {path}: {', '.join(clash)} set both at the top level and under [gate], to "
                       "different values: keep one")
    out = {**top, **out}
    check_keys(out, f"--policy {path}")
    for k, v in list(out.items()):
        if k in STRING_KEYS:
            if v not in STRING_KEYS[k]:
                raise BadInput(f"--policy {path}: {k} must be one of {', '.join(STRING_KEYS[k])} (got {v!r})")
        elif k == "tiers":
            if not isinstance(v, dict):
                raise BadInput(f"--policy {path}: tiers must be a table of task names or patterns to a tier "
                               f"([gate.tiers], e.g. fc_mmlu_stem = \"advisory\") (got {v!r})")
            out[k] = tuple(v.items())  # checked with the rest by validate_gate, in the file's order
        elif k in LIST_KEYS:
            if not (isinstance(v, list) and all(isinstance(x, str) and x for x in v)):
                raise BadInput(f"--policy {path}: {k} must be a list of task names (got {v!r})")
            out[k] = tuple(v)
        elif k in BOOL_KEYS:
            if not isinstance(v, bool):
                raise BadInput(f"--policy {path}: {k} must be true or false (got {v!r})")
        elif k in OFF_KEYS and v == "off":
            out[k] = None
        elif not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise BadInput(f"--policy {path}: {k} must be a finite number (got {v!r})")
        elif v < 0 and k != "min_domain_gain":
            raise BadInput(f"--policy {path}: {k} must be >= 0 (got {v!r})")
    return out


def resolve_policy(run_config: dict | None, policy_file: Path | None, overrides: dict) -> GateConfig:
    """Defaults <- the run's config.json gate section <- the policy file <- CLI flags (None = not given)."""
    values: dict[str, Any] = {}
    if run_config:
        values.update({k: v for k, v in (run_config["gate"] or {}).items() if k in POLICY_KEYS})
    if policy_file is not None:
        values.update(load_policy(policy_file))
    values.update({k: v for k, v in overrides.items() if v is not None})
    for k in OFF_KEYS:  # "off" (a flag or the file) turns a rule off
        if values.get(k) == "off":
            values[k] = None
    pol = GateConfig(**values)
    check(validate_gate(pol))
    return pol


def flag_number(flag: str, value: str | None) -> float | str | None:
    """A margin flag that also takes 'off' (None: not given)."""
    if value is None or value == "off":
        return value
    try:
        return float(value)
    except ValueError:
        raise BadInput(f"{flag} must be a number or 'off' (got {value!r})") from None


def margin_value(flag: str, value: str) -> float | None:
    """A margin flag's value for GateConfig: the number, or None for 'off' (the rule turned off)."""
    v = flag_number(flag, value)
    return None if v == "off" else v
