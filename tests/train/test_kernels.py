"""train/kernels.py: the fused activations compute the model's own function, and --compile trains the same model."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from forgetcheck.config import TrainConfig
from forgetcheck.rundir import RunDir
from forgetcheck.train import kernels, loop

CFG = TrainConfig(budget_tokens=3 * 2 * 32, seq_len=32, micro_batch=2, grad_accum=1, lr=1e-3, warmup_frac=0.0,
                  seed=0, data_seed=0)


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("act", ["gelu_new", "gelu_fast", "gelu_python_tanh"])
def test_fused_gelu_is_the_same_function_and_keeps_less(act):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.activations import GELUTanh

    from forgetcheck.train import activations

    torch.manual_seed(0)
    slow = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=300, activation_function=act,
                                      resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    fast = copy.deepcopy(slow)
    assert kernels.fuse_activations(fast) == 2
    assert all(type(b.mlp.act) is GELUTanh for b in fast.transformer.h)
    assert kernels.fuse_activations(fast) == 0  # already fused: nothing left to swap
    assert fast.config.to_dict() == slow.config.to_dict()  # the checkpoint it saves is the same model
    ids = torch.randint(0, 300, (2, 24))
    loss_slow, g_slow = _loss_and_grads(slow, ids)
    loss_fast, g_fast = _loss_and_grads(fast, ids)
    assert loss_fast == pytest.approx(loss_slow, abs=1e-6)
    assert max(float((g_slow[n] - g_fast[n]).abs().max()) for n in g_slow) < 1e-5
    # each spelling of the formula keeps at least three more fp32 tensors of the MLP's width per block for backward
    kept = [activations.saved_bytes(m, ids).per_layer for m in (slow, fast)]
    assert kept[0] - kept[1] >= 3 * 4 * 256 * ids.numel()


def test_models_with_fused_activations_are_left_alone():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, vocab_size=100))
    before = [type(m) for m in model.modules()]
    assert kernels.fuse_activations(model) == 0
    assert [type(m) for m in model.modules()] == before


@pytest.fixture()
def aot_eager(monkeypatch):
    """torch.compile without C++ code generation: the same traced graphs (dynamo + AOTAutograd), seconds not
    minutes on 2 cores. The inductor path is the slow test below."""
    monkeypatch.setattr(kernels, "BACKEND", "aot_eager")
    torch._dynamo.reset()


def _train(tiny_ref, domain, tmp_path, cfg, name):
    rec = loop.train_arm("cpt", tiny_ref, domain, cfg, RunDir(tmp_path / name))
    return [loss for _, loss in rec["loss_curve"]]


def test_compile_trains_the_same_model(tiny_ref, domain, tmp_path, aot_eager, monkeypatch):
    compiled = []
    original = kernels.compile_blocks
    monkeypatch.setattr(kernels, "compile_blocks", lambda m: compiled.append(original(m)) or compiled[-1])
    plain = _train(tiny_ref, domain, tmp_path, CFG, "plain")
    assert compiled == []
    fast = _train(tiny_ref, domain, tmp_path, replace(CFG, compile=True), "compiled")
    assert compiled == [2]  # both blocks of the tiny model
    assert fast == pytest.approx(plain, abs=1e-4)
    ckpt = _train(tiny_ref, domain, tmp_path, replace(CFG, compile=True, grad_checkpointing=True), "ckpt")
    assert ckpt == pytest.approx(plain, abs=1e-4)


@pytest.mark.slow  # inductor generates and compiles C++ for the block: over a minute on 2 cores
def test_compile_with_inductor_trains_the_same_model(tiny_ref, domain, tmp_path):
    torch._dynamo.reset()
    plain = _train(tiny_ref, domain, tmp_path, CFG, "plain")
    fast = _train(tiny_ref, domain, tmp_path, replace(CFG, compile=True), "compiled")
    assert fast == pytest.approx(plain, abs=1e-4)
