"""One training step with the vocabulary projection at every position vs only where a label is predicted.

    python bench/train_head.py [--model smollm2-135m] [--data med] [--steps 3] [--seq-len 256] [--micro-batch 4]

`train.micro_batch_loss` runs the model's output projection and the cross-entropy only at the positions that
predict a label (models/head.py `project_at`). This bench times a full optimizer step (forward, backward, AdamW) both ways,
side by side and alternating, on the rows each arm really trains on (packing.build_rows from the prepared
domain data: SFT rows with the prompt masked, CPT rows labelled throughout), and prints the median step time of
each, their ratio, and how far the new loss and gradients are from the full-logits ones (the same weights,
the same batch). It then times the AdamW step alone: torch's foreach implementation against the fused kernel
that optimizer.build_optimizer uses for plain (non-FSDP) parameters, on the same gradients, and the largest
difference between the weights the two produce. Run `forgetcheck data prepare <data>` first.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="med")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per way and arm (median)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from forgetcheck.config import TrainConfig
    from forgetcheck.data import domain
    from forgetcheck.models import registry
    from forgetcheck.train import loop, optimizer, packing

    ref = registry.resolve(args.model)
    model, tok = registry.load(ref)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    cfg = TrainConfig(seq_len=args.seq_len, micro_batch=args.micro_batch)
    opt = optimizer.build_optimizer(model.parameters(), cfg)
    dom = domain.load_domain(args.data, prepare=True)

    def full_loss(ids, labels, n):
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                               ignore_index=packing.IGNORE, reduction="sum") / n

    def label_loss(ids, labels, n):
        return loop.micro_batch_loss(model, ids, labels, torch.ones_like(ids), n, contextlib.nullcontext)

    print(f"model {args.model}, {args.micro_batch} x {args.seq_len} tokens per step, torch threads "
          f"{torch.get_num_threads()}, median of {args.steps} steps (after one warm-up step each)")
    print(f"{'arm':<5} {'labelled':>9} {'full s/step':>12} {'labels s/step':>14} {'speed-up':>9} "
          f"{'|dloss|/loss':>13} {'|dgrad|/|grad|':>15}")
    for arm in ("sft", "cpt"):
        rows = packing.build_rows(arm, tok, dom.sft if arm == "sft" else dom.cpt, cfg, args.micro_batch * (args.steps + 1))
        batches = [(rows.input_ids[i:i + args.micro_batch], rows.labels[i:i + args.micro_batch])
                   for i in range(0, len(rows.input_ids), args.micro_batch)]
        labelled = float((rows.labels[:, 1:] != packing.IGNORE).float().mean())

        def step(fn, ids, labels):
            t0 = time.perf_counter()
            loss = fn(ids, labels, loop.label_count(labels))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return time.perf_counter() - t0

        times = {"full": [], "labels": []}
        for k, (ids, labels) in enumerate(batches):
            for name, fn in (("full", full_loss), ("labels", label_loss)):
                dt = step(fn, ids, labels)
                if k:  # the first batch warms both up
                    times[name].append(dt)
        ids, labels = batches[0]
        n = loop.label_count(labels)
        got = {}
        for name, fn in (("full", full_loss), ("labels", label_loss)):
            loss = fn(ids, labels, n)
            loss.backward()
            got[name] = (float(loss.detach()), torch.cat([p.grad.flatten() for p in model.parameters()]))
            opt.zero_grad(set_to_none=True)
        dloss = abs(got["full"][0] - got["labels"][0]) / abs(got["full"][0])
        dgrad = float((got["full"][1] - got["labels"][1]).norm() / got["full"][1].norm())
        full, lab = statistics.median(times["full"]), statistics.median(times["labels"])
        print(f"{arm:<5} {labelled:>8.0%} {full:>12.2f} {lab:>14.2f} {full / lab:>8.2f}x {dloss:>13.1e} "
              f"{dgrad:>15.1e}", flush=True)

    # the optimizer step alone, on fixed gradients, from the same weights and state
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in params]
    start = [p.detach().clone() for p in params]
    seconds, after = {}, {}
    for kind in ("foreach", "fused"):
        with torch.no_grad():
            for p, w in zip(params, start, strict=True):
                p.copy_(w)
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        adam = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, **{kind: True})
        times = []
        for _ in range(args.steps + 1):
            t0 = time.perf_counter()
            adam.step()
            times.append(time.perf_counter() - t0)
        seconds[kind] = statistics.median(times[1:])
        after[kind] = [p.detach().clone() for p in params]
    diff = max(float((a - b).abs().max()) for a, b in zip(after["foreach"], after["fused"], strict=True))
    print(f"AdamW step: foreach {seconds['foreach']:.3f} s, fused {seconds['fused']:.3f} s "
          f"({seconds['foreach'] / seconds['fused']:.1f}x); largest weight difference after {args.steps + 1} "
          f"steps {diff:.1e}")


if __name__ == "__main__":
    main()
