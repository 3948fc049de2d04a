"""`forgetcheck plan`: the memory plan of full fine-tuning for a model or a parameter count (train/memory.py
computes it), against the plain fp32 baseline."""

from __future__ import annotations

from dataclasses import replace

from forgetcheck.errors import BadInput


def echo(msg: str = "") -> None:
    print(msg)


def cmd_plan(*, base: str | None, params: float | None, precision: str, optim: str, grad_checkpointing: bool,
             nproc: int, micro_batch: int, seq_len: int, arm: str, lora_rank: int, freeze_layers: int | None) -> None:
    from forgetcheck import config
    from forgetcheck.train import memory

    if (base is None) == (params is None):
        raise BadInput("give exactly one of --base MODEL or --params N (e.g. --params 7e9)")
    cfg = config.TrainConfig(precision=precision, optim=optim, grad_checkpointing=grad_checkpointing, nproc=nproc,
                        micro_batch=micro_batch, seq_len=seq_len, budget_tokens=seq_len * micro_batch * nproc)
    memory.check_inputs(params, cfg)
    from forgetcheck.train.arms import TRAINED

    if arm not in TRAINED:
        raise BadInput(f"unknown --arm '{arm}': choose from {', '.join(TRAINED)}")
    if arm in ("lora", "freeze") and base is None:
        raise BadInput(f"--arm {arm} needs the architecture: give --base MODEL instead of --params")
    cfg = replace(cfg, lora_rank=lora_rank, freeze_layers=freeze_layers)
    config.check(config.validate_train(cfg))
    arch = memory.arch_for_base(base) if base is not None else memory.arch_from_params(params)
    hf = None
    if base is not None and arm in ("lora", "freeze"):
        from transformers import AutoConfig

        from forgetcheck.models import registry as models

        hf = AutoConfig.from_pretrained(models.resolve(base).path)
    this = memory.plan_memory(arch, cfg, arm=arm, hf_config=hf)
    echo(memory.format_plan(this, memory.plan_memory(arch, memory.baseline(cfg))))
    if arm in ("lora", "freeze"):
        echo(f"{arm}: {this['trainable_params']:,} trainable parameters ({this['added_params']:,} added) of "
             f"{arch.params:,}; gradients and optimizer state for those only")
