"""User-facing errors: a one-line message, exit code 2, no traceback (see ``advbct.cli``)."""


class UserError(Exception):
    """A mistake in the user's input (path, config key, data file); the message names it."""

    exit_code = 2
