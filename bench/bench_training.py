"""Training speedup of subcloned children over random init: the default LM parent and the self-pretrained ViT,
each candidate at its best lr of a sweep (see bench/README.md). Sizes: --smoke (seconds; writes under /tmp
only), the default CPU size (about 25 minutes on 2 cores), --gpu (longer budgets). Writes docs/training_lm.json,
docs/training_vit.json, the plots and their sections of BENCHMARKS.md.

Run: python -m bench.bench_training [--smoke | --gpu] [--only lm|vit] [--report-only]
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench import _harness as h
from bench import _report as rp
from bench._harness import Budget
from bench._report import PAPER_SPEEDUP, render
from subclone_core.core.shape import Shape
from subclone_core.core.strategies import plan_shape
from subclone_core.io.atomic import write_text
from subclone_core.sources import Parent, load_parent
from subclone_core.training import RunResult
from subclone_core.training.speedup import HIGHER_IS_BETTER, speedup_table
from subclone_core.workflow.children import make_child, measure_importance

Variant = h.Arm  # one way to initialize (and train) the child
PLAIN = {"scale": False, "drop": "magnitude"}  # the plain subcloned child of the LM benchmarks (and bench_budget)
RANDOM = Variant("random", "random init", "random")
LM_CHILD = Variant("subclone", "subclone (no scaling, tied head, drop by magnitude)", "subclone", PLAIN)
LM_ABLATIONS = (  # the aggressive ratio's variants, each trained at the plain child's best lr
    Variant("subclone-scaled", "subclone, scaling on (tied unscaled head)", "subclone", {**PLAIN, "scale": True}),
    Variant("subclone-middle", "subclone, drop a contiguous middle span", "subclone", {**PLAIN, "drop": "middle"}),
    Variant("subclone+distill", "subclone + distillation from the parent", "subclone", PLAIN, distill=True))
VIT_CHILDREN = (Variant("subclone", "subclone (scaling on)", "subclone", {"scale": True}),
                Variant("subclone-unscaled", "subclone, scaling off", "subclone", {"scale": False}))
# Each benchmark's experiments: key, title and child sizes (None: the ViT's, at its parent's depth and half its
# width, as in the paper's ViT experiment), the size's budget and grid key, the child swept on that grid, the
# variants trained at its best lr.
EXPERIMENTS = {
    "lm": (("paper-like", "paper-like ratio: 20 blocks x 384, 6 heads / 2 KV, FFN 1024", rp.PAPER_LIKE, "paper",
            LM_CHILD),
           ("aggressive", "aggressive ratio: 6 blocks x 192, 3 heads / 1 KV, FFN 512", rp.AGGRESSIVE, "aggr",
            LM_CHILD, *LM_ABLATIONS)),
    "vit": (("vit-half-width", None, None, "vit", *VIT_CHILDREN),)}
MILDER_CLAIM = ("aggressive",)  # experiments at a harsher ratio than the paper's 4x is claimed for
PLOT = "bench_{}_curves.png"  # each benchmark's plot (lm, vit), beside the document


@dataclass(frozen=True)
class Experiment:
    """One child shape of one parent, with its budget and variants."""

    key: str
    title: str
    sizes: dict[str, int]
    budget: Budget
    variants: tuple[Variant, ...]


@dataclass(frozen=True)
class Size:
    """One size: calibration tokens, then the budgets and lr grids by key (paper-like LM child, aggressive LM
    child, ViT child; grids also random init's)."""

    calib_tokens: int
    budgets: dict[str, Budget]
    sweeps: dict[str, tuple[float, ...]]


_SMOKE_LM = Budget(steps=4, eval_every=2, batch_size=2, seq_len=32, val_tokens=128)
_GPU_LM = Budget(steps=800, eval_every=25, batch_size=32, val_tokens=16384)  # ~4M tokens: the train split 3-4 times
SIZES = {
    "smoke": Size(256, {"paper": _SMOKE_LM, "aggr": _SMOKE_LM,
                        "vit": Budget(steps=4, eval_every=2, batch_size=16, val_images=64)},
                  {"random": (1e-3, 3e-3), "paper": (1e-3,), "aggr": (1e-3, 3e-3), "vit": (1e-3,)}),
    "gpu": Size(8192, {"paper": _GPU_LM, "aggr": replace(_GPU_LM, steps=1000),
                       "vit": Budget(steps=1000, eval_every=25, batch_size=128, val_images=2000, eval_batch_size=500)},
                {"random": (3e-4, 1e-3, 3e-3), "paper": (1e-4, 3e-4, 1e-3), "aggr": (3e-4, 1e-3, 3e-3),
                 "vit": (1e-4, 3e-4, 1e-3)}),
    # CPU: 2 cores. The 49,152-word head dominates the cost (paper-like child: ~3-4 s per 8 x 128 step).
    # A 4x speedup must be resolvable on the evaluation grid: 48 / 12 = 4 and 80 / 20 = 4 are grid points.
    "cpu": Size(4096, {"paper": Budget(steps=48, eval_every=4, batch_size=8),
                       "aggr": Budget(steps=80, eval_every=5, batch_size=8),
                       "vit": Budget(steps=300, eval_every=15, batch_size=64, val_images=1000, eval_batch_size=250)},
                {"random": (1e-3, 3e-3), "paper": (3e-4, 1e-3), "aggr": (1e-3, 3e-3), "vit": (3e-4, 1e-3)}),
}


def experiments(which: str, size: Size, parent: Parent) -> list[Experiment]:
    """The benchmark's experiments at this size: random init and the child each with its lr grid, then the
    unswept variants."""
    shape = Shape.of(parent.model.config)
    half = {"hidden": shape.hidden // 2, "ffn": shape.ffn // 2}
    vit_title = f"half width: {shape.layers} blocks x {half['hidden']}, FFN {half['ffn']}"
    return [Experiment(key, title or vit_title, sizes or half, size.budgets[grid],
                       (replace(RANDOM, lrs=size.sweeps["random"]), replace(child, lrs=size.sweeps[grid]), *rest))
            for key, title, sizes, grid, child, *rest in EXPERIMENTS[which]]


def child_model(parent: Parent, target: Shape, variant: Variant, importance: Any, seed: int = 0) -> Any:
    """The variant's initial child (bench_budget's too): make_child with its strategy and options."""
    return make_child(parent, target, strategy=variant.strategy, importance=importance, seed=seed,
                      **variant.options).model


def run_experiment(parent: Parent, importance: Any, exp: Experiment, data_id: str, runs_dir: Path) -> dict[str, Any]:
    """Make every variant, sweep, train the unswept variants at the child's best lr, and tabulate: the outcome as
    the JSON holds it (outcome_json)."""
    start = time.perf_counter()
    target = plan_shape(parent.model, **exp.sizes)
    children = {v.name: child_model(parent, target, v, importance) for v in exp.variants}
    train, val = exp.budget.splits(parent, data_id)
    config = exp.budget.config(len(val))
    metric = parent.task_spec.metric

    def stage(variants: list[Variant], lr_of: dict[str, tuple[float, ...]], tag: str) -> dict[str, RunResult]:
        cands = [c for v in variants for c in v.candidates(children[v.name], lr_of[v.name], parent.model)]
        return h.train(cands, train, val, config, f"{exp.key} {tag}", runs_dir / f"{exp.key}-{tag}.jsonl")

    runs, chosen, _ = h.sweep_then_rest(exp.variants, stage, metric, "variants")
    sweep = [h.run_json(r, metric, curve=False, run=name) for name, r in runs.items()]
    return outcome_json(exp, parent, chosen, sweep, metric, time.perf_counter() - start)


def outcome_json(exp: Experiment, parent: Parent, chosen: dict[str, RunResult], sweep: list[dict[str, Any]],
                 metric: str, seconds: float) -> dict[str, Any]:
    """What an experiment produced, as its JSON holds it: the experiment (budget with its units, the variants
    with their labels and grids), each variant's chosen run (h.run_json), every sweep run, the speedup table's
    rows (training.speedup.speedup_table) and the seconds it took."""
    budget = {**asdict(exp.budget), "units": exp.budget.units(parent.task)}
    variants = [{"name": v.name, "label": v.label, "lrs": v.lrs} for v in exp.variants]
    return {"key": exp.key, "title": exp.title, "sizes": exp.sizes, "budget": budget, "variants": variants,
            "metric": metric, "chosen": {name: h.run_json(r, metric) for name, r in chosen.items()}, "sweep": sweep,
            "rows": speedup_table(chosen, baseline="random", metric=metric), "seconds": seconds}


def row_of(o: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The candidate's row of the speedup table (None: it diverged at every lr)."""
    return next((r for r in o["rows"] if r["name"] == name), None)


def headline(o: dict[str, Any]) -> str:
    """The subcloned child's speedup against the paper's 4x where the paper claims it, and if short of it, why:
    the child's head start and the steps each needed (the case is named here, the words are the template's)."""
    child, base = row_of(o, "subclone"), row_of(o, "random")
    if o["key"] in MILDER_CLAIM:
        case = "milder ratio"
    elif child is not None and child["speedup"] is not None and child["speedup"] >= PAPER_SPEEDUP:
        case = "reached"
    elif child is None or base is None:
        case = "diverged"
    elif child["speedup_lower_bound"] and child["steps_to_target"] == 0:
        case = "ahead at step 0"
    else:
        case = "never reached" if child["steps_to_target"] is None else "slower"
    return render("training_headline", case=case, child=child, base=base, m=o["metric"], paper=PAPER_SPEEDUP,
                  steps=o["budget"]["steps"])


def findings(o: dict[str, Any]) -> list[dict[str, Any]]:
    """Facts that explain the numbers (the template words them): a variant that diverged at every lr, a best lr
    at the edge of a 3+ point sweep, each variant's best value against the plain child's."""
    notes, higher, plain = [], HIGHER_IS_BETTER[o["metric"]], row_of(o, "subclone")
    for v in o["variants"]:
        run, lrs = o["chosen"].get(v["name"]), v["lrs"]
        if run is None:
            notes.append({"kind": "diverged", "variant": v})
        elif lrs and len(lrs) > 2 and run["lr"] in (min(lrs), max(lrs)):
            notes.append({"kind": "edge", "variant": v, "lr": run["lr"]})
    for v in o["variants"]:
        row = row_of(o, v["name"])
        if plain is not None and row is not None and v["name"] not in ("subclone", "random"):
            a, b = row["best"], plain["best"]
            better = a is not None and b is not None and (a > b if higher else a < b)
            notes.append({"kind": "variant", "variant": v, "row": row, "plain": plain, "better": better})
    return notes


def plot_curves(outcomes: list[dict[str, Any]], path: Path) -> None:
    """One panel per experiment: the validation curve of each candidate's best run, the target dashed."""
    fig, axes = rp.panels(len(outcomes), 5.2, 3.6)
    for ax, o in zip(axes[0], outcomes):
        for name, run in o["chosen"].items():
            ax.plot(run["steps"], run["values"], marker=".", label=f"{name} (lr {run['lr']:g})",
                    linewidth=2.2 if name in ("subclone", "random") else 1.2)
        if o["rows"] and o["rows"][0]["target"] is not None:
            ax.axhline(o["rows"][0]["target"], color="grey", linestyle="--", linewidth=1, label="random init's best")
        ax.set_title(o["key"], fontsize=10)
        if o["metric"] == "loss":
            ax.set_ylim(top=min(12.0, ax.get_ylim()[1]))
        rp.finish(ax, xlabel="step", ylabel=f"validation {o['metric']}")
    rp.save_figure(fig, path)


def bench(which: str, parent_id: str, size: Size, name: str, runs: Path) -> dict[str, Any]:
    """One of the two benchmarks measured: calibrate and run its experiments; its report as the JSON holds it."""
    parent = load_parent(parent_id)
    data = "default" if which == "lm" else "fashion-mnist"
    importance = measure_importance(parent, data, tokens=size.calib_tokens)
    outcomes = [run_experiment(parent, importance, exp, data, runs) for exp in experiments(which, size, parent)]
    return {"which": which, "size": name, "machine": rp.machine(), "parent_id": parent_id, "parent": parent.label,
            "sequences": parent.task_spec.sequences, "data": data, "calib_tokens": size.calib_tokens,
            "outcomes": outcomes}


def markdown(report: dict[str, Any]) -> str:
    """A benchmark's section of BENCHMARKS.md (template training.md.j2), its plot beside the document."""
    points = max(len(v["lrs"] or ()) for o in report["outcomes"] for v in o["variants"])  # the widest lr grid
    return render("training", **report, plot=PLOT.format(report["which"]), points=points,
                  headline=headline, findings=findings)


def write_report(report: dict[str, Any], doc: Path) -> None:
    """A benchmark's plot beside ``doc`` and its section of ``doc``."""
    plot_curves(report["outcomes"], doc.parent / PLOT.format(report["which"]))
    rp.write_section(f"training-{report['which']}", markdown(report), doc)


def smoke_vit_parent(folder: Path) -> str:
    """A tiny self-pretrained ViT (seconds), so that the smoke run never builds the real default-vit."""
    from subclone_core.sources.parents import cache_dir
    from subclone_core.sources.vit_pretrain import pretrain_vit

    if (cache_dir() / "default-vit" / "config.json").is_file():
        return "default-vit"
    return str(pretrain_vit(folder / "tiny-vit", layers=2, hidden=64, heads=2, ffn=128, epochs=1.0,
                            max_train_images=512, max_test_images=128))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run one size of both benchmarks (or --only one), or redraw them from their JSON beside the doc
    (--report-only); then print each experiment's headline and table. Returns the outcomes."""
    parser = rp.bench_parser(__doc__, smoke="a few steps of everything (seconds); writes to /tmp",
                             gpu="longer budgets and wider sweeps, for a GPU", threads=rp.THREADS_HELP,
                             report_only="redraw the sections and plots from training_lm.json / training_vit.json")
    parser.add_argument("--only", choices=tuple(EXPERIMENTS), help="run one of the two benchmarks")
    parser.add_argument("--vit-parent", default=None, help="the ViT parent (default: default-vit)")
    parser.add_argument("--doc", type=Path, help=f"the Markdown file to update, the plots and JSON beside it "
                        f"(default {rp.DOC})")
    args = parser.parse_args(argv)
    h.start(args)
    name = h.size_name(args)
    runs = Path(tempfile.mkdtemp(prefix=f"subclone-bench-{name}-"))
    doc = args.doc or (runs / rp.DOC.name if name == "smoke" else rp.DOC)  # the smoke size never touches docs/
    start, outcomes = time.perf_counter(), []
    for which in (args.only,) if args.only else EXPERIMENTS:
        path = doc.parent / f"training_{which}.json"
        if args.report_only:
            report = json.loads(path.read_text())
        else:
            parent = "default" if which == "lm" else args.vit_parent or (
                smoke_vit_parent(runs) if args.smoke else "default-vit")
            report = bench(which, parent, SIZES[name], name, runs)
            write_text(path, json.dumps(report, indent=1, default=rp.json_default))
        write_report(report, doc)
        outcomes += report["outcomes"]
    print(render("training_summary", outcomes=outcomes, headline=headline))
    print(f"\nwrote {doc}, the plots and JSON; run metrics in {runs}; total {(time.perf_counter() - start) / 60:.1f} min")
    return outcomes


if __name__ == "__main__":
    main()
