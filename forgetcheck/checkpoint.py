"""What training leaves behind: the HF checkpoint folder, and the resumable state of an interrupted arm.

The HF folder (`runs/<id>/ckpt/<arm>/`) is an ordinary `from_pretrained` folder plus a forgetcheck.json marker,
moved into place atomically by rank 0; under FSDP2 it is written as sharded safetensors straight from the
sharded state, one tensor gathered at a time (no process holds the whole model). The resumable state
(`runs/<id>/ckpt/<arm>.resume/`: model, optimizer, scheduler, RNG, step and counters) is a `torch.save` file
in one process, and a `torch.distributed.checkpoint` folder (each rank its shards) under FSDP2; its meta.json
is written last and names the training config, so a half-written or foreign state is never trusted.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from forgetcheck import config as C
from forgetcheck.models import MARKER
from forgetcheck.rundir import RunDir, atomic_write_json

STATE_FILE = "state.pt"


def resume_dir(run: RunDir, arm: str) -> Path:
    """Where the resumable state of `arm` is kept while it trains (removed once the arm is finished)."""
    return run.ckpt(arm).parent / f"{arm}.resume"


SHARD_BYTES_ENV = "FORGETCHECK_CKPT_SHARD_BYTES"  # tests: small shards, so a tiny model is written as several files
DEFAULT_SHARD_BYTES = 2 * 1024**3  # as transformers' save_pretrained (max_shard_size "2GB"-ish)


def _unique_state_names(model) -> list[str]:
    """State-dict names to save: every parameter once (tied weights under their first name, as
    save_pretrained does) and the persistent buffers, in state-dict order."""
    all_params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    first = {n for n, _ in model.named_parameters()}
    return [k for k in model.state_dict() if k in first or k not in all_params]


def _write_sharded_from_fsdp(model, folder: Path, *, rank: int) -> None:
    """Write `model` (FSDP2: DTensor parameters) as HF sharded safetensors, gathering ONE tensor at a time: every
    rank takes part in each gather, rank 0 keeps the full tensor on CPU until its shard file is full, writes it,
    and frees it. Peak memory on rank 0: one shard (SHARD_BYTES) plus one tensor, never the whole model."""
    import torch
    from safetensors.torch import save_file

    limit = int(os.environ.get(SHARD_BYTES_ENV, DEFAULT_SHARD_BYTES))
    sd = model.state_dict()
    names = _unique_state_names(model)
    files: list[list[str]] = []
    buf: dict[str, torch.Tensor] = {}
    buf_bytes = 0
    total = 0

    def flush() -> None:
        nonlocal buf, buf_bytes
        if rank == 0 and buf:
            save_file(buf, str(folder / f".part-{len(files):05d}.safetensors"), metadata={"format": "pt"})
            files.append(list(buf))
        buf, buf_bytes = {}, 0

    for name in names:
        t = sd[name]
        full = t.full_tensor() if hasattr(t, "full_tensor") else t  # a collective: every rank calls it
        if rank != 0:
            del full
            continue
        full = full.detach().to("cpu").contiguous()
        size = full.numel() * full.element_size()
        if buf and buf_bytes + size > limit:
            flush()
        buf[name] = full
        buf_bytes += size
        total += size
    flush()
    if rank != 0:
        return
    n = len(files)
    weight_map = {}
    for i, keys in enumerate(files):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
        os.replace(folder / f".part-{i:05d}.safetensors", folder / final)
        weight_map.update({k: final for k in keys})
    if n > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def save_hf_checkpoint(model, tok, out: Path, model_ref, arm: str, *, world: int, rank: int) -> None:
    """An ordinary HF folder (safetensors, tokenizer, forgetcheck.json marker), moved into place atomically by
    rank 0. Under FSDP2 the weights are written straight from the sharded state, one tensor gathered at a time,
    as sharded safetensors (model-0000i-of-0000n.safetensors + model.safetensors.index.json) that
    `from_pretrained` loads; no process ever holds the whole model."""
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    model.config.use_cache = True
    if world > 1:
        _write_sharded_from_fsdp(model, tmp, rank=rank)
        if rank != 0:
            return
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
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
