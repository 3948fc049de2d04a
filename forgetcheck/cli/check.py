"""`forgetcheck check`: gate models trained elsewhere. Evaluate a base and one or more candidates (or read two
sides' existing `lm_eval --log_samples` outputs), then the same compare -> gate -> report as `run`
(cli/verdict.finish), into `runs/<id>/` with the same contract (docs/design.md run directory), without train/ or
ckpt/.

Two ways in (inputs are resolved by cli/inputs.py):
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

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from forgetcheck import config, console
from forgetcheck.cli.inputs import (
    CheckInputs,
    CheckRequest,
    check_mode,
    resolve_check_models,
    resolve_check_samples,
)
from forgetcheck.cli.options import (
    AllowTaskCodeOpt,
    DeviceOpt,
    EvalFlags,
    LookFlags,
    OutOpt,
    RunIdOpt,
    TasksDirOpt,
    VerboseOpt,
    VerdictFlags,
    options,
)
from forgetcheck.cli.verdict import finish
from forgetcheck.rundir import RunDir, atomic_write_json, read_json
from forgetcheck.schema import StageTimer, update_manifest


@options(ev=EvalFlags, verdict=VerdictFlags, seq=LookFlags)
def check(
    base: Annotated[Optional[str], typer.Option("--base", help="The model the candidates are checked against: "
                                                "alias (smollm2-135m, tiny-gpt2), HF folder, .gguf or hub id.")] = None,
    candidate: Annotated[Optional[list[str]], typer.Option("--candidate", help="A model to gate, [NAME=]MODEL "
                         "(anything --base accepts, e.g. a run's ckpt/<arm>); repeat for several. NAME defaults to "
                         "the folder's name.")] = None,
    base_samples: Annotated[Optional[Path], typer.Option("--base-samples", help="Instead of --base: the base's "
                            "`lm_eval --output_path DIR --log_samples` folder.")] = None,
    candidate_samples: Annotated[Optional[list[str]], typer.Option("--candidate-samples", help="Instead of "
                                 "--candidate: [NAME=]DIR of a candidate's lm_eval --log_samples output; repeatable. "
                                 "Items are paired by lm-eval's doc_hash.")] = None,
    previous: Annotated[Optional[str], typer.Option("--previous", help="The last release: runs/<id> of its check "
                        "(or runs/<id>/eval/<arm>.json); the report also compares each candidate with it.")] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", help="quick (50 items per task) | standard (200) | "
                      "full (every item); --limit overrides it. Default quick.")] = None,
    ev: EvalFlags = EvalFlags(),
    tasks_dir: TasksDirOpt = None,
    allow_task_code: AllowTaskCodeOpt = False,
    device: DeviceOpt = "auto",
    out: OutOpt = Path("runs"),
    run_id: RunIdOpt = None,
    verdict: VerdictFlags = VerdictFlags(),
    seq: LookFlags = LookFlags(),
    verbose: VerboseOpt = False,
) -> None:
    """Gate models trained elsewhere: evaluate --base and each --candidate (or pair two sides' lm-eval
    --log_samples outputs), then compare, report and gate into runs/<id>/. Exit codes as `gate`."""
    req = CheckRequest(out=out, run_id=run_id, base=base, candidates=tuple(candidate or ()), base_samples=base_samples,
                       candidate_samples=tuple(candidate_samples or ()), tasks_dir=tasks_dir)
    model_flags = {"--limit": ev.limit, "--preset": preset, "--backend": ev.backend, "--batch-size": ev.batch_size,
                   "--screen-items": ev.screen_items, "--tasks-dir": tasks_dir, "--allow-task-code": allow_task_code,
                   "--until-decided": seq.until_decided or None, "--max-items": seq.max_items,
                   "--max-minutes": seq.max_minutes}
    verdict_args = dict(previous=previous, gate_overrides=verdict.overrides(), policy_file=verdict.policy,
                        junit=verdict.junit, markdown=verdict.markdown, verbose=verbose)
    if check_mode(req, model_flags) == "samples":
        code = check_samples(base_samples, list(candidate_samples or ()), out=out, run_id=run_id,
                             tasks=config.split_csv(ev.tasks), **verdict_args)
    else:
        _, eval_cfg = config.apply_preset(preset or "quick", {}, ev.overrides())
        looks = seq.config()
        config.check(config.validate_looks(looks, eval_cfg.limit))
        code = check_models(base, list(candidate or ()), eval_cfg, out=out, run_id=run_id, device=device,
                            tasks_dir=tasks_dir, allow_task_code=allow_task_code, preset=preset or "quick",
                            looks=looks, **verdict_args)
    raise typer.Exit(code)


def _write_config(run: RunDir, cfg: dict) -> None:
    from forgetcheck.schema import SCHEMA_VERSION

    atomic_write_json(run.config, {"schema_version": SCHEMA_VERSION, "command": "check", **cfg})


def _finish(inp: CheckInputs, started: float, title: str, junit: Path | None, markdown: Path | None) -> int:
    _, code = finish(inp.run, inp.request.gate_overrides, title=title, policy_file=inp.request.policy_file,
                     previous=inp.previous, junit=junit, markdown=markdown)
    update_manifest(inp.run, timings={"check_total": round(time.perf_counter() - started, 3)})
    return code


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


def _checked(resolve, body, req: CheckRequest, junit: Path | None, markdown: Path | None, verbose: bool) -> int:
    """One console session: resolve every input, then run `body` holding the run folder's lock (one process
    per run folder, released however the check ends)."""
    with console.session(verbose=verbose):
        inp = resolve(req)
        with inp.lock:
            return body(inp, junit, markdown)


def check_models(base: str, candidates: list[str], eval_cfg: config.EvalConfig, *, out: Path, run_id: str | None,
                 device: str = "auto", tasks_dir: Path | None = None, allow_task_code: bool = False,
                 previous: str | None = None, preset: str = "quick", gate_overrides: dict | None = None, policy_file: Path | None = None,
                 junit: Path | None = None, markdown: Path | None = None, verbose: bool = False,
                 looks: config.LookConfig | None = None) -> int:
    """Evaluate the base and every candidate, then compare, gate and report (with `looks.until_decided`, look
    after look: cli/looks.py). Returns the gate's exit code."""
    req = CheckRequest(out=out, run_id=run_id, base=base, candidates=tuple(candidates), previous=previous,
                       eval=eval_cfg, preset=preset, device=device, tasks_dir=tasks_dir,
                       allow_task_code=allow_task_code, gate_overrides=dict(gate_overrides or {}), policy_file=policy_file,
                       looks=looks or config.LookConfig())
    return _checked(resolve_check_models, _check_models, req, junit, markdown, verbose)


def _check_models(inp: CheckInputs, junit: Path | None, markdown: Path | None) -> int:
    from forgetcheck.cli import looks as seq
    from forgetcheck.eval import runner
    from forgetcheck.verdict import compare

    req = inp.request
    run, eval_cfg, dev, base_ref, refs = inp.run, req.eval, inp.device, inp.model, inp.candidates
    plan = None
    if req.looks.until_decided:
        seq.check_policy(inp.policy, req.looks, eval_cfg.limit)
        plan = runner.Looks(seq.sizes_for(eval_cfg, req.looks), {})
    resolved = {"base": base_ref.to_dict(), "candidates": {n: r.to_dict() for n, r in refs.items()},
                "device": dev.device, "device_reason": dev.reason}
    _write_config(run, {
        "base": req.base, "candidates": {c.name: c.spec for c in inp.named}, "arms": [c.name for c in inp.named],
        "preset": req.preset, "out_dir": str(req.out), "run_id": run.run_id, "device": req.device,
        "tasks_dir": str(req.tasks_dir) if req.tasks_dir else None,
        "previous": inp.previous.describe() if inp.previous else None,
        "eval": config.to_dict(eval_cfg), "looks": config.to_dict(req.looks), "gate": config.to_dict(inp.policy),
        "resolved": resolved})
    update_manifest(run, run_id=run.run_id, command="check", device=dev.device, model=base_ref.to_dict(),
                    candidates={n: r.to_dict() for n, r in refs.items()}, random_weights=base_ref.random_weights)
    console.log_to(run.root / "log.txt")
    console.say(f"forgetcheck check {run.root}; {dev.describe()}; log: {run.root / 'log.txt'}")
    console.say(f"  base {req.base} ({base_ref.path}); candidates: "
                + ", ".join(f"{n} ({r.path})" for n, r in refs.items()))
    console.say(f"  suites {','.join(eval_cfg.suites)}; tasks {','.join(eval_cfg.tasks) or 'all of the suites'}; "
                f"limit {eval_cfg.limit if eval_cfg.limit is not None else 'all items'}"
                + (f" (+{eval_cfg.screen_count()} screen items per retention multiple-choice task for the base)"
                   if eval_cfg.screen_count() else "") + f"; backend {eval_cfg.backend}"
                + (f"; until decided, looks at {', '.join(map(str, plan.sizes))} items per task" if plan else ""))
    if base_ref.random_weights:
        console.say(f"  NOTE: --base {req.base} has RANDOM WEIGHTS: results are plumbing checks, not model quality")
    t0 = time.perf_counter()
    n = len(refs) + 1
    with StageTimer(run, "eval_base"), console.stage(f"[1/{n + 1}] evaluate the base {req.base} (cached per task "
                                                     f"when evaluated before)"):
        runner.evaluate(base_ref, eval_cfg, run.eval_json("base"), device=dev.device, label="base",
                        tasks_dir=req.tasks_dir, screen=True, looks=plan)
    for task, t in ((read_json(run.eval_json("base")).get("timings") or {}).get("tasks") or {}).items():
        if t.get("cached"):  # what a second check of the same base saves: it is not evaluated again
            console.say(f"  {task}: cache hit")
    # as `run` does: a retention task the base is at chance on cannot show forgetting; the policy leaves it out
    # of the gate and the mean (unless keep_uninformative), so the candidates are not scored on it
    skip, line = compare.skipped_for(run.eval_json("base"), inp.policy, "candidates")
    if line:
        console.say(f"  {line}")
    notes = []
    references = {}
    for i, (name, ref) in enumerate(refs.items(), 2):
        ok, why = same_vocabulary(base_ref, ref)
        reference = references[name] = run.eval_json("base") if ok else None
        if not ok:
            note = f"{name}: KL drift skipped: {why}; KL needs one shared vocabulary"
            notes.append(note)
            console.say(f"  note: {note}")
        with StageTimer(run, f"eval_{name}"), console.stage(f"[{i}/{n + 1}] evaluate candidate {name} ({ref.path})"):
            runner.evaluate(ref, eval_cfg, run.eval_json(name), device=dev.device, reference=reference,
                            label=name, tasks_dir=req.tasks_dir, skip=skip, looks=plan)
    if notes:
        update_manifest(run, notes=notes)
    if plan is not None:
        again = seq.evaluator(run, eval_cfg, plan.sizes, {"base": base_ref, **refs}, device=dev.device,
                              tasks_dir=req.tasks_dir, references=references, skip=skip)
        with console.stage("until decided: more items only where a verdict is still open"):
            seq.until_decided(run, plan.sizes, inp.policy, req.looks, again, list(refs), t0)
    return _finish(inp, t0, f"[{n + 1}/{n + 1}] compare, gate, report", junit, markdown)


# ---- lm-eval outputs -------------------------------------------------------------------------------------

def check_samples(base_samples: Path, candidate_samples: list[str], *, out: Path, run_id: str | None,
                  tasks: tuple[str, ...] = (), previous: str | None = None, gate_overrides: dict | None = None,
                  policy_file: Path | None = None, junit: Path | None = None, markdown: Path | None = None,
                  verbose: bool = False) -> int:
    """Pair two sides' lm-eval --log_samples outputs, then compare, gate and report."""
    req = CheckRequest(out=out, run_id=run_id, base_samples=base_samples, candidate_samples=tuple(candidate_samples),
                       previous=previous, tasks=tuple(tasks), gate_overrides=dict(gate_overrides or {}),
                       policy_file=policy_file)
    return _checked(resolve_check_samples, _check_samples, req, junit, markdown, verbose)


def _check_samples(inp: CheckInputs, junit: Path | None, markdown: Path | None) -> int:
    from forgetcheck.eval.pairing import one_sided_lines, write_pairing

    req = inp.request
    run, plan = inp.run, inp.pairing
    _write_config(run, {
        "base_samples": str(req.base_samples), "candidates": {c.name: c.spec for c in inp.named},
        "arms": [c.name for c in inp.named], "out_dir": str(req.out), "run_id": run.run_id,
        "previous": inp.previous.describe() if inp.previous else None,
        "eval": {"tasks": plan.tasks, "source": "lm-eval --log_samples"},
        "gate": config.to_dict(inp.policy),
        "resolved": {"base": plan.base.model, "candidates": {n: c.model for n, c in plan.candidates.items()}}})
    update_manifest(run, run_id=run.run_id, command="check", source="lm-eval --log_samples",
                    model=plan.base.model, candidates={n: c.model for n, c in plan.candidates.items()},
                    random_weights=plan.base.model["random_weights"],
                    notes=["no KL drift: lm-eval --log_samples outputs hold no next-token distributions"])
    console.log_to(run.root / "log.txt")
    console.say(f"forgetcheck check {run.root} (lm-eval outputs, items paired by doc_hash); "
                f"log: {run.root / 'log.txt'}")
    console.say(f"  base {plan.base.folder}; candidates: "
                + ", ".join(f"{n} ({c.folder})" for n, c in plan.candidates.items()))
    t0 = time.perf_counter()
    pairing = write_pairing(plan, run.eval_json)
    atomic_write_json(run.root / "pairing.json", pairing)
    for t in plan.tasks:
        counts = ", ".join(f"{n} {c['paired']}/{c['base']}" for n, c in plan.pairing[t].items())
        console.say(f"  {t}: items paired {counts}")
    for line in one_sided_lines(pairing):
        console.say(f"  note: {line}")
    return _finish(inp, t0, "[1/1] compare, gate, report", junit, markdown)
