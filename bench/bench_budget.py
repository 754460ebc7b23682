"""The iso-loss speedup at a longer budget: random init, subclone and subclone+distill, each arm at its best lr
(see bench/README.md). Writes docs/speedup_vs_budget.json, docs/bench_budget_*.png, the "budget" section of
docs/BENCHMARKS.md and the README's marked budget line (``--gpu``: the same names with "-gpu").

Run: python -m bench.bench_budget [--smoke | --gpu] [--report-only | --from-child DIR]
"""

from __future__ import annotations

import argparse
import json
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
from subclone_core.training.speedup import DROP_FRACTIONS, iso_loss, result_track
from subclone_core.training.sweep import candidate_of, edge_note, grid_edge, lr_text, run_name
from subclone_core.workflow.children import measure_importance

ARMS = ("random", "subclone", "subclone+distill")
NAMES = {"random": "random init", "subclone": "subclone", "subclone+distill": "subclone + distillation from the parent"}
COLORS = {"random": "#d62728", "subclone": "#1f77b4", "subclone+distill": "#2ca02c"}


@dataclass(frozen=True)
class Stage:
    """One engine call: some arms of one child shape, one seed (data order, dropout, random init's weights), one
    token budget per arm (whole steps)."""

    key: str
    shape: str
    arms: tuple[str, ...]
    tokens: int
    seed: int = 0


@dataclass(frozen=True)
class Size:
    """Everything one size runs; evaluations are spread evenly in log(tokens), and each arm's lr grid is swept in
    the first stage (its lowest best loss is its lr in every later stage)."""

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


SIZES = {
    "smoke": Size(SMOKE_SHAPES, batch_size=4, seq_len=32, val_tokens=256, evals=4, calib_tokens=256,
                  sweep_lrs={"random": (1e-3, 2e-3, 3e-3), "subclone": (1e-3, 3e-3), "subclone+distill": (1e-3,)},
                  stages=(Stage("final", "aggressive", ("random", "subclone"), 2048),
                          Stage("seed1", "aggressive", ("random", "subclone"), 1024, seed=1),
                          Stage("distill", "aggressive", ("subclone+distill",), 1024),
                          Stage("paper-like", "paper-like", ("random", "subclone"), 1024)), minutes=1),
    # bf16, device "auto": seven runs of 1.5M tokens at about 1,060 tokens/s on an idle 2-core Xeon (one H200:
    # 2.8 min). Both grids bracket their arm's best lr at this budget, measured: random init 1e-3 (2.5e-4 and
    # 4e-3 were worse too), the refit child 4e-3. A second seed, distillation and the paper-like ratio: gpu.
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


@dataclass
class Run:
    """One size's run: the parent (or a saved subcloned child standing in for it: ``from_child``), its calibration,
    the data id, the size, where run metrics go, the initial children made so far; then the sweep's rows, each
    arm's lr, each stage's runs and the seconds per part."""

    parent: Parent
    importance: Any
    data: str
    size: Size
    runs: Path
    seconds: dict[str, float]
    children: dict[tuple[str, str, int], Any] = field(default_factory=dict)
    sweep: list[dict[str, Any]] = field(default_factory=list)
    lrs: dict[str, float] = field(default_factory=dict)
    stages: dict[str, dict[str, RunResult]] = field(default_factory=dict)
    from_child: bool = False

    def child(self, shape: str, arm: str, seed: int) -> Any:
        """The arm's initial child (cached): random init depends on the seed, the subcloned child does not; a saved
        child trains as it is, and random init takes its config."""
        if self.from_child and arm != "random":
            return self.parent.model
        variant = RANDOM if arm == "random" else LM_CHILD
        key = (shape, variant.strategy, seed if arm == "random" else 0)
        if key not in self.children:
            target = plan_shape(self.parent.model, **({} if self.from_child else self.size.shapes[shape]))
            self.children[key] = child_model(self.parent, target, variant, self.importance, seed)
        return self.children[key]


def train(run: Run, stage: Stage, lrs: dict[str, tuple[float, ...]], name: Any) -> dict[str, RunResult]:
    """The stage's arms at the given lrs (candidates named ``name(arm, lr)``), side by side on identical batches
    for its full budget; timed."""
    start, size = time.perf_counter(), run.size
    cands = [h.candidate(name(arm, lr), run.child(stage.shape, arm, stage.seed), lr, arm,
                         teacher=run.parent.model if arm == "subclone+distill" else None)
             for arm in stage.arms for lr in lrs[arm]]
    # The whole split for every stage: the batch order then depends on the seed alone, so a shorter run
    # (a sweep, the distillation arm) sees exactly the first batches of the longer runs of its seed.
    train_data = make_data(run.parent, run.data, "train", seq_len=size.seq_len)
    val = make_data(run.parent, run.data, "validation", seq_len=size.seq_len, max_tokens=size.val_tokens)
    steps = max(1, stage.tokens // (size.batch_size * size.seq_len))
    config = h.train_config(steps, size.batch_size, len(val), round_down=True, seed=stage.seed,
                            eval_at=log_eval_steps(steps, size.evals), precision=size.precision)
    results = h.train(cands, train_data, val, config, stage.key, run.runs / f"{stage.key}.jsonl")
    run.seconds[stage.key] = time.perf_counter() - start
    return results


def run_stages(run: Run) -> None:
    """The first stage at every lr of each arm's grid (a sweep row per run; each arm's run of lowest best loss
    chosen), then every later stage at the chosen lrs."""
    (first, *later), grids = run.size.stages, run.size.sweep_lrs
    runs = train(run, first, grids, run_name)
    run.stages[first.key] = chosen = h.best_runs(runs, "loss", always=True)
    run.lrs = {arm: chosen[arm].lr for arm in first.arms}
    run.sweep = [h.run_json(r, curve=False, arm=arm, budget_tokens=first.tokens, chosen=r is chosen[arm],
                            note=edge_note(arm, run.lrs[arm], grid_edge(run.lrs[arm], grids[arm])))
                 for arm in first.arms for n, r in runs.items() if candidate_of(n) == arm]
    # an arm first trained in a later stage (the smoke size's distillation) has one lr in its grid
    run.lrs.update({arm: grid[0] for arm, grid in grids.items() if arm not in run.lrs and len(grid) == 1})
    for stage in later:
        run.stages[stage.key] = train(run, stage, {arm: (lr,) for arm, lr in run.lrs.items()}, lambda arm, _: arm)


def iso_json(base: RunResult, other: RunResult, name: str, **levels: Any) -> list[dict[str, Any]]:
    """The iso-loss rows of ``other`` against random init's run ``base`` (every level, or ``fractions`` or
    ``levels`` as iso_loss takes them): loss, either's tokens, speedup (their ratio) and detail."""
    return [{"loss": r.level, "random_tokens": r.baseline_tokens, f"{name}_tokens": r.candidate_tokens,
             "speedup": r.speedup, "lower_bound": r.lower_bound, "at_start": r.at_start, "fraction": r.fraction,
             "random_steps": r.baseline_steps, f"{name}_steps": r.candidate_steps, "text": r.text()}
            for r in iso_loss(result_track(base, "loss"), result_track(other, "loss"), **levels)]


def stage_json(run: Run, stage: Stage) -> dict[str, Any]:
    """A stage's plan, minutes and runs, and each arm's iso-loss rows against random init's run of the same
    shape and seed: its own, else another stage's (one seed sees the same batches in the same order)."""
    runs = run.stages[stage.key]
    base = next((run.stages[s.key]["random"] for s in (stage, *run.size.stages)
                 if s.shape == stage.shape and s.seed == stage.seed and "random" in run.stages[s.key]), None)
    others = {arm: r for arm, r in runs.items() if arm != "random" and base is not None}
    return {"shape": stage.shape, "shape_sizes": run.size.shapes[stage.shape], "seed": stage.seed,
            "tokens": stage.tokens, "minutes": round(run.seconds[stage.key] / 60, 1),
            "arms": {arm: h.run_json(r) for arm, r in runs.items()},
            "iso_loss": {arm: iso_json(base, r, arm) for arm, r in others.items()},
            "at_drop": {arm: iso_json(base, r, arm, fractions=DROP_FRACTIONS) for arm, r in others.items()}}


def seed_spread(run: Run) -> list[dict[str, Any]]:
    """The subcloned child's speedup for each later seed at its drop levels (from its own random-init curve,
    which may run a shorter budget), and seed 0's speedup read at the same levels."""
    out, pair, stages = [], {"random", "subclone"}, run.size.stages
    for stage in (s for s in stages if s.seed != 0 and pair <= set(s.arms)):
        runs = run.stages[stage.key]
        zero = next((run.stages[s.key] for s in stages if s.shape == stage.shape and s.seed == 0
                     and pair <= set(s.arms)), None)
        for row in iso_json(runs["random"], runs["subclone"], "subclone", fractions=DROP_FRACTIONS) if zero else ():
            ref = iso_json(zero["random"], zero["subclone"], "subclone", levels=[row["loss"]])[0]
            out.append({"stage": stage.key, "shape": stage.shape, "seed": stage.seed, "fraction": row["fraction"],
                        "loss": row["loss"], "speedup_seed0": ref["speedup"], "speedup": row["speedup"],
                        "text_seed0": ref["text"], "text": row["text"]})
    return out


def results_json(run: Run, meta: dict[str, Any]) -> dict[str, Any]:
    """docs/speedup_vs_budget.json: each arm's first run on the aggressive child with seed 0 (the headline) at
    the top, then every stage and the seed spread."""
    head: dict[str, RunResult] = {}
    for stage in (s for s in run.size.stages if s.shape == "aggressive" and s.seed == 0):
        for arm, r in run.stages[stage.key].items():
            head.setdefault(arm, r)
    base = head["random"]
    return {**meta, "arms": {arm: h.run_json(r) for arm, r in head.items()}, "random_tokens": base.seen,
            "iso_loss": iso_json(base, head["subclone"], "subclone"),
            "at_drop": {arm: iso_json(base, r, arm, fractions=DROP_FRACTIONS) for arm, r in head.items()
                        if arm != "random"},
            "lrs": run.lrs, "sweep": run.sweep, "stages": {s.key: stage_json(run, s) for s in run.size.stages},
            "minutes": {part: round(s / 60, 1) for part, s in run.seconds.items()}, "seed_spread": seed_spread(run)}


def fmt_tokens(n: float | None) -> str:
    """1234567 -> "1.23M", 98304 -> "98k"."""
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e3 else f"{n:.0f}"


def final_row(results: dict[str, Any]) -> dict[str, Any] | None:
    """The subcloned child's row at random init's final (best) loss, from the headline runs."""
    rows = results["at_drop"].get("subclone") or []
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
    """The "budget" section of docs/BENCHMARKS.md (the template says what it holds)."""
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
                points = [(t, v) for t, v in zip(curve["tokens"], curve["values"]) if t > 0]
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
            line = ":" if stage["shape"] != "aggressive" else "-" if stage["seed"] == 0 else "--"
            for bound in (False, True):  # lower bounds: unjoined, unlabeled triangles
                points = [(r["loss"], r["speedup"]) for r in rows if r["speedup"] is not None
                          and bool(r["lower_bound"]) == bound]
                style = {"marker": "^", "linestyle": "none"} if bound else {
                    "marker": ".", "linestyle": line, "label": f"{arm} ({key}, {stage['shape']})"}
                if points:
                    ax.plot(*zip(*points), color=COLORS.get(arm), **style)
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
            rp.log(f"note: {readme} has no <!-- begin {marker} --> markers; that text is not updated")


def without_parent(size: Size) -> tuple[Size, list[str]]:
    """The stages a saved child can run without its parent (its own shape, no teacher), and a line per stage
    left out."""
    keep = tuple(s for s in size.stages if s.shape == "aggressive" and "subclone+distill" not in s.arms)
    return replace(size, stages=keep), [f"Left out without the parent (--from-child): stage {s.key} ({s.shape} "
                                        f"child, {', '.join(s.arms)})." for s in size.stages if s not in keep]


def open_parent(args: argparse.Namespace, size: Size) -> tuple[Parent, Any]:
    """The parent and its calibration, or a saved child (--from-child: where the parent cannot be loaded, as on a
    GPU machine without the embedded packages) labelled with the parent its manifest names, and no calibration."""
    if not args.from_child:
        parent = load_parent(args.parent)
        return parent, measure_importance(parent, args.data, tokens=size.calib_tokens)
    parent, manifest = load_parent(str(args.from_child)), read_manifest(args.from_child)
    made_from = (manifest.parent.label if manifest and manifest.parent else None) or "a parent"
    parent.label = f"{parent.label}: a child of {made_from}, saved by `subclone make`"
    return parent, None


def measure(args: argparse.Namespace, name: str) -> tuple[dict[str, Any], Path]:
    """Calibrate (or take a saved child: --from-child, without the stages that need the parent) and run the
    size's stages; returns the JSON and the folder of run metrics."""
    start = time.perf_counter()
    size, left_out = without_parent(SIZES[name]) if args.from_child else (SIZES[name], [])
    parent, importance = open_parent(args, size)
    run = Run(parent, importance, args.data, size, Path(tempfile.mkdtemp(prefix=f"subclone-budget-{name}-runs-")),
              {"calibration": time.perf_counter() - start}, from_child=bool(args.from_child))
    run_stages(run)
    meta = {"size": name, "machine": rp.machine(), "parent": parent.label, "data": args.data,
            "train_tokens": int(make_data(parent, args.data, "train", seq_len=size.seq_len).tokens.numel()),
            "batch": [size.batch_size, size.seq_len], "precision": size.precision, "planned_minutes": size.minutes,
            "plan": {"sweep_lrs": size.sweep_lrs, "stages": [asdict(s) for s in size.stages]}}
    return {**results_json(run, meta), "left_out": left_out}, run.runs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one size end to end (or redraw its saved JSON: --report-only); returns what the JSON holds."""
    parser = rp.bench_parser(__doc__, smoke="a minute on a tiny parent (give --parent, --data)",
                             gpu="100M+ tokens per arm; give --data a large corpus", threads=rp.THREADS_HELP,
                             report_only="redraw the plots, report and README text from the size's JSON in --out")
    parser.add_argument("--parent", default="default", help="parent id (default: the embedded SmolLM2-135M)")
    parser.add_argument("--data", default="default", help="data id (default: the embedded Wikipedia text)")
    parser.add_argument("--out", type=Path, help="folder for the JSON, plots and BENCHMARKS.md (default docs/)")
    parser.add_argument("--readme", type=Path, help="README whose marked budget line to rewrite (default: "
                        "README.md for the cpu and gpu sizes, none for smoke)")
    parser.add_argument("--from-child", type=Path, help="train this child saved by `subclone make` and random init "
                        "of its config, without the parent (the stages that need it are left out)")
    args = parser.parse_args(argv)
    h.start(args)
    name, start = h.size_name(args), time.perf_counter()
    paths = outputs(name, args.out)
    if args.report_only:
        results, runs = json.loads(paths["json"].read_text()), None
    else:
        results, runs = measure(args, name)
    write_all(results, SIZES[name], paths, args.readme or (None if name == "smoke" else rp.ROOT / "README.md"))
    if runs:
        print(render("budget_summary", r=results, headline=headline(results), tokens=fmt_tokens))
        print(f"\nwrote {paths['json']}, the plots and {paths['doc']}; run metrics in {runs}; "
              f"total {(time.perf_counter() - start) / 60:.1f} min")
    return results


if __name__ == "__main__":
    main()
