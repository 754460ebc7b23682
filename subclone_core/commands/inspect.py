"""`subclone inspect`: measure neuron, head and block importance and write them to JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from subclone_core.commands._options import add_data_args, add_parent_args, placement_kwargs
from subclone_core.errors import SubcloneError
from subclone_core.shape import Shape
from subclone_core.sources.parents import load_parent
from subclone_core.workflow import measure_importance


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="measure neuron, head and block importance on calibration data",
                       description="Write per-layer importance scores and block statistics to a JSON file.")
    add_parent_args(p)
    add_data_args(p)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if not out.parent.is_dir():
        raise SubcloneError(f"folder {str(out.parent)!r} for --out does not exist")
    if args.tokens <= 0:
        raise SubcloneError(f"--calib-tokens={args.tokens} must be a positive integer")
    parent = load_parent(args.parent, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                         **placement_kwargs(args))
    importance = measure_importance(parent, args.data, tokens=args.tokens)
    report = {"parent": args.parent, "shape": Shape.of(parent.model.config).as_dict(), **importance.to_json()}
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(report))
    tmp.replace(out)
    rel = importance.rel_magnitude
    print(f"wrote {out}: {importance.tokens} tokens; lowest relative magnitude at block "
          f"{int(rel.argmin())} ({float(rel.min()):.3f}), highest at block {int(rel.argmax())} "
          f"({float(rel.max()):.3f})")
    return 0
