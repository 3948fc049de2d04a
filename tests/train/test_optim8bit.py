"""8-bit AdamW from a plain install: torchao is a default dependency, so `forgetcheck train --optim adamw8bit`
must work on every machine `make install` set up. This test FAILS (it does not skip) when torchao is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from forgetcheck.train import optimizer


def _expected_state_bytes(model) -> int:
    """torchao's AdamW8bit keeps 8-bit moments (1-byte codes + one fp32 scale per 256-value block + a 256-entry
    fp32 code map) for tensors of >= 4096 values that are a multiple of the block; others keep fp32 moments.
    Every parameter also has a 4-byte step counter."""
    total = 0
    for p in model.parameters():
        n = p.numel()
        if n >= 4096 and n % 256 == 0:
            total += 2 * (n + n // 256 * 4 + 256 * 4)
        else:
            total += 2 * n * 4
        total += 4
    return total


def test_cli_adamw8bit_step_on_tiny_gpt2(tiny_ref, tmp_path):
    import torchao  # noqa: F401  (an ImportError here fails the test: torchao is a default dependency)
    from transformers import AutoModelForCausalLM

    assert optimizer.eightbit_backend() == "torchao"
    data = tmp_path / "data"
    data.mkdir()
    words = "fever cough anemia insulin biopsy cardiac renal hepatic tumor lesion dose therapy".split()
    (data / "cpt.jsonl").write_text("".join(
        json.dumps({"text": " ".join(words[(i * 5 + j) % len(words)] for j in range(24))}) + "\n" for i in range(8)))
    run = tmp_path / "run"
    # One optimizer step. TORCHDYNAMO_DISABLE=1 runs torchao's step eagerly (same 8-bit state tensors and
    # quantisation code); compiling it is the slow part, left to the slow test in test_train.py.
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1")
    r = subprocess.run([sys.executable, "-m", "forgetcheck", "train", "--base", "tiny-gpt2", "--data", str(data),
                        "--arms", "cpt", "--run", str(run), "--seq-len", "32", "--micro-batch", "2",
                        "--budget-tokens", "64", "--optim", "adamw8bit", "--device", "cpu"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((run / "train" / "cpt.json").read_text())
    assert rec["optimizer_steps"] == 1 and rec["config"]["optim"] == "adamw8bit"

    base = AutoModelForCausalLM.from_pretrained(tiny_ref.path)
    measured = rec["memory"]["measured_components"]["optimizer_state"]
    expected = _expected_state_bytes(base)
    fp32_adam = sum(8 * p.numel() + 4 for p in base.parameters())
    assert abs(measured - expected) / expected < 0.005, (measured, expected)
    assert fp32_adam - measured > 0.5 * (fp32_adam - expected)  # visibly less than fp32 AdamW's state

    trained = AutoModelForCausalLM.from_pretrained(run / "ckpt" / "cpt")
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed, "the 8-bit step changed no weight"
