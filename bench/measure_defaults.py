"""Step-0 validation loss of children of the default parent under each slicing option.

Chooses the defaults by measurement: weight scaling on or off, a tied unscaled head or an untied scaled
one, and the block-removal policy, at two reduction ratios, against first-k, uniform and random init.
Run: python -m bench.measure_defaults (writes a section of docs/BENCHMARKS.md).
"""

from __future__ import annotations

import math
import time

from bench._report import SHAPES, bench_parser, machine, render, write_section
from subclone_core.core.strategies import plan_shape, subclone_model
from subclone_core.sources import make_data
from subclone_core.sources.parents import load_parent
from subclone_core.training.evaluate import evaluate
from subclone_core.workflow.children import measure_importance

VARIANTS = {
    "subclone, no scaling, tied head, drop magnitude": {"strategy": "subclone", "scale": False, "drop": "magnitude"},
    "subclone, no scaling, tied head, drop middle": {"strategy": "subclone", "scale": False, "drop": "middle"},
    "subclone, scaling, tied unscaled head": {"strategy": "subclone", "scale": True, "drop": "magnitude"},
    "subclone, scaling, untied scaled head": {"strategy": "subclone", "scale": True, "drop": "magnitude",
                                                  "untie_head": True},
    "first-k (no reordering), no scaling, drop middle": {"strategy": "first-k", "scale": False, "drop": "middle"},
    "uniform (weight selection), first N blocks": {"strategy": "uniform", "scale": False},
    "random init": {"strategy": "random"},
}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--calib-tokens", type=int, default=4096)
    parser.add_argument("--val-tokens", type=int, default=8192)
    args = parser.parse_args()
    parent = load_parent("default")
    importance = measure_importance(parent, "default", tokens=args.calib_tokens)
    val = make_data(parent, "default", "validation", seq_len=128, max_tokens=args.val_tokens)
    start = time.perf_counter()
    parent_loss = evaluate(parent.model, val.batches(8))["loss"]
    rows = []
    for shape, sizes in SHAPES.items():
        target = plan_shape(parent.model, **sizes)
        label = "{} {layers} x {hidden} ({heads} heads / {kv_heads} KV, FFN {ffn})".format(shape, **sizes)
        for name, options in VARIANTS.items():
            child = subclone_model(parent.model, target, importance=importance, **options)
            loss = evaluate(child.model, val.batches(8))["loss"]
            rows.append([label, name, f"{loss:.2f}", f"{math.exp(min(loss, 50)):.0f}"])
            print(rows[-1], flush=True)
    report = render("defaults", machine=machine(), parent_loss=parent_loss, calib_tokens=importance.tokens,
                    val_tokens=val.num_tokens, uniform=math.log(49152), seconds=time.perf_counter() - start, rows=rows)
    print(report)
    write_section("defaults", report)


if __name__ == "__main__":
    main()
