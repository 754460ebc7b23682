"""Children of every embedded real parent against random init: step-0 loss over a grid of shapes, then a short
matched training run at the aggressive shape (see bench/README.md). Writes quality.json, bench_quality.png and the
"quality" section of BENCHMARKS.md in docs/ (smoke: a temporary folder). Its lr sweep trains bench_methods' arms.

Run: python -m bench.bench_quality [--smoke] [--parents default,gemma3-270m,coder] [--skip-training] [--report-only]
"""

from __future__ import annotations

import json
import math
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench import _coder_parent as coder
from bench import _harness as h
from bench import _report as rp
from bench._report import fmt_value, log, render
from bench.bench_refit import with_table
from subclone_core.core.errors import SubcloneError
from subclone_core.core.shape import Shape, nearest_valid_shape, suggested_shape
from subclone_core.core.strategies import plan_shape
from subclone_core.io.atomic import write_text
from subclone_core.sources import Parent, load_parent, make_data
from subclone_core.training import RunResult
from subclone_core.training.evaluate import evaluate
from subclone_core.training.sweep import run_name
from subclone_core.workflow.children import make_child, measure_importance

DATA = "default"
CODER = "coder"  # the bench parent Qwen2.5-Coder-1.5B-Instruct (bench/_coder_parent.py), not an embedded id
CODE = "code"  # Python source (bench/_coder_parent.coder_data): the coder parent's second data set
DATA_LABELS = {DATA: "the default text", CODE: "Python code (the standard library's source)"}
# parent key -> its runs as (result key, data name), each calibrated and scored on that data; any other: DATA only
RUNS_OF: dict[str, tuple[tuple[str, str], ...]] = {CODER: ((CODER, DATA), (f"{CODER}@{CODE}", CODE))}
SMOKE_PARENT = "tiny"  # the smoke size's parent: bench_scale's tiny random Llama, written into the work folder
WIDTH_KEYS = ("hidden", "heads", "kv_heads", "ffn")
# variant -> (label, make_child options); "default" passes none: the family's defaults, whatever they are
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "before": ("before (paper ranking, slice only)", {"residual_score": "written", "refit": False}),
    "read": ("read ranking, slice only", {"residual_score": "read", "refit": False}),
    "written-refit": ("paper ranking, refit", {"residual_score": "written", "refit": True}),
    "default": ("default (family defaults)", {}),
    "parent-inputs": ("refit on the parent's inputs", {"refit": True, "refit_inputs": "parent"}),
    "random": ("random init", {"strategy": "random"}),
}
# the variants a parent runs where not all: each of the 1.78B coder's makes takes minutes; its default (the Llama
# table's refit on the child's inputs) is checked against the parent's inputs on a parent it was not chosen on
VARIANTS_OF: dict[str, tuple[str, ...]] = {CODER: ("read", "default", "parent-inputs", "random")}
SKIPPED = "not run for this parent (see VARIANTS_OF in bench/bench_quality.py)"
ARMS = ("default", "random")  # the training part: the default child against random init
STRATEGY_OF = {"default": "subclone", "random": "random"}  # the key of each arm's default weight decay
NAT_MARGIN = 1.0  # the report says whether the default child starts at least this far below random init
COLORS = {"before": "#ff7f0e", "read": "#2ca02c", "written-refit": "#9467bd", "default": "#1f77b4",
          "parent-inputs": "#8c564b", "random": "#d62728"}
PLOT = "bench_quality.png"

# Width rows of the real parents at about 100/80/60/40% of the hidden size. Heads follow where a valid KV
# count exists: SmolLM2's 3 KV heads (3 queries each at most) allow 9, 6, 4 or 3 heads but not 7 or 8, and
# a Llama-family config needs hidden to be a multiple of heads (Gemma's 3 heads: hidden 516, not 512).
# Any other parent: nearest_valid_shape at the size's width_ratios.
WIDTHS: dict[str, tuple[tuple[int, ...], ...]] = {  # (hidden, heads, kv_heads, ffn) as WIDTH_KEYS
    "default": ((576, 9, 3, 1536), (480, 6, 2, 1280), (384, 6, 2, 1024), (256, 4, 2, 640)),
    "gemma3-270m": ((640, 4, 1, 2048), (516, 3, 1, 1664), (384, 2, 1, 1024), (256, 2, 1, 768)),
    # Qwen2.5-Coder's 2 KV heads take 6 queries each at most, so 7 heads (60% of 12) have no valid KV count:
    # 60% of hidden and FFN with 8 heads / 2 KV (hidden a multiple of 8). One width: each shape costs minutes.
    CODER: ((920, 8, 2, 5376),),
}
DEPTHS_OF: dict[str, tuple[float, ...]] = {CODER: (1.0,)}  # any other parent: the size's depth_ratios
# The aggressive shape of the other benchmarks per parent; any other parent: suggested_shape's first guess.
AGGRESSIVE_SHAPES: dict[str, dict[str, int]] = {
    "default": rp.AGGRESSIVE,
    "gemma3-270m": {"layers": 12, "hidden": 384, "heads": 2, "kv_heads": 1, "ffn": 1024},
    CODER: {"layers": 28, "hidden": 920, "heads": 8, "kv_heads": 2, "ffn": 5376},  # its one grid shape
}


@dataclass(frozen=True)
class TrainPlan:
    """One parent's matched training at its aggressive shape: every run on the identical batches, evaluations
    after step 0 evenly in log(step), the engine's mixed_precision ("bf16": autocast, also on the CPU)."""

    batch_size: int
    steps: int
    lrs: dict[str, tuple[float, ...]]
    evals: int
    precision: str = "bf16"


@dataclass(frozen=True)
class Size:
    """One size: its parents, calibration tokens (train split), the fixed validation set, the grid's shares
    (widths of a parent without WIDTHS, depths), each parent's training plan (None: none; "*": any other)."""

    parents: tuple[str, ...]
    calib_tokens: int
    val_tokens: int
    width_ratios: tuple[float, ...]
    depth_ratios: tuple[float, ...]
    training: dict[str, TrainPlan | None]
    seq_len: int = 128
    eval_batch: int = 8


RANDOM_LRS = (1e-3, 2e-3, 4e-3)
CHILD_LRS = (3e-4, 1e-3, 2e-3)
LRS = {"default": CHILD_LRS, "random": RANDOM_LRS}
# 2 cores: Gemma's 262,144-word head makes each of its steps costly (tokens/s are printed: tune the steps so that
# each parent's six runs take about 10 minutes); the 1.78B coder parent is not trained at all.
SIZES = {
    "smoke": Size((SMOKE_PARENT,), calib_tokens=512, val_tokens=512, width_ratios=(1.0, 0.5), depth_ratios=(1.0, 2 / 3),
                  training={"*": TrainPlan(2, 4, LRS, evals=2, precision="no")}),
    "cpu": Size(("default", "gemma3-270m", CODER), calib_tokens=4096, val_tokens=2048, width_ratios=(1.0, 0.8, 0.6, 0.4),
                depth_ratios=(1.0, 2 / 3),
                training={"default": TrainPlan(8, 150, LRS, evals=8), "gemma3-270m": TrainPlan(4, 40, LRS, evals=5),
                          CODER: None, "*": TrainPlan(8, 100, LRS, evals=6)}),
}


def sizes_of(shape: Shape, keys: tuple[str, ...] = ("layers", *WIDTH_KEYS)) -> dict[str, int]:
    """The plan_shape keywords of a shape (head_dim never changes), or the ``keys`` given."""
    return {k: getattr(shape, k) for k in keys}


def width_at(model: torch.nn.Module, ratio: float) -> Shape:
    """The valid shape nearest to every width of the model times ``ratio``, every block kept."""
    base = Shape.of(model.config)
    return nearest_valid_shape(model, {k: max(1, round(getattr(base, k) * ratio)) for k in WIDTH_KEYS})


def parameter_total(model: torch.nn.Module) -> int:
    """Parameters of a model, a tied head counted once."""
    return sum(p.numel() for p in model.parameters())


def shape_grid(parent: Parent, key: str, size: Size) -> list[dict[str, Any]]:
    """Each width at each depth (widest and deepest first), then the aggressive shape where it is new, each
    validated by plan_shape. Rows: {"sizes", "aggressive", "grid"} (grid: a width x depth row)."""
    model = parent.model
    widths = ([dict(zip(WIDTH_KEYS, w)) for w in WIDTHS[key]] if key in WIDTHS
              else [sizes_of(width_at(model, r), WIDTH_KEYS) for r in size.width_ratios])
    layers = Shape.of(model.config).layers
    depths = sorted({max(1, round(layers * r)) for r in DEPTHS_OF.get(key, size.depth_ratios)}, reverse=True)
    grid = [sizes_of(plan_shape(model, layers=d, **w)) for w in widths for d in depths]
    grid = [dict(t) for t in dict.fromkeys(tuple(s.items()) for s in grid)]  # derived ratios may coincide
    wanted = dict(AGGRESSIVE_SHAPES[key]) if key in AGGRESSIVE_SHAPES else sizes_of(suggested_shape(model))
    aggressive = sizes_of(plan_shape(model, **wanted))
    rows = [{"sizes": s, "aggressive": s == aggressive, "grid": True} for s in grid]
    return rows if aggressive in grid else [*rows, {"sizes": aggressive, "aggressive": True, "grid": False}]


def shape_text(sizes: dict[str, int]) -> str:
    """E.g. "20 x 384 (6 heads / 2 KV, FFN 1024)"."""
    heads = f"{sizes['heads']} head{'s' if sizes['heads'] != 1 else ''}"
    return f"{sizes['layers']} x {sizes['hidden']} ({heads} / {sizes['kv_heads']} KV, FFN {sizes['ffn']})"


def measure_shape(parent: Parent, importance: Any, val: Any, row: dict[str, Any], size: Size,
                  key: str = "") -> dict[str, Any]:
    """The step-0 validation loss of every variant of one shape and the child's parameters; a variant not run
    or that the calibration cannot serve (a refit without Gram matrices) has loss None and its reason."""
    start, base, sizes = time.perf_counter(), Shape.of(parent.model.config), row["sizes"]
    target = plan_shape(parent.model, **sizes)
    losses, params, missing = {}, 0, {}
    for name, (_, options) in VARIANTS.items():
        losses[name] = None
        if name not in VARIANTS_OF.get(key, tuple(VARIANTS)):
            missing[name] = SKIPPED
            continue
        try:
            child = variant_child(parent, target, importance, size, options)
        except SubcloneError as err:
            missing[name] = str(err)
            continue
        losses[name] = evaluate(child, val.batches(size.eval_batch))["loss"]
        params = params or parameter_total(child)
        del child
    result = {"key": "-".join(str(sizes[k]) for k in ("layers", *WIDTH_KEYS)), "text": shape_text(sizes),
              "sizes": sizes, "aggressive": row["aggressive"], "grid": row["grid"],
              "width_share": sizes["hidden"] / base.hidden, "depth_share": sizes["layers"] / base.layers,
              "params": params, "losses": losses, "seconds": time.perf_counter() - start}
    if missing:  # only then: the JSON of a shape with every variant stays as it was
        result["missing"] = missing
    log(f"  {result['text']}: " + ", ".join(f"{k} {fmt_value(v)}" for k, v in losses.items()) +
        f" ({result['seconds']:.0f} s)")
    return result


def variant_child(parent: Parent, target: Shape, importance: Any, size: Size, options: dict[str, Any]) -> Any:
    """One variant's child as `make` builds it from the calibration; a "refit_inputs" option replaces the
    family table's for this child."""
    options = dict(options)
    table_fields = {"refit_inputs": options.pop("refit_inputs")} if "refit_inputs" in options else {}
    with with_table(parent.model.config.model_type, table_fields):
        return make_child(parent, target, importance=importance, data_id=importance.data,
                          calib_tokens=size.calib_tokens, **options).model


# --- the lr sweep of one arm (bench_methods' too) ---------------------------------------------------------


def lr_trainer(parent: Parent, data_id: str, val: Any, plan: Any, seq_len: int, eval_batch: int, tag: str,
               runs: Path) -> Callable[[str, Any, str], Callable[[float], tuple[RunResult, dict]]]:
    """``trainer(name, model, strategy)(lr)``: one run of ``plan`` (steps, batch_size, evals, precision) from a
    fresh copy of ``model``, every run on the identical batches; its result and JSON row (train_one)."""
    data = (make_data(parent, data_id, "train", seq_len=seq_len), val)
    evals = rp.log_eval_steps(plan.steps, plan.evals + 1) if plan.evals else ()  # + the last step
    config = h.train_config(plan.steps, plan.batch_size, len(val), eval_batch=eval_batch, eval_at=evals,
                            precision=plan.precision)

    def trainer(name: str, model: Any, strategy: str) -> Callable[[float], tuple[RunResult, dict]]:
        return lambda lr: train_one(h.candidate(run_name(name, lr), model, lr, strategy), data, config, tag, runs)
    return trainer


def train_one(cand: Any, data: tuple[Any, Any], config: Any, tag: str, runs: Path) -> tuple[RunResult, dict]:
    """One run, its own engine call (one optimizer state in memory at a time; the seed alone fixes the batches),
    and its JSON row: h.run_json of the loss, plus the run's seconds."""
    start = time.perf_counter()
    result = h.train([cand], data[0], data[1], config, tag, runs / f"{tag}-{cand.name}.jsonl")[cand.name]
    row = h.run_json(result, "loss", seconds=time.perf_counter() - start)
    log(f"[{tag}] {cand.name}: {row['throughput']:.0f} {row['unit']} of training, best loss "
        f"{fmt_value(row['best'])} ({row['seconds']:.0f} s)")
    return result, row


def swept_arm(trained: dict[float, tuple[RunResult, dict]]) -> dict[str, Any]:
    """One arm (h.arm_json) from its runs by lr as train_one returns them: the grid is the lrs trained, the rows
    train_one's (with their seconds)."""
    return h.arm_json({lr: result for lr, (result, _) in trained.items()}, trained,
                      rows={lr: row for lr, (_, row) in trained.items()})


def comparison(arms: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Where the default child starts against what random init's best run reaches, and when it got there."""
    child, random = h.chosen_run(arms["default"]), h.chosen_run(arms["random"])
    if child is None or random is None:
        return {"child_start": None, "random_best": None, "random_reached_at": None}
    start = child["start"]
    reached = next((t for t, v in zip(random["tokens"], random["values"]) if v <= start), None)
    return {"child_start": start, "child_best": child["best"], "child_final": child["final"],
            "random_start": random["start"], "random_best": random["best"], "random_final": random["final"],
            "random_reached_at": reached, "tokens": random["tokens"][-1] if random["tokens"] else 0}


def train_arms(parent: Parent, importance: Any, val: Any, sizes: dict[str, int], size: Size, plan: TrainPlan,
               key: str, runs: Path, data_id: str) -> dict[str, Any]:
    """Every arm at every lr of ``plan`` on the identical batches, at the aggressive shape."""
    target = plan_shape(parent.model, **sizes)
    models = {arm: variant_child(parent, target, importance, size, VARIANTS[arm][1]) for arm in ARMS}
    tag = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)[-60:]  # a parent id may be a path
    trainer = lr_trainer(parent, data_id, val, plan, size.seq_len, size.eval_batch, tag, runs)
    log(f"[{key}] training {shape_text(sizes)}: {plan.steps} steps of {plan.batch_size} x {size.seq_len} tokens "
        f"per run, {sum(len(plan.lrs[a]) for a in ARMS)} runs")
    arms = {}
    for arm in ARMS:
        train_at = trainer(arm, models[arm], STRATEGY_OF[arm])
        arms[arm] = swept_arm({lr: train_at(lr) for lr in plan.lrs[arm]})
    return {"shape": sizes, "text": shape_text(sizes), "plan": asdict(plan), "seq_len": size.seq_len,
            "arms": arms, "comparison": comparison(arms)}


def open_parent(key: str, work: Path) -> tuple[Parent | None, str | None]:
    """The parent in float32 (the tiny one written into ``work``, the coder's GGUF fetched into the cache on
    first use, or the id itself), or None and why (also printed) when it cannot be loaded."""
    try:
        parent_id = smoke_parent(work) if key == SMOKE_PARENT else (
            str(coder.coder_parent_gguf()) if key == CODER else key)
        parent = load_parent(parent_id, dtype="float32")
    except (SubcloneError, OSError) as err:  # OSError: the coder's download or disk
        log(f"note: skipping parent {key!r}: {err}")
        return None, str(err)
    if key == CODER:
        parent.label = coder.LABEL  # its file name says less
    return parent, None


def smoke_parent(folder: Path) -> str:
    """bench_scale's tiny random Llama, written into ``folder``; its path."""
    from bench.bench_scale import write_parent

    write_parent(folder / "tiny-parent", "tiny")
    return str(folder / "tiny-parent")


def run_parent(parent: Parent, key: str, size: Size, skip_training: bool, runs: Path,
               data: str = DATA) -> dict[str, Any]:
    """Calibrate, measure the grid, train at the aggressive shape (where the size plans it): everything of one
    parent on one data set as JSON."""
    start = time.perf_counter()
    data_id = str(coder.coder_data()) if data == CODE else data  # the code data: built into the cache once
    importance = measure_importance(parent, data_id, tokens=size.calib_tokens)  # the refit reads the parent again
    seconds = {"calibration": time.perf_counter() - start}
    val = make_data(parent, data_id, "validation", seq_len=size.seq_len, max_tokens=size.val_tokens)
    vocab = int(parent.model.config.vocab_size)
    label = f"{parent.label}, on {DATA_LABELS[data]}" if key in RUNS_OF else parent.label
    result = {"id": key, "label": label, "shape": Shape.of(parent.model.config).as_dict(),
              "params": parameter_total(parent.model), "vocab": vocab, "ln_vocab": math.log(vocab),
              "loss": evaluate(parent.model, val.batches(size.eval_batch))["loss"],
              "calib_tokens": importance.tokens, "val_tokens": int(val.tokens.numel())}
    if key in RUNS_OF:  # only a parent run on several data sets names it: the others' JSON stays as it was
        result["data"] = data
    log(f"[{key}] {label}: loss {result['loss']:.3f}, calibrated in {seconds['calibration']:.0f} s")
    begin = time.perf_counter()
    result["shapes"] = [measure_shape(parent, importance, val, row, size, key) for row in shape_grid(parent, key, size)]
    seconds["grid"], result["training"] = time.perf_counter() - begin, None
    if not skip_training and (plan := size.training.get(key, size.training["*"])) is not None:
        begin = time.perf_counter()
        aggressive = next(s["sizes"] for s in result["shapes"] if s["aggressive"])
        result["training"] = train_arms(parent, importance, val, aggressive, size, plan, key, runs, data_id)
        seconds["training"] = time.perf_counter() - begin
    return {**result, "seconds": seconds}


def section_markdown(results: dict[str, Any], plot: Path) -> str:
    """The "quality" section (template quality.md.j2); per parent each shape's margin (nats the default child
    starts below random init), per variant the shapes where its step-0 loss is lowest, why one has no loss."""
    parents = []
    for p in results["parents"].values():
        shapes = [{**s, "margin": s["losses"]["random"] - s["losses"]["default"]} for s in p["shapes"]]
        wins, reasons = dict.fromkeys(VARIANTS, 0), {}
        for s in shapes:
            measured = {k: v for k, v in s["losses"].items() if v is not None}
            wins[min(measured, key=measured.get)] += 1
            for key, reason in s.get("missing", {}).items():
                reasons.setdefault(key, reason)
        parents.append({**p, "shapes": shapes, "misses": [s["text"] for s in shapes if s["margin"] < NAT_MARGIN],
                        "wins": wins, "reasons": reasons, "shape_text": shape_text(p["shape"])})
    edges = {"low": "the lowest of its grid: a lower lr may be better",
             "high": "the highest of its grid: a higher lr may be better", None: "inside its grid"}
    return render("quality", **{**results, "parents": parents, "carried": results.get("carried")}, plot=plot.name,
                  labels={k: label for k, (label, _) in VARIANTS.items()}, margin=NAT_MARGIN, edges=edges,
                  coder=any(p.get("data") for p in parents))


def plot_grid(ax: Any, result: dict[str, Any]) -> None:
    """Step-0 loss against the kept hidden share: a line per variant and depth (random init dashed, the shallower
    grid dotted, or dash-dotted for random init), the aggressive shape as stars, the parent as a grey line."""
    grid = [s for s in result["shapes"] if s["grid"]]
    for key, (label, _) in VARIANTS.items():
        for i, depth in enumerate(sorted({s["depth_share"] for s in grid}, reverse=True)):
            points = sorted((s["width_share"], s["losses"][key]) for s in grid
                            if s["depth_share"] == depth and s["losses"].get(key) is not None)
            if points:
                style = ("-." if i else "--") if key == "random" else ":" if i else "-"
                ax.plot(*zip(*points), style, marker=".", color=COLORS[key], label=f"{label}, {depth:.0%} depth")
        for s in result["shapes"]:
            if s["aggressive"] and s["losses"].get(key) is not None:
                ax.plot(s["width_share"], s["losses"][key], "*", markersize=10, color=COLORS[key])
    ax.axhline(result["loss"], color="grey", linewidth=1, label="parent")
    title = f"{result['label']}: step 0 (stars: aggressive shape)"
    rp.finish(ax, legend=6, title=title if len(title) <= 80 else textwrap.fill(title, 60),  # the coder's: data
              xlabel="kept hidden share", ylabel="validation loss")


def plot(results: dict[str, Any], path: Path) -> None:
    """Per parent a column: the step-0 grid on top, below it the validation loss against tokens of every run
    (the chosen run of each arm bold), when trained."""
    parents = list(results["parents"].values())
    trained = any(r["training"] for r in parents)
    fig, axes = rp.panels(max(1, len(parents)), 6.4, 4.2, 2 if trained else 1)
    for col, result in enumerate(parents):
        plot_grid(axes[0][col], result)
        if trained and not result["training"]:
            axes[1][col].set_axis_off()
        for arm, data in result["training"]["arms"].items() if result["training"] else ():
            for r in data["runs"]:
                chosen = r["lr"] == data["chosen_lr"]
                axes[1][col].plot(r["tokens"], r["values"], "--" if arm == "random" else "-", color=COLORS[arm],
                                  linewidth=2 if chosen else 0.8, alpha=1 if chosen else 0.5, marker=".",
                                  label=f"{VARIANTS[arm][0]}, lr {r['lr']:g}")
        if result["training"]:
            rp.finish(axes[1][col], legend=6, title=f"{result['label']}: {result['training']['text']}",
                      xlabel="training tokens", ylabel="validation loss")
    rp.save_figure(fig, path)


def run_size(name: str, keys: list[str], skip_training: bool) -> dict[str, Any]:
    """Every parent of ``keys`` on each of its data sets (a parent that cannot be loaded: skipped, with why)."""
    work, start = Path(tempfile.mkdtemp(prefix=f"subclone-quality-{name}-")), time.perf_counter()
    results: dict[str, Any] = {"size": name, "machine": rp.machine(), "data": DATA, "settings": asdict(SIZES[name]),
                               "parents": {}, "skipped": {}}
    for key in keys:
        parent, reason = open_parent(key, work)
        if parent is None:
            results["skipped"][key] = reason
            continue
        for tag, data in RUNS_OF.get(key, ((key, DATA),)):
            results["parents"][tag] = run_parent(parent, key, SIZES[name], skip_training, work, data)
        del parent
    log(f"run metrics in {work}")
    return {**results, "minutes": (time.perf_counter() - start) / 60}


def carried_over(results: dict[str, Any], path: Path, ran: list[str]) -> dict[str, Any]:
    """The results with the parents not run this time put back from an earlier JSON of the same size at ``path``
    (their keys in "carried"), so that rerunning one parent (--parents) keeps the others' published results."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return results
    kept = {k: v for k, v in old.get("parents", {}).items() if k.split("@")[0] not in ran}
    if not kept or old.get("size") != results["size"]:
        return results
    return {**results, "parents": {**kept, **results["parents"]}, "carried": list(kept)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one size end to end, or redraw the plot and the section from the saved JSON; returns the results."""
    parser = rp.bench_parser(__doc__, smoke="seconds, on a tiny random parent (the test's size)",
                             threads=rp.THREADS_HELP, report_only="redraw from the quality.json of --out-dir")
    parser.add_argument("--parents", help="comma-separated parent ids (default: the size's); the size's other "
                        "parents are kept from the JSON already in the output folder")
    parser.add_argument("--skip-training", action="store_true", help="step-0 losses only")
    parser.add_argument("--out-dir", type=Path, help="folder for quality.json, the plot and BENCHMARKS.md "
                        "(default docs/; smoke: a temporary folder)")
    args = parser.parse_args(argv)
    h.start(args)
    name = h.size_name(args)
    folder = h.folder("cpu" if args.report_only else name, args.out_dir, "subclone-quality-")  # cpu: docs/
    if args.report_only:
        results = json.loads((folder / "quality.json").read_text())
    else:
        keys = args.parents.split(",") if args.parents else SIZES[name].parents
        results = run_size(name, keys, args.skip_training)
        if args.parents:
            results = carried_over(results, folder / "quality.json", keys)
        write_text(folder / "quality.json", json.dumps(results, indent=1, default=rp.json_default))
    if results["parents"]:
        plot(results, folder / PLOT)
    rp.write_section("quality", section_markdown(results, folder / PLOT), folder / rp.DOC.name)
    log(f"outputs in {folder}")
    return results


if __name__ == "__main__":
    main()
