"""`subclone info`: the architecture and size of a parent (or any model folder)."""

from __future__ import annotations

import argparse
import json

from subclone_core.archs import arch_for
from subclone_core.commands._options import add_parent_args
from subclone_core.shape import Shape
from subclone_core.sources import Parent, load_parent


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `info` subcommand."""
    p = subparsers.add_parser(
        "info",
        help="architecture, shape and size of a parent or model folder",
        description="Show a parent's architecture: blocks, widths, heads, parameters.",
    )
    add_parent_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def describe(parent: Parent) -> dict:
    """The facts `info` shows, as a flat dict (also used by the app)."""
    config = parent.model.config
    arch = arch_for(config.model_type)
    params = sum(p.numel() for p in parent.model.parameters())  # parameters() counts a tied head once
    out = {
        "parent": parent.id,
        "label": parent.label,
        "model_type": config.model_type,
        "family": arch.name,
        "task": parent.task,
        **_shape(config),
    }
    if parent.task == "causal-lm":
        out["vocab"] = config.vocab_size
        out["tied_embeddings"] = bool(getattr(config, "tie_word_embeddings", False))
    else:
        out["num_labels"] = config.num_labels
        out["image_size"], out["patch_size"] = config.image_size, config.patch_size
        out["channels"] = config.num_channels
    out.update(
        parameters=params,
        float32_mb=round(params * 4 / 1e6, 1),
        source=str(parent.source) if parent.source else None,
    )
    return out


def _shape(config) -> dict:
    shape = Shape.of(config)
    return {
        "blocks": shape.layers,
        "hidden": shape.hidden,
        "heads": shape.heads,
        "kv_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "ffn": shape.ffn,
    }


def run(args: argparse.Namespace) -> int:
    """Load the parent and print its description."""
    parent = load_parent(
        args.parent, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code
    )
    info = describe(parent)
    if args.json:
        print(json.dumps(info))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value
        print(f"{key.replace('_', ' '):<{width}}  {shown}")
    return 0
