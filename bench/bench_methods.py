"""Published ways to cut a small model out of a big one, side by side at step 0 on the embedded real parents,
then trained matched at one shape (see bench/README.md). Writes methods.json, methods_training.png and a section
of BENCHMARKS.md in docs/.

Run: python -m bench.bench_methods [--parents default,gemma3-270m] [--smoke] [--no-training] [--report-only]
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import _harness as h
from bench import _report as rp
from bench import bench_quality as q
from bench._report import DOCS, fmt_value, log, render, table
from subclone_core.core.errors import SubcloneError
from subclone_core.core.shape import Shape
from subclone_core.core.strategies import plan_shape
from subclone_core.io.atomic import write_text
from subclone_core.sources import Parent, load_parent, make_data
from subclone_core.training.evaluate import evaluate
from subclone_core.training.speedup import iso_loss, steps_to_reach
from subclone_core.training.sweep import lr_text
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
    step 0 (evenly in log(step)) on val_tokens held out, each arm's starting lr grid, the mixed_precision."""

    steps: int
    batch_size: int
    evals: int = 5
    child_lrs: tuple[float, ...] = q.CHILD_LRS
    random_lrs: tuple[float, ...] = q.RANDOM_LRS
    val_tokens: int = 2048
    seq_len: int = 128
    eval_batch: int = 8
    precision: str = "auto"  # none on the CPU: bf16 autocast there is ~40x slower on a CPU without AVX-512 BF16


# 2 shared cores (about 200 training tokens/s for SmolLM2's child, 70 for Gemma's, whose 262,144-word head makes
# its steps and evaluations slow): about 25 minutes per parent for 15-20 runs; "*": any other parent
SMOKE_PLAN = Plan(3, 2, evals=2, child_lrs=(1e-3, 2e-3), random_lrs=(2e-3, 4e-3), val_tokens=512)
PLANS = {"default": Plan(30, 4), "gemma3-270m": Plan(16, 2, evals=4, val_tokens=1024), "*": Plan(30, 4)}


def rows_of(parent: Parent, ratios: tuple[float, ...]) -> list[dict[str, Any]]:
    """The shapes: (kind, sizes, methods) for each width ratio, each hidden-only ratio and the depth cut."""
    base, model = Shape.of(parent.model.config), parent.model
    rows = [("width", r, q.width_at(model, r), WIDTH_METHODS) for r in ratios]
    for r in ratios:
        hidden = max(base.heads, round(base.hidden * r / base.heads) * base.heads)  # transformers: heads | hidden
        rows.append(("hidden", r, plan_shape(model, "slicegpt", hidden=hidden), HIDDEN_METHODS))
    rows.append(("depth", 2 / 3, plan_shape(model, layers=max(1, round(base.layers * 2 / 3))), DEPTH_METHODS))
    return [{"kind": k, "ratio": r, "sizes": q.sizes_of(s), "methods": m} for k, r, s, m in rows]


def step0(model: Any, vals: dict[int, Any]) -> dict[str, float]:
    """The loss at each window, on 2048 tokens' worth of windows per batch."""
    return {str(w): evaluate(model, vals[w].batches(max(1, 2048 // w)))["loss"] for w in WINDOWS}


def measure(parent: Parent, importance: Any, vals: dict[int, Any], row: dict[str, Any], tokens: int,
            keep: dict[str, Any] | None) -> dict:
    """Each method's child of one shape, as `make` builds it: losses at each window, parameters and build
    seconds, or the refusal; the children go into ``keep`` when given (the trained row: built once)."""
    target, out = plan_shape(parent.model, **row["sizes"]), {}
    for method in row["methods"]:
        start = time.perf_counter()
        try:
            child = make_child(parent, target, strategy=method, importance=importance, data_id=importance.data,
                               calib_tokens=tokens).model
        except SubcloneError as err:
            out[method] = {"refused": str(err)}
            continue
        out[method] = {"losses": step0(child, vals), "params": q.parameter_total(child),
                       "seconds": time.perf_counter() - start}
        losses = ", ".join(f"{w} {fmt_value(v)}" for w, v in out[method]["losses"].items())
        log(f"  {row['kind']} {row['ratio']:.2f} {method}: {losses} ({out[method]['seconds']:.0f} s)")
        if keep is not None:
            keep[method] = child
        del child  # not held while the next one is built
    return {**{k: v for k, v in row.items() if k != "methods"}, "results": out}


def run_parent(parent_id: str, tokens: int, val_tokens: int, ratios: tuple[float, ...], plan: Plan | None,
               runs: Path) -> dict:
    """One parent: one calibration with every statistic the methods read, then every row, then (with a plan)
    the matched training of the trained row's children."""
    start = time.perf_counter()
    parent = load_parent(parent_id, dtype="float32")
    log(parent.label)
    importance = measure_importance(parent, tokens=tokens, **recorded_statistics(
        WIDTH_METHODS + HIDDEN_METHODS + DEPTH_METHODS))
    vals = {w: make_data(parent, "default", "validation", seq_len=w, max_tokens=val_tokens) for w in WINDOWS}
    parent_losses, children, trained = step0(parent.model, vals), {}, (TRAINED_KIND, min(ratios))
    rows = [measure(parent, importance, vals, row, tokens,
                    children if plan and (row["kind"], row["ratio"]) == trained else None)
            for row in rows_of(parent, ratios)]
    out = {"parent": parent_id, "label": parent.label, "parent_losses": parent_losses,
           "parent_params": q.parameter_total(parent.model), "rows": rows,
           "seconds": {"step0": time.perf_counter() - start}}
    if plan:
        begin = time.perf_counter()
        out["training"] = train_row(parent, next(r for r in rows if (r["kind"], r["ratio"]) == trained), children,
                                    plan, runs)
        out["seconds"]["training"] = time.perf_counter() - begin
    return out


def train_row(parent: Parent, row: dict, children: dict[str, Any], plan: Plan, runs: Path) -> dict:
    """Every child of the row at every lr of its grid (bench_quality.lr_trainer: a fresh copy on the identical
    batches), the grid extended beyond an edge where the best lr sits; then each arm's iso-loss speedups."""
    log(f"training {_shape(row['sizes'])}: {plan.steps} steps of {plan.batch_size} x {plan.seq_len} tokens, "
        f"{', '.join(children)}")
    val = make_data(parent, "default", "validation", seq_len=plan.seq_len, max_tokens=plan.val_tokens)
    trainer = q.lr_trainer(parent, "default", val, plan, plan.seq_len, plan.eval_batch,
                           f"{row['kind']}-{row['ratio']:.2f}", runs)
    arms = {method: extend_until_inside(trainer(method, model, method),
                                        plan.random_lrs if method == BASELINE else plan.child_lrs)
            for method, model in children.items()}
    children.clear()  # the models are no longer needed
    return {"kind": row["kind"], "ratio": row["ratio"], "sizes": row["sizes"], "plan": asdict(plan),
            "refused": [m for m, r in row["results"].items() if "refused" in r], "arms": with_speedups(arms)}


def extend_until_inside(train_at: Callable[[float], tuple], grid: tuple[float, ...],
                        most: int = MAX_EXTENSIONS) -> dict[str, Any]:
    """An arm (bench_quality.swept_arm, plus its starting grid and the lrs added) trained at every lr of ``grid``
    (``train_at(lr)``), then while its chosen lr is the lowest or highest of the grid at one more lr beyond that
    edge (x or / EXTEND), ``most`` times at most; every run diverged counts as the low edge."""
    runs, added = {lr: train_at(lr) for lr in sorted(grid)}, []
    while True:
        arm = q.swept_arm(runs)
        edge = "low" if arm["chosen_lr"] is None else arm["edge"]
        if edge is None or len(added) >= most:
            return {**arm, "start_grid": list(grid), "added": added}
        added.append(min(runs) / EXTEND if edge == "low" else max(runs) * EXTEND)
        runs[added[-1]] = train_at(added[-1])


def with_speedups(arms: dict[str, dict]) -> dict[str, dict]:
    """Each arm with its chosen run against random init's and subclone's (training.speedup.iso_loss, in tokens)
    at random init's best loss: "target", "tokens_to_target" (None: not reached; 0: at step 0), "vs_random" and
    "vs_subclone" (IsoLoss dicts; None without that arm)."""
    chosen = {m: h.chosen_run(a) for m, a in arms.items()}
    target = chosen[BASELINE]["best"] if chosen.get(BASELINE) else None
    out = {}
    for method, arm in arms.items():
        run = chosen[method]
        vs = {key: iso_loss(_track(chosen[ref]), _track(run), levels=[target])[0].to_dict()
              if run and chosen.get(ref) and target is not None else None
              for key, ref in (("vs_random", BASELINE), ("vs_subclone", DEFAULT))}
        at = vs["vs_random"]
        tokens = None if at is None else 0.0 if at["at_start"] else at["candidate_tokens"]
        out[method] = {**arm, "target": target, "tokens_to_target": tokens, **vs}
    return out


def _track(run: dict[str, Any]) -> list[tuple]:
    return list(zip(run["steps"], run["tokens"], run["values"]))  # the library's iso-loss track


def tokens_to(run: dict, level: float | None) -> float | None:
    """Training tokens a run needs to reach ``level`` (interpolated between evaluations); 0 at step 0, None when
    it never does."""
    if not run or level is None:
        return None
    reach = steps_to_reach(list(zip(run["tokens"], run["values"])), level, interpolate=True)
    return None if not reach.reached else 0.0 if reach.at_start else reach.step


def markdown(report: dict) -> str:
    """The section (template methods.md.j2): per parent a table of step-0 losses (128 / 2048 windows) per shape
    and method, then the trained row's table; where subclone is not the best, from the numbers; the plot."""
    parents = []
    for p in report["parents"]:
        methods = list(dict.fromkeys(m for r in p["rows"] for m in r["results"]))
        cells = [[r["kind"], f"{r['ratio']:.2f}", _shape(r["sizes"]), *(_cell(r["results"].get(m)) for m in methods)]
                 for r in p["rows"]]
        parents.append({**p, "pair": _pair(p["parent_losses"]), "step0": table(["cut", "ratio", "shape", *methods], cells),
                        "seconds": {k: v for k, v in p.get("seconds", {}).items() if v is not None},
                        "trained": p.get("training") and training_view(p["training"])})
    return render("methods", **{**report, "parents": parents}, section=SECTION, plot=PLOT, extend=EXTEND,
                  most=MAX_EXTENSIONS, where=" ".join(f"{p['label']}: {not_best(p)}" for p in report["parents"]))


def training_view(t: dict) -> dict[str, Any]:
    """One parent's training for the template: the settings, a row per arm, the arms still at an edge."""
    start = (h.chosen_run(t["arms"][DEFAULT]) or {}).get("start") if DEFAULT in t["arms"] else None
    return {**t, "shape": _shape(t["sizes"]), "rows": [_arm_row(m, a, start) for m, a in t["arms"].items()],
            "child_grid": _grid(t["plan"]["child_lrs"]), "random_grid": _grid(t["plan"]["random_lrs"]),
            "target": fmt_value(next(iter(t["arms"].values()))["target"]),
            "edges": [(m, lr_text(a["chosen_lr"]), a["edge"], len(a["added"])) for m, a in t["arms"].items()
                      if a["edge"]]}


def _arm_row(method: str, arm: dict, start: float | None) -> list[str]:
    """One arm's row: its chosen lr in its grid, losses, tokens to the target, both speedups, tokens to subclone's
    step-0 loss (``start``) and throughput."""
    run = h.chosen_run(arm) or {}
    lr = "all diverged" if arm["chosen_lr"] is None else lr_text(arm["chosen_lr"])
    edge = f", at the {arm['edge']} edge" if arm["edge"] else ""
    return [method, f"{lr} (of {_grid(arm['lrs'])}{edge})", *(fmt_value(run.get(k)) for k in ("start", "best", "final")),
            _tokens(arm["tokens_to_target"], "0 (at step 0)"), _speedup(arm["vs_random"], method, BASELINE),
            _speedup(arm["vs_subclone"], method, DEFAULT), _tokens(tokens_to(run, start)),
            f"{run['throughput']:.0f}" if run.get("throughput") else "-"]


def _shape(s: dict[str, int]) -> str:
    return f"{s['layers']} x {s['hidden']} ({s['heads']}/{s['kv_heads']}, FFN {s['ffn']})"


def _pair(losses: dict[str, float]) -> str:
    return " / ".join(fmt_value(losses[str(w)]) for w in WINDOWS)


def _cell(result: dict | None) -> str:
    return "-" if result is None else "refused" if "refused" in result else _pair(result["losses"])


def _grid(lrs: list[float]) -> str:
    return ", ".join(lr_text(x) for x in sorted(lrs))


def _tokens(tokens: float | None, zero: str = "0") -> str:
    return "not reached" if tokens is None else zero if tokens == 0 else f"{tokens:,.0f}"


def _speedup(row: dict | None, method: str, reference: str) -> str:
    """An IsoLoss cell; a level the reference was at from step 0 has no ratio."""
    if method == reference:
        return "(reference)"
    if row is None:
        return "-"
    if row["speedup"] is None and (row["reason"] or "").startswith("n/a: random init is at"):
        return f"n/a ({reference} there at step 0)"
    return row["text"]


def not_best(p: dict) -> str:
    """Where another method beats subclone, computed: step-0 losses of every row (either window, by MARGIN at
    least), then the trained row's measures (_training_not_best)."""
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
    """The trained row's step-0, best and final losses (lower by MARGIN), tokens to random init's best and to
    subclone's step-0 loss (fewer, strictly; equal ones are ties) where another arm beats subclone."""
    runs = {m: h.chosen_run(a) or {} for m, a in t["arms"].items()}
    start = runs.get(DEFAULT, {}).get("start")
    values = {"step-0 loss": {m: r.get("start") for m, r in runs.items()},
              "best loss": {m: r.get("best") for m, r in runs.items()},
              "final loss": {m: r.get("final") for m, r in runs.items()},
              "tokens to random init's best": {m: a["tokens_to_target"] for m, a in t["arms"].items()},
              "tokens to subclone's step-0 loss": {m: tokens_to(r, start) for m, r in runs.items()}}
    found, ties = [], []
    for what, value in values.items():
        ours = float("inf") if value.get(DEFAULT) is None else value[DEFAULT]
        tokens = what.startswith("tokens")
        others = {m: v for m, v in value.items() if m != DEFAULT and v is not None}
        better = sorted((m for m, v in others.items() if (v < ours if tokens else v <= ours - MARGIN)), key=others.get)
        show = (lambda v: f"{v:,.0f}") if tokens else fmt_value
        if better:
            found.append(f"{what}: " + ", ".join(f"{m} {show(others[m])}" for m in better) +
                         f" against subclone's {'none' if ours == float('inf') else show(ours)}")
        ties += [f"{m} on {what} ({show(ours)})" for m, v in others.items() if tokens and v == ours]
    where, tied = f"In training at {t['kind']} {t['ratio']:.2f}", f" Tied: {', '.join(ties)}." if ties else ""
    if found:
        return f"{where}: {'; '.join(found)}.{tied}"
    return (f"{where}, subclone {'leads or ties' if ties else 'leads'} on every measure (step-0, best and final "
            f"loss, tokens to random init's best and to subclone's own step-0 loss).{tied}")


def plot(report: dict, path: Path) -> None:
    """Per trained parent a column: step-0 and best loss of each arm's chosen run, tokens each needs to reach
    random init's best (none: not reached), and the chosen runs' validation curves against tokens."""
    parents = [p for p in report["parents"] if p.get("training")]
    fig, axes = rp.panels(len(parents), 6.4, 3.6, 3)
    for col, p in enumerate(parents):
        arms = p["training"]["arms"]
        names, runs, x = list(arms), [h.chosen_run(a) or {} for a in arms.values()], range(len(arms))
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
                low.plot(r["tokens"], r["values"], "--" if name == BASELINE else "-", marker=".",
                         linewidth=2 if name == DEFAULT else 1, label=f"{name}, lr {lr_text(r['lr'])}")
        if (target := next(iter(arms.values()))["target"]) is not None:
            low.axhline(target, color="grey", linewidth=1, label="random init's best")
        rp.finish(low, legend=6, xlabel="training tokens", ylabel="validation loss")
    rp.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    """Measure every parent (and train its trained row), or redraw from the saved JSON; writes the outputs."""
    parser = rp.bench_parser(__doc__, smoke="bench_scale's tiny random parent, one ratio (a temporary folder)",
                             threads=rp.THREADS_HELP, report_only="redraw from the methods.json of --out-dir")
    parser.add_argument("--parents", default="default,gemma3-270m")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--val-tokens", type=int, default=8192)
    parser.add_argument("--out-dir", type=Path, help="where methods.json goes (default docs/, with the section)")
    parser.add_argument("--no-training", action="store_true", help="step-0 losses only")
    args = parser.parse_args(argv)
    h.start(args)
    out = h.folder(h.size_name(args), args.out_dir, "subclone-methods-")
    if args.report_only:
        report = json.loads((out / "methods.json").read_text())
    else:
        runs = Path(tempfile.mkdtemp(prefix="subclone-methods-"))
        tokens, val_tokens = (512, 4096) if args.smoke else (args.tokens, args.val_tokens)
        report = {"tokens": tokens, "val_tokens": val_tokens, "machine": rp.machine(), "parents": []}
        for pid in [q.smoke_parent(out)] if args.smoke else args.parents.split(","):
            plan = None if args.no_training else SMOKE_PLAN if args.smoke else PLANS.get(pid, PLANS["*"])
            report["parents"].append(run_parent(pid, tokens, val_tokens, (0.5,) if args.smoke else RATIOS, plan, runs))
        log(f"run metrics in {runs}; outputs in {out}")
        write_text(out / "methods.json", json.dumps(report, indent=1, default=rp.json_default))
    if any(p.get("training") for p in report["parents"]):
        plot(report, out / PLOT)
    if out == DOCS:
        rp.write_section("bench_methods", markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
