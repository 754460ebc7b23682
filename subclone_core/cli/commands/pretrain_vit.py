"""`subclone pretrain-vit`: (re)build the self-pretrained ViT parent on Fashion-MNIST."""

from __future__ import annotations

import argparse
import sys

from subclone_core.cli.commands._options import print_json
from subclone_core.sources.vit_pretrain import pretrain_vit, recipe_with


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `pretrain-vit` subcommand."""
    p = subparsers.add_parser(
        "pretrain-vit",
        help="pretrain the default-vit parent on Fashion-MNIST (minutes on CPU)",
        description="Train a ViT from scratch on Fashion-MNIST and save it as a Hugging Face folder. Without "
        "--out it becomes the `default-vit` parent in the cache.",
    )
    p.add_argument("--out", metavar="DIR", help="where to save (default: the default-vit cache folder)")
    p.add_argument("--epochs", type=float, help="passes over the 60,000 training images (default: 2)")
    p.add_argument("--batch-size", type=int, help="images per step (default: 128)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: 1e-3)")
    p.add_argument("--seed", type=int, help="initialization and shuffling seed (default: 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train, save, and report the test accuracy."""
    recipe = recipe_with(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    last = {}

    def progress(event: dict) -> None:
        last.update(event)
        if "loss" in event and event["step"] % 100 == 0:  # progress goes to stderr: stdout is the result
            print(
                f"step {event['step']}/{event['steps']}  loss {event['loss']:.3f}  {event['seconds']:.0f} s",
                file=sys.stderr,
                flush=True,
            )

    folder = pretrain_vit(args.out, recipe=recipe, progress=progress, device=args.device)
    result = {
        "out": str(folder),
        "test_accuracy": last.get("test_accuracy"),
        "steps": last.get("step"),
        "seconds": round(last.get("seconds", 0.0), 1),
    }
    if args.json:
        print_json(result)
    else:
        print(
            f"saved {folder}: test accuracy {result['test_accuracy']:.2%} after {result['steps']} steps "
            f"in {result['seconds']:.0f} s"
        )
    return 0
