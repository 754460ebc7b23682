"""The least-squares refit's variants (whose inputs, towards what) on the embedded real parents, at step 0 (see
bench/README.md). Writes docs/refit_variants.json and a section of docs/BENCHMARKS.md. With --refit-tokens, the
family's own refit on fewer or more tokens than the calibration's instead (what a faster app step would cost):
docs/refit_tokens.json and its section. With --refit-dtypes, the family's own refit with its blocks run in each
dtype (children.refit_dtype_for): docs/refit_dtype.json and its section.

Run: python -m bench.bench_refit [--parents default,gemma3-270m] [--tokens 4096] [--refit-tokens 1024,...]
     [--refit-dtypes float32,bfloat16] [--smoke]
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Iterator

from bench._report import AGGRESSIVE, DOCS, PAPER_LIKE, bench_parser, machine, render, write_section
from subclone_core.core import archs
from subclone_core.core.strategies import plan_shape
from subclone_core.io.atomic import write_text
from subclone_core.sources import load_parent, make_data
from subclone_core.training.evaluate import evaluate
from subclone_core.workflow.children import make_child, measure_importance
from subclone_core.workflow.shapes import starting_shape

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
SIZE_KEYS = ("layers", "hidden", "heads", "kv_heads", "ffn")


@contextlib.contextmanager
def with_table(model_type: str, fields: dict) -> Iterator[None]:
    """The family's table with some refit fields replaced, until the block ends."""
    old = archs.REGISTRY[model_type]
    archs.REGISTRY[model_type] = dataclasses.replace(old, **fields)
    try:
        yield
    finally:
        archs.REGISTRY[model_type] = old


def step0(parent, target, val, tag: str, fields: dict | None = None, **options) -> dict:
    """Make one child (under the refit table ``fields``, if any) and take its step-0 validation loss; the
    seconds of both, printed with ``tag``."""
    start = time.perf_counter()
    with with_table(parent.model.config.model_type, fields or {}):
        child = make_child(parent, target, **options)
    result = {"loss": evaluate(child.model, val.batches(8))["loss"], "seconds": time.perf_counter() - start}
    print(f"{tag}: {result['loss']:.3f} ({result['seconds']:.0f} s)", flush=True)
    return result


def measure_parent(parent_id: str, tokens: int, shapes: list[dict]) -> dict:
    """Step-0 validation loss of every variant and of random init, per shape."""
    parent = load_parent(parent_id)
    importance = measure_importance(parent, "default", tokens=tokens)
    val = make_data(parent, "default", "validation", seq_len=128, max_tokens=tokens)
    rows = []
    for sizes in shapes:
        target, row = plan_shape(parent.model, **sizes), {"shape": sizes}
        for name, (_, fields) in VARIANTS.items():
            row[name] = step0(parent, target, val, f"{parent_id} {sizes} {name}", fields, importance=importance,
                              data_id="default", calib_tokens=tokens, refit=fields is not None)
        random = make_child(parent, target, strategy="random")
        row["random"] = {"loss": evaluate(random.model, val.batches(8))["loss"]}
        rows.append(row)
    return {"parent": parent_id, "label": parent.label, "tokens": tokens, "rows": rows}


def measure_arms(parent_id: str, tokens: int, arms: dict[str, dict], shapes: list[dict]) -> dict:
    """Step-0 validation loss and build seconds of the family's default child made with each arm's make_child
    options (a refit token count, a refit dtype; one calibration on ``tokens`` chooses what every child keeps), per
    shape: the Child page's starting shape first."""
    parent = load_parent(parent_id)
    importance = measure_importance(parent, "default", tokens=tokens)
    val = make_data(parent, "default", "validation", seq_len=128, max_tokens=4096)
    start = starting_shape(parent.model)
    starting = {k: getattr(start, k) for k in SIZE_KEYS}
    rows = []
    for sizes in [starting, *(s for s in shapes if s != starting)]:  # SmolLM2's paper-like shape is its start
        target = plan_shape(parent.model, **sizes)
        row = {"shape": sizes, "start": target == start}
        for arm, options in arms.items():
            row[arm] = step0(parent, target, val, f"{parent_id} {sizes} refit {arm}", importance=importance,
                             data_id="default", **{"calib_tokens": tokens, **options})
        rows.append(row)
    return {"parent": parent_id, "label": parent.label, "tokens": tokens, "rows": rows}


def shape_text(s: dict) -> str:
    """A child's shape in a table cell: "20 x 384, 6/2 heads, FFN 1024"."""
    return f"{s['layers']} x {s['hidden']}, {s['heads']}/{s['kv_heads']} heads, FFN {s['ffn']}"


def tokens_markdown(report: dict) -> str:
    """The "bench_refit_tokens" section (template bench/templates/bench_refit_tokens.md.j2): loss and seconds per
    refit token count, and each count's difference from the calibration's own."""
    return render("bench_refit_tokens", **{"notes": "", **report}, shape=shape_text)


def dtype_markdown(report: dict) -> str:
    """The "bench_refit_dtype" section (template bench/templates/bench_refit_dtype.md.j2)."""
    return render("bench_refit_dtype", **{"notes": "", **report}, shape=shape_text)


def markdown(report: dict) -> str:
    """The "bench_refit" section of docs/BENCHMARKS.md (template bench/templates/bench_refit.md.j2)."""
    return render("bench_refit", **{"notes": "", **report}, variants=VARIANTS, shape=shape_text)


def main() -> int:
    parser = bench_parser(__doc__, smoke="one shape of the default parent, 512 tokens, no docs",
                          report_only="rewrite the section from docs/refit_variants.json")
    parser.add_argument("--parents", default="default,gemma3-270m")
    parser.add_argument("--tokens", type=int, default=4096)
    arms = parser.add_mutually_exclusive_group()
    arms.add_argument("--refit-tokens", default=None, help="comma-separated refit token counts, e.g. 1024,4096")
    arms.add_argument("--refit-dtypes", default=None, help="comma-separated refit dtypes, e.g. float32,bfloat16")
    args = parser.parse_args()
    parents = ["default"] if args.smoke else args.parents.split(",")
    tokens = 512 if args.smoke else args.tokens
    by_tokens, by_dtype = args.refit_tokens is not None, args.refit_dtypes is not None
    name, section = ("refit_tokens", "bench_refit_tokens") if by_tokens else ("refit_variants", "bench_refit")
    markdown_of = tokens_markdown if by_tokens else markdown
    if by_dtype:
        name, section = "refit_dtype", "bench_refit_dtype"
        markdown_of = dtype_markdown
    if args.report_only:
        write_section(section, markdown_of(json.loads((DOCS / f"{name}.json").read_text())))
        return 0
    if by_tokens:
        try:
            counts = [int(c) for c in args.refit_tokens.split(",")]
        except ValueError:
            raise SystemExit(f"--refit-tokens {args.refit_tokens!r} is not a list of counts like 1024,4096") from None
        arms = {str(count): {"calib_tokens": count} for count in counts}
        results = [measure_arms(p, tokens, arms, [] if args.smoke else SHAPES[p]) for p in parents]
        report = {"tokens": tokens, "refit_tokens": counts, "machine": machine(), "results": results}
    elif by_dtype:
        dtypes = args.refit_dtypes.split(",")
        arms = {dtype: {"refit_dtype": dtype} for dtype in dtypes}
        results = [measure_arms(p, tokens, arms, [] if args.smoke else SHAPES[p]) for p in parents]
        report = {"tokens": tokens, "refit_dtypes": dtypes, "machine": machine(), "results": results}
    else:
        results = [measure_parent(p, tokens, SHAPES[p][-1:] if args.smoke else SHAPES[p]) for p in parents]
        report = {"tokens": tokens, "machine": machine(), "results": results}
    if not args.smoke:
        write_text(DOCS / f"{name}.json", json.dumps(report, indent=1))
        write_section(section, markdown_of(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
