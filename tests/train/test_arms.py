"""The mitigation arms on the tiny random GPT-2 (CPU): LoRA, replay, freeze, weight interpolation, one budget."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from forgetcheck.config import TrainConfig
from forgetcheck.data import benchmarks, overlap, replay
from forgetcheck.rundir import RunDir
from forgetcheck.train import arms, interpolate, loop, packing
from forgetcheck.verdict import budget

# 8 steps of 2 x 32 tokens; replay at 25% so that the share is measured on a few hundred tokens
CFG = TrainConfig(budget_tokens=8 * 2 * 32, seq_len=32, micro_batch=2, grad_accum=1, lr=1e-3, warmup_frac=0.25,
                  lora_lr=1e-2, replay_frac=0.25, seed=0, data_seed=0)
TRAINED = ("sft", "cpt", "lora", "replay", "freeze")


@pytest.fixture(scope="module")
def all_arms(tiny_ref, domain, tmp_path_factory):
    run = RunDir(tmp_path_factory.mktemp("run"))
    recs = {arm: loop.train_loop(arm, tiny_ref, domain.sft if arms.data_kind(arm) == "sft" else domain.cpt, CFG, run)
            for arm in TRAINED}
    return run, recs


def _weights(folder) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(folder).state_dict().items()}


def test_every_trained_arm_sees_the_same_tokens(all_arms):
    run, recs = all_arms
    seen = {a: r["tokens_seen"]["forward"] for a, r in recs.items()}
    steps = {a: r["optimizer_steps"] for a, r in recs.items()}
    assert set(seen.values()) == {CFG.budget_tokens} and set(steps.values()) == {8}, (seen, steps)
    spent = budget.budget_block(run, list(TRAINED))
    assert spent["matched"] is True and set(spent["arms"]) == set(TRAINED)
    # the learning rate differs for LoRA only; the schedule's shape is the same
    assert [lr / CFG.lora_lr for _, lr in recs["lora"]["lr_curve"]] == pytest.approx(
        [lr / CFG.lr for _, lr in recs["sft"]["lr_curve"]])


def test_lora_changes_only_the_adapter_and_the_merged_folder_scores_as_base_plus_adapter(all_arms, tiny_ref):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, recs = all_arms
    adapter = arms.adapter_dir(run.ckpt("lora"))
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    base_w = _weights(tiny_ref.path)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_ref.path), adapter)
    sd = peft_model.state_dict()
    lora_keys = [k for k in sd if "lora_" in k]
    assert lora_keys and any(float(sd[k].abs().max()) > 0 for k in lora_keys if "lora_B" in k)
    # every non-adapter tensor of base+adapter is the base's, bit for bit (before merging)
    for k, v in sd.items():
        if "lora_" in k:
            continue
        name = k.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(v, base_w[name]), k
    info = recs["lora"]["arm_settings"]
    assert info["trainable_params"] == sum(sd[k].numel() for k in lora_keys)
    assert info["lora"]["rank"] == CFG.lora_rank and set(info["lora"]["targets"]) == {"c_attn", "c_proj", "c_fc"}
    # the merged folder (what is evaluated) scores as base+adapter
    merged = AutoModelForCausalLM.from_pretrained(run.ckpt("lora"))
    assert not torch.equal(merged.state_dict()["transformer.h.0.attn.c_attn.weight"],
                           base_w["transformer.h.0.attn.c_attn.weight"])
    ids = torch.randint(0, 50000, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = torch.log_softmax(merged.eval()(ids).logits, -1)
        b = torch.log_softmax(peft_model.eval()(ids).logits, -1)
    assert float((a - b).abs().max()) < 1e-4
    ll_a = a[:, :-1].gather(-1, ids[:, 1:, None]).sum((1, 2))
    ll_b = b[:, :-1].gather(-1, ids[:, 1:, None]).sum((1, 2))
    assert torch.equal(ll_a.argsort(), ll_b.argsort()) and torch.allclose(ll_a, ll_b, atol=1e-3)


def test_freeze_keeps_the_bottom_blocks_bit_identical(all_arms, tiny_ref):
    run, recs = all_arms
    base_w, got = _weights(tiny_ref.path), _weights(run.ckpt("freeze"))
    assert recs["freeze"]["arm_settings"]["freeze"] == {"frozen_blocks": [0], "of_blocks": 2}  # default: half
    for k in base_w:
        if k.startswith("transformer.h.0."):
            assert torch.equal(base_w[k], got[k]), k
    assert not torch.equal(base_w["transformer.h.1.mlp.c_fc.weight"], got["transformer.h.1.mlp.c_fc.weight"])


def test_replay_share_matches_the_flag(all_arms):
    _, recs = all_arms
    rep = recs["replay"]["replay"]
    # the share holds to within one replay piece (seq_len / 2 tokens) of the stream
    assert rep["tokens"] > 0 and abs(rep["share"] - CFG.replay_frac) <= (CFG.seq_len / 2) / CFG.budget_tokens
    assert rep["share"] == pytest.approx(rep["tokens"] / recs["replay"]["tokens_seen"]["forward"], abs=1e-6)
    # replay tokens carry a loss: more label tokens than plain SFT on the same budget
    assert recs["replay"]["tokens_seen"]["label"] > recs["sft"]["tokens_seen"]["label"]


def test_replay_rows_share_and_sources():
    seq_len, n_rows = 16, 40
    pieces = [[1000 + i] * (3 + i % 5) for i in range(50)]
    for frac in (0.01, 0.05, 0.3):
        rows = packing.pack(lambda i: ([7] * (5 + i % 7), [7] * (5 + i % 7)), 10, n_rows, seq_len, 0,
                            replay=packing.Replay(pieces, frac))
        stats, flat = rows.replay, rows.input_ids.flatten()
        assert stats["tokens"] == int((flat >= 1000).sum())
        assert abs(stats["share"] - frac) <= 8 / (seq_len * n_rows)


def test_planner_matches_measured_tensors_for_lora_and_freeze(all_arms):
    _, recs = all_arms
    for arm in ("sft", "lora", "freeze"):
        mem = recs[arm]["memory"]
        planned, measured = mem["planned"], mem["measured_components"]
        for k in ("weights", "gradients"):
            assert planned[k] == measured[k], (arm, k, planned[k], measured[k])
        # AdamW's moments exactly; the measured state also holds one 4-byte step counter per tensor
        assert 0 <= measured["optimizer_state"] - planned["optimizer_state"] <= 4 * 64, arm
    lora, sft = recs["lora"]["memory"]["planned"], recs["sft"]["memory"]["planned"]
    assert lora["gradients"] < sft["gradients"] / 10 and lora["weights"] > sft["weights"]
    assert recs["freeze"]["memory"]["planned"]["gradients"] < sft["gradients"]


def test_interpolation_endpoints_are_exact(all_arms, tiny_ref, tmp_path):
    run, _ = all_arms
    base_w, sft_w = _weights(tiny_ref.path), _weights(run.ckpt("sft"))
    for a, want in ((0.0, base_w), (1.0, sft_w)):
        out = interpolate.build(tiny_ref, run.ckpt("sft"), tmp_path / interpolate.name(a), a, source_arm="sft")
        got = _weights(out)
        assert all(torch.equal(got[k], want[k]) for k in want), a
    got = _weights(interpolate.build(tiny_ref, run.ckpt("sft"), tmp_path / "half", 0.5, source_arm="sft"))
    k = "transformer.h.1.mlp.c_fc.weight"
    assert torch.allclose(got[k], (base_w[k] + sft_w[k]) / 2, atol=1e-7)
    marker = json.loads((tmp_path / "half" / "forgetcheck.json").read_text())
    assert marker["arm"] == "wise-0.5"
    assert interpolate.points(("sft", "wise"), CFG) == [("wise-0.25", 0.25), ("wise-0.5", 0.5), ("wise-0.75", 0.75)]
    assert interpolate.points(("sft",), CFG) == []


def test_replay_text_shares_no_13gram_with_any_evaluation_text():
    man = replay.build()
    texts = replay.load(prepare=False)
    assert len(texts) == man["kept"] > 500 and man["words"] > 20_000
    assert "general_text.jsonl" in man["checked_against"] and "mmlu_stem.jsonl" in man["checked_against"]
    n_shared, hit = overlap.overlap_count(texts, overlap.evaluation_texts(benchmarks.evaluation_files()))
    assert n_shared == 0 and not hit
    # the check finds a planted overlap
    planted = json.loads(next(open(benchmarks.evaluation_files()[0])))
    doc = " ".join(overlap.strings(planted))
    n_shared, hit = overlap.overlap_count(texts[:5] + [doc], [doc])
    assert n_shared > 0 and hit == {5}


def test_cli_refuses_bad_arm_flags(tmp_path):
    base = [sys.executable, "-m", "forgetcheck", "run", "--base", "tiny-gpt2", "--data", "med", "--out", str(tmp_path)]
    r = subprocess.run(base + ["--arms", "cpt,wise", "--replay-frac", "1.5", "--lora-rank", "0",
                               "--wise-alphas", "0.5,2"], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()[-1]
    assert "--wise-from sft" in err and "--replay-frac" in err and "--lora-rank" in err and "--wise-alphas" in err
    assert not any(tmp_path.iterdir())
    r = subprocess.run(base + ["--arms", "sft", "--wise-alphas", "a,b"], capture_output=True, text=True)
    assert r.returncode == 2 and "--wise-alphas" in r.stderr


def test_freeze_layers_beyond_the_model_is_refused(tiny_ref, domain, tmp_path):
    from forgetcheck.errors import BadInput

    with pytest.raises(BadInput, match="--freeze-layers 5"):
        loop.train_loop("freeze", tiny_ref, domain.sft, replace(CFG, freeze_layers=5), RunDir(tmp_path))


def test_cli_plan_for_lora_and_freeze(tiny_ref):
    base = [sys.executable, "-m", "forgetcheck", "plan", "--seq-len", "32", "--micro-batch", "2"]
    r = subprocess.run(base + ["--base", "tiny-gpt2", "--arm", "freeze"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "freeze:" in r.stdout and "trainable parameters (0 added)" in r.stdout
    r = subprocess.run(base + ["--params", "7e9", "--arm", "lora"], capture_output=True, text=True)
    assert r.returncode == 2 and "--base" in r.stderr.strip().splitlines()[-1]


def test_front_and_interpolation_curve_in_the_report(tmp_path):
    import re

    from runfixture import make_run

    from forgetcheck.report import html
    from forgetcheck.verdict.compare import compare_run
    from forgetcheck.verdict.gate import gate_run

    pts = [{"arm": a, "f": f, "l": ln, "f_missing": False, "l_missing": False}
           for a, f, ln in (("sft", 3.0, 5.0), ("lora", 1.0, 2.0), ("replay", 2.0, 1.0), ("cpt", 0.5, 0.0))]
    assert html.front_arms(pts) == {"sft", "lora", "cpt"}  # replay: lora learns more and forgets less
    arms_ = ("sft", "cpt", "lora", "wise-0.25", "wise-0.5", "wise-0.75")
    run = make_run(tmp_path / "run", arms=arms_, n=80,
                   flips={("sft", "ret_mmlu"): (20, 0), ("wise-0.75", "ret_mmlu"): (12, 0),
                          ("wise-0.5", "ret_mmlu"): (6, 0), ("sft", "dom_terms"): (0, 20),
                          ("wise-0.5", "dom_terms"): (0, 12), ("lora", "dom_terms"): (0, 4)})
    compare_run(run, n_boot=300)
    gate_run(run.root)
    page = html.write_report(run).read_text(encoding="utf-8")
    chart = page[page.index('id="chart-learn-forget"'):]
    chart = chart[:chart.index("</svg>")]
    curve = re.search(r'id="wise-curve" points="([^"]+)"', chart)
    assert curve and len(curve.group(1).split()) == 5  # base, wise-0.25, wise-0.5, wise-0.75, sft
    view = html.learn_forget_chart(json.loads(run.compare.read_text()), {a: "#000" for a in arms_}, "sft")
    assert chart.count('class="front"') == len(view["front"]) >= 1
    assert all(f">{a}</text>" in chart for a in arms_)
