"""Published ways to cut a small model out of a big one, side by side at step 0 on the embedded real parents
(see bench/README.md). Writes docs/methods.json and a section of docs/BENCHMARKS.md.

Run: python -m bench.bench_methods [--parents default,gemma3-270m] [--smoke]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from bench._report import DOCS, bench_parser, fmt_value, machine, render, table, write_section
from subclone_core.core.errors import SubcloneError
from subclone_core.core.shape import Shape, nearest_valid_shape
from subclone_core.core.strategies import plan_shape
from subclone_core.io.atomic import write_text
from subclone_core.sources import Parent, load_parent, make_data
from subclone_core.training.evaluate import evaluate
from subclone_core.workflow.children import make_child, measure_importance, recorded_statistics

RATIOS = (0.8, 0.6, 0.4)
WIDTH_METHODS = ("subclone", "grail", "wanda-sp", "flap", "minitron", "random")
HIDDEN_METHODS = ("subclone", "slicegpt", "random")
DEPTH_METHODS = ("subclone", "shortgpt", "minitron", "random")
WINDOWS = (128, 2048)
SECTION = "## Other methods at step 0 on the real parents (bench_methods.py)"


def rows_of(parent: Parent, ratios: tuple[float, ...]) -> list[dict[str, Any]]:
    """The shapes: (kind, sizes, methods) for each width ratio, each hidden-only ratio and the depth cut."""
    base = Shape.of(parent.model.config)
    rows = []
    for ratio in ratios:
        want = {k: max(1, round(getattr(base, k) * ratio)) for k in ("hidden", "heads", "kv_heads", "ffn")}
        rows.append(("width", ratio, _sizes(nearest_valid_shape(parent.model, want)), WIDTH_METHODS))
    for ratio in ratios:
        hidden = max(base.heads, round(base.hidden * ratio / base.heads) * base.heads)  # transformers: heads | hidden
        rows.append(("hidden", ratio, _sizes(plan_shape(parent.model, "slicegpt", hidden=hidden)), HIDDEN_METHODS))
    depth = _sizes(plan_shape(parent.model, layers=max(1, round(base.layers * 2 / 3))))
    rows.append(("depth", 2 / 3, depth, DEPTH_METHODS))
    return [{"kind": k, "ratio": r, "sizes": s, "methods": m} for k, r, s, m in rows]


def _sizes(shape: Shape) -> dict[str, int]:
    return {k: getattr(shape, k) for k in ("layers", "hidden", "heads", "kv_heads", "ffn")}


def measure(parent: Parent, importance: Any, vals: dict[int, Any], row: dict[str, Any], tokens: int) -> dict:
    """Each method's child of one shape: losses at each window, parameters and build seconds, or the refusal."""
    target = plan_shape(parent.model, **row["sizes"])
    out = {}
    for method in row["methods"]:
        start = time.perf_counter()
        try:
            child = make_child(parent, target, strategy=method, importance=importance, data_id=importance.data,
                               calib_tokens=tokens).model
        except SubcloneError as err:
            out[method] = {"refused": str(err)}
            continue
        built = time.perf_counter() - start
        losses = {str(w): evaluate(child, vals[w].batches(max(1, 2048 // w)))["loss"] for w in WINDOWS}
        out[method] = {"losses": losses, "params": sum(p.numel() for p in child.parameters()), "seconds": built}
        print(f"  {row['kind']} {row['ratio']:.2f} {method}: " + ", ".join(
            f"{w} {fmt_value(v)}" for w, v in losses.items()) + f" ({built:.0f} s)", file=sys.stderr, flush=True)
        del child
    return {**{k: v for k, v in row.items() if k != "methods"}, "results": out}


def run_parent(parent_id: str, tokens: int, val_tokens: int, ratios: tuple[float, ...]) -> dict:
    """One parent: one calibration with every statistic the methods read, then every row."""
    parent = load_parent(parent_id, dtype="float32")
    print(f"{parent.label}", file=sys.stderr, flush=True)
    every = WIDTH_METHODS + HIDDEN_METHODS + DEPTH_METHODS
    importance = measure_importance(parent, tokens=tokens, **recorded_statistics(every))
    vals = {w: make_data(parent, "default", "validation", seq_len=w, max_tokens=val_tokens) for w in WINDOWS}
    parent_losses = {str(w): evaluate(parent.model, vals[w].batches(max(1, 2048 // w)))["loss"] for w in WINDOWS}
    rows = [measure(parent, importance, vals, row, tokens) for row in rows_of(parent, ratios)]
    return {"parent": parent_id, "label": parent.label, "parent_losses": parent_losses,
            "parent_params": sum(p.numel() for p in parent.model.parameters()), "rows": rows}


def markdown(report: dict) -> str:
    """The section (template bench/templates/methods.md): per parent, one table of step-0 losses (128 / 2048
    windows) per shape and method."""
    parents = ""
    for p in report["parents"]:
        methods = list(dict.fromkeys(m for r in p["rows"] for m in r["results"]))
        body = [[r["kind"], f"{r['ratio']:.2f}", _shape(r["sizes"]), *(_cell(r["results"].get(m)) for m in methods)]
                for r in p["rows"]]
        parents += (f"**{p['label']}** (parent: {_pair(p['parent_losses'])})\n\n"
                    f"{table(['cut', 'ratio', 'shape', *methods], body)}\n\n")
    return render("methods", **{**report, "section": SECTION, "parents": parents})


def _shape(s: dict[str, int]) -> str:
    return f"{s['layers']} x {s['hidden']} ({s['heads']}/{s['kv_heads']}, FFN {s['ffn']})"


def _pair(losses: dict[str, float]) -> str:
    return " / ".join(fmt_value(losses[str(w)]) for w in WINDOWS)


def _cell(result: dict | None) -> str:
    if result is None:
        return "-"
    return "refused" if "refused" in result else _pair(result["losses"])


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, smoke="bench_scale's tiny random parent, one ratio; writes under --out-dir",
                          report_only="rewrite the section from docs/methods.json")
    parser.add_argument("--parents", default="default,gemma3-270m")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--val-tokens", type=int, default=8192)
    parser.add_argument("--out-dir", default=None, help="where methods.json goes (default: docs/, with the section)")
    args = parser.parse_args(argv)
    if args.report_only:
        write_section("bench_methods", markdown(json.loads((DOCS / "methods.json").read_text())))
        return 0
    out = Path(args.out_dir) if args.out_dir else DOCS
    parents = [_smoke_parent(out)] if args.smoke else args.parents.split(",")
    tokens, val_tokens = (512, 4096) if args.smoke else (args.tokens, args.val_tokens)
    report = {"tokens": tokens, "val_tokens": val_tokens, "machine": machine(),
              "parents": [run_parent(p, tokens, val_tokens, (0.5,) if args.smoke else RATIOS) for p in parents]}
    write_text(out / "methods.json", json.dumps(report, indent=1))
    if out == DOCS:
        write_section("bench_methods", markdown(report))
    return 0


def _smoke_parent(out: Path) -> str:
    """bench_scale's tiny random Llama, written into the output folder."""
    from bench.bench_scale import write_parent

    write_parent(out / "tiny-parent", "tiny")
    return str(out / "tiny-parent")


if __name__ == "__main__":
    raise SystemExit(main())
