"""`forgetcheck train`: every arm (and each of its `--seeds` runs) validated at once (cli/inputs.resolve_train),
then trained into one run folder, reusing finished ones; under torchrun or SLURM every process joins as one rank
(docs/scale.md).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Optional

import typer

from forgetcheck import config, console
from forgetcheck.cli.inputs import Inputs, resolve_train
from forgetcheck.cli.lock import RunLock
from forgetcheck.cli.options import (
    ArmsOpt,
    BaseOpt,
    DataOpt,
    DeviceOpt,
    OutOpt,
    PresetOpt,
    RunIdOpt,
    TrainFlags,
    VerboseOpt,
    options,
)
from forgetcheck.rundir import RunDir


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
    verbose: VerboseOpt = False,
) -> None:
    """Fully fine-tune each arm (SFT, CPT) on the same token budget -> train/<arm>.json and ckpt/<arm>/.
    Started under torchrun or SLURM's srun, every process joins that launcher as one rank (docs/scale.md)."""
    from forgetcheck.train.sharding import Launch

    train_cfg, _ = config.apply_preset(preset, flags.overrides(), {})
    cfg = config.RunConfig(base=base, data=data, arms=config.split_csv(arms), preset=preset, out_dir=str(out),
                           run_id=run_id, device=device, train=train_cfg)
    how = Launch(nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint, hybrid_shard=hybrid_shard)
    with console.session(verbose=verbose):
        train_arms(resolve_train(cfg, RunDir(run_dir) if run_dir is not None else None, how=how,
                                 run_flag="--run" if run_dir is not None else "--out"))


def cmd_train(base: str, data: str, arms: tuple[str, ...], cfg: config.TrainConfig, run: RunDir, device: str = "auto",
              how=None, verbose: bool = False) -> list[dict]:
    """Train `arms` of `base` on `data` into `run` (library use: the `train` command without its flags)."""
    request = config.RunConfig(base=base, data=data, arms=tuple(arms), device=device, train=cfg)
    with console.session(verbose=verbose):
        return train_arms(resolve_train(request, run, how=how, run_flag="--run"))


def train_arms(inp: Inputs) -> list[dict]:
    """Train each arm (and each of its seed runs) into the run folder, one console line per arm; rank 0 alone prints and writes
    the run's files, and alone holds the run folder's lock (cli/lock.py) from its first write to the end."""
    with RunLock(inp.run.root) if inp.rank == 0 else contextlib.nullcontext():
        return _train_arms(inp)


def _train_arms(inp: Inputs) -> list[dict]:
    from forgetcheck.train.loop import reusable, train_arm

    cfg, run, ranks = inp.cfg.train, inp.run, inp.ranks
    main = inp.rank == 0
    if main:
        console.log_to(run.root / "log.txt")
        console.say(f"forgetcheck train {run.root}; {inp.device.describe()}"
                    + (f"; rank {inp.rank} of {ranks['world']} ({ranks['source']})" if ranks else "")
                    + f"; log: {run.root / 'log.txt'}")
        console.detail("train config: " + json.dumps(config.to_dict(cfg), separators=(",", ":")))
        if inp.model.random_weights:
            console.say(f"NOTE: --base {inp.cfg.base} has RANDOM WEIGHTS: plumbing only")
    labels = [config.seed_run_label(arm, i) for arm in inp.cfg.arms for i in range(cfg.seeds)]
    records = []
    for i, label in enumerate(labels, 1):
        title = f"[{i}/{len(labels)}] train {label}"
        reused = main and reusable(run, label, cfg) is not None
        if reused:
            console.say(f"{title}: present, reused")
        with console.stage(title) if main and not reused else contextlib.nullcontext():
            records.append(train_arm(label, inp.model, inp.data, cfg, run, device=inp.device_name, how=inp.launch))
    records = [r for r in records if r is not None]
    for r in records if main else ():
        console.say(f"{r['arm']}: {r['optimizer_steps']} steps, tokens forward {r['tokens_seen']['forward']} "
                    f"(label {r['tokens_seen']['label']}, padding {r['tokens_seen']['padding']}), "
                    f"{r['tokens_per_s']} tokens/s, peak {r['memory']['measured_peak_bytes'] / 1e9:.2f} GB "
                    f"(planned {r['memory']['planned']['total'] / 1e9:.2f} GB) -> {r['checkpoint']}")
    return records
