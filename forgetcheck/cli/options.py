"""The command line's option groups: each is a frozen dataclass whose fields are the options (one definition,
one help text); `options(...)` puts a group's fields into a command's signature and hands the command one value
per group. Training and eval flags default to None ("not given"), so the preset fills them
(config.apply_preset). The commands themselves are in cli/app.py.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional, get_type_hints

import typer

from forgetcheck.config import split_csv
from forgetcheck.errors import BadInput

BaseOpt = Annotated[str, typer.Option("--base", help="Model to fine-tune: alias (smollm2-135m, tiny-gpt2), hub id, HF folder or .gguf.")]
DataOpt = Annotated[str, typer.Option("--data", help="Domain data: packaged name (med) or a folder with sft.jsonl / cpt.jsonl.")]
ArmsOpt = Annotated[str, typer.Option("--arms", help="Arms, comma-separated: sft, cpt (full fine-tuning), lora, replay, "
                    "freeze (mitigations, same budget), wise (base/arm weight interpolation, no training).")]
PresetOpt = Annotated[str, typer.Option("--preset", help="quick (2-core CPU) | forget (2-core CPU, lr and budget at which smollm2-135m forgets; docs/curves.md) | standard | full (every item; GPU): defaults for the training and eval flags.")]
OutOpt = Annotated[Path, typer.Option("--out", help="Folder that holds the run folders.")]
RunIdOpt = Annotated[Optional[str], typer.Option("--run-id", help="Name of the new run folder (default: time-model-data).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda[:N]")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", help="Show lm-eval's, datasets' and transformers' own output on the console (else it goes to the log file).")]


@dataclass(frozen=True)
class TrainFlags:
    """Training options shared by `train` and `run` (TrainConfig overrides)."""

    PANEL = "Training (the preset fills what is not given)"

    budget_tokens: Annotated[Optional[int], typer.Option("--budget-tokens", help="Tokens each arm feeds forward (padding excluded).")] = None
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", help="Tokens per training row.")] = None
    micro_batch: Annotated[Optional[int], typer.Option("--micro-batch", help="Rows per forward pass (per process).")] = None
    grad_accum: Annotated[Optional[int], typer.Option("--grad-accum", help="Micro-batches per optimizer step.")] = None
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (warmup + cosine).")] = None
    precision: Annotated[Optional[str], typer.Option("--precision", help="fp32 | bf16-mixed | fp16-mixed | bf16-true")] = None
    grad_checkpointing: Annotated[Optional[bool], typer.Option("--grad-checkpointing/--no-grad-checkpointing", help="Recompute activations in backward.")] = None
    optim: Annotated[Optional[str], typer.Option("--optim", help="adamw | adamw8bit (torchao, else bitsandbytes)")] = None
    nproc: Annotated[Optional[int], typer.Option("--nproc", help="Processes for FSDP2 sharding (torchrun).")] = None
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed and data-order seed.")] = None
    seeds: Annotated[Optional[int], typer.Option("--seeds", help="Train each arm K times (data order seed, seed+1, ...); arms are then compared with a two-level bootstrap (seeds, then items). Default 1.")] = None
    include_prompt_loss: Annotated[Optional[bool], typer.Option("--include-prompt-loss/--no-include-prompt-loss", help="SFT: also train on prompt tokens.")] = None
    save_every: Annotated[Optional[int], typer.Option("--save-every", help="Resumable checkpoint every N steps (0: none).")] = None
    force: Annotated[Optional[bool], typer.Option("--force/--no-force", help="Start even when the memory plan does not fit.")] = None
    eval_every: Annotated[Optional[int], typer.Option("--eval-every", help="Forgetting curves: measure KL, bits per byte and retention soft accuracy every N steps (every N/4 in the first quarter of the budget); 0: off. The preset chooses N.")] = None
    stop_if_forecast_exceeds: Annotated[Optional[float], typer.Option("--stop-if-forecast-exceeds", help="Stop an arm when the forecast (at a quarter of the budget) says its retention soft accuracy will very likely drop by more than PTS points; the checkpoint it reached is kept.")] = None
    # The mitigation arms' flags (train/arms.py); defaults and their reasons there
    lora_rank: Annotated[Optional[int], typer.Option("--lora-rank", help="lora: adapter rank. Default 16.")] = None
    lora_alpha: Annotated[Optional[float], typer.Option("--lora-alpha", help="lora: alpha (scale alpha/rank). Default 32.")] = None
    lora_lr: Annotated[Optional[float], typer.Option("--lora-lr", help="lora: peak learning rate. Default 2e-4.")] = None
    replay_frac: Annotated[Optional[float], typer.Option("--replay-frac", help="replay: share of tokens that is general text. Default 0.05.")] = None
    freeze_layers: Annotated[Optional[int], typer.Option("--freeze-layers", help="freeze: bottom blocks frozen. Default half.")] = None

    def overrides(self) -> dict:
        """TrainConfig overrides (None: not given, the preset decides); --seed also seeds the data order."""
        return {**dataclasses.asdict(self), "data_seed": self.seed}


@dataclass(frozen=True)
class WiseFlags:
    """The `wise` arm (train/interpolate.py): which trained arm is interpolated with the base, and where."""

    PANEL = "Weight interpolation (--arms ...,wise)"

    wise_from: Annotated[Optional[str], typer.Option("--wise-from", help="wise: the trained arm interpolated with the base. Default sft.")] = None
    wise_alphas: Annotated[Optional[str], typer.Option("--wise-alphas", help="wise: a of (1-a)*base + a*arm, comma list. Default 0.25,0.5,0.75.")] = None

    def overrides(self) -> dict:
        alphas = None
        if self.wise_alphas is not None:
            try:
                alphas = tuple(float(x) for x in self.wise_alphas.split(",") if x.strip())
            except ValueError:
                raise BadInput(f"--wise-alphas '{self.wise_alphas}' is not a comma list of numbers such as "
                               f"0.25,0.5,0.75") from None
        return dict(wise_from=self.wise_from, wise_alphas=alphas)


@dataclass(frozen=True)
class EvalFlags:
    """Evaluation options shared by `eval` and `run` (EvalConfig overrides)."""

    PANEL = "Evaluation"

    suite: Annotated[str, typer.Option("--suite", help="Suites to run: retention, domain (comma list).")] = "retention,domain"
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="Only these tasks (comma list; overrides --suite): ours, a group of ours (forgetcheck_retention) or lm-eval's hub tasks.")] = None
    limit: Annotated[Optional[int], typer.Option("--limit", help="Deterministic stratified subset of N items per task (the same items for every model). Default: the preset's.")] = None
    backend: Annotated[Optional[str], typer.Option("--backend", help="fast (each context scored once) | hf (stock lm-eval HFLM).")] = None
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Requests per forward pass.")] = None

    def overrides(self) -> dict:
        return dict(suites=split_csv(self.suite), tasks=split_csv(self.tasks), limit=self.limit, backend=self.backend,
                    batch_size=self.batch_size)


@dataclass(frozen=True)
class GateFlags:
    """The release gate's policy, for `run` (the `gate` command also reads a policy file)."""

    PANEL = "Release gate"

    max_drop: Annotated[float, typer.Option("--max-drop", help="Gate margin: points a retention task may drop.")] = 2.0
    max_mean_drop: Annotated[float, typer.Option("--max-mean-drop", help="Gate margin: points the retention mean may drop.")] = 1.0
    alpha: Annotated[float, typer.Option("--alpha", help="Gate: one-sided level of every bound and test.")] = 0.05
    min_domain_gain: Annotated[Optional[float], typer.Option("--min-domain-gain", help="Gate: required domain gain (points).")] = None
    metric: Annotated[str, typer.Option("--metric", help="Gate score: soft | acc.")] = "soft"
    max_ppl_rise: Annotated[str, typer.Option("--max-ppl-rise", help="Gate margin: % rise of general-text bits per byte, or off.")] = "10"
    max_kl: Annotated[str, typer.Option("--max-kl", help="Gate margin: mean KL from the base (nats/token), or off.")] = "0.1"
    keep_uninformative: Annotated[bool, typer.Option(
        "--keep-uninformative/--drop-uninformative",
        help="Score the arms on, and gate, retention tasks whose base is not above chance too (default: left out, "
             "and not scored for the arms).")] = False

    def config(self):
        """The GateConfig these flags ask for ("off" turns a drift rule off)."""
        from forgetcheck.config import GateConfig
        from forgetcheck.verdict.policy import margin_value

        return GateConfig(max_drop=self.max_drop, max_mean_drop=self.max_mean_drop, alpha=self.alpha,
                            min_domain_gain=self.min_domain_gain, metric=self.metric,
                            max_ppl_rise=margin_value("--max-ppl-rise", self.max_ppl_rise),
                            max_kl=margin_value("--max-kl", self.max_kl), keep_uninformative=self.keep_uninformative)


def _in_panel(annotation, panel: str):
    """`Annotated[T, typer.Option(...)]` shown under its group's heading in --help."""
    info = copy.copy(annotation.__metadata__[0])
    info.rich_help_panel = panel
    return Annotated[annotation.__origin__, info]


def options(**groups: type) -> Callable:
    """`@options(train=TrainFlags)`: the command gets every field of TrainFlags as an option, and receives
    them as one `train: TrainFlags` argument."""

    def wrap(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        hints = get_type_hints(fn, include_extras=True)
        own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()
               if p.name not in groups]
        fields = {g: [(f.name, _in_panel(get_type_hints(cls, include_extras=True)[f.name], cls.PANEL), f.default)
                      for f in dataclasses.fields(cls)] for g, cls in groups.items()}
        extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=a, default=d)
                 for fs in fields.values() for n, a, d in fs]
        names = [p.name for p in own] + [p.name for p in extra]
        assert len(names) == len(set(names)), f"option names collide in {fn.__name__}"

        @functools.wraps(fn)
        def command(**kwargs):
            for g, cls in groups.items():
                kwargs[g] = cls(**{n: kwargs.pop(n) for n, _, _ in fields[g]})
            return fn(**kwargs)

        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + extra
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__  # typer must see the new signature, not fn's
        return command

    return wrap


# ---- the verdict's policy: `gate` and `check` (flags override --policy and the run's config.json) ----------

MaxDropOpt = Annotated[Optional[float], typer.Option("--max-drop", help="Margin: points a gated retention task "
                                                     "may drop. Default 2.")]
MaxMeanDropOpt = Annotated[Optional[float], typer.Option("--max-mean-drop", help="Margin: points the retention mean "
                                                         "may drop. Default 1.")]
GateAlphaOpt = Annotated[Optional[float], typer.Option("--alpha", help="One-sided level of every bound and test. "
                                                       "Default 0.05.")]
MinDomainGainOpt = Annotated[Optional[float], typer.Option("--min-domain-gain", help="Require the domain mean to "
                                                           "rise by at least this many points (lower bound).")]
MetricOpt = Annotated[Optional[str], typer.Option("--metric", help="acc | soft (probability on the correct choice). "
                                                  "Default soft (docs/verdicts.md).")]
MaxPplRiseOpt = Annotated[Optional[str], typer.Option("--max-ppl-rise", help="Margin: percent rise of general-text "
                                                      "bits per byte, or 'off'. Default 10.")]
MaxKlOpt = Annotated[Optional[str], typer.Option("--max-kl", help="Margin: mean KL from the base, nats per token, "
                                                 "or 'off'. Default 0.1.")]
OnInconclusiveOpt = Annotated[Optional[str], typer.Option("--on-inconclusive", help="fail | pass: exit 1 or 0 "
                                                          "instead of 4 for an INCONCLUSIVE verdict (said in the "
                                                          "output).")]
KeepUninformativeOpt = Annotated[Optional[bool], typer.Option("--keep-uninformative/--drop-uninformative",
                                                              help="Gate retention tasks whose base is not above "
                                                              "chance too (default: left out).")]
PolicyOpt = Annotated[Optional[Path], typer.Option("--policy", help="gate.toml with the same keys (flags override it).")]
JunitOpt = Annotated[Optional[Path], typer.Option("--junit", help="Also write JUnit XML (one testcase per rule; "
                                                  "INCONCLUSIVE ones skipped).")]
MarkdownOpt = Annotated[Optional[Path], typer.Option("--markdown", help="Also write a Markdown summary.")]


@dataclass(frozen=True)
class VerdictFlags:
    """The gate's policy overrides and outputs, shared by `gate` and `check` (None: not given; the policy file
    or the run's config decides)."""

    PANEL = "Release gate (flags override --policy and the run's config)"

    max_drop: MaxDropOpt = None
    max_mean_drop: MaxMeanDropOpt = None
    alpha: GateAlphaOpt = None
    min_domain_gain: MinDomainGainOpt = None
    metric: MetricOpt = None
    max_ppl_rise: MaxPplRiseOpt = None
    max_kl: MaxKlOpt = None
    on_inconclusive: OnInconclusiveOpt = None
    keep_uninformative: KeepUninformativeOpt = None
    policy: PolicyOpt = None
    junit: JunitOpt = None
    markdown: MarkdownOpt = None

    def overrides(self) -> dict:
        from forgetcheck.verdict.policy import flag_number

        return {"max_drop": self.max_drop, "max_mean_drop": self.max_mean_drop, "alpha": self.alpha,
                "min_domain_gain": self.min_domain_gain, "metric": self.metric,
                "max_ppl_rise": flag_number("--max-ppl-rise", self.max_ppl_rise),
                "max_kl": flag_number("--max-kl", self.max_kl), "on_inconclusive": self.on_inconclusive,
                "keep_uninformative": self.keep_uninformative}
