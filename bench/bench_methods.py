"""Published ways to cut a small model out of a big one, side by side at step 0 on the embedded real parents,
then trained matched at one shape (see bench/README.md). Writes docs/methods.json, docs/methods_training.png and a
section of docs/BENCHMARKS.md.

Run: python -m bench.bench_methods [--parents default,gemma3-270m] [--smoke] [--no-training]
     [--training-from-json docs/methods.json] [--add-methods M,...] [--extend-edges N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import _report as rp
from bench import bench_quality as q
from bench._report import DOCS, fmt_value, render, table
from bench.bench_quality import chosen_run
from subclone_core.core.errors import SubcloneError
from subclone_core.core.shape import Shape, nearest_valid_shape
from subclone_core.core.strategies import plan_shape
from subclone_core.io.atomic import write_text
from subclone_core.sources import Parent, load_parent, make_data
from subclone_core.training import EvalPoint, RunResult
from subclone_core.training.evaluate import evaluate
from subclone_core.training.speedup import IsoLoss, iso_loss, steps_to_reach
from subclone_core.training.sweep import lr_text, run_name
from subclone_core.workflow.children import make_child, measure_importance, recorded_statistics

RATIOS = (0.8, 0.6, 0.4)
WIDTH_METHODS = ("subclone", "grail", "wanda-sp", "flap", "minitron", "llm-pruner", "random")
HIDDEN_METHODS = ("subclone", "slicegpt", "random")
DEPTH_METHODS = ("subclone", "shortgpt", "minitron", "random")
WINDOWS = (128, 2048)
SECTION = "## Other methods on the real parents: step 0, then matched training at one shape (bench_methods.py)"
TRAINED_KIND = "width"  # the row trained: the width row at the smallest ratio (0.4; the smoke size's one ratio)
DEFAULT = "subclone"  # our default, the reference of the second speedup
BASELINE = "random"
EXTEND = 2.0  # an arm whose chosen lr is at an edge of its grid gets lr x 2 (or / 2) beyond it, ...
MAX_EXTENSIONS = 3  # ... at most this many times (Gemma 3's subclone and GRAIL arms needed 3 at the 4,096-token budget)
MARGIN = 0.01  # nats: a loss counts as lower than subclone's from this much (the report's two decimals show it)
PLOT = "methods_training.png"


@dataclass(frozen=True)
class Plan:
    """The matched training of one parent's trained row: steps of batch_size x seq_len tokens, evaluations after
    step 0 (evenly in log(step)) on a fixed held-out set of val_tokens, each arm's starting grid of peak lrs
    (random init's own), every run on the identical batches under the engine's mixed_precision."""

    steps: int
    batch_size: int
    evals: int = 5
    child_lrs: tuple[float, ...] = q.CHILD_LRS
    random_lrs: tuple[float, ...] = q.RANDOM_LRS
    val_tokens: int = 2048
    seq_len: int = 128
    eval_batch: int = 8
    precision: str = "auto"  # none on the CPU: bf16 autocast there is ~40x slower on a CPU without AVX-512 BF16

    def grid(self, method: str) -> tuple[float, ...]:
        """The lr grid an arm starts at."""
        return self.random_lrs if method == BASELINE else self.child_lrs


# 2 shared cores (about 200 training tokens/s for SmolLM2's child, 70 for Gemma's, whose 262,144-word head makes
# its steps and evaluations slow): about 25 minutes per parent for 15-20 runs; "*": any other parent
SMOKE_PLAN = Plan(3, 2, evals=2, child_lrs=(1e-3, 2e-3), random_lrs=(2e-3, 4e-3), val_tokens=512)
PLANS = {"default": Plan(30, 4), "gemma3-270m": Plan(16, 2, evals=4, val_tokens=1024), "*": Plan(30, 4)}


# --- step 0 ---------------------------------------------------------------------------------------------


def rows_of(parent: Parent, ratios: tuple[float, ...]) -> list[dict[str, Any]]:
    """The shapes: (kind, sizes, methods) for each width ratio, each hidden-only ratio and the depth cut."""
    base, model = Shape.of(parent.model.config), parent.model
    rows = [("width", r, nearest_valid_shape(model, {k: max(1, round(getattr(base, k) * r)) for k in q.WIDTH_KEYS}),
             WIDTH_METHODS) for r in ratios]
    for r in ratios:
        hidden = max(base.heads, round(base.hidden * r / base.heads) * base.heads)  # transformers: heads | hidden
        rows.append(("hidden", r, plan_shape(model, "slicegpt", hidden=hidden), HIDDEN_METHODS))
    rows.append(("depth", 2 / 3, plan_shape(model, layers=max(1, round(base.layers * 2 / 3))), DEPTH_METHODS))
    return [{"kind": k, "ratio": r, "sizes": q.sizes_of(s), "methods": m} for k, r, s, m in rows]


def calibrated(parent_id: str, tokens: int, methods: tuple[str, ...], note: str = "") -> tuple[Parent, Any]:
    """The parent in float32 and one calibration with every statistic the methods read."""
    parent = load_parent(parent_id, dtype="float32")
    print(f"{parent.label}{note}", file=sys.stderr, flush=True)
    return parent, measure_importance(parent, tokens=tokens, **recorded_statistics(methods))


def windows(parent: Parent, val_tokens: int) -> dict[int, Any]:
    """The held-out text in windows of each length of WINDOWS."""
    return {w: make_data(parent, "default", "validation", seq_len=w, max_tokens=val_tokens) for w in WINDOWS}


def step0(model: Any, vals: dict[int, Any]) -> dict[str, float]:
    """The loss at each window, on 2048 tokens' worth of windows per batch."""
    return {str(w): evaluate(model, vals[w].batches(max(1, 2048 // w)))["loss"] for w in WINDOWS}


def build_child(parent: Parent, target: Shape, method: str, importance: Any, tokens: int) -> Any:
    """One method's child of the shape, as `make` builds it from the calibration (the step-0 rows and
    --extend-edges build it alike, so that a rebuilt child trains exactly as the first one did)."""
    return make_child(parent, target, strategy=method, importance=importance, data_id=importance.data,
                      calib_tokens=tokens).model


def measure(parent: Parent, importance: Any, vals: dict[int, Any], row: dict[str, Any], tokens: int,
            keep: dict[str, Any] | None = None) -> dict:
    """Each method's child of one shape: losses at each window, parameters and build seconds, or the refusal;
    the children go into ``keep`` when given (the trained row: built once, for both stages)."""
    target, out = plan_shape(parent.model, **row["sizes"]), {}
    for method in row["methods"]:
        start = time.perf_counter()
        try:
            child = build_child(parent, target, method, importance, tokens)
        except SubcloneError as err:
            out[method] = {"refused": str(err)}
            continue
        built = time.perf_counter() - start
        out[method] = {"losses": step0(child, vals), "params": q.parameter_total(child), "seconds": built}
        losses = ", ".join(f"{w} {fmt_value(v)}" for w, v in out[method]["losses"].items())
        print(f"  {row['kind']} {row['ratio']:.2f} {method}: {losses} ({built:.0f} s)", file=sys.stderr, flush=True)
        if keep is not None:
            keep[method] = child
        del child  # not held while the next one is built
    return {**{k: v for k, v in row.items() if k != "methods"}, "results": out}


def run_parent(parent_id: str, tokens: int, val_tokens: int, ratios: tuple[float, ...], plan: Plan | None,
               runs: Path, old: dict | None = None) -> dict:
    """One parent: one calibration with every statistic the methods read, then every row, then (with a plan) the
    matched training of the trained row's children. With ``old`` (this parent's entry of an earlier
    methods.json, same settings) only the trained row is built and scored again; the other rows are kept."""
    start = time.perf_counter()
    parent, importance = calibrated(parent_id, tokens, WIDTH_METHODS + HIDDEN_METHODS + DEPTH_METHODS)
    vals = windows(parent, val_tokens)
    parent_losses = old["parent_losses"] if old else step0(parent.model, vals)
    trained, children, rows = (TRAINED_KIND, min(ratios)) if plan else None, {}, []
    for i, row in enumerate(rows_of(parent, ratios)):
        keep = children if (row["kind"], row["ratio"]) == trained else None
        rows.append(old["rows"][i] if old and keep is None else measure(parent, importance, vals, row, tokens, keep))
    out = {"parent": parent_id, "label": parent.label, "parent_losses": parent_losses,
           "parent_params": q.parameter_total(parent.model), "rows": rows,
           "seconds": {"step0": time.perf_counter() - start}}
    if old:  # this time: the calibration and the trained row's children only
        out["seconds"] = {"step0": old.get("seconds", {}).get("step0"), "rebuild": out["seconds"]["step0"]}
        out["rebuilt"] = rebuilt(row_of(old, trained)["results"], row_of(out, trained)["results"])
    if plan:
        begin = time.perf_counter()
        out["training"] = train_row(parent, row_of(out, trained), children, plan, runs)
        out["seconds"]["training"] = time.perf_counter() - begin
    return out


def row_of(entry: dict, kind_ratio: tuple | None) -> dict:
    """A parent entry's row of that (kind, ratio)."""
    return next(r for r in entry["rows"] if (r["kind"], r["ratio"]) == kind_ratio)


def rebuilt(before: dict, after: dict) -> dict[str, float]:
    """How far the trained row's step-0 losses, built again, are from the earlier JSON's (each method's largest
    difference over both windows; 0 when the build is deterministic)."""
    diffs = {m: max(abs(a["losses"][w] - before[m]["losses"][w]) for w in a["losses"])
             for m, a in after.items() if "losses" in a and "losses" in before.get(m, {})}
    print(f"  rebuilt: largest step-0 difference from the JSON {max(diffs.values(), default=0):.2g}",
          file=sys.stderr, flush=True)
    return diffs


# --- matched training of one row ------------------------------------------------------------------------


def train_row(parent: Parent, row: dict, children: dict[str, Any], plan: Plan, runs: Path) -> dict:
    """Every child of the row (the ones built in the step-0 stage) at every lr of its grid, each run a fresh copy
    on the identical batches; each arm's grid extended beyond an edge where its best lr sits
    (extend_until_inside); then each arm's iso-loss speedups."""
    print(f"training {_shape(row['sizes'])}: {plan.steps} steps of {plan.batch_size} x {plan.seq_len} tokens, "
          f"{', '.join(children)}", file=sys.stderr, flush=True)
    trainer = row_trainer(parent, row, plan, runs)
    arms = {method: extend_until_inside(trainer(method, model, method), plan.grid(method))
            for method, model in children.items()}
    children.clear()  # the models are no longer needed
    return {"kind": row["kind"], "ratio": row["ratio"], "sizes": row["sizes"], "plan": asdict(plan),
            "refused": [m for m, r in row["results"].items() if "refused" in r], "arms": with_speedups(arms)}


def row_trainer(parent: Parent, row: dict, plan: Plan, runs: Path) -> Callable:
    """``trainer(method, model, strategy)(lr)``: one run of the row's plan (bench_quality.lr_trainer) on the
    default text, validated on the plan's held-out tokens."""
    val = make_data(parent, "default", "validation", seq_len=plan.seq_len, max_tokens=plan.val_tokens)
    tag = f"{row['kind']}-{row['ratio']:.2f}"
    return q.lr_trainer(parent, "default", val, plan, plan.seq_len, plan.eval_batch, tag, runs)


def extend_until_inside(train_at: Callable[[float], tuple[RunResult, dict]], grid: tuple[float, ...],
                        most: int = MAX_EXTENSIONS, done: dict[str, Any] | None = None) -> dict[str, Any]:
    """An arm trained at every lr of ``grid`` (``train_at(lr)``: its result and JSON row), then, while its chosen
    lr (bench_quality.arm_json: the library's rule) is the lowest or highest of the grid, at one more lr beyond
    that edge (EXTEND), ``most`` times at most; every run diverged counts as the lowest edge. ``done``: an arm's
    JSON from an earlier run (its runs are kept, not trained again, and its extensions count). The arm's JSON:
    arm_json's, plus the starting grid and the lrs added; "edge" stays set when the cap left the best at an edge."""
    runs = {r["lr"]: (result_of(r), r) for r in done["runs"]} if done else {}
    lrs, added = (sorted(done["lrs"]), list(done["added"])) if done else (sorted(grid), [])
    while True:
        for lr in lrs:
            if lr not in runs:
                runs[lr] = train_at(lr)
        arm = q.arm_json(dict(sorted(runs.items())), tuple(lrs))
        lr = beyond(arm)
        if lr is None or len(added) >= most:
            return {**arm, "start_grid": list(grid), "added": added}
        lrs, added = sorted([*lrs, lr]), [*added, lr]


def result_of(row: dict[str, Any]) -> RunResult:
    """A run's JSON row as the RunResult the library's choice reads (lr, status, validation curve)."""
    evals = [EvalPoint(step, seen, loss) for step, seen, loss in zip(row["steps"], row["tokens"], row["val_loss"])]
    return RunResult(run_name("arm", row["lr"]), "arm", row["lr"], 0.0, status=row["status"],
                     message=row["message"], evals=evals)


def beyond(arm: dict[str, Any]) -> float | None:
    """The next lr past the edge of the arm's grid that its chosen lr sits at (every run diverged: below the
    lowest), None when the chosen lr is inside."""
    edge = "low" if arm["chosen_lr"] is None else arm["edge"]
    if edge is None:
        return None
    return min(arm["lrs"]) / EXTEND if edge == "low" else max(arm["lrs"]) * EXTEND


def track(run: dict[str, Any]) -> list[tuple]:
    """A run's (step, tokens, loss) evaluation points: the library's iso-loss track."""
    return list(zip(run["steps"], run["tokens"], run["val_loss"]))


def with_speedups(arms: dict[str, dict]) -> dict[str, dict]:
    """Each arm's chosen run against random init's and against subclone's (training.speedup.iso_loss, crossings
    interpolated between evaluations, in tokens) at one level: random init's best validation loss, the paper's
    target. Adds "target", "tokens_to_target" (None: not reached; 0: there at step 0), "vs_random" and
    "vs_subclone" (IsoLoss dicts; None without that arm)."""
    chosen = {m: chosen_run(a) for m, a in arms.items()}
    target = chosen[BASELINE]["best"] if chosen.get(BASELINE) else None
    out = {}
    for method, arm in arms.items():
        run = chosen[method]
        vs = {key: iso_loss(track(chosen[ref]), track(run), levels=[target])[0].to_dict()
              if run and chosen.get(ref) and target is not None else None
              for key, ref in (("vs_random", BASELINE), ("vs_subclone", DEFAULT))}
        at = vs["vs_random"]
        tokens = None if at is None else 0.0 if at["at_start"] else at["candidate_tokens"]
        out[method] = {**arm, "target": target, "tokens_to_target": tokens, **vs}
    return out


# --- the report -----------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    """The section (template bench/templates/methods.md.j2): per parent, one table of step-0 losses (128 / 2048
    windows) per shape and method, then the trained row's training table; where subclone is not the best, from
    the numbers; the plot."""
    parents = []
    for p in report["parents"]:
        methods = list(dict.fromkeys(m for r in p["rows"] for m in r["results"]))
        cells = [[r["kind"], f"{r['ratio']:.2f}", _shape(r["sizes"]), *(_cell(r["results"].get(m)) for m in methods)]
                 for r in p["rows"]]
        seconds = {k: v for k, v in p.get("seconds", {}).items() if v is not None}
        parents.append({**p, "pair": _pair(p["parent_losses"]), "step0": table(["cut", "ratio", "shape", *methods], cells),
                        "seconds": seconds, "trained": p.get("training") and training_view(p["training"])})
    return render("methods", **{**report, "parents": parents}, section=SECTION, plot=PLOT, extend=EXTEND,
                  most=MAX_EXTENSIONS, where=" ".join(f"{p['label']}: {not_best(p)}" for p in report["parents"]))


def training_view(t: dict) -> dict[str, Any]:
    """One parent's training for the template: the settings, a row per arm, the arms still at an edge of their
    grid and those given more lrs by --extend-edges (beyond the first MAX_EXTENSIONS extensions, runs kept)."""
    start = (chosen_run(t["arms"][DEFAULT]) or {}).get("start") if DEFAULT in t["arms"] else None
    arms = t["arms"].items()
    return {**t, "shape": _shape(t["sizes"]), "rows": [_arm_row(m, a, start) for m, a in arms],
            "child_grid": _grid(t["plan"]["child_lrs"]), "random_grid": _grid(t["plan"]["random_lrs"]),
            "target": fmt_value(next(iter(t["arms"].values()))["target"]),
            "edges": [(m, lr_text(a["chosen_lr"]), a["edge"], len(a["added"])) for m, a in arms if a["edge"]],
            "more": {m: len(a["added"]) - MAX_EXTENSIONS for m, a in arms if len(a["added"]) > MAX_EXTENSIONS}}


def _arm_row(method: str, arm: dict, start: float | None) -> list[str]:
    """One arm's row: its chosen lr in its grid, losses, tokens to the target, both speedups, tokens to subclone's
    step-0 loss (``start``) and throughput."""
    run = chosen_run(arm) or {}
    to_start = tokens_to(run, start)
    lr = "all diverged" if arm["chosen_lr"] is None else lr_text(arm["chosen_lr"])
    edge = f", at the {arm['edge']} edge" if arm["edge"] else ""
    return [method, f"{lr} (of {_grid(arm['lrs'])}{edge})", *(fmt_value(run.get(k)) for k in ("start", "best", "final")),
            _tokens_cell(arm["tokens_to_target"]), _speedup_cell(arm["vs_random"], method == BASELINE, BASELINE),
            _speedup_cell(arm["vs_subclone"], method == DEFAULT, DEFAULT),
            "not reached" if to_start is None else f"{to_start:,.0f}",
            f"{run['tokens_per_s']:.0f}" if run.get("tokens_per_s") else "-"]


def _shape(s: dict[str, int]) -> str:
    return f"{s['layers']} x {s['hidden']} ({s['heads']}/{s['kv_heads']}, FFN {s['ffn']})"


def _pair(losses: dict[str, float]) -> str:
    return " / ".join(fmt_value(losses[str(w)]) for w in WINDOWS)


def _cell(result: dict | None) -> str:
    return "-" if result is None else "refused" if "refused" in result else _pair(result["losses"])


def _grid(lrs: list[float]) -> str:
    return ", ".join(lr_text(x) for x in sorted(lrs))


def _tokens_cell(tokens: float | None) -> str:
    return "not reached" if tokens is None else "0 (at step 0)" if tokens == 0 else f"{tokens:,.0f}"


def _speedup_cell(row: dict | None, reference: bool, name: str) -> str:
    """An IsoLoss cell; the reference arm itself is "(reference)", a level the reference was at from step 0
    has no ratio."""
    if reference:
        return "(reference)"
    if row is None:
        return "-"
    if row["speedup"] is None and row["reason"] and row["reason"].startswith("n/a: random init is at"):
        return f"n/a ({name} there at step 0)"
    return IsoLoss.from_dict(row).text()


def not_best(p: dict) -> str:
    """Where another method beats subclone in this parent's numbers, computed: step-0 losses of every row (either
    window, by MARGIN at least), then the trained row's step-0, best and final losses, tokens to random init's
    best and tokens to subclone's own step-0 loss; a trained row where subclone leads on every one says so."""
    found = []
    for r in p["rows"]:
        ours = r["results"].get(DEFAULT, {}).get("losses")
        for method, res in r["results"].items():
            lower_at = [w for w in map(str, WINDOWS)
                        if ours and "losses" in res and res["losses"][w] <= ours[w] - MARGIN]
            if method != DEFAULT and lower_at:
                found.append(f"step 0, {r['kind']} {r['ratio']:.2f}: {method} {_pair(res['losses'])} against "
                             f"{_pair(ours)} (lower at {' and '.join(lower_at)} tokens)")
    text = ("; ".join(found) + ".") if found else "subclone has the lowest step-0 loss of every row."
    return text + (" " + _training_not_best(p["training"]) if p.get("training") else "")


def _training_not_best(t: dict) -> str:
    """The trained row's part of not_best: a loss counts as lower by MARGIN, a token count strictly (equal ties)."""
    runs = {m: chosen_run(a) or {} for m, a in t["arms"].items()}
    start = runs.get(DEFAULT, {}).get("start")
    measures = {"step-0 loss": lambda m: runs[m].get("start"), "best loss": lambda m: runs[m].get("best"),
                "final loss": lambda m: runs[m].get("final"),
                "tokens to random init's best": lambda m: t["arms"][m]["tokens_to_target"],
                "tokens to subclone's step-0 loss": lambda m: tokens_to(runs[m], start)}
    found, ties = [], []
    for what, value in measures.items():
        ours = value(DEFAULT) if DEFAULT in runs else None
        ours = float("inf") if ours is None else ours
        tokens = what.startswith("tokens")
        others = [m for m in runs if m != DEFAULT and value(m) is not None]
        better = [m for m in others if (value(m) < ours if tokens else value(m) <= ours - MARGIN)]
        show = (lambda v: f"{v:,.0f}") if tokens else fmt_value
        if better:
            found.append(f"{what}: " + ", ".join(f"{m} {show(value(m))}" for m in sorted(better, key=value)) +
                         f" against subclone's {'none' if ours == float('inf') else show(ours)}")
        ties += [f"{m} on {what} ({show(ours)})" for m in others if tokens and value(m) == ours]
    where, tied = f"In training at {t['kind']} {t['ratio']:.2f}", f" Tied: {', '.join(ties)}." if ties else ""
    if found:
        return f"{where}: {'; '.join(found)}.{tied}"
    return (f"{where}, subclone {'leads or ties' if ties else 'leads'} on every measure (step-0, best and final "
            f"loss, tokens to random init's best and to subclone's own step-0 loss).{tied}")


def tokens_to(run: dict, level: float | None) -> float | None:
    """Training tokens a run needs to reach ``level`` (training.speedup.steps_to_reach, interpolated between
    evaluations; tokens per step are constant); 0 at step 0, None when it never does."""
    if not run or level is None:
        return None
    reach = steps_to_reach(list(zip(run["steps"], run["val_loss"])), level, interpolate=True)
    per_step = run["tokens"][-1] / run["steps"][-1] if run["steps"] and run["steps"][-1] else 0
    return None if not reach.reached else 0.0 if reach.at_start else reach.step * per_step


def plot(report: dict, path: Path) -> None:
    """Per trained parent a column: step-0 and best loss of each arm's chosen run, tokens each needs to reach
    random init's best (none: not reached), and the chosen runs' validation curves against tokens."""
    parents = [p for p in report["parents"] if p.get("training")]
    fig, axes = rp.panels(len(parents), 6.4, 3.6, 3)
    for col, p in enumerate(parents):
        arms = p["training"]["arms"]
        names, runs, x = list(arms), [chosen_run(a) or {} for a in arms.values()], range(len(arms))
        top, mid, low = axes[0][col], axes[1][col], axes[2][col]
        for offset, key, label in ((-0.2, "start", "step 0"), (0.2, "best", "best in training")):
            top.bar([i + offset for i in x], [r.get(key) or 0 for r in runs], 0.4, label=label)
        model_name = p["label"].split(" (")[0]  # the model's name; its provenance would overflow the panel
        rp.finish(top, title=f"{model_name}: {_shape(p['training']['sizes'])}", ylabel="validation loss")
        tokens = [a["tokens_to_target"] for a in arms.values()]
        mid.bar(list(x), [t or 0 for t in tokens], 0.6, color="#1f77b4", label="tokens to random init's best")
        for i, t in enumerate(tokens):
            if t is None or t == 0:
                mid.text(i, 0, "not reached" if t is None else "at step 0", ha="center", va="bottom", fontsize=7)
        rp.finish(mid, ylabel="training tokens")
        for ax in (top, mid):
            ax.set_xticks(list(x), names)
        for name, r in zip(names, runs):
            if r:
                low.plot(r["tokens"], r["val_loss"], "--" if name == BASELINE else "-", marker=".",
                         linewidth=2 if name == DEFAULT else 1, label=f"{name}, lr {lr_text(r['lr'])}")
        if (target := next(iter(arms.values()))["target"]) is not None:
            low.axhline(target, color="grey", linewidth=1, label="random init's best")
        rp.finish(low, legend=6, xlabel="training tokens", ylabel="validation loss")
    rp.save_figure(fig, path)


# --- main -----------------------------------------------------------------------------------------------


def arguments() -> argparse.ArgumentParser:
    """The command line (bench/README.md lists what each mode does)."""
    parser = rp.bench_parser(__doc__, smoke="bench_scale's tiny random parent, one ratio; writes under --out-dir",
                             report_only="rewrite the section and the plot from docs/methods.json")
    parser.add_argument("--parents", default="default,gemma3-270m")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--val-tokens", type=int, default=8192)
    parser.add_argument("--out-dir", default=None, help="where methods.json goes (default: docs/, with the section)")
    parser.add_argument("--no-training", action="store_true", help="step-0 losses only")
    parser.add_argument("--add-methods", default=None, help="measure only these methods (comma-separated) into "
                        "the methods.json of --out-dir (docs/) for --parents, step 0 and the trained row, keeping "
                        "everything else")
    parser.add_argument("--extend-edges", type=int, default=0, metavar="N",
                        help="in the methods.json of --out-dir (docs/), give every trained arm of --parents whose "
                        "best lr is still at an edge of its grid up to N more lrs beyond it, keeping its runs")
    parser.add_argument("--training-from-json", type=Path, default=None,
                        help="keep this methods.json's step-0 rows (same settings) and rebuild only the trained "
                        "row's children, then train them")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Measure every parent (and train its trained row), or update the saved methods.json (--report-only,
    --add-methods, --extend-edges); writes the outputs."""
    parser = arguments()
    args = parser.parse_args(argv)
    if args.report_only:
        return write_outputs(json.loads((DOCS / "methods.json").read_text()), DOCS)
    out, runs = Path(args.out_dir) if args.out_dir else DOCS, Path(tempfile.mkdtemp(prefix="subclone-methods-"))
    if args.add_methods or args.extend_edges:
        return write_outputs(update_saved(json.loads((out / "methods.json").read_text()), args, runs), out)
    tokens, val_tokens = (512, 4096) if args.smoke else (args.tokens, args.val_tokens)
    old = json.loads(args.training_from_json.read_text()) if args.training_from_json else None
    if old and (old["tokens"], old["val_tokens"]) != (tokens, val_tokens):
        parser.error(f"{args.training_from_json} has {old['tokens']} / {old['val_tokens']} calibration / held-out "
                     f"tokens, not {tokens} / {val_tokens}")
    report = {"tokens": tokens, "val_tokens": val_tokens, "machine": rp.machine(), "parents": []}
    for pid in [q.smoke_parent(out)] if args.smoke else args.parents.split(","):
        plan = None if args.no_training else SMOKE_PLAN if args.smoke else PLANS.get(pid, PLANS["*"])
        before = next(p for p in old["parents"] if p["parent"] == pid) if old else None
        ratios = (0.5,) if args.smoke else RATIOS
        report["parents"].append(run_parent(pid, tokens, val_tokens, ratios, plan, runs, before))
    print(f"run metrics in {runs}", file=sys.stderr, flush=True)
    if old:  # the parents not run this time stay as they were
        ran = {p["parent"]: p for p in report["parents"]}
        report["parents"] = [ran.pop(p["parent"], p) for p in old["parents"]] + list(ran.values())
    return write_outputs(report, out)


def update_saved(report: dict, args: argparse.Namespace, runs: Path) -> dict:
    """A saved methods.json with --add-methods measured in, then --extend-edges trained, for each parent of
    --parents (the smoke size: its one parent)."""
    for i, p in enumerate(report["parents"]):
        if p["parent"] in args.parents.split(",") or args.smoke:
            if args.add_methods:
                p = add_methods(p, args.add_methods.split(","), report["tokens"], report["val_tokens"], runs)
            report["parents"][i] = extend_edges(p, args.extend_edges, report["tokens"], runs)
    return report


def add_methods(entry: dict, added: list[str], tokens: int, val_tokens: int, runs: Path) -> dict:
    """One parent's entry of an earlier methods.json (same settings) with ``added`` methods measured into every
    row whose kind lists them, and trained at the trained row beside the arms already there (kept: they saw the
    same batches); every arm's speedups recomputed."""
    parent, importance = calibrated(entry["parent"], tokens, added, f": adding {', '.join(added)}")
    vals, training, children = windows(parent, val_tokens), entry.get("training"), {}
    trained = (training["kind"], training["ratio"]) if training else None
    ratios = tuple(r["ratio"] for r in entry["rows"] if r["kind"] == "width")  # the run's own (the smoke size's one)
    for old, row in zip(entry["rows"], rows_of(parent, ratios)):
        if new := tuple(m for m in row["methods"] if m in added):
            keep = children if (row["kind"], row["ratio"]) == trained else None
            results = {**old["results"], **measure(parent, importance, vals, {**row, "methods": new}, tokens,
                                                   keep)["results"]}
            old["results"] = {m: results[m] for m in row["methods"] if m in results}
    if children:
        fresh = train_row(parent, row_of(entry, trained), children, Plan(**training["plan"]), runs)
        entry["training"] = {**training, "arms": with_speedups({**training["arms"], **fresh["arms"]})}
    return entry


def extend_edges(entry: dict, more: int, tokens: int, runs: Path) -> dict:
    """One parent's entry of an earlier methods.json with every trained arm whose best lr is still at an edge of
    its grid trained at up to ``more`` further lrs beyond it (its runs kept; the children built again from one
    calibration, as the full run builds them), every arm's speedups recomputed."""
    training = entry.get("training")
    edged = [m for m, a in (training or {}).get("arms", {}).items() if a["edge"]] if more else []
    if not edged:
        return entry
    parent, importance = calibrated(entry["parent"], tokens, edged, f": {more} more lr(s) for {', '.join(edged)}")
    target = plan_shape(parent.model, **training["sizes"])
    trainer, arms = row_trainer(parent, training, Plan(**training["plan"]), runs), dict(training["arms"])
    for method in edged:
        model = build_child(parent, target, method, importance, tokens)
        arms[method] = extend_until_inside(trainer(method, model, method), tuple(arms[method]["start_grid"]),
                                           len(arms[method]["added"]) + more, done=arms[method])
    entry["training"] = {**training, "arms": with_speedups(arms)}
    return entry


def write_outputs(report: dict, out: Path) -> int:
    """methods.json, the plot (when a parent was trained) and, in docs/, the section."""
    write_text(out / "methods.json", json.dumps(report, indent=1, default=rp.json_default))
    if any(p.get("training") for p in report["parents"]):
        plot(report, out / PLOT)
    if out == DOCS:
        rp.write_section("bench_methods", markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
