"""The main job end to end on the tiny model: what lands in the run directory, that an interrupted run resumes
to the same result, that a planted regression fails the gate and an unchanged copy passes it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from planted import TASK_YAML

from forgetcheck import config
from forgetcheck.cli.run import run_pipeline
from forgetcheck.eval import runner
from forgetcheck.models import registry
from forgetcheck.report.html import write_report
from forgetcheck.rundir import RunDir, read_json
from forgetcheck.schema import COMPARE_VERSION, GATE_VERSION
from forgetcheck.train import loop
from forgetcheck.verdict import compare, gate

TASKS = ("fc_mmlu_stem", "fc_winogrande", "fc_general_text_ppl", "fc_mmlu_medical")


def _user_data(folder: Path) -> Path:
    """A small domain folder of the user-data kind (sft.jsonl + cpt.jsonl)."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    terms = [f"condition {i}" for i in range(60)]
    with open(folder / "sft.jsonl", "w") as f:
        for t in terms:
            f.write(json.dumps({"prompt": f"What is {t}?", "response": f"{t} is a disorder of organ {rng.randint(1, 9)}."}) + "\n")
    with open(folder / "cpt.jsonl", "w") as f:
        for t in terms:
            f.write(json.dumps({"text": f"The term {t} names a disorder. It affects organ {rng.randint(1, 9)} "
                                        f"and is treated with rest."}) + "\n")
    return folder


def _cfg(tmp_path: Path, run_id: str, data: Path) -> config.RunConfig:
    return config.RunConfig(
        base="tiny-gpt2", data=str(data), out_dir=str(tmp_path / "runs"), run_id=run_id, device="cpu",
        train=config.TrainConfig(budget_tokens=1024, seq_len=32, micro_batch=2, lr=1e-3, save_every=2),
        eval=config.EvalConfig(tasks=TASKS, limit=3, batch_size=8),
    )


def _comparable(compare_json: Path) -> dict:
    """compare.json minus what names the run folder itself."""
    c = read_json(compare_json)
    c.pop("run_id")
    for m in c["arm_models"].values():
        m.pop("name"), m.pop("path")
    for d in c["drift"].values():  # the base's top-k file each arm's KL was measured against: this run's own
        if d["kl"]:
            d["kl"].pop("reference"), d["kl"].pop("reference_file")
    return c


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, fc_home):
    tmp = tmp_path_factory.mktemp("pipeline")
    data = _user_data(tmp / "data")
    code = run_pipeline(_cfg(tmp, "uninterrupted", data))
    return tmp, data, RunDir(tmp / "runs" / "uninterrupted"), code


def test_run_writes_the_run_directory_contract(finished_run):
    _, _, run, code = finished_run
    assert code == 0  # `run` exits 0 once every stage ran; the verdict is in gate.json
    assert read_json(run.gate)["verdict"] in ("pass", "fail", "inconclusive")
    for p in (run.config, run.manifest, run.eval_json("base"), run.eval_json("sft"), run.eval_json("cpt"),
              run.train_json("sft"), run.train_json("cpt"), run.compare, run.report, run.gate):
        assert p.exists(), p
        if p.suffix == ".json":
            assert read_json(p)["schema_version"] == {run.compare: COMPARE_VERSION, run.gate: GATE_VERSION}.get(p, 1)
    at_chance = compare.uninformative_tasks(run.eval_json("base"))
    assert set(at_chance) == {"fc_mmlu_stem", "fc_winogrande"}  # random weights: both MC tasks at chance
    for arm in ("sft", "cpt"):
        assert (run.ckpt(arm) / "config.json").exists() and list(run.ckpt(arm).glob("*.safetensors"))
        ev = read_json(run.eval_json(arm))
        # the arms are scored on every task but those the base is at chance on, and the file says why
        assert ev["skipped"] == at_chance and ev["skipped"]["fc_winogrande"].startswith("the base is not above chance")
        for task in TASKS:
            assert (run.samples_dir(arm) / f"{task}.jsonl").exists() == (task not in at_chance)
    c = read_json(run.compare)
    assert f"sft: not scored: {at_chance['fc_mmlu_stem']}" in c["tasks"]["fc_mmlu_stem"]["notes"]
    assert c["tasks"]["fc_mmlu_stem"]["unscored"] == {"sft": at_chance["fc_mmlu_stem"], "cpt": at_chance["fc_mmlu_stem"]}
    g = read_json(run.gate)
    assert {e["task"] for e in g["excluded"]} == set(at_chance)
    assert [r["status"] for r in g["rules"] if r["rule"] == "coverage"] == ["inconclusive", "inconclusive"]
    manifest = read_json(run.manifest)
    assert manifest["versions"]["torch"] and manifest["versions"]["lm_eval"]
    assert {"eval_base", "train_sft", "train_cpt", "eval_sft", "eval_cpt"} <= set(manifest["timings"])
    assert read_json(run.config)["resolved"]["model"]["random_weights"] is True


def test_arms_had_the_same_budget_and_weights_changed(finished_run):
    _, _, run, _ = finished_run
    sft, cpt = read_json(run.train_json("sft")), read_json(run.train_json("cpt"))
    assert sft["optimizer_steps"] == cpt["optimizer_steps"] > 0
    assert abs(sft["tokens_seen"]["forward"] - cpt["tokens_seen"]["forward"]) <= 32
    assert read_json(run.compare)["budget"]["matched"] is True
    base = read_json(run.eval_json("base"))["model"]["content_hash"]
    for arm in ("sft", "cpt"):
        assert read_json(run.eval_json(arm))["model"]["content_hash"] != base


def test_interrupted_run_resumes_to_the_same_compare(finished_run, monkeypatch):
    tmp, data, done, _ = finished_run
    real_train_arm = loop.train_arm

    def crashing(arm, *args, **kwargs):
        if arm == "cpt":
            def on_step(step):
                if step == 3:
                    raise KeyboardInterrupt  # Ctrl-C in the middle of the second arm
            kwargs["on_step"] = on_step
        return real_train_arm(arm, *args, **kwargs)

    monkeypatch.setattr(loop, "train_arm", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(_cfg(tmp, "interrupted", data))
    run = RunDir(tmp / "runs" / "interrupted")
    assert run.train_json("sft").exists() and not run.train_json("cpt").exists()
    assert not run.compare.exists()
    assert (run.root / "ckpt" / "cpt.resume").exists(), "no resumable checkpoint was left behind"

    monkeypatch.setattr(loop, "train_arm", real_train_arm)
    run_pipeline(config.RunConfig(), resume=run.root)  # flags are ignored: config.json wins
    assert _comparable(run.compare) == _comparable(done.compare)


def test_planted_regression_fails_and_unchanged_copy_passes(tmp_path, tiny_ref):
    """A task the base gets right by construction; a copy with one block damaged must fail the gate with a
    reason naming the task, an exact copy must pass with every delta exactly 0. Item text holding a script is
    shown escaped in the report."""
    import torch

    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    rng = random.Random(1)
    words = "river stone cloud apple tiger lamp music garden paper silver window candle ocean forest".split()
    items = [{"question": f"<script>alert({i})</script> " + " ".join(rng.choices(words, k=8)),
              "choices": [" ".join(rng.choices(words, k=3)) for _ in range(4)], "answer": 0} for i in range(48)]

    def write_items():
        with open(tasks_dir / "planted.jsonl", "w") as f:
            f.writelines(json.dumps(it) + "\n" for it in items)

    write_items()
    (tasks_dir / "planted.yaml").write_text(TASK_YAML.format(data=tasks_dir / "planted.jsonl"))
    cfg = config.EvalConfig(tasks=("planted",), batch_size=8)
    run = RunDir(tmp_path / "run")
    probe = runner.evaluate(tiny_ref, cfg, tmp_path / "probe.json", tasks_dir=tasks_dir)
    rows = [json.loads(x) for x in (tmp_path / probe["tasks"]["planted"]["samples"]).read_text().splitlines()]
    for r in rows:  # the right answer is, by construction, the base model's own choice
        items[r["doc_id"]]["answer"] = max(range(4), key=lambda k: r["loglikelihoods"][k])
    write_items()
    base = runner.evaluate(tiny_ref, cfg, run.eval_json("base"), tasks_dir=tasks_dir, label="base")
    assert base["tasks"]["planted"]["metrics"]["acc"]["value"] == 1.0

    model, tok = registry.load(tiny_ref)
    model.save_pretrained(tmp_path / "same")
    tok.save_pretrained(tmp_path / "same")
    with torch.no_grad():
        for p in model.transformer.h[0].parameters():
            p.add_(torch.randn_like(p) * 5.0)
    model.save_pretrained(tmp_path / "damaged")
    tok.save_pretrained(tmp_path / "damaged")
    for label in ("same", "damaged"):
        runner.evaluate(registry.resolve(str(tmp_path / label)), cfg, run.eval_json(label), tasks_dir=tasks_dir,
                            label=label, reference=run.eval_json("base"))

    result = compare.compare_run(run)
    same = result["tasks"]["planted"]["arms"]["same"]
    assert same["delta"] == 0.0 and same["flips"]["right_to_wrong"] == 0 and same["flips"]["wrong_to_right"] == 0
    # at the default 2-point margin a soft-accuracy PASS needs >= 165 items (stats.pass_items); 48 unchanged items
    # rule out 6.7 points whatever the pattern, and the damaged copy loses ~11 of the tiny model's ~36
    verdict, _ = gate.gate_run(run.root, {"max_drop": 8, "max_mean_drop": 8})
    assert verdict["arms"]["same"]["passed"] is True and verdict["arms"]["same"]["verdict"] == "pass"
    assert verdict["arms"]["damaged"]["verdict"] == "fail"
    failed = [r for r in verdict["rules"] if r["arm"] == "damaged" and r["status"] == "fail"]
    assert any(r.get("task") == "planted" and "planted" in r["reason"] for r in failed)

    html = write_report(run).read_text()
    assert "<script>alert(" not in html and "&lt;script&gt;alert(" in html


def test_keep_uninformative_scores_the_arms_on_every_task_and_a_task_left_unscored_is_never_passed(finished_run):
    """--keep-uninformative: the arms are scored on the tasks the base is at chance on, and gated on them. A
    gate asked to keep them on a run that skipped them must not pass over them: inconclusive, naming why."""
    tmp, data, done, _ = finished_run
    cfg = _cfg(tmp, "keep", data)
    cfg = config.RunConfig(**{**cfg.__dict__, "gate": config.GateConfig(keep_uninformative=True)})
    assert run_pipeline(cfg) == 0
    run = RunDir(tmp / "runs" / "keep")
    for arm in ("sft", "cpt"):
        assert "skipped" not in read_json(run.eval_json(arm))
        assert all((run.samples_dir(arm) / f"{t}.jsonl").exists() for t in TASKS)
    kept = gate.decide(read_json(done.compare), config.GateConfig(keep_uninformative=True))
    unscored = [r for r in kept["rules"] if r["rule"] == "task_drop" and "was not scored" in r["reason"]]
    assert {(r["arm"], r["task"]) for r in unscored} == {(a, t) for a in ("sft", "cpt")
                                                           for t in ("fc_mmlu_stem", "fc_winogrande")}
    assert all(r["status"] == "inconclusive" and "(the base is not above chance on it (" in r["reason"]
               and "--keep-uninformative" in r["reason"] for r in unscored)
    assert kept["verdict"] != "pass"
