"""Optimizer and learning-rate schedule: AdamW (torch) or 8-bit AdamW (torchao, else bitsandbytes).

8-bit AdamW keeps each Adam moment as 1-byte codes plus one fp32 scale per 256-value block: ~2.03 bytes per
parameter of state instead of 8. torchao's `AdamW8bit` is preferred: it also works on FSDP2's DTensor
parameters; bitsandbytes' does not, so that combination is refused before training starts. forgetcheck runs
torchao's optimizer with its re-quantization by table lookup instead of a search (train/adamw8bit.py): the same
states and codes, a faster step on CPU (bench/adamw8bit_step.py).
"""

from __future__ import annotations

import importlib.util
import math

from forgetcheck.config import TrainConfig
from forgetcheck.errors import BadInput

INSTALL_8BIT = "torchao is a default dependency of forgetcheck: `pip install torchao` (or `make install`)"


def eightbit_backend() -> str | None:
    """'torchao' or 'bitsandbytes' (the first importable), or None."""
    for name in ("torchao", "bitsandbytes"):
        if importlib.util.find_spec(name) is not None:
            return name
    return None


def check_combination(cfg: TrainConfig, device: str, per_node: int | None = None) -> list[str]:
    """Problems with a combination of techniques that cannot work, each naming the alternative. `per_node`:
    processes on this machine (cfg.nproc on one node; fewer when --nproc spans several nodes)."""
    import os

    if per_node is None:  # under torchrun, the launcher says how many processes this node runs
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", cfg.nproc))
    problems = []
    if cfg.optim == "adamw8bit":
        backend = eightbit_backend()
        if backend is None:
            problems.append(f"--optim adamw8bit needs torchao or bitsandbytes, neither is installed: {INSTALL_8BIT}, "
                            "or use --optim adamw")
        elif backend == "bitsandbytes" and cfg.nproc > 1:
            problems.append("--optim adamw8bit with --nproc > 1: bitsandbytes' 8-bit AdamW fails on FSDP2's DTensor "
                            f"parameters; {INSTALL_8BIT}, or use --nproc 1 or --optim adamw")
    if cfg.precision == "fp16-mixed" and not device.startswith("cuda"):
        problems.append("--precision fp16-mixed needs a CUDA device (no fp16 autocast on CPU): use bf16-mixed")
    if per_node > 1 and device.startswith("cuda"):
        import torch

        if torch.cuda.device_count() < per_node:
            problems.append(f"{per_node} processes on this node but only {torch.cuda.device_count()} CUDA device(s): "
                            f"use --nproc {max(1, torch.cuda.device_count())} per node")
    return problems


def build_optimizer(params, cfg: TrainConfig):
    """AdamW with the config's lr and weight decay, in the state format `cfg.optim` asks for."""
    import torch

    kw = dict(lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=cfg.weight_decay)
    if cfg.optim == "adamw":
        params = list(params)
        if not any(hasattr(p, "to_local") for p in params):  # no DTensor (FSDP2) parameter
            # torch's fused kernel: one pass over each tensor where foreach makes several, so the optimizer
            # step stops dominating a small model's training step (measured: docs/train_memory.md, "The
            # optimizer step"; bench/train_head.py). FSDP2's DTensor parameters keep foreach, as does any
            # device or dtype the fused kernel refuses.
            try:
                return torch.optim.AdamW(params, fused=True, **kw)
            except (RuntimeError, ValueError):
                pass
        return torch.optim.AdamW(params, foreach=True, **kw)
    backend = eightbit_backend()
    if backend == "torchao":
        # torchao's optimizer and states, its step compiled once per parameter shape (train/adamw8bit.py). Under
        # FSDP2 `sharding.launch` turns inductor's caches off (TORCHINDUCTOR_FX_GRAPH_CACHE=0
        # TORCHINDUCTOR_AUTOGRAD_CACHE=0): they mishandle DTensor states.
        from forgetcheck.train.adamw8bit import AdamW8bit

        return AdamW8bit(params, **kw)
    if backend == "bitsandbytes":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kw)
    raise BadInput(f"--optim adamw8bit needs torchao or bitsandbytes: {INSTALL_8BIT}, or use --optim adamw")


def optimizer_state_bytes(optimizer) -> int:
    """Bytes held by the optimizer's per-parameter state (8-bit codes, scales and code maps included)."""
    import torch

    def tensor_bytes(t) -> int:
        if hasattr(t, "to_local"):  # DTensor (FSDP2): this rank's shard
            t = t.to_local()
        if hasattr(t, "__tensor_flatten__"):  # tensor subclasses (torchao OptimState8bit): their inner tensors
            names, _ = t.__tensor_flatten__()
            inner = [getattr(t, n) for n in names]
            return sum(tensor_bytes(x) for x in inner if isinstance(x, torch.Tensor))
        return t.numel() * t.element_size()

    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                total += tensor_bytes(v)
    return total


def lr_lambda(total_steps: int, cfg: TrainConfig):
    """Multiplier of cfg.lr at optimizer step `i` (0-based): linear warmup over warmup_frac of the steps,
    then cosine decay to min_lr_ratio."""
    warmup = int(cfg.warmup_frac * total_steps)

    def f(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        progress = (i - warmup) / max(1, total_steps - warmup - 1)
        progress = min(1.0, progress)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f
