"""The `wise` arm: weight interpolation between the base and a trained arm, no training (WiSE-FT).

For each `a` of `--wise-alphas` (default 0.25, 0.5, 0.75) the model (1 - a) * base + a * arm (arm:
`--wise-from`, default `sft`) is written as an ordinary HF folder `runs/<id>/ckpt/wise-<a>/` and evaluated like
any arm (label `wise-<a>`). Every floating-point tensor is interpolated in float64 and cast back to its dtype;
a = 0 gives the base's tensors and a = 1 the arm's, bit for bit (tests/train/test_arms.py). Integer buffers (if any)
are taken from the arm. The report draws base -> wise-<a>... -> arm as one curve (Wortsman et al. 2022,
"Robust fine-tuning of zero-shot models"; Lin et al. 2024, "Mitigating the alignment tax of RLHF").
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_ALPHAS = (0.25, 0.5, 0.75)


def name(a: float) -> str:
    """The label of the interpolated model at `a`: wise-0.25, wise-0.5, ..."""
    return f"wise-{a:g}"


def points(arms, cfg) -> list[tuple[str, float]]:
    """(label, a) of every interpolated model a run asks for (none unless `wise` is in --arms)."""
    if "wise" not in arms:
        return []
    return [(name(a), float(a)) for a in cfg.wise_alphas]


def interpolate_state(base: dict, arm: dict, a: float) -> dict:
    """(1 - a) * base + a * arm for every floating-point tensor (same keys and shapes)."""
    import torch

    if base.keys() != arm.keys():
        missing = sorted(set(base) ^ set(arm))[:3]
        raise ValueError(f"base and arm weights differ in their names ({missing} ...): not the same architecture")
    out = {}
    for k, b in base.items():
        x = arm[k]
        if b.shape != x.shape:
            raise ValueError(f"{k}: base {tuple(b.shape)} vs arm {tuple(x.shape)}")
        if not torch.is_floating_point(x):
            out[k] = x.clone()
        elif a == 0:
            out[k] = b.detach().clone().to(x.dtype)
        elif a == 1:
            out[k] = x.detach().clone()
        else:
            out[k] = ((1 - a) * b.detach().double() + a * x.detach().double()).to(x.dtype)
    return out


def build(base_ref, arm_ckpt: Path, out: Path, a: float, *, source_arm: str) -> Path:
    """Write the interpolated HF folder at `out` (tokenizer and marker as any checkpoint)."""
    from forgetcheck.errors import BadInput
    from forgetcheck.models import registry
    from forgetcheck.train import checkpoint

    arm_path = Path(arm_ckpt)
    if not (arm_path / "config.json").exists():
        raise BadInput(f"--arms wise interpolates arm '{source_arm}', whose checkpoint {arm_path} is missing: "
                       f"train it first (keep '{source_arm}' in --arms)")
    base_model, _ = registry.load(base_ref)
    arm_model, tok = registry.load(registry.resolve(str(arm_path)))
    sd = interpolate_state(base_model.state_dict(), arm_model.state_dict(), a)
    arm_model.load_state_dict(sd, strict=True)
    arm_model.tie_weights()
    label = name(a)
    checkpoint.save_hf_checkpoint(arm_model, tok, out, base_ref, label, world=1, rank=0)
    return Path(out)
