"""Reproduce the weight-subcloning paper's findings on the embedded defaults (docs/REPRODUCTION.md and plots).

Every number is saved in docs/reproduction/results.json, from which ``--from-json`` redraws. Sizes: ``cpu`` (about
27 minutes on 2 idle cores), ``smoke`` (seconds on tiny models). Run: make reproduce, or python -m bench.reproduce.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from bench import _harness as h
from bench._harness import Arm, Budget
from bench._report import DOCS, SHAPES, THREADS_HELP, bench_parser, log, machine, spearman
from bench._repro_report import draw_all, render
from subclone_core.analysis.probes import block_ablation, off_diagonal_mean, rank_correlation
from subclone_core.core.calibration import Importance
from subclone_core.core.strategies import plan_shape
from subclone_core.io.atomic import write_text
from subclone_core.pipeline.calibration import calibrate
from subclone_core.sources import Parent, load_parent, make_data
from subclone_core.training.evaluate import evaluate
from subclone_core.training.speedup import HIGHER_IS_BETTER, speedup
from subclone_core.training.sweep import candidate_of
from subclone_core.workflow.children import CALIB_BATCH, CALIB_SEQ_LEN, make_child

SEEDS = (0, 1)
HIGH_WD = 0.1  # random init's weight decay, tried on the subcloned child (finding 6)
CALIB_POOL = 4  # a seed's calibration sample is drawn from this many times the budget of training data
CLOSE = {"lm": 0.1, "vit": 0.01}  # a gap in best value below this on seed 0 gets a second seed...
MAX_RERUNS = 6  # ...for at most this many arms


@dataclass(frozen=True)
class Size:
    """Budgets of one size; ``budget``, ``eval_at`` (extra evaluations) and ``lrs`` (grids) per part, lm or vit."""

    calib_tokens: int  # calibration token positions per seed (a ViT image counts patches + cls)
    analysis_tokens: int  # validation tokens for block removal and the step-0 tables
    analysis_images: int  # validation images for the same, ViT
    lm_shapes: dict[str, dict[str, int]]  # step-0 table shapes; the first one is trained
    budget: dict[str, Budget]
    eval_at: dict[str, tuple[int, ...]]
    lrs: dict[str, dict[str, tuple[float, ...]]]


SIZES = {
    # 2 CPU cores: the paper-like child trains at ~1.2 s per 4 x 128-token step (its 49,152-word head
    # dominates), so each LM run is 40 steps; evaluations at steps 1-3 resolve how fast a child gets ahead.
    "cpu": Size(calib_tokens=4096, analysis_tokens=2048, analysis_images=1000, lm_shapes=SHAPES,
                budget={"lm": Budget(steps=40, eval_every=5, batch_size=4, seq_len=128, val_tokens=2048),
                        "vit": Budget(steps=200, eval_every=10, batch_size=64, val_images=500, eval_batch_size=250)},
                eval_at={"lm": (1, 2, 3), "vit": (2, 5)},
                lrs={"lm": {"random": (1e-3, 3e-3), "subclone": (1e-4, 3e-4, 1e-3, 3e-3)},
                     "vit": {"random": (1e-3, 2e-3), "subclone": (1e-4, 3e-4, 1e-3)}}),
    "smoke": Size(calib_tokens=256, analysis_tokens=256, analysis_images=64, lm_shapes=h.SMOKE_SHAPES,
                  budget={"lm": Budget(steps=4, eval_every=2, batch_size=2, seq_len=32, val_tokens=128),
                          "vit": Budget(steps=4, eval_every=2, batch_size=16, val_images=64)},
                  eval_at={"lm": (1,), "vit": (1,)},
                  lrs={part: {"random": (1e-3,), "subclone": (1e-4, 1e-3)} for part in ("lm", "vit")}),
}

# Per part, every initialization the findings compare: name -> (label, make_child strategy, options, weight decay).
PLAIN = {"scale": False, "drop": "magnitude"}
ARMS = {"lm": {
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
}, "vit": {  # the ViT family's default is scaling on
    "random": ("random init", "random", {}, None),
    "subclone": ("subclone (scaling on)", "subclone", {"scale": True}, None),
    "unscaled": ("subclone, scaling off", "subclone", {"scale": False}, None),
    "subclone-wd": (f"subclone, weight decay {HIGH_WD:g}", "subclone", {"scale": True}, HIGH_WD),
    "first-k": ("first-k (no reordering), scaling on", "first-k", {"scale": True, "drop": "middle"}, None),
    "uniform": ("uniform (weight selection)", "uniform", {"scale": False}, None),
}}
# Per part, finding -> the arms it compares
COMPARISONS = {"lm": {"scaling": ("subclone", "scaled"), "reordering": ("subclone", "first-k", "uniform", "random"),
                      "weight-decay": ("subclone", "subclone-wd"),
                      "block-policy": ("subclone", "middle", "first-blocks"),
                      "tied-head": ("scaled", "scaled-untied"), "headline": ("random", "subclone")},
               "vit": {"scaling": ("subclone", "unscaled"), "reordering": ("subclone", "first-k", "uniform", "random"),
                       "weight-decay": ("subclone", "subclone-wd"), "headline": ("random", "subclone")}}


def arms(part: str, lrs: dict[str, tuple[float, ...]]) -> tuple[Arm, ...]:
    """A part's arms; those with a grid in ``lrs`` (random, subclone) get lr sweeps."""
    return tuple(Arm(name, label, strategy, options, lrs=lrs.get(name), weight_decay=decay)
                 for name, (label, strategy, options, decay) in ARMS[part].items())


def calibrate_seed(parent: Parent, data_id: str, tokens: int, seed: int) -> Importance:
    """Importance from a calibration sample drawn by ``seed`` out of a pool of training data."""
    pool = make_data(parent, data_id, "train", seq_len=CALIB_SEQ_LEN, max_tokens=tokens * CALIB_POOL,
                     max_images=max(1, tokens * CALIB_POOL // 2))
    return calibrate(parent.model, pool.batches(CALIB_BATCH, shuffle=True, seed=seed), max_tokens=tokens,
                     data=f"{data_id}, seed {seed}")


def validation_batches(parent: Parent, data_id: str, tokens: int, images: int) -> list[dict]:
    """The fixed validation slice of the analyses and step-0 tables."""
    val = make_data(parent, data_id, "validation", seq_len=128, max_tokens=tokens, max_images=images)
    return list(val.batches(8 if parent.task_spec.sequences else 100))


def _rounded(values: torch.Tensor, digits: int = 5) -> list[float]:
    return [float(f"{v:.{digits}g}") for v in values.tolist()]


def top_share(scores: torch.Tensor, fraction: float = 0.01) -> float:
    """The share of the total score held by the top ``fraction`` of entries (uniform scores: ``fraction``)."""
    flat = scores.double().flatten().sort(descending=True).values
    return float(flat[:max(1, math.ceil(fraction * flat.numel()))].sum() / flat.sum().clamp_min(1e-30))


def analyze_parent(parent: Parent, importances: dict[int, Importance], batches: list[dict]) -> dict[str, Any]:
    """Findings 1-3 on a parent: relative magnitude, single-block removal, neuron-score consistency."""
    first = importances[SEEDS[0]]
    blocks = first.residual_block  # (L, D): the mean |block output| per residual neuron
    layers = blocks.shape[0]
    corr = rank_correlation(blocks)
    # an early block against the middle one, the middle one against a late one
    mid, early, late = layers // 2, min(1, layers - 1), max(layers - 2, 0)
    pairs = [(early, mid), (mid, late)] if layers > 2 else [(0, layers - 1)]
    log(f"[{parent.id}] single-block removal over {layers} blocks")
    ablation = block_ablation(parent.model, batches)
    return {"layers": layers, "calib_tokens": first.tokens,
            "rel_magnitude": {str(s): _rounded(imp.rel_magnitude) for s, imp in importances.items()},
            "one_minus_cos": _rounded(first.one_minus_cos), "ablation": ablation,
            "magnitude_vs_removal_spearman": spearman(first.rel_magnitude, torch.tensor(ablation["losses"])),
            "rank_corr": [_rounded(row, 4) for row in corr], "rank_corr_off_diagonal": off_diagonal_mean(corr),
            "rank_corr_adjacent": float(corr.diagonal(1).mean()) if layers > 1 else 1.0,
            "scatter": [{"a": a, "b": b, "x": _rounded(blocks[a], 4), "y": _rounded(blocks[b], 4),
                         "spearman": float(corr[a, b])} for a, b in pairs],
            "residual_sorted": _rounded(first.residual.sort(descending=True).values, 4),
            "residual_top1_share": top_share(first.residual),
            "ffn_top1_share": sum(top_share(row) for row in first.ffn) / layers,
            "residual_dims": int(first.residual.numel()),
            "seed_agreement": spearman(first.residual, importances[SEEDS[-1]].residual)}


def step0_table(parent: Parent, importances: dict[int, Importance], shapes: dict[str, dict[str, int]],
                untrained: list[Arm], batches: list[dict]) -> list[dict[str, Any]]:
    """Validation loss (and accuracy) of every arm's untrained child, per child shape and calibration seed."""
    metric = parent.task_spec.metric  # "loss", or "accuracy" beside it
    rows = []
    for shape_key, sizes in shapes.items():
        target = plan_shape(parent.model, **sizes)
        for seed, importance in importances.items():
            for arm in untrained:
                child = make_child(parent, target, strategy=arm.strategy, importance=importance, seed=seed,
                                   **arm.options)
                result = evaluate(child.model, batches)
                rows.append({"shape": shape_key, "seed": seed, "arm": arm.name, "loss": result["loss"],
                             metric: result[metric], "removed_blocks": child.manifest.removed_blocks})
                del child  # one child in memory at a time
    return rows


def run_study(parent: Parent, part: str, data_id: str, size: Size, shapes: dict[str, dict[str, int]],
              importances: dict[int, Importance], runs_dir: Path) -> dict[str, Any]:
    """Train the first shape's child every way: sweep, ablate, then rerun close comparisons with the second seed."""
    metric, budget, study = parent.task_spec.metric, size.budget[part], arms(part, size.lrs[part])
    target = plan_shape(parent.model, **next(iter(shapes.values())))
    train_data, val_data = budget.splits(parent, data_id)
    config = budget.config(len(val_data), eval_at=size.eval_at[part])
    sweep: list[dict[str, Any]] = []  # every run's summary row (h.run_json without the curve, with arm and seed)
    chosen: dict[str, dict[str, dict]] = {}  # arm -> str(seed) -> its chosen run, h.run_json (JSON keys: strings)

    def train(stage: list[Arm], lr_of: dict[str, tuple[float, ...]], seed: int, tag: str) -> dict[str, Any]:
        """The arms side by side, one candidate per lr; each arm's chosen run by the library's rule."""
        cands = [c for arm in stage for c in arm.candidates(make_child(
            parent, target, strategy=arm.strategy, importance=importances[seed], seed=seed, **arm.options).model,
            lr_of[arm.name])]
        results = h.train(cands, train_data, val_data, replace(config, seed=seed), f"{part} {tag}",
                          runs_dir / f"{part}-{tag}.jsonl")
        sweep.extend(h.run_json(r, metric, curve=False, arm=candidate_of(n), seed=seed) for n, r in results.items())
        for name, run in h.best_runs(results, metric).items():
            chosen.setdefault(name, {})[str(seed)] = h.run_json(run, metric)
        return results

    child_lr = h.sweep_then_rest(study, lambda a, lr_of, tag: train(a, lr_of, SEEDS[0], tag), metric, "ablations")[2]
    if reruns := close_arms(chosen, part, metric):
        by_name = {a.name: a for a in study}
        train([by_name[n] for n in reruns], {n: (chosen[n]["0"]["lr"],) for n in reruns}, SEEDS[1], "second seed")
    return {"metric": metric, "shape": target.as_dict(),
            "budget": {**asdict(budget), "eval_at": list(size.eval_at[part])}, "child_lr": child_lr,
            "sweep": sweep, "runs": chosen, "reruns": reruns,
            "comparisons": {k: list(v) for k, v in COMPARISONS[part].items()},
            "labels": {a.name: a.label for a in study}, "swept": {a.name: a.lrs for a in study if a.lrs},
            "speedups": speedups(chosen, metric), "close": CLOSE[part], "shape_key": next(iter(shapes))}


def close_arms(chosen: dict, part: str, metric: str) -> list[str]:
    """Arms of comparisons whose two best arms differ by less than CLOSE on seed 0, closest first."""
    gaps = []
    for names in COMPARISONS[part].values():
        best = sorted((chosen[n]["0"]["best"] for n in names if "0" in chosen.get(n, {})),
                      reverse=HIGHER_IS_BETTER[metric])
        if len(best) >= 2 and abs(best[0] - best[1]) < CLOSE[part]:
            gaps.append((abs(best[0] - best[1]), names))
    out: list[str] = []
    for _, names in sorted(gaps):
        if len(set(out) | set(names)) <= MAX_RERUNS:
            out += [n for n in names if n not in out]
    return out


def speedups(chosen: dict, metric: str) -> dict[str, dict[str, Any]]:
    """Per arm and seed, its speedup over random init of the same seed (random init's best as target)."""
    base = chosen.get("random", {})
    out = {name: {seed: speedup(curve(base[seed]), curve(run), higher_is_better=HIGHER_IS_BETTER[metric]).to_dict()
                  for seed, run in by_seed.items() if seed in base}
           for name, by_seed in chosen.items() if name != "random"}
    return {name: by_seed for name, by_seed in out.items() if by_seed}


def curve(run: dict[str, Any]) -> list[tuple[int, float]]:
    """A run's (step, value) validation points (h.run_json keeps them as two lists)."""
    return list(zip(run["steps"], run["values"]))


def run_part(parent: Parent, part: str, data_id: str, size: Size, runs: Path) -> dict[str, Any]:
    """Parent analyses, step-0 tables at every shape, and the training study at the first shape."""
    start, config = time.perf_counter(), parent.model.config
    # the LM: the paper-like child (both ratios at step 0); the ViT, as in the paper, the same depth at half width
    shapes = size.lm_shapes if part == "lm" else {
        "half-width": {"hidden": config.hidden_size // 2, "ffn": config.intermediate_size // 2}}
    importances = {s: calibrate_seed(parent, data_id, size.calib_tokens, s) for s in SEEDS}
    batches = validation_batches(parent, data_id, size.analysis_tokens, size.analysis_images)
    analysis = analyze_parent(parent, importances, batches)
    log(f"[{parent.id}] step-0 values")
    untrained = [a for a in arms(part, size.lrs[part]) if a.weight_decay is None]  # decay is nothing at step 0
    return {"parent": parent.label, "parent_id": parent.id, "data": data_id, "analysis": analysis,
            "step0": step0_table(parent, importances, shapes, untrained, batches), "step0_shapes": shapes,
            "training": run_study(parent, part, data_id, size, shapes, importances, runs),
            "minutes": (time.perf_counter() - start) / 60}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Both parts (the ViT's unless --vit-parent none), with the machine, its load and the minutes taken."""
    h.start(args)
    start, runs = time.perf_counter(), Path(tempfile.mkdtemp(prefix="subclone-reproduce-"))
    results: dict[str, Any] = {"size": args.size, "machine": machine(), "seeds": list(SEEDS),
                               "load_average": os.getloadavg()[0], "high_wd": HIGH_WD}
    for part, parent_id, data_id in (("lm", args.parent, args.data), ("vit", args.vit_parent, args.image_data)):
        results[part] = None if parent_id == "none" else run_part(load_parent(parent_id), part, data_id,
                                                                   SIZES[args.size], runs)
    return {**results, "minutes": (time.perf_counter() - start) / 60, "load_average_end": os.getloadavg()[0]}


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
    log(f"wrote {args.out} and {figures}/ ({results['minutes']:.1f} min)")
    return args.out


if __name__ == "__main__":
    main()
