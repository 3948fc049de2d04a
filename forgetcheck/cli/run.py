"""`forgetcheck run`: the main job, one stage after another into runs/<id>/ (docs/design.md, "Data flow").

inputs (cli/inputs.py, once) -> eval(base) -> train(each arm) -> eval(each arm, from its saved checkpoint)
       -> compare -> gate -> report

Every stage receives the same frozen `Inputs`, writes its own files into the run folder and is skipped when
its result is already there, so `--resume runs/<id>` continues an interrupted run from the last finished stage
(training itself resumes from its last resumable checkpoint). The base evaluation is also cached across runs
(evaluation's cache). The console shows one line per stage; everything else goes to runs/<id>/log.txt.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from forgetcheck import config, console
from forgetcheck.cli.inputs import Inputs, resolve_run
from forgetcheck.cli.lock import RunLock
from forgetcheck.cli.options import (
    ArmsOpt,
    BaseOpt,
    DataOpt,
    DeviceOpt,
    EvalFlags,
    GateFlags,
    LookFlags,
    OutOpt,
    PresetOpt,
    RunIdOpt,
    TrainFlags,
    VerboseOpt,
    WiseFlags,
    options,
)
from forgetcheck.cli.verdict import finish
from forgetcheck.errors import BadInput
from forgetcheck.schema import StageTimer, read_config_doc, read_run_config, update_manifest, write_config


@options(flags=TrainFlags, wise=WiseFlags, ev=EvalFlags, policy=GateFlags, seq=LookFlags)
def run(
    base: BaseOpt = "smollm2-135m",
    data: DataOpt = "med",
    arms: ArmsOpt = "sft,cpt",
    preset: PresetOpt = "quick",
    flags: TrainFlags = TrainFlags(),
    wise: WiseFlags = WiseFlags(),
    ev: EvalFlags = EvalFlags(),
    policy: GateFlags = GateFlags(),
    seq: LookFlags = LookFlags(),
    device: DeviceOpt = "auto",
    out: OutOpt = Path("runs"),
    run_id: RunIdOpt = None,
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder (its config.json "
                                          "wins; a flag that differs from it is refused, except the gate's thresholds "
                                          "and --force)."),
    verbose: VerboseOpt = False,
    ctx: typer.Context = None,
) -> None:
    """The main job: evaluate base -> train each arm -> re-evaluate -> compare -> gate -> report. Exits 0 once
    every stage ran; the verdict is printed and in gate.json (`forgetcheck gate RUN` exits 0/1/4 on it)."""
    train_cfg, eval_cfg = config.apply_preset(preset, {**flags.overrides(), **wise.overrides()}, ev.overrides())
    cfg = config.RunConfig(base=base, data=data, arms=config.split_csv(arms), preset=preset, out_dir=str(out),
                           run_id=run_id, device=device, train=train_cfg, eval=eval_cfg, gate=policy.config(),
                           looks=seq.config())
    given = {k: v for k, v in ctx.params.items()
             if getattr(ctx.get_parameter_source(k), "name", "") == "COMMANDLINE"} if ctx is not None else {}
    raise typer.Exit(run_pipeline(cfg, resume=resume, given=given, verbose=verbose))


def record_inputs(inp: Inputs) -> None:
    """config.json (the request, what it resolved to and the content hashes --resume checks) and the
    manifest's first fields; once per run (a resumed run records only new gate settings)."""
    run = inp.run
    if run.config.exists():
        _record_gate_changes(inp)
        return
    resolved = {
        "model": inp.model.to_dict(),
        "data": {"name": inp.data.name, "root": str(inp.data.root), "packaged": inp.data.packaged},
        "device": inp.device.device,
        "device_reason": inp.device.reason,
        "hashes": inp.hashes,
    }
    write_config(run.config, inp.cfg, resolved)
    update_manifest(run, run_id=run.run_id, device=inp.device.device, seed=inp.cfg.train.seed,
                    model=inp.model.to_dict(), random_weights=inp.model.random_weights)


def _record_gate_changes(inp: Inputs) -> None:
    """Gate thresholds (or --force) changed on --resume: config.json records what the gate now uses."""
    if inp.cfg == read_run_config(inp.run.config):
        return
    write_config(inp.run.config, inp.cfg, read_config_doc(inp.run.config).get("resolved") or {})
    console.say(f"note: --resume with new gate settings {config.to_dict(inp.cfg.gate)}: recorded in {inp.run.config}")


def _hold(inp: Inputs) -> RunLock:
    """This process's lock on the run folder, taken before its first write; a new run's folder is looked at
    again under it, since another `run --run-id` of the same id may have started writing meanwhile."""
    lock = RunLock(inp.run.root)
    if not inp.resumed and inp.run.exists():
        lock.release()
        raise BadInput(f"{inp.run.root} already holds a run: continue it with --resume {inp.run.root} or pick "
                       f"another --run-id")
    return lock


def run_pipeline(cfg: config.RunConfig, resume: Path | None = None, given: dict | None = None, *,
                 verbose: bool = False, tasks_dir: Path | None = None) -> int:
    """Run (or resume) every stage; return 0 once every stage ran. The gate's verdict (pass, fail,
    inconclusive) is printed and written to gate.json; `forgetcheck gate` turns it into an exit code.
    `given`: the flags typed on the command line, checked against config.json on --resume."""
    with console.session(verbose=verbose):
        inp = resolve_run(cfg, resume, given=given, tasks_dir=tasks_dir)
        with _hold(inp):  # one process per run folder, to the end
            record_inputs(inp)
            console.log_to(inp.run.root / "log.txt")
            return _stages(inp)


def _stages(inp: Inputs) -> int:
    from forgetcheck.cli import looks as seq
    from forgetcheck.eval import runner
    from forgetcheck.models import registry
    from forgetcheck.train import arms, interpolate, loop
    from forgetcheck.verdict import compare

    cfg, run = inp.cfg, inp.run
    plan = runner.Looks(seq.sizes_for(cfg.eval, cfg.looks), {}) if cfg.looks.until_decided else None
    console.say(f"forgetcheck run {run.root} ({'resumed' if inp.resumed else 'new'}); {inp.device.describe()}; "
                f"log: {run.root / 'log.txt'}")
    console.detail("config: " + json.dumps(config.to_dict(cfg), separators=(",", ":")))
    if inp.model.random_weights:
        console.say(f"NOTE: --base {cfg.base} has RANDOM WEIGHTS: results are plumbing checks, not model quality")
    if not inp.data.packaged and "domain" not in cfg.eval.suites and not cfg.eval.tasks:
        console.say(f"note: the 'domain' suite measures the packaged med data, not {cfg.data}: retention only "
                    f"(pick domain tasks with --tasks to measure learning)")
    t0 = time.perf_counter()
    trained = [config.seed_run_label(a, i) for a in arms.trained(cfg.arms) for i in range(cfg.train.seeds)]
    wise = interpolate.points(cfg.arms, cfg.train)
    n = 2 + 2 * len(trained) + 2 * len(wise)
    step = iter(range(1, n + 1))

    # the recall questions: facts every arm will train on whole within its budget (from the packer, before training)
    tasks_dir = inp.tasks_dir
    if tasks_dir is None and trained:
        from forgetcheck.train import recall

        tasks_dir, line = recall.prepare(run, cfg, inp.model, inp.data)
        console.say(f"        {line}")

    # base evaluation (also cached across runs by model content hash)
    title = f"[{next(step)}/{n}] evaluate base"
    if run.eval_json("base").exists():
        console.say(f"{title}: present, reused")
    else:
        with StageTimer(run, "eval_base"), console.stage(title):
            runner.evaluate(inp.model, cfg.eval, run.eval_json("base"), device=inp.device.device, label="base",
                            tasks_dir=tasks_dir, screen=True, looks=plan)

    # train each arm on the same budget
    for arm in trained:
        title = f"[{next(step)}/{n}] train {arm}"
        if run.train_json(arm).exists() and run.ckpt(arm).exists():
            console.say(f"{title}: present, reused")
            continue
        with StageTimer(run, f"train_{arm}"), console.stage(title):
            loop.train_arm(arm, inp.model, inp.data, cfg.train, run, device=inp.device.device,
                           tasks_dir=tasks_dir)

    # wise: interpolate the base and --wise-from (no training)
    for label, a in wise:
        title = f"[{next(step)}/{n}] interpolate {label}: (1 - {a:g}) * base + {a:g} * {cfg.train.wise_from}"
        if (run.ckpt(label) / "config.json").exists():
            console.say(f"{title}: present, reused")
            continue
        with StageTimer(run, f"interpolate_{label}"), console.stage(title):
            interpolate.build(inp.model, run.ckpt(cfg.train.wise_from), run.ckpt(label), a,
                              source_arm=cfg.train.wise_from)

    # evaluate each arm from its saved checkpoint (what is reported is what ships), on the tasks that can show
    # forgetting: a retention task the base is at chance on (on its screen items) is left out of the gate and
    # the mean by default, so it is not scored for the arms either (keep_uninformative scores and gates it)
    skip, line = compare.skipped_for(run.eval_json("base"), cfg.gate, "arms")
    if line:
        console.say(f"        {line}")
    for arm in trained + [label for label, _ in wise]:
        title = f"[{next(step)}/{n}] evaluate {arm} (from {run.ckpt(arm)})"
        if run.eval_json(arm).exists():
            console.say(f"{title}: present, reused")
            continue
        with StageTimer(run, f"eval_{arm}"), console.stage(title):
            runner.evaluate(registry.resolve(str(run.ckpt(arm))), cfg.eval, run.eval_json(arm),
                            device=inp.device.device, reference=run.eval_json("base"), label=arm,
                            tasks_dir=tasks_dir, skip=skip, looks=plan)
    if plan is not None:
        evaluated = trained + [label for label, _ in wise]
        again = seq.evaluator(run, cfg.eval, plan.sizes,
                              {"base": inp.model, **{a: registry.resolve(str(run.ckpt(a))) for a in evaluated}},
                              device=inp.device.device, tasks_dir=tasks_dir,
                              references=dict.fromkeys(evaluated, run.eval_json("base")), skip=skip)
        with console.stage("        until decided: more items only where a verdict is still open"):
            seq.until_decided(run, plan.sizes, cfg.gate, cfg.looks, again, evaluated, time.perf_counter())

    finish(run, cfg.gate, title=f"[{next(step)}/{n}] compare, gate, report")
    _record_session(run, t0)
    console.say(f"        (`forgetcheck gate {run.root}` exits 0 pass, 1 fail, 4 inconclusive; `run` exits 0 "
                f"once every stage ran)")
    return 0


def _record_session(run, started: float) -> None:
    """A resumed run adds its time to the earlier sessions' rather than replacing it."""
    from forgetcheck.schema import read_manifest

    man = read_manifest(run.manifest) if run.manifest.exists() else {}
    sessions = [*(man.get("timings") or {}).get("run_sessions", []), round(time.perf_counter() - started, 3)]
    update_manifest(run, timings={"run_sessions": sessions, "run_total": round(sum(sessions), 3)})
