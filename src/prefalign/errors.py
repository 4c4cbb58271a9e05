"""User-facing errors.

A :class:`PrefalignError` is an error the *user* can cause and fix (bad path, bad config, unreadable
image, mismatched sizes, unknown method, NaN loss). The command line prints its message on one line,
without a traceback, and exits with status 2. Anything else is a bug and keeps its traceback.
"""


class PrefalignError(Exception):
    """An error caused by user input; its message says what to do."""
