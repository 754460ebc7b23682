"""The iso-loss speedup at a longer budget: random init, subclone and subclone+distill, each arm at its best lr
(see bench/README.md). Writes docs/speedup_vs_budget.json, docs/bench_budget_*.png, the "budget" section of
docs/BENCHMARKS.md and the README's marked budget line (``--gpu``: the same names with "-gpu").

Run: python -m bench.bench_budget [--smoke | --gpu] [--from-json F | --from-child DIR] [--lrs GRID]
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

from bench import _harness as h
from bench import _report as rp
from bench._harness import SMOKE_SHAPES
from bench._report import PAPER_SPEEDUP, log_eval_steps, render
from bench.bench_training import LM_CHILD, RANDOM, child_model
from subclone_core.core.strategies import plan_shape
from subclone_core.io.atomic import write_text
from subclone_core.io.saving import read_manifest
from subclone_core.sources import Parent, load_parent, make_data
from subclone_core.training import RunResult
from subclone_core.training.speedup import DROP_FRACTIONS, IsoLoss, iso_loss, result_track
from subclone_core.training.sweep import candidate_of, edge_note, grid_edge, lr_text, parse_lr_sweep, run_name
from subclone_core.workflow.children import measure_importance

README = rp.ROOT / "README.md"
ARMS = ("random", "subclone", "subclone+distill")
NAMES = {"random": "random init", "subclone": "subclone", "subclone+distill": "subclone + distillation from the parent"}
COLORS = {"random": "#d62728", "subclone": "#1f77b4", "subclone+distill": "#2ca02c"}


@dataclass(frozen=True)
class Stage:
    """One call of the training engine: some arms of one child shape, one seed (data order, dropout, random
    init's weights), one token budget per arm (whole steps); ``evals`` (after step 0) None takes the size's."""

    key: str
    shape: str
    arms: tuple[str, ...]
    tokens: int
    seed: int = 0
    evals: int | None = None


@dataclass(frozen=True)
class Size:
    """Everything one size runs: child sizes per shape, the batch, the validation set, evaluations per run
    (evenly in log(tokens)), calibration tokens, each arm's lr grid of the first stage (the sweep; its lowest
    best loss is its lr in every later stage), the stages, the engine's mixed_precision, the planned minutes."""

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
    # bf16, device "auto". On an idle 2-core Xeon an aggressive arm trains at about 1,060 tokens/s, so these
    # seven runs of 1.5M tokens take about 80 minutes (one H200: 2.8); the second seed, distillation and the
    # paper-like ratio are the gpu size's. Both grids bracket their arm's best lr at this budget, measured:
    # random init 1e-3 (2.5e-4 and 4e-3 were worse too), the refit child 4e-3.
    "cpu": Size(rp.SHAPES, batch_size=16, seq_len=128, val_tokens=4096, evals=30, calib_tokens=4096,
                sweep_lrs={"random": (5e-4, 1e-3, 2e-3), "subclone": (1e-3, 2e-3, 4e-3, 8e-3)},
                stages=(Stage("final", "aggressive", ("random", "subclone"), 1_501_184),),
                precision="bf16", minutes=80),
    # One H200-class GPU: 100M+ tokens per arm at the paper-like ratio, two seeds of every final arm.
    "gpu": Size(rp.SHAPES, batch_size=64, seq_len=512, val_tokens=65_536, evals=40, calib_tokens=8192,
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
    """What every stage shares: the parent (or a saved subcloned child standing in for it, trained as is, with
    random init of its config), its calibration, the data id, the size and where run metrics go."""

    parent: Parent
    importance: Any
    data: str
    size: Size
    runs: Path
    children: dict[tuple[str, str, int], Any] = field(default_factory=dict)
    from_child: bool = False


def child_for(ctx: Context, shape: str, arm: str, seed: int) -> Any:
    """The arm's initial child (cached): random init depends on the seed, the subcloned child does not."""
    strategy = "random" if arm == "random" else "subclone"
    key = (shape, strategy, seed if strategy == "random" else 0)
    if ctx.from_child and strategy == "subclone":
        return ctx.parent.model
    if key not in ctx.children:
        target = plan_shape(ctx.parent.model, **({} if ctx.from_child else ctx.size.shapes[shape]))
        ctx.children[key] = child_model(ctx.parent, target, RANDOM if strategy == "random" else LM_CHILD,
                                        ctx.importance, seed)
    return ctx.children[key]


def without_parent(size: Size) -> tuple[Size, list[str]]:
    """The size's stages that a saved child can run without its parent (the aggressive shape, no teacher),
    and a sentence for each stage left out."""
    keep = tuple(s for s in size.stages if s.shape == "aggressive" and "subclone+distill" not in s.arms)
    notes = [f"Left out without the parent (--from-child): stage {s.key} ({s.shape} child, {', '.join(s.arms)})."
             for s in size.stages if s not in keep]
    return replace(size, stages=keep), notes


def train(ctx: Context, stage: Stage, lrs: dict[str, tuple[float, ...]], name: Any) -> dict[str, RunResult]:
    """The stage's arms at the given lrs (candidate names from ``name(arm, lr)``), side by side on identical
    batches for its full budget; curves kept, weights freed."""
    size = ctx.size
    cands = [h.candidate(name(arm, lr), child_for(ctx, stage.shape, arm, stage.seed), lr, arm,
                         teacher=ctx.parent.model if arm == "subclone+distill" else None)
             for arm in stage.arms for lr in lrs[arm]]
    # The whole split for every stage: the batch order then depends on the seed alone, so a shorter run
    # (a sweep, the distillation arm) sees exactly the first batches of the longer runs of its seed.
    train_data = make_data(ctx.parent, ctx.data, "train", seq_len=size.seq_len)
    val = make_data(ctx.parent, ctx.data, "validation", seq_len=size.seq_len, max_tokens=size.val_tokens)
    steps = max(1, stage.tokens // size.step_tokens)
    config = h.train_config(steps, size.batch_size, len(val), round_down=True, seed=stage.seed,
                            eval_at=log_eval_steps(steps, stage.evals or size.evals), precision=size.precision)
    return h.train(cands, train_data, val, config, stage.key, ctx.runs / f"{stage.key}.jsonl")


@dataclass
class Outcome:
    """What a size produced: one row per sweep run, each arm's winning lr, {stage key: {arm: its run}} and the
    wall seconds per part ("calibration", then each stage key)."""

    sweep: list[dict[str, Any]]
    lrs: dict[str, float]
    stages: dict[str, dict[str, RunResult]]
    seconds: dict[str, float]


def run_size(ctx: Context) -> Outcome:
    """The first stage: each arm at every lr of its grid for the full budget (a row per run), each arm's run of
    lowest best loss chosen; then every later stage at those lrs. Each stage is timed."""
    (first, *later), grids = ctx.size.stages, ctx.size.sweep_lrs
    start = time.perf_counter()
    runs = train(ctx, first, grids, run_name)
    chosen = h.best_runs(runs, "loss", always=True)
    lrs = {arm: chosen[arm].lr for arm in first.arms}
    rows = [{"arm": arm, "lr": r.lr, "tokens": first.tokens, **h.pick(h.facts(r), "status", "best", "final"),
             "chosen": r is chosen[arm], "note": edge_note(arm, lrs[arm], grid_edge(lrs[arm], grids[arm]))}
            for arm in first.arms for n, r in runs.items() if candidate_of(n) == arm]
    # an arm first trained in a later stage (the smoke size's distillation) has one lr in its grid
    lrs.update({arm: grid[0] for arm, grid in grids.items() if arm not in lrs and len(grid) == 1})
    outcome = Outcome(rows, lrs, {first.key: chosen}, {first.key: time.perf_counter() - start})
    for stage in later:
        begin = time.perf_counter()
        outcome.stages[stage.key] = train(ctx, stage, {arm: (lr,) for arm, lr in lrs.items()}, lambda arm, _: arm)
        outcome.seconds[stage.key] = time.perf_counter() - begin
    return outcome


# --- results --------------------------------------------------------------------------------------------


def arm_json(run: RunResult) -> dict[str, Any]:
    """A run's validation curve against tokens (and steps), its lr and status."""
    return {**h.pick(h.facts(run), "tokens", "steps", "val_loss", "lr", "status"),
            "throughput": round(run.throughput, 1)}


def iso_rows(base: RunResult, other: RunResult, **levels: Any) -> list[IsoLoss]:
    """The library's iso-loss rows of ``other`` against random init's run ``base`` (``fractions`` or ``levels``
    as iso_loss takes them)."""
    return iso_loss(result_track(base, "loss"), result_track(other, "loss"), **levels)


def iso_json(base: RunResult, other: RunResult, name: str, fractions: tuple[float, ...] | None = None
             ) -> list[dict[str, Any]]:
    """iso_rows in the JSON's schema: loss, random_tokens, <name>_tokens, speedup (= their ratio), and detail."""
    return [{"loss": r.level, "random_tokens": r.baseline_tokens, f"{name}_tokens": r.candidate_tokens,
             "speedup": r.speedup, "lower_bound": r.lower_bound, "at_start": r.at_start, "fraction": r.fraction,
             "random_steps": r.baseline_steps, f"{name}_steps": r.candidate_steps, "text": r.text()}
            for r in iso_rows(base, other, fractions=fractions)]


def iso_by_arm(base: RunResult | None, runs: dict[str, RunResult]) -> dict[str, dict[str, list]]:
    """Every level ("iso_loss") and the drop levels ("at_drop") of each arm but random init against ``base``."""
    others = {arm: run for arm, run in runs.items() if arm != "random" and base is not None}
    return {"iso_loss": {arm: iso_json(base, run, arm) for arm, run in others.items()},
            "at_drop": {arm: iso_json(base, run, arm, DROP_FRACTIONS) for arm, run in others.items()}}


def baseline_of(outcome: Outcome, stage: Stage, size: Size) -> RunResult | None:
    """Random init's run for a stage: its own, else that of another stage of the same shape and seed (stages of
    one seed see the same batches in the same order, see train)."""
    for other in (stage, *size.stages):
        runs = outcome.stages.get(other.key, {})
        if other.shape == stage.shape and other.seed == stage.seed and "random" in runs:
            return runs["random"]
    return None


def results_json(outcome: Outcome, size: Size, meta: dict[str, Any]) -> dict[str, Any]:
    """docs/speedup_vs_budget.json: each arm's first run on the aggressive child with seed 0 (the headline) at the
    top, every stage below it."""
    runs: dict[str, RunResult] = {}
    for stage in (s for s in size.stages if s.shape == "aggressive" and s.seed == 0):
        for arm, run in outcome.stages[stage.key].items():
            runs.setdefault(arm, run)
    stages = {s.key: {"shape": s.shape, "shape_sizes": size.shapes[s.shape], "seed": s.seed, "tokens": s.tokens,
                      "minutes": round(outcome.seconds[s.key] / 60, 1),
                      "arms": {arm: arm_json(run) for arm, run in outcome.stages[s.key].items()},
                      **iso_by_arm(baseline_of(outcome, s, size), outcome.stages[s.key])} for s in size.stages}
    base = runs["random"]
    return {**meta, "arms": {arm: arm_json(run) for arm, run in runs.items()}, "random_tokens": base.seen,
            "iso_loss": iso_json(base, runs["subclone"], "subclone"), "at_drop": iso_by_arm(base, runs)["at_drop"],
            "lrs": outcome.lrs, "sweep": outcome.sweep, "stages": stages,
            "minutes": {part: round(s / 60, 1) for part, s in outcome.seconds.items()}}


def seed_spread(outcome: Outcome, size: Size) -> list[dict[str, Any]]:
    """The subcloned child's speedup for seed 0 and each other seed, at the other seed's drop levels: its own
    random-init curve sets the levels (it may run a shorter budget), seed 0's speedup is read at the same levels."""
    out = []
    for stage in size.stages:
        runs = outcome.stages[stage.key]
        first = next((s for s in size.stages if s.shape == stage.shape and s.seed == 0 and "subclone" in s.arms
                      and "random" in s.arms), None)
        if stage.seed == 0 or "random" not in runs or "subclone" not in runs or first is None:
            continue
        zero = outcome.stages[first.key]
        for row in iso_rows(runs["random"], runs["subclone"], fractions=DROP_FRACTIONS):
            ref = iso_rows(zero["random"], zero["subclone"], levels=[row.level])[0]
            out.append({"stage": stage.key, "shape": stage.shape, "seed": stage.seed, "fraction": row.fraction,
                        "loss": row.level, "speedup_seed0": ref.speedup, "speedup": row.speedup,
                        "text_seed0": ref.text(), "text": row.text()})
    return out


# --- the report -----------------------------------------------------------------------------------------


def fmt_tokens(n: float | None) -> str:
    """1234567 -> "1.23M", 98304 -> "98k"."""
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e3 else f"{n:.0f}"


def final_row(results: dict[str, Any], arm: str = "subclone") -> dict[str, Any] | None:
    """The arm's row at random init's final (best) loss, from the headline runs."""
    rows = results["at_drop"].get(arm) or []
    return rows[-1] if rows else None


def headline(results: dict[str, Any]) -> str:
    """The speedup at random init's final loss, set against the paper's 4x and the early head start (25% of
    random init's loss drop): whether the lead shrinks or grows from there (by over 10%) is decided here."""
    final, early = final_row(results), (results["at_drop"].get("subclone") or [None])[0]
    trend = ""
    if (final is not None and early is not None and final["speedup"] is not None and early["speedup"] is not None
            and not (final["lower_bound"] or early["lower_bound"])):
        trend = ("shrinks" if final["speedup"] < early["speedup"] * 0.9 else
                 "grows" if final["speedup"] > early["speedup"] * 1.1 else "same")
    return render("budget_headline", r=results, final=final, early=early, trend=trend, tokens=fmt_tokens,
                  paper=PAPER_SPEEDUP)


def lr_picks(results: dict[str, Any], sep: str = ", ", name: Any = str) -> list[str]:
    """"random 1e-3 of 5e-4, 1e-3, 2e-3", ...: each arm's chosen lr of its grid (rates as sweeps name them:
    2.5e-4, not a rounded 3e-04), for the arms whose grid has several."""
    grid = results.get("plan", {}).get("sweep_lrs", {})
    return [f"{name(arm)} {lr_text(lr)} of {sep.join(lr_text(x) for x in grid[arm])}"
            for arm, lr in results.get("lrs", {}).items() if len(grid.get(arm, ())) > 1]


def readme_texts(results: dict[str, Any], suffix: str) -> dict[str, str]:
    """The README's marked budget line and the benchmark table's cell for the aggressive child."""
    values = {"r": results, "final": final_row(results), "tokens": fmt_tokens}
    gpu = results["machine"].split(", ")[2] if ", " in results["machine"] else "no GPU"
    line = render("budget_readme", **values, where="CPU" if gpu == "no GPU" else gpu, paper=PAPER_SPEEDUP,
                  picks=lr_picks(results, "/", NAMES.get))
    return {f"budget-speedup{suffix}": line, f"budget-cell{suffix}": render("budget_cell", **values)}


def section_markdown(results: dict[str, Any], size: Size, plots: dict[str, Path]) -> str:
    """The "budget" section of docs/BENCHMARKS.md: headline, settings, each stage's drop table, the seed spread,
    the plots and the sweep (every run, the chosen ones marked, notes on chosen lrs at the edge of a grid)."""
    return render("budget", r=results, size=size, plots=plots, headline=headline(results), tokens=fmt_tokens)


def _log_ticks(axis: Any, formatter: Any) -> None:
    """A log axis whose major ticks read ``formatter(value)`` and whose minor ticks are unlabeled."""
    axis.set_major_formatter(lambda value, _: formatter(value))
    axis.set_minor_formatter(lambda value, _: "")


def plot_curves(results: dict[str, Any], path: Path) -> None:
    """Validation loss against tokens (log x, so step 0 is left out), one panel per child shape; later seeds dashed."""
    shapes = list(dict.fromkeys(s["shape"] for s in results["stages"].values()))
    fig, axes = rp.panels(len(shapes), 5.6, 3.8)
    for ax, shape in zip(axes[0], shapes):
        for key, stage in results["stages"].items():
            for arm, curve in stage["arms"].items() if stage["shape"] == shape else ():
                points = [(t, v) for t, v in zip(curve["tokens"], curve["val_loss"]) if t > 0]  # log x: no 0
                if points:
                    ax.plot(*zip(*points), color=COLORS.get(arm), linestyle="-" if stage["seed"] == 0 else "--",
                            marker=".", markersize=3, label=f"{arm} (lr {curve['lr']:g}, {key})")
        ax.set_xscale("log")
        _log_ticks(ax.xaxis, fmt_tokens)  # "10k", "1.00M": no crowded powers
        rp.finish(ax, which="both", title=f"{shape} child", xlabel="training tokens", ylabel="validation loss")
    rp.save_figure(fig, path)


def plot_speedup(results: dict[str, Any], path: Path) -> None:
    """Iso-loss speedup against the loss level random init reached (x reversed: training goes right); lower
    bounds (there at step 0) as triangles."""
    fig, axes = rp.panels(1, 6.4, 4.0)
    ax = axes[0][0]
    for key, stage in results["stages"].items():
        for arm, rows in stage["iso_loss"].items():
            style = {"color": COLORS.get(arm), "linestyle": ":" if stage["shape"] != "aggressive" else
                     "-" if stage["seed"] == 0 else "--"}
            points = [(r["loss"], r["speedup"], r["lower_bound"]) for r in rows if r["speedup"] is not None]
            exact = [(loss, speedup) for loss, speedup, bound in points if not bound]
            bounds = [(loss, speedup) for loss, speedup, bound in points if bound]
            if exact:
                ax.plot(*zip(*exact), marker=".", label=f"{arm} ({key}, {stage['shape']})", **style)
            if bounds:
                ax.plot(*zip(*bounds), marker="^", linestyle="none", color=style["color"])
    ax.axhline(1.0, color="grey", linewidth=1)
    ax.axhline(PAPER_SPEEDUP, color="black", linestyle=":", linewidth=1, label=f"paper's ~{PAPER_SPEEDUP:.0f}x")
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    ax.set_yticks([t for t in (0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128) if low <= t <= high])
    _log_ticks(ax.yaxis, lambda value: f"{value:g}x")
    ax.invert_xaxis()
    rp.finish(ax, which="both", xlabel="validation loss level (random init's curve)",
              ylabel="speedup (random init's tokens / arm's)",
              title="Iso-loss speedup (triangles: lower bounds, there at step 0)")
    rp.save_figure(fig, path)


# --- main -----------------------------------------------------------------------------------------------


def outputs(name: str, out: Path | None) -> dict[str, Path]:
    """Where everything goes: docs/ for real sizes, a temporary folder for the smoke size (unless --out)."""
    suffix = "-gpu" if name == "gpu" else ""
    folder = h.folder(name, out, "subclone-budget-")
    return {"json": folder / f"speedup_vs_budget{suffix}.json", "curves": folder / f"bench_budget_curves{suffix}.png",
            "speedup": folder / f"bench_budget_speedup{suffix}.png", "doc": folder / rp.DOC.name}


def write_all(results: dict[str, Any], size: Size, paths: dict[str, Path], readme: Path | None) -> None:
    """The JSON, both plots, the BENCHMARKS.md section and (where it has the markers) the README line."""
    suffix = "-gpu" if results["size"] == "gpu" else ""
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    write_text(paths["json"], json.dumps(results, indent=1, default=rp.json_default))
    plot_curves(results, paths["curves"])
    plot_speedup(results, paths["speedup"])
    rp.write_section(f"budget{suffix}", section_markdown(results, size, paths), paths["doc"])
    for marker, text in readme_texts(results, suffix).items() if readme else ():
        if not rp.replace_marked(readme, marker, text):
            print(f"note: {readme} has no <!-- begin {marker} --> markers; that text is not updated", file=sys.stderr)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The size flags and the parent, data, outputs, README, a saved JSON or child and an lr grid."""
    parser = rp.bench_parser(__doc__, smoke="a minute on a tiny parent (give --parent, --data)",
                             gpu="100M+ tokens per arm; give --data a large corpus", threads=rp.THREADS_HELP)
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


def measure(args: argparse.Namespace, name: str) -> tuple[dict[str, Any], Size, Path]:
    """Calibrate (or take a saved child as the parent: --from-child) and run the size's stages (the --lrs grid,
    without the stages a saved child cannot run); returns the JSON, the size and the folder of run metrics."""
    size = SIZES[name]
    if args.lrs:
        size = replace(size, sweep_lrs={**size.sweep_lrs, **parse_lr_sweep(args.lrs, ARMS, "--lrs")})
    size, left_out = without_parent(size) if args.from_child else (size, [])
    start = time.perf_counter()
    parent = load_parent(str(args.from_child) if args.from_child else args.parent)
    importance = None if args.from_child else measure_importance(parent, args.data, tokens=size.calib_tokens)
    if args.from_child:
        manifest = read_manifest(args.from_child)
        made_from = (manifest.parent.label if manifest and manifest.parent else None) or "a parent"
        parent.label = f"{parent.label}: a child of {made_from}, saved by `subclone make`"
    ctx = Context(parent, importance, args.data, size, Path(tempfile.mkdtemp(prefix=f"subclone-budget-{name}-runs-")),
                  from_child=bool(args.from_child))
    calibration = time.perf_counter() - start
    outcome = run_size(ctx)
    outcome.seconds = {"calibration": calibration, **outcome.seconds}
    meta = {"size": name, "machine": rp.machine(), "parent": parent.label, "data": args.data,
            "train_tokens": int(make_data(parent, args.data, "train", seq_len=size.seq_len).tokens.numel()),
            "batch": [size.batch_size, size.seq_len], "precision": size.precision, "planned_minutes": size.minutes,
            "plan": {"sweep_lrs": size.sweep_lrs, "stages": [asdict(s) for s in size.stages]}}
    results = {**results_json(outcome, size, meta), "left_out": left_out}
    results["seed_spread"] = seed_spread(outcome, size)
    return results, size, ctx.runs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one size end to end (or redraw a saved JSON: --from-json); returns what it wrote to the JSON."""
    args = parse_args(argv)
    start = time.perf_counter()
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        name, size, runs = results["size"], SIZES[results["size"]], None
    else:
        h.start(args)
        name = h.size_name(args)
        results, size, runs = measure(args, name)
    paths = outputs(name, args.out)
    write_all(results, size, paths, args.readme if args.readme or name == "smoke" else README)
    if runs:
        print(render("budget_summary", r=results, headline=headline(results), tokens=fmt_tokens))
        print(f"\nwrote {paths['json']}, the plots and {paths['doc']}; run metrics in {runs}; "
              f"total {(time.perf_counter() - start) / 60:.1f} min")
    return results


if __name__ == "__main__":
    main()
