"""bench/gate_validity.py's simulation, in a few seeded runs: it must keep running through the real compare and gate
code, and keep saying what the validity table says (docs/verdicts.md, "Validity benchmark")."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from forgetcheck.config import GateConfig
from forgetcheck.verdict.compare import compare_evals
from tests.conftest import bench_module

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gv():
    return bench_module("gate_validity")


def _scenario(gv, words: str):
    return next(sc for sc in gv.scenarios(GateConfig()) if words in sc.name)


def test_an_unchanged_arm_never_fails(gv):
    row = gv.simulate(_scenario(gv, "no change"), 50, reps=3, seed=1)
    assert row["fail"] == 0 and row["pass"] + row["inconclusive"] == 1


def test_a_concentrated_drop_at_the_margin_does_not_pass(gv):
    sc = _scenario(gv, "3 % of items forgotten")
    assert sc.watch == ("arm", "task_drop", "task00")
    row = gv.simulate(sc, 200, reps=3, seed=1)
    assert row["pass"] == 0 and row["rule"]["pass"] == 0


def test_the_drop_is_exactly_the_margin_and_the_rest_is_symmetric(gv):
    rng = np.random.default_rng(0)
    s = np.clip(rng.beta(*gv.BASE_BETA, 400_000), *gv.S_RANGE)
    mean_s = gv.clipped_mean(*gv.BASE_BETA)
    for change, drop in ((gv.Change(), 0.0), (gv.Change(2.0), 2.0), (gv.Change(2.0, "concentrated", 1.0), 2.0),
                         (gv.Change(1.0, "concentrated", 0.5), 1.0)):
        a = gv.arm_scores(s, change, mean_s, rng)
        assert ((a > 0) & (a < 1)).all()
        assert abs(100 * (s - a).mean() - drop) < 0.06  # 2.5 standard errors of the mean at this size


def test_in_memory_records_compare_as_the_files_do(gv, tmp_path):
    """The bench gives compare_evals its records in memory; written out as `forgetcheck eval` lays them out, the
    files must give the same compare.json (no second implementation of compare)."""
    sc = _scenario(gv, "two arms, b:")
    base, arms = gv.simulate_evals(12, sc, np.random.default_rng(3))
    in_memory = compare_evals(base, arms)
    base_path, arm_paths = gv.write_evals(tmp_path, base, arms)
    from_files = compare_evals(base_path, arm_paths)
    assert json.loads(json.dumps(in_memory)) == json.loads(json.dumps(from_files))
    assert in_memory["tasks"]["task00"]["arms"]["b"]["soft"]["unit_deltas"]
    # the screen is in the loop: the informative test ran on the base's separate screen items
    info = in_memory["tasks"]["task00"]["informative"]
    assert info["items"] == "screen" and info["separate"] is True and info["screen"] == 12
