"""FSDP2 sharding across `--nproc` processes (torchrun): launching the ranks and sharding the model.

`launch` starts `torchrun --standalone --nproc-per-node N -m forgetcheck.train <spec.json>`; every rank
runs the same `train.train_loop` with its rank, on gloo (CPU) or nccl (GPU, one device per rank). The model
is sharded with torch's own FSDP2: `fully_shard` on every transformer block, then on the root (accelerate's
FSDP does not shard on CPU). Each rank takes its own micro-batches of the step's rows; FSDP2 averages the
gradients, so N ranks x micro-batch B equal one process with micro-batch N*B.

This module imports nothing of train (train imports it). Checkpoints, sharded or not, are checkpoint.py's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from forgetcheck import config as C
from forgetcheck.errors import RuntimeFailure
from forgetcheck.rundir import RunDir, atomic_write_json

STATE_FILE = "state.pt"
FAIL_AT_STEP_ENV = "FORGETCHECK_TEST_FAIL_AT_STEP"  # tests only: every rank raises after this optimizer step


# ---- launching ------------------------------------------------------------------------------------------

def launch(arm: str, model_ref, data_path: Path, cfg: C.TrainConfig, run: RunDir, device: str) -> None:
    spec = run.root / "train" / f".{arm}.launch.json"
    atomic_write_json(spec, {"arm": arm, "model_ref": model_ref.to_dict(), "data_path": str(data_path),
                             "cfg": C.to_dict(cfg), "run": str(run.root), "device": device})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg.nproc}",
           "-m", "forgetcheck.train", str(spec)]
    env = dict(os.environ)
    if cfg.optim == "adamw8bit":  # torchao's compiled step on DTensor states (optim.py)
        env.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
        env.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.nproc)))
    print(f"launching {cfg.nproc} processes (FSDP2): {' '.join(cmd)}", flush=True)
    r = subprocess.run(cmd, env=env)
    spec.unlink(missing_ok=True)
    if r.returncode != 0:
        raise RuntimeFailure(f"torchrun training of arm {arm} failed with exit code {r.returncode} "
                             f"(see the output above); re-running resumes from the last resumable checkpoint")


def init_rank(device: str) -> tuple[int, int, str]:
    """In a torchrun process: join the process group (nccl on GPU, gloo on CPU); (rank, world, device)."""
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return rank, world, device


def read_spec(spec_path: str) -> dict:
    """The launch spec `launch` wrote for the ranks."""
    return json.loads(Path(spec_path).read_text())


def crash_hook_for_tests():
    """`on_step` for train_loop when FAIL_AT_STEP_ENV is set (tests simulate a crash of every rank), else None."""
    fail_at = int(os.environ.get(FAIL_AT_STEP_ENV, "0"))
    if not fail_at:
        return None

    def on_step(step: int) -> None:
        if step == fail_at:
            raise RuntimeError(f"{FAIL_AT_STEP_ENV}={fail_at}: simulated crash")

    return on_step


# ---- sharding -------------------------------------------------------------------------------------------

def transformer_blocks(model) -> list:
    """The repeated decoder blocks (the ModuleList holding most parameters)."""
    import torch

    best = None
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > 0:
            n = sum(p.numel() for p in m.parameters())
            if best is None or n > best[0]:
                best = (n, m)
    if best is None:
        raise RuntimeFailure(f"cannot find the transformer blocks of {type(model).__name__} to shard")
    return list(best[1])


def shard_model(model) -> None:
    """FSDP2: fully_shard every transformer block, then the root (embeddings, final norm, head)."""
    from torch.distributed.fsdp import fully_shard

    for block in transformer_blocks(model):
        fully_shard(block)
    fully_shard(model)


def sum_over_ranks(value: float, world: int) -> float:
    if world == 1:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item())
