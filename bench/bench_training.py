"""Training speedup of subcloned children over random init: the default LM parent and the self-pretrained ViT.

For each child shape: calibrate once, make every variant, sweep a few learning rates per candidate on the
full budget (all candidates see the identical data order; the training engine interleaves them step by
step), keep each candidate's best run, and report the paper's speedup: random init's steps to its best
validation loss (accuracy for the ViT) over the child's steps to the same value. Variants without their
own sweep (scaling on, another block policy, distillation) train at the subcloned child's best lr.

Sizes: ``--smoke`` (seconds; writes under /tmp only), the default CPU size (about 30 minutes on 2 cores),
``--gpu`` (longer budgets for a GPU). Run: .venv/bin/python bench/bench_training.py [--only lm|vit]
"""

from __future__ import annotations

import copy
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._report import (
    AGGRESSIVE,
    DOC,
    PAPER_LIKE,
    PAPER_SPEEDUP,
    bench_parser,
    fmt_value,
    machine,
    progress_printer,
    pyplot,
    render,
    save_figure,
    table,
    write_section,
)
from subclone_core.core.shape import Shape
from subclone_core.core.strategies import plan_shape
from subclone_core.sources import Parent, load_parent, make_data
from subclone_core.training import Candidate, RunResult, TrainConfig, default_hparams, train_candidates
from subclone_core.training.speedup import HIGHER_IS_BETTER, best_value, speedup_table
from subclone_core.training.sweep import choose_runs, run_name, runs_from_results
from subclone_core.workflow.children import make_child, measure_importance


@dataclass(frozen=True)
class Budget:
    """Training settings shared by every candidate of one experiment."""

    steps: int
    eval_every: int
    batch_size: int
    seq_len: int = 128  # text
    val_tokens: int = 4096  # text: the fixed validation set
    val_images: int = 1000  # images: the fixed validation set
    eval_batch_size: int | None = None

    def units(self, task: str) -> str:
        """Training data per step in words, e.g. "8 x 128 tokens"."""
        return f"{self.batch_size} x {self.seq_len} tokens" if task == "causal-lm" else f"{self.batch_size} images"


@dataclass(frozen=True)
class Variant:
    """One way to initialize (and train) the child.

    Attributes:
        name: candidate name (letters, digits, ._+-).
        label: what the report calls it.
        strategy: the make_child strategy.
        options: make_child options (drop, scale, untie_head).
        distill: train with the parent as teacher.
        lrs: learning rates to sweep; None trains at the best lr found for "subclone".
    """

    name: str
    label: str
    strategy: str
    options: dict = field(default_factory=dict)
    distill: bool = False
    lrs: tuple[float, ...] | None = None

    @property
    def hparam_key(self) -> str:
        """The key of its default weight decay."""
        return "subclone+distill" if self.distill else self.strategy


@dataclass(frozen=True)
class Experiment:
    """One child shape of one parent, with its budget and variants."""

    key: str
    title: str
    sizes: dict[str, int]
    budget: Budget
    variants: tuple[Variant, ...]
    paper_claim: bool = True  # whether the paper's 4x is claimed for a ratio like this one


@dataclass
class Outcome:
    """What an experiment produced: the best run of every variant, every sweep run, and its cost."""

    experiment: Experiment
    shape: Shape
    chosen: dict[str, RunResult]
    sweep: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    metric: str
    seconds: float


def lm_variants(sweep_random: tuple, sweep_child: tuple, *, extras: bool) -> tuple[Variant, ...]:
    """random and subclone with their sweeps; with ``extras`` the aggressive ratio's ablations."""
    base = (Variant("random", "random init", "random", lrs=sweep_random),
            Variant("subclone", "subclone (no scaling, tied head, drop by magnitude)", "subclone",
                    {"scale": False, "drop": "magnitude"}, lrs=sweep_child))
    if not extras:
        return base
    return (*base,
            Variant("subclone-scaled", "subclone, scaling on (tied unscaled head)", "subclone",
                    {"scale": True, "drop": "magnitude"}),
            Variant("subclone-middle", "subclone, drop a contiguous middle span", "subclone",
                    {"scale": False, "drop": "middle"}),
            Variant("subclone+distill", "subclone + distillation from the parent", "subclone",
                    {"scale": False, "drop": "magnitude"}, distill=True))


def vit_variants(sweep_random: tuple, sweep_child: tuple) -> tuple[Variant, ...]:
    return (Variant("random", "random init", "random", lrs=sweep_random),
            Variant("subclone", "subclone (scaling on)", "subclone", {"scale": True}, lrs=sweep_child),
            Variant("subclone-unscaled", "subclone, scaling off", "subclone", {"scale": False}))


def size_plan(size: str) -> dict[str, Any]:
    """Budgets and sweeps of a size: "smoke", "cpu" or "gpu"."""
    if size == "smoke":
        lm = Budget(steps=4, eval_every=2, batch_size=2, seq_len=32, val_tokens=128)
        vit = Budget(steps=4, eval_every=2, batch_size=16, val_images=64)
        sweeps = {"random": (1e-3, 3e-3), "paper": (1e-3,), "aggr": (1e-3, 3e-3), "vit": (1e-3,)}
        return {"calib_tokens": 256, "lm": (lm, lm), "vit": vit, "sweeps": sweeps}
    if size == "gpu":  # about 4M tokens: the ~1M-token train split about 3-4 times
        paper = Budget(steps=800, eval_every=25, batch_size=32, val_tokens=16384)
        aggr = replace(paper, steps=1000)
        vit = Budget(steps=1000, eval_every=25, batch_size=128, val_images=2000, eval_batch_size=500)
        sweeps = {"random": (3e-4, 1e-3, 3e-3), "paper": (1e-4, 3e-4, 1e-3), "aggr": (3e-4, 1e-3, 3e-3),
                  "vit": (1e-4, 3e-4, 1e-3)}
        return {"calib_tokens": 8192, "lm": (paper, aggr), "vit": vit, "sweeps": sweeps}
    # CPU: 2 cores. The 49,152-word head dominates the cost (paper-like child: ~3-4 s per 8 x 128 step).
    # A 4x speedup must be resolvable on the evaluation grid: 48 / 12 = 4 and 80 / 20 = 4 are grid points.
    paper = Budget(steps=48, eval_every=4, batch_size=8)
    aggr = Budget(steps=80, eval_every=5, batch_size=8)
    vit = Budget(steps=300, eval_every=15, batch_size=64, val_images=1000, eval_batch_size=250)
    sweeps = {"random": (1e-3, 3e-3), "paper": (3e-4, 1e-3), "aggr": (1e-3, 3e-3), "vit": (3e-4, 1e-3)}
    return {"calib_tokens": 4096, "lm": (paper, aggr), "vit": vit, "sweeps": sweeps}


def lm_experiments(plan: dict[str, Any]) -> list[Experiment]:
    paper, aggr = plan["lm"]
    sweeps = plan["sweeps"]
    return [
        Experiment("paper-like", "paper-like ratio: 20 blocks x 384, 6 heads / 2 KV, FFN 1024", PAPER_LIKE, paper,
                   lm_variants(sweeps["random"], sweeps["paper"], extras=False)),
        Experiment("aggressive", "aggressive ratio: 6 blocks x 192, 3 heads / 1 KV, FFN 512", AGGRESSIVE, aggr,
                   lm_variants(sweeps["random"], sweeps["aggr"], extras=True), paper_claim=False),
    ]


def vit_experiment(plan: dict[str, Any], parent: Parent) -> Experiment:
    """The same depth at half the width (hidden and FFN), as in the paper's ViT experiment."""
    shape = Shape.of(parent.model.config)
    sizes = {"hidden": shape.hidden // 2, "ffn": shape.ffn // 2}
    title = f"half width: {shape.layers} blocks x {sizes['hidden']}, FFN {sizes['ffn']}"
    return Experiment("vit-half-width", title, sizes, plan["vit"],
                      vit_variants(plan["sweeps"]["random"], plan["sweeps"]["vit"]))


# --- running --------------------------------------------------------------------------------------------


def train_config(budget: Budget, val_len: int) -> TrainConfig:
    eval_bs = budget.eval_batch_size or budget.batch_size
    return TrainConfig(steps=budget.steps, batch_size=budget.batch_size, eval_every=budget.eval_every,
                       eval_batches=max(1, math.ceil(val_len / eval_bs)), eval_batch_size=eval_bs, warmup=0.05,
                       seed=0, device="auto")


def load_splits(parent: Parent, data_id: str, budget: Budget) -> tuple[Any, Any]:
    """One pass of training data for the budget (repeats if the split is smaller) and the fixed validation set."""
    train = make_data(parent, data_id, "train", seq_len=budget.seq_len,
                      max_tokens=budget.steps * budget.batch_size * budget.seq_len,
                      max_images=budget.steps * budget.batch_size)
    val = make_data(parent, data_id, "validation", seq_len=budget.seq_len, max_tokens=budget.val_tokens,
                    max_images=budget.val_images)
    return train, val


def candidates_for(variants: list[Variant], children: dict[str, Any], parent: Parent,
                   lr_of: dict[str, tuple[float, ...]]) -> list[Candidate]:
    """A fresh copy of each variant's child per learning rate, named as a sweep's runs ("subclone@lr=1e-3")."""
    out = []
    for v in variants:
        for lr in lr_of[v.name]:
            out.append(Candidate(run_name(v.name, lr), copy.deepcopy(children[v.name]), lr=lr,
                                 weight_decay=default_hparams(v.hparam_key)["weight_decay"],
                                 strategy=v.hparam_key, teacher=parent.model if v.distill else None))
    return out


def best_runs(runs: dict[str, RunResult], metric: str) -> dict[str, RunResult]:
    """Each variant's chosen run by the library's rule (training.sweep.choose_runs: the best validation value
    among the runs not stopped by a non-finite loss); a variant whose every lr diverged has none."""
    higher = HIGHER_IS_BETTER[metric]
    swept = runs_from_results(runs, metric, higher_is_better=higher)
    eligible = {r.run for r in swept if r.status != "stopped" and r.best is not None}
    picks = choose_runs(swept, higher_is_better=higher)
    return {name: runs[pick] for name, pick in picks.items() if pick in eligible}


def run_experiment(parent: Parent, importance: Any, exp: Experiment, data_id: str, runs_dir: Path) -> Outcome:
    """Make every variant, sweep, train the unswept variants at the child's best lr, and tabulate."""
    start = time.perf_counter()
    target = plan_shape(parent.model, **exp.sizes)
    children = {v.name: make_child(parent, target, strategy=v.strategy, importance=importance, **v.options).model
                for v in exp.variants}
    train, val = load_splits(parent, data_id, exp.budget)
    config = train_config(exp.budget, len(val))
    metric = parent.task_spec.metric
    stages = {"sweep": [v for v in exp.variants if v.lrs], "variants": [v for v in exp.variants if not v.lrs]}
    runs: dict[str, RunResult] = {}
    chosen: dict[str, RunResult] = {}
    for stage, variants in stages.items():
        if not variants:
            continue
        lr_of = {v.name: v.lrs or (child_lr(exp, chosen),) for v in variants}
        done = _train(variants, children, parent, lr_of, train, val, config, f"{exp.key} {stage}",
                      runs_dir / f"{exp.key}-{stage}.jsonl")
        runs.update(done)
        chosen.update(best_runs(done, metric))
    rows = speedup_table(chosen, baseline="random", metric=metric)
    return Outcome(exp, target, chosen, sweep_rows(runs, metric), rows, metric, time.perf_counter() - start)


def child_lr(exp: Experiment, chosen: dict[str, RunResult]) -> float:
    """The subcloned child's best lr (its lowest swept one if every lr diverged): what the ablations use."""
    run = chosen.get("subclone")
    return run.lr if run is not None else min(next(v.lrs for v in exp.variants if v.name == "subclone"))


def sweep_rows(runs: dict[str, RunResult], metric: str) -> list[dict[str, Any]]:
    """Every run's lr, best and final validation value, and status."""
    higher = HIGHER_IS_BETTER[metric]
    return [{"run": name, "lr": r.lr, "status": r.status, "best": best_value(r.curve(metric), higher_is_better=higher),
             "final": r.curve(metric)[-1][1] if r.curve(metric) else None} for name, r in runs.items()]


def _train(variants: list[Variant], children: dict[str, Any], parent: Parent, lr_of: dict[str, tuple[float, ...]],
           train: Any, val: Any, config: TrainConfig, tag: str, metrics_path: Path) -> dict[str, RunResult]:
    cands = candidates_for(variants, children, parent, lr_of)
    print(f"[{tag}] training {', '.join(c.name for c in cands)} for {config.steps} steps", file=sys.stderr,
          flush=True)
    results = train_candidates(cands, train, val, config, callbacks=[progress_printer(tag, config.steps)],
                               metrics_path=metrics_path)
    for result in results.values():
        result.model = None  # keep the curves, free the weights
    return results


# --- reporting ------------------------------------------------------------------------------------------


def result_table(outcome: Outcome) -> str:
    labels = {v.name: v.label for v in outcome.experiment.variants}
    swept = {v.name: v.lrs for v in outcome.experiment.variants}
    metric = outcome.metric
    rows = []
    for row in outcome.rows:
        lrs = swept.get(row["name"])
        lr = f"{outcome.chosen[row['name']].lr:g}" + (f" (of {', '.join(f'{x:g}' for x in lrs)})" if lrs
                                                     else " (the child's best)")
        rows.append([labels.get(row["name"], row["name"]), lr, fmt_value(row["start"], metric), fmt_value(row["final"], metric),
                     fmt_value(row["best"], metric), row["steps_to_target_text"], f"**{row['speedup_text']}**",
                     f"{row['throughput']:.0f}"])
    header = ["candidate", "lr", f"step-0 {metric}", f"final {metric}", f"best {metric}",
              "steps to target", "speedup", outcome.rows[0]["unit"] if outcome.rows else "tokens/s"]
    return table(header, rows)


def sweep_table(outcome: Outcome) -> str:
    rows = [[s["run"], f"{s['lr']:g}", fmt_value(s["best"], outcome.metric), fmt_value(s["final"], outcome.metric),
             s["status"]] for s in outcome.sweep]
    return table(["run", "lr", f"best {outcome.metric}", f"final {outcome.metric}", "status"], rows)


def headline(outcome: Outcome) -> str:
    """The subcloned child's speedup, set against the paper's 4x where the paper claims it."""
    row = _row(outcome, "subclone")
    text = row["speedup_text"] if row else "the subcloned child diverged at every learning rate"
    if not outcome.experiment.paper_claim:
        return f"Speedup of the subcloned child: **{text}** (the paper's {PAPER_SPEEDUP:.0f}x is for milder ratios)."
    if row is not None and row["speedup"] is not None and row["speedup"] >= PAPER_SPEEDUP:
        return f"Speedup of the subcloned child: **{text}**: at least the paper's {PAPER_SPEEDUP:.0f}x."
    return (f"Speedup of the subcloned child: **{text}**: short of the paper's {PAPER_SPEEDUP:.0f}x. "
            f"Why: {shortfall(outcome)}")


def _row(outcome: Outcome, name: str) -> dict[str, Any] | None:
    return next((r for r in outcome.rows if r["name"] == name), None)


def shortfall(outcome: Outcome) -> str:
    """What the numbers say about a speedup under 4x: the head start, and the steps each needed."""
    child, base, metric = _row(outcome, "subclone"), _row(outcome, "random"), outcome.metric
    if child is None or base is None:
        return "a candidate diverged at every learning rate (see the sweep)."
    start = (f"the child starts at {fmt_value(child['start'], metric)} against random init's "
             f"{fmt_value(base['start'], metric)}")
    if child["speedup_lower_bound"] and child["steps_to_target"] == 0:
        return (f"{start}: it is past random init's best before any training, so only a lower bound is "
                f"measurable (random init's {base['steps_to_target_text']} over the first evaluation step); a "
                "longer budget or a finer evaluation grid would resolve it.")
    if child["steps_to_target"] is None:
        return (f"{start} and its best, {fmt_value(child['best'], metric)}, never reaches random init's best "
                f"({fmt_value(base['best'], metric)}) within {outcome.experiment.budget.steps} steps.")
    return (f"{start}, and needs {child['steps_to_target_text']} to reach random init's best, which random init "
            f"reaches at {base['steps_to_target_text']}.")


def findings(outcome: Outcome) -> list[str]:
    """Facts that explain the numbers: lrs at the edge of a 3+ point sweep, variants against the plain child."""
    notes = []
    for v in outcome.experiment.variants:
        run = outcome.chosen.get(v.name)
        if run is None:
            notes.append(f"{v.label}: every learning rate diverged.")
        elif v.lrs and len(v.lrs) > 2 and run.lr in (min(v.lrs), max(v.lrs)):
            notes.append(f"{v.label}: the best lr ({run.lr:g}) is at the edge of the sweep; a wider sweep could "
                         "move its result.")
    plain = _row(outcome, "subclone")
    for v in outcome.experiment.variants:
        row = _row(outcome, v.name)
        if plain is None or row is None or v.name in ("subclone", "random"):
            continue
        verdict = "better" if _better(row["best"], plain["best"], outcome.metric) else "not better"
        notes.append(f"{v.label}: step-0 {fmt_value(row['start'], outcome.metric)} (plain child "
                     f"{fmt_value(plain['start'], outcome.metric)}), best {fmt_value(row['best'], outcome.metric)}: "
                     f"{verdict} than the plain child; speedup {row['speedup_text']}.")
    return notes


def _better(value: float | None, reference: float | None, metric: str) -> bool:
    if value is None or reference is None:
        return False
    return value > reference if HIGHER_IS_BETTER[metric] else value < reference


def settings_text(parent: Parent, outcomes: list[Outcome], calib_tokens: int | None, data_id: str) -> str:
    lines = [f"Machine: {machine()}.",
             (f"Parent: {parent.label}; data: {data_id} (train split for training and calibration, a fixed "
              "slice of the validation split for every evaluation).")]
    if calib_tokens:
        lines.append(f"Calibration: {calib_tokens} token positions, measured once and shared by every child.")
    for o in outcomes:
        b = o.experiment.budget
        val = f"{b.val_tokens} tokens" if parent.task_spec.sequences else f"{b.val_images} images"
        lines.append(f"{o.experiment.key}: {b.steps} steps of {b.units(parent.task)}, AdamW, 5% warmup then "
                     f"cosine to 0, validation on {val} every {b.eval_every} steps; {o.seconds / 60:.1f} min.")
    lines.append("Every candidate sees the identical batches in the identical order (seed 0). Each swept "
                 "candidate keeps its run with the best validation value; weight decay is the strategy's default.")
    return "\n".join(f"- {line}" for line in lines)


def caveats(outcomes: list[Outcome]) -> str:
    """How to read the section: the target, lower bounds, and what tiny budgets can say."""
    points = max(len(v.lrs or ()) for o in outcomes for v in o.experiment.variants)
    return render("training_caveats", metric=outcomes[0].metric, points=points)


def section_markdown(title: str, script_note: str, parent: Parent, outcomes: list[Outcome], plot: str,
                     calib_tokens: int | None, data_id: str) -> str:
    parts = [f"## {title} (`bench/bench_training.py`)", script_note, settings_text(parent, outcomes, calib_tokens,
                                                                                  data_id)]
    for o in outcomes:
        parts += [f"### {o.experiment.title}", headline(o), result_table(o),
                  "Learning-rate sweep (every run, full budget):", sweep_table(o)]
        notes = findings(o)
        if notes:
            parts.append("\n".join(f"- {n}" for n in notes))
    parts += [f"![validation curves]({plot})", caveats(outcomes)]
    return "\n\n".join(parts)


def plot_curves(outcomes: list[Outcome], path: Path) -> None:
    """One panel per experiment: the validation curve of each candidate's best run, the target dashed."""
    fig, axes = pyplot().subplots(1, len(outcomes), figsize=(5.2 * len(outcomes), 3.6), squeeze=False)
    for ax, o in zip(axes[0], outcomes):
        for name, run in o.chosen.items():
            steps, values = zip(*run.curve(o.metric)) if run.curve(o.metric) else ((), ())
            ax.plot(steps, values, marker=".", label=f"{name} (lr {run.lr:g})",
                    linewidth=2.2 if name in ("subclone", "random") else 1.2)
        target = o.rows[0]["target"] if o.rows else None
        if target is not None:
            ax.axhline(target, color="grey", linestyle="--", linewidth=1, label="random init's best")
        ax.set_title(o.experiment.key, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(f"validation {o.metric}")
        if o.metric == "loss":
            ax.set_ylim(top=min(12.0, ax.get_ylim()[1]))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    save_figure(fig, path)


def outcome_json(o: Outcome) -> dict[str, Any]:
    return {"experiment": o.experiment.key, "shape": o.shape.as_dict(), "budget": asdict(o.experiment.budget),
            "rows": o.rows, "sweep": o.sweep, "seconds": round(o.seconds, 1),
            "curves": {name: r.curve(o.metric) for name, r in o.chosen.items()}}


# --- the two benchmarks -------------------------------------------------------------------------------


def bench_lm(plan: dict[str, Any], out: dict[str, Path], size: str) -> list[Outcome]:
    parent = load_parent("default")
    importance = measure_importance(parent, "default", tokens=plan["calib_tokens"])
    outcomes = [run_experiment(parent, importance, exp, "default", out["runs"]) for exp in lm_experiments(plan)]
    plot_curves(outcomes, out["lm_plot"])
    note = (f"Size `{size}`. The embedded SmolLM2-135M-Instruct parent, children at two reduction ratios, "
            "trained on the embedded Wikipedia text.")
    markdown = section_markdown("Training speedup, language model", note, parent, outcomes,
                                out["lm_plot"].name, plan["calib_tokens"], "default")
    write_section("training-lm", markdown, out["doc"])
    return outcomes


def bench_vit(plan: dict[str, Any], out: dict[str, Path], size: str, vit_parent: str) -> list[Outcome]:
    parent = load_parent(vit_parent)
    exp = vit_experiment(plan, parent)
    importance = measure_importance(parent, "fashion-mnist", tokens=plan["calib_tokens"])
    outcome = run_experiment(parent, importance, exp, "fashion-mnist", out["runs"])
    plot_curves([outcome], out["vit_plot"])
    note = (f"Size `{size}`. The self-pretrained ViT (`{vit_parent}`: trained by this project on Fashion-MNIST, "
            "not a published checkpoint) to a child of the same depth and half the width; metric: accuracy.")
    markdown = section_markdown("Training speedup, ViT", note, parent, [outcome], out["vit_plot"].name,
                                plan["calib_tokens"], "fashion-mnist")
    write_section("training-vit", markdown, out["doc"])
    return [outcome]


def smoke_vit_parent(folder: Path) -> str:
    """A tiny self-pretrained ViT (seconds), so that the smoke run never builds the real default-vit."""
    from subclone_core.sources.parents import cache_dir
    from subclone_core.sources.vit_pretrain import pretrain_vit

    if (cache_dir() / "default-vit" / "config.json").is_file():
        return "default-vit"
    return str(pretrain_vit(folder / "tiny-vit", layers=2, hidden=64, heads=2, ffn=128, epochs=1.0,
                            max_train_images=512, max_test_images=128))


def outputs(size: str, doc: Path | None) -> dict[str, Path]:
    """Where the report, plots and run metrics go; the smoke size never touches docs/."""
    runs = Path(tempfile.mkdtemp(prefix=f"subclone-bench-{size}-"))
    docs = runs if size == "smoke" and doc is None else (doc or DOC).parent
    return {"runs": runs, "doc": doc or (runs / "BENCHMARKS.md" if size == "smoke" else DOC),
            "lm_plot": docs / "bench_lm_curves.png", "vit_plot": docs / "bench_vit_curves.png"}


def main() -> None:
    parser = bench_parser(__doc__, threads="torch CPU threads (default: one per core); on a busy machine 1 is "
                          "much faster than 2, whose threads wait on each other")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--smoke", action="store_true", help="a few steps of everything (seconds); writes to /tmp")
    group.add_argument("--gpu", action="store_true", help="longer budgets and wider sweeps, for a GPU")
    parser.add_argument("--only", choices=("lm", "vit"), help="run one of the two benchmarks")
    parser.add_argument("--vit-parent", default=None, help="the ViT parent (default: default-vit)")
    parser.add_argument("--doc", type=Path, help=f"the Markdown file to update (default {DOC})")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()  # our own progress lines only
    size = "smoke" if args.smoke else "gpu" if args.gpu else "cpu"
    plan, out = size_plan(size), outputs(size, args.doc)
    start = time.perf_counter()
    outcomes: list[Outcome] = []
    if args.only in (None, "lm"):
        outcomes += bench_lm(plan, out, size)
    if args.only in (None, "vit"):
        vit_parent = args.vit_parent or (smoke_vit_parent(out["runs"]) if args.smoke else "default-vit")
        outcomes += bench_vit(plan, out, size, vit_parent)
    (out["runs"] / "results.json").write_text(json.dumps([outcome_json(o) for o in outcomes], indent=1))
    for o in outcomes:
        print(f"\n{o.experiment.key}: {headline(o)}\n{result_table(o)}")
    print(f"\nwrote {out['doc']} and the plots; run metrics in {out['runs']}; "
          f"total {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
