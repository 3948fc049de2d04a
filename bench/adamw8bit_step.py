"""Seconds per 8-bit AdamW step: torchao's `AdamW8bit` against forgetcheck's (train/adamw8bit.py), alternating.

    python bench/adamw8bit_step.py [--model gpt2] [--pairs 5] [--device cpu]

Both optimizers hold the parameters of the same model (GPT-2 124M's shapes by default, built from its config, no
weights needed) with the same gradients, and step in turn: torchao, forgetcheck, torchao, forgetcheck, ... so a
change of machine speed lands on both sides of a pair. Each pair's ratio (torchao s / forgetcheck s) is reported
as the median with its min-max, with the 1-minute load average, after one untimed step each (the compile). torch's
fused fp32 AdamW is timed once alongside, for scale. Then both optimizers' weights and 8-bit states are compared:
the two compute the same update, so the weights should agree to float rounding and the codes nearly everywhere.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

CONFIGS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # GPT-2 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
}


def _params(model: str, device: str, seed: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    net = GPT2LMHeadModel(GPT2Config(**CONFIGS[model])).to(device)
    params = [p for p in net.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def _timed(opt, device: str) -> float:
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    opt.step()
    sync()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gpt2", choices=sorted(CONFIGS))
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)

    import torch
    from torchao.optim import AdamW8bit as TorchaoAdamW8bit
    from torchao.optim.subclass_8bit import OptimState8bit

    from forgetcheck.train.adamw8bit import AdamW8bit

    kw = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    theirs_p, ours_p, fused_p = (_params(a.model, a.device, 0) for _ in range(3))
    theirs, ours = TorchaoAdamW8bit(theirs_p, **kw), AdamW8bit(ours_p, **kw)
    fused = torch.optim.AdamW(fused_p, fused=True, **kw)
    n = sum(p.numel() for p in ours_p)
    print(f"{a.model}: {n / 1e6:.1f}M parameters in {len(ours_p)} tensors; {a.device}; torch threads "
          f"{torch.get_num_threads()}, {os.cpu_count()} CPUs; {a.pairs} pairs after one untimed step each",
          flush=True)
    t0 = time.perf_counter()
    _timed(theirs, a.device)
    first_theirs = time.perf_counter() - t0
    t0 = time.perf_counter()
    _timed(ours, a.device)
    first_ours = time.perf_counter() - t0
    _timed(fused, a.device)
    rows, loads = [], []
    for i in range(a.pairs):
        loads.append(os.getloadavg()[0])
        t, o = _timed(theirs, a.device), _timed(ours, a.device)
        rows.append((t, o))
        print(f"  pair {i + 1}: torchao {t:.3f} s, forgetcheck {o:.3f} s, ratio {t / o:.2f} (load {loads[-1]:.1f})",
              flush=True)
    fused_s = statistics.median(_timed(fused, a.device) for _ in range(3))
    ratios = [t / o for t, o in rows]
    print(f"\n| optimizer | s/step (median) | torchao / this, per pair |\n|---|---|---|\n"
          f"| torchao AdamW8bit | {statistics.median(t for t, _ in rows):.3f} | |\n"
          f"| forgetcheck AdamW8bit | {statistics.median(o for _, o in rows):.3f} | "
          f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}] |\n"
          f"| torch AdamW fused (fp32 state) | {fused_s:.3f} | |")
    print(f"first step (compiles): torchao {first_theirs:.1f} s, forgetcheck {first_ours:.1f} s; load average "
          f"{min(loads):.1f}-{max(loads):.1f}")

    worst, differ, codes = 0.0, 0, 0
    for p, q in zip(theirs_p, ours_p, strict=True):
        worst = max(worst, float((p.detach() - q.detach()).abs().max()))
        for name in ("exp_avg", "exp_avg_sq"):
            s, t = theirs.state[p][name], ours.state[q][name]
            if isinstance(s, OptimState8bit):
                differ += int((s.codes != t.codes).sum())
                codes += s.codes.numel()
    print(f"after {a.pairs + 1} steps each: max |weight difference| {worst:.2e}; 8-bit codes differing: {differ} of "
          f"{codes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
