"""`subclone info`: the architecture and size of a parent (or any model folder)."""

from __future__ import annotations

import argparse

from subclone_core.cli.commands._options import add_parent_args, placement_kwargs, print_json
from subclone_core.sources import load_parent
from subclone_core.sources.parents import describe


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `info` subcommand."""
    p = subparsers.add_parser(
        "info",
        help="architecture, shape and size of a parent or model folder",
        description="Show a parent's architecture: blocks, widths, heads, parameters.",
    )
    add_parent_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the parent and print its description."""
    parent = load_parent(args.parent, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                         **placement_kwargs(args))
    info = describe(parent)
    if args.json:
        print_json(info)
        return 0
    shown_info = {k: v for k, v in info.items() if v is not None}  # e.g. no licence line for a Hub model
    width = max(len(k) for k in shown_info)
    for key, value in shown_info.items():
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value
        print(f"{key.replace('_', ' '):<{width}}  {shown}")
    return 0
