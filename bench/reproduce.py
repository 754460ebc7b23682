"""Reproduce the weight-subcloning paper's findings on the embedded defaults: docs/REPRODUCTION.md + plots, every
number also in docs/reproduction/results.json, from which ``--from-json`` redraws both (see bench/README.md).
Sizes: ``cpu`` (the default: about 27 minutes on 2 idle cores), ``smoke`` (seconds on tiny models).

Run: make reproduce, or python -m bench.reproduce [--size smoke ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import _harness as h
from bench._harness import Arm, Budget
from bench._report import DOCS, SHAPES, THREADS_HELP, bench_parser, machine
from bench._repro_measure import Study, analyze_parent, run_study, step0_table, validation_batches
from bench._repro_report import draw_all, render
from subclone_core.io.atomic import write_text
from subclone_core.sources import Parent, load_parent

SEEDS = (0, 1)
HIGH_WD = 0.1  # random init's weight decay, tried on the subcloned child (finding 6)


@dataclass(frozen=True)
class Size:
    """Budgets of one size of the reproduction."""

    calib_tokens: int  # calibration token positions per seed (a ViT image counts patches + cls)
    analysis_tokens: int  # validation tokens for block removal and the step-0 tables
    analysis_images: int  # validation images for the same, ViT
    lm: Budget
    lm_eval_at: tuple[int, ...]
    lm_shapes: dict[str, dict[str, int]]  # step-0 table shapes; the first one is trained
    vit: Budget
    vit_eval_at: tuple[int, ...]
    lm_lrs: dict[str, tuple[float, ...]]
    vit_lrs: dict[str, tuple[float, ...]]
    max_reruns: int


SIZES = {
    # 2 CPU cores: the paper-like child trains at ~1.2 s per 4 x 128-token step (its 49,152-word head
    # dominates), so each LM run is 40 steps; evaluations at steps 1-3 resolve how fast a child gets ahead.
    "cpu": Size(calib_tokens=4096, analysis_tokens=2048, analysis_images=1000,
                lm=Budget(steps=40, eval_every=5, batch_size=4, seq_len=128, val_tokens=2048),
                lm_eval_at=(1, 2, 3), lm_shapes=SHAPES,
                vit=Budget(steps=200, eval_every=10, batch_size=64, val_images=500, eval_batch_size=250),
                vit_eval_at=(2, 5),
                lm_lrs={"random": (1e-3, 3e-3), "subclone": (1e-4, 3e-4, 1e-3, 3e-3)},
                vit_lrs={"random": (1e-3, 2e-3), "subclone": (1e-4, 3e-4, 1e-3)}, max_reruns=6),
    "smoke": Size(calib_tokens=256, analysis_tokens=256, analysis_images=64,
                  lm=Budget(steps=4, eval_every=2, batch_size=2, seq_len=32, val_tokens=128),
                  lm_eval_at=(1,), lm_shapes=h.SMOKE_SHAPES,
                  vit=Budget(steps=4, eval_every=2, batch_size=16, val_images=64), vit_eval_at=(1,),
                  lm_lrs={"random": (1e-3,), "subclone": (1e-4, 1e-3)},
                  vit_lrs={"random": (1e-3,), "subclone": (1e-4, 1e-3)}, max_reruns=6),
}

# Every initialization the findings compare: name -> (label, make_child strategy, options, weight decay).
PLAIN = {"scale": False, "drop": "magnitude"}
LM_ARMS = {
    "random": ("random init", "random", {}, None),
    "subclone": ("subclone (no scaling, tied head, drop by magnitude)", "subclone", PLAIN, None),
    "subclone-wd": (f"subclone, weight decay {HIGH_WD:g}", "subclone", PLAIN, HIGH_WD),
    "scaled": ("subclone + scaling (tied unscaled head)", "subclone", {"scale": True, "drop": "magnitude"}, None),
    "scaled-untied": ("subclone + scaling, untied scaled head", "subclone",
                      {"scale": True, "drop": "magnitude", "untie_head": True}, None),
    "middle": ("subclone, drop a middle span", "subclone", {"scale": False, "drop": "middle"}, None),
    "first-blocks": ("subclone, keep the first N blocks", "subclone", {"scale": False, "drop": "first"}, None),
    "first-k": ("first-k (no reordering)", "first-k", PLAIN, None),
    "uniform": ("uniform (weight selection)", "uniform", {"scale": False}, None),
}
VIT_ARMS = {  # the ViT family's default is scaling on
    "random": ("random init", "random", {}, None),
    "subclone": ("subclone (scaling on)", "subclone", {"scale": True}, None),
    "unscaled": ("subclone, scaling off", "subclone", {"scale": False}, None),
    "subclone-wd": (f"subclone, weight decay {HIGH_WD:g}", "subclone", {"scale": True}, HIGH_WD),
    "first-k": ("first-k (no reordering), scaling on", "first-k", {"scale": True, "drop": "middle"}, None),
    "uniform": ("uniform (weight selection)", "uniform", {"scale": False}, None),
}
# finding -> the arms it compares
LM_COMPARISONS = {"scaling": ("subclone", "scaled"), "reordering": ("subclone", "first-k", "uniform", "random"),
                  "weight-decay": ("subclone", "subclone-wd"), "block-policy": ("subclone", "middle", "first-blocks"),
                  "tied-head": ("scaled", "scaled-untied"), "headline": ("random", "subclone")}
VIT_COMPARISONS = {"scaling": ("subclone", "unscaled"), "reordering": ("subclone", "first-k", "uniform", "random"),
                   "weight-decay": ("subclone", "subclone-wd"), "headline": ("random", "subclone")}


def arms(table: dict[str, tuple], lrs: dict[str, tuple[float, ...]]) -> tuple[Arm, ...]:
    """The arms of LM_ARMS or VIT_ARMS; those with a grid in ``lrs`` (random, subclone) get lr sweeps."""
    return tuple(Arm(name, label, strategy, options, lrs=lrs.get(name), weight_decay=decay)
                 for name, (label, strategy, options, decay) in table.items())


def lm_arms(lrs: dict[str, tuple[float, ...]]) -> tuple[Arm, ...]:
    """The language model's arms."""
    return arms(LM_ARMS, lrs)


def make_study(key: str, parent: Parent, data_id: str, size: Size) -> Study:
    """The language model trains the paper-like child (both ratios at step 0); the ViT, as in the paper, a child
    of the same depth at half the width (hidden and FFN). A gap below ``close`` on seed 0 gets a second seed."""
    if key == "lm":
        return Study("lm", data_id, size.lm_shapes, size.lm, size.lm_eval_at, lm_arms(size.lm_lrs), LM_COMPARISONS,
                     close=0.1, max_reruns=size.max_reruns)
    half = {"hidden": parent.model.config.hidden_size // 2, "ffn": parent.model.config.intermediate_size // 2}
    return Study("vit", data_id, {"half-width": half}, size.vit, size.vit_eval_at, arms(VIT_ARMS, size.vit_lrs),
                 VIT_COMPARISONS, close=0.01, max_reruns=size.max_reruns)


def run_part(parent: Parent, key: str, data_id: str, size: Size, runs: Path) -> dict[str, Any]:
    """Parent analyses, step-0 tables at every shape, and the training study at the first shape."""
    start = time.perf_counter()
    study = make_study(key, parent, data_id, size)
    analysis, importances = analyze_parent(parent, study.data_id, calib_tokens=size.calib_tokens,
                                           val_tokens=size.analysis_tokens, val_images=size.analysis_images,
                                           seeds=SEEDS)
    print(f"[{parent.id}] step-0 values", file=sys.stderr, flush=True)
    untrained = tuple(a for a in study.arms if a.weight_decay is None)  # weight decay changes nothing at step 0
    step0 = step0_table(parent, importances, study.shapes, untrained,
                        validation_batches(parent, study.data_id, size.analysis_tokens, size.analysis_images))
    training = run_study(parent, study, importances, SEEDS, runs)
    return {"parent": parent.label, "parent_id": parent.id, "data": study.data_id, "analysis": analysis,
            "step0": step0, "step0_shapes": {k: dict(v) for k, v in study.shapes.items()}, "training": training,
            "minutes": (time.perf_counter() - start) / 60}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Both parts (the ViT's unless --vit-parent none), with the machine, its load and the minutes taken."""
    h.start(args)
    size = SIZES[args.size]
    start = time.perf_counter()
    runs = Path(tempfile.mkdtemp(prefix="subclone-reproduce-"))
    results: dict[str, Any] = {"size": args.size, "machine": machine(), "seeds": list(SEEDS),
                               "load_average": os.getloadavg()[0], "high_wd": HIGH_WD}
    for key, parent_id, data_id in (("lm", args.parent, args.data), ("vit", args.vit_parent, args.image_data)):
        results[key] = None if parent_id == "none" else run_part(load_parent(parent_id), key, data_id, size, runs)
    results["minutes"] = (time.perf_counter() - start) / 60
    results["load_average_end"] = os.getloadavg()[0]
    return results


def with_budget(results: dict[str, Any], budget: Path) -> dict[str, Any]:
    """The results plus bench_budget.py's (key "lm-budget") when that file exists: a separate, longer
    measurement of the same parent, reported next to the short-budget headline, never stored in results.json."""
    return {**results, "lm-budget": json.loads(budget.read_text())} if budget.is_file() else results


def main(argv: list[str] | None = None) -> Path:
    """Measure (or read --from-json), then write the results, the plots and the report; returns the report."""
    parser = bench_parser(__doc__, threads=THREADS_HELP)
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--parent", default="default", help="the language-model parent (default: default)")
    parser.add_argument("--data", default="default", help="its text data (default: default)")
    parser.add_argument("--vit-parent", default="default-vit", help="the image parent, or 'none' to skip")
    parser.add_argument("--image-data", default="fashion-mnist", help="its image data (default: fashion-mnist)")
    parser.add_argument("--out", type=Path, default=DOCS / "REPRODUCTION.md", help="the report to write")
    parser.add_argument("--from-json", type=Path, help="redraw the report and plots from a results.json")
    parser.add_argument("--budget", type=Path, default=DOCS / "speedup_vs_budget.json",
                        help="bench_budget.py's results, for finding 9 at a longer budget (skipped if absent)")
    args = parser.parse_args(argv)
    figures = args.out.parent / "reproduction"
    if args.from_json:
        results = json.loads(args.from_json.read_text())
    else:
        results = measure(args)
        write_text(figures / "results.json", json.dumps(results, indent=None, separators=(",", ":")))
    draw_all(results, figures)
    write_text(args.out, render(with_budget(results, args.budget), figures.name))
    print(f"wrote {args.out} and {figures}/ ({results['minutes']:.1f} min)", file=sys.stderr)
    return args.out


if __name__ == "__main__":
    main()
