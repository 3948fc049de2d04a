"""The arms: what each one trains on, which weights it updates, and what it leaves behind.

Every trained arm goes through train/loop.py's one loop, on the same token budget (same rows per step, same optimizer
steps); an arm changes only the points below.

| arm | data | trainable | learning rate | saved |
|---|---|---|---|---|
| `sft` | sft.jsonl, loss on responses | every weight | `--lr` | HF folder |
| `cpt` | cpt.jsonl, loss on every token | every weight | `--lr` | HF folder |
| `lora` | as `sft` | LoRA adapters (peft) on every linear layer of the blocks; the base is frozen | `--lora-lr` | adapter folder (`ckpt/lora.adapter/`) and the merged HF folder |
| `replay` | as `sft`, with `--replay-frac` of the tokens general text (data/replay.py) | every weight | `--lr` | HF folder |
| `freeze` | as `sft` | every weight but the bottom `--freeze-layers` blocks (default half) | `--lr` | HF folder |

`wise` is not trained: train/interpolate.py mixes the base and a trained arm's weights.

Defaults (config.TrainConfig): LoRA rank 16, alpha 32 (alpha = 2 x rank, so the update scale alpha/rank is 2),
no LoRA dropout (dropout is off in every arm), learning rate 2e-4: LoRA needs a higher learning rate than full
fine-tuning (Biderman et al. 2024, "LoRA Learns Less and Forgets Less", found the best LoRA rates an order of
magnitude above full fine-tuning's; 2e-4 is the rate of the LoRA and QLoRA papers' recipes). Freeze: the
bottom half of the blocks; the embeddings stay trainable (in tied models such as SmolLM2 they are also the
output head), so gradients still flow through the frozen blocks and their activations are kept.

Replay (`--replay-frac`, default 0.05): after each SFT example, general-text pieces (at most seq_len / 2 tokens,
loss on every token) are inserted while the replay share of the stream so far is under the fraction, so the share
holds along the whole run, not only on average. 5% because Bethune et al. 2025 ("Scaling laws for forgetting
during finetuning with pretraining data injection") find about 1% of pretraining data already prevents most
forgetting, and Ibrahim et al. 2024 ("Simple and scalable strategies to continually pre-train large language
models") use 5%; at the `forget` budget (32,768 tokens) 1% would be 328 tokens, about one sequence, while 5% is
about 1,600 tokens spread over the run. The measured share is written to train/replay.json.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from forgetcheck.config import ARM_DATA

TRAINED = tuple(ARM_DATA)
WISE = "wise"


def data_kind(arm: str) -> str:
    """Which file of the domain an arm trains on: 'sft' or 'cpt' (`wise` trains on nothing)."""
    return ARM_DATA.get(arm, arm)


def trained(arms) -> list[str]:
    return [a for a in arms if a in TRAINED]


def peak_lr(arm: str, cfg) -> float:
    return cfg.lora_lr if arm == "lora" else cfg.lr


def optimizer_config(arm: str, cfg):
    """The config the optimizer is built from (only the learning rate differs, for LoRA)."""
    return replace(cfg, lr=peak_lr(arm, cfg))


# ---- the model: which weights train ----------------------------------------------------------------------

def blocks(model):
    """The transformer blocks, bottom first (Llama-style `model.layers`, GPT-2 `transformer.h`, ...)."""
    import torch

    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")


def freeze_count(n_layers: int, cfg) -> int:
    return n_layers // 2 if cfg.freeze_layers is None else int(cfg.freeze_layers)


def lora_targets(model) -> list[str]:
    """Names (last component) of every linear layer inside the blocks: nn.Linear and GPT-2's Conv1D."""
    import torch
    from transformers.pytorch_utils import Conv1D

    names = []
    for full, mod in blocks(model).named_modules():
        if isinstance(mod, (torch.nn.Linear, Conv1D)):
            leaf = full.rsplit(".", 1)[-1]
            if leaf not in names:
                names.append(leaf)
    return names


def lora_config(model, cfg):
    from peft import LoraConfig

    targets = lora_targets(model)
    fan_in_fan_out = type(model).__name__.startswith("GPT2")
    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none",
                      target_modules=targets, fan_in_fan_out=fan_in_fan_out, task_type="CAUSAL_LM")


def prepare_model(arm: str, model, cfg):
    """The model `arm` trains: LoRA-wrapped (peft) or with its bottom blocks frozen; returns (model, info)."""
    from forgetcheck.errors import BadInput

    info: dict = {}
    if arm == "lora":
        from peft import get_peft_model

        lcfg = lora_config(model, cfg)
        model = get_peft_model(model, lcfg)
        info = {"lora": {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "lr": cfg.lora_lr,
                         "targets": sorted(lcfg.target_modules)}}
    elif arm == "freeze":
        layers = blocks(model)
        n = freeze_count(len(layers), cfg)
        if n > len(layers):
            raise BadInput(f"--freeze-layers {n} but the model has only {len(layers)} blocks: use at most "
                           f"{len(layers)}")
        for block in list(layers)[:n]:
            for p in block.parameters():
                p.requires_grad_(False)
        info = {"freeze": {"frozen_blocks": list(range(n)), "of_blocks": len(layers)}}
    params = list(model.parameters())
    info["trainable_params"] = sum(p.numel() for p in params if p.requires_grad)
    info["total_params"] = sum(p.numel() for p in params)
    return model, info


def trainable_parameters(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def adapter_dir(ckpt: Path) -> Path:
    """Where the LoRA adapter of the arm checkpointed at `ckpt` (runs/<id>/ckpt/lora/) is saved."""
    return Path(ckpt).parent / f"{Path(ckpt).name}.adapter"


def finish_model(arm: str, model, ckpt: Path):
    """Before the HF folder is written: LoRA saves its adapter, then merges it into the base weights."""
    if arm != "lora":
        return model
    model.save_pretrained(adapter_dir(ckpt))
    return model.merge_and_unload()


# ---- the memory planner's view of an arm ----------------------------------------------------------------

def trainable_count(hf_config, arm: str, cfg) -> tuple[int, int]:
    """(trainable parameters, extra parameters the arm adds) from the architecture, on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    total = sum(p.numel() for p in model.parameters())
    if arm == "lora":
        from transformers.pytorch_utils import Conv1D

        targets = set(lora_targets(model))
        extra = 0
        for full, mod in blocks(model).named_modules():
            if full.rsplit(".", 1)[-1] not in targets:
                continue
            if isinstance(mod, Conv1D):
                fan_in, fan_out = mod.weight.shape
            else:
                fan_out, fan_in = mod.weight.shape
            extra += cfg.lora_rank * (fan_in + fan_out)
        return extra, extra
    if arm == "freeze":
        layers = blocks(model)
        frozen = sum(p.numel() for b in list(layers)[:freeze_count(len(layers), cfg)] for p in b.parameters())
        return total - frozen, 0
    return total, 0
