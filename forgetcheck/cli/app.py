"""The command line: builds the typer app from the commands (each command, signature and body, lives in its own
cli module) and runs it (`main`: error handling and exit codes). The command modules import their stages lazily,
so `forgetcheck --help`, `compare`, `report` and `gate` never import torch.

Exit codes (docs/design.md): 0 success / gate PASS; 1 gate FAIL; 2 bad input (one line, no traceback);
3 runtime failure; 4 gate INCONCLUSIVE (`gate --on-inconclusive fail|pass` maps it). `run` exits 0 once every
stage ran: its verdict is printed and in gate.json.
"""

from __future__ import annotations

import errno
import signal
import sys
import traceback
from pathlib import Path

import typer

from forgetcheck.cli.check import check
from forgetcheck.cli.data import data_list, data_prepare, data_sources
from forgetcheck.cli.eval import eval_cmd
from forgetcheck.cli.models import models
from forgetcheck.cli.plan import plan
from forgetcheck.cli.run import run
from forgetcheck.cli.train import train
from forgetcheck.cli.verdict import compare, gate, report
from forgetcheck.errors import ForgetcheckError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Measure what fine-tuning makes a model forget: benchmark a base model, fully fine-tune it (SFT) "
    "and continue pretraining it (CPT) on the same token budget, re-evaluate, diff, and gate the release.",
)
for name, command in (("models", models), ("eval", eval_cmd), ("train", train), ("plan", plan),
                      ("compare", compare), ("report", report), ("gate", gate), ("check", check), ("run", run)):
    app.command(name)(command)
data_app = typer.Typer(no_args_is_help=True, help="Domain datasets: list and prepare them.")
for name, command in (("list", data_list), ("prepare", data_prepare), ("sources", data_sources)):
    data_app.command(name)(command)
app.add_typer(data_app, name="data")


def _terminated(signum, frame) -> None:
    """SIGTERM unwinds like Ctrl-C, so atomic writes remove their temp files and finished stages are kept."""
    raise KeyboardInterrupt


# An OSError with one of these errnos while writing the user's output is the user's to fix (exit 2).
_USER_OS_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG)
# ... and one of these is the machine's: a runtime failure (exit 3), told in one line with what to do.
_FULL_ERRORS = {errno.ENOSPC: "free space there", errno.EDQUOT: "free space within your quota there"}
_INTERRUPTED = 130  # the shell's code for a process stopped by Ctrl-C (128 + SIGINT)


def _interrupted() -> None:
    print("forgetcheck: interrupted; finished stages are kept (resume a run with --resume runs/<id>)",
          file=sys.stderr)
    sys.exit(_INTERRUPTED)


def _user_os_error(e: OSError) -> None:
    where = e.filename if e.filename is not None else "a path"
    print(f"forgetcheck: error: cannot use {where}: {e.strerror}: {_fix_for(where)}", file=sys.stderr)
    sys.exit(2)


def _fix_for(path) -> str:
    """What to change for a path that cannot be used: the flag that chose it, or $FORGETCHECK_HOME for the
    cache (models, data, evaluations) that lives under it."""
    from forgetcheck.config import forgetcheck_home

    try:
        home = forgetcheck_home().resolve()
        under_home = Path(path).resolve().is_relative_to(home)
    except (OSError, ValueError, TypeError):
        under_home = False
    if under_home:
        return f"make $FORGETCHECK_HOME ({home}) readable and writable, or point $FORGETCHECK_HOME elsewhere"
    return "give a path you can read and write (--out, --run, --resume)"


def _runtime_os_error(e: OSError) -> None:
    """One line (the traceback only with --verbose): a full disk or a failing device is not a bug to debug."""
    if "--verbose" in sys.argv[1:]:
        traceback.print_exc()
    where = f" ({e.filename})" if e.filename is not None else ""
    fix = _FULL_ERRORS.get(e.errno)
    then = f": {fix}, then run again (a run continues with --resume runs/<id>)" if fix else ""
    print(f"forgetcheck: runtime failure: {e.strerror or type(e).__name__}{where}{then}", file=sys.stderr)
    sys.exit(3)


def main() -> None:
    signal.signal(signal.SIGTERM, _terminated)
    try:
        rc = app(standalone_mode=False)  # standalone_mode=False returns typer.Exit's code instead of exiting
        if rc == _INTERRUPTED:  # typer turns KeyboardInterrupt into Exit(130) before it reaches us
            _interrupted()
        if isinstance(rc, int) and rc != 0:
            sys.exit(rc)
    except ForgetcheckError as e:
        msg = " ".join(str(e).split())  # one line
        print(f"forgetcheck: error: {msg}", file=sys.stderr)
        sys.exit(e.exit_code)
    except OSError as e:
        if e.errno in _USER_OS_ERRORS:
            _user_os_error(e)
        _runtime_os_error(e)
    except KeyboardInterrupt:
        _interrupted()
    except SystemExit:
        raise
    except Exception as e:  # typer's (vendored click) usage errors, Exit and Abort arrive here
        name = type(e).__name__
        if name == "Exit":
            if getattr(e, "exit_code", 0) == _INTERRUPTED:
                _interrupted()
            sys.exit(getattr(e, "exit_code", 0))
        if name == "Abort":
            print("forgetcheck: aborted", file=sys.stderr)
            sys.exit(_INTERRUPTED)
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):
            print(f"forgetcheck: error: {' '.join(e.format_message().split())} (see --help)", file=sys.stderr)
            sys.exit(2)
        traceback.print_exc()
        print(f"forgetcheck: runtime failure: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(3)
