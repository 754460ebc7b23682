"""The `subclone` command line: one module per subcommand under subclone_core.cli.commands."""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import pkgutil
import re
import sys
from typing import NoReturn

from subclone_core import __version__
from subclone_core.cli import commands
from subclone_core.core.errors import SubcloneError

# errors of a full, read-only or forbidden place: what to do about each, after the path and the cause
_WRITING = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}  # errors only a write meets
_OS_ADVICE = {errno.ENOSPC: "free some space or choose another place",
              errno.EDQUOT: "free some space (the disk quota is used up) or choose another place",
              errno.EFBIG: "choose a file system that takes larger files",
              errno.EROFS: "the file system is read-only: choose another place",
              errno.EACCES: "check its permissions or choose another place",
              errno.EPERM: "check its permissions or choose another place"}
# safetensors reports an I/O error in its message only: '... No space left on device (os error 28) at path "..."'
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_RUST_PATH = re.compile(r'at path "([^"]*)"')
# advice naming a flag, dropped when the command that failed has no such flag (a library message serves all)
_FLAG_ADVICE = re.compile(r",? or (?:a |an )?(?:smaller |larger |other )?(--[a-z][a-z-]*)")
# transformers refers to its loading report, which only --verbose shows (quiet_transformers hides it)
_HIDDEN_REPORT = re.compile(r"For details look at (?:the `CONVERSION` entries of )?the above report!?")
_REPORT_HINT = "(run again with --verbose for transformers' loading report)"
_META_DEVICE_NOTICE = "Some parameters are on the meta device"


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line, ending with where the full usage is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand module's parser attached."""
    parser = OneLineParser(
        prog="subclone",
        description="Initialize a smaller transformer from a larger pretrained one (weight subcloning).",
    )
    parser.add_argument("--version", action="version", version=f"subclone {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of any error (for bug reports)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)  # parsers of our class
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue  # shared helpers, not a subcommand
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(sub)
    return parser


def quiet_transformers(verbose: bool) -> None:
    """Keep stderr for our own messages: transformers' loading bars and notices, and accelerate's notice that
    offloaded weights sit on the meta device (the plan line already says where the parent lives), only with
    --verbose."""
    from transformers.utils import logging as hf_logging

    offload_log = logging.getLogger("accelerate.big_modeling")
    if verbose:
        offload_log.removeFilter(not_meta_device_notice)
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    offload_log.addFilter(not_meta_device_notice)  # once: the same filter is not added twice


def not_meta_device_notice(record: logging.LogRecord) -> bool:
    """False for accelerate's notice that offloaded weights sit on the meta device (expected under --max-memory)."""
    return not str(record.msg).startswith(_META_DEVICE_NOTICE)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; bad input exits with status 2 and a one-line error on stderr.

    The one error boundary of the command line: an anticipated failure (bad input, a file that cannot be
    read or written, a full disk) is one line naming the path or value, exit status 2; an unexpected one (a
    bug) is one line too, exit status 1, and shows its traceback with --debug.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
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
        code, message = describe_error(err, output_of(args))
        print(f"subclone {args.command}: {for_command(message, command_flags(parser, args.command))}",
              file=sys.stderr)
        return code


def output_of(args: argparse.Namespace) -> str | None:
    """The path the command writes (--out or --to), to name when an error does not say which file failed."""
    path = getattr(args, "out", None) or getattr(args, "to", None)
    return None if path is None else str(path)


def describe_error(err: Exception, output: str | None = None) -> tuple[int, str]:
    """(exit status, one line) for an error that reached the command line; ``output``: what the command
    writes, named when a failed write does not name its file."""
    if isinstance(err, SubcloneError):
        return 2, f"error: {one_line(str(err))}"
    io_error = os_error_of(err)
    if io_error is not None:
        return 2, describe_os_error(io_error, output)
    if _HIDDEN_REPORT.search(str(err)):  # transformers' refusal of weights that do not fit the config
        return 2, ("error: transformers could not load the model's weights: they do not match its config.json "
                   f"or could not be converted; save the folder again {_REPORT_HINT}")
    return 1, (f"internal error: {type(err).__name__}: {one_line(str(err))} (a bug; run again with --debug "
               "for the traceback and report it)")


def os_error_of(err: BaseException) -> OSError | None:
    """The OSError behind ``err``: itself, the error it was raised from (``raise ... from``: an error raised
    while handling another may be a bug), or the one that safetensors (whose write errors are SafetensorError,
    not OSError) names by number in its message."""
    for _ in range(16):  # a chain of causes is short; a loop in one ends here
        if err is None:
            return None
        if isinstance(err, OSError):
            return err
        number = _RUST_OS_ERROR.search(str(err))
        if type(err).__name__ == "SafetensorError" and number:
            path = _RUST_PATH.search(str(err))
            code = int(number[1])
            return OSError(code, os.strerror(code), path[1] if path else None)
        err = err.__cause__
    return None


def describe_os_error(err: OSError, output: str | None = None) -> str:
    """One line naming the path and the cause, and what to do: a full disk, a read-only or forbidden place."""
    where = f" {err.filename}" if err.filename else (f" {output}" if output else "")
    what = err.strerror or one_line(str(err)) or type(err).__name__
    verb = "write" if err.errno in _WRITING else "read or write"
    advice = _OS_ADVICE.get(err.errno, "check the path, its permissions and the free space")
    return f"error: cannot {verb}{where}: {what}; {advice}, and run again"


def command_flags(parser: argparse.ArgumentParser, command: str) -> set[str]:
    """The option strings the subcommand ``command`` accepts."""
    for action in parser._subparsers._group_actions:  # the one add_subparsers action
        if command in action.choices:
            return set(action.choices[command]._option_string_actions)
    return set()


def for_command(message: str, flags: set[str]) -> str:
    """A library message as the command line shows it: advice naming a flag the command does not have is
    dropped ("give more text or a smaller --seq-len" from `make`, which has no --seq-len, becomes "give more
    text"), and transformers' pointer to a report it did not show says how to see it."""
    message = _FLAG_ADVICE.sub(lambda m: m[0] if m[1] in flags else "", message)
    return _HIDDEN_REPORT.sub(_REPORT_HINT, message)


def one_line(text: str) -> str:
    """The text on one line (a multi-line message would break one-line error output)."""
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
