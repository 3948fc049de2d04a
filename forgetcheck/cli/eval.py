"""`forgetcheck eval`: one model benchmarked into one eval JSON (eval/runner.py does the scoring), every input
refused before a model is loaded; under torchrun every process scores its share of the items."""

from __future__ import annotations

from pathlib import Path

from forgetcheck import console
from forgetcheck.config import EvalConfig, check, validate_eval
from forgetcheck.errors import BadInput
from forgetcheck.eval.drift import DRIFT_TOP_K
from forgetcheck.eval.runner import evaluate
from forgetcheck.rundir import read_json


def cmd_eval(model: str, cfg: EvalConfig, out: Path, *, device: str = "auto", reference: Path | None = None,
             tasks_dir: Path | None = None, device_map: str | None = None, verbose: bool = False) -> dict:
    """`forgetcheck eval`: resolve, print the resolved config, evaluate, print a summary table. The libraries'
    output goes to `<out folder>/<out stem>.log.txt` (console.py) unless `verbose`."""
    with console.session(verbose=verbose):
        return _cmd_eval(model, cfg, out, device=device, reference=reference, tasks_dir=tasks_dir,
                         device_map=device_map)


def _cmd_eval(model: str, cfg: EvalConfig, out: Path, *, device: str, reference: Path | None,
              tasks_dir: Path | None, device_map: str | None) -> dict:
    import logging

    from forgetcheck.device import choose_device
    from forgetcheck.eval.suites import task_problems
    from forgetcheck.models import registry
    from forgetcheck.rundir import check_output_file
    from forgetcheck.schema import require
    from forgetcheck.train import sharding

    ext = sharding.external_ranks()
    problems = validate_eval(cfg)
    if device_map not in (None, "auto", "balanced", "sequential"):
        problems.append(f"unknown --device-map '{device_map}': use auto, balanced or sequential")
    if ext is not None and device_map:
        problems.append("--device-map splits one model over the GPUs, but under torchrun every process scores its "
                        "own items with a whole model: use one or the other")
    for step in (lambda: registry.resolve(model, prepare=False, flag="--model"), lambda: choose_device(device),
                 lambda: check_output_file(Path(out), "--out"),
                 lambda: reference is not None and require(read_json(reference), "eval", f"--reference {reference}")):
        try:
            step()
        except BadInput as e:
            problems.append(str(e))
    if not problems:
        problems += task_problems(cfg, tasks_dir)
    check(problems)  # everything refused before a model is built or loaded and before anything is written
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    dev = choose_device(device)
    dev_name, rank = dev.device, 0
    if ext is not None:  # data-parallel: every rank scores its share of the items; rank 0 writes the files
        import torch.distributed as dist

        rank, _, dev_name = sharding.join_external(dev.device)
        if rank != 0:
            dist.barrier()  # rank 0 prepares the model folder first
    ref = registry.resolve(model, flag="--model")
    if ext is not None and rank == 0:
        dist.barrier()
    if rank != 0:
        evaluate(ref, cfg, Path(out), device=dev_name, reference=reference, tasks_dir=tasks_dir)
        return {}
    if device_map:
        dev_name = "cuda" if dev_name.startswith("cuda") else dev_name
    log = Path(out).parent / f"{Path(out).stem}.log.txt"
    console.log_to(log)
    console.say(f"eval {ref.name} ({ref.path}{', RANDOM WEIGHTS' if ref.random_weights else ''}); {dev.describe()}; "
          f"suites {','.join(cfg.suites)}; tasks {','.join(cfg.tasks) or 'all of the suites'}; "
          f"limit {cfg.limit if cfg.limit is not None else 'all items'}; backend {cfg.backend}; "
          f"batch size {cfg.batch_size}" + (f"; data-parallel over {ext['world']} processes ({ext['source']})"
                                            if ext else "") + f"; log: {log}")
    with console.stage(f"evaluate {ref.name}"):
        doc = evaluate(ref, cfg, Path(out), device=dev_name, reference=reference, tasks_dir=tasks_dir,
                       device_map=device_map)
    console.say(f"{'task':<28} {'suite':<10} {'n':>5} {'metric':<16} {'value':>10} {'stderr':>8}")
    for name, t in doc["tasks"].items():
        m = t["metrics"].get(t["primary_metric"], {})
        se = m.get("stderr")
        console.say(f"{name:<28} {t['suite']:<10} {t['n']:>5} {t['primary_metric']:<16} {m.get('value', float('nan')):>10.4f} "
              f"{'' if se is None else f'{se:.4f}':>8}")
    dr = doc["drift"]
    line = f"drift text: {dr['text']['source']}; perplexity {dr['perplexity']:.3f}"
    if "kl" in dr:
        line += f"; KL(reference || model) {dr['kl']['mean']:.5f} nats/token (top-{DRIFT_TOP_K} + tail, lower bound)"
    console.say(line)
    console.say(f"wrote {out}")
    return doc
