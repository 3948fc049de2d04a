"""Speed for the training loop: the same model function run with fewer kernels.

`fuse_activations` swaps activation modules that transformers writes as Python formulas for its own fused module
of the same function. GPT-2's `gelu_new` (and `gelu_fast`, `gelu_accurate`) is
0.5*x*(1 + tanh(sqrt(2/pi)*(x + 0.044715*x^3))) spelt as seven tensor operations, each a pass over the MLP's
widest tensor and each keeping its input for backward; `GELUTanh` is torch's `gelu(approximate="tanh")`, the
same formula in one kernel forward and one backward (transformers' own note on `GELUTanh`: "equivalent to NewGELU
and FastGELU but much faster. However, it is not an exact numerical match due to rounding errors"). The weights,
the config and the saved checkpoint are untouched; a model whose activations are already fused (SiLU in
Llama-style models) is left as it is. The loss and gradients agree to float rounding
(tests/train/test_kernels.py); the speed is measured by bench/train_memory.py.

`compile_blocks` (`--compile`) compiles each transformer block with `torch.compile` in place (regional
compilation: the blocks share one shape, so one block's compilation serves all of them, and the output head's
hook (models/head.py `project_at`) stays outside the compiled code).
"""

from __future__ import annotations

BACKEND = "inductor"  # torch.compile's backend for --compile (tests swap in "aot_eager": the same graphs, no codegen)


def _formula_gelus() -> tuple[type, ...]:
    from transformers import activations as act

    names = ("NewGELUActivation", "FastGELUActivation", "AccurateGELUActivation")
    return tuple(getattr(act, n) for n in names if hasattr(act, n))


def fuse_activations(model) -> int:
    """Replace every tanh-approximation GELU written as a formula with transformers' fused `GELUTanh`; returns
    how many modules were replaced."""
    from transformers.activations import GELUTanh

    slow = _formula_gelus()
    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            python_tanh = isinstance(child, GELUTanh) and getattr(child, "act", None) == child._gelu_tanh_python
            if isinstance(child, slow) or python_tanh:
                swaps.append((parent, name))
    for parent, name in swaps:
        setattr(parent, name, GELUTanh())
    return len(swaps)


def compile_blocks(model) -> int:
    """`torch.compile` each transformer block in place; returns how many."""
    from forgetcheck.train.arms import blocks

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft (lora) wrapper
    layers = blocks(base)
    for block in layers:
        block.compile(backend=BACKEND)
    return len(layers)
