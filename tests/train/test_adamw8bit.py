"""forgetcheck's 8-bit AdamW (train/adamw8bit.py) is torchao's: the same codes for every float, the same states
and the same weights after several steps, on quantized and unquantized parameters alike."""

from __future__ import annotations

import pytest
import torch
from torchao.optim import AdamW8bit as TorchaoAdamW8bit
from torchao.optim.quant_utils import quantize_8bit_with_qmap
from torchao.optim.subclass_8bit import OptimState8bit, get_qmap_signed, get_qmap_unsigned

from forgetcheck.config import TrainConfig
from forgetcheck.train import adamw8bit, optimizer


def _probe(qmap: torch.Tensor, threshold: torch.Tensor, signed: bool) -> torch.Tensor:
    """Floats where a wrong lookup would show: every code value and the values either side of it, every code
    change and either side of it, zeros, and random values at every magnitude the scaled moments take."""
    g = torch.Generator().manual_seed(0)
    up, down = torch.tensor(2.0), torch.tensor(-2.0)
    edges = threshold[torch.isfinite(threshold)]
    random = torch.randn(400_000, generator=g) * torch.logspace(-9, 0, 400_000)[torch.randperm(400_000, generator=g)]
    x = torch.cat([qmap, torch.nextafter(qmap, up), torch.nextafter(qmap, down), edges, torch.nextafter(edges, up),
                   torch.nextafter(edges, down), torch.tensor([0.0, -0.0, 1.0, -1.0]), random]).clamp(-1, 1)
    return x if signed else x.abs()


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_lookup_gives_torchaos_code_for_every_probe(signed):
    qmap = torch.tensor(get_qmap_signed() if signed else get_qmap_unsigned())
    base, threshold = adamw8bit.code_table(qmap)
    x = _probe(qmap, threshold, signed)
    ours, theirs = adamw8bit.quantize(x, base, threshold), quantize_8bit_with_qmap(x, qmap)
    assert torch.equal(ours, theirs), f"{int((ours != theirs).sum())} of {x.numel()} codes differ"
    assert torch.equal(adamw8bit.quantize(qmap, base, threshold), torch.arange(256, dtype=torch.uint8))


def test_a_map_with_two_changes_in_one_key_range_is_refused():
    dense = torch.linspace(0.5, 0.5 + 255 * 2**-20, 256)  # codes closer together than a 16-bit key range
    with pytest.raises(ValueError, match="not be exact"):
        adamw8bit.code_table(dense)


def _steps(opt_class, n_steps: int = 3, dtype=torch.float32):
    """Weights and optimizer after `n_steps` steps on fixed gradients, with weight decay and a changing lr."""
    torch.manual_seed(0)
    shapes = [(1000, 64), (3, 5)]  # quantized (250 blocks of 256 across rows of 64), and one kept in fp32
    params = [torch.nn.Parameter((torch.randn(s) * 0.02).to(dtype)) for s in shapes]
    initial = [p.detach().clone() for p in params]
    grads = [[(torch.randn(s) * 1e-3).to(dtype) for s in shapes] for _ in range(n_steps)]
    opt = opt_class(params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (i + 1))
    for step in grads:
        for p, g in zip(params, step, strict=True):
            p.grad = g.clone()
        opt.step()
        schedule.step()
    return params, opt, initial


@pytest.mark.parametrize("dtype", [torch.float32,  # bf16 weights (--precision bf16-true): compiles again, so slow
                                   pytest.param(torch.bfloat16, marks=pytest.mark.slow)], ids=["fp32", "bf16"])
def test_steps_match_torchao(dtype):
    ours, ours_opt, initial = _steps(adamw8bit.AdamW8bit, dtype=dtype)
    theirs, theirs_opt, _ = _steps(TorchaoAdamW8bit, dtype=dtype)
    quantized = 0
    for a, b, start in zip(ours, theirs, initial, strict=True):
        assert not torch.equal(a.detach(), start)  # the steps moved every weight
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6 if dtype is torch.float32 else 0)
        for name in ("exp_avg", "exp_avg_sq"):
            s, t = ours_opt.state[a][name], theirs_opt.state[b][name]
            assert type(s) is type(t)
            if isinstance(s, OptimState8bit):
                quantized += 1
                assert (s.codes != t.codes).float().mean() < 1e-4  # a float rounding may move a boundary value
                torch.testing.assert_close(s.scale, t.scale, rtol=1e-5, atol=0)
            else:
                torch.testing.assert_close(s, t, rtol=1e-5, atol=1e-9)
    assert quantized == 2  # both moments of the large parameter are 8-bit


def test_build_optimizer_uses_it_and_state_stays_8bit():
    model = torch.nn.Linear(256, 64)
    opt = optimizer.build_optimizer(model.parameters(), TrainConfig(optim="adamw8bit"))
    assert isinstance(opt, adamw8bit.AdamW8bit) and isinstance(opt, TorchaoAdamW8bit)
    model(torch.randn(4, 256)).sum().backward()
    before = model.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.weight)
    assert isinstance(opt.state[model.weight]["exp_avg"], OptimState8bit)
    n = sum(p.numel() for p in model.parameters())
    assert optimizer.optimizer_state_bytes(opt) < 2.5 * n + 2 * 64 * 4 + 2 * 256 * 4 * 2  # ~2 bytes/param + maps


def test_refuses_what_it_does_not_implement():
    with pytest.raises(ValueError, match="amsgrad"):
        adamw8bit.AdamW8bit([torch.nn.Parameter(torch.zeros(4096))], amsgrad=True)

