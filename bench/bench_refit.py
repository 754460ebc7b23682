"""The least-squares refit's variants (whose inputs, towards what) on the embedded real parents, at step 0 (see
bench/README.md). Writes docs/refit_variants.json and a section of docs/BENCHMARKS.md.

Run: python -m bench.bench_refit [--parents default,gemma3-270m] [--tokens 4096] [--smoke]
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Iterator

from bench._report import AGGRESSIVE, DOCS, PAPER_LIKE, bench_parser, machine, render, table, write_section
from subclone_core.core import archs
from subclone_core.io.atomic import write_text

# variant: (label, table fields); None: the refit off
VARIANTS = {
    "parent-slice": ("parent inputs, towards the slice", {"refit_inputs": "parent", "refit_toward": "slice"}),
    "child-slice": ("child inputs, towards the slice", {"refit_inputs": "child", "refit_toward": "slice"}),
    "parent-zero": ("parent inputs, towards zero (GRAIL's ridge)", {"refit_inputs": "parent", "refit_toward": "zero"}),
    "child-zero": ("child inputs, towards zero", {"refit_inputs": "child", "refit_toward": "zero"}),
    "slice": ("slice only (no refit)", None),
}
SHAPES = {  # the shapes of the quality bench: 60% width, and a narrow or shallow one
    "default": [PAPER_LIKE, AGGRESSIVE],
    "gemma3-270m": [{"layers": 18, "hidden": 384, "heads": 2, "kv_heads": 1, "ffn": 1024},
                    {"layers": 12, "hidden": 384, "heads": 2, "kv_heads": 1, "ffn": 1024}],
}


@contextlib.contextmanager
def with_table(model_type: str, fields: dict) -> Iterator[None]:
    """The family's table with some refit fields replaced, until the block ends."""
    old = archs.REGISTRY[model_type]
    archs.REGISTRY[model_type] = dataclasses.replace(old, **fields)
    try:
        yield
    finally:
        archs.REGISTRY[model_type] = old


def measure_parent(parent_id: str, tokens: int, shapes: list[dict]) -> dict:
    """Step-0 validation loss of every variant and of random init, per shape."""
    from subclone_core.core.strategies import plan_shape
    from subclone_core.sources import load_parent, make_data
    from subclone_core.training.evaluate import evaluate
    from subclone_core.workflow.children import make_child, measure_importance

    parent = load_parent(parent_id)
    importance = measure_importance(parent, "default", tokens=tokens)
    val = make_data(parent, "default", "validation", seq_len=128, max_tokens=tokens)
    rows = []
    for sizes in shapes:
        target, row = plan_shape(parent.model, **sizes), {"shape": sizes}
        for name, (_, fields) in VARIANTS.items():
            start = time.perf_counter()
            with with_table(parent.model.config.model_type, fields or {}):
                child = make_child(parent, target, importance=importance, data_id="default", calib_tokens=tokens,
                                   refit=fields is not None)
            row[name] = {"loss": evaluate(child.model, val.batches(8))["loss"], "seconds": time.perf_counter() - start}
            print(f"{parent_id} {sizes} {name}: {row[name]['loss']:.3f} ({row[name]['seconds']:.0f} s)", flush=True)
        random = make_child(parent, target, strategy="random")
        row["random"] = {"loss": evaluate(random.model, val.batches(8))["loss"]}
        rows.append(row)
    return {"parent": parent_id, "label": parent.label, "tokens": tokens, "rows": rows}


def markdown(report: dict) -> str:
    """The "bench_refit" section of docs/BENCHMARKS.md (template bench/templates/bench_refit.md)."""
    names = [*VARIANTS, "random"]
    labels = [VARIANTS[n][0] if n in VARIANTS else "random init" for n in names]
    body = []
    for result in report["results"]:
        for row in result["rows"]:
            s = row["shape"]
            shape = f"{s['layers']} x {s['hidden']}, {s['heads']}/{s['kv_heads']} heads, FFN {s['ffn']}"
            body.append([result["label"], shape, *(f"{row[n]['loss']:.2f}" for n in names)])
    return render("bench_refit", tokens=report["tokens"], machine=report["machine"],
                  table=table(["parent", "child", *labels], body), notes=report.get("notes", ""))


def main() -> int:
    parser = bench_parser(__doc__, smoke="one shape of the default parent, 512 tokens, no docs",
                          report_only="rewrite the section from docs/refit_variants.json")
    parser.add_argument("--parents", default="default,gemma3-270m")
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args()
    if args.report_only:
        write_section("bench_refit", markdown(json.loads((DOCS / "refit_variants.json").read_text())))
        return 0
    parents = ["default"] if args.smoke else args.parents.split(",")
    tokens = 512 if args.smoke else args.tokens
    results = [measure_parent(p, tokens, SHAPES[p][-1:] if args.smoke else SHAPES[p]) for p in parents]
    report = {"tokens": tokens, "machine": machine(), "results": results}
    if not args.smoke:
        write_text(DOCS / "refit_variants.json", json.dumps(report, indent=1))
        write_section("bench_refit", markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
