"""`forgetcheck eval`: one model benchmarked into one eval JSON (eval/runner.py does the scoring), every input
refused before a model is loaded (cli/inputs.resolve_eval); under torchrun every process scores its share of the
items."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from forgetcheck import config, console
from forgetcheck.cli.inputs import Inputs, resolve_eval
from forgetcheck.cli.options import (
    AllowTaskCodeOpt,
    DeviceOpt,
    EvalFlags,
    PresetOpt,
    TasksDirOpt,
    VerboseOpt,
    options,
)


@options(ev=EvalFlags)
def eval_cmd(
    model: str = typer.Option(..., "--model", help="Alias (smollm2-135m, tiny-gpt2), local HF folder (e.g. a "
                              "checkpoint), .gguf file or hub id."),
    out: Path = typer.Option(..., "--out", help="Eval JSON to write; per-item lines go to <folder>/samples/<stem>/."),
    ev: EvalFlags = EvalFlags(),
    preset: PresetOpt = "full",
    device: DeviceOpt = "auto",
    reference: Optional[Path] = typer.Option(None, "--reference", help="The base model's eval JSON: adds KL drift "
                                             "(reference || this model) on general text. Without it the model is "
                                             "scored as a base: with its --screen-items."),
    tasks_dir: TasksDirOpt = None,
    allow_task_code: AllowTaskCodeOpt = False,
    device_map: Optional[str] = typer.Option(None, "--device-map", help="auto | balanced | sequential: split a model "
                                             "larger than one GPU across the visible GPUs (docs/scale.md)."),
    verbose: VerboseOpt = False,
) -> None:
    """Benchmark one model on the suites' tasks (lm-eval, offline, cached) and measure drift on general text.
    `--preset quick` scores the same items (and hits the same cache) as `forgetcheck run --preset quick`.
    Under torchrun, every process scores its share of the items (data-parallel; docs/scale.md)."""
    _, eval_cfg = config.apply_preset(preset, {}, ev.overrides())
    cmd_eval(model, eval_cfg, out, device=device, reference=reference, tasks_dir=tasks_dir, device_map=device_map,
             verbose=verbose, allow_task_code=allow_task_code)


def cmd_eval(model: str, cfg: config.EvalConfig, out: Path, *, device: str = "auto", reference: Path | None = None,
             tasks_dir: Path | None = None, device_map: str | None = None, verbose: bool = False,
             allow_task_code: bool = False) -> dict:
    """Resolve, print the resolved config, evaluate, print a summary table. The libraries' output goes to
    `<out folder>/<out stem>.log.txt` (console.py) unless `verbose`."""
    import logging

    with console.session(verbose=verbose):
        inp = resolve_eval(model, cfg, out, device=device, reference=reference, tasks_dir=tasks_dir,
                           device_map=device_map, allow_task_code=allow_task_code)
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
        return _evaluate(inp, device_map)


def _evaluate(inp: Inputs, device_map: str | None) -> dict:
    from forgetcheck.eval.drift import DRIFT_TOP_K
    from forgetcheck.eval.runner import evaluate

    ref, cfg, out, ranks = inp.model, inp.cfg.eval, inp.eval_out, inp.ranks
    dev_name = inp.device_name
    # a model evaluated against a reference is compared with it, so it is not a base: no screen items for it
    screen = inp.reference is None
    if inp.rank != 0:  # data-parallel: every rank scores its share of the items; rank 0 writes the files
        evaluate(ref, cfg, out, device=dev_name, reference=inp.reference, tasks_dir=inp.tasks_dir, screen=screen)
        return {}
    if device_map:
        dev_name = "cuda" if dev_name.startswith("cuda") else dev_name
    log = out.parent / f"{out.stem}.log.txt"
    console.log_to(log)
    console.say(f"eval {ref.name} ({ref.path}{', RANDOM WEIGHTS' if ref.random_weights else ''}); "
                f"{inp.device.describe()}; suites {','.join(cfg.suites)}; "
                f"tasks {','.join(cfg.tasks) or 'all of the suites'}; "
                f"limit {cfg.limit if cfg.limit is not None else 'all items'}"
                + (f" (+{cfg.screen_count()} screen items per retention multiple-choice task)"
                   if screen and cfg.screen_count() else "") + f"; backend {cfg.backend}; "
                f"batch size {cfg.batch_size}" + (f"; data-parallel over {ranks['world']} processes ({ranks['source']})"
                                                  if ranks else "") + f"; log: {log}")
    with console.stage(f"evaluate {ref.name}"):
        doc = evaluate(ref, cfg, out, device=dev_name, reference=inp.reference, tasks_dir=inp.tasks_dir,
                       device_map=device_map, screen=screen)
    console.say(f"{'task':<28} {'suite':<10} {'n':>5} {'metric':<16} {'value':>10} {'stderr':>8}")
    for name, t in doc["tasks"].items():
        m = t["metrics"].get(t["primary_metric"], {})
        se = m.get("stderr")
        console.say(f"{name:<28} {t['suite']:<10} {t['n']:>5} {t['primary_metric']:<16} "
                    f"{m.get('value', float('nan')):>10.4f} {'' if se is None else f'{se:.4f}':>8}")
    dr = doc["drift"]
    line = f"drift text: {dr['text']['source']}; perplexity {dr['perplexity']:.3f}"
    if "kl" in dr:
        line += f"; KL(reference || model) {dr['kl']['mean']:.5f} nats/token (top-{DRIFT_TOP_K} + tail, lower bound)"
    console.say(line)
    console.say(f"wrote {out}")
    return doc
