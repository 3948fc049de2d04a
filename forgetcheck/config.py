"""The resolved configuration: frozen, typed, validated in full before any heavy work.

The CLI (typer) fills these dataclasses from its flags; `validate()` collects *every* problem and
`check()` raises one `BadInput` listing them all, so a bad flag is never discovered after an hour of
training. `to_dict()` is what lands in `runs/<id>/config.json`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from forgetcheck.errors import BadInput

ARMS = ("sft", "cpt")
PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed", "bf16-true")
OPTIMIZERS = ("adamw", "adamw8bit")
BACKENDS = ("fast", "hf")
SUITES = ("retention", "domain")
PRESETS = ("quick", "standard", "full")


def forgetcheck_home() -> Path:
    """Cache root for converted models, prepared data and the eval cache.

    `$FORGETCHECK_HOME` when set, else `$XDG_CACHE_HOME/forgetcheck`, else `~/.cache/forgetcheck`.
    """
    if os.environ.get("FORGETCHECK_HOME"):
        return Path(os.environ["FORGETCHECK_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "forgetcheck"


def repo_root() -> Path:
    """The source checkout (forgetcheck is installed editable: `tasks/` and `runs/` live beside the package)."""
    return Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class TrainConfig:
    """How each arm is fine-tuned. Every arm of one run shares all of these."""

    budget_tokens: int = 20_000
    """Training tokens each arm may feed forward (padding excluded)."""
    seq_len: int = 256
    """Tokens per training sequence (CPT packs to exactly this; SFT truncates to it)."""
    micro_batch: int = 4
    """Sequences per forward/backward pass."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 2e-5
    """Peak learning rate (linear warmup, then cosine decay to `lr * min_lr_ratio`)."""
    warmup_frac: float = 0.1
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    precision: str = "fp32"
    """fp32 | bf16-mixed | fp16-mixed (autocast, fp32 master weights) | bf16-true (loses small updates)."""
    grad_checkpointing: bool = False
    optim: str = "adamw"
    """adamw | adamw8bit (torchao, else bitsandbytes; ~2 bytes/param of state)."""
    nproc: int = 1
    """Processes for FSDP2 sharding (torchrun; gloo on CPU, nccl on GPU)."""
    seed: int = 0
    data_seed: int = 0
    include_prompt_loss: bool = False
    """SFT only: also train on prompt tokens."""
    save_every: int = 0
    """Save a resumable checkpoint every N optimizer steps (0: only at the end)."""
    force: bool = False
    """Start even when the memory plan says it does not fit the device."""


@dataclass(frozen=True)
class EvalConfig:
    suites: tuple[str, ...] = ("retention", "domain")
    tasks: tuple[str, ...] = ()
    """Restrict to these tasks (names from tasks/ or lm-eval's hub tasks)."""
    limit: int | None = None
    """Deterministic stratified subset of N items per task (the same items for every model)."""
    backend: str = "fast"
    """fast (each context scored once for all its choices) | hf (stock lm-eval HFLM)."""
    batch_size: int = 16


@dataclass(frozen=True)
class GateConfig:
    max_drop: float = 2.0
    """A retention task may not drop by more than this many points (significant after correction)."""
    max_mean_drop: float = 1.0
    """The retention suite mean may not drop by more than this many points (significant)."""
    alpha: float = 0.05
    min_domain_gain: float | None = None
    """When set, the domain suite mean must rise by at least this many points."""


@dataclass(frozen=True)
class RunConfig:
    base: str = "smollm2-135m"
    data: str = "med"
    arms: tuple[str, ...] = ARMS
    preset: str = "quick"
    out_dir: str = "runs"
    run_id: str | None = None
    device: str = "auto"
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    gate: GateConfig = field(default_factory=GateConfig)


# Presets: what `--preset` fills in where the user gave no flag. `quick` fits the 2-core CPU in <= 20 min
# with smollm2-135m (training ~140 tokens/s, forward ~600 tokens/s, measured); `full` uses every item.
PRESET_VALUES: dict[str, dict[str, dict]] = {
    "quick": {
        "train": {"budget_tokens": 32_768, "seq_len": 256, "micro_batch": 4, "grad_accum": 1, "lr": 5e-5},
        "eval": {"limit": 50},
    },
    "standard": {
        "train": {"budget_tokens": 400_000, "seq_len": 512, "micro_batch": 8, "grad_accum": 2, "lr": 2e-5,
                  "save_every": 50},
        "eval": {"limit": 200},
    },
    "full": {
        "train": {"budget_tokens": 4_000_000, "seq_len": 1024, "micro_batch": 8, "grad_accum": 4, "lr": 2e-5,
                  "precision": "bf16-mixed", "save_every": 50},
        "eval": {"limit": None},
    },
}


def apply_preset(preset: str, train_overrides: dict, eval_overrides: dict) -> tuple[TrainConfig, EvalConfig]:
    """Preset values, then every flag the user actually gave (`None` means not given)."""
    if preset not in PRESET_VALUES:
        raise BadInput(f"unknown --preset '{preset}': choose one of {', '.join(PRESETS)}")
    values = PRESET_VALUES[preset]
    train = {**values["train"], **{k: v for k, v in train_overrides.items() if v is not None}}
    ev = {**values["eval"], **{k: v for k, v in eval_overrides.items() if v is not None}}
    return TrainConfig(**train), EvalConfig(**ev)


def validate_train(t: TrainConfig) -> list[str]:
    problems = []
    if t.budget_tokens <= 0:
        problems.append(f"--budget-tokens must be positive (got {t.budget_tokens})")
    if t.seq_len < 8:
        problems.append(f"--seq-len must be at least 8 (got {t.seq_len})")
    if t.micro_batch < 1:
        problems.append(f"--micro-batch must be at least 1 (got {t.micro_batch})")
    if t.grad_accum < 1:
        problems.append(f"--grad-accum must be at least 1 (got {t.grad_accum})")
    if not 0 < t.lr < 1:
        problems.append(f"--lr must be in (0, 1) (got {t.lr})")
    if not 0 <= t.warmup_frac < 1:
        problems.append(f"--warmup-frac must be in [0, 1) (got {t.warmup_frac})")
    if t.precision not in PRECISIONS:
        problems.append(f"unknown --precision '{t.precision}': choose one of {', '.join(PRECISIONS)}")
    if t.optim not in OPTIMIZERS:
        problems.append(f"unknown --optim '{t.optim}': choose one of {', '.join(OPTIMIZERS)}")
    if t.nproc < 1:
        problems.append(f"--nproc must be at least 1 (got {t.nproc})")
    tokens_per_step = t.seq_len * t.micro_batch * t.grad_accum * t.nproc
    if t.budget_tokens > 0 and t.budget_tokens < tokens_per_step:
        problems.append(
            f"--budget-tokens {t.budget_tokens} is less than one optimizer step "
            f"({t.seq_len} seq-len x {t.micro_batch} micro-batch x {t.grad_accum} grad-accum x {t.nproc} nproc = "
            f"{tokens_per_step} tokens): raise the budget or shrink the batch"
        )
    return problems


def validate_eval(e: EvalConfig) -> list[str]:
    problems = []
    for s in e.suites:
        if s not in SUITES:
            problems.append(f"unknown suite '{s}' in --suite: choose from {', '.join(SUITES)}")
    if e.limit is not None and e.limit < 1:
        problems.append(f"--limit must be at least 1 (got {e.limit})")
    if e.backend not in BACKENDS:
        problems.append(f"unknown --backend '{e.backend}': choose one of {', '.join(BACKENDS)}")
    if e.batch_size < 1:
        problems.append(f"--batch-size must be at least 1 (got {e.batch_size})")
    return problems


def validate_gate(g: GateConfig) -> list[str]:
    problems = []
    if not 0 < g.alpha < 1:
        problems.append(f"--alpha must be in (0, 1) (got {g.alpha})")
    if g.max_drop < 0:
        problems.append(f"--max-drop must be >= 0 points (got {g.max_drop})")
    if g.max_mean_drop < 0:
        problems.append(f"--max-mean-drop must be >= 0 points (got {g.max_mean_drop})")
    return problems


def validate_arms(arms: tuple[str, ...]) -> list[str]:
    """The one home of the arm rules: at least one, each known, none twice."""
    problems = [] if arms else ["--arms is empty: give at least one of sft,cpt"]
    problems += [f"unknown arm '{a}' in --arms: choose from {', '.join(ARMS)}" for a in arms if a not in ARMS]
    if len(set(arms)) != len(arms):
        problems.append(f"--arms lists an arm twice: {','.join(arms)}")
    return problems


def validate_device(device: str) -> list[str]:
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        return [f"unknown --device '{device}': use auto, cpu or cuda[:N]"]
    return []


def validate(cfg: RunConfig) -> list[str]:
    return (validate_arms(cfg.arms) + validate_device(cfg.device) + validate_train(cfg.train)
            + validate_eval(cfg.eval) + validate_gate(cfg.gate))


def check(problems: list[str]) -> None:
    """Raise one BadInput naming every problem at once."""
    if problems:
        n = len(problems)
        head = "bad configuration" if n == 1 else f"bad configuration ({n} problems)"
        raise BadInput(f"{head}: " + "; ".join(problems))


def to_dict(cfg) -> dict:
    """Plain JSON-able dict of a config dataclass (tuples become lists)."""
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> RunConfig:
    """The RunConfig that `to_dict` turned into `d` (config.json minus its schema_version, kind and resolved)."""
    d = {k: v for k, v in d.items() if k not in ("schema_version", "kind", "resolved")}
    train, ev, gate = TrainConfig(**d.pop("train")), dict(d.pop("eval")), GateConfig(**d.pop("gate"))
    ev["suites"], ev["tasks"] = tuple(ev["suites"]), tuple(ev["tasks"])
    return RunConfig(**{**d, "arms": tuple(d["arms"])}, train=train, eval=EvalConfig(**ev), gate=gate)


def split_csv(value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    return tuple(x.strip() for x in value.split(",") if x.strip())
