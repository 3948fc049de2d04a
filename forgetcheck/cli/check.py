"""`forgetcheck check`: gate models trained elsewhere. Evaluate a base and one or more candidates (or read two
sides' existing `lm_eval --log_samples` outputs), then the same compare -> gate -> report as `run`, into
`runs/<id>/` with the same contract (docs/design.md run directory), without train/ or ckpt/.

Two ways in:
  * models: `--base B --candidate [name=]C ...`. Anything `--base` accepts is a candidate (alias, HF folder,
    .gguf, hub id, a run's ckpt/<arm>); its arm name is the folder's (or file's, or hub id's last) name, or the
    `name=` given. The base evaluation goes through evaluation's cache, so a second check of the same base on
    the same items reads it back without loading the model. KL drift is measured against the base when both
    tokenizers have the same vocabulary; otherwise it is skipped with a one-line note.
  * lm-eval outputs: `--base-samples DIR --candidate-samples [name=]DIR ...` (eval/lmeval_outputs.py): items paired
    by lm-eval's doc_hash, items on one side only listed in pairing.json and printed.

`--previous runs/<id>` (verdict/history.py) puts the previous release beside the new candidates in the report.
The exit code is the gate's own (gate.gate_run): 0 PASS, 1 FAIL, 4 INCONCLUSIVE (unless --on-inconclusive maps
it); 2 bad input; 3 runtime failure.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from forgetcheck import config
from forgetcheck.errors import BadInput
from forgetcheck.rundir import RunDir, atomic_write_json, slug
from forgetcheck.schema import StageTimer, update_manifest

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RESERVED = ("base",)


def _print(msg: str = "") -> None:
    print(msg, flush=True)


@dataclass(frozen=True)
class Named:
    name: str
    spec: str  # what the user typed after `name=` (or all of it)


def split_named(value: str) -> tuple[str | None, str]:
    """`name=path` -> ("name", "path"); a value without a valid name before '=' is all path."""
    head, sep, tail = value.partition("=")
    if sep and tail and NAME_RE.match(head):
        return head, tail
    return None, value


def default_name(spec: str) -> str:
    """The arm name of a candidate given without `name=`: the folder's or file's name, or a hub id's last part."""
    p = Path(spec.rstrip("/"))
    stem = p.stem if p.suffix in (".gguf", ".json") else p.name
    return slug(stem)


def name_candidates(values: list[str], flag: str, default=None) -> tuple[list[Named], list[str]]:
    """Candidates with their arm names, and every problem found (duplicates, reserved or unsafe names)."""
    problems, out, seen = [], [], {}
    for v in values:
        name, spec = split_named(v)
        name = name or (default or default_name)(spec)
        if not NAME_RE.match(name):
            problems.append(f"{flag} {v}: arm name '{name}' must be letters, digits, '.', '_' or '-': "
                            f"give one with {flag} NAME={spec}")
        elif name in RESERVED:
            problems.append(f"{flag} {v}: the arm name 'base' is taken by the base model: give another with "
                            f"{flag} NAME={spec}")
        elif name in seen:
            problems.append(f"{flag}: two candidates are named '{name}' ({seen[name]} and {spec}): name them "
                            f"apart with {flag} NAME=PATH")
        seen.setdefault(name, spec)
        out.append(Named(name, spec))
    return out, problems


def _gate_policy(gate_overrides: dict, policy_file: Path | None) -> config.GateConfig:
    from forgetcheck.verdict.policy import resolve_policy

    return resolve_policy(None, policy_file, gate_overrides)


def _new_run(out: Path, base_label: str, run_id: str | None) -> RunDir:
    run = RunDir.new(out, base_label, "check", run_id)
    if run.root.exists() and any(run.root.iterdir()):
        raise BadInput(f"{run.root} already exists: pick another --run-id (or remove that folder)")
    return run


def _output_problems(out: Path, base_label: str, run_id: str | None) -> list[str]:
    """--out and --run-id checked before anything is built or written."""
    from forgetcheck.rundir import check_output_dir

    problems = []
    for step in (lambda: check_output_dir(Path(out), "--out"), lambda: _new_run(out, base_label, run_id)):
        try:
            step()
        except BadInput as e:
            problems.append(str(e))
    return problems


def _write_config(run: RunDir, cfg: dict) -> None:
    from forgetcheck.schema import SCHEMA_VERSION

    atomic_write_json(run.config, {"schema_version": SCHEMA_VERSION, "command": "check", **cfg})


# ---- models ----------------------------------------------------------------------------------------------

def same_vocabulary(a, b) -> tuple[bool, str]:
    """(whether two resolved models share one tokenizer vocabulary, a one-line reason when not)."""
    from forgetcheck.models import registry

    try:
        ta, tb = registry.load_tokenizer(a), registry.load_tokenizer(b)
    except Exception as e:  # a tokenizer that cannot be read: KL cannot be trusted either
        return False, f"could not compare the tokenizers ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    va, vb = ta.get_vocab(), tb.get_vocab()
    if va == vb:
        return True, ""
    return False, (f"its tokenizer differs from the base's ({len(vb):,} vs {len(va):,} tokens, "
                   f"{len(set(va.items()) ^ set(vb.items())):,} entries differ)")


def check_models(base: str, candidates: list[str], eval_cfg: config.EvalConfig, *, out: Path, run_id: str | None,
                 device: str = "auto", tasks_dir: Path | None = None, previous: str | None = None,
                 preset: str | None = None, gate_overrides: dict | None = None, policy_file: Path | None = None,
                 junit: Path | None = None, markdown: Path | None = None) -> int:
    """Evaluate the base and every candidate, then compare, gate and report. Returns the gate's exit code."""
    from forgetcheck.device import choose_device
    from forgetcheck.models import registry
    from forgetcheck.verdict import history

    gate_overrides = dict(gate_overrides or {})
    problems = config.validate_eval(eval_cfg)
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        problems.append(f"unknown --device '{device}': use auto, cpu or cuda[:N]")
    if not candidates:
        problems.append("no --candidate given: name at least one model to check against --base")
    named, more = name_candidates(candidates, "--candidate")
    problems += more
    refs = {}
    try:
        base_ref = registry.resolve(base, prepare=False)
    except BadInput as e:
        problems.append(str(e))
        base_ref = None
    for c in named:
        try:
            refs[c.name] = registry.resolve(c.spec, prepare=False)
        except BadInput as e:
            problems.append(str(e).replace("--base", f"--candidate {c.name}", 1))
    if tasks_dir is not None and not Path(tasks_dir).is_dir():
        problems.append(f"--tasks-dir {tasks_dir}: no such folder; give a folder of lm-eval task YAMLs")
    prev = None
    try:
        policy = _gate_policy(gate_overrides, policy_file)
    except BadInput as e:
        problems.append(str(e))
        policy = None
    try:
        prev = history.resolve_previous(previous) if previous else None
    except BadInput as e:
        problems.append(str(e))
    problems += _output_problems(out, base_ref.label if base_ref else "base", run_id)
    if not problems:  # device, tasks: before any run folder or model (a refusal creates nothing)
        try:
            choose_device(device)
        except BadInput as e:
            problems.append(str(e))
        from forgetcheck.eval.suites import task_problems

        problems += task_problems(eval_cfg, tasks_dir)
    config.check(problems)
    run = _new_run(out, base_ref.label, run_id)

    # the slow, one-off preparations (GGUF conversion) only now, once every input is known to be good
    base_ref = registry.resolve(base, prepare=True)
    refs = {n: registry.resolve(c.spec, prepare=True) for n, c in zip(refs, named)}
    dev = choose_device(device)
    resolved = {"base": base_ref.to_dict(), "candidates": {n: r.to_dict() for n, r in refs.items()},
                "device": dev.device, "device_reason": dev.reason}
    _write_config(run, {
        "base": base, "candidates": {c.name: c.spec for c in named}, "arms": [c.name for c in named],
        "preset": preset, "out_dir": str(out), "run_id": run.run_id, "device": device,
        "tasks_dir": str(tasks_dir) if tasks_dir else None, "previous": prev.describe() if prev else None,
        "eval": config.to_dict(eval_cfg), "gate": config.to_dict(policy), "resolved": resolved})
    update_manifest(run, run_id=run.run_id, command="check", device=dev.device, model=base_ref.to_dict(),
                    candidates={n: r.to_dict() for n, r in refs.items()}, random_weights=base_ref.random_weights)
    _print(f"forgetcheck check {run.root}")
    _print(f"  {dev.describe()}")
    _print(f"  base {base} ({base_ref.path}); candidates: "
           + ", ".join(f"{n} ({r.path})" for n, r in refs.items()))
    _print(f"  suites {','.join(eval_cfg.suites)}; tasks {','.join(eval_cfg.tasks) or 'all of the suites'}; "
           f"limit {eval_cfg.limit if eval_cfg.limit is not None else 'all items'}; backend {eval_cfg.backend}")
    if base_ref.random_weights:
        _print(f"  NOTE: --base {base} has RANDOM WEIGHTS: results are plumbing checks, not model quality")
    t0 = time.perf_counter()

    from forgetcheck.eval import runner

    n = len(refs) + 1
    with StageTimer(run, "eval_base"):
        _print(f"[1/{n + 1}] evaluating the base {base} (cached per task when evaluated before)")
        runner.evaluate(base_ref, eval_cfg, run.eval_json("base"), device=dev.device, label="base",
                            tasks_dir=tasks_dir)
    # as `run` does: a retention task the base is at chance on cannot show forgetting; the policy leaves it out
    # of the gate and the mean (unless keep_uninformative), so the candidates are not scored on it
    from forgetcheck.verdict import compare

    skip, line = compare.skipped_for(run.eval_json("base"), policy, "candidates")
    if line:
        _print(f"  {line}")
    notes = []
    for i, (name, ref) in enumerate(refs.items(), 2):
        ok, why = same_vocabulary(base_ref, ref)
        reference = run.eval_json("base") if ok else None
        if not ok:
            note = f"{name}: KL drift skipped: {why}; KL needs one shared vocabulary"
            notes.append(note)
            _print(f"  note: {note}")
        with StageTimer(run, f"eval_{name}"):
            _print(f"[{i}/{n + 1}] evaluating candidate {name} ({ref.path})")
            runner.evaluate(ref, eval_cfg, run.eval_json(name), device=dev.device, reference=reference,
                                label=name, tasks_dir=tasks_dir, skip=skip)
    if notes:
        update_manifest(run, notes=notes)
    return finish(run, prev, gate_overrides, policy_file, junit, markdown, started=t0, step=f"[{n + 1}/{n + 1}]")


# ---- lm-eval outputs -------------------------------------------------------------------------------------

def check_samples(base_samples: Path, candidate_samples: list[str], *, out: Path, run_id: str | None,
                  tasks: tuple[str, ...] = (), previous: str | None = None, gate_overrides: dict | None = None,
                  policy_file: Path | None = None, junit: Path | None = None,
                  markdown: Path | None = None) -> int:
    """Pair two sides' lm-eval --log_samples outputs, then compare, gate and report."""
    from forgetcheck.eval import pairing as lmeval_pairing
    from forgetcheck.verdict import history

    gate_overrides = dict(gate_overrides or {})
    problems = []
    if not candidate_samples:
        problems.append("no --candidate-samples given: name at least one lm-eval output folder to check "
                        "against --base-samples")
    named, more = name_candidates(candidate_samples, "--candidate-samples", default=_samples_name)
    problems += more
    policy = prev = None
    try:
        policy = _gate_policy(gate_overrides, policy_file)
    except BadInput as e:
        problems.append(str(e))
    try:
        prev = history.resolve_previous(previous) if previous else None
    except BadInput as e:
        problems.append(str(e))
    problems += _output_problems(out, "base", run_id)
    config.check(problems)
    plan = lmeval_pairing.plan(Path(base_samples), {c.name: Path(c.spec) for c in named}, tasks)
    run = _new_run(out, slug(Path(plan.base.model["name"]).name), run_id)
    _write_config(run, {
        "base_samples": str(base_samples), "candidates": {c.name: c.spec for c in named},
        "arms": [c.name for c in named], "out_dir": str(out), "run_id": run.run_id,
        "previous": prev.describe() if prev else None, "eval": {"tasks": plan.tasks, "source": "lm-eval --log_samples"},
        "gate": config.to_dict(policy),
        "resolved": {"base": plan.base.model, "candidates": {n: c.model for n, c in plan.candidates.items()}}})
    update_manifest(run, run_id=run.run_id, command="check", source="lm-eval --log_samples",
                    model=plan.base.model, candidates={n: c.model for n, c in plan.candidates.items()},
                    random_weights=plan.base.model["random_weights"],
                    notes=["no KL drift: lm-eval --log_samples outputs hold no next-token distributions"])
    _print(f"forgetcheck check {run.root} (lm-eval outputs, items paired by doc_hash)")
    _print(f"  base {plan.base.folder}; candidates: "
           + ", ".join(f"{n} ({c.folder})" for n, c in plan.candidates.items()))
    t0 = time.perf_counter()
    pairing = lmeval_pairing.write(plan, run.eval_json)
    atomic_write_json(run.root / "pairing.json", pairing)
    for t in plan.tasks:
        counts = ", ".join(f"{n} {c['paired']}/{c['base']}" for n, c in plan.pairing[t].items())
        _print(f"  {t}: items paired {counts}")
    for line in lmeval_pairing.one_sided_lines(pairing):
        _print(f"  note: {line}")
    return finish(run, prev, gate_overrides, policy_file, junit, markdown, started=t0, step="[1/1]")


def _samples_name(spec: str) -> str:
    """Arm name of an lm-eval output folder: the model's folder name (what `--output_path` holds), sluggified."""
    from forgetcheck.eval.lmeval_outputs import find_model_folder

    try:
        folder = find_model_folder(Path(spec), "--candidate-samples")
    except BadInput:
        return default_name(spec)
    return default_name(folder.name.split("__")[-1] or folder.name)


# ---- compare, gate, report --------------------------------------------------------------------------------

def finish(run: RunDir, prev, gate_overrides: dict, policy_file: Path | None, junit: Path | None,
           markdown: Path | None, *, started: float, step: str) -> int:
    """compare -> history (with --previous) -> gate -> report, as `run` ends. Returns the gate's exit code."""
    from forgetcheck.report import html
    from forgetcheck.verdict import compare, gate, history

    _print(f"{step} comparing, gating, reporting")
    with StageTimer(run, "compare"):
        result = compare.compare_run(run, alpha=_alpha(run))
    if prev is not None:
        hist = history.write_history(run, prev, alpha=_alpha(run))
        for line in history.summary_lines(hist):
            _print(f"  {line}")
    gate_dict, code = gate.gate_run(run.root, gate_overrides, policy_file=policy_file, junit=junit,
                                    markdown=markdown)
    report_path = html.write_report(run)
    update_manifest(run, timings={"check_total": round(time.perf_counter() - started, 3)})
    for arm in result.get("arms") or []:
        verdict = _arm_verdict(gate_dict, arm)
        s = (result.get("summary") or {}).get(arm) or {}
        fg = s.get("forgetting")
        _print(f"  {arm}: {verdict}" + ("" if fg is None else f" (retention mean drop {fg:+.2f} points)"))
    _print(f"report: {report_path}")
    _print(f"gate:   {run.gate}  -> {str(gate_dict.get('verdict', '')).upper()}")
    if junit is not None:
        _print(f"junit:  {junit}")
    if markdown is not None:
        _print(f"markdown: {markdown}")
    return code


def _alpha(run: RunDir) -> float:
    from forgetcheck.rundir import read_json

    return float(((read_json(run.config).get("gate") or {}).get("alpha")) or 0.05)


def _arm_verdict(gate_dict: dict, arm: str) -> str:
    a = (gate_dict.get("arms") or {}).get(arm) or {}
    if a.get("verdict"):
        return str(a["verdict"]).upper()
    return "PASS" if a.get("passed") else "FAIL"

