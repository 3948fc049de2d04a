"""Planned activations against the bytes autograd saves, at realistic sizes (random weights, built from configs).

    python bench/activation_plan.py [--seq-len 512] [--micro-batch 2]

Per model (GPT-2 124M's config; a Llama-style config of SmolLM2-135M's shape: 30 layers, hidden 576, 9 heads / 3 KV
heads, MLP 1536, vocab 49152), per precision (fp32, bf16-mixed through CPU autocast) and with / without
non-reentrant checkpointing: the planner's activation bytes (forgetcheck/train/memory.py `activation_bytes`, device
"cpu") and the bytes measured by forgetcheck/train/activations.py `saved_bytes` (one training forward + backward,
as train/loop.py runs it), their ratio, and one layer's bytes both ways. Then, planned only, the H200 model of
docs/gpu.md (16 layers, hidden 2048, 32 / 8 KV heads, MLP 5632) on CUDA in fp32 (SDPA's math kernel) and bf16-mixed.
Runs in about three minutes on 2 CPU cores; prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import time

MB = 1e6


def _models():
    from transformers import GPT2Config, LlamaConfig

    gpt2 = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    smol = LlamaConfig(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                       intermediate_size=1536, vocab_size=49152, max_position_embeddings=2048,
                       tie_word_embeddings=True, rope_theta=100000.0)
    return [("GPT-2 124M", gpt2), ("Llama-style (SmolLM2-135M shape)", smol)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=2)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from forgetcheck.config import TrainConfig
    from forgetcheck.train import activations, loop, memory

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    s, b = args.seq_len, args.micro_batch
    started = time.perf_counter()
    print("| model | precision | checkpointing | planned (MB) | measured (MB) | planned / measured | planned layer (MB) "
          "| measured layer (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, hf in _models():
        arch = memory.arch_from_hf_config(hf)
        for precision in ("fp32", "bf16-mixed"):
            for ckpt in (False, True):
                torch.manual_seed(0)
                model = AutoModelForCausalLM.from_config(hf)
                loop.prepare_for_training(model, checkpointing=ckpt)
                ids = torch.randint(0, hf.vocab_size, (b, s))
                autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision != "fp32" else None
                saved = activations.saved_bytes(model, ids, autocast=autocast)
                del model
                cfg = TrainConfig(seq_len=s, micro_batch=b, budget_tokens=s * b, precision=precision,
                                  grad_checkpointing=ckpt)
                planned = memory.activation_bytes(arch, cfg, "cpu")
                # one layer: the forward's block, or (checkpointed) the recompute, which also re-casts the weights
                plan_layer = memory._activation_terms(arch, cfg, "cpu")["layer"]
                print(f"| {name} | {precision} | {'yes' if ckpt else 'no'} | {planned / MB:,.1f} | "
                      f"{saved.peak / MB:,.1f} | {planned / saved.peak:.3f} | {plan_layer / MB:,.2f} | "
                      f"{saved.per_layer / MB:,.2f} |", flush=True)
    print()
    print(f"seq-len {s} x micro-batch {b}; device cpu (SDPA takes the fused CPU kernel); random weights; torch "
          f"{torch.__version__}; {time.perf_counter() - started:.0f} s.")
    print()
    from transformers import LlamaConfig

    big = LlamaConfig(num_hidden_layers=16, hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=5632, vocab_size=49152, tie_word_embeddings=False)
    arch = memory.arch_from_hf_config(big, params=0)
    print("Planned only, docs/gpu.md's Llama-style model (16 layers, hidden 2048, 32 / 8 KV heads, MLP 5632, vocab "
          "49152 as bench/gpu_check.py builds it) at seq-len 2048 x micro-batch 8 on CUDA:")
    print()
    print("| precision | attention path | planned activations (MB) | of which s^2 probabilities (MB) |")
    print("|---|---|---|---|")
    for precision in ("bf16-mixed", "fp32"):
        cfg = TrainConfig(seq_len=2048, micro_batch=8, budget_tokens=2048 * 8, precision=precision)
        path = memory.attention_path(arch, precision, "cuda")
        probs = arch.layers * 8 * arch.heads * 2048 * 2048 * 4 if path == "math" else 0
        print(f"| {precision} | {path} | {memory.activation_bytes(arch, cfg, 'cuda') / MB:,.0f} | {probs / MB:,.0f} |")


if __name__ == "__main__":
    main()
