"""`subclone compare`: make a child with every strategy, train them all on the same data, print the speedups."""

from __future__ import annotations

import argparse
import copy
import sys

from tqdm import tqdm

from subclone_core.calibration import Importance
from subclone_core.commands._options import add_child_args, add_data_args, add_parent_args, add_shape_args
from subclone_core.commands._training import (
    BASELINE,
    EVAL_TOKENS,
    add_training_args,
    apply_hparams,
    hparam_overrides,
    is_main_process,
    load_data,
    prepare_output,
    train_and_report,
    training_config,
)
from subclone_core.commands.make import child_sizes
from subclone_core.errors import SubcloneError
from subclone_core.shape import Shape
from subclone_core.sources import Parent, default_data_id, load_parent
from subclone_core.strategies import STRATEGIES, Child, needs_calibration, plan_shape
from subclone_core.training import Candidate
from subclone_core.workflow import make_child, measure_importance

DISTILL = "subclone+distill"  # the subcloned child trained with the parent as its teacher
VALID = (*STRATEGIES, DISTILL)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="make a child with each strategy, train all side by side, print the speedups",
                       description="Calibrate once, make one child per strategy (same shape), train every one "
                                   "on the identical data order and print the speedup over random init.")
    add_parent_args(p)
    add_shape_args(p)
    p.add_argument("--strategies", default=f"subclone,{BASELINE}",
                   help=f"comma-separated, from {', '.join(VALID)} (default subclone,random)")
    add_child_args(p, strategy=False)
    add_data_args(p)
    p.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS, metavar="N",
                   help=f"validation tokens for text models (default {EVAL_TOKENS})")
    p.add_argument("--distill-alpha", type=float, default=0.5,
                   help=f"{DISTILL}: weight of the distillation term (default 0.5)")
    p.add_argument("--distill-temperature", type=float, default=2.0,
                   help=f"{DISTILL}: softmax temperature (default 2.0)")
    add_training_args(p, out_required=False, seed=False)
    p.set_defaults(func=run)


def parse_strategies(text: str) -> list[str]:
    """The candidate names of --strategies, in order.

    Raises:
        SubcloneError: empty, unknown (the valid ones are listed) or repeated names.
    """
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise SubcloneError(f"--strategies is empty; valid: {', '.join(VALID)}")
    for name in names:
        if name not in VALID:
            raise SubcloneError(f"unknown strategy {name!r} in --strategies; valid: {', '.join(VALID)}")
        if names.count(name) > 1:
            raise SubcloneError(f"strategy {name!r} is listed twice in --strategies")
    return names


def base_strategy(name: str) -> str:
    """The strategy that builds a candidate's initial weights."""
    return "subclone" if name == DISTILL else name


def block_policy(strategy: str, drop: str | list[int] | None) -> str | list[int] | None:
    """--drop applies to every strategy that takes weights from the parent; random init has no blocks."""
    return None if strategy == BASELINE else drop


def shared_importance(parent: Parent, names: list[str], args: argparse.Namespace) -> Importance | None:
    """Calibrate once, when any strategy needs importance; every child then reuses it."""
    if not any(needs_calibration(base_strategy(n), block_policy(base_strategy(n), args.drop)) for n in names):
        return None
    if args.tokens <= 0:
        raise SubcloneError(f"--calib-tokens={args.tokens} must be a positive integer")
    bar = tqdm(total=args.tokens, desc="calibrating", unit="tok", file=sys.stderr,
               disable=args.quiet or not is_main_process())
    try:
        return measure_importance(parent, args.data, tokens=args.tokens,
                                  progress=lambda done, _total: bar.update(done - bar.n))
    finally:
        bar.close()


def build_candidates(parent: Parent, target: Shape, names: list[str], importance: Importance | None,
                     args: argparse.Namespace) -> tuple[list[Candidate], dict[str, dict]]:
    """One child per strategy, as candidates; subclone+distill starts from a copy of the subcloned child."""
    made: dict[str, Child] = {}
    candidates, manifests = [], {}
    for name in names:
        strategy = base_strategy(name)
        if strategy in made:
            child, model = made[strategy], copy.deepcopy(made[strategy].model)
        else:
            child = make_child(parent, target, strategy=strategy, drop=block_policy(strategy, args.drop),
                               scale=args.scale, untie_head=args.untie_head, importance=importance,
                               data_id=args.data, calib_tokens=args.tokens, seed=args.seed)
            made[strategy], model = child, child.model
        distill = name == DISTILL
        candidates.append(Candidate(name, model, strategy=name, teacher=parent.model if distill else None,
                                    distill_alpha=args.distill_alpha, distill_temperature=args.distill_temperature))
        manifests[name] = child.manifest
    return candidates, manifests


def run(args: argparse.Namespace) -> int:
    config = training_config(args)
    names = parse_strategies(args.strategies)
    overrides = hparam_overrides(args, names)
    if DISTILL in names:  # a bad alpha or temperature fails now, not after calibration
        Candidate(DISTILL, None, distill_alpha=args.distill_alpha,
                  distill_temperature=args.distill_temperature).validate()
    out = prepare_output(args.out, args.overwrite)
    parent = load_parent(args.parent, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    target = plan_shape(parent.model, **child_sizes(args, Shape.of(parent.model.config).layers))
    train, val, config = load_data(parent, args.data, config, seq_len=args.seq_len, eval_tokens=args.eval_tokens,
                                   eval_images=args.eval_images)
    importance = shared_importance(parent, names, args)
    candidates, manifests = build_candidates(parent, target, names, importance, args)
    apply_hparams(candidates, overrides)
    context = {"command": "compare", "parent": args.parent, "label": parent.label, "task": parent.task,
               "data": args.data or default_data_id(parent.task), "seq_len": args.seq_len,
               "parent_shape": Shape.of(parent.model.config).as_dict(), "shape": target.as_dict(),
               "strategies": names, "calibration_tokens": importance.tokens if importance else None}
    return train_and_report(candidates, train, val, config, args=args, out=out, preprocessor=parent.preprocessor,
                            manifests=manifests, context=context)
