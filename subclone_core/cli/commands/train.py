"""`subclone train`: train a saved child (and optionally a random twin of its shape) on the same data."""

from __future__ import annotations

import argparse

from subclone_core.cli.commands._options import add_data_args
from subclone_core.cli.commands._training import (
    EVAL_TOKENS,
    add_training_args,
    check_seq_len,
    hparam_overrides,
    load_training_child,
    prepare_output,
    random_twin,
    train_and_report,
    training_config,
)
from subclone_core.core.manifest import Manifest
from subclone_core.core.shape import Shape
from subclone_core.core.strategies import STRATEGY_SPECS
from subclone_core.io.saving import read_manifest
from subclone_core.sources import default_data_id
from subclone_core.training import Candidate
from subclone_core.workflow.jobs import BASELINE, training_data


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a saved child, optionally beside a random twin, and report the speedup",
                       description="Train a model folder (e.g. from `subclone make`) and, with --baseline random, "
                                   "a randomly initialized model of the same shape on the identical data order; "
                                   "print step-0, final and best validation values, steps to target and speedup.")
    p.add_argument("--model", required=True, metavar="DIR", help="the model folder to train")
    p.add_argument("--baseline", choices=(BASELINE,), help="also train a random-init twin of the same shape")
    add_data_args(p, tokens_flag="--eval-tokens", tokens_default=EVAL_TOKENS)
    add_training_args(p, out_required=True)
    p.set_defaults(func=run)


def child_candidate(model, manifest: Manifest, with_baseline: bool) -> Candidate:
    """The model folder as a candidate named after the strategy that made it (e.g. "subclone").

    A folder made with another tool is trained with the subcloned child's defaults (its weights are
    pretrained); a random-init child next to a random baseline is called "child" to keep names unique.
    """
    strategy = manifest.strategy
    if strategy not in STRATEGY_SPECS:
        strategy = "subclone"
    name = "child" if strategy == BASELINE and with_baseline else strategy
    return Candidate(name, model, strategy=strategy)


def run(args: argparse.Namespace) -> int:
    config = training_config(args)
    with prepare_output(args.out, args.overwrite) as out:  # claimed now; the old run is kept until the end
        return train(args, config, out)


def folder_manifest(model_dir: str) -> Manifest:
    """The folder's subclone.json, or a note for a folder made elsewhere (a malformed one is named)."""
    return read_manifest(model_dir) or Manifest(note=f"trained from {model_dir}")


def train(args: argparse.Namespace, config, out) -> int:
    """Load the model folder (and make its twin), train them into the claimed run folder, report."""
    child, weights = load_training_child(args.model, fsdp=config.fsdp)  # --fsdp: on the meta device
    check_seq_len(child.model, args.seq_len)
    manifest = folder_manifest(args.model)
    candidates = [child_candidate(child.model, manifest, bool(args.baseline))]
    candidates[0].weights = weights
    manifests = {candidates[0].name: manifest}
    if args.baseline:
        twin, twin_weights = random_twin(child.model, args.seed, meta=weights is not None)
        twin.manifest.parent.twin_of = str(args.model)
        candidates.append(Candidate(BASELINE, twin.model, strategy=BASELINE, weights=twin_weights))
        manifests[BASELINE] = twin.manifest
    overrides = hparam_overrides(args, [c.name for c in candidates])
    for cand in candidates:
        cand.lr = overrides["lr"].get(cand.name, cand.lr)
        cand.weight_decay = overrides["weight_decay"].get(cand.name, cand.weight_decay)
    train, val, config = training_data(child, args.data, config, seq_len=args.seq_len, eval_tokens=args.tokens,
                                       eval_images=args.eval_images)
    context = {"command": "train", "model": str(args.model), "label": child.label, "task": child.task,
               "data": args.data or default_data_id(child.task), "seq_len": args.seq_len, "shape": Shape.of(child.model.config).as_dict()}
    return train_and_report(candidates, train, val, config, args=args, out=out, preprocessor=child.preprocessor,
                            manifests=manifests, context=context)
