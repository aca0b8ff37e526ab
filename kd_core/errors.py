"""The one exception type for mistakes a user can fix (bad params, bad data, stale cache).

The CLI prints it as a single line and exits non-zero without a traceback; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A problem in the user's inputs, described in one readable line."""


class TransientError(UserError):
    """An outside service (MLflow, a cluster) did not answer; the same command may succeed later.

    The CLI exits with EX_TEMPFAIL (75) for it, so orchestration retries these and nothing else.
    """

    exit_code = 75
