"""The command line: typed signatures are the CLI (typer). Each command imports its stage lazily, so
`forgetcheck --help`, `compare`, `report` and `gate` never import torch.

Exit codes (docs/design.md): 0 success / gate passed; 1 gate failed; 2 bad input (one line, no traceback);
3 runtime failure; 4 gate inconclusive.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional, get_type_hints

import typer

from forgetcheck.config import split_csv
from forgetcheck.errors import BadInput, ForgetcheckError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Measure what fine-tuning makes a model forget: benchmark a base model, fully fine-tune it (SFT) "
    "and continue pretraining it (CPT) on the same token budget, re-evaluate, diff, and gate the release.",
)
data_app = typer.Typer(no_args_is_help=True, help="Domain datasets: list and prepare them.")
app.add_typer(data_app, name="data")


def echo(msg: str = "") -> None:
    typer.echo(msg)


# ------------------------------------------------------------------------------------------------------
# Option groups: each is a frozen dataclass whose fields are the options (one definition, one help text);
# `options(...)` puts a group's fields into a command's signature and hands the command one value per group.
# Training and eval flags default to None ("not given"), so the preset fills them (config.apply_preset).
# ------------------------------------------------------------------------------------------------------
BaseOpt = Annotated[str, typer.Option("--base", help="Model to fine-tune: alias (smollm2-135m, tiny-gpt2), hub id, HF folder or .gguf.")]
DataOpt = Annotated[str, typer.Option("--data", help="Domain data: packaged name (med) or a folder with sft.jsonl / cpt.jsonl.")]
ArmsOpt = Annotated[str, typer.Option("--arms", help="Arms to train, comma-separated (sft, cpt).")]
PresetOpt = Annotated[str, typer.Option("--preset", help="quick (2-core CPU) | standard | full (every item; GPU): defaults for the training and eval flags.")]
OutOpt = Annotated[Path, typer.Option("--out", help="Folder that holds the run folders.")]
RunIdOpt = Annotated[Optional[str], typer.Option("--run-id", help="Name of the new run folder (default: time-model-data).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda[:N]")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", help="Show lm-eval's, datasets' and transformers' own output on the console (else it goes to the log file).")]


@dataclass(frozen=True)
class TrainFlags:
    """Training options shared by `train` and `run` (TrainConfig overrides)."""

    PANEL = "Training (the preset fills what is not given)"

    budget_tokens: Annotated[Optional[int], typer.Option("--budget-tokens", help="Tokens each arm feeds forward (padding excluded).")] = None
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", help="Tokens per training row.")] = None
    micro_batch: Annotated[Optional[int], typer.Option("--micro-batch", help="Rows per forward pass (per process).")] = None
    grad_accum: Annotated[Optional[int], typer.Option("--grad-accum", help="Micro-batches per optimizer step.")] = None
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (warmup + cosine).")] = None
    precision: Annotated[Optional[str], typer.Option("--precision", help="fp32 | bf16-mixed | fp16-mixed | bf16-true")] = None
    grad_checkpointing: Annotated[Optional[bool], typer.Option("--grad-checkpointing/--no-grad-checkpointing", help="Recompute activations in backward.")] = None
    optim: Annotated[Optional[str], typer.Option("--optim", help="adamw | adamw8bit (torchao, else bitsandbytes)")] = None
    nproc: Annotated[Optional[int], typer.Option("--nproc", help="Processes for FSDP2 sharding (torchrun).")] = None
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed and data-order seed.")] = None
    include_prompt_loss: Annotated[Optional[bool], typer.Option("--include-prompt-loss/--no-include-prompt-loss", help="SFT: also train on prompt tokens.")] = None
    save_every: Annotated[Optional[int], typer.Option("--save-every", help="Resumable checkpoint every N steps (0: none).")] = None
    force: Annotated[Optional[bool], typer.Option("--force/--no-force", help="Start even when the memory plan does not fit.")] = None

    def overrides(self) -> dict:
        """TrainConfig overrides (None: not given, the preset decides); --seed also seeds the data order."""
        return {**dataclasses.asdict(self), "data_seed": self.seed}


@dataclass(frozen=True)
class EvalFlags:
    """Evaluation options shared by `eval` and `run` (EvalConfig overrides)."""

    PANEL = "Evaluation"

    suite: Annotated[str, typer.Option("--suite", help="Suites to run: retention, domain (comma list).")] = "retention,domain"
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="Only these tasks (comma list; overrides --suite): ours, a group of ours (forgetcheck_retention) or lm-eval's hub tasks.")] = None
    limit: Annotated[Optional[int], typer.Option("--limit", help="Deterministic stratified subset of N items per task (the same items for every model). Default: the preset's.")] = None
    backend: Annotated[Optional[str], typer.Option("--backend", help="fast (each context scored once) | hf (stock lm-eval HFLM).")] = None
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Requests per forward pass.")] = None

    def overrides(self) -> dict:
        return dict(suites=split_csv(self.suite), tasks=split_csv(self.tasks), limit=self.limit, backend=self.backend,
                    batch_size=self.batch_size)


@dataclass(frozen=True)
class GateFlags:
    """The release gate's policy, for `run` (the `gate` command also reads a policy file)."""

    PANEL = "Release gate"

    max_drop: Annotated[float, typer.Option("--max-drop", help="Gate: max significant drop on a retention task (points).")] = 2.0
    max_mean_drop: Annotated[float, typer.Option("--max-mean-drop", help="Gate: max significant drop of the retention mean (points).")] = 1.0
    alpha: Annotated[float, typer.Option("--alpha", help="Gate: significance level after Holm correction.")] = 0.05
    min_domain_gain: Annotated[Optional[float], typer.Option("--min-domain-gain", help="Gate: required domain gain (points).")] = None


def _in_panel(annotation, panel: str):
    """`Annotated[T, typer.Option(...)]` shown under its group's heading in --help."""
    info = copy.copy(annotation.__metadata__[0])
    info.rich_help_panel = panel
    return Annotated[annotation.__origin__, info]


def options(**groups: type) -> Callable:
    """`@options(train=TrainFlags)`: the command gets every field of TrainFlags as an option, and receives
    them as one `train: TrainFlags` argument."""

    def wrap(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        hints = get_type_hints(fn, include_extras=True)
        own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()
               if p.name not in groups]
        fields = {g: [(f.name, _in_panel(get_type_hints(cls, include_extras=True)[f.name], cls.PANEL), f.default)
                      for f in dataclasses.fields(cls)] for g, cls in groups.items()}
        extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=a, default=d)
                 for fs in fields.values() for n, a, d in fs]
        names = [p.name for p in own] + [p.name for p in extra]
        assert len(names) == len(set(names)), f"option names collide in {fn.__name__}"

        @functools.wraps(fn)
        def command(**kwargs):
            for g, cls in groups.items():
                kwargs[g] = cls(**{n: kwargs.pop(n) for n, _, _ in fields[g]})
            return fn(**kwargs)

        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + extra
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__  # typer must see the new signature, not fn's
        return command

    return wrap


# ------------------------------------------------------------------------------------------------------
# models (owned by models.py)
# ------------------------------------------------------------------------------------------------------
@app.command()
def models(
    prepare: bool = typer.Option(False, "--prepare", help="Build the cached folder of every alias that is not ready."),
) -> None:
    """List the packaged model aliases: source, parameter count, size on disk, ready or not."""
    from forgetcheck import models as m

    if prepare:
        for name in m.ALIASES:
            m.resolve(name, prepare=True)
    rows = m.describe_aliases()
    echo(f"{'alias':<14} {'ready':<6} {'params':>10} {'on disk':>9}  source / notes")
    for r in rows:
        params = f"{r['parameters'] / 1e6:.1f}M" if r["parameters"] else "-"
        size = f"{r['size_bytes'] / 1e6:.0f} MB" if r["size_bytes"] else "-"
        echo(f"{r['name']:<14} {'yes' if r['ready'] else 'no':<6} {params:>10} {size:>9}  {r['source']}")
        echo(f"{'':<14} {'':<6} {'':>10} {'':>9}  {r['description']}")
    if not all(r["ready"] for r in rows):
        echo("\nnot ready: `forgetcheck models --prepare` builds them (smollm2-135m: one GGUF conversion, ~20 s).")
    echo("Also accepted by --base: a hub id (gpt2, EleutherAI/pythia-160m, ...; needs hub access or the HF "
         "cache), a local HF folder, a .gguf file.")


# ------------------------------------------------------------------------------------------------------
# data (owned by data.py)
# ------------------------------------------------------------------------------------------------------
@data_app.command("list")
def data_list() -> None:
    """Show the domain datasets available and whether they are prepared."""
    from forgetcheck import data

    data.cmd_list()


@data_app.command("prepare")
def data_prepare(
    name: str = typer.Argument("med", help="Dataset to build (med)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if already prepared."),
) -> None:
    """Build a packaged domain dataset (and the benchmark data) from installed packages into the cache."""
    from forgetcheck import data

    data.cmd_prepare(name, force=force)


# ------------------------------------------------------------------------------------------------------
# eval (owned by evaluation.py)
# ------------------------------------------------------------------------------------------------------
@app.command("eval")
@options(ev=EvalFlags)
def eval_cmd(
    model: str = typer.Option(..., "--model", help="Alias (smollm2-135m, tiny-gpt2), local HF folder (e.g. a "
                              "checkpoint), .gguf file or hub id."),
    out: Path = typer.Option(..., "--out", help="Eval JSON to write; per-item lines go to <folder>/samples/<stem>/."),
    ev: EvalFlags = EvalFlags(),
    preset: PresetOpt = "full",
    device: DeviceOpt = "auto",
    reference: Optional[Path] = typer.Option(None, "--reference", help="The base model's eval JSON: adds KL drift "
                                             "(reference || this model) on general text."),
    tasks_dir: Optional[Path] = typer.Option(None, "--tasks-dir", help="lm-eval task YAMLs to use instead of "
                                             "forgetcheck's tasks/."),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="auto | balanced | sequential: split a model "
                                             "larger than one GPU across the visible GPUs (docs/scale.md)."),
    verbose: VerboseOpt = False,
) -> None:
    """Benchmark one model on the suites' tasks (lm-eval, offline, cached) and measure drift on general text.
    `--preset quick` scores the same items (and hits the same cache) as `forgetcheck run --preset quick`.
    Under torchrun, every process scores its share of the items (data-parallel; docs/scale.md)."""
    from forgetcheck import config as C
    from forgetcheck.evaluation import cmd_eval

    _, eval_cfg = C.apply_preset(preset, {}, ev.overrides())
    cmd_eval(model, eval_cfg, out, device=device, reference=reference, tasks_dir=tasks_dir, device_map=device_map,
             verbose=verbose)


# ------------------------------------------------------------------------------------------------------
# train + plan (owned by train.py / plan.py)
# ------------------------------------------------------------------------------------------------------
@app.command()
@options(flags=TrainFlags)
def train(
    base: BaseOpt = "smollm2-135m",
    data: DataOpt = "med",
    arms: ArmsOpt = "sft,cpt",
    run_dir: Optional[Path] = typer.Option(None, "--run", "--run-dir", help="Run folder to train into (default: a new one under --out). Under torchrun write --run-dir (torchrun's parser takes --run for its --run-path)."),
    out: OutOpt = Path("runs"),
    run_id: RunIdOpt = None,
    preset: PresetOpt = "quick",
    flags: TrainFlags = TrainFlags(),
    device: DeviceOpt = "auto",
    nnodes: int = typer.Option(1, "--nnodes", help="Machines sharing --nproc (each runs nproc/nnodes processes; docs/scale.md)."),
    node_rank: int = typer.Option(0, "--node-rank", help="This machine's index, 0..nnodes-1 (0 hosts the rendezvous)."),
    rdzv_endpoint: Optional[str] = typer.Option(None, "--rdzv-endpoint", help="HOST:PORT of node 0, the same on every node (--nnodes > 1)."),
    hybrid_shard: bool = typer.Option(False, "--hybrid-shard", help="Shard within a node, replicate across nodes (FSDP2 HSDP)."),
) -> None:
    """Fully fine-tune each arm (SFT, CPT) on the same token budget -> train/<arm>.json and ckpt/<arm>/.
    Started under torchrun or SLURM's srun, every process joins that launcher as one rank (docs/scale.md)."""
    from forgetcheck import config as C
    from forgetcheck.rundir import RunDir
    from forgetcheck.sharding import Launch
    from forgetcheck.train import cmd_train

    train_cfg, _ = C.apply_preset(preset, flags.overrides(), {})
    rd = RunDir(run_dir) if run_dir is not None else RunDir.new(out, base, data, run_id)
    cmd_train(base, data, C.split_csv(arms), train_cfg, rd, device=device,
              how=Launch(nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint, hybrid_shard=hybrid_shard),
              run_named=run_dir is not None or run_id is not None)


@app.command()
def plan(
    base: Optional[str] = typer.Option(None, "--base", help="Model whose architecture to plan for (alias, folder, .gguf, hub id)."),
    params: Optional[float] = typer.Option(None, "--params", help="Parameter count instead of a model, e.g. 7e9 (shape assumed)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | bf16-mixed | fp16-mixed | bf16-true"),
    optim: str = typer.Option("adamw", "--optim", help="adamw | adamw8bit"),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing", help="Keep only layer inputs; recompute."),
    nproc: int = typer.Option(1, "--nproc", help="Devices sharing the model (FSDP2)."),
    micro_batch: int = typer.Option(1, "--micro-batch", help="Sequences per forward pass per device."),
    seq_len: int = typer.Option(2048, "--seq-len", help="Tokens per sequence."),
) -> None:
    """Memory plan of full fine-tuning: weights, gradients, optimizer state, activations, total, per device."""
    from forgetcheck import config as C
    from forgetcheck import plan as P

    if (base is None) == (params is None):
        raise BadInput("give exactly one of --base MODEL or --params N (e.g. --params 7e9)")
    cfg = C.TrainConfig(precision=precision, optim=optim, grad_checkpointing=grad_checkpointing, nproc=nproc,
                        micro_batch=micro_batch, seq_len=seq_len, budget_tokens=seq_len * micro_batch * nproc)
    C.check(C.validate_train(cfg))
    if params is not None and params < 1:
        raise BadInput(f"--params must be a positive parameter count such as 7e9 (got {params})")
    arch = P.arch_for_base(base) if base is not None else P.arch_from_params(params)
    echo(P.format_plan(P.plan_memory(arch, cfg), P.plan_memory(arch, P.baseline(cfg))))


# ------------------------------------------------------------------------------------------------------
# compare, report, gate (owned by compare.py / report.py / gate.py): pure, JSON in and out, never torch
# ------------------------------------------------------------------------------------------------------
@app.command()
def compare(
    run: Path = typer.Argument(..., help="Run directory (runs/<id>) holding eval/base.json and eval/<arm>.json."),
    alpha: float = typer.Option(0.05, "--alpha", help="Significance level; CIs are (1 - alpha)."),
    n_boot: int = typer.Option(2000, "--n-boot", help="Paired bootstrap resamples."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
) -> None:
    """Paired comparison of every arm against the base: deltas, CIs, McNemar/Holm, flips -> compare.json."""
    from forgetcheck.compare import compare_run
    from forgetcheck.rundir import RunDir

    rd = RunDir.existing(run)
    result = compare_run(rd, alpha=alpha, n_boot=n_boot, seed=seed)
    for arm, s in result["summary"].items():
        fg, ln = s["forgetting"], s["learning"]
        echo(f"{arm}: forgetting {'n/a' if fg is None else f'{fg:+.2f}'} points (retention mean drop), "
             f"learning {'n/a' if ln is None else f'{ln:+.2f}'} points (domain mean gain)")
    echo(f"wrote {rd.compare}")


@app.command()
def report(
    run: Path = typer.Argument(..., help="Run directory (runs/<id>)."),
) -> None:
    """Write the run's self-contained report.html from its compare.json and gate.json (run those commands first)."""
    from forgetcheck.report import write_report
    from forgetcheck.rundir import RunDir

    path = write_report(RunDir.existing(run))
    echo(f"wrote {path}")


# Gate options: one definition, used by `gate` and `check` (a gate flag added here must reach both:
# tests/test_check.py checks that `check` accepts every option of `gate`).
MaxDropOpt = Annotated[Optional[float], typer.Option("--max-drop", help="Max points a retention task may drop "
                                                     "(significant after Holm). Default 2.")]
MaxMeanDropOpt = Annotated[Optional[float], typer.Option("--max-mean-drop", help="Max points the retention mean "
                                                         "may drop (significant). Default 1.")]
GateAlphaOpt = Annotated[Optional[float], typer.Option("--alpha", help="Significance level. Default 0.05.")]
MinDomainGainOpt = Annotated[Optional[float], typer.Option("--min-domain-gain", help="Require the domain mean to "
                                                           "rise by at least this many points.")]
PolicyOpt = Annotated[Optional[Path], typer.Option("--policy", help="gate.toml with the same keys (flags override it).")]
JunitOpt = Annotated[Optional[Path], typer.Option("--junit", help="Also write JUnit XML (one testcase per rule).")]
MarkdownOpt = Annotated[Optional[Path], typer.Option("--markdown", help="Also write a Markdown summary.")]


def _gate_overrides(max_drop, max_mean_drop, alpha, min_domain_gain) -> dict:
    """The gate flags as policy overrides (None: not given; the policy file or the run's config decides)."""
    return {"max_drop": max_drop, "max_mean_drop": max_mean_drop, "alpha": alpha, "min_domain_gain": min_domain_gain}


@app.command()
def gate(
    target: Path = typer.Argument(..., help="Run directory (runs/<id>) or a compare.json."),
    max_drop: MaxDropOpt = None,
    max_mean_drop: MaxMeanDropOpt = None,
    alpha: GateAlphaOpt = None,
    min_domain_gain: MinDomainGainOpt = None,
    policy: PolicyOpt = None,
    junit: JunitOpt = None,
    markdown: MarkdownOpt = None,
) -> None:
    """Release gate: exit 0 when every rule passes, 1 when one fails; every reason lands in gate.json."""
    from forgetcheck.gate import gate_run

    overrides = _gate_overrides(max_drop, max_mean_drop, alpha, min_domain_gain)
    result, code = gate_run(target, overrides, policy_file=policy, junit=junit, markdown=markdown)
    for r in result["rules"]:
        echo(f"{'PASS' if r['passed'] else 'FAIL'}  {r['reason']}")
    echo(f"gate: {result['verdict'].upper()} ({sum(not r['passed'] for r in result['rules'])} of "
         f"{len(result['rules'])} rules failed)")
    raise typer.Exit(code)


# ------------------------------------------------------------------------------------------------------
# check (owned by check.py): gate models trained elsewhere, or two sides' existing lm-eval outputs
# ------------------------------------------------------------------------------------------------------
@app.command()
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
    suite: Annotated[str, typer.Option("--suite", help="Benchmark suites, comma-separated.")] = "retention,domain",
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="Only these tasks (comma list; overrides --suite; "
                     "with --base-samples: a subset of the lm-eval tasks).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Items per task (deterministic stratified subset, "
                     "the same for every model).")] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", help="quick (50 items per task) | standard (200) | "
                      "full (every item); --limit overrides it. Default quick.")] = None,
    backend: Annotated[Optional[str], typer.Option("--backend", help="Eval backend: fast | hf (stock lm-eval HFLM).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Requests per forward pass.")] = None,
    tasks_dir: Annotated[Optional[Path], typer.Option("--tasks-dir", help="lm-eval task YAMLs to use instead of "
                         "forgetcheck's tasks/.")] = None,
    device: DeviceOpt = "auto",
    out: OutOpt = Path("runs"),
    run_id: RunIdOpt = None,
    max_drop: MaxDropOpt = None,
    max_mean_drop: MaxMeanDropOpt = None,
    alpha: GateAlphaOpt = None,
    min_domain_gain: MinDomainGainOpt = None,
    policy: PolicyOpt = None,
    junit: JunitOpt = None,
    markdown: MarkdownOpt = None,
) -> None:
    """Gate models trained elsewhere: evaluate --base and each --candidate (or pair two sides' lm-eval
    --log_samples outputs), then compare, report and gate into runs/<id>/. Exit codes as `gate`."""
    from forgetcheck import check as K
    from forgetcheck import config as C

    gate_flags = dict(gate_overrides=_gate_overrides(max_drop, max_mean_drop, alpha, min_domain_gain),
                      policy_file=policy, junit=junit, markdown=markdown)
    if base_samples is not None or candidate_samples:
        mixed = [f for f, v in (("--base", base), ("--candidate", candidate), ("--limit", limit),
                                ("--preset", preset), ("--backend", backend), ("--batch-size", batch_size),
                                ("--tasks-dir", tasks_dir)) if v]
        if mixed or base_samples is None:
            raise BadInput("--base-samples/--candidate-samples compare existing lm-eval outputs: give both, and none "
                           f"of {', '.join(mixed) or '--base, --candidate'} (those evaluate models)")
        raise typer.Exit(K.check_samples(base_samples, list(candidate_samples or []), out=out, run_id=run_id,
                                         tasks=C.split_csv(tasks), previous=previous, **gate_flags))
    if base is None:
        raise BadInput("give --base MODEL and --candidate [NAME=]MODEL (or --base-samples DIR and "
                       "--candidate-samples DIR for existing lm-eval outputs)")
    _, eval_cfg = C.apply_preset(preset or "quick", {},
                                 dict(suites=C.split_csv(suite), tasks=C.split_csv(tasks), limit=limit,
                                      backend=backend, batch_size=batch_size))
    raise typer.Exit(K.check_models(base, list(candidate or []), eval_cfg, out=out, run_id=run_id, device=device,
                                    tasks_dir=tasks_dir, previous=previous, preset=preset or "quick", **gate_flags))


# ------------------------------------------------------------------------------------------------------
# run (owned by pipeline.py)
# ------------------------------------------------------------------------------------------------------
@app.command()
@options(flags=TrainFlags, ev=EvalFlags, policy=GateFlags)
def run(
    base: BaseOpt = "smollm2-135m",
    data: DataOpt = "med",
    arms: ArmsOpt = "sft,cpt",
    preset: PresetOpt = "quick",
    flags: TrainFlags = TrainFlags(),
    ev: EvalFlags = EvalFlags(),
    policy: GateFlags = GateFlags(),
    device: DeviceOpt = "auto",
    out: OutOpt = Path("runs"),
    run_id: RunIdOpt = None,
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder (its config.json wins)."),
    verbose: VerboseOpt = False,
) -> None:
    """The main job: evaluate base -> train each arm -> re-evaluate -> compare -> gate -> report (exit 0/1)."""
    from forgetcheck import config as C
    from forgetcheck import pipeline

    train_cfg, eval_cfg = C.apply_preset(preset, flags.overrides(), ev.overrides())
    cfg = C.RunConfig(base=base, data=data, arms=C.split_csv(arms), preset=preset, out_dir=str(out), run_id=run_id,
                      device=device, train=train_cfg, eval=eval_cfg, gate=C.GateConfig(**dataclasses.asdict(policy)))
    raise typer.Exit(pipeline.run_pipeline(cfg, resume=resume, verbose=verbose))


def main() -> None:
    try:
        rc = app(standalone_mode=False)  # standalone_mode=False returns typer.Exit's code instead of exiting
        if isinstance(rc, int) and rc != 0:
            sys.exit(rc)
    except ForgetcheckError as e:
        msg = " ".join(str(e).split())  # one line
        print(f"forgetcheck: error: {msg}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("forgetcheck: interrupted; finished stages are kept (resume a run with --resume runs/<id>)",
              file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # typer's (vendored click) usage errors, Exit and Abort arrive here
        name = type(e).__name__
        if name == "Exit":
            sys.exit(getattr(e, "exit_code", 0))
        if name == "Abort":
            print("forgetcheck: aborted", file=sys.stderr)
            sys.exit(130)
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):
            print(f"forgetcheck: error: {' '.join(e.format_message().split())} (see --help)", file=sys.stderr)
            sys.exit(2)
        traceback.print_exc()
        print(f"forgetcheck: runtime failure: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(3)


_ = (Path, Optional, BadInput)  # re-exported for command blocks below
