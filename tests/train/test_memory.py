"""forgetcheck plan: the 16 bytes/param baseline and what each technique saves."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest

from forgetcheck.config import TrainConfig
from forgetcheck.errors import BadInput
from forgetcheck.train import memory

CFG = TrainConfig(seq_len=2048, micro_batch=1, budget_tokens=2048)


@pytest.mark.parametrize("params, gb", [(7e9, 112), (70e9, 1120)])
def test_baseline_is_16_bytes_per_param(params, gb):
    p = memory.plan_memory(params, CFG)
    assert p["states_bytes"] == gb * 1e9
    c = p["components"]
    assert (c["weights"], c["gradients"], c["optimizer_state"]) == (4 * params, 4 * params, 8 * params)
    assert p["total"] == p["states_bytes"] + c["activations"] and c["activations"] > 0


def test_each_technique_shrinks_its_own_term():
    base = memory.plan_memory(7e9, CFG)
    eight = memory.plan_memory(7e9, replace(CFG, optim="adamw8bit"))
    assert eight["components"]["optimizer_state"] / 7e9 == pytest.approx(2.03, abs=0.01)
    assert eight["components"]["weights"] == base["components"]["weights"]
    ckpt = memory.plan_memory(7e9, replace(CFG, grad_checkpointing=True))
    assert ckpt["components"]["activations"] < base["components"]["activations"] / 3
    assert ckpt["states_bytes"] == base["states_bytes"]
    mixed = memory.plan_memory(7e9, replace(CFG, precision="bf16-mixed"))
    assert mixed["states_bytes"] == base["states_bytes"]  # fp32 master weights
    # 16-bit activations cost fewer bytes per token, but autocast keeps a 16-bit copy of every weight until
    # backward (2 bytes/param): at one row of 2048 tokens that copy outweighs the saving, at eight it does not
    eight_rows = replace(CFG, micro_batch=8)
    mixed8 = memory.plan_memory(7e9, replace(eight_rows, precision="bf16-mixed"))["components"]["activations"]
    base8 = memory.plan_memory(7e9, eight_rows)["components"]["activations"]
    per_token_mixed = (mixed8 - mixed["components"]["activations"]) / (7 * 2048)
    per_token_base = (base8 - base["components"]["activations"]) / (7 * 2048)
    assert per_token_mixed < 0.6 * per_token_base
    copies = mixed["components"]["activations"] - 2048 * per_token_mixed
    assert copies == pytest.approx(2 * 7e9, rel=0.1)
    true16 = memory.plan_memory(7e9, replace(CFG, precision="bf16-true"))
    assert true16["states_bytes"] == 8 * 7e9
    sharded = memory.plan_memory(7e9, replace(CFG, nproc=8))
    assert sharded["per_device"]["weights"] == base["components"]["weights"] / 8
    gathered = sharded["per_device"]["gathered_blocks"]
    assert 0 < gathered < base["components"]["weights"] / 8
    assert sharded["per_device_total"] == base["states_bytes"] / 8 + base["components"]["activations"] + gathered
    assert sharded["per_device"]["activations"] == base["per_device"]["activations"]


def test_architecture_from_a_real_config(tiny_ref):
    from transformers import AutoConfig

    from forgetcheck.models import registry

    cfg = AutoConfig.from_pretrained(tiny_ref.path)
    arch = memory.arch_from_hf_config(cfg)
    model, _ = registry.load(tiny_ref)
    assert arch.params == sum(p.numel() for p in model.parameters())
    assert (arch.layers, arch.hidden, arch.heads, arch.vocab) == (2, 64, 2, 50257)
    small = memory.plan_memory(arch, replace(CFG, seq_len=64, micro_batch=2))
    big = memory.plan_memory(arch, replace(CFG, seq_len=128, micro_batch=2))
    assert big["components"]["activations"] == pytest.approx(2 * small["components"]["activations"], rel=0.01)


def test_check_fits_refuses_unless_forced(monkeypatch):
    monkeypatch.setattr(memory, "device_capacity", lambda device: (10 * 10**9, "test"))
    p = memory.plan_memory(7e9, CFG)
    with pytest.raises(BadInput, match="does not fit.*--grad-checkpointing.*--force"):
        memory.check_fits(p, "cpu", force=False)
    assert "NOT fit" in memory.check_fits(p, "cpu", force=True)
    assert "NOT" not in memory.check_fits(memory.plan_memory(1e8, replace(CFG, seq_len=128)), "cpu", force=False)


def test_format_plan_shows_baseline_and_this_plan():
    text = memory.format_plan(memory.plan_memory(7e9, replace(CFG, optim="adamw8bit")), memory.plan_memory(7e9, CFG))
    assert "112 GB" in text and "70.22 GB" in text and "optimizer state" in text and "per device" in text


def test_cli_plan_params_and_errors():
    r = subprocess.run([sys.executable, "-m", "forgetcheck", "plan", "--params", "70e9"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "1,120 GB" in r.stdout and "weights" in r.stdout and "activations" in r.stdout
    r = subprocess.run([sys.executable, "-m", "forgetcheck", "plan"], capture_output=True, text=True)
    assert r.returncode == 2 and "--params" in r.stderr
