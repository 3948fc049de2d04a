"""`forgetcheck plan`: the memory plan of full fine-tuning for a model or a parameter count (train/memory.py
computes it), against the plain fp32 baseline. Its training flags are `train`'s (options.PlanFlags), with the
defaults of one long sequence."""

from __future__ import annotations

from typing import Optional

import typer

from forgetcheck import config, console
from forgetcheck.cli.options import PlanFlags, options
from forgetcheck.errors import BadInput


@options(flags=PlanFlags)
def plan(
    base: Optional[str] = typer.Option(None, "--base", help="Model whose architecture to plan for (alias, folder, .gguf, hub id)."),
    params: Optional[float] = typer.Option(None, "--params", help="Parameter count instead of a model, e.g. 7e9 (shape assumed)."),
    arm: str = typer.Option("sft", "--arm", help="sft/cpt/replay (full fine-tuning) | lora | freeze (need --base)."),
    flags: PlanFlags = PlanFlags(),
) -> None:
    """Memory plan of full fine-tuning: weights, gradients, optimizer state, activations, total, per device."""
    with console.session(verbose=True):  # no log file: every line stays on the terminal
        _plan(base=base, params=params, arm=arm, cfg=flags.config())


def _plan(*, base: str | None, params: float | None, arm: str, cfg: config.TrainConfig) -> None:
    from forgetcheck.train import memory

    if (base is None) == (params is None):
        raise BadInput("give exactly one of --base MODEL or --params N (e.g. --params 7e9)")
    memory.check_inputs(params, cfg)
    config.check(config.validate_arms((arm,), flag="--arm", trained=True))
    if arm in ("lora", "freeze") and base is None:
        raise BadInput(f"--arm {arm} needs the architecture: give --base MODEL instead of --params")
    config.check(config.validate_train(cfg))
    arch = memory.arch_for_base(base) if base is not None else memory.arch_from_params(params)
    hf = None
    if base is not None and arm in ("lora", "freeze"):
        from transformers import AutoConfig

        from forgetcheck.models import registry

        hf = AutoConfig.from_pretrained(registry.resolve(base).path)
    this = memory.plan_memory(arch, cfg, arm=arm, hf_config=hf)
    console.say(memory.format_plan(this, memory.plan_memory(arch, memory.baseline(cfg))))
    if arm in ("lora", "freeze"):
        console.say(f"{arm}: {this['trainable_params']:,} trainable parameters ({this['added_params']:,} added) of "
                    f"{arch.params:,}; gradients and optimizer state for those only")
