"""`forgetcheck run`: the main job, one stage after another into runs/<id>/.

config -> model + data -> eval(base) -> train(each arm) -> eval(each arm, from its saved checkpoint)
       -> compare -> report -> gate

Every stage writes its own files into the run directory and is skipped when its result is already there, so
`--resume runs/<id>` continues an interrupted run from the last finished stage (training itself resumes from
its last resumable checkpoint). The base evaluation is also cached across runs (evaluation's cache).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from forgetcheck import config as C
from forgetcheck.errors import BadInput
from forgetcheck.rundir import RunDir, StageTimer, atomic_write_json, read_json, update_manifest


def _print(msg: str) -> None:
    print(msg, flush=True)


def _typed(section: str, cls, d, path: Path) -> dict:
    """The keys of one config.json section, each of the type its field's default has; BadInput otherwise."""
    import dataclasses

    if not isinstance(d, dict):
        raise BadInput(f"{path}: '{section}' is not a JSON object: the file was edited or is not forgetcheck's; "
                       f"start a new run")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise BadInput(f"{path}: unknown key(s) {', '.join(unknown)} in {section}: this config.json was not written "
                       f"by this forgetcheck (known: {', '.join(fields)}); remove them or start a new run")
    out = {}
    for k, v in d.items():
        f = fields[k]
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if isinstance(default, tuple):
            kind = (int, float) if default and isinstance(default[0], float) else str  # wise_alphas: numbers
            ok = isinstance(v, list) and all(isinstance(x, kind) and not isinstance(x, bool) for x in v)
            v = tuple(v) if ok else v
        elif isinstance(default, bool):
            ok = isinstance(v, bool)
        elif isinstance(default, int):
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif isinstance(default, float):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        elif isinstance(default, str):
            ok = isinstance(v, str)
        else:  # None by default: a number or a string (limit, min_domain_gain, run_id)
            ok = v is None or (isinstance(v, (int, float, str)) and not isinstance(v, bool))
        if not ok:
            raise BadInput(f"{path}: {section}.{k} is {v!r}, of the wrong type: the file was edited; restore it "
                           f"or start a new run")
        out[k] = v
    return out


def config_from_dict(d, path: Path = Path("config.json")) -> C.RunConfig:
    """Rebuild a RunConfig from config.json (for --resume): schema_version checked, every key known and typed."""
    from forgetcheck.schema import require

    d = dict(require(d, "config", str(path)))
    d.pop("schema_version", None)
    d.pop("resolved", None)
    sections = {"train": C.TrainConfig, "eval": C.EvalConfig, "gate": C.GateConfig}
    parts = {k: cls(**_typed(k, cls, d.pop(k, {}), path)) for k, cls in sections.items()}
    top = _typed("config.json", C.RunConfig, {k: v for k, v in d.items()}, path)
    return C.RunConfig(**top, **parts)


def prepare(cfg: C.RunConfig, resume: Path | None = None, given: dict | None = None):
    """Validate everything and resolve model, data and device before any heavy work: a refusal creates
    nothing (no run folder, no cached model). `given`: the flags typed on the command line (CLI parameter name
    -> value), checked against the run's config.json on --resume (config.RESUME_MAY_CHANGE).

    Returns (cfg, run, model_ref, domain, device_choice). Every problem found is reported at once.
    """
    from forgetcheck import data, models, optim, suites
    from forgetcheck.arms import TRAINED, data_kind
    from forgetcheck.device import choose_device
    from forgetcheck.rundir import check_output_dir

    problems: list[str] = []
    if resume is not None:
        run = RunDir(resume)
        if not run.root.is_dir():
            raise BadInput(f"--resume {resume}: no such run folder; give a folder made by `forgetcheck run` "
                           f"(runs/<id>)")
        if not run.config.exists():
            raise BadInput(f"--resume {resume}: no config.json there; give a folder made by `forgetcheck run` "
                           f"(runs/<id>)")
        saved = config_from_dict(read_json(run.config), run.config)
        problems, changes = C.resume_conflicts(saved, given or {}, run.root)
        from forgetcheck import checkpoint

        for arm in (a for a in saved.arms if a in C.ARMS):  # resume state checked now (never unpickled)
            try:
                checkpoint.check_resume_state(checkpoint.resume_dir(run, arm))
            except BadInput as e:
                problems.append(str(e))
        C.check(problems)
        gate_changes = {k: v for k, v in changes.items() if k != "force"}
        cfg = replace(saved, gate=replace(saved.gate, **gate_changes),
                      train=replace(saved.train, force=changes.get("force", saved.train.force)))
    else:
        run = None
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
    problems += C.validate(cfg)
    model_ref = domain = device = None
    try:
        model_ref = models.resolve(cfg.base, prepare=False)
    except BadInput as e:
        problems.append(str(e))
    try:
        domain = data.load_domain(cfg.data, prepare=False)
    except BadInput as e:
        problems.append(str(e))
    if domain is not None:
        for arm in cfg.arms:
            if arm in TRAINED and getattr(domain, data_kind(arm)) is None:
                problems.append(f"--data {cfg.data} has no {data_kind(arm)}.jsonl, so arm '{arm}' cannot train: "
                                f"add it or drop the arm with --arms")
    try:
        device = choose_device(cfg.device)
    except BadInput as e:
        problems.append(str(e))
    if device is not None:
        problems += optim.check_combination(cfg.train, device.device)
    if not problems:
        try:
            problems += suites.task_problems(cfg.eval)
        except BadInput as e:
            problems.append(str(e))
    C.check(problems)
    # Now the (possibly slow, one-off) preparation of cached folders: GGUF conversion, data building.
    from forgetcheck import benchdata

    model_ref = models.resolve(cfg.base, prepare=True)
    domain = data.load_domain(cfg.data, prepare=True)
    benchdata.prepare_bench()  # instant once built; the first time reads the bigbench sdist (~20 s)
    if "replay" in cfg.arms:
        from forgetcheck import general_text

        general_text.build()  # instant once built (checked against every evaluation text: ~5 s)
    if resume is None and not domain.packaged and "domain" in cfg.eval.suites and not cfg.eval.tasks:
        # The packaged domain suite measures `med`; a user's own data has no domain benchmark of its own yet.
        _print(f"note: the 'domain' suite measures the packaged med data, not {cfg.data}: running retention only "
               f"(learning is not measured; pick domain tasks with --tasks to measure it)")
        suites_ = tuple(s for s in cfg.eval.suites if s != "domain") or ("retention",)
        cfg = replace(cfg, eval=replace(cfg.eval, suites=suites_))
    if resume is None:
        cfg = replace(cfg, run_id=run.run_id)
    elif cfg != saved:  # gate thresholds (or --force) changed: config.json records what the gate now uses
        doc = read_json(run.config)
        doc["gate"], doc["train"] = C.to_dict(cfg.gate), C.to_dict(cfg.train)
        atomic_write_json(run.config, doc)
        _print(f"note: --resume with new gate settings {C.to_dict(cfg.gate)}: recorded in {run.config}")
    return cfg, run, model_ref, domain, device


def write_config(cfg: C.RunConfig, run: RunDir, model_ref, domain, device) -> None:
    from forgetcheck.schema import SCHEMA_VERSION

    if run.config.exists():
        return
    resolved = {
        "model": model_ref.to_dict(),
        "data": {"name": domain.name, "root": str(domain.root), "packaged": domain.packaged},
        "device": device.device,
        "device_reason": device.reason,
    }
    atomic_write_json(run.config, {"schema_version": SCHEMA_VERSION, **C.to_dict(cfg), "resolved": resolved})
    update_manifest(run, run_id=run.run_id, device=device.device, seed=cfg.train.seed,
                    model=model_ref.to_dict(), random_weights=model_ref.random_weights)


def run_pipeline(cfg: C.RunConfig, resume: Path | None = None, given: dict | None = None) -> int:
    """Run (or resume) every stage; return 0 once every stage ran. The gate's verdict (pass, fail,
    inconclusive) is printed and written to gate.json; `forgetcheck gate` turns it into an exit code.
    `given`: the flags typed on the command line, checked against config.json on --resume."""
    cfg, run, model_ref, domain, device = prepare(cfg, resume, given)
    write_config(cfg, run, model_ref, domain, device)
    _print(f"forgetcheck run {run.root}  ({'resumed' if resume else 'new'})")
    _print(f"  {device.describe()}")
    _print("  config: " + json.dumps(C.to_dict(cfg), separators=(",", ":")))
    if model_ref.random_weights:
        _print(f"  NOTE: --base {cfg.base} has RANDOM WEIGHTS: results are plumbing checks, not model quality")
    t0 = time.perf_counter()

    from forgetcheck import arms, evaluation, interpolate, models, train

    # 1. base evaluation (also cached across runs by model content hash)
    if not run.eval_json("base").exists():
        with StageTimer(run, "eval_base"):
            _print("[1/4] evaluating the base model")
            evaluation.evaluate(model_ref, cfg.eval, run.eval_json("base"), device=device.device, label="base")
    else:
        _print("[1/4] base evaluation present: reused")

    # 2. train each arm on the same budget
    for arm in arms.trained(cfg.arms):
        if run.train_json(arm).exists() and run.ckpt(arm).exists():
            _print(f"[2/4] arm {arm}: training present: reused")
            continue
        with StageTimer(run, f"train_{arm}"):
            _print(f"[2/4] training arm {arm}")
            train.train_arm(arm, model_ref, domain, cfg.train, run, device=device.device)

    # 2b. wise: interpolate the base and --wise-from (no training)
    wise = interpolate.points(cfg.arms, cfg.train)
    for label, a in wise:
        if (run.ckpt(label) / "config.json").exists():
            continue
        with StageTimer(run, f"interpolate_{label}"):
            _print(f"[2/4] {label}: (1 - {a:g}) * base + {a:g} * {cfg.train.wise_from}")
            interpolate.build(model_ref, run.ckpt(cfg.train.wise_from), run.ckpt(label), a,
                              source_arm=cfg.train.wise_from)

    # 3. evaluate each arm from its saved checkpoint (what is reported is what ships)
    for arm in arms.trained(cfg.arms) + [label for label, _ in wise]:
        if run.eval_json(arm).exists():
            _print(f"[3/4] arm {arm}: evaluation present: reused")
            continue
        with StageTimer(run, f"eval_{arm}"):
            _print(f"[3/4] evaluating arm {arm} from {run.ckpt(arm)}")
            arm_ref = models.resolve(str(run.ckpt(arm)))
            evaluation.evaluate(arm_ref, cfg.eval, run.eval_json(arm), device=device.device,
                                reference=run.eval_json("base"), label=arm)

    # 4. compare, report, gate (pure JSON)
    return finish(run, cfg.gate, started=t0)


def finish(run: RunDir, gate_cfg: C.GateConfig, started: float | None = None) -> int:
    """Compare, gate, report; print the verdict, the power sentence and what would decide. Returns 0."""
    from forgetcheck import compare, gate, report

    _print("[4/4] comparing, reporting, gating")
    with StageTimer(run, "compare"):
        compare.compare_run(run, alpha=gate_cfg.alpha)
    gate_dict, code = gate.gate_run(run.root, policy=gate_cfg)
    report_path = report.write_report(run)
    if started is not None:  # a resumed run adds its time to the earlier sessions' rather than replacing it
        man = read_json(run.manifest) if run.manifest.exists() else {}
        sessions = [*(man.get("timings") or {}).get("run_sessions", []), round(time.perf_counter() - started, 3)]
        update_manifest(run, timings={"run_sessions": sessions, "run_total": round(sum(sessions), 3)})
    limit = ((read_json(run.config).get("eval") or {}).get("limit")) if run.config.exists() else None
    _print(f"report: {report_path}")
    _print(f"gate:   {run.gate}  -> {gate_dict['verdict'].upper()}: {gate.verdict_reason(gate_dict)}")
    _print(f"power:  {gate_dict['power']['sentence']}")
    _print(f"        {gate.decide_hint(gate_dict, limit)}")
    _print(f"        (`forgetcheck gate {run.root}` exits 0 pass, 1 fail, 4 inconclusive; `run` exits 0 "
           f"once every stage ran)")
    return 0
