"""train/signals.py: signals at a point of training on the tiny model (KL exactly 0 for the unchanged model, > 0
after a perturbation; soft accuracy in points), the deterministic choice of fixed items, the curve file's
schema (the overhead bound: test_curve.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from forgetcheck.errors import BadInput
from forgetcheck.eval.drift import BUILTIN_DRIFT_TEXT
from forgetcheck.train import signals

POOLS = {
    "arith": [(f"Question: what is {i} plus one? Answer:", [f" {i + 1}", f" {i + 2}", " seven"], 0)
              for i in range(12)],
    "colour": [(f"The colour of flag number {i} is", [" red", " blue"], i % 2) for i in range(5)],
}
DOMAIN = ["The patient presented with fever and a dry cough for three days. Chest examination was normal and "
          "the oxygen saturation was ninety-eight percent. Rest, fluids and paracetamol were advised, with a "
          "follow-up visit if the symptoms persist beyond one week."] * 3


def test_item_choice_is_deterministic_and_takes_the_pools_in_turn():
    a = signals.choose_items(POOLS, 8, seed=0)
    assert a == signals.choose_items(POOLS, 8, seed=0)
    assert a == signals.choose_items(dict(reversed(list(POOLS.items()))), 8, seed=0)  # dict order does not matter
    assert a != signals.choose_items(POOLS, 8, seed=1)
    assert [it.pool for it in a] == ["arith", "colour"] * 4
    assert len(set(a)) == 8
    # a small pool runs out; the others fill up the count
    b = signals.choose_items(POOLS, 15, seed=0)
    assert [it.pool for it in b].count("colour") == 5 and len(b) == 15
    with pytest.raises(BadInput, match="target index"):
        signals.choose_items({"x": [("ctx", [" a", " b"], 2)]}, 1)
    with pytest.raises(BadInput, match="triple"):
        signals.choose_items({"x": [("ctx only",)]}, 1)


@pytest.fixture(scope="module")
def tiny(tiny_ref):
    from forgetcheck.models import registry

    model, tok = registry.load(tiny_ref)
    items = signals.choose_items(POOLS, 6, seed=0)
    ref = signals.build_reference(model, tok, BUILTIN_DRIFT_TEXT, DOMAIN, items, n_tokens=256, seq_len=64)
    return model, tok, ref


def test_unchanged_model_has_zero_kl_and_its_base_values(tiny):
    model, tok, ref = tiny
    assert ref.texts["general"]["input_ids"].shape[1] == ref.texts["domain"]["input_ids"].shape[1] == 64
    p = signals.measure_point(model, tok, ref, tokens=0, step=0)
    assert p.kl_general == 0.0 and p.kl_domain == 0.0
    assert p.bpb_general == pytest.approx(ref.base["bpb_general"], rel=1e-6)
    assert p.bpb_domain == pytest.approx(ref.base["bpb_domain"], rel=1e-6)
    assert 0.0 <= p.soft_acc <= 100.0 and p.soft_acc == pytest.approx(ref.base["soft_acc"], abs=1e-6)
    assert 2.0 < p.bpb_general < 20.0  # a random-init GPT-2: about log2(50257) bits per token, ~4 bytes a token
    assert p.measure_s > 0


def test_perturbed_model_moves_away_from_the_base_and_keeps_its_training_mode(tiny):
    import torch

    model, tok, ref = tiny
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            for w in model.parameters():
                w.add_(0.05 * torch.randn_like(w))
        model.train()
        p = signals.measure_point(model, tok, ref, tokens=4096, step=8, train_loss=7.5)
        assert model.training  # restored after measuring in eval mode
    finally:
        model.load_state_dict(saved)
        model.eval()
    assert p.kl_general > 1e-4 and p.kl_domain > 1e-4
    assert p.bpb_general != pytest.approx(ref.base["bpb_general"], rel=1e-6)
    assert 0.0 <= p.soft_acc <= 100.0
    assert (p.tokens, p.step, p.train_loss) == (4096, 8, 7.5)


def _curve() -> signals.Curve:
    pts = [signals.CurvePoint(tokens=t, step=s, train_loss=loss, kl_general=kl, kl_domain=2 * kl, bpb_general=1.0 + kl,
                             bpb_domain=1.5 - kl, soft_acc=60.0 - 10 * kl, measure_s=0.5)
           for t, s, loss, kl in ((0, 0, None, 0.0), (2048, 4, 3.2, 0.1), (1024, 2, 3.5, 0.05))]
    base = {"kl_general": 0.0, "kl_domain": 0.0, "bpb_general": 1.0, "bpb_domain": 1.5, "soft_acc": 60.0}
    return signals.Curve(arm="sft", points=pts, base=base, meta={"budget_tokens": 8192})


def test_curve_round_trips_through_its_json_schema(tmp_path):
    c = _curve()
    path = tmp_path / "curve.sft.json"
    signals.write_curve(path, c)
    doc = json.loads(path.read_text())
    assert doc["schema_version"] == signals.CURVE_VERSION and doc["kind"] == "curve" and doc["arm"] == "sft"
    assert len(doc["points"]) == 3 and set(doc["points"][0]) >= {"tokens", "step", "train_loss", "measure_s"}
    back = signals.read_curve(path)
    assert back == c
    t, f, loss = back.forgetting("soft_acc")  # in order of tokens, the drop from the base in points
    assert t.tolist() == [0, 1024, 2048] and f == pytest.approx([0.0, 0.5, 1.0])
    assert np.isnan(loss[0]) and loss[1:].tolist() == [3.5, 3.2]
    assert back.forgetting("bpb_domain")[1] == pytest.approx([0.0, -0.05, -0.1])  # bpb: value - base
    assert back.forgetting("kl_domain")[1] == pytest.approx([0.0, 0.1, 0.2])
    with pytest.raises(BadInput, match="unknown"):
        back.forgetting("accuracy")


@pytest.mark.parametrize("change, message", [
    ({"schema_version": 999}, "newer"), ({"schema_version": 0}, "older"), ({"kind": "eval"}, "expected 'curve'"),
    ({"points": [{"tokens": 1}]}, "fields"),
])
def test_a_wrong_curve_file_is_refused_naming_the_file(tmp_path, change, message):
    path = tmp_path / "curve.cpt.json"
    path.write_text(json.dumps({**_curve().to_dict(), **change}))
    with pytest.raises(BadInput, match=message) as e:
        signals.read_curve(path)
    assert str(path) in str(e.value)
