"""torchao's 8-bit AdamW with its quantizing step made constant-time per value.

torchao's `AdamW8bit` keeps each Adam moment as uint8 codes into a 256-entry dynamic map (signed for the first
moment, unsigned for the second) with one fp32 scale per 256-value block. After each update it re-quantizes the
moments by a branchless binary search: eight dependent gathers from the map, then a rounding check. On CPU that
search is most of a training step (bench/adamw8bit_step.py; docs/train_memory.md, "The 8-bit optimizer step").

`AdamW8bit` here is torchao's optimizer, same state objects (`OptimState8bit`: codes, scales, map), so
checkpoints, `optimizer_state_bytes` and FSDP2's DTensor states are unchanged. Only the update of a quantized
parameter is replaced: one compiled function (`_update`) that dequantizes, applies torchao's own AdamW arithmetic
in the same order, and re-quantizes with a lookup instead of the search:

* `code_table(qmap)`: for every value of a float32's top 16 bits (sign, exponent, 7 mantissa bits) the code
  torchao's search gives at the low end of that bit range, and the one value in the range (if any) from which it
  gives the next code. Both are found by running torchao's own `quantize_8bit_with_qmap` on the range ends and
  bisecting on the bit patterns, so the lookup `base[key] + (x >= threshold[key])` returns torchao's code for
  every float32, exactly. Building it checks that no 16-bit range holds two code changes (true for the maps'
  spacing: the narrowest step of the 8-bit maps is wider than a 7-mantissa-bit range at the same magnitude).

Parameters whose state torchao keeps unquantized (fewer than 4096 values, or not a multiple of the block size)
take torchao's own compiled step, as before.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torchao.optim import AdamW8bit as _TorchaoAdamW8bit
from torchao.optim.adam import single_param_adam
from torchao.optim.quant_utils import quantize_8bit_with_qmap
from torchao.optim.subclass_8bit import OptimState8bit

KEY_BITS = 16  # a float32's top bits that index the code table: sign, 8 exponent bits, 7 mantissa bits
_SHIFT = 32 - KEY_BITS
_RANGE = (1 << _SHIFT) - 1  # float32 bit patterns that share one key


def _as_float(bits: Tensor) -> Tensor:
    return bits.to(torch.int32).view(torch.float32)


def code_table(qmap: Tensor) -> tuple[Tensor, Tensor]:
    """(base, threshold), each of 2**KEY_BITS entries: torchao's code for a float32 x is
    `base[key] + (x >= threshold[key])` with key = x's top KEY_BITS bits. Built on the CPU from torchao's own
    quantizer (see the module docstring)."""
    qmap = qmap.detach().float().cpu()
    keys = torch.arange(1 << KEY_BITS, dtype=torch.int64)
    low, high = keys << _SHIFT, (keys << _SHIFT) | _RANGE
    negative = keys >= (1 << (KEY_BITS - 1))  # sign bit set: larger bit patterns are smaller values
    first = torch.where(negative, high, low)  # the range's smallest value, as bits
    toward = torch.where(negative, -1, 1)  # bit step toward larger values

    def code(bits: Tensor) -> Tensor:
        return quantize_8bit_with_qmap(_as_float(bits), qmap).to(torch.int32)

    def at(offset: Tensor) -> Tensor:  # the range's value `offset` steps up from its smallest
        return first + toward * offset

    last = at(torch.full_like(keys, _RANGE))  # the range's largest value, as bits
    base, top = code(first), code(last)
    finite = torch.isfinite(_as_float(first)) & torch.isfinite(_as_float(last))
    step = (top - base)[finite]
    if not bool(((step == 0) | (step == 1)).all()):
        raise ValueError("code_table: this code map changes code twice within one float32 key range; "
                         "its lookup would not be exact")
    lo, hi = torch.zeros_like(keys), torch.full_like(keys, _RANGE)  # code(at(lo)) == base, code(at(hi)) == top
    for _ in range(_SHIFT + 1):
        mid = (lo + hi) // 2
        up = code(at(mid)) >= top
        hi, lo = torch.where(up, mid, hi), torch.where(up, lo, mid)
    threshold = torch.where(finite & (top > base), _as_float(at(hi)), torch.tensor(float("inf")))
    return base, threshold


def quantize(x: Tensor, base: Tensor, threshold: Tensor) -> Tensor:
    """uint8 codes of float32 `x` (already scaled into the map's range): torchao's `quantize_8bit_with_qmap`,
    by table lookup."""
    key = (x.view(torch.int32) >> _SHIFT) & ((1 << KEY_BITS) - 1)
    return (base[key] + (x >= threshold[key]).to(torch.int32)).to(torch.uint8)


def _update(p: Tensor, grad: Tensor, step: Tensor, m_codes: Tensor, m_scale: Tensor, m_qmap: Tensor,
            m_base: Tensor, m_threshold: Tensor, v_codes: Tensor, v_scale: Tensor, v_qmap: Tensor,
            v_base: Tensor, v_threshold: Tensor, lr: Tensor, beta1: float, beta2: float, weight_decay: float,
            eps: float) -> None:
    """torchao's `single_param_adam` (AdamW, no amsgrad, no stochastic rounding) on one parameter with quantized
    moments, the same operations in the same order, re-quantizing by `quantize`."""
    block = m_codes.numel() // m_scale.numel()
    p_f32 = p.float()
    grad_f32 = grad.float()
    p_f32 = p_f32 - lr * weight_decay * p_f32
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step

    def dequantize(codes: Tensor, scale: Tensor, qmap: Tensor) -> Tensor:
        return (qmap[codes.int()].view(-1, block) * scale.view(-1, 1)).view(codes.shape)

    exp_avg = dequantize(m_codes, m_scale, m_qmap).lerp(grad_f32, 1 - beta1)
    exp_avg_sq = dequantize(v_codes, v_scale, v_qmap).lerp(grad_f32.square(), 1 - beta2)
    for value, codes, scale, base, threshold in ((exp_avg, m_codes, m_scale, m_base, m_threshold),
                                                 (exp_avg_sq, v_codes, v_scale, v_base, v_threshold)):
        blocks = value.view(-1, block)
        new_scale = blocks.abs().amax(-1).clip(1e-12)  # torchao's scale_tensor
        codes.copy_(quantize((blocks / new_scale.view(-1, 1)).view(-1), base, threshold).view(codes.shape))
        scale.copy_(new_scale)
    denom = (exp_avg_sq.sqrt() / bias_correction2.sqrt()) + eps
    p.copy_(p_f32 - lr * (exp_avg / bias_correction1) / denom)


@functools.cache
def _compiled(fn):
    # compiled once per function; torch.compile specialises it per parameter shape, as torchao's step does
    return torch.compile(fn, fullgraph=True, dynamic=False)


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t  # FSDP2's DTensor: this rank's shard


class AdamW8bit(_TorchaoAdamW8bit):
    """torchao's `AdamW8bit` (same arguments, same state) whose quantized parameters update through `_update`.
    `amsgrad` and `bf16_stochastic_round` are refused (forgetcheck uses neither)."""

    def __init__(self, params, *args, **kwargs) -> None:
        if kwargs.get("amsgrad") or kwargs.get("bf16_stochastic_round"):
            raise ValueError("forgetcheck's AdamW8bit takes neither amsgrad nor bf16_stochastic_round")
        super().__init__(params, *args, **kwargs)
        self._tables: dict[tuple[bool, torch.device], tuple[Tensor, Tensor]] = {}

    def _table(self, state: OptimState8bit) -> tuple[Tensor, Tensor]:
        key = (state.signed, state.qmap.device)
        if key not in self._tables:
            self._tables[key] = tuple(t.to(state.qmap.device) for t in code_table(state.qmap))
        return self._tables[key]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch._dynamo.utils.disable_cache_limit():  # as torchao: one compile per parameter shape, bounded
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if not state:
                        state["step"] = torch.tensor(0.0)
                        state["exp_avg"] = self._new_buffer(p, True)
                        state["exp_avg_sq"] = self._new_buffer(p, False)
                    state["step"] += 1
                    m, v = _local(state["exp_avg"]), _local(state["exp_avg_sq"])
                    beta1, beta2 = group["betas"]
                    if isinstance(m, OptimState8bit) and isinstance(v, OptimState8bit):
                        _compiled(_update)(_local(p.detach()), _local(p.grad), state["step"],
                                           m.codes, m.scale, m.qmap, *self._table(m),
                                           v.codes, v.scale, v.qmap, *self._table(v),
                                           group["lr"], beta1, beta2, group["weight_decay"], group["eps"])
                    else:
                        _compiled(single_param_adam)(p.detach(), p.grad, state["step"], state["exp_avg"],
                                                     state["exp_avg_sq"], None, group["lr"], beta1, beta2,
                                                     group["weight_decay"], group["eps"], True, False)
        return loss
