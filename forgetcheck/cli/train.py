"""`forgetcheck train`: every arm (and each of its `--seeds` runs) validated at once, then trained into one run
folder, reusing finished ones; under torchrun or SLURM every process joins as one rank (docs/scale.md).
"""

from __future__ import annotations

import json

from forgetcheck import config
from forgetcheck.errors import BadInput
from forgetcheck.rundir import RunDir
from forgetcheck.train.loop import train_arm


def cmd_train(base: str, data: str, arms: tuple[str, ...], cfg: config.TrainConfig, run: RunDir, device: str = "auto",
              how=None, run_named: bool = True, run_flag: str = "--out") -> list[dict]:
    """`forgetcheck train`: validate every arm at once, then train each into `run` (reusing finished ones).
    `how`: a sharding.Launch (several nodes, hybrid sharding). Under an external launcher (torchrun, srun) every
    rank runs this; rank 0 prepares the model and data first and alone prints and writes the run's files.
    `run_named`: the run folder was named by --run / --run-id (required under an external launcher, so that
    every rank trains into the same folder). `run_flag`: the flag that named the run folder (--run, or --out
    with --run-id), for messages."""
    from dataclasses import replace

    from forgetcheck.data.domain import arm_problems, load_domain
    from forgetcheck.device import choose_device
    from forgetcheck.models import registry
    from forgetcheck.rundir import check_output_dir
    from forgetcheck.train import optimizer, sharding
    from forgetcheck.train.arms import TRAINED

    how = how or sharding.Launch()
    ext = sharding.external_ranks()
    problems = how.problems(cfg.nproc) if ext is None else []
    if ext is not None:
        if cfg.nproc == 1:  # not given: the launcher's process count
            cfg = replace(cfg, nproc=ext["world"])
        if cfg.nproc != ext["world"]:
            problems.append(f"--nproc {cfg.nproc} but the {ext['source']} launcher started {ext['world']} processes: "
                            f"give --nproc {ext['world']} (or leave it out)")
        if how.nnodes > 1 or how.rdzv_endpoint:
            problems.append(f"started by {ext['source']}: --nnodes/--node-rank/--rdzv-endpoint are the launcher's "
                            f"business here; drop them")
        if not run_named:
            problems.append(f"started by {ext['source']}: give --run or --run-id, so that every rank trains into the "
                            f"same run folder")
        if how.hybrid_shard and ext["nodes"] < 2:
            problems.append(f"--hybrid-shard replicates across nodes, but the {ext['source']} launcher runs one node")
        how = sharding.Launch(nnodes=ext["nodes"], hybrid_shard=how.hybrid_shard)
    problems += config.validate_arms(arms)
    try:
        check_output_dir(run.root, run_flag)
    except BadInput as e:
        problems.append(str(e))
    problems += config.validate_train(cfg)
    model_ref = domain = None
    try:
        model_ref = registry.resolve(base, prepare=False)
    except BadInput as e:
        problems.append(str(e))
    try:
        domain = load_domain(data, prepare=False)
    except BadInput as e:
        problems.append(str(e))
    if domain is not None:
        problems += arm_problems(domain, arms)
    problems += [f"arm '{a}' is not trained (it interpolates weights): use `forgetcheck run --arms ...,{a}`"
                 for a in arms if a in config.ARMS and a not in TRAINED]
    try:
        dev = choose_device(device)
        problems += optimizer.check_combination(cfg, dev.device,
                                            None if how.nnodes == 1 else cfg.nproc // max(1, how.nnodes))
    except BadInput as e:
        problems.append(str(e))
    config.check(problems)
    rank = 0
    if ext is not None:  # join now: rank 0 builds the cached model and data folders before the others look
        import torch.distributed as dist

        rank = sharding.join_external(dev.device)[0]
        if rank != 0:
            dist.barrier()
    model_ref = registry.resolve(base, prepare=True)
    domain = load_domain(data, prepare=True)
    if ext is not None and rank == 0:
        dist.barrier()
    say = print if rank == 0 else (lambda *a, **k: None)
    say(dev.describe() + (f"; rank {rank} of {ext['world']} ({ext['source']})" if ext else ""))
    say("train config: " + json.dumps(config.to_dict(cfg), separators=(",", ":")))
    if model_ref.random_weights:
        say(f"NOTE: --base {base} has RANDOM WEIGHTS: plumbing only")
    records = []
    for arm in arms:
        for i in range(cfg.seeds):
            records.append(train_arm(config.replica_label(arm, i), model_ref, domain, cfg, run, device=dev.device, how=how))
    records = [r for r in records if r is not None]
    for r in records:
        print(f"{r['arm']}: {r['optimizer_steps']} steps, tokens forward {r['tokens_seen']['forward']} "
              f"(label {r['tokens_seen']['label']}, padding {r['tokens_seen']['padding']}), "
              f"{r['tokens_per_s']} tokens/s, peak {r['memory']['measured_peak_bytes'] / 1e9:.2f} GB "
              f"(planned {r['memory']['planned']['total'] / 1e9:.2f} GB) -> {r['checkpoint']}")
    return records
