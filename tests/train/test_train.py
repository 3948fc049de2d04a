"""forgetcheck train on the tiny random GPT-2, CPU: budget parity, label masks, the memory techniques,
checkpoints, resume and FSDP2."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from forgetcheck.config import TrainConfig
from forgetcheck.errors import BadInput
from forgetcheck.rundir import RunDir
from forgetcheck.train import checkpoint, loop, optimizer, packing, sharding

CFG = TrainConfig(budget_tokens=4 * 2 * 32, seq_len=32, micro_batch=2, grad_accum=1, lr=1e-3, warmup_frac=0.25,
                  seed=0, data_seed=0)


def _weights(folder) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(folder).state_dict().items()}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def both_arms(tiny_ref, domain, tmp_path_factory):
    run = RunDir(tmp_path_factory.mktemp("run"))
    return run, {arm: loop.train_arm(arm, tiny_ref, domain, CFG, run) for arm in ("sft", "cpt")}


def test_arms_share_budget_steps_and_schedule(both_arms):
    run, rec = both_arms
    sft, cpt = rec["sft"], rec["cpt"]
    assert sft["optimizer_steps"] == cpt["optimizer_steps"] == CFG.budget_tokens // (32 * 2) == 4
    assert abs(sft["tokens_seen"]["forward"] - cpt["tokens_seen"]["forward"]) <= CFG.seq_len
    assert abs(sft["tokens_seen"]["forward"] - CFG.budget_tokens) <= CFG.seq_len
    assert sft["lr_curve"] == cpt["lr_curve"]
    lrs = [lr for _, lr in sft["lr_curve"]]
    assert lrs[0] == pytest.approx(CFG.lr) and lrs[-1] == pytest.approx(CFG.lr * CFG.min_lr_ratio)
    # SFT trains on responses only; CPT on every token (a row's first token is never predicted)
    assert cpt["tokens_seen"]["label"] == cpt["tokens_seen"]["forward"] - 4 * 2
    assert 0 < sft["tokens_seen"]["label"] < cpt["tokens_seen"]["label"]
    assert sft["tokens_seen"]["padding"] == cpt["tokens_seen"]["padding"] == 0
    on_disk = json.loads(run.train_json("sft").read_text())
    assert on_disk["schema_version"] == 1 and on_disk["random_weights"] is True
    assert on_disk["memory"]["measured_peak_bytes"] > 0 and on_disk["memory"]["planned"]["weights"] > 0
    assert len(on_disk["loss_curve"]) == 4


def test_weights_change_in_every_arm(both_arms, tiny_ref):
    run, _ = both_arms
    base = _weights(tiny_ref.path)
    for arm in ("sft", "cpt"):
        trained = _weights(run.ckpt(arm))
        changed = sum(int((trained[k] != base[k]).sum()) for k in base)
        total = sum(v.numel() for v in base.values())
        assert changed / total > 0.5, arm
        marker = json.loads((run.ckpt(arm) / "forgetcheck.json").read_text())
        assert marker["random_weights"] is True and marker["arm"] == arm


def test_finished_arm_is_reused(both_arms, tiny_ref, domain):
    run, rec = both_arms
    stamp = run.ckpt("cpt").stat().st_mtime_ns
    again = loop.train_arm("cpt", tiny_ref, domain, CFG, run)
    assert again == rec["cpt"] and run.ckpt("cpt").stat().st_mtime_ns == stamp


def test_sft_masks_prompt_and_plain_template(tiny_ref):
    from forgetcheck.models import registry

    tok = registry.load_tokenizer(tiny_ref)
    row = {"prompt": "Name a bone.", "response": "The femur."}
    ids, labels = packing.sft_example(tok, row, 64, include_prompt_loss=False)
    head, _ = packing.render_sft(tok, row["prompt"], row["response"])
    n_prompt = len(tok(head, add_special_tokens=False)["input_ids"])
    assert head.startswith("### Instruction:")  # GPT-2 has no chat template
    assert labels[:n_prompt] == [packing.IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tok.eos_token_id
    ids2, labels2 = packing.sft_example(tok, row, 64, include_prompt_loss=True)
    assert ids2 == ids and labels2 == ids
    ids3, labels3 = packing.sft_example(tok, row, 5, include_prompt_loss=False)
    assert len(ids3) == len(labels3) == 5


def test_sft_uses_chat_template_when_present(tiny_ref):
    from forgetcheck.models import registry

    tok = registry.load_tokenizer(tiny_ref)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    head, tail = packing.render_sft(tok, "Name a bone.", "The femur.")
    assert head == "<|user|>Name a bone.\n<|assistant|>" and tail == "The femur.\n"


def test_packing_fills_rows_and_keeps_masks():
    examples = [([1, 2, 3], [-100, 2, 3]), ([4, 5], [-100, 5]), ([6, 7, 8, 9], [6, 7, 8, 9])]
    rows = packing.pack(lambda i: examples[i], 3, n_rows=4, seq_len=5, data_seed=0)
    assert rows.input_ids.shape == (4, 5) and bool(rows.attention_mask.all())
    stream = rows.input_ids.flatten().tolist()
    labels = rows.labels.flatten().tolist()
    lookup = {tok: lab for ex in examples for tok, lab in zip(*ex)}
    assert all(lookup[t] == lab for t, lab in zip(stream, labels))
    assert sorted(stream[:9]) == list(range(1, 10))  # one whole epoch first, in a shuffled order


def _padded_batch(vocab: int, seq_len: int = 16):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (4, seq_len), generator=g)
    mask = torch.ones_like(ids)
    for r, real in enumerate((16, 9, 12, 5)):
        mask[r, real:] = 0
    labels = ids.clone()
    labels[mask == 0] = packing.IGNORE
    labels[1, :4] = packing.IGNORE  # a masked prompt too
    return ids, labels, mask


def _training_model(tiny_ref):
    """The tiny model in training mode without dropout, and the padded batch: (model, ids, labels, mask, n)."""
    from forgetcheck.models import registry

    model, _ = registry.load(tiny_ref)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ids, labels, mask = _padded_batch(model.config.vocab_size)
    return model, ids, labels, mask, loop.label_count(labels)


def test_grad_accum_equals_one_big_batch_with_padded_rows(tiny_ref):
    model, ids, labels, mask, n = _training_model(tiny_ref)

    def grads(micro):
        model.zero_grad(set_to_none=True)
        loop.accumulate(model, micro, n)
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    one = grads([(ids, labels, mask)])
    accum = grads([(ids[i:i + 1], labels[i:i + 1], mask[i:i + 1]) for i in range(4)])
    rel = float((one - accum).norm() / one.norm())
    assert rel < 1e-5
    # the naive loss/K per micro-batch is what this guards against: it differs visibly with padded rows
    model.zero_grad(set_to_none=True)
    for i in range(4):
        (loop.micro_batch_loss(model, ids[i:i + 1], labels[i:i + 1], mask[i:i + 1],
                                loop.label_count(labels[i:i + 1]), loop.contextlib.nullcontext) / 4).backward()
    naive = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert float((one - naive).norm() / one.norm()) > 1e-2


def test_loss_at_label_positions_only_equals_the_full_logits_loss(tiny_ref, monkeypatch):
    """The projection runs only where a label is predicted; loss and every gradient equal the plain
    full-logits cross-entropy (and a micro-batch with no label gives zero, not NaN). A model whose logits do
    not come through get_output_embeddings() falls back to the full logits, with the same result."""
    import torch.nn.functional as F

    model, ids, labels, mask, n = _training_model(tiny_ref)

    def reference():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                               ignore_index=packing.IGNORE, reduction="sum") / n
        loss.backward()
        return float(loss.detach()), torch.cat([p.grad.flatten() for p in model.parameters()])

    def ours():
        model.zero_grad(set_to_none=True)
        loss = loop.micro_batch_loss(model, ids, labels, mask, n, loop.contextlib.nullcontext)
        loss.backward()
        return float(loss.detach()), torch.cat([p.grad.flatten() for p in model.parameters()])

    calls = []
    head = model.get_output_embeddings()
    head.register_forward_hook(lambda _m, _a, out: calls.append(tuple(out.shape)))
    want_loss, want_grad = reference()
    got_loss, got_grad = ours()
    assert calls[-1] == (n, model.config.vocab_size)  # logits only at the n label-predicting positions
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    assert float((got_grad - want_grad).norm() / want_grad.norm()) < 1e-5

    none = labels.clone().fill_(packing.IGNORE)
    zero = loop.micro_batch_loss(model, ids, none, mask, n, loop.contextlib.nullcontext)
    assert float(zero.detach()) == 0.0

    monkeypatch.setattr(type(model), "get_output_embeddings", lambda self: None)
    fb_loss, fb_grad = ours()
    assert calls[-1] == (*ids.shape, model.config.vocab_size)  # full logits: the fallback
    assert fb_loss == pytest.approx(want_loss, rel=1e-6)
    assert float((fb_grad - want_grad).norm() / want_grad.norm()) < 1e-5


def test_checkpoint_reloads_to_identical_logits(tiny_ref, tmp_path):
    from transformers import AutoModelForCausalLM

    from forgetcheck.models import registry

    model, tok = registry.load(tiny_ref)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    checkpoint.save_hf_checkpoint(model, tok, tmp_path / "ck", tiny_ref, "sft", world=1, rank=0)
    assert list((tmp_path / "ck").glob("*.safetensors"))
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ck").eval()
    x = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)
    assert registry.resolve(str(tmp_path / "ck")).random_weights is True


def test_resume_after_interruption_matches_uninterrupted(tiny_ref, domain, tmp_path, monkeypatch):
    """With the forgetting curve measured on the way (--eval-every 2: points after steps 1, 2, 4, 6): measuring
    does not disturb training, and the curve's points survive the interruption."""
    from test_curve import planted_tasks

    from forgetcheck.train import curve, signals

    monkeypatch.setattr(curve, "FORECAST_SIGNALS", ())  # the fit window has one point: nothing to fit
    monkeypatch.setattr(signals, "MIN_ITEMS", 2)  # small points: this test is about where they land
    monkeypatch.setattr(signals, "MIN_TOKENS", 64)
    tasks = planted_tasks(tmp_path / "tasks")
    cfg = replace(CFG, budget_tokens=6 * 2 * 32, save_every=2, eval_every=2)
    full = RunDir(tmp_path / "full")
    loop.train_arm("cpt", tiny_ref, domain, cfg, full, tasks_dir=tasks)

    class Killed(Exception):
        pass

    def kill_at_3(step):
        if step == 3:
            raise Killed

    cut = RunDir(tmp_path / "cut")
    with pytest.raises(Killed):
        loop.train_arm("cpt", tiny_ref, domain, cfg, cut, on_step=kill_at_3, tasks_dir=tasks)
    assert json.loads((checkpoint.resume_dir(cut, "cpt") / "meta.json").read_text())["step"] == 2
    assert not cut.train_json("cpt").exists()
    assert [p.step for p in signals.read_curve(cut.curve_json("cpt")).points] == [1, 2]  # written as measured
    rec = loop.train_arm("cpt", tiny_ref, domain, cfg, cut, tasks_dir=tasks)
    assert rec["optimizer_steps"] == 6
    assert rec["loss_curve"] == json.loads(full.train_json("cpt").read_text())["loss_curve"]
    assert _max_diff(_weights(full.ckpt("cpt")), _weights(cut.ckpt("cpt"))) == 0.0
    assert not checkpoint.resume_dir(cut, "cpt").exists()
    a, b = signals.read_curve(full.curve_json("cpt")), signals.read_curve(cut.curve_json("cpt"))
    assert [p.step for p in a.points] == [p.step for p in b.points] == [1, 2, 4, 6]
    assert a.meta["complete"] and b.meta["complete"] and len(b.meta["reference_s"]) == 2  # built again on resume
    for p, q in zip(a.points, b.points):
        assert (p.tokens, p.train_loss) == (q.tokens, q.train_loss)
        for sig in signals.SIGNALS:
            assert getattr(p, sig) == pytest.approx(getattr(q, sig), rel=1e-5, abs=1e-7)
    assert rec["curve"]["points"] == 4 and rec["curve"]["overhead"]["fraction"] > 0


def test_bf16_mixed_and_grad_checkpointing_train(tiny_ref, domain, tmp_path):
    cfg = replace(CFG, budget_tokens=2 * 2 * 32, precision="bf16-mixed", grad_checkpointing=True)
    rec = loop.train_arm("cpt", tiny_ref, domain, cfg, RunDir(tmp_path))
    assert rec["optimizer_steps"] == 2 and all(loss == loss for _, loss in rec["loss_curve"])
    from forgetcheck.models import registry

    n_params = sum(p.numel() for p in registry.load(tiny_ref)[0].parameters())
    mem = rec["memory"]["measured_components"]
    assert mem["weights"] == mem["gradients"] == 4 * n_params  # fp32 master weights and gradients


def test_bf16_true_warns(tiny_ref, domain, tmp_path):
    cfg = replace(CFG, budget_tokens=2 * 32, micro_batch=1, precision="bf16-true")
    with pytest.warns(UserWarning, match="bf16-true"):
        rec = loop.train_arm("cpt", tiny_ref, domain, cfg, RunDir(tmp_path))
    assert rec["optimizer_steps"] == 2


@pytest.mark.slow  # torchao compiles its step once per parameter shape, which dominates a tiny run
def test_adamw8bit_state_under_2_5_bytes_per_param():
    assert optimizer.eightbit_backend() == "torchao", "torchao is a default dependency: pip install torchao"
    from transformers import GPT2Config, GPT2LMHeadModel

    # 8-bit state is kept for tensors whose size is a multiple of the 256-value block (GPT-2 124M's are; the
    # tiny model's 50257 x 64 embedding is not, so it would stay fp32): hidden 256 here.
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=4, n_embd=256, n_positions=64))
    model.train()
    opt = optimizer.build_optimizer(model.parameters(), replace(CFG, optim="adamw8bit"))
    x = torch.randint(0, 1000, (2, 16))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    n = sum(p.numel() for p in model.parameters())
    per_param = optimizer.optimizer_state_bytes(opt) / n
    assert 1.5 < per_param < 2.5
    fp32 = torch.optim.AdamW(model.parameters())
    fp32.step()
    assert optimizer.optimizer_state_bytes(fp32) / n >= 8


def test_impossible_combinations_are_refused(monkeypatch):
    monkeypatch.setattr(optimizer, "eightbit_backend", lambda: "bitsandbytes")
    with pytest.raises(BadInput, match="torchao"):
        loop.validate("sft", replace(CFG, optim="adamw8bit", nproc=2, budget_tokens=10_000), "cpu")
    monkeypatch.setattr(optimizer, "eightbit_backend", lambda: None)
    with pytest.raises(BadInput, match="pip install torchao"):
        loop.validate("sft", replace(CFG, optim="adamw8bit"), "cpu")
    with pytest.raises(BadInput, match="bf16-mixed"):
        loop.validate("sft", replace(CFG, precision="fp16-mixed"), "cpu")
    with pytest.raises(BadInput, match="less than one optimizer step"):
        loop.validate("cpt", replace(CFG, budget_tokens=10), "cpu")


def test_refuses_when_plan_does_not_fit(tiny_ref, domain, tmp_path, monkeypatch):
    from forgetcheck.train import memory

    monkeypatch.setattr(memory, "device_capacity", lambda device: (1_000_000, "test capacity"))
    with pytest.raises(BadInput, match="does not fit.*--force"):
        loop.train_arm("cpt", tiny_ref, domain, CFG, RunDir(tmp_path / "a"))
    assert not RunDir(tmp_path / "a").train_json("cpt").exists()
    rec = loop.train_arm("cpt", tiny_ref, domain, replace(CFG, budget_tokens=64, micro_batch=1, force=True),
                          RunDir(tmp_path / "b"))
    assert rec["optimizer_steps"] == 2


@pytest.mark.slow
def test_fsdp2_two_processes_match_one_process_on_joined_batch(tiny_ref, domain, tmp_path):
    one = RunDir(tmp_path / "one")
    two = RunDir(tmp_path / "two")
    cfg1 = replace(CFG, budget_tokens=3 * 2 * 32, micro_batch=2, nproc=1)
    cfg2 = replace(CFG, budget_tokens=3 * 2 * 32, micro_batch=1, nproc=2)
    r1 = loop.train_arm("sft", tiny_ref, domain, cfg1, one)
    r2 = loop.train_arm("sft", tiny_ref, domain, cfg2, two)
    assert r1["optimizer_steps"] == r2["optimizer_steps"] == 3
    assert r1["tokens_seen"] == r2["tokens_seen"]
    assert _max_diff(_weights(one.ckpt("sft")), _weights(two.ckpt("sft"))) < 1e-5
    assert Path(two.ckpt("sft") / "forgetcheck.json").exists()


def test_cli_train_writes_the_run_and_refuses_bad_flags(tiny_ref, domain, tmp_path):
    import subprocess
    import sys

    run = tmp_path / "run"
    base = [sys.executable, "-m", "forgetcheck", "train", "--base", "tiny-gpt2", "--data", str(domain.root),
            "--run", str(run), "--seq-len", "32", "--micro-batch", "2"]
    r = subprocess.run(base + ["--arms", "cpt", "--budget-tokens", "128"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads((run / "train" / "cpt.json").read_text())
    assert rec["optimizer_steps"] == 2 and "weights+grads+optim" in r.stdout and "tokens/s" in r.stdout
    assert (run / "ckpt" / "cpt" / "model.safetensors").exists()
    r = subprocess.run(base + ["--arms", "sft,xyz", "--budget-tokens", "10", "--precision", "fp16-mixed",
                               "--device", "cpu"], capture_output=True, text=True)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()[-1]
    assert "xyz" in err and "--budget-tokens" in err and "fp16-mixed" in err


@pytest.mark.slow
def test_fsdp2_resume_after_crash_matches_uninterrupted(tiny_ref, domain, tmp_path, monkeypatch):
    from forgetcheck.errors import RuntimeFailure

    cfg = replace(CFG, budget_tokens=4 * 2 * 32, micro_batch=1, nproc=2, save_every=2)
    full = RunDir(tmp_path / "full")
    loop.train_arm("cpt", tiny_ref, domain, cfg, full)
    cut = RunDir(tmp_path / "cut")
    monkeypatch.setenv(sharding.FAIL_AT_STEP_ENV, "3")
    with pytest.raises(RuntimeFailure):
        loop.train_arm("cpt", tiny_ref, domain, cfg, cut)
    assert json.loads((checkpoint.resume_dir(cut, "cpt") / "meta.json").read_text())["step"] == 2
    monkeypatch.delenv(sharding.FAIL_AT_STEP_ENV)
    rec = loop.train_arm("cpt", tiny_ref, domain, cfg, cut)
    assert rec["loss_curve"] == json.loads(full.train_json("cpt").read_text())["loss_curve"]
    assert _max_diff(_weights(full.ckpt("cpt")), _weights(cut.ckpt("cpt"))) == 0.0


def test_bf16_on_a_cpu_without_bf16_matmul_says_so(monkeypatch):
    """Where oneDNN has no bf16 kernels (no AVX-512/AMX) a bf16 run is told it will be slow and what to use."""
    from forgetcheck.device import choose_precision

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    for precision in ("bf16-mixed", "bf16-true"):
        assert "--precision fp32 trains faster here" in choose_precision(precision, "cpu").reason
    assert "NOTE" not in choose_precision("fp32", "cpu").reason
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert "NOTE" not in choose_precision("bf16-mixed", "cpu").reason
