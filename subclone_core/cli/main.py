"""The `subclone` command line: one module per subcommand under subclone_core.cli.commands."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from subclone_core import __version__
from subclone_core.cli import commands
from subclone_core.core.errors import SubcloneError


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand module's parser attached."""
    parser = argparse.ArgumentParser(
        prog="subclone",
        description="Initialize a smaller transformer from a larger pretrained one (weight subcloning).",
    )
    parser.add_argument("--version", action="version", version=f"subclone {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of any error (for bug reports)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue  # shared helpers, not a subcommand
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(sub)
    return parser


def quiet_transformers(verbose: bool) -> None:
    """Keep stderr for our own messages: transformers' loading bars and notices only with --verbose."""
    from transformers.utils import logging as hf_logging

    if not verbose:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; bad input exits with status 2 and a one-line error on stderr.

    The one error boundary of the command line: an anticipated failure (bad input, a file that cannot be
    read or written) is one line naming the path or value; an unexpected one (a bug) is one line too,
    exit status 1, and shows its traceback with --debug.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    quiet_transformers(args.verbose)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"subclone {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        code, message = describe_error(err)
        print(f"subclone {args.command}: {message}", file=sys.stderr)
        return code


def describe_error(err: Exception) -> tuple[int, str]:
    """(exit status, one line) for an error that reached the command line."""
    if isinstance(err, SubcloneError):
        return 2, f"error: {one_line(str(err))}"
    if isinstance(err, OSError):
        where = f" {err.filename}" if err.filename else ""
        what = err.strerror or one_line(str(err)) or type(err).__name__
        return 2, (f"error: cannot read or write{where}: {what}; check the path, its permissions and the free "
                   "space, and run again")
    return 1, (f"internal error: {type(err).__name__}: {one_line(str(err))} (a bug; run again with --debug "
               "for the traceback and report it)")


def one_line(text: str) -> str:
    """The text on one line (a multi-line message would break one-line error output)."""
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
