"""The run directory: the contract between stages (docs/design.md). Paths, atomic JSON writes, the manifest.

Every stage reads what earlier stages wrote here and writes its own files here, atomically (temp file,
then rename), so an interrupted stage never leaves a half-written result that a later stage would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from forgetcheck.errors import BadInput


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
    """Hex sha256 of a file's bytes, read in chunks (model weights, data files, the bigbench sdist)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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


def read_json(path: Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInput(f"{path} not found: run the stage that writes it first (see `forgetcheck --help`)") from None
    except json.JSONDecodeError as e:
        raise BadInput(f"{path}:{e.lineno}: not valid JSON ({e.msg}); re-run the stage that writes it") from None


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


class RunDir:
    """`runs/<run_id>/` and the names of everything in it."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    @classmethod
    def new(cls, out_dir: Path | str, base: str, data: str, run_id: str | None = None) -> RunDir:
        if run_id is None:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            run_id = f"{stamp}-{slug(Path(base).name)}-{slug(Path(data).name)}"
        return cls(Path(out_dir) / run_id)

    @classmethod
    def existing(cls, root: RunDir | Path | str) -> RunDir:
        """The run folder at `root`, which must exist (the one home of "run folder not found")."""
        run = root if isinstance(root, RunDir) else cls(root)
        if not run.root.is_dir():
            raise BadInput(f"run directory {run.root} not found: give a folder under runs/ written by "
                           f"`forgetcheck run`")
        return run

    @property
    def run_id(self) -> str:
        return self.root.name

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    def eval_json(self, model_label: str) -> Path:
        return self.root / "eval" / f"{model_label}.json"

    def samples_dir(self, model_label: str) -> Path:
        return self.root / "eval" / "samples" / model_label

    def train_json(self, arm: str) -> Path:
        return self.root / "train" / f"{arm}.json"

    def ckpt(self, arm: str) -> Path:
        return self.root / "ckpt" / arm

    @property
    def compare(self) -> Path:
        return self.root / "compare.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def gate(self) -> Path:
        return self.root / "gate.json"

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
