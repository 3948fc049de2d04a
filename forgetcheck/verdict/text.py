"""The verdict written for people and CI: console lines, one-sentence reasons, JUnit XML (a rule per testcase;
INCONCLUSIVE ones skipped), Markdown, and the number formats every reason uses.
"""

from __future__ import annotations

import re
from xml.etree import ElementTree as ET

from forgetcheck.verdict.stats import round_up


def _f(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.3g}"


def signed(v: float, digits: int = 1) -> str:
    """`+1.2` / `-0.4`, and `+0.0` rather than `-0.0` for what rounds to zero."""
    return f"{(v if round(v, digits) != 0 else 0.0):+.{digits}f}"


def _ci(ci) -> str:
    return "no CI" if not ci else f"CI [{signed(ci[0])}, {signed(ci[1])}]"


_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")


def printable(text: str) -> str:
    """`text` with every control character (ANSI escapes, BEL, NUL, lone surrogates) shown as `\\xNN`: task and
    arm names come from user files, and no output of ours (terminal, JUnit XML, Markdown) may carry them raw."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}",
                        str(text))


def _case_name(r: dict) -> str:
    return r["rule"] + (f"[{r['task']}]" if r["task"] else "") + (f" ({r['tier']})" if r["tier"] != "critical" else "")


def to_junit(gate: dict) -> str:
    """JUnit XML: one testcase per rule; FAIL carries a <failure>, INCONCLUSIVE a <skipped> with the reason;
    uninformative tasks left out are <skipped> too."""
    rules = gate["rules"]
    excluded = [e for e in gate["excluded"] if not e["kept"]]
    # an advisory rule never fails the build (it never changes the verdict): its FAIL is a skipped case
    failing = [r["status"] == "fail" and r["tier"] != "advisory" for r in rules]
    n_fail = sum(failing)
    n_skip = len(rules) - n_fail - sum(r["status"] == "pass" for r in rules) + len(excluded)
    total = len(rules) + len(excluded)
    suite = ET.Element("testsuite", name="forgetcheck.verdict.gate", tests=str(total), failures=str(n_fail), errors="0",
                       skipped=str(n_skip))
    ET.SubElement(ET.SubElement(suite, "properties"), "property", name="verdict", value=gate["verdict"])
    for r, fails in zip(rules, failing, strict=True):
        reason = printable(r["reason"])  # XML 1.0 cannot hold control characters at all
        case = ET.SubElement(suite, "testcase", classname=printable(f"forgetcheck.verdict.gate.{r['arm']}"),
                             name=printable(_case_name(r)))
        if r["status"] == "pass":
            ET.SubElement(case, "system-out").text = reason
        elif fails:
            ET.SubElement(case, "failure", message=reason, type=r["rule"]).text = reason
        else:
            ET.SubElement(case, "skipped", message=f"{r['status'].upper()}: " + reason)
    for e in excluded:
        case = ET.SubElement(suite, "testcase", classname="forgetcheck.verdict.gate.uninformative",
                             name=printable(e["task"]))
        ET.SubElement(case, "skipped", message=printable(e["reason"]))
    root = ET.Element("testsuites", name="forgetcheck", tests=str(total), failures=str(n_fail),
                      skipped=str(n_skip))
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


_MD_SPECIAL = re.compile(r"([\\`*\[\]|!])")


def _md_cell(s: str) -> str:
    """Text for a Markdown table cell, inert: no HTML (`<img onerror>`), no link or image (`![](http://...)`),
    no code span or emphasis from a task name, no control character."""
    s = printable(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")
    return _MD_SPECIAL.sub(r"\\\1", s)


MARK = {"pass": "✅", "fail": "❌", "inconclusive": "❔"}
ORDER = {"fail": 0, "inconclusive": 1, "pass": 2}


def policy_sentence(pol: dict) -> str:
    s = (f"harm must be ruled out at one-sided level {1 - pol['alpha']:.0%} ({'soft accuracy' if pol['metric'] == 'soft' else 'accuracy'}): "
         f"at most {pol['max_drop']:g} points drop per retention task"
         + (f" ({pol['max_relative_drop']:g}% of the base's score where smaller)"
            if pol["max_relative_drop"] is not None else "")
         + f" (failing a task needs Holm p < {pol['alpha']:g}), {pol['max_mean_drop']:g} on the retention mean")
    if pol["max_ppl_rise"] is not None:
        s += f", a {pol['max_ppl_rise']:g}% rise of general-text bits per byte"
    if pol["max_kl"] is not None:
        s += f", {pol['max_kl']:g} nats/token mean KL from the base"
    if pol["min_domain_gain"] is not None:
        s += f"; the domain mean must gain at least {pol['min_domain_gain']:g} points"
    return s


def verdict_reason(gate: dict) -> str:
    """One plain sentence: which outcome and why."""
    v = gate["verdict"]
    if v == "pass":
        return "every rule rules out harm beyond its margin"
    bad = [r for r in gate["rules"] if r["status"] == v]
    what = "show harm beyond the margin" if v == "fail" else "can neither rule out nor show harm beyond the margin"
    names = ", ".join(f"{r['arm']} {_case_name(r)}" if r["arm"] else _case_name(r) for r in bad[:6])
    more = f" and {len(bad) - 6} more" if len(bad) > 6 else ""
    return f"{len(bad)} rule(s) {what}: {names}{more}"


def to_markdown(gate: dict) -> str:
    pol = gate["policy"]
    head = gate["verdict"].upper()
    lines = [f"## forgetcheck gate: **{head}**", "",
             f"{head}: {_md_cell(verdict_reason(gate))}." + (f" {gate['exit_note']}." if gate["exit_note"] else ""), "",
             f"Power: {gate['power']['sentence']}.", "",
             f"Policy: {policy_sentence(pol)}.", "",
             "| | arm | rule | reason |", "|---|---|---|---|"]
    for r in sorted(gate["rules"], key=lambda r: ORDER[r["status"]]):
        rule = r["rule"] + (f" {r['task']}" if r["task"] else "") + (f" ({r['tier']})" if r["tier"] != "critical"
                                                                    else "")
        if r["rule"] == "task_missing":
            rule = f"MISSING {rule}"
        lines.append(f"| {MARK[r['status']]} | {_md_cell(str(r['arm']))} | {_md_cell(rule)} | {_md_cell(r['reason'])} |")
    for e in gate["excluded"]:
        lines.append(f"| ➖ | all | {_md_cell('uninformative ' + e['task'])} | {_md_cell(e['reason'])} |")
    for e in gate["not_checked"]:
        lines.append(f"| ➖ | {_md_cell(e['arm'])} | {e['rule']} not checked | {_md_cell(e['reason'])} |")
    return "\n".join(lines) + "\n"


def console_lines(gate: dict) -> list[str]:
    """What `forgetcheck gate` (and `run`) print: one line per rule, the verdict with its reason, the power."""
    lines = [f"{r['status'].upper():<12} {r['reason']}" for r in sorted(gate["rules"], key=lambda r: ORDER[r["status"]])]
    lines += [f"{'EXCLUDED':<12} {e['reason']}" for e in gate["excluded"] if not e["kept"]]
    lines += [f"{'NOT CHECKED':<12} {e['reason']}" for e in gate["not_checked"]]
    lines.append(f"gate: {gate['verdict'].upper()}: {verdict_reason(gate)}"
                 + (f" ({gate['exit_note']})" if gate["exit_note"] else ""))
    lines.append(f"power: {gate['power']['sentence']}")
    return [printable(x) for x in lines]


def decide_hint(gate: dict, limit: int | None, sequential: bool = False) -> str:
    """What it would take to decide, for `run`'s closing lines: the --limit (or preset) at which every rule that
    more items can decide would PASS with 80% probability if nothing changed."""
    if gate["verdict"] != "inconclusive":
        return f"the verdict is {gate['verdict'].upper()}: no more items are needed to decide"
    need = gate["power"]["items_needed"]
    if not need:
        return "re-evaluate with per-item records to decide"
    need = round_up(need)
    if limit is not None and need <= limit:
        return (f"at {limit} items per task every item-based rule would PASS with 80% probability if nothing "
                "changed; the rules still open saw a change that more items may not rule out, or are about drift or "
                "the domain gain (see gate.json)")
    if sequential:
        return (f"to decide, re-run with --max-items {need} (looks up to about {need:,} items per task; only the "
                f"tasks still open get them)")
    presets = "--preset standard (200 items per task)" if need <= 200 else "--preset full (every item)"
    return f"to decide, re-run with --limit {need} (about {need:,} items per task) or {presets}"
