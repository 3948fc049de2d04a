"""Shared fixtures and helpers. Every test runs with FORGETCHECK_HOME in a per-session temp folder, so tests never
touch the user's cache; the real SmolLM2 folder (slow tests) is linked in from the user's cache when present.

Helpers shared by several test folders live here once: `forgetcheck_cli` (the real command line in a fresh
interpreter) and `FIXTURE_TASKS` (the fixture lm-eval tasks); planted.py plants models and tasks, runfixture.py
plants run folders."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

_USER_HOME = None

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
FIXTURE_TASKS = FIXTURES / "tasks"


def copy_fixture_tasks(out: Path) -> Path:
    """The fixture task YAMLs copied into `out` with ${FIXTURES} replaced by `out` (as data/benchmarks.py renders
    ${FORGETCHECK_HOME} into tasks/), ready for `--tasks-dir`."""
    out.mkdir(parents=True, exist_ok=True)
    for f in FIXTURE_TASKS.iterdir():
        (out / f.name).write_text(f.read_text().replace("${FIXTURES}", str(out)))
    return out


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    """The fixture tasks (fc_fixture_mc, fc_fixture_ppl, ...) as a `--tasks-dir` folder of each test module's own
    (a folder of its own, so datasets' cache of another module's copy never hides this one's first load)."""
    return copy_fixture_tasks(tmp_path_factory.mktemp("fixture_tasks"))


def _no_dac() -> list[str]:
    """Prefix that runs the CLI without root's permission override, so a read-only folder is read-only."""
    if os.geteuid() == 0 and shutil.which("setpriv"):
        return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    return []


def forgetcheck_cli(*args, cwd: Path | None = None, env: dict | None = None, timeout: float = 300,
                    hide: tuple[str, ...] = (), no_dac: bool = False) -> subprocess.CompletedProcess:
    """`python -m forgetcheck ARGS` as a user runs it: a fresh interpreter running this checkout's code, this
    session's FORGETCHECK_HOME, offline (no test waits on the network; the hub's absence is itself a case), `env`
    added; output captured as text. `hide`: modules made unimportable first (as if not installed); `no_dac`: run
    without root's permission override, so a read-only folder is read-only."""
    argv = [sys.executable, "-m", "forgetcheck", *map(str, args)]
    if hide:
        code = (f"import sys, runpy; sys.modules.update(dict.fromkeys({list(hide)!r})); "
                "sys.argv = ['forgetcheck'] + sys.argv[1:]; runpy.run_module('forgetcheck', run_name='__main__')")
        argv = [sys.executable, "-c", code, *map(str, args)]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [full_env.get("PYTHONPATH")])])
    full_env.update(env or {})
    return subprocess.run((_no_dac() if no_dac else []) + argv, capture_output=True, text=True, cwd=cwd,
                          env=full_env, timeout=timeout)


def pytest_configure(config):
    global _USER_HOME
    from forgetcheck.config import forgetcheck_home

    _USER_HOME = forgetcheck_home()


@pytest.fixture(scope="session", autouse=True)
def fc_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("fchome")
    os.environ["FORGETCHECK_HOME"] = str(home)
    # Reuse what `make install` already built in the user's cache (read-only use): the converted SmolLM2
    # folder, the prepared data and downloads. Symlinks, so nothing of the user's is written.
    for sub in ("models/smollm2-135m", "downloads"):
        src = _USER_HOME / sub
        if src.exists():
            dst = home / sub
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src, target_is_directory=True)
    try:
        import torch

        torch.set_num_threads(min(2, os.cpu_count() or 1))
    except ImportError:
        pass
    return home


@pytest.fixture(scope="session")
def tiny_ref(fc_home):
    """The random-init tiny GPT-2 (real GPT-2 tokenizer), built once per session."""
    from forgetcheck.models import registry

    return registry.resolve("tiny-gpt2")


@pytest.fixture(scope="session")
def smollm2_ref(fc_home):
    from forgetcheck.models import registry

    return registry.resolve("smollm2-135m")


WORDS = ("fever cough anemia insulin biopsy cardiac renal hepatic tumor lesion dose therapy chronic acute "
         "symptom syndrome patient clinical nerve muscle").split()


def _text(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(n))


@pytest.fixture(scope="module")
def domain(tmp_path_factory):
    """A small domain folder (24 SFT pairs, 24 CPT texts of medical words) for training tests."""
    import json

    from forgetcheck.data.domain import DomainData

    root = tmp_path_factory.mktemp("domain")
    with open(root / "sft.jsonl", "w") as f:
        for i in range(24):
            f.write(json.dumps({"prompt": f"What is {_text(i, 3)}?", "response": _text(i + 1, 4 + i % 9),
                                "id": i}) + "\n")
    with open(root / "cpt.jsonl", "w") as f:
        for i in range(24):
            f.write(json.dumps({"text": _text(i, 10 + i % 17)}) + "\n")
    return DomainData(name="fixture", root=root, sft=root / "sft.jsonl", cpt=root / "cpt.jsonl", heldout=None,
                      packaged=False)


def one_line_exit_2(r: subprocess.CompletedProcess) -> str:
    """The bad-input contract of a finished CLI call: exit 2, one stderr line `forgetcheck: error: ...`, no
    traceback anywhere. Returns that line."""
    lines = r.stderr.strip().splitlines()
    detail = f"rc={r.returncode}\nstderr:\n{r.stderr[-3000:]}\nstdout:\n{r.stdout[-1500:]}"
    assert "Traceback" not in r.stderr + r.stdout, detail
    assert r.returncode == 2, detail
    assert len(lines) == 1 and lines[0].startswith("forgetcheck: error: "), detail
    return lines[0]


def load_file_module(name: str, path: Path):
    """A module loaded from a file outside the package (a bench script, lm-eval's task utils), registered in
    sys.modules under `name` (dataclasses and pickling look their module up there)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def bench_module(script: str, name: str | None = None):
    """bench/<script>.py as a module."""
    return load_file_module(name or script, Path(__file__).resolve().parents[1] / "bench" / f"{script}.py")
