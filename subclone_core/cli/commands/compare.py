"""`subclone compare`: make a child with every strategy, train them all on the same data, print the speedups."""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from subclone_core.cli.commands._options import (
    add_child_args,
    add_data_args,
    add_parent_args,
    add_shape_args,
    check_calib_tokens,
    check_shape_flags,
    child_sizes,
    placement_kwargs,
    require_finite,
    require_positive,
)
from subclone_core.cli.commands._training import (
    EVAL_TOKENS,
    add_training_args,
    check_seq_len,
    is_main_process,
    parse_per_candidate,
    prepare_output,
    train_and_report,
    training_config,
)
from subclone_core.cli.commands.make import say_plan
from subclone_core.core.shape import Shape
from subclone_core.core.strategies import plan_shape
from subclone_core.sources import default_data_id, load_parent
from subclone_core.training.sweep import LrGrid, parse_lr_sweep
from subclone_core.workflow.jobs import (
    BASELINE,
    CANDIDATES,
    DISTILL,
    CandidateSettings,
    build_candidates,
    calibration_plan,
    candidate_plans,
    needs_importance,
    parse_names,
    shared_importance,
    training_data,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="make a child with each strategy, train all side by side, print the speedups",
                       description="Calibrate once, make one child per strategy (same shape), train every one "
                                   "on the identical data order and print the speedup over random init.")
    add_parent_args(p, device=False)  # the training flags' --device places the parent too
    add_shape_args(p)
    p.add_argument("--strategies", default=f"subclone,{BASELINE}",
                   help=f"comma-separated, from {', '.join(CANDIDATES)} (default subclone,random); first-k "
                        "takes the blocks subclone takes")
    add_child_args(p, strategy=False)
    add_data_args(p)
    p.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS, metavar="N",
                   help=f"validation tokens for text models (default {EVAL_TOKENS})")
    p.add_argument("--distill-alpha", type=float, default=0.5,
                   help=f"{DISTILL}: weight of the distillation term (default 0.5)")
    p.add_argument("--distill-temperature", type=float, default=2.0,
                   help=f"{DISTILL}: softmax temperature (default 2.0)")
    add_training_args(p, out_required=False, seed=False)
    p.add_argument("--lr-sweep", metavar="SPEC",
                   help="train candidates at several peak learning rates, e.g. random=1e-3,2e-3,subclone=5e-4,1e-3: "
                        "one run each (named subclone@lr=1e-3) on the same batches; each candidate is reported "
                        "and saved by its best run; a candidate not named keeps its single lr (--lr)")
    p.set_defaults(func=run)


def lr_overrides(text: str | None, names: tuple[str, ...], grid: LrGrid) -> dict[str, float]:
    """--lr per candidate; one value for all (no NAME=) applies to the candidates not swept."""
    if text is not None and "=" not in text:
        return parse_per_candidate(text, "--lr", [n for n in names if n not in grid])
    return parse_per_candidate(text, "--lr", list(names))


def candidate_settings(args: argparse.Namespace) -> CandidateSettings:
    """The candidates the flags ask for, checked before any loading."""
    names = parse_names(args.strategies)
    grid = parse_lr_sweep(args.lr_sweep, names) if args.lr_sweep is not None else {}
    settings = CandidateSettings(
        names=names, drop=args.drop, scale=args.scale, untie_head=args.untie_head, seed=args.seed,
        residual_score=args.residual_score, refit=args.refit, refit_dtype=args.refit_dtype,
        data_id=args.data, calib_tokens=args.tokens, distill_alpha=args.distill_alpha,
        distill_temperature=args.distill_temperature, lr=lr_overrides(args.lr, names, grid),
        weight_decay=parse_per_candidate(args.wd, "--wd", list(names)), lr_sweep=grid)
    require_positive("--calib-tokens", args.tokens)
    check_shape_flags(args)
    require_finite("--distill-alpha", args.distill_alpha)  # the range is CandidateSettings.validate's
    require_finite("--distill-temperature", args.distill_temperature)
    settings.validate()
    return settings


def calibrate_with_progress(parent, settings: CandidateSettings, quiet: bool, plans: dict | None = None):
    """The shared calibration (None when no candidate needs it), by the run's plans (None: the defaults), with a
    progress bar on stderr."""
    bar = tqdm(total=settings.calib_tokens, desc="calibrating", unit="tok", file=sys.stderr,
               disable=quiet or not is_main_process())
    try:
        return shared_importance(parent, settings, progress=lambda done, _total: bar.update(done - bar.n),
                                 plan=calibration_plan(plans or {}))
    finally:
        bar.close()


def run(args: argparse.Namespace) -> int:
    config = training_config(args)
    settings = candidate_settings(args)
    with prepare_output(args.out, args.overwrite) as out:  # claimed now; the old run is kept until the end
        return compare(args, config, settings, out)


def compare(args: argparse.Namespace, config, settings: CandidateSettings, out) -> int:
    """Load the parent, make one child per strategy, train them into the claimed run folder, report."""
    parent = load_parent(args.parent, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                         **placement_kwargs(args))
    check_seq_len(parent.model, args.seq_len)
    if needs_importance(settings):
        check_calib_tokens(parent, args.tokens)
    target = plan_shape(parent.model, **child_sizes(args, Shape.of(parent.model.config).layers))
    plans = candidate_plans(parent, settings, target)
    train, val, config = training_data(parent, args.data, config, seq_len=args.seq_len,
                                       eval_tokens=args.eval_tokens, eval_images=args.eval_images)
    if is_main_process():
        say_plan(list(plans.values()), as_json=args.json)
    importance = calibrate_with_progress(parent, settings, args.quiet, plans)
    candidates, manifests = build_candidates(parent, target, settings, importance=importance, plans=plans)
    context = {"command": "compare", "parent": args.parent, "label": parent.label, "task": parent.task,
               "data": args.data or default_data_id(parent.task), "seq_len": args.seq_len,
               "parent_shape": Shape.of(parent.model.config).as_dict(), "shape": target.as_dict(),
               "strategies": list(settings.names), "calibration_tokens": importance.tokens if importance else None,
               "lr_sweep": {name: list(lrs) for name, lrs in settings.lr_sweep.items()} or None,
               "plan": {name: plan.to_json() for name, plan in plans.items()},
               "warnings": list(dict.fromkeys(w for plan in plans.values() for w in plan.warnings()))}
    return train_and_report(candidates, train, val, config, args=args, out=out, preprocessor=parent.preprocessor,
                            manifests=manifests, context=context)
