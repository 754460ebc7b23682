"""The `subclone` command line: one module per subcommand under subclone_core.commands."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from subclone_core import __version__, commands
from subclone_core.errors import SubcloneError


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand module's parser attached."""
    parser = argparse.ArgumentParser(
        prog="subclone",
        description="Initialize a smaller transformer from a larger pretrained one (weight subcloning).",
    )
    parser.add_argument("--version", action="version", version=f"subclone {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
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
    """Run one subcommand; bad input exits non-zero with a one-line error on stderr."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    quiet_transformers(args.verbose)
    try:
        return int(args.func(args) or 0)
    except SubcloneError as err:
        print(f"subclone {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"subclone {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
