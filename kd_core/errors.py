"""The one exception type for mistakes a user can fix (bad params, bad data, stale cache).

The CLI prints it as a single line and exits non-zero without a traceback; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A problem in the user's inputs, described in one readable line."""
