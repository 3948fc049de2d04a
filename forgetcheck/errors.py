"""The two failures a user can meet, and their exit codes (docs/design.md, "Commands and exit codes").

`BadInput` is the user's to fix: the CLI prints its message as one line and exits 2, with no traceback.
Its message names the problem *and* the fix (the flag, the alternative). `RuntimeFailure` is ours or the
machine's: exit 3.
"""


class ForgetcheckError(Exception):
    exit_code = 3


class BadInput(ForgetcheckError):
    """Bad flag, unknown model/data/task, malformed data file: exit 2, one line."""

    exit_code = 2


class RuntimeFailure(ForgetcheckError):
    """Something failed while running (out of memory, a crashed worker): exit 3."""

    exit_code = 3
