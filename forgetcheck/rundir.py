"""The run directory: the contract between stages (docs/design.md). Paths, atomic JSON writes, the manifest.

Every stage reads what earlier stages wrote here and writes its own files here, atomically (temp file,
then rename), so an interrupted stage never leaves a half-written result that a later stage would trust.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from forgetcheck.errors import BadInput

TMP_SUFFIX = ".tmp"


def _tmp_name(path: Path) -> Path:
    """A temp name beside `path`, unique per process and call: `.<name>.<pid>.<random>.tmp`."""
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}"


def pid_alive(pid: int) -> bool:
    """Is process `pid` running (anyone's)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_stale_temps(folder: Path, name: str | None = None) -> int:
    """Remove temp files (`.<name>.<pid>.<random>.tmp`) that a killed writer left in `folder`: those whose
    process is gone. `name`: only the temps of that file. Returns how many were removed."""
    removed = 0
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return 0
    prefix = f".{name}." if name else "."
    for f in entries:
        n = f.name
        if not (n.startswith(prefix) and n.endswith(TMP_SUFFIX)):
            continue
        parts = n[: -len(TMP_SUFFIX)].rsplit(".", 2)
        if len(parts) != 3 or not parts[1].isdigit() or len(parts[2]) != 8:
            continue
        pid = int(parts[1])
        if pid != os.getpid() and not pid_alive(pid):
            try:
                f.unlink()
                removed += 1
            except OSError:
                pass
    return removed


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so readers see the old file or the new one, never half of one: a temp file
    beside it, fsync, rename. The temp file is removed when the write fails or is interrupted (a temp left by
    a killed process is removed by the next write of the same file), and the file gets the usual mode
    (0666 less the umask), like any file the user creates."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(path.parent, path.name)
    tmp = _tmp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, unlike mkstemp's 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_write_jsonl(path: Path, rows) -> None:
    atomic_write_text(path, "".join(json.dumps(r, default=_json_default) + "\n" for r in rows))


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (model weights, data files, source wheels)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def file_lock(path: Path):
    """Hold an exclusive lock on `path` (created when missing; never removed) for the duration: processes that
    build the same cached folder take turns, and the second finds it built."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def replace_dir(built: Path, final: Path) -> None:
    """Move a fully built folder into place, replacing any older one, so readers never see a half-built one."""
    built, final = Path(built), Path(final)
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(built, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def read_text(path: Path, *, where: str, kind: str, missing_fix: str, fix: str) -> str:
    """The UTF-8 text of a file the user named, or one BadInput line: `where` names it (a path or a flag and
    path), `kind` is what it should be ("JSON file"), `missing_fix` says what writes it, `fix` what to give."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput(f"{where} not found: {missing_fix}") from None
    except IsADirectoryError:
        raise BadInput(f"{where} is a folder, not a {kind}: {fix}") from None
    except UnicodeDecodeError:
        raise BadInput(f"{where}: not UTF-8 text, so not a {kind}; {fix}") from None
    except OSError as e:
        raise BadInput(f"{where}: cannot read it ({e.strerror}); check its permissions") from None


def read_json(path: Path, fix: str | None = None) -> Any:
    """The JSON of a file forgetcheck wrote (every run file is read here), or one BadInput line: missing, a
    folder, not UTF-8, not JSON, nested too deep. `fix`: what to do (default: re-run the stage that writes it)."""
    path = Path(path)
    rerun = fix or "re-run the stage that writes it"
    text = read_text(path, where=str(path), kind="forgetcheck JSON file",
                     missing_fix=fix or "run the stage that writes it first (see `forgetcheck --help`)",
                     fix=fix or "give the file written by forgetcheck, or re-run the stage that writes it")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInput(f"{path}:{e.lineno}: not valid JSON ({e.msg}); {rerun}") from None
    except RecursionError:
        raise BadInput(f"{path}: JSON nested too deep to be a forgetcheck file; {rerun}") from None


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise BadInput(f"{path}:{lineno}: not valid JSON ({e.msg}); re-run the stage that "
                                       f"writes it") from None
                    except RecursionError:
                        raise BadInput(f"{path}:{lineno}: JSON nested too deep; re-run the stage that writes "
                                       f"it") from None
    except FileNotFoundError:
        raise BadInput(f"{path} not found: re-run the stage that writes it") from None
    except (UnicodeDecodeError, IsADirectoryError):
        raise BadInput(f"{path}: not a JSON-lines text file; re-run the stage that writes it") from None
    return rows


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_run_id(run_id: str) -> str:
    """A run id is one safe folder name (letters, digits, '.', '_', '-'; starts with a letter or digit; at
    most 128 characters), so the run folder is always `<--out>/<run id>`, never outside --out, nested or
    --out itself."""
    if not isinstance(run_id, str) or not RUN_ID_RE.fullmatch(run_id):
        raise BadInput(f"--run-id {run_id!r} is not one folder name: use letters, digits, '.', '_' and '-' "
                       f"(starting with a letter or digit, at most 128 characters, no '/' or '..'), "
                       f"e.g. --run-id {slug(str(run_id))[:40].strip('.-_') or 'my-run'}")
    return run_id


RERUN_FIX = "the file was edited or is not forgetcheck's: re-run the stage that writes it"
"""What to do about a path read from a run's JSON that leads out of its folder."""


def safe_name(name: Any, what: str, fix: str) -> str:
    """`name` when it is one file or folder name (not empty, not '.' or '..', no '/', '\\' or NUL), so that
    `folder / name` is always a child of `folder`; one BadInput line otherwise. `what` names the input that gave
    it (a flag and the task, arm or label), `fix` says what to give instead. Every write whose path takes a name
    from the input (task names, arm and candidate names, model labels, run ids) goes through this or `confined`."""
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\x00"):
        raise BadInput(f"{what}: {name!r} is not one file name (no '/', '\\', '..', empty or NUL), so it cannot "
                       f"name a file inside the run folder: {fix}")
    return name


def confined(root: Path, rel: Any, what: str, *, fix: str = RERUN_FIX) -> Path:
    """`root / rel` for a relative path taken from input (a run's JSON, or names joined into a path to write),
    refused (BadInput) when it is absolute or leads outside `root` by '..' or through a symlink (one already on
    disk, anywhere along the path): a run folder may only point inside itself, and nothing is written through
    a link that leaves it. `fix` says what to do."""
    root = Path(root)
    if not isinstance(rel, str) or not rel or "\x00" in rel or Path(rel).is_absolute():
        raise BadInput(f"{what}: {rel!r} is not a relative path inside {root}; {fix}")
    target = root / rel
    try:
        inside = target.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):
        inside = False
    if not inside:
        raise BadInput(f"{what}: {rel!r} points outside {root} ('..' or a symlink); a run folder may only refer "
                       f"to its own files: {fix}")
    return target


def confined_file(root: Path, folders: tuple[str, ...], name: Any, suffix: str, what: str, fix: str) -> Path:
    """`root/<folders...>/<name><suffix>` for a name taken from input (a task or arm name): `name` one file name
    (`safe_name`) and the whole path inside `root`, never through a symlink that leaves it (`confined`)."""
    name = safe_name(name, what, fix)
    return confined(root, "/".join((*folders, f"{name}{suffix}")), what, fix=fix)


def _nearest_existing(path: Path) -> Path:
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_dir(path: Path, flag: str) -> None:
    """Refuse (BadInput) an output folder that is a file, lies under a file, or cannot be written: checked
    before any work, creating nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BadInput(f"{flag} {path} is a file, not a folder: give a folder (it is created when missing)")
    anchor = _nearest_existing(path)
    if not anchor.is_dir():
        raise BadInput(f"{flag} {path}: {anchor} is a file, so the folder cannot be created: give another {flag}")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise BadInput(f"{flag} {path}: {anchor} is not writable: give a writable {flag}")


def check_output_file(path: Path, flag: str) -> None:
    """Refuse (BadInput) an output file path that is a folder or whose folder cannot be created or written."""
    path = Path(path)
    if path.is_dir():
        raise BadInput(f"{flag} {path} is a folder: give a file path (e.g. {path / 'out.json'})")
    if path.exists() and not os.access(path, os.W_OK):
        raise BadInput(f"{flag} {path} is not writable: give a writable {flag}")
    check_output_dir(path.parent, flag)


def _file(name: str) -> property:
    """A run folder's file of that name."""
    return property(lambda self: self.root / name, doc=f"runs/<id>/{name}")


def _per(folder: str, suffix: str):
    """The path of one model's or arm's file (or folder) under `folder`: the label one file name and the path
    inside the run folder (a symlink there that leads outside is refused, not followed)."""
    def path(self, label: str) -> Path:
        return confined_file(self.root, (folder,), label, suffix, f"run folder {self.root}, {folder}/",
                             "use a plain name, and remove any symlink in the run folder that leads outside it")

    path.__doc__ = f"runs/<id>/{folder}/<label>{suffix}"
    return path


class RunDir:
    """`runs/<run_id>/` and the names of everything in it."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    @classmethod
    def new(cls, out_dir: Path | str, base: str, data: str, run_id: str | None = None) -> RunDir:
        if run_id is None:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            run_id = f"{stamp}-{slug(Path(base).name)}-{slug(Path(data).name)}"[:128]
        return cls(Path(out_dir) / check_run_id(run_id))

    @classmethod
    def existing(cls, root: RunDir | Path | str, flag: str | None = None, what: str = "") -> RunDir:
        """The run folder at `root`, which must exist (the one home of "run folder not found"); `flag` names the
        option that gave it and `what` the run it should be, in the message."""
        run = root if isinstance(root, RunDir) else cls(root)
        if not run.root.is_dir():
            where = f"{flag} {root}" if flag else f"run directory {run.root}"
            raise BadInput(f"{where}: run folder not found; give {what or 'a folder under runs/'} written by "
                           f"`forgetcheck run`")
        return run

    @property
    def run_id(self) -> str:
        return self.root.name

    # The run folder's files (docs/design.md, "The run folder"): one file per run, one per model or arm.
    config = _file("config.json")
    manifest = _file("manifest.json")
    compare = _file("compare.json")
    report = _file("report.html")
    gate = _file("gate.json")
    eval_json = _per("eval", ".json")
    samples_dir = _per("eval/samples", "")
    train_json = _per("train", ".json")
    curve_json = _per("curves", ".json")  # the forgetting curve of a trained arm (train/signals.py's schema)
    ckpt = _per("ckpt", "")

    def exists(self) -> bool:
        return self.config.exists()


# ---- manifest ------------------------------------------------------------------------------------------

TRACKED_PACKAGES = ("forgetcheck", "torch", "transformers", "lm_eval", "accelerate", "datasets", "scipy")


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            try:
                out[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                out[name] = None
    return out


def git_hash(cwd: Path | None = None) -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).parent,
                           capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None
