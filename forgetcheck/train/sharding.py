"""FSDP2 sharding across `--nproc` processes (torchrun): launching the ranks and sharding the model.

`launch` starts `torchrun --standalone --nproc-per-node N -m forgetcheck.train.loop <spec.json>` (several nodes:
`--nnodes/--node-rank` and node 0's endpoint, static rendezvous, one torchrun per node; see `Launch`); every rank
runs the same `train.train_loop` with its rank, on gloo (CPU) or nccl (GPU, one device per rank). A process
that an external launcher started (torchrun, SLURM's srun) joins it instead (`external_ranks`, `join_external`).
Hybrid sharding (`--hybrid-shard`): FSDP2 on a 2-D mesh, sharded within a node and replicated across nodes. The model
is sharded with torch's own FSDP2: `fully_shard` on every transformer block, then on the root (accelerate's
FSDP does not shard on CPU). Each rank takes its own micro-batches of the step's rows; FSDP2 averages the
gradients, so N ranks x micro-batch B equal one process with micro-batch N*B.

This module imports nothing of train (train imports it). Checkpoints, sharded or not, are train/checkpoint.py's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from forgetcheck import config
from forgetcheck.errors import RuntimeFailure
from forgetcheck.rundir import RunDir, atomic_write_json

FAIL_AT_STEP_ENV = "FORGETCHECK_TEST_FAIL_AT_STEP"  # tests only: every rank raises after this optimizer step


# ---- launching ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Launch:
    """Where the ranks of one training come from. `nnodes` machines each start `nproc / nnodes` processes with
    torchrun; node 0 (`node_rank` 0) hosts the rendezvous at `rdzv_endpoint` (host:port), which every node
    names. `hybrid_shard`: shard within a node, replicate across nodes (FSDP2 on a 2-D device mesh)."""

    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    hybrid_shard: bool = False

    def problems(self, nproc: int) -> list[str]:
        out = []
        if self.nnodes < 1:
            out.append(f"--nnodes must be at least 1 (got {self.nnodes})")
        elif nproc % self.nnodes:
            out.append(f"--nproc {nproc} (processes in all) is not a multiple of --nnodes {self.nnodes}: give "
                       f"--nproc = nodes x processes per node")
        if not 0 <= self.node_rank < max(1, self.nnodes):
            out.append(f"--node-rank {self.node_rank} must be in 0..{self.nnodes - 1}")
        if self.nnodes > 1:
            host, _, port = (self.rdzv_endpoint or "").rpartition(":")
            if not host or not port.isdigit():
                out.append("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (node 0's address, the same on every node)")
        if self.hybrid_shard and self.nnodes < 2:
            out.append("--hybrid-shard replicates across nodes: it needs --nnodes 2 or more")
        return out

    def torchrun_args(self, nproc: int) -> list[str]:
        """torchrun's flags: --standalone on one node; static rendezvous on node 0's endpoint otherwise (ranks
        follow --node-rank, so node k always holds ranks k*per_node .. (k+1)*per_node - 1)."""
        per_node = nproc // self.nnodes
        if self.nnodes == 1:
            return ["--standalone", f"--nproc-per-node={per_node}"]
        host, _, port = self.rdzv_endpoint.rpartition(":")
        return [f"--nnodes={self.nnodes}", f"--node-rank={self.node_rank}", f"--nproc-per-node={per_node}",
                f"--master-addr={host}", f"--master-port={port}"]


def launch(arm: str, model_ref, data_path: Path, cfg: config.TrainConfig, run: RunDir, device: str,
           how: Launch | None = None) -> None:
    how = how or Launch()
    spec = run.root / "train" / f".{arm}.launch.node{how.node_rank}.json"
    atomic_write_json(spec, {"arm": arm, "model_ref": model_ref.to_dict(), "data_path": str(data_path),
                             "cfg": config.to_dict(cfg), "run": str(run.root), "device": device,
                             "hybrid_nodes": how.nnodes if how.hybrid_shard else 0})
    cmd = [sys.executable, "-m", "torch.distributed.run", *how.torchrun_args(cfg.nproc),
           "-m", "forgetcheck.train.loop", str(spec)]
    env = dict(os.environ)
    if cfg.optim == "adamw8bit":  # torchao's compiled step on DTensor states (train/optimizer.py)
        env.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
        env.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) * how.nnodes // cfg.nproc)))
    print(f"launching {cfg.nproc // how.nnodes} of {cfg.nproc} processes (FSDP2"
          f"{', hybrid' if how.hybrid_shard else ''}) on node {how.node_rank} of {how.nnodes}: {' '.join(cmd)}",
          flush=True)
    r = subprocess.run(cmd, env=env)
    spec.unlink(missing_ok=True)
    if r.returncode != 0:
        raise RuntimeFailure(f"torchrun training of arm {arm} failed with exit code {r.returncode} "
                             f"(see the output above); re-running resumes from the last resumable checkpoint")


# ---- joining a launcher that is already running (torchrun, SLURM srun) -----------------------------------

def launcher_problems(nproc: int, ranks: dict) -> list[str]:
    """--nproc against the processes an external launcher (`external_ranks`) started."""
    if nproc == ranks["world"]:
        return []
    return [f"--nproc {nproc} but the {ranks['source']} launcher started {ranks['world']} processes: "
            f"give --nproc {ranks['world']} (or leave it out)"]


def external_ranks() -> dict | None:
    """{rank, world, local_rank, source} when this process was started by a launcher for several processes
    (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; SLURM's srun sets SLURM_PROCID / SLURM_NTASKS /
    SLURM_LOCALID, and the job script exports MASTER_ADDR / MASTER_PORT); None for a plain single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        if world > 1:
            per_node = int(env.get("LOCAL_WORLD_SIZE", world))
            return {"rank": int(env["RANK"]), "world": world, "local_rank": int(env.get("LOCAL_RANK", env["RANK"])),
                    "nodes": max(1, world // max(1, per_node)), "source": "torchrun"}
        return None
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return {"rank": int(env["SLURM_PROCID"]), "world": int(env["SLURM_NTASKS"]),
                "local_rank": int(env.get("SLURM_LOCALID", "0")), "nodes": int(env.get("SLURM_NNODES", "1")),
                "source": "slurm"}
    return None


def join_external(device: str, hybrid_nodes: int = 0) -> tuple[int, int, str]:
    """Join the process group of an external launcher (see `external_ranks`); (rank, world, device). SLURM's
    variables are mapped to torch's (RANK, WORLD_SIZE, LOCAL_RANK); MASTER_ADDR / MASTER_PORT must be set."""
    from forgetcheck.errors import BadInput

    ext = external_ranks()
    if ext is None:
        raise BadInput("no external launcher found (neither torchrun's RANK/WORLD_SIZE nor SLURM's SLURM_PROCID/"
                       "SLURM_NTASKS)")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise BadInput(f"started by {ext['source']} but {' and '.join(missing)} not set: export MASTER_ADDR=<first "
                       f"node's host> MASTER_PORT=<free port> before srun (docs/scale.md)")
    os.environ.setdefault("RANK", str(ext["rank"]))
    os.environ.setdefault("WORLD_SIZE", str(ext["world"]))
    os.environ.setdefault("LOCAL_RANK", str(ext["local_rank"]))
    return init_rank(device)


def init_rank(device: str) -> tuple[int, int, str]:
    """In a torchrun process: join the process group (nccl on GPU, gloo on CPU); (rank, world, device)."""
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
        if not dist.is_initialized():
            dist.init_process_group("nccl")
    elif not dist.is_initialized():
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


def shard_model(model, hybrid_nodes: int = 0, device: str = "cpu") -> None:
    """FSDP2: fully_shard every transformer block, then the root (embeddings, final norm, head). With
    `hybrid_nodes` > 1: hybrid sharding (HSDP) on a 2-D mesh (nodes x processes per node): each parameter is
    sharded within a node and replicated across nodes, so the all-gathers stay inside a node."""
    from torch.distributed.fsdp import fully_shard

    kw = {}
    if hybrid_nodes > 1:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        world = dist.get_world_size()
        kw["mesh"] = init_device_mesh("cuda" if device.startswith("cuda") else "cpu",
                                      (hybrid_nodes, world // hybrid_nodes), mesh_dim_names=("replicate", "shard"))
    for block in transformer_blocks(model):
        fully_shard(block, **kw)
    fully_shard(model, **kw)


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
