"""One exception type for mistakes a user can fix.

The CLI prints a UsageError as a single line (``agd: error: ...``) and exits 2;
anything else is a bug and keeps its traceback.
"""


class UsageError(ValueError):
    """Bad input from the user: the message says what to do instead."""
