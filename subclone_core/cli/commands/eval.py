"""`subclone eval`: loss and perplexity (text) or loss and accuracy (images) of a parent or a child folder."""

from __future__ import annotations

import argparse
import math
import sys
import time

from subclone_core.cli.commands._options import (
    add_placement_args,
    placement_kwargs,
    print_json,
    require_positive,
)
from subclone_core.sources import default_data_id, load_parent, make_data
from subclone_core.sources.checks import nonfinite_in_folder
from subclone_core.sources.folders import weight_files
from subclone_core.tasks import task_spec
from subclone_core.training.evaluate import evaluate


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `eval` subcommand."""
    p = subparsers.add_parser(
        "eval",
        help="loss and perplexity (text) or accuracy (images) on validation data",
        description="Evaluate a parent or a saved child on the validation split of a data set.",
    )
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument(
        "--parent", metavar="P", help="default, gemma3-270m, default-vit, a model folder, a .gguf file, or a Hub id"
    )
    who.add_argument(
        "--model", metavar="DIR", help="a saved model folder (e.g. a child made by `subclone make`)"
    )
    p.add_argument(
        "--data",
        metavar="D",
        help="text: default or a .txt/.md/.jsonl file or folder; "
        "images: fashion-mnist, digits, or a folder of class subfolders (default: default / fashion-mnist)",
    )
    p.add_argument(
        "--split",
        default="validation",
        choices=("validation", "train"),
        help="which split (default: validation)",
    )
    p.add_argument(
        "--tokens", type=int, default=8192, metavar="N", help="text tokens to score (default: 8192)"
    )
    p.add_argument("--images", type=int, default=None, metavar="N", help="images to score (default: all)")
    # 512-token windows: short windows score the first tokens of each with little context (2,048 tokens
    # of the default text: perplexity ~35 at 128, ~24 at 512)
    p.add_argument("--seq-len", type=int, default=512, metavar="T", help="tokens per sequence (default: 512)")
    p.add_argument(
        "--batch-size", type=int, default=8, metavar="B", help="sequences or images per batch (default: 8)"
    )
    add_placement_args(p)
    p.add_argument(
        "--allow-pickle", action="store_true", help="accept pytorch_model.bin weights (pickles can run code)"
    )
    p.add_argument(
        "--trust-remote-code", action="store_true", help="let transformers run the model folder's own code"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the model and data, evaluate, print the result."""
    require_positive("--tokens", args.tokens)
    parent_id = args.parent or args.model
    parent = load_parent(
        parent_id,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
        **placement_kwargs(args),
    )
    data_id = args.data or default_data_id(parent.task)
    data = make_data(
        parent, data_id, args.split, seq_len=args.seq_len, max_tokens=args.tokens, max_images=args.images
    )
    start = time.perf_counter()
    metrics = evaluate(parent.model, data.batches(args.batch_size))
    result = {
        "parent": parent_id,
        "label": parent.label,
        "task": parent.task,
        "data": data_id,
        "split": args.split,
        **metrics,
        "seconds": round(time.perf_counter() - start, 2),
    }
    if args.json:
        print_json(result)  # strict JSON: a NaN loss is null
    else:
        print(_text(result))
    if not math.isfinite(result["loss"]):
        print(f"Warning: {_nonfinite_note(parent)}", file=sys.stderr)
    return 0


def _nonfinite_note(parent) -> str:
    """Why a loss is not finite, in words: the first non-finite weight when there is one."""
    name = nonfinite_in_folder(weight_files(parent.source) if parent.source else [], parent.model)
    where = f"its weights hold NaN or infinite values (first in {name})" if name else \
        "its weights are finite, so its activations overflowed (try --dtype float32)"
    return f"the loss is not finite: the model's outputs are NaN or infinite, and {where}"


def _text(result: dict) -> str:
    task = task_spec(result["task"])
    scored = f"{result[task.unit_name]} {task.unit_name}"
    score = f"loss {result['loss']:.4f}   {task.headline} {task.headline_text(result, precise=True)}"
    return f"{result['label']}\n{result['data']} ({result['split']}, {scored}): {score}"
