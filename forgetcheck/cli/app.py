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


def main() -> None:
    signal.signal(signal.SIGTERM, _terminated)
    try:
        rc = app(standalone_mode=False)  # standalone_mode=False returns typer.Exit's code instead of exiting
        if isinstance(rc, int) and rc != 0:
            sys.exit(rc)
    except ForgetcheckError as e:
        msg = " ".join(str(e).split())  # one line
        print(f"forgetcheck: error: {msg}", file=sys.stderr)
        sys.exit(e.exit_code)
    except OSError as e:
        if e.errno not in _USER_OS_ERRORS:
            traceback.print_exc()
            print(f"forgetcheck: runtime failure: {type(e).__name__}: {e}", file=sys.stderr)
            sys.exit(3)
        where = e.filename if e.filename is not None else "a path"
        print(f"forgetcheck: error: cannot use {where}: {e.strerror}: give a path you can read and write "
              f"(--out, --run, --resume)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("forgetcheck: interrupted; finished stages are kept (resume a run with --resume runs/<id>)",
              file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # typer's (vendored click) usage errors, Exit and Abort arrive here
        name = type(e).__name__
        if name == "Exit":
            sys.exit(getattr(e, "exit_code", 0))
        if name == "Abort":
            print("forgetcheck: aborted", file=sys.stderr)
            sys.exit(130)
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):
            print(f"forgetcheck: error: {' '.join(e.format_message().split())} (see --help)", file=sys.stderr)
            sys.exit(2)
        traceback.print_exc()
        print(f"forgetcheck: runtime failure: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(3)
