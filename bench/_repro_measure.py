"""The measurements behind docs/REPRODUCTION.md, as JSON-ready dicts: analyses of the parent (relative magnitude,
single-block removal, neuron-score consistency, step-0 losses of children made every way) and training runs
(learning-rate sweeps, then every ablation at the subcloned child's best learning rate, then a second seed for
comparisons too close to call). Nothing here writes files or decides verdicts (`_repro_report.py` does)."""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from bench import _harness as h
from bench._harness import Arm, Budget
from bench._report import spearman
from subclone_core.analysis.probes import block_ablation, off_diagonal_mean, rank_correlation
from subclone_core.core.calibration import Importance
from subclone_core.core.strategies import plan_shape
from subclone_core.pipeline.calibration import calibrate
from subclone_core.sources import Parent, make_data
from subclone_core.training.evaluate import evaluate
from subclone_core.training.speedup import HIGHER_IS_BETTER, speedup
from subclone_core.training.sweep import candidate_of
from subclone_core.workflow.children import CALIB_BATCH, CALIB_SEQ_LEN, make_child

CALIB_POOL = 4  # a seed's calibration sample is drawn from this many times the budget of training data


@dataclass(frozen=True)
class Study:
    """One parent's part: its step-0 shapes (the first is trained), budget, arms and comparisons (finding -> arms)."""

    key: str
    data_id: str
    shapes: dict[str, dict[str, int]]
    budget: Budget
    eval_at: tuple[int, ...]
    arms: tuple[Arm, ...]
    comparisons: dict[str, tuple[str, ...]]
    close: float  # a gap in best value below this is "too close to call" on one seed
    max_reruns: int  # at most this many arms get a second seed


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


def _rounded(values: torch.Tensor | list[float], digits: int = 5) -> list[float]:
    return [float(f"{float(v):.{digits}g}") for v in (values.tolist() if torch.is_tensor(values) else values)]


def top_share(scores: torch.Tensor, fraction: float = 0.01) -> float:
    """The share of the total score held by the top ``fraction`` of entries (uniform scores: ``fraction``)."""
    flat = scores.double().flatten().sort(descending=True).values
    return float(flat[:max(1, math.ceil(fraction * flat.numel()))].sum() / flat.sum().clamp_min(1e-30))


def analyze_parent(parent: Parent, data_id: str, *, calib_tokens: int, val_tokens: int, val_images: int,
                   seeds: tuple[int, ...]) -> tuple[dict[str, Any], dict[int, Importance]]:
    """Findings 1-3 on a parent: relative magnitude, single-block removal, neuron-score consistency."""
    importances = {s: calibrate_seed(parent, data_id, calib_tokens, s) for s in seeds}
    first = importances[seeds[0]]
    blocks = first.residual_block  # (L, D): the mean |block output| per residual neuron
    layers = blocks.shape[0]
    corr = rank_correlation(blocks)
    # an early block against the middle one, the middle one against a late one
    mid, early, late = layers // 2, min(1, layers - 1), max(layers - 2, 0)
    pairs = [(early, mid), (mid, late)] if layers > 2 else [(0, layers - 1)]
    print(f"[{parent.id}] single-block removal over {layers} blocks", file=sys.stderr, flush=True)
    ablation = block_ablation(parent.model, validation_batches(parent, data_id, val_tokens, val_images))
    return {
        "layers": layers,
        "calib_tokens": first.tokens,
        "rel_magnitude": {str(s): _rounded(imp.rel_magnitude) for s, imp in importances.items()},
        "one_minus_cos": _rounded(first.one_minus_cos),
        "ablation": ablation,
        "magnitude_vs_removal_spearman": spearman(first.rel_magnitude, torch.tensor(ablation["losses"])),
        "rank_corr": [_rounded(row, 4) for row in corr],
        "rank_corr_off_diagonal": off_diagonal_mean(corr),
        "rank_corr_adjacent": float(corr.diagonal(1).mean()) if layers > 1 else 1.0,
        "scatter": [{"a": a, "b": b, "x": _rounded(blocks[a], 4), "y": _rounded(blocks[b], 4),
                     "spearman": float(corr[a, b])} for a, b in pairs],
        "residual_sorted": _rounded(first.residual.sort(descending=True).values, 4),
        "residual_top1_share": top_share(first.residual),
        "ffn_top1_share": sum(top_share(row) for row in first.ffn) / layers,
        "residual_dims": int(first.residual.numel()),
        "seed_agreement": (spearman(importances[seeds[0]].residual, importances[seeds[-1]].residual)
                           if len(seeds) > 1 else None),
    }, importances


def step0_table(parent: Parent, importances: dict[int, Importance], shapes: dict[str, dict[str, int]],
                arms: tuple[Arm, ...], batches: list[dict]) -> list[dict[str, Any]]:
    """Validation loss (and accuracy) of every arm's untrained child, per child shape and calibration seed."""
    metric = parent.task_spec.metric  # "loss", or "accuracy" beside it
    rows = []
    for shape_key, sizes in shapes.items():
        target = plan_shape(parent.model, **sizes)
        for seed, importance in importances.items():
            for arm in arms:
                child = make_child(parent, target, strategy=arm.strategy, importance=importance, seed=seed,
                                   **arm.options)
                result = evaluate(child.model, batches)
                rows.append({"shape": shape_key, "seed": seed, "arm": arm.name, "loss": result["loss"],
                             metric: result[metric], "removed_blocks": child.manifest.removed_blocks})
                del child
    return rows


def run_study(parent: Parent, study: Study, importances: dict[int, Importance], seeds: tuple[int, ...],
              runs_dir: Path) -> dict[str, Any]:
    """Sweep, ablate, and rerun close comparisons with the second seed; curves of every chosen run."""
    metric, first = parent.task_spec.metric, seeds[0]
    target = plan_shape(parent.model, **next(iter(study.shapes.values())))
    train_data, val_data = study.budget.splits(parent, study.data_id)
    config = study.budget.config(len(val_data), eval_at=study.eval_at)
    sweep: list[dict[str, Any]] = []  # every run
    chosen: dict[str, dict[str, dict]] = {}  # arm -> str(seed) -> its chosen run (JSON keys are strings)

    def train(arms: list[Arm], lr_of: dict[str, tuple[float, ...]], seed: int, tag: str) -> dict[str, Any]:
        """The arms side by side, one candidate per lr; each arm's chosen run by the library's rule."""
        cands = []
        for arm in arms:
            child = make_child(parent, target, strategy=arm.strategy, importance=importances[seed], seed=seed,
                               **arm.options)
            cands += arm.candidates(child.model, lr_of[arm.name])
        results = h.train(cands, train_data, val_data, replace(config, seed=seed), f"{study.key} {tag}",
                          runs_dir / f"{study.key}-{tag}.jsonl")
        sweep.extend({"arm": candidate_of(n), "seed": seed, **h.pick(h.facts(r, metric), "lr", "weight_decay",
                                                                     "status", "best", "final")}
                     for n, r in results.items())
        for name, run in h.best_runs(results, metric).items():
            f = h.facts(run, metric)
            chosen.setdefault(name, {})[str(seed)] = {
                **h.pick(f, "lr", "weight_decay", "status", "curve", "start", "final", "best"),
                "throughput": round(f["throughput"], 1), "unit": f["unit"]}
        return results

    _, _, child_lr = h.sweep_then_rest(study.arms, lambda arms, lr_of, tag: train(arms, lr_of, first, tag), metric,
                                       "ablations")
    reruns = _close_arms(chosen, study, metric, first) if len(seeds) > 1 else []
    if reruns:
        arms = {a.name: a for a in study.arms}
        train([arms[n] for n in reruns], {n: (chosen[n][str(first)]["lr"],) for n in reruns}, seeds[1], "second seed")
    return {"metric": metric, "shape": target.as_dict(),
            "budget": {**asdict(study.budget), "eval_at": list(study.eval_at)}, "child_lr": child_lr,
            "sweep": sweep, "runs": chosen, "reruns": reruns,
            "comparisons": {k: list(v) for k, v in study.comparisons.items()},
            "labels": {a.name: a.label for a in study.arms}, "swept": {a.name: a.lrs for a in study.arms if a.lrs},
            "speedups": _speedups(chosen, metric), "close": study.close, "shape_key": next(iter(study.shapes))}


def _close_arms(chosen: dict, study: Study, metric: str, seed: int) -> list[str]:
    """Arms of comparisons whose two best arms differ by less than ``study.close``, closest first."""
    gaps, seed = [], str(seed)
    for names in study.comparisons.values():
        values = sorted((chosen[n][seed]["best"] for n in names if seed in chosen.get(n, {})),
                        reverse=HIGHER_IS_BETTER[metric])
        if len(values) >= 2 and abs(values[0] - values[1]) < study.close:
            gaps.append((abs(values[0] - values[1]), names))
    out: list[str] = []
    for _, names in sorted(gaps):
        new = [n for n in names if n not in out]
        if len(out) + len(new) <= study.max_reruns:
            out += new
    return out


def _speedups(chosen: dict, metric: str) -> dict[str, dict[str, Any]]:
    """Per seed, every arm's speedup over random init of the same seed (random init's best as target)."""
    out: dict[str, dict[str, Any]] = {}
    for name, by_seed in chosen.items():
        for seed, run in by_seed.items():
            base = chosen.get("random", {}).get(seed)
            if name != "random" and base is not None:
                result = speedup(base["curve"], run["curve"], higher_is_better=HIGHER_IS_BETTER[metric])
                out.setdefault(name, {})[str(seed)] = result.to_dict()
    return out
