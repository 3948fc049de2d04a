"""Device and dtype are chosen once, here, and say why. Peak memory is measured here too."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from forgetcheck.config import check, validate_device
from forgetcheck.errors import BadInput


@dataclass(frozen=True)
class DeviceChoice:
    device: str
    reason: str

    def describe(self) -> str:
        return f"device {self.device} ({self.reason})"


def choose_device(requested: str = "auto") -> DeviceChoice:
    check(validate_device(requested))
    import torch

    if requested == "auto":
        if torch.cuda.is_available():
            return DeviceChoice("cuda", f"CUDA available: {torch.cuda.get_device_name(0)}")
        return DeviceChoice("cpu", "no CUDA device found")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BadInput(f"--device {requested} asked for, but torch sees no CUDA device: use --device cpu or auto")
        return DeviceChoice(requested, "asked for with --device")
    return DeviceChoice("cpu", "asked for with --device")


@dataclass(frozen=True)
class DtypeChoice:
    param_dtype: str  # dtype the weights are stored in during training
    autocast_dtype: str | None  # dtype of autocast regions, None for no autocast
    reason: str


def choose_precision(precision: str, device: str) -> DtypeChoice:
    """Map --precision to (weight dtype, autocast dtype), refusing what the device cannot do, with the fix."""
    import torch

    is_cuda = device.startswith("cuda")
    if precision == "fp32":
        return DtypeChoice("float32", None, "fp32 weights, gradients and optimizer state")
    if precision in ("bf16-mixed", "bf16-true") and is_cuda and not torch.cuda.is_bf16_supported():
        raise BadInput(f"--precision {precision}: this GPU has no bf16 support; use fp16-mixed or fp32")
    slow = "" if is_cuda else _slow_cpu_bf16()
    if precision == "bf16-mixed":
        return DtypeChoice("float32", "bfloat16", "bf16 autocast with fp32 master weights" + slow)
    if precision == "fp16-mixed":
        if not is_cuda:
            raise BadInput("--precision fp16-mixed needs a CUDA device (fp16 autocast on CPU is not supported): use bf16-mixed on CPU")
        return DtypeChoice("float32", "float16", "fp16 autocast with fp32 master weights and a loss scaler")
    if precision == "bf16-true":
        return DtypeChoice("bfloat16", None, "pure bf16 weights: WARNING small updates are lost (use bf16-mixed to "
                                             "keep them)" + slow)
    raise BadInput(f"unknown --precision '{precision}'")


def _slow_cpu_bf16() -> str:
    """A note when this CPU has no bf16 matrix instructions that torch uses (oneDNN needs AVX-512 or AMX): its bf16
    matmuls then run a generic kernel, several times slower than fp32 (a GPT-2 124M step with 8-bit AdamW took 59 s
    in bf16-mixed with checkpointing against 2.3 s in fp32 on a 2-core AVX2 machine: docs/train_memory.md). Empty
    where bf16 is fast."""
    import torch

    try:
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return ""
    except (AttributeError, RuntimeError):
        return ""
    return (f"; NOTE this CPU (torch capability {torch.backends.cpu.get_cpu_capability()}) has no bf16 matrix "
            "instructions torch uses: bf16 matmuls run a generic kernel, several times slower than fp32 "
            "(--precision fp32 trains faster here)")


# ---- peak memory -------------------------------------------------------------------------------------
# GPU: torch.cuda.max_memory_allocated after reset_peak_memory_stats.
# CPU: torch keeps no allocator stats, so we read the process's peak resident set size (VmHWM in
# /proc/self/status) after resetting it by writing "5" to /proc/self/clear_refs (Linux). This is the whole
# process (Python, libraries, data), so it is an upper bound on what the tensors need.

_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _vm_kib(field_name: str) -> int | None:
    try:
        text = _PROC_STATUS.read_text()
    except OSError:
        return None
    m = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


def reset_peak_memory(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        pass


def peak_memory_bytes(device: str) -> tuple[int | None, str]:
    """(peak bytes since the last reset, how it was measured)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated()), "torch.cuda.max_memory_allocated"
    kib = _vm_kib("VmHWM")
    return (kib * 1024 if kib is not None else None), "peak RSS (VmHWM from /proc/self/status after clear_refs=5)"


def current_rss_bytes() -> int | None:
    kib = _vm_kib("VmRSS")
    return kib * 1024 if kib is not None else None
