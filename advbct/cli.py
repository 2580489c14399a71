"""Shared helpers for the thin entry points in ``tools/``."""

import functools
import sys

from advbct.errors import UserError, one_line


def guarded(main):
    """Run ``main``; a :class:`UserError` prints ``error: <message>`` and exits 2 without a traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            print(f"error: {one_line(str(exc))}", file=sys.stderr)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
