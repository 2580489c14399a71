"""User-facing errors: a one-line message, exit code 2, no traceback (see ``advbct.cli``)."""


class UserError(Exception):
    """A mistake in the user's input (path, config key, data file); the message names it."""

    exit_code = 2


class NonFiniteLossError(UserError):
    """Training produced a NaN/inf loss; the run stops and the last good checkpoint is kept."""

    exit_code = 3


def one_line(message: str) -> str:
    """The user-facing line of an error message.

    A UserError raised inside a DataLoader worker is re-raised by the loader with the worker's traceback
    ("Caught UserError in DataLoader worker ... Original Traceback ..."); its last line is
    ``<module>.<Class>: <message>``.
    """
    if "Original Traceback" not in message:
        return message
    return message.rstrip().splitlines()[-1].partition(": ")[2]
