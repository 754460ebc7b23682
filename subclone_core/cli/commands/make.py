"""`subclone make`: build a child from a parent and save it as a Hugging Face folder."""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial

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
from subclone_core.core.strategies import plan_shape
from subclone_core.io.atomic import claim_output
from subclone_core.io.saving import DEFAULT_SHARD_SIZE, shard_size
from subclone_core.sources.checks import NONFINITE_FLAG, first_nonfinite, refuse_nonfinite
from subclone_core.sources.parents import load_parent
from subclone_core.workflow.children import make_child_into_folder
from subclone_core.workflow.plan import Plan, make_planned_child, resolve_plan


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
    p.add_argument(NONFINITE_FLAG, dest="allow_nonfinite", action="store_true",
                   help="build from a parent whose weights hold NaN or infinite values (refused by default)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check every flag that can be checked without the parent, then claim --out and make the child: a run
    refused for its flags never holds the output that a concurrent valid run is about to write."""
    require_positive("--calib-tokens", args.tokens)
    check_shape_flags(args)
    placement_kwargs(args)  # --device, --dtype, --max-memory
    max_shard = shard_size(args.max_shard_size)
    with claim_output(args.out, overwrite=args.overwrite):  # one writer; a doomed write fails now
        return make(args, max_shard)


def make(args: argparse.Namespace, max_shard: int) -> int:
    """Load the parent, resolve and print the plan, then calibrate, build and save the child into the claimed
    --out; print the summary."""
    parent = load_parent(args.parent, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                         **placement_kwargs(args))
    if not args.allow_nonfinite:  # a child sliced from NaN weights is NaN: say so before calibrating where
        # the parent is in memory; its offloaded part is checked as the child is written (no extra read)
        refuse_nonfinite(f"the parent {args.parent!r}", first_nonfinite(parent.model.state_dict().items()))
    target = plan_shape(parent.model, args.strategy, **child_sizes(args, Shape.of(parent.model.config).layers))
    plan = resolve_plan(parent, strategy=args.strategy, drop=args.drop, scale=args.scale, untie_head=args.untie_head,
                        residual_score=args.residual_score, refit=args.refit, refit_dtype=args.refit_dtype,
                        data_id=args.data,
                        calib_tokens=args.tokens, seed=args.seed, target=target, **sequential_args(args))
    if plan.calibrate:
        check_calib_tokens(parent, args.tokens)
    say_plan([plan], as_json=args.json)
    start = time.perf_counter()
    stats: dict = {}
    child, out = make_child_into_folder(partial(make_planned_child, parent, target, plan, stats=stats), args.out,
                                        task=parent.task, overwrite=args.overwrite, max_shard_size=max_shard,
                                        allow_nonfinite=args.allow_nonfinite)
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in child.model.parameters())
    summary = {"out": str(out), "shape": target.as_dict(), "parameters": params,
               "removed_blocks": child.manifest.removed_blocks, "strategy": args.strategy,
               "scale": child.manifest.scale, "refit": child.manifest.refit,
               "residual_score": child.manifest.residual_score, "seconds": round(seconds, 2),
               "plan": plan.to_json(), "warnings": plan.warnings(),
               "parent_bytes_read": {name: part.get("bytes_read", 0) for name, part in stats.items()}}
    if args.json:
        print_json(summary)
    else:
        print(f"saved {out}: {target.layers} blocks x {target.hidden}, {target.heads} heads / "
              f"{target.kv_heads} KV, FFN {target.ffn}, {params / 1e6:.1f}M parameters "
              f"(removed blocks {summary['removed_blocks'] or 'none'}) in {seconds:.1f} s{_reads(stats)}")
    return 0


def say_plan(plans: list[Plan], *, as_json: bool) -> None:
    """Say the plans before the work starts: each line on stdout (not with --json, whose object holds them),
    flushed so that it shows while calibration runs; each warning once, on stderr."""
    if not as_json:
        print("\n".join(plan.line() for plan in plans), flush=True)
    for warning in dict.fromkeys(w for plan in plans for w in plan.warnings()):
        print(f"Warning: {warning}", file=sys.stderr, flush=True)


def _reads(stats: dict) -> str:
    """What the block-by-block passes read from the parent's files, where they read any."""
    reads = {name: part["bytes_read"] for name, part in stats.items() if part.get("bytes_read")}
    if not reads:
        return ""
    return "; read " + ", ".join(f"{b / 2**30:.2f} GiB for the {name}" for name, b in reads.items()) + \
        " from the parent's files"
