"""The console of a command: one line per stage (a progress bar with ETA while it runs), everything else in the
log file (docs/design.md, "Console and log").

Inside `session()` (what a command opens first), file descriptors 1 and 2 point at a holding file, and once
the inputs are valid and the run folder exists, at its log (`log_to`), so the output of lm-eval, datasets,
transformers, torchrun and their warnings lands there; forgetcheck's own lines go to the terminal through a
duplicate of the original stdout. `--verbose` leaves the descriptors alone (and so does every command without a
log file: models, plan, data, compare, report, gate). Outside a session (library use,
tests) every line is simply printed.

  * `say(msg)`: a line for the person at the terminal (and the log);
  * `detail(msg)`: a line for the log (and the terminal with --verbose or outside a session);
  * `stage(title)`: a context: a live bar while the stage runs (`set_total`, `advance`, `note`), replaced by one
    line `title: note (seconds)` when it ends.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import TextIO

_session: dict = {}  # console (rich), log (text file), verbose, progress (rich Progress), task, note, t0


def _log(msg: str) -> None:
    log: TextIO | None = _session.get("log")
    if log is not None:
        log.write(msg + "\n")
        log.flush()


def say(msg: str = "") -> None:
    """A line for the terminal (and the log)."""
    con = _session.get("console")
    if con is None:
        print(msg, flush=True)
        return
    _log(msg)
    con.print(msg, markup=False, highlight=False, emoji=False, soft_wrap=True)


def detail(msg: str) -> None:
    """A line for the log; on the terminal too with --verbose, or outside a session."""
    con = _session.get("console")
    if con is None:
        print(msg, flush=True)
        return
    _log(msg)
    if _session.get("verbose"):
        con.print(msg, markup=False, highlight=False, emoji=False, soft_wrap=True)


@contextlib.contextmanager
def session(*, verbose: bool = False):
    """Route the process's output for one command: forgetcheck's lines to the terminal, everything else to a
    holding file until `log_to` names the log (what came before is copied there). A command that fails on bad
    input leaves no log; a runtime failure shows the tail of what was held."""
    from rich.console import Console

    if _session:  # nested (a command calling another): the outer session already routes everything
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    # --verbose (or a command without a log) leaves the descriptors alone, so its lines go where sys.stdout goes
    # (also a test runner's capture); otherwise to a duplicate of the original stdout
    own_term = not verbose
    term = sys.stdout if not own_term else os.fdopen(os.dup(saved[0]), "w", buffering=1, encoding="utf-8",
                                                errors="replace")
    held = tempfile.TemporaryFile("w+", encoding="utf-8")
    _session.update(console=Console(file=term, highlight=False), log=held, verbose=verbose, saved=saved)
    if not verbose:
        os.dup2(held.fileno(), 1)
        os.dup2(held.fileno(), 2)
    try:
        yield
    except BaseException as e:
        log = _session.get("log")
        failed = type(e).__name__ not in ("BadInput", "Exit", "KeyboardInterrupt")
        if failed and log is not held:  # the terminal gets one line (cli/app.py); the run's log the traceback
            _log("".join(traceback.format_exception(e)).rstrip())
        if not verbose and log is held and failed:
            held.flush()
            held.seek(0)
            tail = held.read()[-4000:]
            if tail.strip():
                os.write(saved[1], ("(output before the failure)\n" + tail + "\n").encode("utf-8", "replace"))
        raise
    finally:
        if _session.get("progress") is not None:
            _session["progress"].stop()
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        log = _session.get("log")
        _session.clear()
        if own_term:
            term.close()
        held.close()
        if log is not held:
            log.close()


def log_to(path: Path) -> None:
    """The command's log file is now known (its run folder exists): move what was held there, keep writing."""
    held = _session.get("log")
    if held is None or getattr(held, "name", None) == str(path):
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    held.flush()
    held.seek(0)
    log = open(path, "a", encoding="utf-8", buffering=1)
    log.write(held.read())
    log.flush()
    _session["log"] = log
    if not _session.get("verbose"):
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)


@contextlib.contextmanager
def stage(title: str):
    """One stage: a live bar (when a session's terminal is a tty), then one line `title: note (N s)`."""
    con = _session.get("console")
    t0 = time.perf_counter()
    if con is None:
        say(title)
        yield
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("eta"), TimeRemainingColumn(), console=con, transient=True,
                        disable=not con.is_terminal)  # a pipe or file gets the closing line only
    _session.update(progress=progress, task=progress.add_task(title, total=None), note="")
    _log(f"== {title}")
    progress.start()
    try:
        yield
    finally:
        progress.stop()
        note = _session.pop("note", "")
        _session.pop("progress", None)
        _session.pop("task", None)
    say(f"{title}: {note + ' ' if note else ''}({time.perf_counter() - t0:.0f} s)")


def set_total(total: int) -> None:
    """The number of units (tasks, optimizer steps) of the current stage."""
    if _session.get("progress") is not None:
        _session["progress"].update(_session["task"], total=total)


def advance(n: int = 1) -> None:
    if _session.get("progress") is not None:
        _session["progress"].advance(_session["task"], n)


def note(text: str) -> None:
    """What the current stage's closing line says (its result), e.g. "13 tasks, 1,022 items"."""
    if _session.get("progress") is not None:
        _session["note"] = text
