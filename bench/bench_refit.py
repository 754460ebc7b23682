"""The least-squares refit's variants (whose inputs, towards what) on the embedded real parents, at step 0 (see
bench/README.md): docs/refit_variants.json and its section of docs/BENCHMARKS.md; with --refit-tokens or
--refit-dtypes, the family's own refit on each token count or in each dtype instead: docs/refit_tokens.json or
docs/refit_dtype.json and its section.

Run: python -m bench.bench_refit [--parents default,gemma3-270m] [--tokens 4096] [--smoke] [--report-only]
     [--refit-tokens 1024,2048,4096,8192 | --refit-dtypes float32,bfloat16]
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Iterator
from functools import partial

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
VARIANT_ARMS = {name: (fields, {"refit": fields is not None}) for name, (_, fields) in VARIANTS.items()}


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


def measure(parent_id: str, tokens: int, arms: dict[str, tuple[dict | None, dict]], smoke: bool,
            variants: bool) -> dict:
    """Step-0 validation loss of children of one parent, one calibration on ``tokens`` choosing what each keeps,
    made with each arm's refit table fields and make_child options, per shape. The variants report
    (VARIANT_ARMS) adds random init and validates on ``tokens`` tokens; the others validate on 4,096, the Child
    page's start first."""
    parent = load_parent(parent_id)
    importance = measure_importance(parent, "default", tokens=tokens)
    val = make_data(parent, "default", "validation", seq_len=128, max_tokens=tokens if variants else 4096)
    start = starting_shape(parent.model)
    starting, shapes = {k: v for k, v in start.as_dict().items() if k != "head_dim"}, SHAPES[parent_id]
    if not variants:  # the Child page's starting shape first (SmolLM2's paper-like shape is its start)
        shapes = [starting, *(s for s in shapes if s != starting)]
    rows = []
    for sizes in (shapes[-1:] if variants else shapes[:1]) if smoke else shapes:
        target = plan_shape(parent.model, **sizes)
        row = {"shape": sizes} if variants else {"shape": sizes, "start": target == start}
        for name, (fields, options) in arms.items():
            row[name] = step0(parent, target, val, f"{parent_id} {sizes} {name}", fields, importance=importance,
                              data_id="default", **{"calib_tokens": tokens, **options})
        if variants:
            random = make_child(parent, target, strategy="random")
            row["random"] = {"loss": evaluate(random.model, val.batches(8))["loss"]}
        rows.append(row)
    return {"parent": parent_id, "label": parent.label, "tokens": tokens, "rows": rows}


def shape_text(s: dict) -> str:
    """A child's shape in a table cell: "20 x 384, 6/2 heads, FFN 1024"."""
    return f"{s['layers']} x {s['hidden']}, {s['heads']}/{s['kv_heads']} heads, FFN {s['ffn']}"


def markdown(report: dict, section: str = "bench_refit") -> str:
    """A section of docs/BENCHMARKS.md drawn by its template (bench/templates/SECTION.md.j2) from its report: the
    variants', or (tokens_markdown, dtype_markdown) the refit token counts' or dtypes'."""
    return render(section, **{"notes": "", **report}, variants=VARIANTS, shape=shape_text)


tokens_markdown = partial(markdown, section="bench_refit_tokens")
dtype_markdown = partial(markdown, section="bench_refit_dtype")
# which report (by its flag): its JSON under docs/, its section and the make_child option its arms vary
REPORTS = {"variants": ("refit_variants", "bench_refit", None),
           "refit_tokens": ("refit_tokens", "bench_refit_tokens", "calib_tokens"),
           "refit_dtypes": ("refit_dtype", "bench_refit_dtype", "refit_dtype")}


def main() -> int:
    """Measure one report's children on each parent, or redraw its section from its JSON."""
    parser = bench_parser(__doc__, smoke="one shape of the default parent, 512 tokens, no docs",
                          report_only="rewrite the section from the saved JSON")
    parser.add_argument("--parents", default="default,gemma3-270m")
    parser.add_argument("--tokens", type=int, default=4096)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--refit-tokens", type=lambda s: [int(c) for c in s.split(",")],
                      help="comma-separated refit token counts, e.g. 1024,4096")
    which.add_argument("--refit-dtypes", type=lambda s: s.split(","), help="comma-separated dtypes: float32,bfloat16")
    args = parser.parse_args()
    kind = "refit_tokens" if args.refit_tokens else "refit_dtypes" if args.refit_dtypes else "variants"
    name, section, option = REPORTS[kind]
    if args.report_only:
        write_section(section, markdown(json.loads((DOCS / f"{name}.json").read_text()), section))
        return 0
    values = getattr(args, kind, None)
    arms = {str(value): (None, {option: value}) for value in values} if option else VARIANT_ARMS
    parents, tokens = (["default"], 512) if args.smoke else (args.parents.split(","), args.tokens)
    results = [measure(parent, tokens, arms, args.smoke, variants=option is None) for parent in parents]
    report = {"tokens": tokens, **({kind: values} if option else {}), "machine": machine(), "results": results}
    if not args.smoke:
        write_text(DOCS / f"{name}.json", json.dumps(report, indent=1))
        write_section(section, markdown(report, section))
    return 0


if __name__ == "__main__":
    sys.exit(main())
