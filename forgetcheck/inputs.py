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

from forgetcheck import config as C
from forgetcheck.data import DomainData
from forgetcheck.device import DeviceChoice
from forgetcheck.errors import BadInput
from forgetcheck.models import ModelRef
from forgetcheck.rundir import RunDir


@dataclass(frozen=True)
class Inputs:
    """One command's resolved inputs. `cfg` is the request as config.json records it."""

    cfg: C.RunConfig
    model: ModelRef
    device: DeviceChoice
    data: DomainData | None = None  # None for `eval`
    run: RunDir | None = None  # the run folder (`run`, `train`)
    eval_out: Path | None = None  # `eval`: the eval JSON to write
    reference: Path | None = None  # `eval`: the base's eval JSON to measure drift against
    tasks_dir: Path | None = None  # lm-eval task YAMLs instead of forgetcheck's tasks/
    resumed: bool = False


def _check(cfg: C.RunConfig, *, need_data: bool) -> tuple[ModelRef, DomainData | None]:
    """Every problem with `cfg` and what it names, raised as one BadInput, without building anything; the
    model reference and the (validated) domain data otherwise."""
    from forgetcheck import data, models, optim

    problems = C.validate(cfg) if need_data else C.validate_eval(cfg.eval) + C.validate_device(cfg.device)
    model_ref = domain = None
    try:
        model_ref = models.resolve(cfg.base, prepare=False)
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
                problems += optim.check_combination(cfg.train, _device(cfg.device).device)
            except BadInput as e:
                problems.append(str(e))
    C.check(problems)
    return model_ref, domain


def _device(requested: str) -> DeviceChoice:
    from forgetcheck.device import choose_device

    return choose_device(requested)


def resolve_run(cfg: C.RunConfig, resume: Path | None = None, *, tasks_dir: Path | None = None) -> Inputs:
    """`forgetcheck run` (and `train` with a new run folder): validate, prepare, name the run folder.
    With `resume`, the run folder's config.json is the request (flags are ignored)."""
    from forgetcheck import benchdata, models
    from forgetcheck.schema import read_run_config

    run = None
    if resume is not None:
        run = RunDir(resume)
        if not run.config.exists():
            raise BadInput(f"--resume {resume}: no config.json there; give a folder made by `forgetcheck run` "
                           f"(runs/<id>)")
        cfg = read_run_config(run.config)
    _, domain = _check(cfg, need_data=True)
    model_ref = models.resolve(cfg.base, prepare=True)  # builds a packaged model's folder the first time
    benchdata.prepare_bench()  # instant once built; the first time reads the bigbench sdist (~20 s)
    device = _device(cfg.device)
    if run is None:
        if not domain.packaged and "domain" in cfg.eval.suites and not cfg.eval.tasks:
            # The packaged domain suite measures `med`; a user's own data has no domain benchmark of its own.
            suites = tuple(s for s in cfg.eval.suites if s != "domain") or ("retention",)
            cfg = replace(cfg, eval=replace(cfg.eval, suites=suites))
        run = RunDir.new(cfg.out_dir, cfg.base, cfg.data, cfg.run_id)
        if run.exists():
            raise BadInput(f"{run.root} already holds a run: continue it with --resume {run.root} "
                           f"or pick another --run-id")
        cfg = replace(cfg, run_id=run.run_id)
    return Inputs(cfg, model_ref, device, domain, run, tasks_dir=tasks_dir, resumed=resume is not None)


def resolve_train(cfg: C.RunConfig, run: RunDir) -> Inputs:
    """`forgetcheck train`: like `run`, into a given (or new) run folder that may already hold other arms."""
    from forgetcheck import models

    _, domain = _check(cfg, need_data=True)
    model_ref = models.resolve(cfg.base, prepare=True)
    return Inputs(replace(cfg, run_id=run.run_id), model_ref, _device(cfg.device), domain, run)


def resolve_eval(model: str, ev: C.EvalConfig, out: Path, *, device: str = "auto", reference: Path | None = None,
                 tasks_dir: Path | None = None) -> Inputs:
    """`forgetcheck eval`: one model, one eval JSON."""
    from forgetcheck import models

    cfg = C.RunConfig(base=model, data="", arms=(), device=device, eval=ev)
    if reference is not None and not Path(reference).is_file():
        raise BadInput(f"--reference {reference} not found: give the base model's eval JSON "
                       f"(runs/<id>/eval/base.json)")
    _check(cfg, need_data=False)
    return Inputs(cfg, models.resolve(model, prepare=True), _device(device), eval_out=Path(out),
                  reference=reference, tasks_dir=tasks_dir)

