"""bench/gpu_check.py: the CPU dry run (tiny model, 2 steps per row) must produce every row of the GPU check's
table, with the planner within +/-15% of the measured weight/gradient/optimizer bytes and the fast scoring
backend agreeing with stock lm-eval item by item."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import bench_module

REPO = Path(__file__).resolve().parents[2]


def _module():
    return bench_module("gpu_check")


def test_peak_detected_by_device_name():
    gc = _module()
    assert gc.peak_tflops("NVIDIA H200", None)[0] == 989.4
    assert gc.peak_tflops("NVIDIA H100 PCIe", None)[0] == 756.0
    assert gc.peak_tflops("NVIDIA H100 80GB HBM3", None)[0] == 989.4
    assert gc.peak_tflops("NVIDIA A100-SXM4-80GB", None)[0] == 312.0
    assert gc.peak_tflops("NVIDIA GeForce RTX 3090", None)[0] is None
    assert gc.peak_tflops("NVIDIA GeForce RTX 3090", 71.0)[0] == 71.0


def test_dry_run_prints_every_row(tiny_ref, tmp_path):
    out = tmp_path / "gpu_check.md"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry", "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    md = out.read_text()
    res = json.loads(out.with_suffix(".json").read_text())
    assert "RANDOM WEIGHTS" in md and "CPU dry run" in md
    rows = {row["name"]: row for row in res["train"]}
    gc = _module()
    assert list(rows) == [name for name, _ in gc.TRAIN_ROWS[:-1]] + [gc.BASELINE]  # baseline runs last
    for name, row in rows.items():
        assert f"| {name} |" in md
        if "fp16" in name:  # no fp16 autocast on CPU: the row says so, the others still run
            assert "not run on CPU" in row["error"]
            continue
        assert "error" not in row, (name, row.get("error"))
        assert abs(row["diff"]) <= 0.15, (name, row["diff"])
        assert row["steps"] == 2 and row["tokens_per_s"] > 0
    # 8-bit AdamW: ~2 bytes/param of optimizer state instead of 8
    assert rows["bf16-mixed + adamw8bit"]["measured_optimizer"] < 0.3 * rows["bf16-mixed"]["measured_optimizer"]
    score = res["score"]
    assert score["items"] == 12 and score["correct_differs"] == 0 and score["greedy_differs"] == 0
    assert score["max_abs_diff_mc"] < 1e-4
    assert score["stock_items_per_s"] > 0 and score["fast_items_per_s"] > 0
