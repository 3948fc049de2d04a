"""Memory planner: what full fine-tuning needs, per component, before anything is loaded (`forgetcheck plan`).

Full fine-tuning with AdamW in fp32 holds 16 bytes per parameter: weights (4), gradients (4) and Adam's two
moments (4 + 4); 7e9 parameters -> 112 GB, 70e9 -> 1,120 GB (decimal GB). Activations come on top and are
estimated from the architecture. Each memory technique changes one term:

  * `--precision bf16-mixed | fp16-mixed`: weights, gradients and optimizer state stay fp32 (master weights);
    activations are stored in 16 bits.
  * `--precision bf16-true`: weights, gradients and Adam moments in bf16 (2 + 2 + 4 bytes/param).
  * `--optim adamw8bit`: each moment is 1 byte plus one fp32 scale per 256-value block (~2.03 bytes/param).
  * `--grad-checkpointing`: per layer only the layer input is kept; one layer's activations are rebuilt at
    a time during backward.
  * `--nproc N` (FSDP2): weights, gradients and optimizer state are split N ways; each device also holds the
    all-gathered parameters of the block it is computing (and the next one, prefetched).

Activations per layer (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", table 2): 34*s*b*h bytes in 16 bits (+5*a*s^2*b when the attention matrix is materialised: eager
attention; SDPA/flash kernels do not keep it), scaled by 2 for fp32 activations. The output head adds the
logits, their fp32 copy for the loss, and its gradient: s*b*V*(e + 4 + 4) bytes. This is an estimate; the
weights + gradients + optimizer rows are exact up to the 8-bit block scales.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgetcheck.config import TrainConfig

GB = 1e9  # decimal, as in "7B model -> 112 GB"
ADAM8BIT_BLOCK = 256  # torchao AdamW8bit / bitsandbytes block size: one fp32 scale per block per moment
COMPONENTS = ("weights", "gradients", "optimizer_state", "activations")


@dataclass(frozen=True)
class Arch:
    """The shape numbers the activation estimate needs."""

    params: int
    layers: int
    hidden: int
    heads: int
    vocab: int
    intermediate: int
    eager_attention: bool = False
    assumed: bool = False  # True when derived from a parameter count alone

    @property
    def block_params(self) -> int:
        """Parameters of one transformer block (attention 4h^2 + MLP 2*h*I, biases ignored)."""
        return 4 * self.hidden * self.hidden + 2 * self.hidden * self.intermediate


def arch_from_params(params: float) -> Arch:
    """A plausible decoder shape for a bare parameter count: 12*L*h^2 = params with L = h/128 (GPT-3 /
    Llama-like aspect ratio), h rounded to a multiple of 128, vocab 32k. Marked `assumed`."""
    params = int(params)
    hidden = max(128, round((params * 128 / 12) ** (1 / 3) / 128) * 128)
    layers = max(1, round(params / (12 * hidden * hidden)))
    return Arch(params=params, layers=layers, hidden=hidden, heads=max(1, hidden // 128), vocab=32_000,
                intermediate=4 * hidden, assumed=True)


def arch_from_hf_config(config, params: int | None = None) -> Arch:
    """Shape numbers from a transformers config (GPT-2 names or Llama names); parameters counted exactly by
    building the model on the meta device when not given."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    hidden = d.get("hidden_size") or d.get("n_embd") or d.get("d_model")
    layers = d.get("num_hidden_layers") or d.get("n_layer") or d.get("num_layers")
    heads = d.get("num_attention_heads") or d.get("n_head")
    vocab = d.get("vocab_size")
    inter = d.get("intermediate_size") or d.get("n_inner") or d.get("ffn_dim") or 4 * hidden
    if params is None:
        params = count_params_meta(config)
    attn = getattr(config, "_attn_implementation", None) or d.get("_attn_implementation") or "sdpa"
    return Arch(params=int(params), layers=int(layers), hidden=int(hidden), heads=int(heads), vocab=int(vocab),
                intermediate=int(inter), eager_attention=(attn == "eager"))


def count_params_meta(config) -> int:
    """Exact trainable parameter count (tied weights once), without allocating memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def arch_for_base(base: str) -> Arch:
    """Resolve `--base` (alias, folder, .gguf, hub id) and read its architecture."""
    from transformers import AutoConfig

    from forgetcheck.models import registry

    ref = registry.resolve(base)
    return arch_from_hf_config(AutoConfig.from_pretrained(ref.path))


# ---- input checks ----------------------------------------------------------------------------------------

MAX_PARAMS = 1e15


def check_inputs(params: float | None, cfg: TrainConfig) -> None:
    """Every problem with `forgetcheck plan`'s own flags at once (BadInput naming each flag): a finite,
    positive parameter count and positive shapes. Only plan's flags are named (it has no --budget-tokens)."""
    from forgetcheck.config import OPTIMIZERS, PRECISIONS, check

    problems = []
    if params is not None and not (math.isfinite(params) and 1 <= params <= MAX_PARAMS):
        problems.append(f"--params must be a finite positive parameter count such as 7e9, at most {MAX_PARAMS:g} "
                        f"(got {params})")
    for flag, value, low in (("--micro-batch", cfg.micro_batch, 1), ("--seq-len", cfg.seq_len, 1),
                             ("--nproc", cfg.nproc, 1)):
        if value < low:
            problems.append(f"{flag} must be at least {low} (got {value})")
    if cfg.precision not in PRECISIONS:
        problems.append(f"unknown --precision '{cfg.precision}': choose one of {', '.join(PRECISIONS)}")
    if cfg.optim not in OPTIMIZERS:
        problems.append(f"unknown --optim '{cfg.optim}': choose one of {', '.join(OPTIMIZERS)}")
    check(problems)


# ---- the flags against the model ---------------------------------------------------------------------------

def model_problems(model_path: str, cfg: TrainConfig, arms: tuple[str, ...], device: str) -> list[str]:
    """Every problem of the training flags that only the model's config reveals, found before any stage runs
    (otherwise an arm fails after the base evaluation): the frozen blocks exist, --seq-len fits the model's
    positions, and each trained arm's memory plan fits `device` (unless --force)."""
    from transformers import AutoConfig

    from forgetcheck.config import ARM_DATA
    from forgetcheck.errors import BadInput

    hf = AutoConfig.from_pretrained(model_path)
    arch = arch_from_hf_config(hf)
    problems = []
    if "freeze" in arms and cfg.freeze_layers is not None and cfg.freeze_layers > arch.layers:
        problems.append(f"--freeze-layers {cfg.freeze_layers} but the model has only {arch.layers} blocks: use at "
                        f"most {arch.layers}")
    positions = _positions(hf)
    if positions is not None and cfg.seq_len > positions:
        problems.append(f"--seq-len {cfg.seq_len} is beyond the model's {positions} positions: use --seq-len "
                        f"{positions} or less")
    if problems:
        return problems
    for arm in (a for a in arms if a in ARM_DATA):
        try:
            check_fits(plan_memory(arch, cfg, arm=arm, hf_config=hf), device, cfg.force)
        except BadInput as e:
            return [f"arm '{arm}': {e}"]
    return problems


def _positions(hf_config) -> int | None:
    """The longest sequence the model's position table holds (None when it declares none)."""
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(hf_config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


# ---- the plan ------------------------------------------------------------------------------------------

def _bytes_per_param(cfg: TrainConfig) -> dict[str, float]:
    true16 = cfg.precision == "bf16-true"
    w = 2 if true16 else 4
    if cfg.optim == "adamw8bit":
        opt = 2 * (1 + 4 / ADAM8BIT_BLOCK)
    else:
        opt = 2 * w  # moments follow the parameter dtype
    return {"weights": w, "gradients": w, "optimizer_state": opt}


def activation_bytes(arch: Arch, cfg: TrainConfig) -> int:
    """Estimated activation memory of one micro-batch (see the module docstring)."""
    s, b, h, a = cfg.seq_len, cfg.micro_batch, arch.hidden, arch.heads
    e = 4 if cfg.precision == "fp32" else 2
    per_layer = 34 * s * b * h * e / 2
    if arch.eager_attention:
        per_layer += 5 * a * s * s * b * e / 2
    if cfg.grad_checkpointing:
        layers = arch.layers * s * b * h * e + per_layer  # kept layer inputs + one layer rebuilt
    else:
        layers = arch.layers * per_layer
    head = s * b * arch.vocab * (e + 4 + 4 if e == 2 else 8)
    return int(layers + head)


def plan_memory(config_or_params: Any, cfg: TrainConfig, *, arm: str | None = None, hf_config=None) -> dict:
    """Memory plan, in bytes per component. `config_or_params`: a transformers config, an `Arch`, or a
    parameter count (then the architecture is assumed, see `arch_from_params`).

    `arm` (with the transformers config, `hf_config` or `config_or_params`) plans a mitigation arm (train/arms.py):
    `lora` holds the base weights plus the adapters, and gradients and optimizer state for the adapters only;
    `freeze` holds gradients and optimizer state for the unfrozen parameters only. Activations are planned as
    for full fine-tuning in both (gradients flow down to the adapters of the first block / to the embeddings)."""
    if isinstance(config_or_params, Arch):
        arch = config_or_params
    elif isinstance(config_or_params, (int, float)):
        arch = arch_from_params(config_or_params)
    else:
        arch = arch_from_hf_config(config_or_params)
    n = cfg.nproc
    bpp = _bytes_per_param(cfg)
    trainable, extra = arch.params, 0
    if arm in ("lora", "freeze"):
        from forgetcheck.train.arms import trainable_count

        hf = hf_config if hf_config is not None else config_or_params
        trainable, extra = trainable_count(hf, arm, cfg)
    total = {"weights": int(round((arch.params + extra) * bpp["weights"])),
             "gradients": int(round(trainable * bpp["gradients"])),
             "optimizer_state": int(round(trainable * bpp["optimizer_state"]))}
    total["activations"] = activation_bytes(arch, cfg) * n  # every device runs its own micro-batch
    per_device = {k: int(math.ceil(total[k] / n)) for k in ("weights", "gradients", "optimizer_state")}
    per_device["activations"] = activation_bytes(arch, cfg)
    if n > 1:  # FSDP2: the all-gathered block being computed and the prefetched next one
        per_device["gathered_blocks"] = int(2 * arch.block_params * bpp["weights"])
    return {
        "params": arch.params,
        "arm": arm, "trainable_params": trainable, "added_params": extra,
        "arch": {"layers": arch.layers, "hidden": arch.hidden, "heads": arch.heads, "vocab": arch.vocab,
                 "intermediate": arch.intermediate, "eager_attention": arch.eager_attention,
                 "assumed": arch.assumed},
        "settings": {"precision": cfg.precision, "optim": cfg.optim, "grad_checkpointing": cfg.grad_checkpointing,
                     "nproc": n, "micro_batch": cfg.micro_batch, "seq_len": cfg.seq_len},
        "bytes_per_param": bpp,
        "components": total,
        "total": sum(total.values()),
        "per_device": per_device,
        "per_device_total": sum(per_device.values()),
        "states_bytes": total["weights"] + total["gradients"] + total["optimizer_state"],
    }


def baseline(cfg: TrainConfig) -> TrainConfig:
    """The same shapes with no memory technique: fp32, AdamW, no checkpointing, one device."""
    from dataclasses import replace

    return replace(cfg, precision="fp32", optim="adamw", grad_checkpointing=False, nproc=1)


def _gb(x: float) -> str:
    return f"{x / GB:,.2f} GB" if x < 100 * GB else f"{x / GB:,.0f} GB"


def format_plan(plan: dict, base_plan: dict | None = None) -> str:
    """A text table: one row per component; columns for the baseline (when given) and this plan."""
    s = plan["settings"]
    a = plan["arch"]
    head = (f"{plan['params'] / 1e6:,.1f}M parameters; {a['layers']} layers, hidden {a['hidden']}, "
            f"{a['heads']} heads, vocab {a['vocab']}" + (" (shape assumed from the parameter count)" if a["assumed"] else ""))
    label = (f"{s['precision']}, {s['optim']}" + (", grad-ckpt" if s["grad_checkpointing"] else "")
             + (f", nproc {s['nproc']}" if s["nproc"] > 1 else ""))
    cols = [("baseline (fp32, adamw)", base_plan)] if base_plan is not None else []
    cols.append((f"this plan ({label})", plan))
    w0 = 22
    widths = [max(len(c[0]), 14) for c in cols]
    lines = [head, f"micro-batch {s['micro_batch']} x seq-len {s['seq_len']}", ""]
    lines.append(f"{'component':<{w0}}" + "".join(f"  {c[0]:>{w}}" for c, w in zip(cols, widths)))
    rows = [(k.replace("_", " "), lambda p, k=k: p["components"][k]) for k in COMPONENTS[:3]]
    rows.append(("weights+grads+optim", lambda p: p["states_bytes"]))
    rows.append(("activations", lambda p: p["components"]["activations"]))
    rows.append(("total", lambda p: p["total"]))
    rows.append(("per device", lambda p: p["per_device_total"]))
    for name, get in rows:
        lines.append(f"{name:<{w0}}" + "".join(f"  {_gb(get(c[1])):>{w}}" for c, w in zip(cols, widths)))
    bpp = plan["bytes_per_param"]
    lines.append("")
    lines.append(f"bytes/param (weights + gradients + optimizer state): "
                 f"{bpp['weights']:g} + {bpp['gradients']:g} + {bpp['optimizer_state']:.2f} = "
                 f"{sum(bpp.values()):.2f}; activations are an estimate (Korthikanti et al. 2022)")
    return "\n".join(lines)


# ---- does it fit? --------------------------------------------------------------------------------------

def device_capacity(device: str) -> tuple[int | None, str]:
    """(bytes available for training on `device`, where the figure comes from)."""
    if device.startswith("cuda"):
        import torch

        idx = int(device.split(":")[1]) if ":" in device else 0
        return int(torch.cuda.get_device_properties(idx).total_memory), "GPU total memory"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "MemAvailable from /proc/meminfo"
    except OSError:
        pass
    return None, "unknown (no /proc/meminfo)"


def check_fits(plan: dict, device: str, force: bool) -> str:
    """Raise BadInput when the plan needs more than the device has (unless `force`); return a one-line verdict.
    On CPU every process of `--nproc` shares the same RAM, so the sum over devices must fit."""
    from forgetcheck.errors import BadInput

    cap, source = device_capacity(device)
    need = plan["per_device_total"] * (plan["settings"]["nproc"] if not device.startswith("cuda") else 1)
    if cap is None:
        return f"plan needs {_gb(need)}; capacity unknown ({source})"
    verdict = f"plan needs {_gb(need)} of {_gb(cap)} ({source})"
    if need > cap and not force:
        raise BadInput(f"{verdict}: it does not fit. Try --grad-checkpointing, --optim adamw8bit, "
                       f"--precision bf16-mixed, a smaller --micro-batch with more --grad-accum, more --nproc, "
                       f"or --force to start anyway")
    return verdict + (" -- does NOT fit, started because of --force" if need > cap else "")
