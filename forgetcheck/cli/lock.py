"""One process per run folder: `run`, `train` and `check` hold `runs/<id>/.lock` from their first write into the
folder to their end, so two processes never do the same stages into one folder (docs/design.md, "The run
folder").

The lock is the kernel's (`fcntl.flock` on the open file), so it dies with its process: a killed holder never
leaves the folder stuck, and the file left behind means nothing by itself. The holder writes its pid into the
file, so that the process refused can say who holds the folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from forgetcheck.errors import BadInput
from forgetcheck.rundir import pid_alive

LOCK_NAME = ".lock"


def _holder_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _in_use(root: Path, pid: int | None) -> BadInput:
    who = f"forgetcheck process {pid}" if pid else "another forgetcheck process"
    return BadInput(f"{root} is in use by {who} (it holds {root / LOCK_NAME}): one process works in a run folder "
                    f"at a time; wait for it to finish (or stop it), then --resume {root}")


def check_free(root: Path) -> None:
    """Refuse (BadInput naming the holder's pid) a run folder another live process holds; creates nothing.
    The early word only: `RunLock` is what decides."""
    path = Path(root) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file: no process ever held this folder
        return
    try:
        pid = _holder_pid(fd)
        # only a live recorded holder is asked about, so that this probe never stands in a taker's way
        if pid is None or pid == os.getpid() or not pid_alive(pid):
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(Path(root), pid) from None
    finally:
        os.close(fd)


class RunLock:
    """This process's exclusive hold on the run folder `root` (created when missing), until `release()`, the end
    of a `with` block, or the process's end; BadInput naming the holder when another process holds it."""

    def __init__(self, root: Path):
        self._fd: int | None = None
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)  # not inherited by child processes
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder_pid(fd)
            os.close(fd)
            raise _in_use(self.root, pid) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # a finished holder's pid is no longer news
            os.close(fd)  # closing releases the lock

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()
