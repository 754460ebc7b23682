"""The speedup at every loss level at a longer budget: random init, subclone and subclone+distill.

The short budgets of bench_training.py (40-300 steps) measure the head start inherited weights give.
The paper's claim is about training to the same perplexity, so this benchmark trains the aggressive
child (6 blocks x 192, 3 heads / 1 KV, FFN 512) of the embedded default for at least 1.5M tokens per
arm and reports the iso-loss speedup (subclone_core.training.speedup.iso_loss): at every loss random init
reaches, random init's tokens over the candidate's, interpolated between evaluations, never
extrapolated. Each arm is compared at its own best learning rate at the budget reported: the first stage
trains every arm at every lr of its grid for the full budget, side by side on identical batches, and
keeps each arm's run of lowest best loss (a chosen lr at the edge of its grid is flagged: extend the grid).
Later stages (a second seed, distillation, the paper-like ratio) reuse those lrs. Evaluations are spaced
evenly on a log scale of tokens.

Sizes: ``smoke`` (a minute on a tiny parent; the test runs it), ``cpu`` (about an hour on 2 cores:
``make bench-budget``; its device is "auto", so on a GPU machine the same plan runs there in minutes),
``gpu`` (at least 100M tokens per arm at the paper-like ratio). ``--from-child DIR`` trains a child saved
by ``subclone make`` (and random init of its config) without the parent: for a machine the parent cannot
reach; the stages that need the parent (distillation, another shape) are left out and said so.
Writes docs/speedup_vs_budget.json, docs/bench_budget_*.png, the "budget" section of
docs/BENCHMARKS.md and the README's marked budget line (``--gpu``: the same names with "-gpu").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import _harness as h
from bench._harness import SMOKE_SHAPES
from bench._report import (
    DOC,
    PAPER_SPEEDUP,
    ROOT,
    SHAPES,
    THREADS_HELP,
    bench_parser,
    fmt_value,
    json_default,
    log_eval_steps,
    machine,
    render,
    replace_marked,
    save_figure,
    table,
    write_section,
)
from subclone_core.core.strategies import plan_shape
from subclone_core.io.atomic import write_text
from subclone_core.io.saving import read_manifest
from subclone_core.sources import Parent, load_parent, make_data
from subclone_core.training import Candidate, RunResult
from subclone_core.training.speedup import DROP_FRACTIONS, IsoLoss, iso_loss, result_track
from subclone_core.training.sweep import candidate_of, edge_note, grid_edge, lr_text, parse_lr_sweep, run_name
from subclone_core.workflow.children import make_child, measure_importance

README = ROOT / "README.md"
ARMS = ("random", "subclone", "subclone+distill")
LABELS = {"random": "random init",
          "subclone": "subclone (the defaults: read ranking, least-squares refit, no scaling, tied head, drop by "
                      "magnitude)",
          "subclone+distill": "subclone + distillation from the parent"}
SUBCLONE_OPTIONS = {"scale": False, "drop": "magnitude"}  # the plain child of bench_training.py


@dataclass(frozen=True)
class Stage:
    """One call of the training engine: some arms of one child shape, one seed, one token budget.

    Attributes:
        key: names the stage in the report and the JSON ("final", "seed1", "distill", "paper-like").
        shape: "aggressive" or "paper-like" (a key of Size.shapes).
        arms: the arms trained side by side on the identical batches.
        tokens: training tokens per arm (rounded down to whole steps).
        seed: data order, dropout and random init's weights.
        evals: evaluations after step 0; None takes the size's (fewer for costly or short stages).
    """

    key: str
    shape: str
    arms: tuple[str, ...]
    tokens: int
    seed: int = 0
    evals: int | None = None


@dataclass(frozen=True)
class Size:
    """Everything one size runs.

    Attributes:
        shapes: child sizes per shape key (plan_shape keywords).
        batch_size, seq_len: the training batch (tokens per step = batch_size x seq_len).
        val_tokens: the fixed validation set, the same for every evaluation.
        evals: evaluations per full-budget run after step 0, spaced evenly in log(tokens).
        calib_tokens: calibration for the subcloned children, measured once.
        sweep_lrs: the learning rates of each arm of the first stage, all trained at its full budget; the
            lowest best loss is the arm's lr there and in every later stage.
        stages: the runs at full budget, in order; the first is the sweep.
        precision: the engine's mixed_precision ("no", "bf16" or "auto").
        minutes: the planned wall time, for the report.
    """

    shapes: dict[str, dict[str, int]]
    batch_size: int
    seq_len: int
    val_tokens: int
    evals: int
    calib_tokens: int
    sweep_lrs: dict[str, tuple[float, ...]]
    stages: tuple[Stage, ...]
    precision: str = "no"
    minutes: float = 0.0

    @property
    def step_tokens(self) -> int:
        return self.batch_size * self.seq_len



SIZES = {
    "smoke": Size(SMOKE_SHAPES, batch_size=4, seq_len=32, val_tokens=256, evals=4, calib_tokens=256,
                  sweep_lrs={"random": (1e-3, 2e-3, 3e-3), "subclone": (1e-3, 3e-3), "subclone+distill": (1e-3,)},
                  stages=(Stage("final", "aggressive", ("random", "subclone"), 2048),
                          Stage("seed1", "aggressive", ("random", "subclone"), 1024, seed=1),
                          Stage("distill", "aggressive", ("subclone+distill",), 1024),
                          Stage("paper-like", "paper-like", ("random", "subclone"), 1024)), minutes=1),
    # bf16 autocast, device "auto". On an idle 2-core Xeon an aggressive arm trains at about 1,060 tokens/s
    # (two side by side 2,120), so each arm's 1.5M tokens take about 11.6 minutes and these seven runs about
    # 80 minutes: over the hour, so the second seed, distillation (420 tokens/s with the teacher) and the
    # paper-like ratio moved to the gpu size. On one H200 the same seven runs take 2.8 minutes. Both grids
    # bracket their arm's best lr at this budget, measured: random init 1e-3 (2.5e-4 and 4e-3 were worse
    # too), the refit child 4e-3.
    "cpu": Size(SHAPES, batch_size=16, seq_len=128, val_tokens=4096, evals=30, calib_tokens=4096,
                sweep_lrs={"random": (5e-4, 1e-3, 2e-3), "subclone": (1e-3, 2e-3, 4e-3, 8e-3)},
                stages=(Stage("final", "aggressive", ("random", "subclone"), 1_501_184),),
                precision="bf16", minutes=80),
    # One H200-class GPU: 100M+ tokens per arm at the paper-like ratio, two seeds of every final arm.
    "gpu": Size(SHAPES, batch_size=64, seq_len=512, val_tokens=65_536, evals=40, calib_tokens=8192,
                sweep_lrs={"random": (1e-3, 2e-3, 4e-3), "subclone": (3e-4, 1e-3, 2e-3),
                           "subclone+distill": (3e-4, 1e-3)},
                stages=(Stage("final", "aggressive", ARMS, 104_857_600),
                        Stage("seed1", "aggressive", ARMS, 104_857_600, seed=1),
                        Stage("paper-like", "paper-like", ("random", "subclone"), 104_857_600),
                        Stage("paper-like-seed1", "paper-like", ("random", "subclone"), 104_857_600, seed=1)),
                precision="auto", minutes=0),
}


# --- running --------------------------------------------------------------------------------------------


@dataclass
class Context:
    """What every stage shares: the parent, its calibration, the data id and where run metrics go."""

    parent: Parent
    importance: Any
    data: str
    size: Size
    runs: Path
    children: dict[tuple[str, str, int], Any] = field(default_factory=dict)
    from_child: bool = False  # the "parent" is a saved subcloned child: trained as is, random init of its config


def child_for(ctx: Context, shape: str, arm: str, seed: int) -> Any:
    """The arm's initial child (cached): random init depends on the seed, the subcloned child does not."""
    strategy = "random" if arm == "random" else "subclone"
    key = (shape, strategy, seed if strategy == "random" else 0)
    if ctx.from_child and strategy == "subclone":
        return ctx.parent.model
    if key not in ctx.children:
        target = plan_shape(ctx.parent.model, **({} if ctx.from_child else ctx.size.shapes[shape]))
        options = {} if strategy == "random" else SUBCLONE_OPTIONS
        ctx.children[key] = make_child(ctx.parent, target, strategy=strategy, importance=ctx.importance,
                                       seed=seed, **options).model
    return ctx.children[key]


def without_parent(size: Size) -> tuple[Size, list[str]]:
    """The size's stages that a saved child can run without its parent (the aggressive shape, no teacher),
    and a sentence for each stage left out."""
    keep = tuple(s for s in size.stages if s.shape == "aggressive" and "subclone+distill" not in s.arms)
    notes = [f"Left out without the parent (--from-child): stage {s.key} ({s.shape} child, {', '.join(s.arms)})."
             for s in size.stages if s not in keep]
    return replace(size, stages=keep), notes


def candidate(ctx: Context, shape: str, arm: str, lr: float, seed: int, name: str) -> Candidate:
    """A fresh copy of the arm's child at ``lr`` with its strategy's default weight decay."""
    return h.candidate(name, child_for(ctx, shape, arm, seed), lr, arm,
                       teacher=ctx.parent.model if arm == "subclone+distill" else None)


def train(ctx: Context, cands: list[Candidate], tokens: int, seed: int, tag: str,
          evals: int) -> dict[str, RunResult]:
    """Train candidates side by side on the identical batches; curves kept, weights freed."""
    size = ctx.size
    # The whole split for every stage: the batch order then depends on the seed alone, so a shorter run
    # (a sweep, the distillation arm) sees exactly the first batches of the longer runs of its seed.
    train_data = make_data(ctx.parent, ctx.data, "train", seq_len=size.seq_len)
    val = make_data(ctx.parent, ctx.data, "validation", seq_len=size.seq_len, max_tokens=size.val_tokens)
    steps = max(1, tokens // size.step_tokens)
    config = h.train_config(steps, size.batch_size, len(val), round_down=True, eval_at=log_eval_steps(steps, evals),
                            seed=seed, precision=size.precision)
    return h.train(cands, train_data, val, config, tag, ctx.runs / f"{tag}.jsonl")


@dataclass
class Outcome:
    """What a size produced.

    Attributes:
        size: its name.
        sweep: one row per sweep run (arm, lr, best and final validation loss, status).
        lrs: each arm's winning lr.
        stages: {stage key: {arm: the run at full budget}}.
        seconds: wall time per part ("calibration", then each stage key; the first stage is the sweep).
    """

    size: str
    sweep: list[dict[str, Any]]
    lrs: dict[str, float]
    stages: dict[str, dict[str, RunResult]]
    seconds: dict[str, float]


def sweep(ctx: Context, stage: Stage) -> tuple[list[dict[str, Any]], dict[str, float], dict[str, RunResult]]:
    """The first stage: each arm at every lr of its grid for the full budget, side by side on identical
    batches. Returns the rows of every run, each arm's winning lr and each arm's winning run."""
    lrs = ctx.size.sweep_lrs
    cands = [candidate(ctx, stage.shape, arm, lr, stage.seed, run_name(arm, lr)) for arm in stage.arms
             for lr in lrs[arm]]
    runs = train(ctx, cands, stage.tokens, stage.seed, stage.key, stage.evals or ctx.size.evals)
    chosen = h.best_runs(runs, "loss", always=True)
    rows, winners = [], {}
    for arm in stage.arms:
        mine = {name: r for name, r in runs.items() if candidate_of(name) == arm}
        winners[arm] = chosen[arm].lr
        note = edge_note(arm, winners[arm], grid_edge(winners[arm], lrs[arm]))
        rows += [{**sweep_row(arm, r, stage.tokens), "chosen": r is chosen[arm], "note": note} for r in mine.values()]
    return rows, winners, chosen


def sweep_row(arm: str, run: RunResult, tokens: int) -> dict[str, Any]:
    return {"arm": arm, "lr": run.lr, "tokens": tokens, **h.pick(h.facts(run), "status", "best", "final")}


def run_stage(ctx: Context, stage: Stage, lrs: dict[str, float]) -> dict[str, RunResult]:
    """The stage's arms at their winning lrs (the aggressive child's sweep) for the full budget."""
    cands = [candidate(ctx, stage.shape, arm, lrs[arm], stage.seed, arm) for arm in stage.arms]
    return train(ctx, cands, stage.tokens, stage.seed, stage.key, stage.evals or ctx.size.evals)


def run_size(ctx: Context, name: str) -> Outcome:
    """The sweep at the full budget (the first stage), then every later stage at its lrs, timing each."""
    first, *later = ctx.size.stages
    start = time.perf_counter()
    rows, lrs, chosen = sweep(ctx, first)
    # an arm first trained in a later stage (the smoke size's distillation) has one lr in its grid
    lrs.update({arm: grid[0] for arm, grid in ctx.size.sweep_lrs.items() if arm not in lrs and len(grid) == 1})
    stages, seconds = {first.key: chosen}, {first.key: time.perf_counter() - start}
    for stage in later:
        begin = time.perf_counter()
        stages[stage.key] = run_stage(ctx, stage, lrs)
        seconds[stage.key] = time.perf_counter() - begin
    return Outcome(name, rows, lrs, stages, seconds)


# --- results --------------------------------------------------------------------------------------------


def arm_json(run: RunResult) -> dict[str, Any]:
    """A run's validation curve against tokens (and steps), its lr and status."""
    return {**h.pick(h.facts(run), "tokens", "steps", "val_loss", "lr", "status"),
            "throughput": round(run.throughput, 1)}


def iso_rows(base: RunResult, other: RunResult, *, fractions: tuple[float, ...] | None = None) -> list[IsoLoss]:
    """The library's iso-loss rows of ``other`` against random init's run ``base``."""
    return iso_loss(result_track(base, "loss"), result_track(other, "loss"), fractions=fractions)


def iso_json(rows: list[IsoLoss], name: str) -> list[dict[str, Any]]:
    """Rows in the JSON's schema: loss, random_tokens, <name>_tokens, speedup (= their ratio), and detail."""
    return [{"loss": r.level, "random_tokens": r.baseline_tokens, f"{name}_tokens": r.candidate_tokens,
             "speedup": r.speedup, "lower_bound": r.lower_bound, "at_start": r.at_start, "fraction": r.fraction,
             "random_steps": r.baseline_steps, f"{name}_steps": r.candidate_steps, "text": r.text()} for r in rows]


def baseline_of(outcome: Outcome, stage: Stage, size: Size) -> RunResult | None:
    """Random init's run for a stage: its own, else that of another stage of the same shape and seed.

    Stages of one seed see the same batches in the same order (see train), so a stage without random
    init (the distillation arm) is compared with the random-init run of its seed on the same batches.
    """
    own = outcome.stages[stage.key].get("random")
    if own is not None:
        return own
    for other in size.stages:
        runs = outcome.stages.get(other.key, {})
        if other.shape == stage.shape and other.seed == stage.seed and "random" in runs:
            return runs["random"]
    return None


def stage_json(outcome: Outcome, stage: Stage, size: Size) -> dict[str, Any]:
    """One stage's curves, and the iso-loss rows (every level, and the drop levels) of each arm."""
    runs, base = outcome.stages[stage.key], baseline_of(outcome, stage, size)
    others = {arm: run for arm, run in runs.items() if arm != "random"}
    return {"shape": stage.shape, "shape_sizes": size.shapes[stage.shape], "seed": stage.seed,
            "tokens": stage.tokens, "minutes": round(outcome.seconds[stage.key] / 60, 1),
            "arms": {arm: arm_json(run) for arm, run in runs.items()},
            "iso_loss": {arm: iso_json(iso_rows(base, run), arm) for arm, run in others.items()} if base else {},
            "at_drop": {arm: iso_json(iso_rows(base, run, fractions=DROP_FRACTIONS), arm)
                        for arm, run in others.items()} if base else {}}


def main_runs(outcome: Outcome, size: Size) -> dict[str, RunResult]:
    """Each arm's first run on the aggressive child with seed 0: the headline curves."""
    out: dict[str, RunResult] = {}
    for stage in size.stages:
        if stage.shape == "aggressive" and stage.seed == 0:
            for arm, run in outcome.stages[stage.key].items():
                out.setdefault(arm, run)
    return out


def results_json(outcome: Outcome, size: Size, meta: dict[str, Any]) -> dict[str, Any]:
    """docs/speedup_vs_budget.json: the schema of issue 14 at the top, every stage below it."""
    runs = main_runs(outcome, size)
    base = runs["random"]
    stages = {stage.key: stage_json(outcome, stage, size) for stage in size.stages}
    return {**meta, "arms": {arm: arm_json(run) for arm, run in runs.items()}, "random_tokens": base.seen,
            "iso_loss": iso_json(iso_rows(base, runs["subclone"]), "subclone"),
            "at_drop": {arm: iso_json(iso_rows(base, run, fractions=DROP_FRACTIONS), arm)
                        for arm, run in runs.items() if arm != "random"},
            "lrs": outcome.lrs, "sweep": outcome.sweep, "stages": stages,
            "minutes": {part: round(s / 60, 1) for part, s in outcome.seconds.items()}}


def seed_spread(outcome: Outcome, size: Size) -> list[dict[str, Any]]:
    """The subcloned child's speedup for seed 0 and each other seed, at the other seed's drop levels.

    A later seed may run a shorter budget than seed 0; its own random-init curve sets the levels, and
    seed 0's speedup is read at the same levels, so the two numbers are comparable.
    """
    out = []
    for stage in size.stages:
        runs = outcome.stages[stage.key]
        if stage.seed == 0 or "random" not in runs or "subclone" not in runs:
            continue
        first = next((s for s in size.stages if s.shape == stage.shape and s.seed == 0 and "subclone" in s.arms
                      and "random" in s.arms), None)
        if first is None:
            continue
        zero = outcome.stages[first.key]
        for row in iso_rows(runs["random"], runs["subclone"], fractions=DROP_FRACTIONS):
            ref = iso_loss(result_track(zero["random"], "loss"), result_track(zero["subclone"], "loss"),
                           levels=[row.level])[0]
            out.append({"stage": stage.key, "shape": stage.shape, "seed": stage.seed, "fraction": row.fraction,
                        "loss": row.level, "speedup_seed0": ref.speedup, "speedup": row.speedup,
                        "text_seed0": ref.text(), "text": row.text()})
    return out


def fmt_tokens(n: float | None) -> str:
    """1234567 -> "1.23M", 98304 -> "98k"."""
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e3 else f"{n:.0f}"


def _needed(row: dict[str, Any], arm: str) -> str:
    """What an arm needed to reach a level: tokens, "<= N" when it was there at step 0, or "not reached"."""
    tokens = row[f"{arm}_tokens"]
    if tokens is None:
        return "not reached"
    return ("<= " if row["at_start"] else "") + fmt_tokens(tokens)  # at step 0: its first evaluation after it


def drop_table(stage: dict[str, Any]) -> str:
    """Speedup at 25/50/75/100% of random init's loss drop for every arm of a stage (100% = its final loss)."""
    arms = list(stage["at_drop"])
    if not arms:
        return "(no random-init run to compare with)"
    if not stage["at_drop"][arms[0]]:
        return "(random init never improved on its first evaluation: no level to compare at)"
    header = ["share of random init's loss drop", "validation loss", "random init: tokens"]
    header += [h for arm in arms for h in (f"{arm}: tokens", f"{arm}: speedup")]
    rows = []
    for i, base in enumerate(stage["at_drop"][arms[0]]):
        line = [f"{base['fraction']:.0%}" + (" (final)" if base["fraction"] == 1.0 else ""),
                fmt_value(base["loss"]), fmt_tokens(base["random_tokens"])]
        for arm in arms:
            row = stage["at_drop"][arm][i]
            line += [_needed(row, arm), f"**{row['text']}**" if row["speedup"] is not None else "-"]
        rows.append(line)
    return table(header, rows)


def final_row(results: dict[str, Any], arm: str = "subclone") -> dict[str, Any] | None:
    """The arm's row at random init's final (best) loss, from the headline runs."""
    rows = results["at_drop"].get(arm) or []
    return rows[-1] if rows else None


def headline(results: dict[str, Any]) -> str:
    """The speedup at random init's final loss, set against the paper's 4x and the early head start."""
    final, early = final_row(results), (results["at_drop"].get("subclone") or [None])[0]
    if final is None:
        return "No speedup: random init never improved on its first evaluation."
    base = (f"At random init's final loss ({fmt_value(final['loss'])}, reached after "
            f"{fmt_tokens(final['random_tokens'])} tokens), the subcloned child")
    if final["speedup"] is None:
        text = f"{base} does not get there within its {fmt_tokens(results['arms']['subclone']['tokens'][-1])} tokens."
    else:
        text = f"{base} needs {_needed(final, 'subclone')} tokens: **{final['text']}**."
    if early is not None and early["speedup"] is not None:
        text += (f" Early on (25% of random init's loss drop, loss {fmt_value(early['loss'])}) it is "
                 f"{early['text']}{_trend(early, final)}.")
    return (f"{text} The paper's ~{PAPER_SPEEDUP:.0f}x is about reaching the same perplexity, so compare it with "
            "the speedup at the final loss of the longest budget, not with a short-budget head start.")


def _trend(early: dict[str, Any], final: dict[str, Any]) -> str:
    """": the lead shrinks as training goes on" (or grows), from the two numbers; "" when one is missing."""
    if final["speedup"] is None or final["lower_bound"] or early["lower_bound"]:
        return ""
    if final["speedup"] < early["speedup"] * 0.9:
        return ": the lead shrinks as training goes on"
    return ": the lead grows as training goes on" if final["speedup"] > early["speedup"] * 1.1 else ", about the same"


def readme_line(results: dict[str, Any]) -> str:
    """One sentence for the README's budget line."""
    final = final_row(results)
    text = final["text"] if final else "n/a"
    loss = fmt_value(final["loss"]) if final else "-"
    gpu = results["machine"].split(", ")[2] if ", " in results["machine"] else "no GPU"
    where = "CPU" if gpu == "no GPU" else gpu
    return render("budget_readme", tokens=fmt_tokens(results["random_tokens"]), size=results["size"], where=where,
                  lrs=lr_choices(results), loss=loss, text=text, paper=PAPER_SPEEDUP)


def lr_picks(results: dict[str, Any], sep: str = ", ", name: Any = str) -> list[str]:
    """"random 1e-3 of 5e-4, 1e-3, 2e-3", ...: each arm's chosen lr of its grid (rates as sweeps name them:
    2.5e-4, not a rounded 3e-04), for the arms whose grid has several."""
    grid = results.get("plan", {}).get("sweep_lrs", {})
    return [f"{name(arm)} {lr_text(lr)} of {sep.join(lr_text(x) for x in grid[arm])}"
            for arm, lr in results.get("lrs", {}).items() if len(grid.get(arm, ())) > 1]


def lr_choices(results: dict[str, Any]) -> str:
    """"each arm at its best lr of its grid: random init 1e-3 of 5e-4/1e-3/2e-3, ...", from the results."""
    picks = lr_picks(results, "/", lambda arm: LABELS[arm].split(" (")[0])
    return "each arm at its best lr at this budget: " + ", ".join(picks)


def readme_cell(results: dict[str, Any]) -> str:
    """The README benchmark table's cell for the aggressive child: the speedup at random init's final loss."""
    final = final_row(results)
    if final is None:
        return "no level (random init never improved)"
    return (f"**{final['text']}** at {fmt_tokens(results['random_tokens'])} tokens (loss {fmt_value(final['loss'])}; "
            "each arm at its best lr)")


def settings(results: dict[str, Any], size: Size) -> str:
    """The section's list of settings: machine, data, batches, the lr grids, and every stage with its minutes."""
    grid = {arm: results["plan"]["sweep_lrs"][arm] for arm in results["stages"][size.stages[0].key]["arms"]}
    head = render("budget_settings", **{**results, "val_tokens": size.val_tokens, "batch_size": size.batch_size,
                                        "seq_len": size.seq_len, "precision": size.precision, "evals": size.evals,
                                        "grid": "; ".join(f"{a} " + ", ".join(f"{lr:g}" for lr in lrs)
                                                          for a, lrs in grid.items())})
    lines = [f"  - {key}: {s['shape']} child, seed {s['seed']}, {fmt_tokens(s['tokens'])} tokens per arm "
             f"({', '.join(s['arms'])}); {s['minutes']} min" for key, s in results["stages"].items()]
    lines.append(f"- Calibration and stages: {sum(results['minutes'].values()):.1f} min.")
    lines += [f"- {line}" for line in results.get("left_out", [])]
    return "\n".join([head, *lines])


COLORS = {"random": "#d62728", "subclone": "#1f77b4", "subclone+distill": "#2ca02c"}


def plot_curves(results: dict[str, Any], path: Path) -> None:
    """Validation loss against tokens (log x, so step 0 is left out), one panel per child shape; later seeds dashed."""
    shapes = list(dict.fromkeys(s["shape"] for s in results["stages"].values()))
    fig, axes = h.panels(len(shapes), 5.6, 3.8)
    for ax, shape in zip(axes[0], shapes):
        for key, stage in results["stages"].items():
            if stage["shape"] != shape:
                continue
            for arm, curve in stage["arms"].items():
                points = [(t, v) for t, v in zip(curve["tokens"], curve["val_loss"]) if t > 0]  # log x: no 0
                if points:
                    ax.plot(*zip(*points), color=COLORS.get(arm), linestyle="-" if stage["seed"] == 0 else "--",
                            marker=".", markersize=3, label=f"{arm} (lr {curve['lr']:g}, {key})")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(lambda value, _: fmt_tokens(value))  # "10k", "1.00M": no crowded powers
        ax.xaxis.set_minor_formatter(lambda value, _: "")
        h.finish(ax, which="both", title=f"{shape} child", xlabel="training tokens", ylabel="validation loss")
    save_figure(fig, path)


def plot_speedup(results: dict[str, Any], path: Path) -> None:
    """Iso-loss speedup against the loss level random init reached (x reversed: training goes right)."""
    fig, axes = h.panels(1, 6.4, 4.0)
    ax = axes[0][0]
    for key, stage in results["stages"].items():
        for arm, rows in stage["iso_loss"].items():
            exact = [(r["loss"], r["speedup"]) for r in rows if r["speedup"] is not None and not r["lower_bound"]]
            bound = [(r["loss"], r["speedup"]) for r in rows if r["speedup"] is not None and r["lower_bound"]]
            style = {"color": COLORS.get(arm), "linestyle": "-" if stage["seed"] == 0 else "--"}
            if stage["shape"] != "aggressive":
                style["linestyle"] = ":"
            if exact:
                ax.plot(*zip(*exact), marker=".", label=f"{arm} ({key}, {stage['shape']})", **style)
            if bound:
                ax.plot(*zip(*bound), marker="^", linestyle="none", color=style["color"])
    ax.axhline(1.0, color="grey", linewidth=1)
    ax.axhline(PAPER_SPEEDUP, color="black", linestyle=":", linewidth=1, label=f"paper's ~{PAPER_SPEEDUP:.0f}x")
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    ax.set_yticks([t for t in (0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128) if low <= t <= high])
    ax.yaxis.set_major_formatter(lambda value, _: f"{value:g}x")
    ax.yaxis.set_minor_formatter(lambda value, _: "")
    ax.invert_xaxis()
    h.finish(ax, which="both", xlabel="validation loss level (random init's curve)",
             ylabel="speedup (random init's tokens / arm's)",
             title="Iso-loss speedup (triangles: lower bounds, there at step 0)")
    save_figure(fig, path)


def spread_text(rows: list[dict[str, Any]]) -> str:
    """The seed spread as a table, or a sentence when only one seed ran."""
    if not rows:
        return "One seed only: no spread measured."
    body = [[r["stage"], r["shape"], f"{r['fraction']:.0%}", fmt_value(r["loss"]), r["text_seed0"], r["text"]]
            for r in rows]
    return ("Seed spread of the subcloned child's speedup (levels from the later seed's own random-init curve, "
            "seed 0 read at the same levels):\n\n" +
            table(["stage", "child", "share of drop", "validation loss", "seed 0", "this seed"], body))


def sweep_table(rows: list[dict[str, Any]], lrs: dict[str, float]) -> str:
    """Every run of the sweep, the chosen ones marked, then the notes on chosen lrs at the edge of a grid."""
    body = [[r["arm"], f"{r['lr']:g}" + (" (chosen)" if lrs.get(r["arm"]) == r["lr"] else ""),
             fmt_tokens(r["tokens"]), fmt_value(r["best"]), fmt_value(r["final"]), r["status"]] for r in rows]
    notes = sorted({r["note"] for r in rows if r.get("note")})
    return "\n\n".join([table(["arm", "lr", "tokens", "best loss", "final loss", "status"], body),
                        *(f"Note: {n}" for n in notes)])


def section_markdown(results: dict[str, Any], size: Size, plots: dict[str, Path]) -> str:
    """The "budget" section of docs/BENCHMARKS.md."""
    parts = ["## Speedup at a longer budget (`bench/bench_budget.py`)",
             f"Size `{results['size']}` (`make bench-budget`). {headline(results)}", settings(results, size)]
    for key, stage in results["stages"].items():
        parts += [(f"### {key}: {stage['shape']} child, seed {stage['seed']}, {fmt_tokens(stage['tokens'])} tokens "
                  "per arm"), drop_table(stage)]
    parts += [spread_text(results["seed_spread"]), f"![validation loss against tokens]({plots['curves'].name})",
              f"![iso-loss speedup]({plots['speedup'].name})",
              ("Learning-rate sweep (every run at the full budget of the first stage; each arm's chosen lr is "
               "its lowest best loss):"),
              sweep_table(results["sweep"], results["lrs"]), render("budget_how_to_read")]
    return "\n\n".join(parts)


# --- main -----------------------------------------------------------------------------------------------


def outputs(name: str, out: Path | None) -> dict[str, Path]:
    """Where everything goes: docs/ for real sizes, a temporary folder for the smoke size (unless --out)."""
    suffix = "-gpu" if name == "gpu" else ""
    folder = h.folder(name, out, "subclone-budget-")
    return {"json": folder / f"speedup_vs_budget{suffix}.json", "curves": folder / f"bench_budget_curves{suffix}.png",
            "speedup": folder / f"bench_budget_speedup{suffix}.png", "doc": folder / DOC.name}


def meta(ctx: Context, name: str) -> dict[str, Any]:
    """What the JSON and the report say about the setting."""
    train = make_data(ctx.parent, ctx.data, "train", seq_len=ctx.size.seq_len)
    return {"size": name, "machine": machine(), "parent": ctx.parent.label, "data": ctx.data,
            "train_tokens": int(train.tokens.numel()), "batch": [ctx.size.batch_size, ctx.size.seq_len],
            "precision": ctx.size.precision, "planned_minutes": ctx.size.minutes,
            "plan": {"sweep_lrs": ctx.size.sweep_lrs,
                     "stages": [asdict(s) for s in ctx.size.stages]}}


def write_all(results: dict[str, Any], size: Size, paths: dict[str, Path], readme: Path | None) -> None:
    """The JSON, both plots, the BENCHMARKS.md section and (where it has the markers) the README line."""
    suffix = "-gpu" if results["size"] == "gpu" else ""
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    write_text(paths["json"], json.dumps(results, indent=1, default=json_default))
    plot_curves(results, paths["curves"])
    plot_speedup(results, paths["speedup"])
    write_section(f"budget{suffix}", section_markdown(results, size, paths), paths["doc"])
    if readme is None:
        return
    texts = {f"budget-speedup{suffix}": readme_line(results), f"budget-cell{suffix}": readme_cell(results)}
    for marker, text in texts.items():
        if not replace_marked(readme, marker, text):
            print(f"note: {readme} has no <!-- begin {marker} --> markers; that text is not updated", file=sys.stderr)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bench_parser(__doc__, threads=THREADS_HELP)
    h.size_flags(parser, "a minute on a tiny parent (give --parent, --data)",
                 "100M+ tokens per arm; give --data a large corpus")
    parser.add_argument("--parent", default="default", help="parent id (default: the embedded SmolLM2-135M)")
    parser.add_argument("--data", default="default", help="data id (default: the embedded Wikipedia text)")
    parser.add_argument("--out", type=Path, help="folder for the JSON, plots and BENCHMARKS.md (default docs/)")
    parser.add_argument("--readme", type=Path, help="README whose marked budget line to rewrite (default: "
                        "README.md for the cpu and gpu sizes, none for smoke)")
    parser.add_argument("--from-json", type=Path, help="redraw the plots, report and README text from a "
                        "speedup_vs_budget.json (trains nothing)")
    parser.add_argument("--lrs", help="the first stage's lr grid instead of the size's, e.g. "
                        "random=5e-4,1e-3,2e-3,subclone=5e-4,1e-3 (an arm not named keeps the size's grid)")
    parser.add_argument("--from-child", type=Path, help="train this saved subcloned child (`subclone make`) and "
                        "random init of its config, without the parent (stages that need it are left out)")
    return parser.parse_args(argv)


def readme_for(args: argparse.Namespace, name: str) -> Path | None:
    """The README whose marked text to rewrite: --readme, else README.md for the real sizes, none for smoke."""
    return args.readme if args.readme or name == "smoke" else README


def redraw(args: argparse.Namespace) -> dict[str, Any]:
    """The plots, the BENCHMARKS.md section and the README text again from a saved JSON."""
    results = json.loads(args.from_json.read_text())
    name = results["size"]
    write_all(results, SIZES[name], outputs(name, args.out), readme_for(args, name))
    return results


def context(args: argparse.Namespace, size: Size, name: str) -> Context:
    """The parent and its calibration, or a saved child standing in for both (--from-child)."""
    parent = load_parent(str(args.from_child) if args.from_child else args.parent)
    importance = None if args.from_child else measure_importance(parent, args.data, tokens=size.calib_tokens)
    if args.from_child:
        manifest = read_manifest(args.from_child)
        made_from = (manifest.parent.label if manifest and manifest.parent else None) or "a parent"
        parent.label = f"{parent.label}: a child of {made_from}, saved by `subclone make`"
    return Context(parent, importance, args.data, size, Path(tempfile.mkdtemp(prefix=f"subclone-budget-{name}-runs-")),
                   from_child=bool(args.from_child))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one size end to end; returns what it wrote to the JSON."""
    args = parse_args(argv)
    if args.from_json:
        return redraw(args)
    h.start(args)
    name = h.size_name(args)
    size, paths = SIZES[name], outputs(name, args.out)
    if args.lrs:
        size = replace(size, sweep_lrs={**size.sweep_lrs, **parse_lr_sweep(args.lrs, ARMS, "--lrs")})
    size, left_out = without_parent(size) if args.from_child else (size, [])
    start = time.perf_counter()
    ctx = context(args, size, name)
    calibration = time.perf_counter() - start
    outcome = run_size(ctx, name)
    outcome.seconds = {"calibration": calibration, **outcome.seconds}
    results = {**results_json(outcome, size, meta(ctx, name)), "left_out": left_out}
    results["seed_spread"] = seed_spread(outcome, size)
    write_all(results, size, paths, readme_for(args, name))
    print(f"\n{headline(results)}\n\n" + "\n\n".join(drop_table(s) for s in results["stages"].values()))
    print(f"\nwrote {paths['json']}, the plots and {paths['doc']}; run metrics in {ctx.runs}; "
          f"total {(time.perf_counter() - start) / 60:.1f} min")
    return results


if __name__ == "__main__":
    main()
