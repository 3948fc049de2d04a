"""`forgetcheck run`: the main job, one stage after another into runs/<id>/ (docs/design.md, "Data flow").

inputs (inputs.py, once) -> eval(base) -> train(each arm) -> eval(each arm, from its saved checkpoint)
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

from forgetcheck import config as C
from forgetcheck import console
from forgetcheck.inputs import Inputs, resolve_run
from forgetcheck.rundir import RunDir
from forgetcheck.schema import StageTimer, update_manifest, write_config


def record_inputs(inp: Inputs) -> None:
    """config.json (the request and what it resolved to) and the manifest's first fields; once per run."""
    run = inp.run
    if run.config.exists():
        return
    resolved = {
        "model": inp.model.to_dict(),
        "data": {"name": inp.data.name, "root": str(inp.data.root), "packaged": inp.data.packaged},
        "device": inp.device.device,
        "device_reason": inp.device.reason,
    }
    write_config(run.config, inp.cfg, resolved)
    update_manifest(run, run_id=run.run_id, device=inp.device.device, seed=inp.cfg.train.seed,
                    model=inp.model.to_dict())


def run_pipeline(cfg: C.RunConfig, resume: Path | None = None, *, verbose: bool = False,
                 tasks_dir: Path | None = None) -> int:
    """Run (or resume) every stage; return the gate's exit code (0 pass, 1 fail, 4 inconclusive)."""
    with console.session(verbose=verbose):
        inp = resolve_run(cfg, resume, tasks_dir=tasks_dir)
        record_inputs(inp)
        console.log_to(inp.run.root / "log.txt")
        return _stages(inp)


def _stages(inp: Inputs) -> int:
    from forgetcheck import evaluation, models, train

    cfg, run = inp.cfg, inp.run
    console.say(f"forgetcheck run {run.root} ({'resumed' if inp.resumed else 'new'}); {inp.device.describe()}; "
                f"log: {run.root / 'log.txt'}")
    console.detail("config: " + json.dumps(C.to_dict(cfg), separators=(",", ":")))
    if inp.model.random_weights:
        console.say(f"NOTE: --base {cfg.base} has RANDOM WEIGHTS: results are plumbing checks, not model quality")
    if not inp.data.packaged and "domain" not in cfg.eval.suites and not cfg.eval.tasks:
        console.say(f"note: the 'domain' suite measures the packaged med data, not {cfg.data}: retention only "
                    f"(pick domain tasks with --tasks to measure learning)")
    t0 = time.perf_counter()
    n = 2 + 2 * len(cfg.arms)
    step = iter(range(1, n + 1))

    # base evaluation (also cached across runs by model content hash)
    title = f"[{next(step)}/{n}] evaluate base"
    if run.eval_json("base").exists():
        console.say(f"{title}: present, reused")
    else:
        with StageTimer(run, "eval_base"), console.stage(title):
            evaluation.evaluate(inp.model, cfg.eval, run.eval_json("base"), device=inp.device.device, label="base",
                                tasks_dir=inp.tasks_dir)

    # train each arm on the same budget
    for arm in cfg.arms:
        title = f"[{next(step)}/{n}] train {arm}"
        if run.train_json(arm).exists() and run.ckpt(arm).exists():
            console.say(f"{title}: present, reused")
            continue
        with StageTimer(run, f"train_{arm}"), console.stage(title):
            train.train_arm(arm, inp.model, inp.data, cfg.train, run, device=inp.device.device)

    # evaluate each arm from its saved checkpoint (what is reported is what ships)
    for arm in cfg.arms:
        title = f"[{next(step)}/{n}] evaluate {arm} (from {run.ckpt(arm)})"
        if run.eval_json(arm).exists():
            console.say(f"{title}: present, reused")
            continue
        with StageTimer(run, f"eval_{arm}"), console.stage(title):
            evaluation.evaluate(models.resolve(str(run.ckpt(arm))), cfg.eval, run.eval_json(arm),
                                device=inp.device.device, reference=run.eval_json("base"), label=arm,
                                tasks_dir=inp.tasks_dir)

    return finish(run, cfg.gate, started=t0, title=f"[{next(step)}/{n}] compare, gate, report")


def finish(run: RunDir, gate_cfg: C.GateConfig, started: float | None = None,
           title: str = "compare, gate, report") -> int:
    """compare -> gate -> report (pure JSON); the gate's exit code."""
    from forgetcheck import compare, gate, report

    with console.stage(title):
        with StageTimer(run, "compare"):
            compare.compare_run(run, alpha=gate_cfg.alpha)
        gate_dict, code = gate.gate_run(run.root, policy=gate_cfg)
        report_path = report.write_report(run)
        if started is not None:
            update_manifest(run, timings={"run_total": round(time.perf_counter() - started, 3)})
        console.note(f"verdict {str(gate_dict.get('verdict', '')).upper()}")
    console.say(f"report: {report_path}")
    console.say(f"gate:   {run.gate}  -> {str(gate_dict.get('verdict', 'pass' if code == 0 else 'fail')).upper()}")
    return code
