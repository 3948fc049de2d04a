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

from forgetcheck import config
from forgetcheck.errors import BadInput
from forgetcheck.models.files import give_usual_modes
from forgetcheck.models.registry import MARKER
from forgetcheck.rundir import RunDir, atomic_write_json, read_json

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
    give_usual_modes(tmp)
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)


def resume_step(rdir: Path, cfg: config.TrainConfig) -> int | None:
    """The optimizer step the resume state in `rdir` reached, when there is one saved with this config; else
    None (training starts from its first step)."""
    meta = rdir / "meta.json"
    if not meta.exists():
        return None
    saved = read_json(meta)
    if not isinstance(saved, dict):
        raise BadInput(f"{meta} is not a resume record (expected a JSON object): delete {rdir} to restart the "
                       f"arm from its first step")
    if saved.get("config") != json.loads(json.dumps(config.to_dict(cfg))):
        return None
    return int(saved["step"])


# ---- reading resume state: never runs code from the run folder ----------------------------------------------

def _refuse(rdir: Path, f: Path, why: str) -> BadInput:
    return BadInput(f"resume state {f} is refused ({why}): a run folder is data, and forgetcheck reads only "
                    f"tensors and plain values from it; delete {rdir} to restart the arm from its first step")


# Tensor subclasses an 8-bit / 4-bit optimizer keeps its state in: the only globals beyond torch's defaults
# that a resume state may name.
ALLOWED_STATE_CLASSES = ("torchao.optim.subclass_8bit.OptimState8bit", "torchao.optim.subclass_4bit.OptimState4bit",
                         "torchao.optim.subclass_fp8.OptimStateFp8")


def state_file_globals(rdir: Path, f: Path) -> list[str]:
    """The globals a torch.save file names beyond torch's weights-only defaults, read without unpickling it;
    BadInput when one is not in ALLOWED_STATE_CLASSES."""
    import torch

    if not f.is_file():
        raise _refuse(rdir, f, "missing")
    try:
        extra = torch.serialization.get_unsafe_globals_in_checkpoint(f)
    except Exception as e:  # noqa: BLE001 - not a torch zip file, damaged, ...
        raise _refuse(rdir, f, f"not a torch state file: {type(e).__name__}") from None
    bad = [g for g in extra if g not in ALLOWED_STATE_CLASSES]
    if bad:
        raise _refuse(rdir, f, f"it names {bad[0]}, which is not a tensor or plain value")
    return extra


def check_resume_state(rdir: Path) -> None:
    """Before any work on --resume: the resume state of an arm (when its meta.json says there is one) holds
    only what load_resume will accept. Nothing is unpickled."""
    rdir = Path(rdir)
    meta = rdir / "meta.json"
    if not meta.is_file():
        return
    saved = read_json(meta)
    world = saved.get("world", 1) if isinstance(saved, dict) else None
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise _refuse(rdir, meta, "not a resume record")
    if world == 1:
        state_file_globals(rdir, rdir / STATE_FILE)
    else:
        check_dcp(rdir, rdir / "dcp")
        for rank in range(world):
            state_file_globals(rdir, rdir / f"rank{rank}.pt")


def _unpickler_reason(e: Exception) -> str:
    """The line of a weights-only refusal that names what was refused (torch wraps it in advice to load
    with weights_only=False, which is exactly what must not happen)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
    return next((ln for ln in lines if "WeightsUnpickler error" in ln or "unsupported GLOBAL" in ln),
                lines[0])[:200]


def load_state_file(rdir: Path, f: Path) -> dict:
    """A torch.save file of the resume state, read with torch's weights-only unpickler: tensors, dicts, lists,
    numbers and strings, plus the optimizer-state tensor classes of ALLOWED_STATE_CLASSES; a file naming any
    other global is refused before anything is built."""
    import importlib
    import pickle

    import torch

    extra = state_file_globals(rdir, f)
    classes = []
    for g in extra:
        module, name = g.rsplit(".", 1)
        try:
            classes.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            raise _refuse(rdir, f, f"it holds {g}, and {module} is not installed") from None
    try:
        with torch.serialization.safe_globals(classes):
            blob = torch.load(f, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise _refuse(rdir, f, f"not plain tensors and values: {_unpickler_reason(e)}") from None
    if not isinstance(blob, dict):
        raise _refuse(rdir, f, "not a resume state dict")
    return blob


_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")


def check_dcp_metadata(rdir: Path, dcp_dir: Path):
    """torch.distributed.checkpoint reads its `.metadata` with plain pickle. Before letting it, unpickle the file
    with an allow-list (DCP's own metadata classes, torch.Size, dtypes, layouts, paths): a file naming any other
    global is refused without anything being called. Returns the checked metadata."""
    import pathlib
    import pickle

    import torch

    def allowed(module: str, name: str):
        if module in _DCP_MODULES:
            obj = getattr(__import__(module, fromlist=[name]), name, None)
            return obj if isinstance(obj, type) else None
        if module == "torch":
            obj = getattr(torch, name, None)
            return obj if obj is torch.Size or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)) \
                else None
        if (module, name) == ("torch.serialization", "_get_layout"):
            return torch.serialization._get_layout
        if module == "pathlib" and name in ("PosixPath", "PurePosixPath", "Path"):
            return getattr(pathlib, name)
        if (module, name) in (("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset")):
            return getattr(__import__(module), name)
        return None

    class _Checked(pickle.Unpickler):
        def find_class(self, module, name):
            obj = allowed(module, name)
            if obj is None:
                raise pickle.UnpicklingError(f"{module}.{name} is not allowed")
            return obj

    f = Path(dcp_dir) / ".metadata"
    try:
        with open(f, "rb") as fh:
            metadata = _Checked(fh).load()
    except FileNotFoundError:
        raise _refuse(rdir, f, "missing") from None
    except Exception as e:  # noqa: BLE001 - anything a hostile or damaged pickle raises is a refusal
        raise _refuse(rdir, f, f"{type(e).__name__}: {str(e)[:160]}") from None
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict) \
            or not isinstance(metadata.state_dict_metadata, dict):
        raise _refuse(rdir, f, "not a distributed-checkpoint metadata record")
    return metadata


def _dcp_item_file(rdir: Path, dcp_dir: Path, fqn: str, info) -> Path:
    """The shard file one stored item lives in: a plain file directly inside the dcp folder, read raw (no
    stream transform), at a byte range that exists."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    meta = Path(dcp_dir) / ".metadata"
    if not isinstance(info, _StorageInfo) or not isinstance(info.relative_path, str):
        raise _refuse(rdir, meta, f"item {fqn} has no storage record")
    name = info.relative_path
    if Path(name).name != name or name in ("", ".", "..") or "\x00" in name:
        raise _refuse(rdir, meta, f"item {fqn} is stored at {name!r}, outside {dcp_dir}")
    f = Path(dcp_dir) / name
    if f.is_symlink() or not f.is_file():
        raise _refuse(rdir, f, f"item {fqn}: not a plain file of the checkpoint")
    if info.transform_descriptors:  # forgetcheck writes none; a transform is code chosen by the file
        raise _refuse(rdir, meta, f"item {fqn} asks for stream transforms {list(info.transform_descriptors)}")
    ints = (info.offset, info.length)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints) \
            or info.offset + info.length > f.stat().st_size:
        raise _refuse(rdir, f, f"item {fqn}: byte range {ints} is not inside the file")
    return f


def _load_weights_only(data: bytes, rdir: Path, f: Path, fqn: str):
    """One non-tensor item of a distributed checkpoint (a learning rate, betas, a flag), unpickled by torch's
    weights-only unpickler: plain values and tensors only, nothing called."""
    import io
    import pickle

    import torch

    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise _refuse(rdir, f, f"item {fqn} is not a plain value: {_unpickler_reason(e)}") from None


def check_dcp(rdir: Path, dcp_dir: Path) -> None:
    """Everything of a distributed checkpoint that would be unpickled, checked without running it: the
    `.metadata` (check_dcp_metadata), and every non-tensor item (DCP itself would `torch.load` those with
    weights_only=False), each read from its byte range and unpickled weights-only. Tensor items DCP already
    loads weights-only; their file and byte range are checked here too."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = check_dcp_metadata(rdir, dcp_dir)
    for index, info in metadata.storage_data.items():
        fqn = getattr(index, "fqn", None)
        f = _dcp_item_file(rdir, dcp_dir, fqn, info)
        if isinstance(metadata.state_dict_metadata.get(fqn), BytesStorageMetadata):
            with open(f, "rb") as fh:
                fh.seek(info.offset)
                _load_weights_only(fh.read(info.length), rdir, f, fqn)


def _weights_only_planner(rdir: Path, dcp_dir: Path):
    """DCP's default load planner with its one unsafe step replaced: non-tensor items are unpickled
    weights-only (DefaultLoadPlanner.load_bytes uses `torch.load(weights_only=False)`)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            fqn = read_item.dest_index.fqn
            obj = _load_weights_only(value.read(), rdir, Path(dcp_dir), fqn)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    return WeightsOnlyLoadPlanner()


def _dcp_load(sd: dict, rdir: Path, dcp_dir: Path) -> None:
    """dcp.load with the weights-only planner; a refusal raised inside it (DCP wraps each rank's exception in
    a CheckpointException, a BaseException) comes out as that refusal."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(sd, checkpoint_id=str(dcp_dir), planner=_weights_only_planner(rdir, dcp_dir))
    except CheckpointException as e:
        failures = [exc for exc, _ in e.failures.values()]
        refused = next((exc for exc in failures if isinstance(exc, BadInput)), None)
        if refused is not None:
            raise refused from None
        first = next(iter(failures), e)
        raise RuntimeError(f"{type(first).__name__}: {first}") from None


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


def save_resume(rdir: Path, model, optimizer, scheduler, scaler, state: dict, cfg: config.TrainConfig, *,
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
        atomic_write_json(rdir / "meta.json", {"step": state["step"], "config": config.to_dict(cfg), "world": world})


def load_resume(rdir: Path, model, optimizer, scheduler, scaler, *, world: int, rank: int) -> dict:
    import copy


    rdir = Path(rdir)
    try:
        if world == 1:
            blob = load_state_file(rdir, rdir / STATE_FILE)
            model.load_state_dict(blob["model"])
            optimizer.load_state_dict(blob["optimizer"])
        else:
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            check_dcp(rdir, rdir / "dcp")
            msd, osd = get_state_dict(model, optimizer)
            sd = {"model": msd, "optimizer": osd}
            _dcp_load(sd, rdir, rdir / "dcp")
            set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
            blob = load_state_file(rdir, rdir / f"rank{rank}.pt")
        scheduler.load_state_dict(blob["scheduler"])
        if scaler is not None and blob["scaler"] is not None:
            scaler.load_state_dict(blob["scaler"])
        _set_rng_state(blob["rng"])
        return copy.deepcopy(blob["state"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a state of another model or format
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise _refuse(rdir, rdir, f"it does not match this model and optimizer: {first}") from None
