"""`subclone explore`: child shapes near a parameter budget and their validation loss before training."""

from __future__ import annotations

import argparse
import time

from subclone_core.analysis.explore import (
    EVAL_TOKENS,
    REFIT_TOKENS,
    Exploration,
    candidate_shapes,
    explore_shapes,
    parse_param_count,
)
from subclone_core.analysis.probes import validation_sample
from subclone_core.cli.commands._options import (
    add_data_args,
    add_parent_args,
    add_refit_dtype,
    placement_kwargs,
    print_json,
    require_positive,
    sequential_args,
)
from subclone_core.cli.commands.make import say_plan
from subclone_core.core.errors import SubcloneError
from subclone_core.sources.parents import load_parent
from subclone_core.workflow.children import measure_importance, shared_refit_source
from subclone_core.workflow.plan import Plan, resolve_plan


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `explore` subcommand."""
    p = sub.add_parser("explore", help="child shapes near a parameter budget, ranked by step-0 loss",
                       description="Subclone a grid of child shapes (blocks x width) near a parameter budget, "
                                   "measure each one's validation loss before training, mark the Pareto front "
                                   "and compare with a randomly initialized child.")
    add_parent_args(p)
    p.add_argument("--params", required=True, metavar="N", help="parameter budget, e.g. 30M, 1.5B, 800k")
    add_data_args(p, sequential=True)
    p.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS, metavar="N",
                   help=f"validation tokens each shape is scored on (default {EVAL_TOKENS})")
    p.add_argument("--refit-tokens", type=int, default=REFIT_TOKENS, metavar="N",
                   help=f"calibration tokens each shape is refit on, at most --calib-tokens (default {REFIT_TOKENS}: "
                        "the same ranking as all of them, measured; make refits the chosen shape on all)")
    add_refit_dtype(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Calibrate, explore, print the grid (text table or JSON)."""
    budget = parse_param_count(args.params)
    require_positive("--calib-tokens", args.tokens)
    require_positive("--eval-tokens", args.eval_tokens)
    require_positive("--refit-tokens", args.refit_tokens)
    sequential = sequential_args(args)
    parent = load_parent(args.parent, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                         **placement_kwargs(args))
    plan = explore_plan(parent, args, sequential)
    candidate_shapes(parent.model, budget)  # a budget no shape comes near is refused before any work
    say_plan([plan], as_json=args.json)
    importance = measure_importance(parent, plan.data_id, tokens=plan.calib_tokens, sequential=plan.sequential,
                                    activation_memory=plan.activation_memory)
    batches = validation_sample(parent, args.data, args.eval_tokens)
    refit_tokens = min(args.refit_tokens, plan.calib_tokens) if plan.refit else 0
    refit, passes = shared_refit_source(parent, plan.data_id, refit_tokens, activation_memory=plan.activation_memory,
                                        block_dtype=plan.refit_torch_dtype) if refit_tokens else (None, None)
    start = time.perf_counter()
    result = explore_shapes(parent.model, importance, budget, batches, refit_items=refit)
    seconds = round(time.perf_counter() - start, 2)
    if args.json:
        print_json({"parent": args.parent, **result.to_json(), "seconds": seconds, "refit_tokens": refit_tokens,
                    "refit_pass": passes,
                    "plan": plan.to_json(),
                    "warnings": plan.warnings()})
    else:
        print(table(result))
        refit_text = f", each refit on {refit_tokens:,} calibration tokens ({PASS_TEXT[passes]})" if refit_tokens else ""
        print(f"{len(result.points)} shapes in {seconds} s{refit_text}; * marks the Pareto front (fewest parameters, "
              "lowest loss)")
    return 0


# how the shapes shared the parent's pass (workflow.children.REFIT_PASSES), in words
PASS_TEXT = {"shared": "one pass over the parent, its Gram matrices shared by every shape",
             "recorded": "one pass over the parent, recorded for every shape's own refit",
             "per shape": "one pass over the parent per shape"}


def explore_plan(parent, args: argparse.Namespace, sequential: dict) -> Plan:
    """The plan of the calibration and of the shapes explore builds: each as `make` builds it by default (the
    subclone strategy with the family's defaults, refit included), from the parent in memory.

    Raises:
        SubcloneError: the parent is offloaded to disk (the shapes are sliced from the weights in memory).
    """
    plan = resolve_plan(parent, data_id=args.data, calib_tokens=args.tokens, refit_dtype=args.refit_dtype,
                        child_flags=False, **sequential)
    if plan.offloaded:
        raise SubcloneError(f"explore slices its shapes from the parent's weights in memory, but --max-memory "
                            f"{plan.max_memory} left part of parent {args.parent!r} on disk; give it more memory")
    return plan


def table(result: Exploration) -> str:
    """The grid as aligned text, one shape per line, and the random reference."""
    lines = [f"{'blocks':>6} {'hidden':>6} {'heads':>5} {'kv':>3} {'ffn':>6} {'params':>9} {'step-0 loss':>11}"]
    for point in result.points:
        s = point.shape
        lines.append(f"{s.layers:>6} {s.hidden:>6} {s.heads:>5} {s.kv_heads:>3} {s.ffn:>6} "
                     f"{point.params / 1e6:>8.2f}M {point.loss:>11.3f}{' *' if point.pareto else ''}")
    r = result.random_shape
    lines.append(f"random init ({r.layers} x {r.hidden}): {result.random_loss:.3f}")
    return "\n".join(lines)
