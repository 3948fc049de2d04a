"""Scale-out on CPU (gloo): several "nodes" through torchrun's static rendezvous on localhost, training started
under an external launcher (torchrun, SLURM's variables), hybrid sharding, and the sharded HF checkpoint written
from FSDP2's sharded state -- each against one process on the joined batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from forgetcheck.config import TrainConfig
from forgetcheck.data.domain import DomainData
from forgetcheck.errors import BadInput
from forgetcheck.rundir import RunDir
from forgetcheck.train import checkpoint, loop, sharding

WORDS = ("fever cough anemia insulin biopsy cardiac renal hepatic tumor lesion dose therapy chronic acute "
         "symptom syndrome patient clinical nerve muscle").split()
FLAGS = ["--arms", "cpt", "--seq-len", "32", "--budget-tokens", str(3 * 2 * 32), "--micro-batch", "1", "--lr", "1e-3",
         "--seed", "0", "--device", "cpu"]
ONE = TrainConfig(budget_tokens=3 * 2 * 32, seq_len=32, micro_batch=2, grad_accum=1, lr=1e-3, seed=0, data_seed=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")}
    env.update(OMP_NUM_THREADS="1", **{k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture(scope="module")
def domain(tmp_path_factory) -> DomainData:
    root = tmp_path_factory.mktemp("domain")
    with open(root / "cpt.jsonl", "w") as f:
        for i in range(24):
            f.write(json.dumps({"text": " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(10 + i % 17))})
                    + "\n")
    return DomainData(name="fixture", root=root, sft=None, cpt=root / "cpt.jsonl", heldout=None, packaged=False)


def _weights(folder) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(folder).state_dict().items()}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _logits(folder) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=torch.arange(3, 40).view(1, -1)).logits


@pytest.fixture(scope="module")
def one_process(tiny_ref, domain, tmp_path_factory):
    """One process, micro-batch 2: the joined batch of two ranks with micro-batch 1."""
    run = RunDir(tmp_path_factory.mktemp("one"))
    loop.train_arm("cpt", tiny_ref, domain, ONE, run)
    return run.ckpt("cpt")


# ---- fast: the launch plumbing ---------------------------------------------------------------------------

def test_launch_flags_and_problems():
    assert sharding.Launch().torchrun_args(4) == ["--standalone", "--nproc-per-node=4"]
    two = sharding.Launch(nnodes=2, node_rank=1, rdzv_endpoint="node0.cluster:29500")
    assert two.torchrun_args(8) == ["--nnodes=2", "--node-rank=1", "--nproc-per-node=4",
                                    "--master-addr=node0.cluster", "--master-port=29500"]
    assert two.problems(8) == []
    assert any("multiple of --nnodes" in p for p in two.problems(3))
    assert any("--rdzv-endpoint" in p for p in sharding.Launch(nnodes=2).problems(2))
    assert any("--node-rank" in p for p in sharding.Launch(nnodes=2, node_rank=2, rdzv_endpoint="h:1").problems(2))
    assert any("--nnodes 2" in p for p in sharding.Launch(hybrid_shard=True).problems(2))


def test_external_launcher_detection(monkeypatch):
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "MASTER_ADDR",
              "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    assert sharding.external_ranks() is None
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task allocation is a plain process
    assert sharding.external_ranks() is None
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert sharding.external_ranks() == {"rank": 3, "world": 4, "local_rank": 1, "nodes": 1, "source": "slurm"}
    with pytest.raises(BadInput, match="MASTER_ADDR and MASTER_PORT"):
        sharding.join_external("cpu")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert sharding.external_ranks() == {"rank": 1, "world": 2, "local_rank": 1, "nodes": 2, "source": "torchrun"}


def test_cli_refuses_bad_node_flags(tmp_path):
    r = subprocess.run([sys.executable, "-m", "forgetcheck", "train", "--base", "tiny-gpt2", "--data", "med",
                        "--run", str(tmp_path / "r"), "--nproc", "3", "--nnodes", "2", *FLAGS],
                       capture_output=True, text=True, env=_env())
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()[-1]
    assert "multiple of --nnodes" in err and "--rdzv-endpoint" in err
    assert not (tmp_path / "r").exists()


def test_unique_state_names_skip_tied_copies(tiny_ref):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_ref.path)
    names = checkpoint._unique_state_names(model)
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names
    assert len(names) == len(set(names)) == len(list(model.named_parameters())) + sum(
        1 for k in model.state_dict() if k not in dict(model.named_parameters(remove_duplicate=False)))


# ---- slow: real processes ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_nodes_match_one_process_and_write_a_sharded_checkpoint(tiny_ref, domain, one_process, tmp_path):
    """Two `forgetcheck train --nnodes 2 --node-rank k` invocations (one torchrun each) meeting on localhost give
    the weights of one process on the joined batch; the checkpoint is written as several safetensors shards
    straight from the sharded state and loads with from_pretrained to the same logits."""
    run = tmp_path / "two-nodes"
    port = _free_port()
    cmd = [sys.executable, "-m", "forgetcheck", "train", "--base", "tiny-gpt2", "--data", str(domain.root),
           "--run", str(run), "--nproc", "2", "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}", *FLAGS]
    env = _env(**{checkpoint.SHARD_BYTES_ENV: 200_000})
    nodes = [subprocess.Popen(cmd + ["--node-rank", str(k)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for k in (0, 1)]
    outs = [p.communicate(timeout=600) for p in nodes]
    for p, (_out, err) in zip(nodes, outs):
        assert p.returncode == 0, err[-3000:]
    assert "on node 1 of 2" in outs[1][0]
    ckpt = run / "ckpt" / "cpt"
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    assert _max_diff(_weights(one_process), _weights(ckpt)) < 1e-5
    assert float((_logits(one_process) - _logits(ckpt)).abs().max()) < 1e-4
    rec = json.loads((run / "train" / "cpt.json").read_text())
    assert rec["optimizer_steps"] == 3 and rec["config"]["nproc"] == 2


@pytest.mark.slow
def test_training_started_under_external_torchrun(tiny_ref, domain, one_process, tmp_path):
    run = tmp_path / "ext"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        "-m", "forgetcheck", "train", "--base", "tiny-gpt2", "--data", str(domain.root),
                        "--run-dir", str(run), *FLAGS], capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 0 of 2 (torchrun)" in r.stdout
    assert "launching" not in r.stdout  # joined the launcher instead of starting its own torchrun
    rec = json.loads((run / "train" / "cpt.json").read_text())
    assert rec["config"]["nproc"] == 2  # taken from the launcher
    assert _max_diff(_weights(one_process), _weights(run / "ckpt" / "cpt")) < 1e-5


@pytest.mark.slow
def test_training_started_by_slurm_variables_with_hybrid_sharding(tiny_ref, domain, one_process, tmp_path):
    """Four processes as srun would start them (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, MASTER_ADDR/PORT
    from the job script), two "nodes" of two with hybrid sharding: same weights as one process."""
    run = tmp_path / "slurm"
    port = _free_port()
    flags = [f if f != str(3 * 2 * 32) else str(3 * 4 * 32) for f in FLAGS]
    cmd = [sys.executable, "-m", "forgetcheck", "train", "--base", "tiny-gpt2", "--data", str(domain.root),
           "--run", str(run), "--hybrid-shard", *flags]
    procs = [subprocess.Popen(cmd, env=_env(SLURM_PROCID=k, SLURM_NTASKS=4, SLURM_LOCALID=k % 2, SLURM_NNODES=2,
                                             MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(4)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    one4 = RunDir(tmp_path / "one4")
    loop.train_arm("cpt", tiny_ref, domain, replace(ONE, budget_tokens=3 * 4 * 32, micro_batch=4), one4)
    assert _max_diff(_weights(one4.ckpt("cpt")), _weights(run / "ckpt" / "cpt")) < 1e-5


# ---- data-parallel evaluation ------------------------------------------------------------------------------



def _eval_cmd(tasks_dir, out, backend: str) -> list[str]:
    return ["-m", "forgetcheck", "eval", "--model", "tiny-gpt2", "--tasks", "fc_fixture_mc,fc_fixture_ppl",
            "--tasks-dir", str(tasks_dir), "--backend", backend, "--batch-size", "4", "--device", "cpu",
            "--out", str(out)]


@pytest.mark.parametrize("backend", ["fast", pytest.param("hf", marks=pytest.mark.slow)])
def test_data_parallel_eval_matches_one_process(tiny_ref, tasks_dir, tmp_path, backend):
    """`torchrun --nproc-per-node 2 -m forgetcheck eval` splits the items over two processes and writes the
    per-item records and metrics of one process (each run with its own empty eval cache). Loglikelihoods agree up
    to float rounding, not bit for bit: a rank's batches hold other neighbours than one process's batches."""
    one, two = tmp_path / "one" / "base.json", tmp_path / "two" / "base.json"
    r1 = subprocess.run([sys.executable, *_eval_cmd(tasks_dir, one, backend)], capture_output=True, text=True,
                        env=_env(FORGETCHECK_HOME=tmp_path / "home1"), timeout=600)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                         *_eval_cmd(tasks_dir, two, backend)], capture_output=True, text=True,
                        env=_env(FORGETCHECK_HOME=tmp_path / "home2"), timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    shown = r2.stdout + (two.parent / "base.log.txt").read_text()  # detail lines go to the log (console.py)
    assert "data-parallel over 2 processes" in shown and "on 2 ranks" in shown
    d1, d2 = json.loads(one.read_text()), json.loads(two.read_text())
    for name in ("fc_fixture_mc", "fc_fixture_ppl"):
        rows1 = [json.loads(x) for x in (one.parent / d1["tasks"][name]["samples"]).read_text().splitlines()]
        rows2 = [json.loads(x) for x in (two.parent / d2["tasks"][name]["samples"]).read_text().splitlines()]
        assert len(rows1) == len(rows2) > 2
        for a, b in zip(rows1, rows2):  # same items in the same order; every key equal ...
            lls = ("loglikelihoods", "loglikelihood")
            assert {k: v for k, v in a.items() if k not in lls} == {k: v for k, v in b.items() if k not in lls}
            # ... and the scores equal up to float rounding: a rank batches other neighbours than one process does
            x = a.get("loglikelihoods", [a.get("loglikelihood")])
            y = b.get("loglikelihoods", [b.get("loglikelihood")])
            assert max(abs(u - v) for u, v in zip(x, y, strict=True)) < 1e-4, (name, a["doc_id"])
        for m, v in d1["tasks"][name]["metrics"].items():
            assert d2["tasks"][name]["metrics"][m]["value"] == pytest.approx(v["value"], rel=1e-5), (name, m)
            if v["stderr"] is None:
                assert d2["tasks"][name]["metrics"][m]["stderr"] is None
            else:
                assert d2["tasks"][name]["metrics"][m]["stderr"] == pytest.approx(v["stderr"], rel=1e-5)
    assert d2["drift"]["perplexity"] == pytest.approx(d1["drift"]["perplexity"], rel=1e-5)


def test_device_map_eval_gives_the_same_records(tiny_ref, tasks_dir, tmp_path, monkeypatch, capsys):
    """--device-map loads through accelerate's dispatch (on this CPU machine every layer lands on the CPU): the
    per-item records equal a plain load's (each run with its own empty eval cache)."""
    from forgetcheck.config import EvalConfig
    from forgetcheck.eval.runner import evaluate

    cfg = EvalConfig(tasks=("fc_fixture_mc",), backend="fast", batch_size=4, limit=6)
    docs = []
    for i, dm in enumerate((None, "auto")):
        monkeypatch.setenv("FORGETCHECK_HOME", str(tmp_path / f"home{i}"))
        out = tmp_path / f"e{i}" / "base.json"
        docs.append((out, evaluate(tiny_ref, cfg, out, tasks_dir=tasks_dir, device_map=dm)))
    assert "(device map)" in capsys.readouterr().out
    rows = [(o.parent / d["tasks"]["fc_fixture_mc"]["samples"]).read_text() for o, d in docs]
    assert rows[0] == rows[1] and rows[0].count("\n") == 6


@pytest.mark.slow  # two torchrun processes, each compiling the 8-bit step per parameter shape
def test_8bit_adamw_on_sharded_states_matches_one_process(tiny_ref, domain, tmp_path):
    """forgetcheck's 8-bit AdamW (train/adamw8bit.py) updates FSDP2's DTensor states through each rank's local
    shard: on every layer one process keeps in 8 bits, two ranks end within a tenth of what the steps moved it
    (an update lost on a shard would miss by all of it). Like torchao, the optimizer decides per shard: attn.c_proj's
    2048-value shards keep fp32 state, and rank 1's 25128 rows of the tied 50257 x 64 embedding are quantized where
    one process keeps the whole tensor in fp32, so that weight differs by design (with torchao's own optimizer too:
    2.8e-2, checked by hand); it is only checked to have moved."""
    one = RunDir(tmp_path / "one")
    loop.train_arm("cpt", tiny_ref, domain, replace(ONE, optim="adamw8bit"), one)
    run = tmp_path / "two"
    r = subprocess.run([sys.executable, "-m", "forgetcheck", "train", "--base", "tiny-gpt2", "--data", str(domain.root),
                        "--run-dir", str(run), *FLAGS, "--optim", "adamw8bit", "--nproc", "2"],
                       capture_output=True, text=True, env=_env(), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((run / "train" / "cpt.json").read_text())
    assert rec["config"]["nproc"] == 2 and rec["config"]["optim"] == "adamw8bit"
    base, single, sharded = _weights(tiny_ref.path), _weights(one.ckpt("cpt")), _weights(run / "ckpt" / "cpt")
    blocks = [k for k, v in single.items() if v.numel() % 256 == 0 and v.dim() == 2]  # the 8-bit layers
    assert len(blocks) >= 8
    for k in blocks:
        moved = float((single[k] - base[k]).abs().max())
        assert moved > 1e-3  # three steps moved the weight
        assert float((single[k] - sharded[k]).abs().max()) < 0.1 * moved, k
    assert float((sharded["lm_head.weight"] - base["lm_head.weight"]).abs().max()) > 1e-3
