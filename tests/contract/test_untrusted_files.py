"""Files forgetcheck wrote earlier and reads back are untrusted: a multi-process resume state (a distributed
checkpoint whose non-tensor items torch would unpickle with weights_only=False), an eval-cache entry, a drift
cache entry, a reference top-k file and a built benchmark file. A planted payload never runs (the test first
shows that the old way of loading runs it); a damaged cache entry is rebuilt with one console note, never
trusted and never a traceback; a damaged file that cannot be rebuilt is refused with one line (exit 2)."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import forgetcheck_cli, one_line_exit_2
from test_bad_input import _Evil, run_config, snapshot, user_data

from forgetcheck.errors import BadInput
from forgetcheck.train import checkpoint

# ---- a distributed checkpoint with a planted payload -------------------------------------------------------

def _model_and_optimizer():
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return model, opt, sched


def _save_dcp_state(rdir: Path, world: int = 2) -> None:
    """A resume state as `save_resume` leaves it under FSDP2 (dcp/ folder, one rank file per rank, meta.json),
    written by one process."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, opt, sched = _model_and_optimizer()
    msd, osd = get_state_dict(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: DCP says it runs in one process
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(rdir / "dcp"))
    for rank in range(world):
        torch.save({"rng": checkpoint._rng_state(), "scheduler": sched.state_dict(), "scaler": None,
                    "state": {"step": 1}}, rdir / f"rank{rank}.pt")


PLANTED_ITEM = "optimizer.param_groups.0.lr"


def _plant_dcp_payload(dcp_dir: Path, marker: Path) -> None:
    """The issue's payload: a torch.save of an object whose unpickling runs `touch marker`, in a shard file of
    its own, with `.metadata`'s learning-rate entry pointed at it (the edited `.metadata` itself names only
    allow-listed classes, so the metadata check alone passes it)."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    shard = dcp_dir / "__1_0.distcp"
    torch.save(_Evil(str(marker)), shard)
    meta = pickle.loads((dcp_dir / ".metadata").read_bytes())
    index = next(i for i in meta.storage_data if i.fqn == PLANTED_ITEM)
    meta.storage_data[index] = _StorageInfo(relative_path=shard.name, offset=0, length=shard.stat().st_size)
    (dcp_dir / ".metadata").write_bytes(pickle.dumps(meta))


def _dcp_payload_is_live(dcp_dir: Path, marker: Path) -> None:
    """The control: DCP's own loading (DefaultLoadPlanner) of the planted folder runs the payload."""
    code = ("import warnings; warnings.simplefilter('ignore')\n"
            "import torch, torch.distributed.checkpoint as dcp\n"
            "from torch.distributed.checkpoint.state_dict import get_state_dict\n"
            "model = torch.nn.Linear(3, 2)\n"
            "opt = torch.optim.AdamW(model.parameters(), lr=1e-3)\n"
            "model(torch.randn(4, 3)).sum().backward(); opt.step()\n"
            "msd, osd = get_state_dict(model, opt)\n"
            f"dcp.load({{'model': msd, 'optimizer': osd}}, checkpoint_id={str(dcp_dir)!r})\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=dcp_dir.parent)
    assert marker.exists(), f"the planted payload is not live, so the test would prove nothing\n{r.stderr[-2000:]}"
    marker.unlink()


@pytest.fixture()
def planted_dcp(tmp_path):
    rdir = tmp_path / "sft.resume"
    rdir.mkdir()
    _save_dcp_state(rdir)
    marker = tmp_path / "PWNED"
    _plant_dcp_payload(rdir / "dcp", marker)
    _dcp_payload_is_live(rdir / "dcp", marker)
    return rdir, marker


def test_a_clean_distributed_checkpoint_passes_the_check_and_loads(tmp_path):
    import torch

    rdir = tmp_path / "sft.resume"
    rdir.mkdir()
    _save_dcp_state(rdir)
    (rdir / "meta.json").write_text(json.dumps({"step": 1, "config": {}, "world": 2}))
    checkpoint.check_resume_state(rdir)
    saved, saved_opt, _ = _model_and_optimizer()
    torch.manual_seed(1)
    model, opt, sched = torch.nn.Linear(3, 2), None, None
    opt = torch.optim.AdamW(model.parameters(), lr=5.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = checkpoint.load_resume(rdir, model, opt, sched, None, world=2, rank=0)
    assert state == {"step": 1}
    assert torch.equal(model.weight, saved.weight)
    assert opt.param_groups[0]["lr"] == saved_opt.param_groups[0]["lr"] == 1e-3
    assert opt.param_groups[0]["betas"] == saved_opt.param_groups[0]["betas"]


def test_planted_dcp_payload_is_refused_by_the_real_loading_and_never_runs(planted_dcp):
    rdir, marker = planted_dcp
    (rdir / "meta.json").write_text(json.dumps({"step": 1, "config": {}, "world": 2}))
    with pytest.raises(BadInput, match=rf"__1_0\.distcp.*refused.*{PLANTED_ITEM}"):
        checkpoint.check_resume_state(rdir)
    assert not marker.exists()
    model, opt, sched = _model_and_optimizer()
    with warnings.catch_warnings(), pytest.raises(BadInput, match="refused"):
        warnings.simplefilter("ignore")
        checkpoint.load_resume(rdir, model, opt, sched, None, world=2, rank=0)
    assert not marker.exists()
    # without the check first, dcp.load with forgetcheck's planner unpickles the item weights-only: refused too
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    with warnings.catch_warnings(), pytest.raises(BadInput, match="posix.system"):
        warnings.simplefilter("ignore")
        checkpoint._dcp_load({"model": msd, "optimizer": osd}, rdir, rdir / "dcp")
    assert not marker.exists()


@pytest.mark.parametrize("edit, why", [
    (lambda info: info.__class__(relative_path="../rank0.pt", offset=0, length=10, transform_descriptors=None),
     "outside"),
    (lambda info: info.__class__(relative_path=info.relative_path, offset=info.offset, length=10**9,
                                 transform_descriptors=None), "byte range"),
    (lambda info: info.__class__(relative_path=info.relative_path, offset=info.offset, length=info.length,
                                 transform_descriptors=["zstd"]), "transforms"),
])
def test_dcp_items_stored_outside_their_shard_or_transformed_are_refused(tmp_path, edit, why):
    rdir = tmp_path / "sft.resume"
    rdir.mkdir()
    _save_dcp_state(rdir)
    (rdir / "meta.json").write_text(json.dumps({"step": 1, "config": {}, "world": 2}))
    meta = pickle.loads((rdir / "dcp" / ".metadata").read_bytes())
    index = next(i for i in meta.storage_data if i.fqn == PLANTED_ITEM)
    meta.storage_data[index] = edit(meta.storage_data[index])
    (rdir / "dcp" / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(BadInput, match=why):
        checkpoint.check_resume_state(rdir)


def test_resume_with_a_planted_dcp_payload_is_refused_by_the_cli_and_never_runs(tmp_path, planted_dcp, fc_home):
    """`run --resume` of a two-process run whose sft resume state holds the payload: refused with one line
    before any stage (and before torchrun starts), the payload never runs, nothing of the user's changes."""
    from forgetcheck import config
    from forgetcheck.schema import SCHEMA_VERSION

    planted, marker = planted_dcp
    user_data(tmp_path / "data")
    run = tmp_path / "runs" / "r1"
    cfg = run_config(tmp_path)
    cfg["train"]["nproc"] = 2
    (run / "eval").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(cfg, indent=2))
    (run / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, "timings": {}}))
    (run / "eval" / "base.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, "kind": "eval",
                                                        "tasks": {}}))
    rdir = run / "ckpt" / "sft.resume"
    rdir.parent.mkdir(parents=True)
    planted.rename(rdir)
    train = config.TrainConfig(**cfg["train"])
    (rdir / "meta.json").write_text(json.dumps({"step": 1, "config": config.to_dict(train), "world": 2}))

    before = snapshot(tmp_path)
    r = forgetcheck_cli("run", "--resume", str(run), cwd=tmp_path)
    line = one_line_exit_2(r)
    assert not marker.exists(), "the planted payload ran on --resume"
    assert "__1_0.distcp" in line and "refused" in line and PLANTED_ITEM in line, line
    assert snapshot(tmp_path) == before


# ---- eval cache and drift cache entries ------------------------------------------------------------------

MC_TASK = "fc_fixture_mc"


@pytest.fixture(scope="module")
def eval_home(tmp_path_factory, tiny_ref, tasks_dir):
    """A FORGETCHECK_HOME of this module's own (its eval cache holds only what these tests put there, the tiny
    model linked in), and the first evaluation that fills its cache."""
    home = tmp_path_factory.mktemp("evalhome")
    (home / "models").mkdir()
    (home / "models" / Path(tiny_ref.path).name).symlink_to(tiny_ref.path, target_is_directory=True)
    work = tmp_path_factory.mktemp("evalwork")
    r = _eval(home, work, work / "first" / "base.json", tasks_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    return home, work


def _eval(home: Path, cwd: Path, out: Path, tasks_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    # --screen-items 0: one cache entry for the task (a base's screen items have an entry of their own)
    return forgetcheck_cli("eval", "--model", "tiny-gpt2", "--tasks-dir", tasks_dir, "--tasks", MC_TASK,
                           "--limit", "6", "--screen-items", "0", "--backend", "hf", "--device", "cpu", "--out", out,
                           *extra, cwd=cwd, env={"FORGETCHECK_HOME": str(home)})


def _entry(home: Path, name: str) -> Path:
    """The one cache entry of this module's home that holds `name` (result.json: a task, drift.json: drift)."""
    found = [d for d in (home / "eval_cache").iterdir() if (d / name).exists()]
    assert len(found) == 1, found
    return found[0]


def _lose_lines(f: Path) -> None:
    lines = f.read_text().splitlines(keepends=True)
    f.write_text("".join(lines[:-2]))


def _cut_mid_line(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 7])


CACHE_DAMAGE = {
    "result-truncated": ("result.json", _cut_mid_line),
    "result-a-list": ("result.json", lambda f: f.write_text("[1, 2, 3]\n")),
    "result-count-edited": ("result.json", lambda f: f.write_text(json.dumps({**json.loads(f.read_text()),
                                                                             "n": 99}))),
    "samples-lost-lines": ("samples.jsonl", _lose_lines),
    "samples-cut-mid-line": ("samples.jsonl", _cut_mid_line),
    "samples-not-records": ("samples.jsonl", lambda f: f.write_text("1\n2\n3\n4\n5\n6\n")),
    "drift-topk-truncated": ("topk.npz", _cut_mid_line),
    "drift-topk-garbage": ("topk.npz", lambda f: f.write_bytes(b"PK\x03\x04" + b"\x00" * 200)),
    "drift-json-a-list": ("drift.json", lambda f: f.write_text("[]\n")),
}


# One case per file kind in the fast suite; the other damages of the same file run with `make test-slow`.
FAST_DAMAGE = ("result-a-list", "samples-lost-lines", "drift-topk-garbage")


@pytest.mark.parametrize("case", [c if c in FAST_DAMAGE else pytest.param(c, marks=pytest.mark.slow)
                                  for c in sorted(CACHE_DAMAGE)])
def test_a_damaged_cache_entry_is_rebuilt_with_one_note(case, eval_home, tasks_dir, tmp_path):
    """The entry is checked against its own counts; when damaged it is scored again (one console note), the
    evaluation exits 0 with the numbers of the first one, and the entry is whole again."""
    home, work = eval_home
    name, damage = CACHE_DAMAGE[case]
    entry = _entry(home, "drift.json" if name in ("topk.npz", "drift.json") else "result.json")
    whole = {f.name: f.read_bytes() for f in entry.iterdir()}
    damage(entry / name)
    out = tmp_path / "again" / "base.json"
    r = _eval(home, tmp_path, out, tasks_dir)
    detail = f"rc={r.returncode}\nstderr:\n{r.stderr[-3000:]}\nstdout:\n{r.stdout[-1500:]}"
    assert r.returncode == 0 and "Traceback" not in r.stdout + r.stderr, detail
    notes = [ln for ln in r.stdout.splitlines() if ln.startswith("note:")]
    assert len(notes) == 1 and str(entry) in notes[0] and name in notes[0] and "damaged" in notes[0], detail
    first = json.loads((work / "first" / "base.json").read_text())
    again = json.loads(out.read_text())
    assert again["tasks"][MC_TASK]["metrics"] == first["tasks"][MC_TASK]["metrics"]
    n = first["tasks"][MC_TASK]["n"]
    assert again["tasks"][MC_TASK]["n"] == n
    assert len((out.parent / again["tasks"][MC_TASK]["samples"]).read_text().splitlines()) == n
    assert again["drift"]["perplexity"] == first["drift"]["perplexity"]
    assert (out.parent / again["drift"]["topk_file"]).read_bytes() == \
        (work / "first" / first["drift"]["topk_file"]).read_bytes()
    assert {f.name: f.read_bytes() for f in entry.iterdir()} == whole  # rebuilt whole, byte for byte


def test_a_drift_cache_hit_names_this_runs_own_reference(eval_home, tasks_dir, tmp_path):
    """Two run folders evaluate the same base and arm: the second's arm hits the drift cache filled by the
    first, and its `drift.kl.reference_file` names its own base's top-k file, not the first run's."""
    home, _ = eval_home
    for run in ("a", "b"):
        base = tmp_path / run / "eval" / "base.json"
        assert _eval(home, tmp_path, base, tasks_dir).returncode == 0
        r = _eval(home, tmp_path, tmp_path / run / "eval" / "arm.json", tasks_dir, "--reference", str(base))
        assert r.returncode == 0, r.stderr[-3000:]
        kl = json.loads((tmp_path / run / "eval" / "arm.json").read_text())["drift"]["kl"]
        assert kl["reference_file"] == str(tmp_path / run / "eval" / "base.topk.npz"), kl


def test_a_damaged_reference_topk_file_is_refused_with_one_line(eval_home, tasks_dir, tmp_path):
    home, work = eval_home
    base = tmp_path / "run" / "eval" / "base.json"
    shutil.copytree(work / "first", base.parent)
    npz = base.parent / "base.topk.npz"
    _cut_mid_line(npz)
    before = snapshot(tmp_path)
    r = _eval(home, tmp_path, tmp_path / "run" / "eval" / "arm.json", tasks_dir, "--reference", str(base))
    line = one_line_exit_2(r)
    assert str(npz) in line and "damaged" in line and "--reference" in line, line
    after = snapshot(tmp_path)
    assert after == before


# ---- built benchmark files ---------------------------------------------------------------------------------

def test_a_benchmark_file_cut_mid_line_is_found_and_rebuilt(tmp_path, fc_home):
    """A built benchmark file whose last line was cut mid-way (or that lost a line) is found on the next
    command that needs the data, named in one note, and built again byte for byte."""
    downloads = Path(fc_home) / "downloads"
    assert downloads.exists(), "the source wheels are not cached: `make install` fetches them"
    home = tmp_path / "home"
    home.mkdir()
    (home / "downloads").symlink_to(downloads.resolve(), target_is_directory=True)
    data = user_data(tmp_path / "data")
    env = {"FORGETCHECK_HOME": str(home)}
    r = forgetcheck_cli("data", "prepare", str(data), cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    bench = home / "bench"
    whole = {f.name: f.read_bytes() for f in bench.iterdir()}
    for name, damage in (("winogrande.jsonl", _cut_mid_line), ("arc_easy.jsonl", _lose_lines)):
        damage(bench / name)
        r = forgetcheck_cli("data", "prepare", str(data), cwd=tmp_path, env=env, timeout=600)
        detail = f"rc={r.returncode}\nstderr:\n{r.stderr[-3000:]}\nstdout:\n{r.stdout[-1500:]}"
        assert r.returncode == 0 and "Traceback" not in r.stdout + r.stderr, detail
        notes = [ln for ln in r.stdout.splitlines() if ln.startswith("note:")]
        assert len(notes) == 1 and str(bench / name) in notes[0] and "damaged" in notes[0], detail
        rebuilt = {f.name: f.read_bytes() for f in bench.iterdir()}
        assert {k: v for k, v in rebuilt.items() if k != "manifest.json"} == \
            {k: v for k, v in whole.items() if k != "manifest.json"}
