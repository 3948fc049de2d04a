"""Memory planner: what full fine-tuning needs, per component, before anything is loaded (`forgetcheck plan`).

Full fine-tuning with AdamW in fp32 holds 16 bytes per parameter: weights (4), gradients (4) and Adam's two
moments (4 + 4); 7e9 parameters -> 112 GB, 70e9 -> 1,120 GB (decimal GB). Activations come on top and are
estimated from the architecture. Each memory technique changes one term:

  * `--precision bf16-mixed | fp16-mixed`: weights, gradients and optimizer state stay fp32 (master weights);
    activations are stored in 16 bits.
  * `--precision bf16-true`: weights, gradients and Adam moments in bf16 (2 + 2 + 4 bytes/param).
  * `--optim adamw8bit`: each moment is 1 byte plus one fp32 scale per 256-value block (~2.03 bytes/param).
  * `--grad-checkpointing`: per layer only the layer input is kept; one layer's activations are rebuilt at
    a time during backward (with the layer's 16-bit weight copies under autocast).
  * `--nproc N` (FSDP2): weights, gradients and optimizer state are split N ways; each device also holds the
    all-gathered parameters of the block it is computing (and the next one, prefetched).

Activations are the bytes autograd saves for backward, derived op by op from what each op keeps and held to
within 15% of an exact measurement (forgetcheck/train/activations.py, which counts the saved storages through
saved-tensor hooks; tests/train/test_activations.py, bench/activation_plan.py). Per layer and token, with r = 4
bytes for the residual stream and norms (fp32 also under autocast), e = 4 (fp32) or 2 (16-bit) for what the
matmuls see, h hidden, a heads, kv key/value heads, I the MLP width:

  * each norm: r*h input + its statistics (LayerNorm: mean, rstd; RMSNorm: rsqrt and the fp32 normalised x, 4*h)
    + its output as matmul input, e*h, once per consuming projection under autocast (Linear casts its own input);
  * attention, by the kernel taken (`attention_path`): fused SDPA/flash keeps q, k, v (k and v with kv heads) and
    its output, e*h*(2 + 2*kv/a), + an fp32 logsumexp per head; eager keeps q, k^T, v for every head, the output,
    and the a*s probabilities per token (4 bytes in fp32, 4 + 2 under 16 bits); SDPA's math kernel (fp32 grouped-
    query attention on CUDA) keeps fp32 q, k, v and fp32 probabilities;
  * MLP: plain 2*e*I (the activation's input and output), gated 4*e*I (gate, up, act(gate), act*up); the loop
    runs GPT-2's tanh GELU fused (train/kernels.py), so it keeps only its input as well;
  * autocast's 16-bit weight copies: 2 bytes per block weight (kept until backward) and for the head.

The head keeps the final norm's input, and at the label positions only (models/head.py `project_at`) its input and
the fp32 log-softmax of the logits, 4*V bytes a position. `--grad-checkpointing` keeps each block's input (r*h per
token) and rebuilds one block at a time. The plan's total is tensors only; `overhead` states what a measured peak
adds (the process's runtime on CPU, the loss's backward temporaries on CUDA) and how the figure was had.
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
    """The shape numbers the activation estimate needs. The defaults describe a GPT-2-style block (LayerNorm, one
    fused q/k/v projection, a plain 4h MLP); `arch_from_hf_config` reads the rest from the model's config."""

    params: int
    layers: int
    hidden: int
    heads: int
    vocab: int
    intermediate: int
    attention: str = "sdpa"  # the config's attn_implementation: "sdpa", "eager", "flash_attention_2", ...
    assumed: bool = False  # True when derived from a parameter count alone
    kv_heads: int = 0  # key/value heads (grouped-query attention); 0: as many as `heads`
    gated_mlp: bool = False  # Llama's act(gate(x)) * up(x) -> down, three projections of width `intermediate`
    norm: str = "layernorm"  # "layernorm" (keeps mean and rstd) or "rmsnorm" (keeps rsqrt and the normalised x)
    fused_qkv: bool = True  # one q/k/v projection (GPT-2's c_attn) rather than three (Llama's q/k/v_proj)
    rotary: bool = False  # rotary position embeddings (cos/sin held once, shared by every layer)
    learned_positions: bool = True  # a position embedding table (its position ids are kept)

    @property
    def kv(self) -> int:
        return self.kv_heads or self.heads

    @property
    def eager_attention(self) -> bool:
        return self.attention == "eager"

    @property
    def block_params(self) -> int:
        """Parameters of one transformer block's projections (biases and norms ignored): q and o (h^2 each), k and
        v (h^2 * kv/heads each), and the MLP (2 or, gated, 3 matrices of h * I)."""
        h = self.hidden
        attn = 2 * h * h + 2 * h * (h * self.kv // self.heads)
        return attn + (3 if self.gated_mlp else 2) * h * self.intermediate


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
    gpt2_names = "n_embd" in d  # GPT-2's block: LayerNorm, fused c_attn, plain MLP, learned positions
    rotary = not gpt2_names and ("rope_theta" in d or "rope_parameters" in d or "rope_scaling" in d)
    return Arch(params=int(params), layers=int(layers), hidden=int(hidden), heads=int(heads), vocab=int(vocab),
                intermediate=int(inter), attention=str(attn),
                kv_heads=int(d.get("num_key_value_heads") or heads),
                gated_mlp=not gpt2_names and d.get("model_type") not in _PLAIN_MLP,
                norm="layernorm" if gpt2_names or "layer_norm_epsilon" in d or "layer_norm_eps" in d else "rmsnorm",
                fused_qkv=gpt2_names, rotary=rotary, learned_positions=not rotary)


_PLAIN_MLP = ("gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "starcoder2", "gpt_bigcode")


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
            check_fits(plan_memory(arch, cfg, arm=arm, hf_config=hf, device=device), device, cfg.force)
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


ATTENTION_PATHS = ("fused", "eager", "math")


def attention_path(arch: Arch, precision: str, device: str | None = None) -> str:
    """Which attention kernel a training forward takes, by what it keeps for backward:

    * "eager": the model's own matmul/softmax; the [b, heads, s, s] probabilities are kept.
    * "math": torch SDPA's math kernel, the same matrices (in fp32: it upcasts 16-bit inputs).
    * "fused": SDPA's flash / memory-efficient / cuDNN kernels (or a flash_attention_* implementation); only the
      output and a per-row logsumexp are kept, the s^2 matrix is recomputed in backward.

    transformers calls SDPA with `enable_gqa=True` for a grouped-query model (no padding mask, head dim <= 256:
    transformers/integrations/sdpa_attention.py `use_gqa_in_sdpa`). On CUDA, flash and cuDNN take only fp16/bf16
    and the memory-efficient kernel rejects key/value with fewer heads than the query
    (`check_batch_size_and_num_heads_dense<false /*supports_grouped_query_attention*/>` in torch's
    aten/src/ATen/native/transformers/cuda/sdp_utils.cpp): fp32 + GQA falls to math (docs/gpu.md). On the CPU
    (torch 2.13) the flash kernel takes fp32 and bf16 with GQA: fused (measured, tests/train/test_activations.py).
    `device` None keeps the planner's old reading: SDPA is fused."""
    impl = arch.attention
    if impl == "eager":
        return "eager"
    if impl != "sdpa":
        return "fused"  # flash_attention_2/3, flex: no s^2 kept
    if device is not None and str(device).startswith("cuda") and precision == "fp32" and arch.kv < arch.heads:
        return "math"
    return "fused"


def _activation_terms(arch: Arch, cfg: TrainConfig, device: str | None = None) -> dict[str, float]:
    """Bytes autograd saves for backward in one micro-batch, per term (see `activation_bytes`). Each term is what
    the ops keep, measured op by op with forgetcheck/train/activations.py on GPT-2 and Llama blocks:

      r: the residual stream and the norms' inputs, fp32 under autocast (4; 2 in bf16-true).
      e: what the matmuls see: 4 in fp32, 2 in 16 bits. Under autocast every Linear casts its fp32 input itself
         (autocast caches casts of weights only), so a norm output feeding three projections is kept three times.
    """
    s, b, h, a, kv, inter, L = (cfg.seq_len, cfg.micro_batch, arch.hidden, arch.heads, arch.kv, arch.intermediate,
                                arch.layers)
    mixed = cfg.precision in ("bf16-mixed", "fp16-mixed")
    e = 4 if cfg.precision == "fp32" else 2
    r = 2 if cfg.precision == "bf16-true" else 4
    path = attention_path(arch, cfg.precision, device)

    def norm_kept(consumers: int) -> float:
        # input x (r*h); LayerNorm keeps mean + rstd (2 fp32), RMSNorm rsqrt (1 fp32) and the fp32 normalised x
        # that its weight multiplies (4*h); the output as each consumer's matmul input
        stats = 8 if arch.norm == "layernorm" else 4 + 4 * h
        return r * h + stats + e * h * (consumers if mixed else 1)

    qkv_consumers = 1 if arch.fused_qkv else 3
    if path == "fused":
        # q, k and v as the kernel gets them (k, v with the kv heads only: grouped-query attention), the output
        # (= o_proj's input) and the fp32 logsumexp per row and head
        attn = e * h + 2 * e * h * kv / a + e * h + 4 * a
    elif path == "eager":
        # q, k^T and v as the two batched matmuls keep them (k, v repeated to every head), the softmax output in
        # fp32 (+ its 16-bit copy for the second matmul under 16 bits: 6 bytes), o_proj's input
        attn = 3 * e * h + a * s * (4 if e == 4 else 6) + e * h
    else:  # math: SDPA's math kernel upcasts q, k, v to fp32 and keeps the fp32 probabilities
        attn = 3 * 4 * h + a * s * 4 + e * h
    # The activation keeps only its input: the loop fuses the formula tanh-GELUs (GPT-2's gelu_new kept three
    # more tensors of width I composed of elementwise ops; train/kernels.py), SiLU and GELU are one op.
    if arch.gated_mlp:  # gate out (the activation's input), up out, act(gate), act * up (down's input)
        mlp = 4 * e * inter
    else:  # fc out (the activation's input), the activation's output (proj's input)
        mlp = 2 * e * inter
    per_token = norm_kept(qkv_consumers) + attn + norm_kept(2 if arch.gated_mlp else 1) + mlp
    per_layer = per_token * s * b
    labels = b * max(1, s - 1)  # the loop projects only label positions: with full rows all but the last
    final_norm = r * h + (8 if arch.norm == "layernorm" else 4 + 4 * h)
    head = (s * b * (final_norm + 1)  # the final norm's input and stats; the label-position mask (bool)
            + labels * (e * h + 4 * arch.vocab + 8))  # head input, fp32 log-softmax output, int64 targets
    embeddings = s * b * 8 + (s * 8 if arch.learned_positions else 0)  # token ids (and position ids) kept
    shared = 2 * s * (h // a) * 4 if arch.rotary else 0  # rotary cos and sin, fp32, one batch row
    block_casts = 2 * arch.block_params if mixed else 0  # autocast's 16-bit weight copies, kept until backward
    head_cast = 2 * arch.vocab * h if mixed else 0
    if cfg.grad_checkpointing and path == "eager":
        shared += 4 * b * s * s  # the fp32 causal mask, an argument every checkpointed block keeps
    if cfg.grad_checkpointing and arch.rotary:
        shared += 8 * s  # the position ids, likewise kept by the checkpoints
    terms = {"embeddings": embeddings, "shared": shared, "head": head}
    if cfg.grad_checkpointing:
        # kept: every block's input (r bytes per token); one block rebuilt at a time in backward, its input
        # already held, its weights re-cast by the recompute's own autocast
        terms["layer"] = per_layer - r * h * s * b + block_casts  # what one recompute adds (activations.Saved)
        terms["blocks"] = L * r * h * s * b + per_layer - r * h * s * b
        terms["weight_casts"] = head_cast + block_casts
    else:
        terms["layer"] = per_layer  # one block of the forward (activations.Saved.per_layer)
        terms["blocks"] = L * per_layer
        terms["weight_casts"] = head_cast + L * block_casts
    return terms


def activation_bytes(arch: Arch, cfg: TrainConfig, device: str | None = None) -> int:
    """Activation memory of one micro-batch: the bytes autograd saves for backward (the module docstring; measured
    exactly by forgetcheck/train/activations.py, which this formula is held to within 15%)."""
    t = _activation_terms(arch, cfg, device)
    return int(t["embeddings"] + t["shared"] + t["head"] + t["blocks"] + t["weight_casts"])


def plan_memory(config_or_params: Any, cfg: TrainConfig, *, arm: str | None = None, hf_config=None,
                device: str | None = None) -> dict:
    """Memory plan, in bytes per component. `config_or_params`: a transformers config, an `Arch`, or a
    parameter count (then the architecture is assumed, see `arch_from_params`).

    `arm` (with the transformers config, `hf_config` or `config_or_params`) plans a mitigation arm (train/arms.py):
    `lora` holds the base weights plus the adapters, and gradients and optimizer state for the adapters only;
    `freeze` holds gradients and optimizer state for the unfrozen parameters only. Activations are planned as
    for full fine-tuning in both (gradients flow down to the adapters of the first block / to the embeddings).

    `device` ("cpu", "cuda", "cuda:1"; None: unknown) decides the attention kernel (`attention_path`: fp32 SDPA of a
    grouped-query model on CUDA keeps the s^2 matrices) and the stated runtime overhead (`runtime_overhead`), which
    is reported beside the components, not in them: "total" is tensors only."""
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
    act = activation_bytes(arch, cfg, device)
    total["activations"] = act * n  # every device runs its own micro-batch
    per_device = {k: int(math.ceil(total[k] / n)) for k in ("weights", "gradients", "optimizer_state")}
    per_device["activations"] = act
    if n > 1:  # FSDP2: the all-gathered block being computed and the prefetched next one
        per_device["gathered_blocks"] = int(2 * arch.block_params * bpp["weights"])
    return {
        "params": arch.params,
        "arm": arm, "trainable_params": trainable, "added_params": extra,
        "arch": {"layers": arch.layers, "hidden": arch.hidden, "heads": arch.heads, "vocab": arch.vocab,
                 "intermediate": arch.intermediate, "eager_attention": arch.eager_attention,
                 "kv_heads": arch.kv, "gated_mlp": arch.gated_mlp, "attention": arch.attention,
                 "attention_path": attention_path(arch, cfg.precision, device), "assumed": arch.assumed},
        "settings": {"precision": cfg.precision, "optim": cfg.optim, "grad_checkpointing": cfg.grad_checkpointing,
                     "nproc": n, "micro_batch": cfg.micro_batch, "seq_len": cfg.seq_len},
        "bytes_per_param": bpp,
        "components": total,
        "total": sum(total.values()),
        "per_device": per_device,
        "per_device_total": sum(per_device.values()),
        "states_bytes": total["weights"] + total["gradients"] + total["optimizer_state"],
        "overhead": runtime_overhead(arch, cfg, device),
    }


def runtime_overhead(arch: Arch, cfg: TrainConfig, device: str | None) -> dict:
    """What a measured peak holds beyond the planned tensors, per device, with how the figure was had: {"bytes",
    "how"}. Kept out of the components (and out of "total") so that their sum stays the tensors the plan counts.

    CPU: the resident memory of Python + torch + the libraries before the model loads; when torch is already
    imported (the training loop plans after importing it) this process's VmRSS is read, otherwise the figure
    docs/train_memory.md measured (peak RSS minus tensors, ~0.8-1 GB) stands in. CUDA: the loss's backward holds
    the logits' gradient (fp32, and again in the compute dtype) while the saved tensors are still alive; the CUDA
    context and the allocator's fragmentation come on top and are not planned."""
    import sys

    if device is not None and str(device).startswith("cuda"):
        e = 4 if cfg.precision == "fp32" else 2
        labels = cfg.micro_batch * max(1, cfg.seq_len - 1)
        return {"bytes": int(labels * arch.vocab * (4 + e)),
                "how": "the logits' gradient during the loss's backward (label positions x vocab, fp32 + compute "
                       "dtype); CUDA context and allocator fragmentation not planned"}
    if "torch" in sys.modules:
        from forgetcheck.device import current_rss_bytes

        rss = current_rss_bytes()
        if rss is not None:
            return {"bytes": rss, "how": "VmRSS of this process before the model loads (Python, torch, libraries)"}
    return {"bytes": CPU_RUNTIME_BYTES,
            "how": "RSS of Python + torch + transformers before a model loads, as docs/train_memory.md measured"}


CPU_RUNTIME_BYTES = 1_000_000_000  # docs/train_memory.md: peak RSS minus the tensors, ~0.8-1 GB


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
                 f"{sum(bpp.values()):.2f}; activations: the bytes autograd saves ({a.get('attention_path', 'fused')} "
                 f"attention)")
    over = plan.get("overhead")
    if over:
        lines.append(f"runtime overhead, not in the total: {_gb(over['bytes'])} ({over['how']})")
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
