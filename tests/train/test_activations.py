"""The activation plan against the bytes autograd really saves (forgetcheck/train/activations.py), on tiny GPT-2 and
Llama (grouped-query attention, gated MLP) configs, fp32 and bf16-mixed, with and without checkpointing."""

from __future__ import annotations

import types

import pytest
import torch

from forgetcheck.config import TrainConfig
from forgetcheck.train import activations, loop, memory

VOCAB = 512


def _gpt2(attn: str = "sdpa"):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=128, attn_implementation=attn,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg), cfg


def _llama(attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=176, vocab_size=VOCAB, max_position_embeddings=128, attn_implementation=attn,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg), cfg


def _autocast(precision: str):
    if precision == "fp32":
        return None
    return lambda: torch.autocast("cpu", dtype=torch.bfloat16)


def _measure(build, precision: str, checkpointing: bool, s: int, b: int, attn: str = "sdpa"):
    torch.manual_seed(0)
    model, hf = build(attn)
    loop.prepare_for_training(model, checkpointing=checkpointing)
    ids = torch.randint(0, VOCAB, (b, s))
    saved = activations.saved_bytes(model, ids, autocast=_autocast(precision))
    cfg = TrainConfig(seq_len=s, micro_batch=b, budget_tokens=s * b, precision=precision,
                      grad_checkpointing=checkpointing)
    return saved, memory.arch_from_hf_config(hf), cfg


def test_one_linear_saves_exactly_its_input():
    """The measurement on a case computed by hand: a residual block x + Linear(x) keeps exactly x (for the weight's
    gradient) and the weight (a parameter: not counted); the add keeps nothing."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 16)

        def forward(self, x):
            return x + self.lin(x)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(VOCAB, 16)
            self.layers = torch.nn.ModuleList([Block(), Block()])
            self.out = torch.nn.Linear(16, VOCAB, bias=False)

        def get_output_embeddings(self):
            return self.out

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            x = self.emb(input_ids)
            for layer in self.layers:
                x = layer(x)
            return types.SimpleNamespace(logits=self.out(x))

    b, s = 2, 8
    saved = activations.saved_bytes(Tiny().train(), torch.randint(0, VOCAB, (b, s)))
    x_bytes = b * s * 16 * 4
    assert saved.embeddings == b * s * 8  # the int64 token ids
    assert saved.blocks == [x_bytes, x_bytes]  # each block its input
    labels = b * (s - 1)
    # the label mask (bool), the head's input, the fp32 log-softmax, the int64 targets, the loss's scalar weight
    assert saved.head == b * s + labels * 16 * 4 + labels * VOCAB * 4 + labels * 8 + 4
    assert saved.weight_casts == 0 and saved.shared == 0


CASES = [(build, precision, ckpt) for build in (_gpt2, _llama) for precision in ("fp32", "bf16-mixed")
         for ckpt in (False, True)]


@pytest.mark.parametrize("build, precision, checkpointing", CASES,
                         ids=[f"{b.__name__[1:]}-{p}-{'ckpt' if c else 'full'}" for b, p, c in CASES])
@pytest.mark.parametrize("s, b", [(32, 2), (64, 1)])
def test_planned_activations_match_the_saved_bytes(build, precision, checkpointing, s, b):
    saved, arch, cfg = _measure(build, precision, checkpointing, s, b)
    planned = memory.activation_bytes(arch, cfg, "cpu")
    assert planned / saved.peak == pytest.approx(1.0, abs=0.15), (planned, saved)
    if checkpointing:
        assert saved.checkpointed and len(saved.recomputed) == arch.layers and min(saved.recomputed) > 0


def test_old_formula_fails_for_llama():
    """The Korthikanti estimate (34*s*b*h per layer in 16 bits, x2 in fp32, + the head's s*b*V*(e + 8)) misses a
    gated, grouped-query block by more than the bound: the test above would catch a return to it."""
    saved, arch, cfg = _measure(_llama, "bf16-mixed", False, 64, 1)
    s, b, h, e = cfg.seq_len, cfg.micro_batch, arch.hidden, 2
    old = arch.layers * 34 * s * b * h * e / 2 + s * b * arch.vocab * (e + 8)
    assert abs(old / saved.peak - 1) > 0.15
    per_layer_old = 34 * s * b * h * e / 2
    assert abs(per_layer_old / saved.per_layer - 1) > 0.15


def test_math_attention_is_planned_and_measured():
    """SDPA's math kernel keeps the [b, heads, s, s] probabilities: forcing it on CPU (what fp32 grouped-query
    attention gets on CUDA) is measured by the hooks and planned by the "math" path."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    s, b = 64, 2
    torch.manual_seed(0)
    model, hf = _llama()
    loop.prepare_for_training(model)
    ids = torch.randint(0, VOCAB, (b, s))
    fused = activations.saved_bytes(model, ids)
    model.zero_grad()
    with sdpa_kernel(SDPBackend.MATH):
        math = activations.saved_bytes(model, ids)
    arch = memory.arch_from_hf_config(hf)
    probs = b * arch.heads * s * s * 4  # fp32 probabilities per layer
    assert math.per_layer - fused.per_layer > probs  # the s^2 term, plus q, k, v repeated to every head
    cfg = TrainConfig(seq_len=s, micro_batch=b, budget_tokens=s * b)
    assert memory.attention_path(arch, "fp32", "cuda") == "math"
    assert memory.attention_path(arch, "bf16-mixed", "cuda") == "fused"
    assert memory.attention_path(arch, "fp32", "cpu") == "fused"
    planned_cuda = memory.activation_bytes(arch, cfg, "cuda")
    assert planned_cuda / math.peak == pytest.approx(1.0, abs=0.15)
    assert memory.activation_bytes(arch, cfg, "cpu") / fused.peak == pytest.approx(1.0, abs=0.15)
    plan = memory.plan_memory(arch, cfg, device="cuda")
    assert plan["arch"]["attention_path"] == "math"
    assert plan["components"]["activations"] == planned_cuda


def test_eager_attention_keeps_the_probabilities():
    saved, arch, cfg = _measure(_llama, "bf16-mixed", False, 64, 1, attn="eager")
    assert memory.attention_path(arch, cfg.precision, "cpu") == "eager"
    assert memory.activation_bytes(arch, cfg, "cpu") / saved.peak == pytest.approx(1.0, abs=0.15)


def test_plan_states_its_overhead_apart_from_the_components():
    cfg = TrainConfig(seq_len=128, micro_batch=1, budget_tokens=128)
    for device in ("cpu", "cuda", None):
        plan = memory.plan_memory(1e8, cfg, device=device)
        over = plan["overhead"]
        assert over["bytes"] > 0 and over["how"]
        assert plan["total"] == sum(plan["components"].values())  # tensors only
        assert "overhead" not in plan["per_device"]
