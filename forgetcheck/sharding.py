"""FSDP2 sharding across `--nproc` processes (torchrun), and saving what training leaves behind.

`launch` starts `torchrun --standalone --nproc-per-node N -m forgetcheck.sharding <spec.json>`; every rank
runs the same `train.train_loop` with its rank, on gloo (CPU) or nccl (GPU, one device per rank). The model
is sharded with torch's own FSDP2: `fully_shard` on every transformer block, then on the root (accelerate's
FSDP does not shard on CPU). Each rank takes its own micro-batches of the step's rows; FSDP2 averages the
gradients, so N ranks x micro-batch B equal one process with micro-batch N*B.

Checkpoints: the HF folder is written by rank 0 from the gathered full state dict (an ordinary
`from_pretrained` folder). The resumable state (model, optimizer, scheduler, RNG, step and counters) is a
`torch.save` file in one process, and a `torch.distributed.checkpoint` folder (each rank its shards) under
FSDP2.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from forgetcheck import config as C
from forgetcheck.errors import RuntimeFailure
from forgetcheck.models import MARKER
from forgetcheck.rundir import RunDir, atomic_write_json

STATE_FILE = "state.pt"
FAIL_AT_STEP_ENV = "FORGETCHECK_TEST_FAIL_AT_STEP"  # tests only: every rank raises after this optimizer step


# ---- launching ------------------------------------------------------------------------------------------

def launch(arm: str, model_ref, data_path: Path, cfg: C.TrainConfig, run: RunDir, device: str) -> None:
    spec = run.root / "train" / f".{arm}.launch.json"
    atomic_write_json(spec, {"arm": arm, "model_ref": model_ref.to_dict(), "data_path": str(data_path),
                             "cfg": C.to_dict(cfg), "run": str(run.root), "device": device})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg.nproc}",
           "-m", "forgetcheck.sharding", str(spec)]
    env = dict(os.environ)
    if cfg.optim == "adamw8bit":  # torchao's compiled step on DTensor states (DESIGN.md)
        env.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
        env.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.nproc)))
    print(f"launching {cfg.nproc} processes (FSDP2): {' '.join(cmd)}", flush=True)
    r = subprocess.run(cmd, env=env)
    spec.unlink(missing_ok=True)
    if r.returncode != 0:
        raise RuntimeFailure(f"torchrun training of arm {arm} failed with exit code {r.returncode} "
                             f"(see the output above); re-running resumes from the last resumable checkpoint")


def _worker(spec_path: str) -> None:
    import torch
    import torch.distributed as dist

    from forgetcheck.models import ModelRef
    from forgetcheck.train import train_loop

    spec = json.loads(Path(spec_path).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = spec["device"]
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    fail_at = int(os.environ.get(FAIL_AT_STEP_ENV, "0"))

    def on_step(step: int) -> None:  # test hook: simulate a crash of every rank after this step
        if step == fail_at:
            raise RuntimeError(f"{FAIL_AT_STEP_ENV}={fail_at}: simulated crash")

    try:
        train_loop(spec["arm"], ModelRef(**spec["model_ref"]), Path(spec["data_path"]),
                   C.TrainConfig(**spec["cfg"]), RunDir(spec["run"]), device=device, rank=rank, world=world,
                   on_step=on_step if fail_at else None)
    finally:
        dist.destroy_process_group()


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


# ---- checkpoints ----------------------------------------------------------------------------------------

def save_hf_checkpoint(model, tok, out: Path, model_ref, arm: str, *, world: int, rank: int) -> None:
    """An ordinary HF folder (safetensors, tokenizer, forgetcheck.json marker), written atomically by rank 0."""
    if world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = None
    if rank != 0:
        return
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.use_cache = True
    if sd is not None:  # build an unsharded copy from the gathered weights and save that
        from transformers import AutoModelForCausalLM

        dtype = next(iter(sd.values())).dtype
        plain = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
        plain.load_state_dict(sd, strict=True)
        plain.tie_weights()
        plain.save_pretrained(tmp)
    else:
        model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps({"arm": arm, "base": model_ref.name, "base_path": model_ref.path,
                                          "random_weights": model_ref.random_weights}, indent=2))
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)


def has_resume(rdir: Path, cfg: C.TrainConfig) -> bool:
    meta = rdir / "meta.json"
    if not meta.exists():
        return False
    saved = json.loads(meta.read_text())
    return saved.get("config") == json.loads(json.dumps(C.to_dict(cfg)))


def _rng_state() -> dict:
    import random

    import torch

    out = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_state(s: dict) -> None:
    import random

    import torch

    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_resume(rdir: Path, model, optimizer, scheduler, scaler, state: dict, cfg: C.TrainConfig, *,
                world: int, rank: int) -> None:
    """Everything needed to continue exactly where training stopped. meta.json is written last, so a
    half-written save is never trusted."""
    import torch

    rdir = Path(rdir)
    if rank == 0:
        (rdir / "meta.json").unlink(missing_ok=True)
        rdir.mkdir(parents=True, exist_ok=True)
    extra = {"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
             "state": state}
    if world == 1:
        blob = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": _rng_state(), **extra}
        tmp = rdir / f".{STATE_FILE}.tmp"
        torch.save(blob, tmp)
        os.replace(tmp, rdir / STATE_FILE)
    else:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        dist.barrier()
        msd, osd = get_state_dict(model, optimizer)
        if rank == 0:
            shutil.rmtree(rdir / "dcp", ignore_errors=True)
        dist.barrier()
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(rdir / "dcp"))
        torch.save({"rng": _rng_state(), **extra}, rdir / f"rank{rank}.pt")
        dist.barrier()
    if rank == 0:
        atomic_write_json(rdir / "meta.json", {"step": state["step"], "config": C.to_dict(cfg), "world": world})


def load_resume(rdir: Path, model, optimizer, scheduler, scaler, *, world: int, rank: int) -> dict:
    import copy

    import torch

    rdir = Path(rdir)
    if world == 1:
        blob = torch.load(rdir / STATE_FILE, map_location="cpu", weights_only=False)
        model.load_state_dict(blob["model"])
        optimizer.load_state_dict(blob["optimizer"])
    else:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(model, optimizer)
        sd = {"model": msd, "optimizer": osd}
        dcp.load(sd, checkpoint_id=str(rdir / "dcp"))
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
        blob = torch.load(rdir / f"rank{rank}.pt", map_location="cpu", weights_only=False)
    scheduler.load_state_dict(blob["scheduler"])
    if scaler is not None and blob["scaler"] is not None:
        scaler.load_state_dict(blob["scaler"])
    _set_rng_state(blob["rng"])
    return copy.deepcopy(blob["state"])


if __name__ == "__main__":
    _worker(sys.argv[1])
