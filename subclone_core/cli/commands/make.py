"""`subclone make`: build a child from a parent and save it as a Hugging Face folder."""

from __future__ import annotations

import argparse
import time

from subclone_core.cli.commands._options import (
    add_child_args,
    add_data_args,
    add_parent_args,
    add_shape_args,
    check_calib_tokens,
    check_shape_flags,
    child_sizes,
    placement_kwargs,
    print_json,
    require_positive,
    sequential_args,
)
from subclone_core.core.shape import Shape
from subclone_core.core.strategies import needs_calibration, plan_shape
from subclone_core.io.atomic import claim_output
from subclone_core.io.saving import DEFAULT_SHARD_SIZE, shard_size
from subclone_core.sources.parents import load_parent
from subclone_core.workflow.children import make_child, save_child


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make", help="build a child from a parent and save it as a Hugging Face folder",
                       description="Build a narrower, shallower child initialized from the parent's weights.")
    add_parent_args(p)
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--max-shard-size", default=DEFAULT_SHARD_SIZE, metavar="SIZE",
                   help=f"largest weight file of the child; a larger child is written in shards with an index "
                        f"(default {DEFAULT_SHARD_SIZE}, as transformers)")
    add_shape_args(p)
    add_child_args(p)
    add_data_args(p, sequential=True)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    require_positive("--calib-tokens", args.tokens)
    sequential_args(args)
    check_shape_flags(args)
    max_shard = shard_size(args.max_shard_size)
    with claim_output(args.out, overwrite=args.overwrite):  # one writer; a doomed write fails now
        return make(args, max_shard)


def make(args: argparse.Namespace, max_shard: int) -> int:
    """Load, calibrate, build and save the child into the claimed --out; print the summary."""
    parent = load_parent(args.parent, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                         **placement_kwargs(args))
    if needs_calibration(args.strategy, args.drop):
        check_calib_tokens(parent, args.tokens)
    target = plan_shape(parent.model, **child_sizes(args, Shape.of(parent.model.config).layers))
    start = time.perf_counter()
    child = make_child(parent, target, strategy=args.strategy, drop=args.drop, scale=args.scale,
                       untie_head=args.untie_head, data_id=args.data, calib_tokens=args.tokens, seed=args.seed,
                       residual_score=args.residual_score, refit=args.refit,
                       **sequential_args(args))
    out = save_child(child, args.out, task=parent.task, overwrite=args.overwrite, max_shard_size=max_shard)
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in child.model.parameters())
    summary = {"out": str(out), "shape": target.as_dict(), "parameters": params,
               "removed_blocks": child.manifest.removed_blocks, "strategy": args.strategy,
               "scale": child.manifest.scale, "refit": child.manifest.refit,
               "residual_score": child.manifest.residual_score, "seconds": round(seconds, 2)}
    if args.json:
        print_json(summary)
    else:
        print(f"saved {out}: {target.layers} blocks x {target.hidden}, {target.heads} heads / "
              f"{target.kv_heads} KV, FFN {target.ffn}, {params / 1e6:.1f}M parameters "
              f"(removed blocks {summary['removed_blocks'] or 'none'}) in {seconds:.1f} s")
    return 0
