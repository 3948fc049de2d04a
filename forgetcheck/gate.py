"""The release gate: turn compare.json into pass/fail, with a reason for every rule.

Pure: reads JSON (and a TOML policy), writes gate.json (+ optional JUnit XML and Markdown). Never imports
torch. Rules, applied to every arm (the gate passes only when every rule of every arm passes):

- `task_drop`: a retention task fails when its drop exceeds `max_drop` points AND the drop is significant at
  `alpha` after Holm's correction across the retention tasks (per arm). A drop beyond the threshold whose
  significance cannot be tested (no per-item records) fails too: the gate does not pass what it cannot check.
- `retention_mean`: the mean retention score fails when it drops by more than `max_mean_drop` points AND the
  drop is significant (bootstrap over items, p < alpha).
- `domain_gain` (only with `min_domain_gain`): the mean domain score must rise by at least that many points.
- `coverage`: an arm with no retention task compared fails (a gate that checked nothing must not pass).

Perplexity tasks are drift measurements in their own units, not points: they are reported, not gated.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

from forgetcheck.config import GateConfig, check, validate_gate
from forgetcheck.errors import BadInput
from forgetcheck.rundir import RunDir, atomic_write_json, atomic_write_text, read_json
from forgetcheck.schema import SCHEMA_VERSION, require

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

POLICY_KEYS = tuple(f.name for f in dataclasses.fields(GateConfig))
EPS = 1e-9  # points: a mean of 0/1 items x 100 carries float noise (2.0000000000000036 is 2)


def _policy(policy: GateConfig | dict | None) -> GateConfig:
    if policy is None:
        return GateConfig()
    if isinstance(policy, GateConfig):
        return policy
    unknown = set(policy) - set(POLICY_KEYS)
    if unknown:
        raise BadInput(f"unknown gate policy key(s) {', '.join(sorted(unknown))}: use {', '.join(POLICY_KEYS)}")
    return GateConfig(**policy)


def _f(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.3g}"


def signed(v: float, digits: int = 1) -> str:
    """`+1.2` / `-0.4`, and `+0.0` rather than `-0.0` for what rounds to zero."""
    return f"{(v if round(v, digits) != 0 else 0.0):+.{digits}f}"


def _ci(ci) -> str:
    return "no CI" if not ci else f"CI [{signed(ci[0])}, {signed(ci[1])}]"


def decide(compare: dict, policy: GateConfig | dict | None = None) -> dict:
    """Apply the policy's rules to a compare.json dict. Returns the gate dict (written as gate.json)."""
    pol = _policy(policy)
    check(validate_gate(pol))
    alpha = pol.alpha
    level = f"{round((1 - compare.get('alpha', 0.05)) * 100)}%"
    rules: list[dict[str, Any]] = []
    tasks = compare.get("tasks") or {}
    arms = compare.get("arms") or []

    def add(rule: str, arm: str, passed: bool, reason: str, task: str | None = None, **values):
        rules.append({"rule": rule, "arm": arm, "task": task, "passed": bool(passed),
                      "reason": f"{arm}: {reason}", "values": values})

    for arm in arms:
        gated = 0
        for name in sorted(tasks):
            t = tasks[name]
            if t.get("suite") != "retention" or t.get("unit") != "points":
                continue
            a = (t.get("arms") or {}).get(arm)
            if not a or a.get("delta") is None:
                continue
            gated += 1
            drop = 0.0 - a["delta"]
            p = a.get("p_holm")
            base_s = t["base"].get("score_paired", t["base"].get("score"))
            nums = (f"{name} {t['metric']} {_f(base_s)} -> {_f(a.get('score'))} "
                    f"(delta {signed(a['delta'])} points, {level} {_ci(a.get('ci'))}, "
                    f"Holm p={_p(p)})")
            vals = {"drop": drop, "p_holm": p, "max_drop": pol.max_drop, "alpha": alpha}
            if drop <= pol.max_drop + EPS:
                add("task_drop", arm, True, f"{nums}: drop within max {pol.max_drop:g} points", name, **vals)
            elif p is None:
                add("task_drop", arm, False, f"{nums}: drop exceeds max {pol.max_drop:g} points and cannot be "
                    "tested for significance (no per-item records)", name, **vals)
            elif p < alpha:
                add("task_drop", arm, False, f"{nums}: dropped {drop:.1f} points > max {pol.max_drop:g}, "
                    f"significant at alpha {alpha:g} after Holm", name, **vals)
            else:
                add("task_drop", arm, True, f"{nums}: drop {drop:.1f} > max {pol.max_drop:g} points but not "
                    f"significant at alpha {alpha:g} after Holm: may be noise", name, **vals)
        if gated == 0:
            add("coverage", arm, False, "no retention task with a score to compare: evaluate the retention suite")

        ret = ((compare.get("suites") or {}).get("retention") or {}).get("arms", {}).get(arm)
        if ret:
            drop = 0.0 - ret["delta"]
            p = ret.get("p_value")
            nums = (f"retention mean over {ret.get('n_tasks')} tasks {_f(ret.get('base_mean'))} -> "
                    f"{_f(ret.get('arm_mean'))} (delta {signed(ret['delta'])} points, {level} {_ci(ret.get('ci'))}, "
                    f"bootstrap p={_p(p)})")
            vals = {"drop": drop, "p_value": p, "max_mean_drop": pol.max_mean_drop, "alpha": alpha}
            if drop <= pol.max_mean_drop + EPS:
                add("retention_mean", arm, True, f"{nums}: within max {pol.max_mean_drop:g} points", **vals)
            elif p is None:
                add("retention_mean", arm, False, f"{nums}: drop exceeds max {pol.max_mean_drop:g} points and "
                    "cannot be tested for significance", **vals)
            elif p < alpha:
                add("retention_mean", arm, False, f"{nums}: dropped {drop:.1f} points > max "
                    f"{pol.max_mean_drop:g}, significant at alpha {alpha:g}", **vals)
            else:
                add("retention_mean", arm, True, f"{nums}: drop {drop:.1f} > max {pol.max_mean_drop:g} points "
                    f"but not significant at alpha {alpha:g}", **vals)

        if pol.min_domain_gain is not None:
            dom = ((compare.get("suites") or {}).get("domain") or {}).get("arms", {}).get(arm)
            if not dom:
                add("domain_gain", arm, False, f"no domain task scored, cannot show a gain of "
                    f"{pol.min_domain_gain:g} points: evaluate the domain suite", min_domain_gain=pol.min_domain_gain)
            else:
                g = dom["delta"]
                nums = (f"domain mean {_f(dom.get('base_mean'))} -> {_f(dom.get('arm_mean'))} "
                        f"(gain {signed(g)} points, {level} {_ci(dom.get('ci'))})")
                ok = g >= pol.min_domain_gain - EPS
                add("domain_gain", arm, ok, f"{nums}: {'at least' if ok else 'below'} the required "
                    f"{pol.min_domain_gain:g} points", gain=g, min_domain_gain=pol.min_domain_gain)

    if not arms:
        rules.append({"rule": "coverage", "arm": None, "task": None, "passed": False,
                      "reason": "no arm was compared: nothing to release", "values": {}})
    per_arm = {arm: all(r["passed"] for r in rules if r["arm"] == arm) for arm in arms}
    passed = all(r["passed"] for r in rules)
    failed = [r["reason"] for r in rules if not r["passed"]]
    return {
        "schema_version": SCHEMA_VERSION, "kind": "gate", "passed": passed,
        "verdict": "pass" if passed else "fail", "policy": dataclasses.asdict(pol),
        "arms": {arm: {"passed": ok, "failed": [r["reason"] for r in rules if r["arm"] == arm and not r["passed"]]}
                 for arm, ok in per_arm.items()},
        "rules": rules,
        "summary": (f"PASS: {len(rules)} rules passed for {', '.join(arms)}" if passed
                    else f"FAIL: {len(failed)} of {len(rules)} rules failed: " + "; ".join(failed)),
    }


# ---- policy --------------------------------------------------------------------------------------------

def load_policy(path: Path) -> dict:
    """A gate.toml: keys at the top level or under [gate]; '-' or '_' in names."""
    path = Path(path)
    if path.is_dir():
        raise BadInput(f"--policy {path} is a folder: give a TOML file with max_drop, max_mean_drop, alpha, "
                       "min_domain_gain")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise BadInput(f"--policy {path}: not a UTF-8 text file; give a TOML file") from None
    except FileNotFoundError:
        raise BadInput(f"--policy {path} not found: give a TOML file with max_drop, max_mean_drop, alpha, "
                       "min_domain_gain") from None
    except tomllib.TOMLDecodeError as e:
        raise BadInput(f"--policy {path}: not valid TOML ({e})") from None
    data = data.get("gate", data)
    out = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = set(out) - set(POLICY_KEYS)
    if unknown:
        raise BadInput(f"--policy {path}: unknown key(s) {', '.join(sorted(unknown))}; "
                       f"known: {', '.join(POLICY_KEYS)}")
    for k, v in out.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise BadInput(f"--policy {path}: {k} must be a finite number (got {v!r})")
    return out


def resolve_policy(run_config: dict | None, policy_file: Path | None, overrides: dict) -> GateConfig:
    """Defaults <- the run's config.json gate section <- the policy file <- CLI flags (None = not given)."""
    values: dict[str, Any] = {}
    if run_config:
        values.update({k: v for k, v in (run_config.get("gate") or {}).items() if k in POLICY_KEYS})
    if policy_file is not None:
        values.update(load_policy(policy_file))
    values.update({k: v for k, v in overrides.items() if v is not None})
    pol = GateConfig(**values)
    check(validate_gate(pol))
    return pol


# ---- outputs -------------------------------------------------------------------------------------------

def to_junit(gate: dict) -> str:
    """JUnit XML: one testcase per rule, failures carry the reason."""
    rules = gate["rules"]
    suite = ET.Element("testsuite", name="forgetcheck.gate", tests=str(len(rules)),
                       failures=str(sum(not r["passed"] for r in rules)), errors="0", skipped="0")
    for r in rules:
        name = r["rule"] + (f"[{r['task']}]" if r.get("task") else "")
        case = ET.SubElement(suite, "testcase", classname=f"forgetcheck.gate.{r['arm']}", name=name)
        if r["passed"]:
            ET.SubElement(case, "system-out").text = r["reason"]
        else:
            ET.SubElement(case, "failure", message=r["reason"], type=r["rule"]).text = r["reason"]
    root = ET.Element("testsuites", name="forgetcheck", tests=suite.get("tests"), failures=suite.get("failures"))
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def to_markdown(gate: dict) -> str:
    pol = gate["policy"]
    head = "PASS" if gate["passed"] else "FAIL"
    lines = [f"## forgetcheck gate: **{head}**", "",
             f"Policy: max drop {pol['max_drop']:g} points per retention task, max mean drop "
             f"{pol['max_mean_drop']:g} points, alpha {pol['alpha']:g} (Holm-corrected)"
             + (f", min domain gain {pol['min_domain_gain']:g} points" if pol.get("min_domain_gain") is not None
                else "") + ".", "",
             "| | arm | rule | reason |", "|---|---|---|---|"]
    for r in sorted(gate["rules"], key=lambda r: r["passed"]):
        mark = "✅" if r["passed"] else "❌"
        rule = r["rule"] + (f" `{r['task']}`" if r.get("task") else "")
        lines.append(f"| {mark} | {r['arm']} | {_md_cell(rule)} | {_md_cell(r['reason'])} |")
    return "\n".join(lines) + "\n"


def gate_run(target: Path | str, policy: GateConfig | dict | None = None, *, policy_file: Path | None = None,
             junit: Path | None = None, markdown: Path | None = None) -> tuple[dict, int]:
    """Gate a run directory (compare.json computed when absent) or a compare.json file. Writes gate.json
    beside compare.json. Returns (gate dict, exit code: 0 pass, 1 fail). `policy` (a dict may hold only
    some keys, None values meaning not given) overrides `policy_file`, which overrides the run's config."""
    from forgetcheck.compare import read_compare
    from forgetcheck.rundir import check_output_file

    target = Path(target)
    for flag, path in (("--junit", junit), ("--markdown", markdown)):  # refused before anything is written
        if path is not None:
            check_output_file(Path(path), flag)
    run_config = None
    if target.is_dir():
        run = RunDir(target)
        if run.compare.exists():
            compare = read_compare(run.compare)
        elif run.eval_json("base").exists():
            from forgetcheck.compare import compare_run

            compare = compare_run(run)
        else:
            raise BadInput(f"{target} holds neither compare.json nor eval/base.json: give a run directory "
                           "written by `forgetcheck run`, or a compare.json")
        if run.config.exists():
            run_config = read_json(run.config)
        out = run.gate
    elif target.is_file():
        compare = read_compare(target)
        out = target.parent / "gate.json"
        cfg = target.parent / "config.json"
        if cfg.exists():
            run_config = read_json(cfg)
    else:
        raise BadInput(f"{target} not found: give a run directory (runs/<id>) or its compare.json")
    require(compare, "compare", str(target))
    if run_config is not None:
        require(run_config, "config", "config.json beside the compare.json")
    overrides = dataclasses.asdict(policy) if isinstance(policy, GateConfig) else dict(policy or {})
    unknown = set(overrides) - set(POLICY_KEYS)
    if unknown:
        raise BadInput(f"unknown gate policy key(s) {', '.join(sorted(unknown))}: use {', '.join(POLICY_KEYS)}")
    pol = resolve_policy(run_config, policy_file, overrides)
    gate = decide(compare, pol)
    atomic_write_json(out, gate)
    if junit is not None:
        atomic_write_text(Path(junit), to_junit(gate))
    if markdown is not None:
        atomic_write_text(Path(markdown), to_markdown(gate))
    return gate, 0 if gate["passed"] else 1
