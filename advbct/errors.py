"""User-facing errors: a one-line message, exit code 2, no traceback (see ``advbct.cli``)."""


class UserError(Exception):
    """A mistake in the user's input (path, config key, data file); the message names it."""

    exit_code = 2


class NonFiniteLossError(UserError):
    """Training produced a NaN/inf loss; the run stops and the last good checkpoint is kept."""

    exit_code = 3
