"""Memory and speed of each training technique on GPT-2 124M (random weights), against the planner and
against transformers' Trainer with the same settings, timed in alternating pairs.

    python bench/train_memory.py [--device cpu|cuda] [--steps 5] [--pairs 3] [--seq-len 64] [--rows a,b]
                                 [--out docs/train_memory.md]

One row per technique combination. For each row the bench runs `--pairs` pairs, each pair forgetcheck's loop
(`train.train_arm`, CPT arm) and then `transformers.Trainer` on the same rows, micro-batch, accumulation,
precision, checkpointing, optimizer and compilation, each in a fresh process (so the peak-memory reading is its
own): A B A B ... A change of machine speed (another job, a thermal limit) lands on both sides of a pair, so the
ratio of each pair is the figure, and the row reports their median with the min-max range. Columns:
  * planned / measured weights+grads+optimizer state: the planner's bytes vs the sum of tensor bytes of the
    parameters, their gradients and the optimizer state after the first step (the +/-15% check);
  * planned total (with the activation estimate) vs measured peak (CPU: peak RSS of the process after a reset,
    so it includes Python and the libraries; GPU: torch.cuda.max_memory_allocated), from the first pair;
  * s/step and tokens/s: per process the median over the steps after the first (which pays for compilation and
    warm-up), then the median over the pairs; forgetcheck / Trainer: the median of the pairs' ratios [min-max];
  * load: the 1-minute load average before each pair, min-max (the machine has os.cpu_count() CPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = [
    ("fp32", {}),
    ("bf16-mixed", {"precision": "bf16-mixed"}),
    ("grad-ckpt", {"grad_checkpointing": True}),
    ("adamw8bit", {"optim": "adamw8bit"}),
    ("accum 2 x micro 1", {"micro_batch": 1, "grad_accum": 2}),
    ("bf16-mixed + ckpt + 8bit", {"precision": "bf16-mixed", "grad_checkpointing": True, "optim": "adamw8bit"}),
    ("compile", {"compile": True}),
]


def make_model(folder: Path) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from forgetcheck.models.tokenizer import write_tokenizer_files

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder)  # GPT-2 124M shape
    write_tokenizer_files(folder)
    (folder / "forgetcheck.json").write_text(json.dumps({"random_weights": True}))


def make_data(folder: Path) -> None:
    words = ("the patient presented with fever and cough after a week of travel; the clinician ordered a chest "
             "radiograph, blood cultures and a full count, and started empirical therapy pending results").split()
    with open(folder / "cpt.jsonl", "w") as f:
        for i in range(200):
            f.write(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(60))}) + "\n")


def median_after_first(xs: list[float]) -> float:
    return statistics.median(xs[1:] if len(xs) > 1 else xs)


def run_ours(model_dir: Path, data_dir: Path, cfg_kw: dict, device: str) -> dict:
    import torch

    from forgetcheck.config import TrainConfig
    from forgetcheck.data.domain import DomainData
    from forgetcheck.models.registry import resolve
    from forgetcheck.rundir import RunDir
    from forgetcheck.train import loop

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    cfg = TrainConfig(**cfg_kw)
    ref = resolve(str(model_dir))
    dom = DomainData(name="bench", root=data_dir, sft=None, cpt=data_dir / "cpt.jsonl", heldout=None, packaged=False)
    with tempfile.TemporaryDirectory() as tmp:
        rec = loop.train_arm("cpt", ref, dom, cfg, RunDir(tmp), device=device)
    mem = rec["memory"]
    planned = mem["planned"]
    measured = mem["measured_components"]
    s_step = median_after_first(rec["step_s"])
    return {
        "planned_states": planned["weights"] + planned["gradients"] + planned["optimizer_state"],
        "measured_states": measured["weights"] + measured["gradients"] + measured["optimizer_state"],
        "planned_total": planned["total"],
        "measured_peak": mem["measured_peak_bytes"],
        "method": mem["method"],
        "s_step": s_step,
        "tokens_per_s": loop.tokens_per_step(cfg) / s_step,
        "opt_bytes_per_param": measured["optimizer_state"] / (measured["weights"] / (2 if cfg.precision == "bf16-true" else 4)),
    }


def run_trainer(model_dir: Path, data_dir: Path, cfg_kw: dict, device: str) -> dict:
    """transformers.Trainer on the same packed rows and settings; timed per optimizer step by a callback."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from forgetcheck.config import TrainConfig
    from forgetcheck.models import registry
    from forgetcheck.train import loop, packing

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    cfg = TrainConfig(**cfg_kw)
    tok = registry.load_tokenizer(registry.resolve(str(model_dir)))
    n_rows = loop.optimizer_steps(cfg) * cfg.micro_batch * cfg.grad_accum
    rows = packing.build_rows("cpt", tok, data_dir / "cpt.jsonl", cfg, n_rows)
    dataset = [{"input_ids": rows.input_ids[i], "labels": rows.labels[i]} for i in range(n_rows)]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    for m in model.modules():  # same as forgetcheck's loop: no dropout
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=cfg.micro_batch,
            gradient_accumulation_steps=cfg.grad_accum, max_steps=loop.optimizer_steps(cfg),
            learning_rate=cfg.lr, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.max_grad_norm, bf16=cfg.precision == "bf16-mixed",
            gradient_checkpointing=cfg.grad_checkpointing,
            optim="adamw_torch_8bit" if cfg.optim == "adamw8bit" else "adamw_torch",
            use_cpu=not device.startswith("cuda"), report_to="none", save_strategy="no", logging_strategy="no",
            dataloader_num_workers=0, seed=cfg.seed, disable_tqdm=True, torch_compile=cfg.compile,
        )
        Trainer(model=model, args=args, train_dataset=dataset, callbacks=[StepTimer()]).train()
    s_step = median_after_first(times)
    return {"s_step": s_step, "tokens_per_s": loop.tokens_per_step(cfg) / s_step}


def child(argv: list[str]) -> None:
    which, model_dir, data_dir, cfg_json, device = argv
    fn = run_ours if which == "ours" else run_trainer
    out = fn(Path(model_dir), Path(data_dir), json.loads(cfg_json), device)
    print("BENCH_RESULT " + json.dumps(out), flush=True)


def run_child(which: str, model_dir: Path, data_dir: Path, cfg_kw: dict, device: str) -> dict:
    cmd = [sys.executable, __file__, "--child", which, str(model_dir), str(data_dir), json.dumps(cfg_kw), device]
    r = subprocess.run(cmd, capture_output=True, text=True)
    for line in r.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT "):])
    sys.stderr.write(r.stdout[-3000:] + r.stderr[-3000:])
    raise SystemExit(f"bench row failed: {which} {cfg_kw}")


def mb(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e6:,.0f}"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per process (the first is not timed)")
    ap.add_argument("--pairs", type=int, default=3, help="alternating (forgetcheck, Trainer) pairs per row")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="also write the table (Markdown) here")
    ap.add_argument("--rows", default=None, help="comma list of row names to run (default: all)")
    args = ap.parse_args()

    t_all = time.perf_counter()
    rows = [r for r in ROWS if args.rows is None or r[0] in args.rows.split(",")]
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, data_dir = Path(tmp) / "gpt2-124m-random", Path(tmp) / "data"
        model_dir.mkdir()
        data_dir.mkdir()
        make_model(model_dir)
        make_data(data_dir)
        header = ("| technique | planned W+G+O (MB) | measured W+G+O (MB) | diff | optim B/param | planned total (MB) "
                  "| measured peak (MB) | s/step | tokens/s | Trainer tokens/s | forgetcheck / Trainer | load |")
        lines += [header, "|" + "---|" * (header.count("|") - 1)]
        print(header, flush=True)
        for name, over in rows:
            kw = {"seq_len": args.seq_len, "micro_batch": args.micro_batch, "grad_accum": 1, "lr": 1e-4,
                  "warmup_frac": 0.0, "force": True, **over}
            tps = kw["seq_len"] * kw["micro_batch"] * kw["grad_accum"]
            kw["budget_tokens"] = args.steps * tps
            pairs = []
            for _ in range(args.pairs):
                load = os.getloadavg()[0]
                pairs.append((run_child("ours", model_dir, data_dir, kw, args.device),
                               run_child("trainer", model_dir, data_dir, kw, args.device), load))
            line = row_line(name, pairs)
            lines.append(line)
            print(line, flush=True)
            method = pairs[0][0]["method"]
    total = time.perf_counter() - t_all
    import torch

    note = (f"GPT-2 124M config, random weights; device {args.device}; seq-len {args.seq_len}, micro-batch "
            f"{args.micro_batch} (accum row: 2 x 1); {args.steps} optimizer steps per process, median of steps 2..n; "
            f"{args.pairs} alternating pairs per row (forgetcheck, then Trainer); torch {torch.__version__}, "
            f"{os.environ.get('BENCH_THREADS', '2')} threads, {os.cpu_count()} CPUs. Measured peak: {method}. "
            f"Bench wall time {total:.0f} s; load average at the end {os.getloadavg()[0]:.1f}.")
    print(note)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(DOC_HEAD + "\n".join(lines) + "\n\n" + note + "\n" + kept_sections(args.out))


def row_line(name: str, pairs: list[tuple[dict, dict, float]]) -> str:
    """One table row from a technique's pairs (forgetcheck result, Trainer result, load before the pair): memory
    from the first pair, speeds as medians over the pairs, the ratio as the median of the per-pair ratios."""
    ours = pairs[0][0]
    ratios = [o["tokens_per_s"] / t["tokens_per_s"] for o, t, _ in pairs]
    loads = [load for _, _, load in pairs]
    diff = ours["planned_states"] / ours["measured_states"] - 1
    return (f"| {name} | {mb(ours['planned_states'])} | {mb(ours['measured_states'])} | {diff:+.1%} "
            f"| {ours['opt_bytes_per_param']:.2f} | {mb(ours['planned_total'])} | {mb(ours['measured_peak'])} "
            f"| {statistics.median(o['s_step'] for o, _, _ in pairs):.2f} "
            f"| {statistics.median(o['tokens_per_s'] for o, _, _ in pairs):,.0f} "
            f"| {statistics.median(t['tokens_per_s'] for _, t, _ in pairs):,.0f} "
            f"| {statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}] "
            f"| {min(loads):.1f}-{max(loads):.1f} |")


def kept_sections(out: Path) -> str:
    """The hand-written sections (`## ...`) below the table of an existing `out`, kept when it is rewritten:
    measurements of other benches that belong on this page."""
    if not out.exists():
        return ""
    text = out.read_text()
    at = text.find("\n## ")
    return "" if at < 0 else text[at:]


DOC_HEAD = """# Training memory: planned vs measured

Written by `python bench/train_memory.py --seq-len 64 --steps 5 --pairs 3 --out docs/train_memory.md` (see the script's
docstring).

* **planned W+G+O**: weights + gradients + optimizer state from `forgetcheck.train.memory.plan_memory` (16 bytes/param
  in fp32 with AdamW; ~10 with 8-bit AdamW). **measured W+G+O**: the sum of the bytes of the parameter,
  gradient and optimizer-state tensors after the first optimizer step. **diff** is planned/measured - 1 (the
  acceptance bound is +/-15%).
* **planned total** adds the activation estimate (the bytes autograd saves, see `forgetcheck/train/memory.py`);
  **measured peak** is the peak of the whole process (on CPU: peak RSS, so Python, torch and the libraries,
  ~0.8-1 GB, are included; it is an upper bound on what the tensors need).
* **s/step, tokens/s**: median over the optimizer steps after the first, then over the pairs; **Trainer tokens/s**
  is `transformers.Trainer` on the same packed rows and settings (`torch_compile=True` in the compile row), each
  run in its own fresh process, alternating with forgetcheck's (A B A B ...); **forgetcheck / Trainer** is the
  median of the per-pair ratios with their min-max, so a change of machine speed between pairs does not land in
  it; **load** is the 1-minute load average before each pair.

"""


if __name__ == "__main__":
    main()
