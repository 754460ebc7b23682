"""`subclone inspect`: measure neuron, head and block importance (and, on request, the loss without each block)
and write them to JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from subclone_core.analysis.probes import ABLATION_TOKENS, ablate_parent
from subclone_core.cli.commands._options import (
    add_data_args,
    add_parent_args,
    check_calib_tokens,
    placement_kwargs,
    require_positive,
    sequential_args,
)
from subclone_core.core.manifest import json_safe
from subclone_core.core.shape import Shape
from subclone_core.io.atomic import FILE, building_file, claim_output
from subclone_core.sources.parents import load_parent
from subclone_core.workflow.children import measure_importance


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="measure neuron, head and block importance on calibration data",
                       description="Write per-layer importance scores and block statistics to a JSON file.")
    add_parent_args(p)
    add_data_args(p, sequential=True)
    p.add_argument("--ablation", action="store_true",
                   help="also measure the validation loss with each single block removed (block by block from the "
                        "parent's files, each weight read once, when calibration is sequential)")
    p.add_argument("--ablation-tokens", type=int, default=ABLATION_TOKENS,
                   help=f"validation tokens each ablated model is scored on (default {ABLATION_TOKENS})")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    require_positive("--calib-tokens", args.tokens)
    require_positive("--ablation-tokens", args.ablation_tokens)
    sequential_args(args)
    with claim_output(args.out, overwrite=args.overwrite, kind=FILE) as out:  # a doomed write fails now
        return inspect(args, out)


def inspect(args: argparse.Namespace, out: Path) -> int:
    """Calibrate the parent and write the report to the claimed --out file (whole, or not at all)."""
    parent = load_parent(args.parent, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                         **placement_kwargs(args))
    check_calib_tokens(parent, args.tokens)
    sequential = sequential_args(args)
    importance = measure_importance(parent, args.data, tokens=args.tokens, **sequential)
    report = {"parent": args.parent, "shape": Shape.of(parent.model.config).as_dict(), **importance.to_json()}
    if args.ablation:
        report["ablation"] = ablate_parent(parent, args.data, args.ablation_tokens, **sequential)
    with building_file(out) as tmp:
        tmp.write_text(json.dumps(json_safe(report), allow_nan=False))
    rel = importance.rel_magnitude
    print(f"wrote {out}: {importance.tokens} tokens; lowest relative magnitude at block "
          f"{int(rel.argmin())} ({float(rel.min()):.3f}), highest at block {int(rel.argmax())} "
          f"({float(rel.max()):.3f})")
    if args.ablation:
        print(ablation_text(report["ablation"]))
    return 0


def ablation_text(ablation: dict) -> str:
    """One line: the intact loss, and the blocks whose removal costs the most and the least."""
    losses = ablation["losses"]
    worst = max(range(len(losses)), key=losses.__getitem__)
    least = min(range(len(losses)), key=losses.__getitem__)
    base = ablation["base"]
    return (f"block ablation: loss {base:.4f} intact; without block {worst} {losses[worst]:.4f} (the most), "
            f"without block {least} {losses[least]:.4f} (the least)")
