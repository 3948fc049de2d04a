"""The report: a pure function from the run directory's JSON to one self-contained `report.html`.

Reads compare.json and gate.json through the typed readers of schema.py (an older format is refused
with the command that rewrites it; when either is missing it names the command that writes it and writes
nothing), train/<arm>.json, config.json and manifest.json; it writes report.html and nothing else.
Charts are inline SVG laid out here and drawn by the Jinja2 template (autoescape, StrictUndefined): no
JavaScript library, no CDN, no web font. A Content-Security-Policy forbids every external resource, and
allows only the one inline script by its hash (it marks each chart `data-ok` for the browser test), so text
from a dataset can never run even if it were not escaped (it is).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import jinja2

from forgetcheck.config import seed_run_of
from forgetcheck.errors import BadInput
from forgetcheck.report.charts import Scale, nice_ticks, place_labels, tick_label
from forgetcheck.report.curves import curves_view
from forgetcheck.rundir import RunDir, atomic_write_text
from forgetcheck.schema import (
    LEARNING_SIGNALS,
    SUMMARY_DEFAULTS,
    CompareFile,
    TrainFile,
    config_doc,
    read_compare,
    read_config_doc,
    read_gate,
    read_manifest,
    read_train,
)
from forgetcheck.verdict.text import policy_sentence, signed, verdict_reason

TEMPLATE = "report.html.j2"
ARM_COLORS = {"sft": "#2563eb", "cpt": "#d97706", "lora": "#059669", "replay": "#7c3aed", "freeze": "#be123c"}
WISE_COLOR = "#0891b2"  # every interpolated model (wise-<a>) and the interpolation curve
EXTRA_COLORS = ("#db2777", "#0891b2", "#65a30d", "#9333ea")

# Runs after load; marks every chart that rendered visible SVG shapes. Its hash goes into the CSP.
CHECK_SCRIPT = (
    "(function(){var cs=document.querySelectorAll('svg.chart'),ok=0;"
    "cs.forEach(function(s){var n=s.querySelectorAll('circle,line,path,polyline,rect').length,"
    "r=s.getBoundingClientRect();var good=n>0&&r.width>0&&r.height>0;"
    "s.setAttribute('data-ok',good?'1':'0');if(good)ok++;});"
    "document.body.setAttribute('data-charts',ok+'/'+cs.length);})();"
)


def _script_hash(script: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()


# ---- charts (geometry in report/charts.py) ------------------------------------------------------------------------

__all__ = ["Scale", "nice_ticks", "write_report", "build_view"]

def front_arms(points: list[dict]) -> set[str]:
    """The arms on the learning-forgetting front: no other arm both learns at least as much and forgets at
    most as much, one of them strictly (arms without both scores are left out)."""
    full = [p for p in points if not p["f_missing"] and not p["l_missing"]]
    return {p["arm"] for p in full
            if not any(q["l"] >= p["l"] and q["f"] <= p["f"] and (q["l"] > p["l"] or q["f"] < p["f"])
                       for q in full if q is not p)}


def wise_alpha(arm: str) -> float | None:
    """a of an interpolated model's label `wise-<a>` (interpolate.name), else None."""
    if not arm.startswith("wise-"):
        return None
    try:
        return float(arm[len("wise-"):])
    except ValueError:
        return None


def chart_summary(compare: CompareFile) -> dict:
    """The learning-vs-forgetting point of each arm: its one training run's, or, with several (`--seeds`),
    the arm's over all its runs with two-level intervals (the seed runs' own points are not drawn)."""
    out = {arm: {**s, "seeds": 1} for arm, s in compare["summary"].items()}
    for arm, g in (compare["seed_groups"] or {}).items():
        if g["seeds"] > 1:
            for label in g["labels"]:
                out.pop(label, None)
            out[arm] = {**SUMMARY_DEFAULTS, **g["summary"], "seeds": g["seeds"]}
    return out


def learning_charts(compare: CompareFile, colors: dict, wise_from: str | None = None) -> list[dict]:
    """One learning-vs-forgetting chart per learning signal some arm has (rollup.LEARNING_SIGNALS), the default
    signal (the summary's `learning`) first: [{signal, label, unit, why, default, chart}]."""
    summ = chart_summary(compare)
    default = next((s["learning_signal"] for s in summ.values()), "transfer")
    out = []
    for name, (label, unit, why) in sorted(LEARNING_SIGNALS.items(), key=lambda kv: kv[0] != default):
        if name != default and not any((s.get("signals") or {}).get(name) for s in summ.values()):
            continue
        chart = learn_forget_chart(compare, colors, wise_from, signal=None if name == default else name)
        if chart is not None:
            out.append({"signal": name, "label": label, "unit": unit, "why": why, "default": name == default,
                        "metric": next((s["metric"] for s in summ.values()), "acc"), "chart": chart})
    return out


def learn_forget_chart(compare: CompareFile, colors: dict, wise_from: str | None = None,
                       signal: str | None = None) -> dict | None:
    """Scatter of arms: x = forgetting (retention mean drop), y = learning (the summary's default signal, or
    `signal`), with CIs; the front's arms ringed; the interpolation curve base (0, 0) -> wise-<a> by a ->
    `wise_from` drawn as a line."""
    pts = []
    for arm, s in chart_summary(compare).items():
        if signal is not None:
            sig = (s.get("signals") or {}).get(signal) or {}
            s = {**s, "learning": sig.get("delta"), "learning_ci": sig.get("ci")}
        if s["forgetting"] is None and s["learning"] is None:
            continue
        f, ln = s["forgetting"] or 0.0, s["learning"] or 0.0
        pts.append({"arm": arm, "f": f, "l": ln, "fci": s["forgetting_ci"] or [f, f],
                    "lci": s["learning_ci"] or [ln, ln], "color": colors[arm],
                    "f_missing": s["forgetting"] is None, "l_missing": s["learning"] is None,
                    "seeds": s["seeds"]})
    if not pts:
        return None
    w, h, ml, mr, mt, mb = 560, 340, 64, 24, 20, 52
    xs = [0.0] + [v for p in pts for v in p["fci"]]
    ys = [0.0] + [v for p in pts for v in p["lci"]]
    pad = lambda a, b: (a - 0.08 * max(b - a, 1.0), b + 0.08 * max(b - a, 1.0))  # noqa: E731
    sx = Scale(*pad(min(xs), max(xs)), ml, w - mr)
    sy = Scale(*pad(min(ys), max(ys)), h - mb, mt)
    front = front_arms(pts)
    for p in pts:
        p.update(cx=sx(p["f"]), cy=sy(p["l"]), fx0=sx(p["fci"][0]), fx1=sx(p["fci"][1]),
                 ly0=sy(p["lci"][0]), ly1=sy(p["lci"][1]), front=p["arm"] in front,
                 label=p["arm"] + (f" ({p['seeds']} seeds)" if p["seeds"] > 1 else ""))
    place_labels(pts, bottom=h - mb)  # arms at (nearly) the same point keep readable labels
    wise = sorted((wise_alpha(p["arm"]), p) for p in pts if wise_alpha(p["arm"]) is not None)
    curve = ""
    if wise:
        chain = [(sx(0.0), sy(0.0))] + [(p["cx"], p["cy"]) for _, p in wise]
        chain += [(p["cx"], p["cy"]) for p in pts if p["arm"] == wise_from]
        curve = " ".join(f"{x},{y}" for x, y in chain)
    return {"w": w, "h": h, "ml": ml, "mr": mr, "mt": mt, "mb": mb, "points": pts, "curve": curve,
            "wise_from": wise_from, "front": sorted(front), "wise_color": WISE_COLOR,
            "xticks": [{"v": tick_label(t), "x": sx(t)} for t in sx.ticks],
            "yticks": [{"v": tick_label(t), "y": sy(t)} for t in sy.ticks],
            "x0": sx(0.0), "y0": sy(0.0), "left": ml, "right": w - mr, "top": mt, "bottom": h - mb}


def loss_chart(train: dict[str, TrainFile], colors: dict) -> dict | None:
    series = []
    for arm, tr in train.items():
        curve = [(float(s), float(v)) for s, v in (tr["loss_curve"] or []) if v is not None and math.isfinite(v)]
        if curve:
            series.append({"arm": arm, "curve": curve, "color": colors[arm]})
    if not series:
        return None
    w, h, ml, mr, mt, mb = 560, 300, 64, 24, 20, 48
    allx = [x for s in series for x, _ in s["curve"]]
    ally = [y for s in series for _, y in s["curve"]]
    sx = Scale(min(allx), max(allx), ml, w - mr)
    sy = Scale(min(ally), max(ally), h - mb, mt)
    for s in series:
        s["points"] = " ".join(f"{sx(x)},{sy(y)}" for x, y in s["curve"])
        s["last"] = {"x": sx(s["curve"][-1][0]), "y": sy(s["curve"][-1][1]), "v": s["curve"][-1][1]}
        del s["curve"]
    return {"w": w, "h": h, "series": series, "left": ml, "right": w - mr, "top": mt, "bottom": h - mb,
            "xticks": [{"v": tick_label(t), "x": sx(t)} for t in sx.ticks],
            "yticks": [{"v": tick_label(t), "y": sy(t)} for t in sy.ticks]}


MEM_COLORS = {"weights": "#94a3b8", "gradients": "#64748b", "optimizer_state": "#475569", "optimizer": "#475569",
              "activations": "#cbd5e1", "gathered_blocks": "#a5b4fc"}
MEM_ORDER = tuple(MEM_COLORS)
MEM_EXTRA = ("#fda4af", "#fcd34d", "#86efac")


def memory_chart(train: dict[str, TrainFile]) -> dict | None:
    """Planned memory per component (stacked) above the measured peak, per arm; every component the train
    file lists (weights, gradients, optimizer_state, activations, gathered_blocks, ...)."""
    rows, names = [], []
    for arm, tr in train.items():
        mem = tr["memory"]
        planned = {k: float(v) for k, v in mem["planned"].items()
                   if k != "total" and isinstance(v, (int, float)) and v > 0}
        total = mem["planned"]["total"] or sum(planned.values()) or None
        measured = mem["measured_peak_bytes"]
        if total or measured:
            rows.append({"arm": arm, "planned": planned, "total": total, "measured": measured,
                         "method": mem["method"]})
            names += [k for k in planned if k not in names]
    if not rows:
        return None
    names.sort(key=lambda k: (MEM_ORDER.index(k) if k in MEM_ORDER else len(MEM_ORDER), k))
    extra = iter(MEM_EXTRA * len(names))
    colors = {k: MEM_COLORS.get(k) or next(extra) for k in names}
    w, ml, mr, mt, bar, gap = 560, 64, 24, 16, 18, 14
    h = mt + len(rows) * (2 * bar + gap + 8) + 40
    top = max(max(r["total"] or 0, r["measured"] or 0) for r in rows) / 1e9
    sx = Scale(0.0, top * 1.45 or 1.0, ml, w - mr)  # room for the labels right of the bars
    y = mt
    for r in rows:
        r["y"], segs, acc = y, [], 0.0
        for k in names:
            v = r["planned"].get(k, 0.0) / 1e9
            if v > 0:
                segs.append({"name": k, "x": sx(acc), "w": round(sx(acc + v) - sx(acc), 2), "color": colors[k],
                             "gb": v})
                acc += v
        if not segs and r["total"]:
            acc = r["total"] / 1e9
            segs.append({"name": "total", "x": sx(0), "w": round(sx(acc) - sx(0), 2), "color": "#64748b", "gb": acc})
        r["segs"] = segs
        r["planned_end"] = sx(acc)
        r["measured_w"] = round(sx((r["measured"] or 0) / 1e9) - sx(0), 2)
        r["ratio"] = (r["measured"] / r["total"]) if r["measured"] and r["total"] else None
        y += 2 * bar + gap + 8
    return {"w": w, "h": h, "rows": rows, "bar": bar, "left": ml, "right": w - mr, "bottom": h - 28,
            "xticks": [{"v": tick_label(t), "x": sx(t)} for t in sx.ticks],
            "parts": [(k, colors[k]) for k in names]}


def stage_timings(timings: dict) -> dict[str, float]:
    """The manifest's timings as seconds per row: each stage's, and a resumed run's sessions one by one
    (`run_sessions` is a list; `run_total` their sum)."""
    out: dict[str, float] = {}
    for k, v in timings.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
        elif isinstance(v, list):
            nums = [float(x) for x in v if isinstance(x, (int, float)) and not isinstance(x, bool)]
            out.update({f"{k} {i}": x for i, x in enumerate(nums, 1)} if len(nums) > 1 else
                       {k: nums[0]} if nums else {})
    return out


def unscored_text(task: dict, arms: list[str]) -> str:
    """Why no arm was scored on a task (a compare.json task, typed), once per distinct reason: 'not scored for
    sft, cpt: <why>'."""
    by_why: dict[str, list[str]] = {}
    for arm in arms:
        by_why.setdefault(task["unscored"][arm], []).append(arm)
    return "; ".join(f"not scored for {', '.join(a)}: {why}" for why, a in by_why.items()) or "not scored for any arm"


def forest_scale(compare: CompareFile) -> Scale | None:
    """One x scale (points) shared by every task row's mini CI plot."""
    vals = [0.0]
    for t in compare["tasks"].values():
        if t["unit"] != "points":
            continue
        for a in t["arms"].values():
            if a["delta"] is not None:
                vals.append(a["delta"])
            vals.extend(a["ci"] or [])
    if len(vals) == 1:
        return None
    m = max(abs(v) for v in vals) or 1.0
    return Scale(-m, m, 6, 154, n_ticks=9)


# ---- view ----------------------------------------------------------------------------------------------

def build_view(run: RunDir) -> dict[str, Any]:
    compare = read_compare(run.compare)
    config = read_config_doc(run.config) if run.config.exists() else {}  # shown as written
    manifest = read_manifest(run.manifest) if run.manifest.exists() else {}
    gate = read_gate(run.gate)
    gate_source = "gate.json"
    arms = list(compare["arms"])
    colors = {a: ARM_COLORS.get(seed_run_of(a)[0])  # an arm's --seeds runs share its colour
              or (WISE_COLOR if wise_alpha(a) is not None else EXTRA_COLORS[i % len(EXTRA_COLORS)])
              for i, a in enumerate(arms)}
    train = {}
    for arm in arms:
        p = run.train_json(arm)
        if p.exists():
            train[arm] = read_train(p)
    fs = forest_scale(compare)
    rows = []
    for name, t in sorted(compare["tasks"].items(), key=lambda kv: (kv[1]["suite"] != "retention",
                                                                   kv[1]["unit"] != "points", kv[0])):
        arm_rows = []
        for arm, a in t["arms"].items():
            d, ci = a["delta"], a["ci"]
            sig = bool(a["significant"])
            r = {"arm": arm, "color": colors[arm], "a": a, "delta": d, "ci": ci, "sig": sig,
                 "drop": sig and d is not None and d < 0, "gain": sig and d is not None and d > 0,
                 "forest": None}
            if fs is not None and t["unit"] == "points" and d is not None:
                r["forest"] = {"x": fs(d), "x0": fs(ci[0]) if ci else fs(d), "x1": fs(ci[1]) if ci else fs(d),
                               "zero": fs(0.0)}
            arm_rows.append(r)
        rows.append({"name": name, "t": t, "arms": arm_rows, "unscored": "" if arm_rows else unscored_text(t, arms),
                     "base_score": t["base"]["score_paired"]})
    flips = []
    for name, t in sorted(compare["tasks"].items(), key=lambda kv: (kv[1]["suite"] != "retention", kv[0])):
        for arm, a in t["arms"].items():
            ex = a["examples"]
            if ex["right_to_wrong"] or ex["wrong_to_right"]:
                flips.append({"task": name, "arm": arm, "color": colors[arm], "flips": a["flips"] or {},
                              "r2w": ex["right_to_wrong"] or [], "w2r": ex["wrong_to_right"] or []})
    base = compare["base"]
    versions = dict(manifest["versions"] or {}) if manifest else {}
    bud = compare["budget"]
    return {
        "run_id": compare["run_id"] or run.run_id,
        "compare": compare, "gate": gate, "gate_source": gate_source, "arms": arms, "colors": colors,
        "random_weights": bool(base["random_weights"]),
        "base_model": base["model"] or {},
        "config": config, "config_json": json.dumps(config, indent=2, sort_keys=True) if config else "",
        "manifest": manifest, "versions": versions,
        "timings": stage_timings((manifest["timings"] or {}) if manifest else {}),
        "summary": compare["summary"], "suites": compare["suites"],
        "drift": compare["drift"],
        "rows": rows, "flips": flips, "forest_ticks": ([{"v": tick_label(t), "x": fs(t)} for t in fs.ticks]
                                                       if fs else []),
        "budget": bud, "budget_arms": bud["arms"] or {},
        "train": train,
        "verdict_why": verdict_reason(gate), "policy_text": policy_sentence(gate["policy"]),
        "arm_pairs": arm_pair_lines(compare),
        "screened_on_gated": screened_on_gated(compare),
        "looks": looks_view(run, gate),
        "lf_charts": learning_charts(compare, colors, config_doc(config)["train"]["wise_from"]),
        "signals": LEARNING_SIGNALS,
        "loss_chart": loss_chart(train, colors),
        "mem_chart": memory_chart(train),
        **curves_view(run, arms, colors),
        "script": CHECK_SCRIPT, "script_hash": _script_hash(CHECK_SCRIPT),
        **check_sections(run),
    }


def looks_view(run: RunDir, gate: dict) -> dict | None:
    """`--until-decided`'s looks (looks.json): per arm and task the looks taken, the items, the rule's outcome
    and why no more items were scored; None for a fixed --limit run. Read defensively (a file of the run's own,
    shown as text)."""
    path = run.root / "looks.json"
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        status = {(r["arm"], r["task"]): r["status"] for r in gate["rules"] if r["rule"] == "task_drop"}
        rows = [{"arm": str(arm), "task": str(task), "looks": int(t["looks"]), "items": t.get("items"),
                 "status": status.get((arm, task), "-"), "why": str(t.get("why", ""))}
                for arm, tasks in (doc.get("arms") or {}).items() for task, t in sorted(tasks.items())]
        return {"sizes": [int(x) for x in doc["sizes"]], "stop": str(doc.get("stop", "")), "rows": rows,
                "wall_s": doc.get("wall_s")}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {"sizes": [], "stop": "looks.json could not be read", "rows": [], "wall_s": None}


def screened_on_gated(compare: CompareFile) -> list[dict]:
    """Retention tasks whose informative test ran on the compared items themselves (no separate screen items),
    grouped by why ({note, tasks}): the report says so, since their place in the gate then depends on the items it
    judges."""
    by_note: dict[str, list[str]] = {}
    for name, t in sorted(compare["tasks"].items()):
        if t["suite"] == "retention" and t["unit"] == "points" and t["informative"]["separate"] is False:
            by_note.setdefault(t["informative"]["note"] or "", []).append(name)
    return [{"note": note, "tasks": names} for note, names in by_note.items()]


def check_sections(run: RunDir) -> dict[str, Any]:
    """What `forgetcheck check` adds (templates/check.html.j2): the comparison against the previous release
    (history.json) and the lm-eval items present on one side only (pairing.json)."""
    from forgetcheck.eval.pairing import load_pairing, one_sided_lines
    from forgetcheck.verdict import history

    pairing = load_pairing(run.root / "pairing.json")
    return {"history": history.view(run), "one_sided": one_sided_lines(pairing) if pairing else []}


# ---- filters -------------------------------------------------------------------------------------------

def _num(v, digits=1):
    if v is None:
        return "–"
    if isinstance(v, (int, float)) and not math.isfinite(v):
        return str(v)
    return f"{v:,.{digits}f}"


def _signed(v, digits=1):
    return "–" if v is None else signed(v, digits)


def _ci(ci, digits=1):
    return "–" if not ci else f"[{_signed(ci[0], digits)}, {_signed(ci[1], digits)}]"


def _pval(p):
    if p is None:
        return "–"
    if p < 1e-4:
        return "<0.0001"
    return f"{p:.4f}" if p < 0.01 else f"{p:.3f}"


def _bytes(v):
    if not v:
        return "–"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if v >= div:
            return f"{v / div:,.2f} {unit}"
    return f"{v:.0f} B"


def _int(v):
    return "–" if v is None else f"{int(v):,}"


def render(view: dict) -> str:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
    )
    env.filters.update(num=_num, signed=_signed, ci=_ci, pval=_pval, bytes=_bytes, int=_int)
    return env.get_template(TEMPLATE).render(**view)


def arm_pair_lines(compare: CompareFile) -> list[dict]:
    """'cpt lost 2.1 points less than sft on the retention mean (accuracy), 95% CI [..], p=..' per pair."""
    level = round(compare["ci_level"] * 100)
    out = []
    for p in compare["arm_vs_arm"]["pairs"]:
        a, b = p["a"], p["b"]
        parts = []
        for suite in ("retention", "domain"):
            for metric in ("acc", "soft"):
                e = p["suites"][suite][metric]
                if not e:
                    continue
                d = e["point"]
                if suite == "retention":
                    what = f"{a} lost {abs(d):.1f} points {'less' if d >= 0 else 'more'} than {b}"
                else:
                    what = f"{a} learned {abs(d):.1f} points {'more' if d >= 0 else 'less'} than {b}"
                parts.append(f"{what} on the {suite} mean ({'soft accuracy' if metric == 'soft' else 'accuracy'}"
                             f", {level}% CI [{signed(e['ci'][0])}, {signed(e['ci'][1])}], p={_pval(e['p_value'])})")
        if parts:
            out.append({"text": "; ".join(parts) + ".", "note": p["note"] or ""})
    return out


def write_report(run: RunDir | Path | str) -> Path:
    """Render `report.html` for a run directory from its compare.json and gate.json. Returns its path.
    A missing input is a BadInput naming the command that writes it; nothing is computed or written here."""
    run = RunDir.existing(run)
    for path, cmd in ((run.compare, "compare"), (run.gate, "gate")):
        if not path.is_file():
            raise BadInput(f"{path} is missing: run `forgetcheck {cmd} {run.root}` first, then `forgetcheck "
                           f"report {run.root}`")
    atomic_write_text(run.report, render(build_view(run)))
    return run.report
