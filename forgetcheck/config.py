"""The resolved configuration: frozen, typed, validated in full before any heavy work.

The CLI (typer) fills these dataclasses from its flags; `validate()` collects *every* problem and
`check()` raises one `BadInput` listing them all, so a bad flag is never discovered after an hour of
training. `to_dict()` is what lands in `runs/<id>/config.json`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from forgetcheck.errors import BadInput

ARMS = ("sft", "cpt", "lora", "replay", "freeze", "wise")
ARM_DATA = {"sft": "sft", "cpt": "cpt", "lora": "sft", "replay": "sft", "freeze": "sft"}
"""Which file of the domain each trained arm reads (`wise` trains on nothing)."""
"""Arms (train/arms.py): full fine-tuning on SFT pairs or raw text, and the mitigations: LoRA, SFT with general-text
replay, SFT with the bottom blocks frozen, and weight interpolation (train/interpolate.py; not trained)."""
DEFAULT_ARMS = ("sft", "cpt")
PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed", "bf16-true")
OPTIMIZERS = ("adamw", "adamw8bit")
BACKENDS = ("fast", "hf")
SUITES = ("retention", "domain")
PRESETS = ("quick", "standard", "full", "forget", "demo")


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


def flag(default, help: str, *, decls: str | None = None, text: bool = False):
    """A field that is also a command-line flag: its one help text (cli/options.py builds the typer option from
    it). `decls`: the flag's spelling when it is not --field-name; `text`: typed as a string on the command line
    (a comma list, or a margin that also takes 'off')."""
    return field(default=default, metadata={"help": help, "decls": decls, "text": text})


@dataclass(frozen=True)
class TrainConfig:
    """How each arm is fine-tuned. Every arm of one run shares all of these."""

    budget_tokens: int = flag(20_000, "Tokens each arm feeds forward (padding excluded).")
    seq_len: int = flag(256, "Tokens per training row.")
    """CPT packs to exactly this; SFT truncates to it."""
    micro_batch: int = flag(4, "Rows per forward pass (per process).")
    grad_accum: int = flag(1, "Micro-batches per optimizer step.")
    lr: float = flag(2e-5, "Peak learning rate (warmup + cosine).")
    """Linear warmup, then cosine decay to `lr * min_lr_ratio`."""
    warmup_frac: float = 0.1
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    precision: str = flag("fp32", "fp32 | bf16-mixed | fp16-mixed | bf16-true")
    """fp16/bf16-mixed: autocast with fp32 master weights; bf16-true loses small updates."""
    grad_checkpointing: bool = flag(False, "Recompute activations in backward.")
    compile: bool = flag(False, "torch.compile each transformer block (the first steps pay the compilation).")
    """train/kernels.py `compile_blocks`; bench/train_memory.py measures what it buys."""
    optim: str = flag("adamw", "adamw | adamw8bit (torchao, else bitsandbytes)")
    """adamw8bit keeps ~2 bytes/param of state."""
    nproc: int = flag(1, "Processes for FSDP2 sharding (torchrun).")
    """gloo on CPU, nccl on GPU."""
    seed: int = flag(0, "Seed and data-order seed.")
    data_seed: int = 0
    seeds: int = flag(1, "Train each arm K times (data order seed, seed+1, ...); arms are then compared with a "
                         "two-level bootstrap (seeds, then items). Default 1.")
    """Replica i (label `<arm>_s<i>`, i >= 1) trains with seed + i and data_seed + i."""
    include_prompt_loss: bool = flag(False, "SFT: also train on prompt tokens.")
    save_every: int = flag(0, "Resumable checkpoint every N steps (0: none).")
    eval_every: int = flag(0, "Forgetting curves: measure KL, bits per byte and retention soft accuracy every N "
                              "steps (every N/4 in the first quarter of the budget); 0: off. The preset chooses N.")
    """train/curve.py: every max(1, N // 4) steps within the forecast window (the first quarter of the budget)."""
    stop_if_forecast_exceeds: float | None = flag(
        None, "Stop an arm when the forecast (at a quarter of the budget) says its retention soft accuracy will "
              "very likely drop by more than PTS points; the checkpoint it reached is kept.")
    """The forecast's lower bound of the points lost at the end of the budget (forecast.should_stop); needs
    eval_every > 0."""
    force: bool = flag(False, "Start even when the memory plan does not fit.")
    # The mitigation arms (train/arms.py, train/interpolate.py; the reasons for these defaults are in train/arms.py's docstring)
    lora_rank: int = flag(16, "lora: adapter rank. Default 16.")
    """On every linear layer of the blocks."""
    lora_alpha: float = flag(32.0, "lora: alpha (scale alpha/rank). Default 32.")
    lora_lr: float = flag(2e-4, "lora: peak learning rate. Default 2e-4.")
    """LoRA needs a higher one than full fine-tuning."""
    replay_frac: float = flag(0.05, "replay: share of tokens that is general text. Default 0.05.")
    """data/replay.py."""
    freeze_layers: int | None = flag(None, "freeze: bottom blocks frozen. Default half.")
    wise_from: str = flag("sft", "wise: the trained arm interpolated with the base. Default sft.")
    wise_alphas: tuple[float, ...] = flag((0.25, 0.5, 0.75), "wise: a of (1-a)*base + a*arm, comma list. "
                                          "Default 0.25,0.5,0.75.", text=True)

    def __post_init__(self):  # config.json gives a list back
        object.__setattr__(self, "wise_alphas", tuple(float(a) for a in self.wise_alphas))


@dataclass(frozen=True)
class EvalConfig:
    suites: tuple[str, ...] = flag(("retention", "domain"), "Suites to run: retention, domain (comma list).",
                                   decls="--suite", text=True)
    tasks: tuple[str, ...] = flag((), "Only these tasks (comma list; overrides --suite): ours, a group of ours "
                                      "(forgetcheck_retention) or lm-eval's hub tasks.", text=True)
    limit: int | None = flag(None, "Deterministic stratified subset of N items per task (the same items for "
                                   "every model). Default: the preset's.")
    backend: str = flag("fast", "fast (each context scored once) | hf (stock lm-eval HFLM).")
    batch_size: int = flag(16, "Requests per forward pass.")
    screen_items: int | None = flag(None, "The base also scores N more items of each retention multiple-choice "
                                          "task, never compared with the arms, to decide which tasks are "
                                          "informative (above chance); 0: decide on the compared items. "
                                          "Default: as many as --limit.")
    """The screen items of a task are the next items of the --limit order: select_items(limit + N) minus
    select_items(limit) (eval/suites.screen_items); without a --limit every item is compared and none is left to
    screen on. docs/verdicts.md, "Uninformative tasks"."""

    def screen_count(self) -> int:
        """How many screen items each retention multiple-choice task gets (0: none; no --limit: none)."""
        if self.limit is None:
            return 0
        return self.limit if self.screen_items is None else self.screen_items


@dataclass(frozen=True)
class LookConfig:
    """Scoring until decided (`check` and `run`; verdict/sequential.py, docs/verdicts.md "Until decided")."""

    until_decided: bool = flag(False, "After the first look (--limit items per task), score more items only for "
                                      "the tasks whose verdict is still open, in looks 1.25x larger, until every "
                                      "rule decides or --max-items / --max-minutes is reached (the gate's "
                                      "sequential bounds hold at every look).",
                               decls="--until-decided/--fixed-items")
    max_items: int | None = flag(None, "With --until-decided: most items per task (the cap). Default 8 x --limit.")
    max_minutes: float | None = flag(None, "With --until-decided: start no new look once this many minutes have "
                                           "passed (check: since it started; run: since training ended).")

    def cap(self, limit: int) -> int:
        return self.max_items if self.max_items is not None else 8 * limit


def validate_looks(lk: LookConfig, limit: int | None, metric: str = "soft") -> list[str]:
    problems = []
    if not lk.until_decided:
        if lk.max_items is not None or lk.max_minutes is not None:
            problems.append("--max-items and --max-minutes only apply with --until-decided: add it, or drop them")
        return problems
    if limit is None:
        problems.append("--until-decided needs a first look of --limit N items per task (a preset's, or give one)")
    elif lk.max_items is not None and lk.max_items < limit:
        problems.append(f"--max-items ({lk.max_items}) must be at least --limit ({limit})")
    if lk.max_minutes is not None and not (lk.max_minutes > 0 and lk.max_minutes < float("inf")):
        problems.append(f"--max-minutes must be a positive number of minutes (got {lk.max_minutes})")
    if metric != "soft":
        problems.append(f"--until-decided gates on soft accuracy (its sequential bounds bet on per-unit changes of a "
                        f"bounded score): drop --metric {metric}, or drop --until-decided")
    return problems


@dataclass(frozen=True)
class GateConfig:
    """The release gate's policy (verdict/gate.py; every rule in docs/verdicts.md). Margins are in points (percent for
    `max_ppl_rise`, nats per token for `max_kl`); each rule passes when its one-sided (1 - alpha) bound rules
    out a change beyond the margin, fails when the change beyond the margin is shown, else is inconclusive."""

    max_drop: float = flag(2.0, "Margin: points a gated retention task may drop. Default 2.")
    max_relative_drop: float | None = flag(None, "Margin relative to the base: percent of the base's score a gated "
                                                 "task may drop, where stricter than --max-drop (low baselines), "
                                                 "or 'off'. Default off.", text=True)
    """A 2-point drop is a fifteenth of a task the base scores 30 on and a fortieth of one it scores 80 on: with
    this set, each task's margin is min(max_drop, max_relative_drop % of the base's score on it). None: off."""
    max_mean_drop: float = flag(1.0, "Margin: points the retention mean may drop. Default 1.")
    alpha: float = flag(0.05, "One-sided level of every bound and test. Default 0.05.")
    min_domain_gain: float | None = flag(None, "Require the domain mean to rise by at least this many points "
                                               "(lower bound).")
    metric: str = flag("soft", "acc | soft (probability on the correct choice). Default soft (docs/verdicts.md).")
    """Which score the task and mean rules use (docs/verdicts.md: soft detects drops about half as large on the
    same items)."""
    max_ppl_rise: float | None = flag(10.0, "Margin: percent rise of general-text bits per byte, or 'off'. "
                                            "Default 10.", text=True)
    """Measured on the drift text; None: rule off."""
    max_kl: float | None = flag(0.1, "Margin: mean KL from the base, nats per token, or 'off'. Default 0.1.",
                                text=True)
    """KL(base || arm) per token; None: rule off."""
    on_inconclusive: str = flag("inconclusive", "fail | pass: exit 1 or 0 instead of 4 for an INCONCLUSIVE "
                                                "verdict (said in the output).")
    """Exit code for an inconclusive verdict: `inconclusive` (4), `fail` (1) or `pass` (0)."""
    keep_uninformative: bool = flag(False, "Gate retention tasks whose base is not above chance too (default: "
                                           "left out, and not scored for the arms).",
                                    decls="--keep-uninformative/--drop-uninformative")
    require_tasks: tuple[str, ...] = ()
    """Tasks that must have been scored for every arm: one that is missing (its data could not be built, or it
    was not evaluated) makes the verdict MISSING-inconclusive, never PASS. Retention tasks whose data could not
    be built are missing whether listed or not."""

    tiers: tuple[tuple[str, str], ...] = ()
    """(task name or glob pattern, tier) pairs, from the policy file's `[gate.tiers]` table: `critical` (the
    default: must PASS), `supporting` (must not FAIL: its INCONCLUSIVE does not hold the release back) or
    `advisory` (reported, never changes the verdict, outside the Holm family and the retention mean of the
    others). An exact name wins over patterns; among patterns, the first that matches (docs/verdicts.md, "Tiers")."""

    def __post_init__(self):
        # a policy file and config.json give lists (and tiers a table): one tuple whichever way the policy arrives
        object.__setattr__(self, "require_tasks", tuple(self.require_tasks))
        tiers = self.tiers.items() if isinstance(self.tiers, dict) else self.tiers
        object.__setattr__(self, "tiers", tuple(tuple(t) if isinstance(t, (list, tuple)) else t for t in tiers))


@dataclass(frozen=True)
class RunConfig:
    base: str = "smollm2-135m"
    data: str = "med"
    arms: tuple[str, ...] = DEFAULT_ARMS
    preset: str = "quick"
    out_dir: str = "runs"
    run_id: str | None = None
    device: str = "auto"
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    looks: LookConfig = field(default_factory=LookConfig)


# Presets: what `--preset` fills in where the user gave no flag. `quick`, `forget` and `demo` are sized for a 2-core
# CPU (`quick` is a smoke test; `forget` the smallest setting at which smollm2-135m both forgets and learns
# measurably, with forgetting curves; `demo`, `make demo`'s, the same training without curves and 30 items per task,
# so that it fits 20 minutes from an empty cache: recall is scored on every item);
# docs/design.md "Presets" has the measured runs behind these numbers. No preset sets `screen_items`: it follows
# the preset's limit (as many screen items as compared ones; `full` compares every item, so has none left).
DEMO_TASKS = (
    # retention: the 12 multiple-choice tasks on which smollm2-135m's screen items find it above chance at 30 items
    # (the other 19 cannot show forgetting for this model, and cost the base's evaluation two thirds of its time:
    # docs/verdicts.md, "The demo"), and the general-text perplexity
    "fc_arc_easy", "fc_sciq", "fc_capital_country", "fc_city_country", "fc_country_capital", "fc_country_demonym",
    "fc_country_region", "fc_element_name", "fc_element_symbol", "fc_irregular_participle", "fc_irregular_past",
    "fc_us_state_abbreviation", "fc_general_text_ppl",
    # the domain suite and the run's recall questions
    "fc_mmlu_medical", "fc_medmcqa", "fc_medqa", "fc_med_terms", "fc_med_text_ppl", "fc_med_recall",
)
"""The tasks of `--preset demo` (a run with smollm2-135m on `med`; --tasks overrides them)."""

PRESET_VALUES: dict[str, dict[str, dict]] = {
    "quick": {
        "train": {"budget_tokens": 16_384, "seq_len": 256, "micro_batch": 2, "grad_accum": 1, "lr": 5e-5,
                  "eval_every": 8},
        "eval": {"limit": 50},
    },
    "forget": {
        "train": {"budget_tokens": 32_768, "seq_len": 256, "micro_batch": 4, "grad_accum": 1, "lr": 3e-4,
                  "eval_every": 8},
        "eval": {"limit": 50},
    },
    "demo": {  # `forget`'s training without the curves (about 100 s), 30 items of DEMO_TASKS: within 20 minutes
        "train": {"budget_tokens": 32_768, "seq_len": 256, "micro_batch": 4, "grad_accum": 1, "lr": 3e-4,
                  "eval_every": 0},
        "eval": {"limit": 30, "tasks": DEMO_TASKS},
    },
    "standard": {
        "train": {"budget_tokens": 400_000, "seq_len": 512, "micro_batch": 8, "grad_accum": 2, "lr": 2e-5,
                  "save_every": 50, "eval_every": 8},
        "eval": {"limit": 200},
    },
    "full": {
        "train": {"budget_tokens": 4_000_000, "seq_len": 1024, "micro_batch": 8, "grad_accum": 4, "lr": 2e-5,
                  "precision": "bf16-mixed", "save_every": 50, "eval_every": 16},
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


MAX_SEEDS = 20
MAX_SEED = 2**32 - 1  # a seed every generator takes alike (numpy.random.seed stops at 32 bits)


def seed_run_label(arm: str, i: int) -> str:
    """The label of training run i of `arm` (`--seeds`): the arm itself for i = 0, else `<arm>_s<i>`."""
    return arm if i == 0 else f"{arm}_s{i}"


def seed_run_of(label: str) -> tuple[str, int]:
    """(arm, seed-run index) of a label written by `seed_run_label` (any other label: itself, 0)."""
    arm, sep, idx = label.rpartition("_s")
    if sep and arm in ARMS and idx.isdigit() and int(idx) > 0 and str(int(idx)) == idx:
        return arm, int(idx)
    return label, 0


def seed_run_config(label: str, t: TrainConfig) -> tuple[str, TrainConfig]:
    """(arm, the TrainConfig seed run `label` trains with: seed and data_seed shifted by its index)."""
    arm, i = seed_run_of(label)
    return arm, (t if i == 0 else replace(t, seed=t.seed + i, data_seed=t.data_seed + i))


def validate_train(t: TrainConfig) -> list[str]:
    problems = []
    if not 1 <= t.seeds <= MAX_SEEDS:
        problems.append(f"--seeds must be between 1 and {MAX_SEEDS} (got {t.seeds})")
    problems += _seed_problems(t)
    if t.budget_tokens <= 0:
        problems.append(f"--budget-tokens must be positive (got {t.budget_tokens})")
    if t.seq_len < 8:
        problems.append(f"--seq-len must be at least 8 (got {t.seq_len})")
    if t.micro_batch < 1:
        problems.append(f"--micro-batch must be at least 1 (got {t.micro_batch})")
    if t.grad_accum < 1:
        problems.append(f"--grad-accum must be at least 1 (got {t.grad_accum})")
    if not 0 < t.lr < 1:  # NaN fails this too
        problems.append(f"--lr must be in (0, 1) (got {t.lr})")
    if t.save_every < 0:
        problems.append(f"--save-every must be >= 0 steps (0: no resumable checkpoint) (got {t.save_every})")
    if t.eval_every < 0:
        problems.append(f"--eval-every must be >= 0 steps (0: no forgetting curves) (got {t.eval_every})")
    stop = t.stop_if_forecast_exceeds
    if stop is not None:
        if isinstance(stop, bool) or not isinstance(stop, (int, float)) or not math.isfinite(stop) or stop < 0:
            problems.append(f"--stop-if-forecast-exceeds must be a finite number of points >= 0 (got {stop!r})")
        elif t.eval_every == 0:
            problems.append("--stop-if-forecast-exceeds needs the forgetting curves: give --eval-every N (N > 0)")
    if not 0 <= t.warmup_frac < 1:
        problems.append(f"--warmup-frac must be in [0, 1) (got {t.warmup_frac})")
    if t.precision not in PRECISIONS:
        problems.append(f"unknown --precision '{t.precision}': choose one of {', '.join(PRECISIONS)}")
    if t.optim not in OPTIMIZERS:
        problems.append(f"unknown --optim '{t.optim}': choose one of {', '.join(OPTIMIZERS)}")
    if t.nproc < 1:
        problems.append(f"--nproc must be at least 1 (got {t.nproc})")
    if t.lora_rank < 1:
        problems.append(f"--lora-rank must be at least 1 (got {t.lora_rank})")
    if not t.lora_alpha > 0:
        problems.append(f"--lora-alpha must be positive (got {t.lora_alpha})")
    if not 0 < t.lora_lr < 1:
        problems.append(f"--lora-lr must be in (0, 1) (got {t.lora_lr})")
    if not 0 < t.replay_frac < 1:
        problems.append(f"--replay-frac must be in (0, 1) (got {t.replay_frac})")
    if t.freeze_layers is not None and t.freeze_layers < 0:
        problems.append(f"--freeze-layers must be >= 0 (got {t.freeze_layers})")
    if not t.wise_alphas or any(not 0 <= a <= 1 for a in t.wise_alphas):
        problems.append(f"--wise-alphas must be numbers in [0, 1] (got {','.join(map(str, t.wise_alphas))})")
    if len(set(t.wise_alphas)) != len(t.wise_alphas):
        problems.append(f"--wise-alphas lists a value twice: {','.join(map(str, t.wise_alphas))}")
    if t.wise_from in ("wise",) or t.wise_from not in ARMS:
        problems.append(f"--wise-from '{t.wise_from}' is not a trained arm: choose from "
                        f"{', '.join(a for a in ARMS if a != 'wise')}")
    tokens_per_step = t.seq_len * t.micro_batch * t.grad_accum * t.nproc
    if t.budget_tokens > 0 and t.budget_tokens < tokens_per_step:
        problems.append(
            f"--budget-tokens {t.budget_tokens} is less than one optimizer step "
            f"({t.seq_len} seq-len x {t.micro_batch} micro-batch x {t.grad_accum} grad-accum x {t.nproc} nproc = "
            f"{tokens_per_step} tokens): raise the budget or shrink the batch"
        )
    return problems


def _seed_problems(t: TrainConfig) -> list[str]:
    """Every seed a run uses (seed and data seed, shifted by up to --seeds - 1) must seed torch, numpy and
    Python alike: numpy refuses negatives, torch anything of 64 bits or more."""
    problems = []
    top = MAX_SEED - (max(t.seeds, 1) - 1)
    named = [("--seed", t.seed)] + ([("data_seed", t.data_seed)] if t.data_seed != t.seed else [])
    for name, value in named:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
            more = f" with --seeds {t.seeds}" if t.seeds > 1 else ""
            problems.append(f"{name} must be a whole number between 0 and {top}{more} (got {value!r})")
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
    if e.screen_items is not None and e.screen_items < 0:
        problems.append(f"--screen-items must be >= 0 (0: no separate screen items) (got {e.screen_items})")
    return problems


def validate_gate(g: GateConfig) -> list[str]:
    problems = _gate_extra_problems(g)
    if not problems and not 0 < g.alpha < 1:
        problems.append(f"--alpha must be in (0, 1) (got {g.alpha})")
    return problems


def _gate_extra_problems(g: GateConfig) -> list[str]:
    """Thresholds must be finite numbers >= 0 (NaN, inf and negatives refused), the choices known."""
    import math

    problems = []
    for name, flag in (("max_drop", "--max-drop"), ("max_relative_drop", "--max-relative-drop"),
                       ("max_mean_drop", "--max-mean-drop"), ("min_domain_gain", "--min-domain-gain"),
                       ("max_ppl_rise", "--max-ppl-rise"), ("max_kl", "--max-kl"), ("alpha", "--alpha")):
        v = getattr(g, name)
        if v is None and name in ("max_relative_drop", "min_domain_gain", "max_ppl_rise", "max_kl"):
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            problems.append(f"{flag} must be a finite number (got {v!r})")
        elif v < 0 and name != "min_domain_gain":
            problems.append(f"{flag} must be >= 0 (got {v:g})")
        elif name == "max_relative_drop" and not 0 < v <= 100:
            problems.append(f"{flag} must be a percent in (0, 100] of the base's score, or 'off' (got {v:g})")
    if g.metric not in ("acc", "soft"):
        problems.append(f"--metric must be acc or soft (got {g.metric!r})")
    if g.on_inconclusive not in ("inconclusive", "fail", "pass"):
        problems.append(f"--on-inconclusive must be fail or pass (got {g.on_inconclusive!r})")
    if not isinstance(g.keep_uninformative, bool):
        problems.append(f"keep_uninformative must be true or false (got {g.keep_uninformative!r})")
    for pair in g.tiers:
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str) and pair[0]):
            problems.append(f"tiers must map task names or patterns to a tier (got {pair!r})")
        elif pair[1] not in TIERS:
            problems.append(f"tiers: {pair[0]} = {pair[1]!r}: a tier is one of {', '.join(TIERS)}")
    return problems


TIERS = ("critical", "supporting", "advisory")
"""The release tiers of a gated task (GateConfig.tiers; docs/verdicts.md, "Tiers")."""


def validate_arms(arms: tuple[str, ...], *, flag: str = "--arms", trained: bool = False) -> list[str]:
    """The one home of the arm rules: at least one, each known, none twice; `trained`: each one trains
    (`wise` interpolates weights, only `run` builds it)."""
    problems = [] if arms else [f"{flag} is empty: give at least one of sft,cpt"]
    problems += [f"unknown arm '{a}' in {flag}: choose from {', '.join(ARMS)}" for a in arms if a not in ARMS]
    if trained:
        problems += [f"arm '{a}' is not trained (it interpolates weights): use `forgetcheck run --arms ...,{a}`"
                     for a in arms if a in ARMS and a not in ARM_DATA]
    if len(set(arms)) != len(arms):
        problems.append(f"{flag} lists an arm twice: {','.join(arms)}")
    return problems


def validate_arm_training(arms: tuple[str, ...], t: TrainConfig) -> list[str]:
    """The rules that join an arm and the training technique."""
    if "lora" in arms and t.nproc > 1:
        return ["--arms lora with --nproc > 1: LoRA under FSDP2 is not supported; use --nproc 1"]
    return []


def validate_device(device: str) -> list[str]:
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        return [f"unknown --device '{device}': use auto, cpu or cuda[:N]"]
    return []


def validate(cfg: RunConfig) -> list[str]:
    problems = validate_arms(cfg.arms)
    if "wise" in cfg.arms and cfg.train.wise_from not in cfg.arms:
        problems.append(f"--arms wise interpolates --wise-from {cfg.train.wise_from}, which is not in --arms: "
                        f"add it (--arms {','.join(cfg.arms)},{cfg.train.wise_from})")
    return (problems + validate_device(cfg.device) + validate_train(cfg.train)
            + validate_arm_training(cfg.arms, cfg.train) + validate_eval(cfg.eval) + validate_gate(cfg.gate)
            + validate_looks(cfg.looks, cfg.eval.limit, cfg.gate.metric))


def check(problems: list[str]) -> None:
    """Raise one BadInput naming every problem at once."""
    if problems:
        n = len(problems)
        head = "bad configuration" if n == 1 else f"bad configuration ({n} problems)"
        raise BadInput(f"{head}: " + "; ".join(problems))


def to_dict(cfg) -> dict:
    """Plain JSON-able dict of a config dataclass (tuples become lists)."""
    return dataclasses.asdict(cfg)


def _typed_section(section: str, cls, d, path: Path) -> dict:
    """The keys of one config.json section, each of the type its field's default has; BadInput otherwise."""
    if not isinstance(d, dict):
        raise BadInput(f"{path}: '{section}' is not a JSON object: the file was edited or is not forgetcheck's; "
                       f"start a new run")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise BadInput(f"{path}: unknown key(s) {', '.join(unknown)} in {section}: this config.json was not written "
                       f"by this forgetcheck (known: {', '.join(fields)}); remove them or start a new run")
    out = {}
    for k, v in d.items():
        f = fields[k]
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if isinstance(default, tuple):
            kind = (int, float) if default and isinstance(default[0], float) else str  # wise_alphas: numbers
            ok = isinstance(v, list) and all(isinstance(x, kind) and not isinstance(x, bool) for x in v)
            v = tuple(v) if ok else v
        elif isinstance(default, bool):
            ok = isinstance(v, bool)
        elif isinstance(default, int):
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif isinstance(default, float):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        elif isinstance(default, str):
            ok = isinstance(v, str)
        else:  # None by default: a number or a string (limit, min_domain_gain, run_id)
            ok = v is None or (isinstance(v, (int, float, str)) and not isinstance(v, bool))
        if not ok:
            raise BadInput(f"{path}: {section}.{k} is {v!r}, of the wrong type: the file was edited; restore it "
                           f"or start a new run")
        out[k] = v
    return out


def from_dict(d: dict, path: Path = Path("config.json")) -> RunConfig:
    """The RunConfig that `to_dict` turned into `d` (config.json minus its schema_version, kind and resolved):
    every key known and of its field's type, so an edited file is refused naming the key."""
    d = {k: v for k, v in d.items() if k not in ("schema_version", "kind", "resolved")}
    sections = {"train": TrainConfig, "eval": EvalConfig, "gate": GateConfig, "looks": LookConfig}
    parts = {k: cls(**_typed_section(k, cls, d.pop(k, {}), path)) for k, cls in sections.items()}
    return RunConfig(**_typed_section("config.json", RunConfig, d, path), **parts)


def split_csv(value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    return tuple(x.strip() for x in value.split(",") if x.strip())
