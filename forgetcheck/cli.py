"""The command line: typed signatures are the CLI (typer). Each command imports its stage lazily, so
`forgetcheck --help`, `compare`, `report` and `gate` never import torch.

Exit codes (DESIGN.md): 0 success / gate passed; 1 gate failed; 2 bad input (one line, no traceback);
3 runtime failure.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Optional

import typer

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
# eval (owned by evaluation.py)  -- STUB: to be replaced by the eval implementation
# ------------------------------------------------------------------------------------------------------

# ------------------------------------------------------------------------------------------------------
# train + plan (owned by train.py / plan.py)  -- STUB: to be replaced by the train implementation
# ------------------------------------------------------------------------------------------------------

# ------------------------------------------------------------------------------------------------------
# compare, report, gate (owned by compare.py / report.py / gate.py) -- STUB
# ------------------------------------------------------------------------------------------------------

# ------------------------------------------------------------------------------------------------------
# run (owned by pipeline.py)
# ------------------------------------------------------------------------------------------------------
@app.command()
def run(
    base: str = typer.Option("smollm2-135m", "--base", help="Model to fine-tune: alias (smollm2-135m, tiny-gpt2), hub id, HF folder or .gguf."),
    data: str = typer.Option("med", "--data", help="Domain data: packaged name (med) or a folder with sft.jsonl / cpt.jsonl."),
    suite: str = typer.Option("retention,domain", "--suite", help="Benchmark suites, comma-separated."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Restrict to these tasks, comma-separated."),
    arms: str = typer.Option("sft,cpt", "--arms", help="Arms to train, comma-separated (sft, cpt)."),
    preset: str = typer.Option("quick", "--preset", help="quick (2-core CPU, <= 20 min) | standard | full (every item; GPU)."),
    budget_tokens: Optional[int] = typer.Option(None, "--budget-tokens", help="Training tokens per arm (padding excluded)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Items per task (deterministic stratified subset)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len"),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch"),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum"),
    lr: Optional[float] = typer.Option(None, "--lr"),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32 | bf16-mixed | fp16-mixed | bf16-true"),
    grad_checkpointing: Optional[bool] = typer.Option(None, "--grad-checkpointing/--no-grad-checkpointing"),
    optim: Optional[str] = typer.Option(None, "--optim", help="adamw | adamw8bit"),
    nproc: Optional[int] = typer.Option(None, "--nproc", help="Processes for FSDP2 sharding."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    backend: Optional[str] = typer.Option(None, "--backend", help="Eval backend: fast | hf (stock lm-eval HFLM)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]"),
    max_drop: float = typer.Option(2.0, "--max-drop", help="Gate: max significant drop on a retention task (points)."),
    max_mean_drop: float = typer.Option(1.0, "--max-mean-drop", help="Gate: max significant drop of the retention mean (points)."),
    alpha: float = typer.Option(0.05, "--alpha", help="Gate: significance level after Holm correction."),
    min_domain_gain: Optional[float] = typer.Option(None, "--min-domain-gain", help="Gate: required domain gain (points)."),
    out: Path = typer.Option(Path("runs"), "--out", help="Folder that holds the run folders."),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="Name of the run folder (default: time-model-data)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder (its config.json wins)."),
) -> None:
    """The main job: evaluate base -> train each arm -> re-evaluate -> compare -> report -> gate (exit 0/1)."""
    from forgetcheck import config as C
    from forgetcheck import pipeline

    train_cfg, eval_cfg = C.apply_preset(
        preset,
        dict(budget_tokens=budget_tokens, seq_len=seq_len, micro_batch=micro_batch, grad_accum=grad_accum, lr=lr,
             precision=precision, grad_checkpointing=grad_checkpointing, optim=optim, nproc=nproc, seed=seed,
             data_seed=seed),
        dict(suites=C.split_csv(suite), tasks=C.split_csv(tasks), limit=limit, backend=backend),
    )
    cfg = C.RunConfig(base=base, data=data, arms=C.split_csv(arms), preset=preset, out_dir=str(out), run_id=run_id,
                      device=device, train=train_cfg, eval=eval_cfg,
                      gate=C.GateConfig(max_drop=max_drop, max_mean_drop=max_mean_drop, alpha=alpha,
                                        min_domain_gain=min_domain_gain))
    raise typer.Exit(pipeline.run_pipeline(cfg, resume=resume))


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
