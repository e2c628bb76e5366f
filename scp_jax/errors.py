"""The one error type users see: bad input or config, reported in one line with exit code 2."""

import functools
import sys


class UserError(Exception):
    """A problem with the user's files, flags or config (not a bug): one line, exit code 2."""


def cli_main(main):
    """Wrap a CLI entry point so a UserError prints `error: ...` on stderr and exits 2."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
