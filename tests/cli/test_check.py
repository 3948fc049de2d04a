"""`forgetcheck check` on the tiny model: an unchanged copy has every delta exactly 0, a damaged copy is caught on a
task the base answers right by construction, the base evaluation comes from the cache the second time, and
stock lm-eval `--log_samples` folders of the same models give lm-eval's own accuracies and the same verdicts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import planted
import pytest
from conftest import forgetcheck_cli

from forgetcheck import config
from forgetcheck.cli import check, inputs
from forgetcheck.rundir import RunDir, read_json, read_jsonl

CFG = config.EvalConfig(tasks=("planted",), backend="hf", batch_size=32)
LM_TASKS = {"planted": ("acc", 100.0), "planted_ppl": ("word_perplexity", 1.0), "planted_gen": ("exact_match", 100.0)}
"""lm-eval tasks of three output types (multiple choice, rolling perplexity, generation): primary metric, scale."""
N_ITEMS = 48
WIDE = {"max_drop": 8, "max_mean_drop": 8}
"""The margins these checks gate at: a soft-accuracy PASS at the default 2 points needs >= 165 items whatever the
pattern (stats.pass_items). The tiny model's soft accuracy on the planted task is ~36 (chance 25), so no copy can
lose more than ~11 points; 48 unchanged items rule out 6.7 whatever the pattern, and the damaged copy's drop of
~11.6 is shown beyond 8."""


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_ref):
    """The planted task, the two copies, and one finished check of both (models, stock HFLM backend)."""
    tmp = tmp_path_factory.mktemp("check")
    tasks_dir = planted.planted_task(tmp / "tasks", Path(tiny_ref.path), n=N_ITEMS)
    same, damaged = planted.copies(Path(tiny_ref.path), tmp / "models")
    code = check.check_models("tiny-gpt2", [str(same), str(damaged)], CFG, out=tmp / "runs", run_id="first",
                          device="cpu", tasks_dir=tasks_dir, junit=tmp / "junit.xml", markdown=tmp / "gate.md",
                          gate_overrides=WIDE)
    return {"tmp": tmp, "tasks": tasks_dir, "same": same, "damaged": damaged, "run": RunDir(tmp / "runs" / "first"),
            "code": code}


@pytest.fixture(scope="module")
def lmeval(world, tiny_ref):
    """Stock lm-eval outputs (model="hf", log_samples, lm-eval's own EvaluationTracker) of the three models."""
    out = world["tmp"] / "lm_eval"
    return {name: planted.lmeval_outputs(path, world["tasks"], out / name, tasks=LM_TASKS)
            for name, path in (("base", Path(tiny_ref.path)), ("same", world["same"]),
                               ("damaged", world["damaged"]))}


def test_check_writes_the_run_contract_and_gates(world):
    run, code = world["run"], world["code"]
    assert code == 1  # the damaged copy fails, so the release gate fails
    for p in (run.config, run.manifest, run.eval_json("base"), run.eval_json("same"), run.eval_json("damaged"),
              run.compare, run.report, run.gate):
        assert p.exists(), p
    assert not (run.root / "train").exists() and not (run.root / "ckpt").exists()
    cfg = read_json(run.config)
    assert cfg["command"] == "check" and cfg["arms"] == ["same", "damaged"]
    gate = read_json(run.gate)
    assert gate["arms"]["same"]["passed"] is True and gate["arms"]["damaged"]["passed"] is False
    failed = [r for r in gate["rules"] if r["arm"] == "damaged" and not r["passed"]]
    assert any(r["task"] == "planted" for r in failed)
    assert "<testcase" in (world["tmp"] / "junit.xml").read_text()
    assert "FAIL" in (world["tmp"] / "gate.md").read_text()
    html = run.report.read_text()
    assert "same" in html and "damaged" in html and "check of models trained elsewhere" in html


def test_unchanged_copy_has_every_delta_exactly_zero(world):
    compare = read_json(world["run"].compare)
    base = read_json(world["run"].eval_json("base"))
    assert base["tasks"]["planted"]["metrics"]["acc"]["value"] == 1.0  # right by construction
    same_eval = read_json(world["run"].eval_json("same"))
    assert same_eval["timings"]["tasks"]["planted"]["cached"] is False  # scored afresh, not the base's entry
    assert same_eval["model"]["content_hash"] != base["model"]["content_hash"]
    same = compare["tasks"]["planted"]["arms"]["same"]
    # Bonett-Price keeps the accuracy interval open around 0 at zero flips; soft accuracy is exactly 0 with a
    # zero-width interval, and both tests say "no change" (p = 1)
    assert same["delta"] == 0.0 and same["ci"][0] < 0 < same["ci"][1] and same["p_value"] == 1.0
    assert same["soft"]["point"] == 0.0 and same["soft"]["ci"] == [0.0, 0.0]
    assert same["flips"] == {"right_to_wrong": 0, "wrong_to_right": 0}
    for suite in compare["suites"].values():
        assert suite["arms"]["same"]["delta"] == 0.0
    assert compare["drift"]["same"]["kl"]["mean"] == 0.0
    assert compare["drift"]["same"]["text_perplexity"]["ratio"] == 1.0
    damaged = compare["tasks"]["planted"]["arms"]["damaged"]
    assert damaged["delta"] < -30 and damaged["significant"] is True


def test_second_check_reads_the_base_from_the_cache_and_shows_the_previous_release(world, capfd):
    tmp = world["tmp"]
    code = check.check_models("tiny-gpt2", [f"new={world['damaged']}"], CFG, out=tmp / "runs", run_id="second",
                          device="cpu", tasks_dir=world["tasks"], previous=str(world["run"].root), gate_overrides=WIDE)
    assert code == 1
    run = RunDir(tmp / "runs" / "second")
    timings = read_json(run.eval_json("base"))["timings"]
    assert timings["tasks"]["planted"]["cached"] is True and timings["drift"]["cached"] is True
    assert "planted: cache hit" in (run.root / "log.txt").read_text()  # a detail line: the log holds it
    assert "new vs previous release first/same" in capfd.readouterr().out
    # --previous runs/first: its one candidate that passed (same) is the previous release
    hist = read_json(run.root / "history.json")
    assert hist["previous"]["arm"] == "same" and hist["previous"]["run_id"] == "first"
    new = hist["compare"]["tasks"]["planted"]["arms"]["new"]
    first = read_json(world["run"].compare)["tasks"]["planted"]["arms"]["damaged"]
    assert new["delta"] == first["delta"] and new["significant"] is True  # previous == base here
    assert (run.root / "history" / "samples" / "previous" / "planted.jsonl").is_file()
    html = run.report.read_text()
    assert 'id="previous-release"' in html and "first/same" in html and "regression" in html


def test_lm_eval_folders_give_lm_evals_accuracies_and_the_same_verdicts(world, lmeval):
    tmp = world["tmp"]
    code = check.check_samples(lmeval["base"], [f"same={lmeval['same']}", f"damaged={lmeval['damaged']}"],
                           out=tmp / "runs", run_id="samples", gate_overrides=WIDE)
    run = RunDir(tmp / "runs" / "samples")
    compare = read_json(run.compare)
    for t, (metric, scale) in LM_TASKS.items():  # per task, lm-eval's own scores, from the paired items
        task = compare["tasks"][t]
        assert task["metric"] == metric and task["arms"]["same"]["delta"] == 0.0
        for name, score in (("base", task["base"]["score_paired"]), ("same", task["arms"]["same"]["score"]),
                            ("damaged", task["arms"]["damaged"]["score"])):
            lm = read_json(next(lmeval[name].glob("results_*.json")))
            assert score == pytest.approx(lm["results"][t][f"{metric},none"] * scale, rel=1e-9, abs=1e-9), (t, name)
    task = compare["tasks"]["planted"]
    # the same models and items through `forgetcheck check`: the same scores, flips and verdicts
    models_compare = read_json(world["run"].compare)["tasks"]["planted"]
    for arm in ("same", "damaged"):
        assert task["arms"][arm]["score"] == pytest.approx(models_compare["arms"][arm]["score"], abs=1e-9)
        assert task["arms"][arm]["flips"] == models_compare["arms"][arm]["flips"]
    gate, models_gate = read_json(run.gate), read_json(world["run"].gate)
    assert code == 1 and gate["verdict"] == models_gate["verdict"]
    assert {a: v["passed"] for a, v in gate["arms"].items()} == {a: v["passed"] for a, v in models_gate["arms"].items()}
    pairing = read_json(run.root / "pairing.json")
    assert pairing["tasks"]["planted"]["damaged"]["paired"] == N_ITEMS
    assert not (run.root / "eval" / "base.topk.npz").exists()
    # one converter of lm-eval samples: the base's items read from its lm-eval folder are the items its own
    # evaluation recorded (the question, every choice, the right one, the model's pick)
    stock, ours = _records(run, "base", "planted"), _records(world["run"], "base", "planted")
    assert [_item(r) for r in stock] == [_item(r) for r in ours] and len(ours) == N_ITEMS
    assert all(isinstance(r["target"], int) for r in stock)


def _records(run: RunDir, label: str, task: str) -> list[dict]:
    doc = read_json(run.eval_json(label))
    return read_jsonl(run.eval_json(label).parent / doc["tasks"][task]["samples"])


def _item(row: dict) -> tuple:
    return (row["doc_id"], row["doc_hash"], row["target"], row["prompt"], row["choices"], row["correct"],
            row["chosen"]["acc"], row["metrics"]["acc"])



def _samples_file(folder: Path, task: str) -> Path:
    """lm-eval's samples_<task>_<date>.jsonl of exactly this task (a glob `samples_planted_*` also matches
    samples_planted_ppl_*, in whatever order the file system lists them)."""
    hits = [p for p in folder.glob(f"samples_{task}_*.jsonl") if p.name[len(f"samples_{task}_")].isdigit()]
    assert len(hits) == 1, hits
    return hits[0]

def test_items_on_one_side_are_reported_not_dropped(world, lmeval, capfd):
    tmp = world["tmp"]
    cut = tmp / "lm_eval_cut"
    shutil.copytree(lmeval["damaged"], cut)
    sf = _samples_file(cut, "planted")
    rows = [json.loads(x) for x in sf.read_text().splitlines()]
    extra = {**rows[0], "doc_id": 999, "doc_hash": "f" * 64}  # a document the base never saw
    sf.write_text("".join(json.dumps(r) + "\n" for r in rows[5:] + [extra]))
    check.check_samples(lmeval["base"], [f"cut={cut}"], out=tmp / "runs", run_id="cut")
    run = RunDir(tmp / "runs" / "cut")
    out = capfd.readouterr().out
    assert f"{N_ITEMS - 5} items paired with cut; 5 only in the base's outputs, 1 only in cut's" in out
    p = read_json(run.root / "pairing.json")["tasks"]["planted"]["cut"]
    assert [x["doc_id"] for x in p["base_only"]] == [0, 1, 2, 3, 4]
    assert p["candidate_only"] == [{"doc_id": 999, "doc_hash": "f" * 64}]
    arm = read_json(run.compare)["tasks"]["planted"]["arms"]["cut"]
    assert arm["n_paired"] == N_ITEMS - 5 and arm["unpaired"] == {"base_only": 5, "arm_only": 1}
    html = run.report.read_text()
    assert 'id="one-sided"' in html and "5 only in the base" in html


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def test_mismatched_task_config_or_prompt_is_refused(world, lmeval):
    tmp = world["tmp"]

    def fewshot(folder: Path):
        rf = next(folder.glob("results_*.json"))
        r = json.loads(rf.read_text())
        r["configs"]["planted"]["num_fewshot"] = 3
        rf.write_text(json.dumps(r))

    def prompt(folder: Path):
        sf = _samples_file(folder, "planted")
        rows = [json.loads(x) for x in sf.read_text().splitlines()]
        rows[2]["prompt_hash"] = "0" * 64  # e.g. a chat template on this side only
        sf.write_text("".join(json.dumps(r) + "\n" for r in rows))

    for label, edit, expect in (("fewshot", fewshot, "'num_fewshot'"), ("prompt", prompt, "different prompt")):
        folder = _edited_copy(lmeval["damaged"], tmp / f"lm_eval_{label}", edit)
        r = forgetcheck_cli("check", "--base-samples", str(lmeval["base"]), "--candidate-samples", str(folder),
                 "--out", str(tmp / "refused"), "--run-id", label)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "task 'planted'" in lines[0] and expect in lines[0], r.stderr
        assert "Traceback" not in r.stderr
        assert not (tmp / "refused").exists()


def test_differing_tokenizers_skip_kl_with_a_note(world, tmp_path, capfd):
    """A candidate with another vocabulary is still checked; KL drift is skipped with one note."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["[UNK]", "[EOS]", "Answer", ":", *planted.WORDS, *(f"w{i}" for i in range(100))]  # > drift top-k
    vocab = {w: i for i, w in enumerate(words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[EOS]", pad_token="[EOS]")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=512, vocab_size=len(vocab),
                                       bos_token_id=1, eos_token_id=1))
    folder = tmp_path / "other-vocab"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    code = check.check_models("tiny-gpt2", [str(folder)], CFG, out=tmp_path / "runs", run_id="vocab", device="cpu",
                          tasks_dir=world["tasks"])
    assert code in (0, 1)
    out = capfd.readouterr().out
    notes = [x for x in out.splitlines() if "KL drift skipped" in x]
    assert len(notes) == 1 and "other-vocab" in notes[0] and "tokenizer differs" in notes[0]
    run = RunDir(tmp_path / "runs" / "vocab")
    assert "kl" not in read_json(run.eval_json("other-vocab"))["drift"]
    assert read_json(run.compare)["drift"]["other-vocab"]["kl"] is None
    assert any("KL drift skipped" in n for n in read_json(run.manifest)["notes"])
    assert 'id="check-notes"' in run.report.read_text()


def test_bad_input_is_one_line_and_creates_nothing(tmp_path):
    out = tmp_path / "runs"
    cases = [
        (["--base", "tiny-gpt2", "--candidate", "base=/x"], "'base' is taken"),
        (["--base", "tiny-gpt2", "--candidate", "a=tiny-gpt2", "--candidate", "a=tiny-gpt2"], "two candidates are named 'a'"),
        (["--base", "tiny-gpt2", "--candidate", str(tmp_path / "nowhere")], "--candidate nowhere"),
        (["--base", "tiny-gpt2"], "no --candidate"),
        (["--base", "tiny-gpt2", "--candidate", "tiny-gpt2", "--previous", str(tmp_path / "no-run")], "--previous"),
        (["--base-samples", str(tmp_path), "--candidate-samples", str(tmp_path)], "no results_*.json"),
        (["--base", "tiny-gpt2", "--candidate-samples", str(tmp_path)], "--base-samples"),
    ]
    for args, expect in cases:
        r = forgetcheck_cli("check", *args, "--out", str(out))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and expect in lines[0], (args, r.stderr)
        assert not out.exists()


def test_check_takes_every_gate_option():
    """The gate flags are defined once (cli/app.py) and `check` accepts all of them, so gating a run and gating a
    check can never differ in what may be asked."""
    import typer

    from forgetcheck.cli.app import app

    commands = typer.main.get_command(app).commands
    gate_opts = {o for p in commands["gate"].params if p.param_type_name == "option" for o in p.opts}
    check_opts = {o for p in commands["check"].params for o in p.opts}
    assert gate_opts and gate_opts <= check_opts, gate_opts - check_opts


@pytest.mark.parametrize("value, name", [("runs/x/ckpt/sft", "sft"), ("/m/model.gguf", "model"),
                                         ("EleutherAI/pythia-160m", "pythia-160m"), ("prod=/m/v2", "prod"),
                                         ("smollm2-135m", "smollm2-135m")])
def test_candidate_names(value, name):
    named, problems = inputs.name_candidates([value], "--candidate")
    assert not problems and named[0].name == name


def test_candidates_are_not_scored_on_tasks_the_base_is_at_chance_on(world, tmp_path, capfd):
    """As in `run`: a retention task the base cannot show forgetting on (here every answer is a choice the base
    does not prefer: 0 right) is left out of the candidates' evaluation, with the reason in their eval file;
    --keep-uninformative scores them on it."""
    tasks = tmp_path / "tasks"
    shutil.copytree(world["tasks"], tasks)
    items = [json.loads(line) for line in (tasks / "planted.jsonl").read_text().splitlines()]
    for it in items:
        it["answer"] = (it["answer"] + 1) % 4  # never the base's own preference
    (tasks / "chance.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    (tasks / "planted_chance.yaml").write_text(
        (tasks / "planted.yaml").read_text().replace("task: planted", "task: planted_chance")
        .replace(str(world["tasks"] / "planted.jsonl"), str(tasks / "chance.jsonl")))
    (tasks / "planted.yaml").write_text((tasks / "planted.yaml").read_text().replace(str(world["tasks"]), str(tasks)))
    cfg = config.EvalConfig(tasks=("planted", "planted_chance"), backend="hf", batch_size=32)

    check.check_models("tiny-gpt2", [f"same={world['same']}"], cfg, out=tmp_path / "runs", run_id="skip",
                   device="cpu", tasks_dir=tasks, gate_overrides=WIDE)
    run = RunDir(tmp_path / "runs" / "skip")
    assert read_json(run.eval_json("base"))["tasks"]["planted_chance"]["metrics"]["acc"]["value"] == 0.0
    same = read_json(run.eval_json("same"))
    assert set(same["tasks"]) == {"planted"}
    assert set(same["skipped"]) == {"planted_chance"}
    assert same["skipped"]["planted_chance"].startswith("the base is not above chance")
    assert "1 retention task(s) skipped for the candidates" in capfd.readouterr().out
    assert read_json(run.gate)["arms"]["same"]["passed"] is not False

    check.check_models("tiny-gpt2", [f"same={world['same']}"], cfg, out=tmp_path / "runs", run_id="keep",
                   device="cpu", tasks_dir=tasks, gate_overrides={"keep_uninformative": True, **WIDE})
    kept = read_json(RunDir(tmp_path / "runs" / "keep").eval_json("same"))
    assert set(kept["tasks"]) == {"planted", "planted_chance"} and "skipped" not in kept


def test_the_base_screen_items_decide_which_tasks_the_candidates_are_scored_on(world, tiny_ref, tmp_path,
                                                                                 monkeypatch):
    """`check` scores the base's screen items and decides on them alone: planted_hi, which the base answers right
    on every gated item and wrong on every screen item, is left out of the candidates' evaluation; planted_lo, the
    reverse, is scored and gated. The item selection is pinned (items 0-23 gated, 24-47 screen) so that the
    answers can be planted without moving it (the selection hashes each document, answer included)."""
    from forgetcheck.eval import runner

    tasks = planted.planted_task(tmp_path / "tasks", Path(tiny_ref.path), n=48)  # every answer the base's pick
    items = [json.loads(line) for line in (tasks / "planted.jsonl").read_text().splitlines()]
    for name, wrong in (("planted_hi", range(24, 48)), ("planted_lo", range(24))):
        rows = [{**it, "answer": (it["answer"] + 1) % 4} if i in wrong else it for i, it in enumerate(items)]
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        yaml = (tasks / "planted.yaml").read_text().replace("task: planted", f"task: {name}")
        (tasks / f"{name}.yaml").write_text(yaml.replace(str(tasks / "planted.jsonl"), str(tasks / f"{name}.jsonl")))
    monkeypatch.setattr(runner, "select_with_screen",
                        lambda task, limit, count, kind, key=None: (list(range(limit)),
                                                                   list(range(limit, limit + count))))
    cfg = config.EvalConfig(tasks=("planted_hi", "planted_lo"), limit=24, backend="hf", batch_size=32)
    check.check_models("tiny-gpt2", [f"same={world['same']}"], cfg, out=tmp_path / "runs", run_id="screen",
                       device="cpu", tasks_dir=tasks)
    run = RunDir(tmp_path / "runs" / "screen")
    base = read_json(run.eval_json("base"))
    assert base["screen_items"] == 24
    for name, gated, screened in (("planted_hi", 1.0, 0.0), ("planted_lo", 0.0, 1.0)):
        t = base["tasks"][name]
        assert (t["n"], t["screen"]["n"]) == (24, 24)
        assert (t["metrics"]["acc"]["value"], t["screen"]["metrics"]["acc"]["value"]) == (gated, screened)
    same = read_json(run.eval_json("same"))
    assert set(same["tasks"]) == {"planted_lo"} and set(same["skipped"]) == {"planted_hi"}
    assert "0/24 right on its screen items" in same["skipped"]["planted_hi"]
    c = read_json(run.compare)
    assert c["tasks"]["planted_lo"]["informative"]["value"] is True
    assert c["tasks"]["planted_lo"]["informative"]["items"] == "screen"
    assert c["tasks"]["planted_lo"]["arms"]["same"]["n_paired"] == 24
    g = read_json(run.gate)
    assert [e["task"] for e in g["excluded"]] == ["planted_hi"] and "24 screen items" in g["excluded"][0]["reason"]
