"""The one exception type that reaches the person running the package.

Anything raised as ``UserError`` is a problem with the input or the environment (a missing folder, a bad
flag value, no internet), not a bug. ``main.py`` prints its message as a single line on stderr and exits
with ``exit_code``; every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message says what is wrong and how to fix it, in one line."""

    exit_code = 2

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
