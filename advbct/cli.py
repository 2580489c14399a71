"""Shared helpers for the thin entry points in ``tools/``."""

import argparse
import functools
import sys

from advbct.errors import UserError, one_line


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors (a missing or unknown option, a wrong type) end as one line through
    :func:`guarded` (``error: PROG: MESSAGE``, exit status 2) instead of the usage text and a second line."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message} (see --help)")


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


def config_main(description, run, argv=None):
    """The original's command line (``--cfg FILE`` then ``KEY VALUE`` pairs): load the config, call
    ``run(cfg)``, always tear down the process group; user errors end as one line (``guarded``)."""
    from advbct.config import add_config_arguments, load_config

    @guarded
    def main():
        parser = add_config_arguments(ArgumentParser(description=description))
        args = parser.parse_args(argv)
        cfg = load_config(args.cfg, args.opts)
        from advbct import distributed as dist
        try:
            result = run(cfg)
            dist.finish()
            return result
        finally:
            dist.cleanup()

    return main()
