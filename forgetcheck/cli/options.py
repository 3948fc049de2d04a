"""The command line's option groups, built from the config dataclasses: a field declared with `config.flag` is an
option, with the help text written there once. `option_group(...)` makes a frozen dataclass of the chosen fields
(each an `Annotated[..., typer.Option]`), and `options(...)` puts a group's fields into a command's signature and
hands the command one value per group. Training and eval flags default to None ("not given"), so the preset
fills them (config.apply_preset); the gate's flags default to None too (the policy file, the run's config or
GateConfig decides).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional, get_type_hints

import typer

from forgetcheck import config
from forgetcheck.config import split_csv
from forgetcheck.errors import BadInput

BaseOpt = Annotated[str, typer.Option("--base", help="Model to fine-tune: alias (smollm2-135m, tiny-gpt2), hub id, HF folder or .gguf.")]
DataOpt = Annotated[str, typer.Option("--data", help="Domain data: packaged name (med) or a folder with sft.jsonl / cpt.jsonl.")]
ArmsOpt = Annotated[str, typer.Option("--arms", help="Arms, comma-separated: sft, cpt (full fine-tuning), lora, replay, "
                    "freeze (mitigations, same budget), wise (base/arm weight interpolation, no training).")]
PresetOpt = Annotated[str, typer.Option("--preset", help="quick (2-core CPU smoke test) | forget (2-core CPU, lr and budget at which smollm2-135m forgets and learns, with curves; docs/curves.md) | demo (forget without curves, 30 items: make demo) | standard | full (every item; GPU): defaults for the training and eval flags.")]
OutOpt = Annotated[Path, typer.Option("--out", help="Folder that holds the run folders.")]
RunIdOpt = Annotated[Optional[str], typer.Option("--run-id", help="Name of the new run folder (default: time-model-data).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda[:N]")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", help="Show lm-eval's, datasets' and transformers' own output on the console (else it goes to the log file).")]
TasksDirOpt = Annotated[Optional[Path], typer.Option("--tasks-dir", help="lm-eval task YAMLs to use instead of forgetcheck's tasks/ (one with lm-eval's `!function`, which runs Python, needs --allow-task-code).")]
AllowTaskCodeOpt = Annotated[bool, typer.Option("--allow-task-code", help="Let --tasks-dir YAMLs run their Python through lm-eval's `!function` (refused without it).")]


def _cli_type(f: dataclasses.Field, hint) -> type:
    """The type typer parses a field as: str for a text field, else the field's type without None."""
    if f.metadata.get("text"):
        return str
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return hint


def _decls(f: dataclasses.Field) -> str:
    return f.metadata.get("decls") or "--" + f.name.replace("_", "-")


def param_name(f: dataclasses.Field) -> str:
    """The command's parameter for a flagged field: its flag's name (`--suite` fills EvalConfig.suites)."""
    return _decls(f).split("/")[0][2:].replace("-", "_")


def _option(f: dataclasses.Field, hint, panel: str):
    """`Annotated[Optional[T], typer.Option(...)]` of one flagged field, shown under `panel` in --help."""
    kind = _cli_type(f, hint)
    decls = _decls(f)
    if kind is bool and "/" not in decls:
        decls = f"{decls}/--no-{decls[2:]}"
    return Annotated[Optional[kind], typer.Option(decls, help=f.metadata["help"], rich_help_panel=panel)]


def option_group(name: str, cls: type, names: tuple[str, ...], panel: str, *, defaults: dict | None = None,
                 extra: tuple = (), methods: dict | None = None) -> type:
    """A frozen dataclass whose fields are the options of `cls`'s fields `names` (default None: not given, unless
    `defaults` names one; each field named by `param_name`), then `extra` (name, annotation, default) options."""
    hints = get_type_hints(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    fields = [(param_name(by_name[n]), _option(by_name[n], hints[n], panel),
               dataclasses.field(default=(defaults or {}).get(n))) for n in names]
    fields += [(n, a, dataclasses.field(default=d)) for n, a, d in extra]
    return dataclasses.make_dataclass(name, fields, frozen=True, namespace={"PANEL": panel, **(methods or {})})


def given(group) -> dict:
    """The fields of a group the user gave (not None)."""
    return {k: v for k, v in dataclasses.asdict(group).items() if v is not None}


# ---- training: `train`, `run`, and `plan` for the flags it shares -------------------------------------------

TRAIN_FLAGS = ("budget_tokens", "seq_len", "micro_batch", "grad_accum", "lr", "precision", "grad_checkpointing",
               "compile", "optim", "nproc", "seed", "seeds", "include_prompt_loss", "save_every", "force", "eval_every",
               "stop_if_forecast_exceeds", "lora_rank", "lora_alpha", "lora_lr", "replay_frac", "freeze_layers")


def _train_overrides(self) -> dict:
    """TrainConfig overrides (None: not given, the preset decides); --seed also seeds the data order."""
    return {**dataclasses.asdict(self), "data_seed": self.seed}


TrainFlags = option_group("TrainFlags", config.TrainConfig, TRAIN_FLAGS,
                          "Training (the preset fills what is not given)", methods={"overrides": _train_overrides})

PLAN_FLAGS = ("precision", "optim", "grad_checkpointing", "nproc", "micro_batch", "seq_len", "lora_rank",
              "freeze_layers")
PLAN_DEFAULTS = {"micro_batch": 1, "seq_len": 2048}
"""`plan` sizes one optimizer step of a long sequence; its other flags default to TrainConfig's."""


def _plan_config(self) -> config.TrainConfig:
    """The TrainConfig `plan` sizes: one step's tokens as the budget."""
    values = {**given(self), "budget_tokens": self.seq_len * self.micro_batch * self.nproc}
    return config.TrainConfig(**values)


PlanFlags = option_group("PlanFlags", config.TrainConfig, PLAN_FLAGS, "Training",
                         defaults={n: PLAN_DEFAULTS.get(n, f.default) for f in dataclasses.fields(config.TrainConfig)
                                   for n in [f.name] if n in PLAN_FLAGS},
                         methods={"config": _plan_config})


def _wise_overrides(self) -> dict:
    alphas = None
    if self.wise_alphas is not None:
        try:
            alphas = tuple(float(x) for x in self.wise_alphas.split(",") if x.strip())
        except ValueError:
            raise BadInput(f"--wise-alphas '{self.wise_alphas}' is not a comma list of numbers such as "
                           f"0.25,0.5,0.75") from None
    return dict(wise_from=self.wise_from, wise_alphas=alphas)


WiseFlags = option_group("WiseFlags", config.TrainConfig, ("wise_from", "wise_alphas"),
                         "Weight interpolation (--arms ...,wise)", methods={"overrides": _wise_overrides})


# ---- evaluation: `eval`, `run`, `check` ---------------------------------------------------------------------

def _eval_overrides(self) -> dict:
    return dict(suites=None if self.suite is None else split_csv(self.suite), tasks=split_csv(self.tasks) or None,
                limit=self.limit, backend=self.backend, batch_size=self.batch_size, screen_items=self.screen_items)


EvalFlags = option_group("EvalFlags", config.EvalConfig, ("suites", "tasks", "limit", "backend", "batch_size",
                                                          "screen_items"),
                         "Evaluation", methods={"overrides": _eval_overrides})


LookFlags = option_group("LookFlags", config.LookConfig, ("until_decided", "max_items", "max_minutes"),
                         "Scoring until decided", defaults={"until_decided": False},
                         methods={"config": lambda self: config.LookConfig(self.until_decided, self.max_items,
                                                                             self.max_minutes)})


# ---- the release gate: `run` (into config.json), `gate` and `check` (over --policy and the run's config) -----

GATE_FLAGS = ("max_drop", "max_relative_drop", "max_mean_drop", "alpha", "min_domain_gain", "metric", "max_ppl_rise",
              "max_kl", "keep_uninformative")


def _gate_overrides(self) -> dict:
    """The policy keys given ('off' kept as the word; None: not given)."""
    from forgetcheck.verdict.policy import OFF_KEYS, flag_number

    values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in config.GateConfig.__dataclass_fields__}
    for name in OFF_KEYS:
        values[name] = flag_number("--" + name.replace("_", "-"), values[name])
    return values


def _gate_config(self) -> config.GateConfig:
    """The GateConfig these flags ask for over the defaults ("off" turns a drift rule off)."""
    values = {k: v for k, v in _gate_overrides(self).items() if v is not None}
    return config.GateConfig(**{k: None if v == "off" else v for k, v in values.items()})


GateFlags = option_group("GateFlags", config.GateConfig, GATE_FLAGS, "Release gate",
                         methods={"overrides": _gate_overrides, "config": _gate_config})

PolicyOpt = Annotated[Optional[Path], typer.Option("--policy", help="gate.toml with the same keys (flags override it).")]
JunitOpt = Annotated[Optional[Path], typer.Option("--junit", help="Also write JUnit XML (one testcase per rule; "
                                                  "INCONCLUSIVE ones skipped).")]
MarkdownOpt = Annotated[Optional[Path], typer.Option("--markdown", help="Also write a Markdown summary.")]

VerdictFlags = option_group(
    "VerdictFlags", config.GateConfig, (*GATE_FLAGS, "on_inconclusive"),
    "Release gate (flags override --policy and the run's config)",
    extra=(("policy", PolicyOpt, None), ("junit", JunitOpt, None), ("markdown", MarkdownOpt, None)),
    methods={"overrides": _gate_overrides})
"""The gate's policy overrides and outputs, shared by `gate` and `check`."""


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
        fields = {g: [(f.name, _in_panel(f.type, cls.PANEL), f.default) for f in dataclasses.fields(cls)]
                  for g, cls in groups.items()}
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
