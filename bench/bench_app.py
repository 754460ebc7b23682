"""The app's actions on both embedded parents against a lesson's targets, three sessions in the server's queue,
the app's training throughput next to `subclone train`, and the tokens the Blocks page's ablation needs (see
bench/README.md). Each part writes its own section of docs/BENCHMARKS.md unless --no-write.

Run: python -m bench.bench_app [--parents default,gemma3-270m] [--steps 30]
     [--only queue|actions|training|ablation]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench._report import ROOT, bench_parser, machine, render, spearman, timed, write_section
from subclone_core.analysis import probes
from subclone_core.analysis.inspector import outsized_dimensions
from subclone_core.app import charts, longsteps, sizing
from subclone_core.app.analysis import live_summary
from subclone_core.app.jobs import BackgroundJob, JobLimiter
from subclone_core.app.session import DEFAULT_PROMPT
from subclone_core.app.settings import AppSettings
from subclone_core.app.steps import TrainRequest, child_plan, child_settings, make_children, training_work
from subclone_core.core.archs import arch_for
from subclone_core.core.shape import suggested_shape
from subclone_core.core.strategies import parameter_count
from subclone_core.io.devices import KEEP_FREED, keep_freed_memory
from subclone_core.sources.parents import load_parent
from subclone_core.workflow.children import CALIB_TOKENS, measure_importance, save_child
from subclone_core.workflow.shapes import starting_shape

BATCH, SEQ_LEN, EVAL_EVERY = 8, 128, 10  # the Train page's defaults
PARENTS = ("default", "gemma3-270m")  # the two embedded real parents
TARGETS = {"default": 15.0, "gemma3-270m": 30.0}  # seconds a lesson can wait for one step, on 2 idle cores
ABLATION_REFERENCE = 2048  # validation tokens per evaluation of the reference ranking of the blocks
ABLATION_CANDIDATES = (128, 256, 512)
LEAST, MOST = 5, 3  # the blocks a lesson points at: the least and the most important
# Each part's section of docs/BENCHMARKS.md and its heading, in the order they run.
SECTIONS = {"queue": ("app-queue", "Three sessions at once in the app's queue"),
            "actions": ("app", "The app's actions on the embedded parents"),
            "training": ("app-training", "The app's training throughput"),
            "ablation": ("app-ablation", "How many tokens the Blocks page's ablation needs")}


def run_work(work: Callable) -> Any:
    """A page step's work run to the end in a thread of its own, as the app's BackgroundJob runs it."""
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(work(lambda event: None, threading.Event())))
    thread.start()
    thread.join()
    if not result:
        raise RuntimeError("the step failed (its traceback is above)")
    return result[0]


def page_settings(parent: Any) -> Any:
    """The Child page's default settings: the parent family's own scaling, residual score and refit."""
    arch = arch_for(parent.model.config.model_type)
    return child_settings("subclone", None, arch.scale_default, None, CALIB_TOKENS,
                          residual_score=arch.residual_score, refit=arch.refit_default)


def action_rows(parent_id: str) -> list[list[object]]:
    """Each page action with its defaults, in a visitor's order: wall and CPU seconds, and the page's estimate."""
    rows = []

    def measure(page: str, action: str, fn: Callable[[], Any], estimate: float | None = None) -> Any:
        result, wall, cpu = timed(fn)
        shown = "" if estimate is None else f"{estimate:.1f}"
        rows.append([page, action, f"{wall:.1f}", f"{cpu:.1f}", shown, "yes" if wall <= TARGETS[parent_id] else "no"])
        print(f"{parent_id}: {page}: {action}: {wall:.1f} s wall, {cpu:.1f} s CPU, estimate {shown or '-'}",
              flush=True)
        return result

    parent = measure("Parent", "open the parent (converted once before)", lambda: load_parent(parent_id))
    metrics = measure("Parent", "validation, 2,048 tokens", lambda: longsteps.evaluate_parent(
        parent, None, longsteps.STEP0_TOKENS))
    rate, layers = longsteps.forward_rate(metrics), parent.model.config.num_hidden_layers
    text = measure("Parent", "Generate, 30 tokens", lambda: probes.generate_text(
        parent.model, parent.preprocessor, DEFAULT_PROMPT, longsteps.SAMPLE_TOKENS))
    importance = measure("Importance", f"Run calibration, {CALIB_TOKENS:,} tokens", lambda: run_work(
        longsteps.calibration_work(parent, None, CALIB_TOKENS)),
        longsteps.estimate_seconds("calibration", CALIB_TOKENS, rate))
    units = outsized_dimensions(importance)
    measure("Importance", f"Inspector: What do they fire on? ({len(units)} dimensions)", lambda: run_work(
        longsteps.inspector_work(parent, units, None, CALIB_TOKENS)),
        longsteps.estimate_seconds("inspector", CALIB_TOKENS, rate))
    measure("Blocks", f"Compute loss without each block, {probes.ABLATION_TOKENS} tokens each",
            lambda: run_work(longsteps.ablation_work(parent, None, probes.ABLATION_TOKENS)),
            longsteps.estimate_seconds("ablation", probes.ABLATION_TOKENS, rate, blocks=layers))
    shape = starting_shape(parent.model)
    budget = parameter_count(parent.model, shape)
    measure("Child", f"Explore shapes, budget {budget / 1e6:.1f} M", lambda: run_work(
        longsteps.explorer_work(parent, importance, None, CALIB_TOKENS, budget)),
        longsteps.explorer_seconds(parent, metrics, budget, CALIB_TOKENS, calibrated=True))
    settings = page_settings(parent)
    made = measure("Child", f"Generate {shape.layers} x {shape.hidden} (child, twin, scores, samples)",
                   lambda: run_work(longsteps.child_work(parent, shape, settings, importance, metrics,
                                                         DEFAULT_PROMPT, text)),
                   longsteps.generate_seconds(parent, metrics, child_plan(parent, settings, shape),
                                              parameter_count(parent.model, shape), calibrated=True))
    with tempfile.TemporaryDirectory() as tmp:
        measure("Child", "Save", lambda: save_child(made["child"], Path(tmp) / "child", task=parent.task))
    return rows


def queue_rows(parent_id: str, budgets: tuple[int, ...] = (1024, 1152, 1280)) -> list[list[object]]:
    """Three sessions calibrating at once (three budgets: three computations) through the server's queue, against
    the same three one after another: the places in line each was shown, and the wall times."""
    parent = load_parent(parent_id)
    alone = [timed(lambda t=t: run_work(longsteps.calibration_work(parent, None, t)))[1] for t in budgets]
    config = AppSettings.load()
    limiter = JobLimiter(max_running=config.max_jobs, max_queued=config.max_queue)
    start = time.perf_counter()
    jobs = [BackgroundJob(longsteps.calibration_work(parent, None, t), name=f"calibration-{t}",
                          limiter=limiter).start() for t in budgets]
    places = [job.position for job in jobs]  # read at once: the first runs, the others wait in line
    for job in jobs:
        job.wait()
    together = time.perf_counter() - start
    if any(job.status != "done" for job in jobs):
        raise RuntimeError([job.error for job in jobs])
    return [[parent_id, ", ".join(f"{t:,}" for t in budgets), ", ".join(f"{s:.1f}" for s in alone),
             f"{sum(alone):.1f}", f"{together:.1f}", f"{together / sum(alone):.2f}",
             ", ".join("running" if p is None else f"{p} in line" for p in places)]]


def page_rows() -> list[list[object]]:
    """The app through AppTest: opening it (the default parent loaded and scored), then a switch to each page
    once a calibration and a child exist."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
    _, wall, cpu = timed(at.run)
    target = TARGETS["default"]
    rows = [["app", "open (default parent loaded and scored)", f"{wall:.1f}", f"{cpu:.1f}", "",
             "yes" if wall <= target else "no"]]
    at.switch_page("pages/importance.py").run()
    for page, button in (("importance", "run_calibration"), ("child", "generate_child")):
        at.switch_page(f"pages/{page}.py").run()
        at.button(key=button).click().run()
        for job, _ in list(at.session_state["workspace"].steps.values()):
            job.wait()
        at.run()
    for page in ("parent", "importance", "blocks", "child", "train"):
        _, wall, cpu = timed(at.switch_page(f"pages/{page}.py").run)
        rows.append(["app", f"switch to the {page.capitalize()} page", f"{wall:.2f}", f"{cpu:.2f}", "",
                     "yes" if wall <= target else "no"])
        print(rows[-1], flush=True)
    if at.exception:
        raise RuntimeError([e.value for e in at.exception])
    return rows


def app_training(parent: Any, child: Any, twin: Any, settings: Any, steps: int, batch: int = BATCH,
                 seq_len: int = SEQ_LEN, eval_every: int = EVAL_EVERY) -> float:
    """The Train page's path: the job thread trains while the page's fragment polls once a second."""
    request = TrainRequest(parent=parent, data_id=None, child=child, twin=twin, settings=settings,
                           steps=steps, batch_size=batch, seq_len=seq_len, eval_every=eval_every)
    job = BackgroundJob(training_work(request), name="bench-train").start()
    while not job.wait(1.0):
        events = job.events()
        charts.loss_chart(events).to_json()  # what st.plotly_chart serializes
        live_summary(events)
    if job.status != "done":
        raise RuntimeError(f"app training {job.status}: {job.error}")
    return job.result["subclone"].throughput


def cli_training(child_dir: Path, steps: int) -> float:
    """`subclone train` on the saved child with its random twin, same settings; the child's tokens/s."""
    with tempfile.TemporaryDirectory() as run:
        command = [sys.executable, "-m", "subclone_core.cli", "train", "--model", str(child_dir),
                   "--baseline", "random", "--steps", str(steps), "--batch-size", str(BATCH),
                   "--seq-len", str(SEQ_LEN), "--eval-every", str(EVAL_EVERY), "--out", f"{run}/run",
                   "--quiet", "--json"]
        # as a user starts `subclone`: without the freed-memory setting this process took from `make run`'s
        env = {**{k: v for k, v in os.environ.items() if k not in KEEP_FREED}, "HF_HUB_OFFLINE": "1"}
        out = subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout
    return next(r["throughput"] for r in json.loads(out)["rows"] if r["name"] != "random")


def training_rows(steps: int) -> list[list[object]]:
    """App and CLI tokens/s of the default child, run in turns (app, CLI, app, CLI) to share the load."""
    parent = load_parent("default")
    settings = child_settings("subclone", None, None, None, 4096)
    importance = measure_importance(parent, None, tokens=4096)
    child, twin = make_children(parent, suggested_shape(parent.model), settings, importance=importance)
    speeds = {"app": [], "cli": []}
    with tempfile.TemporaryDirectory() as tmp:
        child_dir = save_child(child, Path(tmp) / "child", task=parent.task)
        for _ in range(2):
            speeds["app"].append(app_training(parent, child, twin, settings, steps))
            speeds["cli"].append(cli_training(child_dir, steps))
    return [[name, f"{child.shape.layers} x {child.shape.hidden}", f"{steps} x {BATCH} x {SEQ_LEN}",
             ", ".join(f"{v:.0f}" for v in values), f"{max(values):.0f}"] for name, values in speeds.items()]


def default_run_row(parent_id: str) -> list[object]:
    """The Train page's first defaults (app.sizing) for one parent's default child, made by Generate and trained
    the app's way: the rate and seconds the page predicts against those measured."""
    parent = load_parent(parent_id)
    settings = page_settings(parent)
    importance = measure_importance(parent, None, tokens=CALIB_TOKENS)
    made = run_work(longsteps.child_work(parent, starting_shape(parent.model), settings, importance, None,
                                         DEFAULT_PROMPT, None))
    child, twin = made["child"], made["twin"]
    speed = sizing.speed_of(child.model, True, "cpu", torch.get_num_threads(),
                            measured=longsteps.forward_rate(made["step0"]["subclone"]))
    size = sizing.size_run(speed)
    throughput, wall, _ = timed(lambda: app_training(parent, child, twin, settings, size.steps, size.batch_size,
                                                     size.seq_len, size.eval_every))
    row = [parent_id, f"{child.shape.layers} x {child.shape.hidden}",
           f"{size.steps} x {size.batch_size} x {size.seq_len}, validation every {size.eval_every}",
           f"{speed.training_rate(size.batch_size * size.seq_len):.0f}", f"{throughput:.0f}", f"{size.seconds:.0f}",
           f"{wall:.0f}"]
    print(row, flush=True)
    return row


def ablation_token_rows(parent_id: str) -> list[list[object]]:
    """The Blocks page's ablation on a few token counts against ABLATION_REFERENCE tokens: seconds, the losses'
    rank correlation with the reference's, the LEAST cheapest blocks to remove and the MOST costly."""
    parent = load_parent(parent_id)
    runs = {tokens: timed(lambda t=tokens: probes.ablate_parent(parent, None, t))
            for tokens in (ABLATION_REFERENCE, *ABLATION_CANDIDATES)}
    reference = torch.tensor(runs[ABLATION_REFERENCE][0]["losses"])
    rows = []
    for tokens, (result, wall, _) in runs.items():
        losses = torch.tensor(result["losses"])
        order = losses.argsort().tolist()
        rows.append([parent_id, f"{tokens:,}", f"{wall:.1f}", f"{spearman(losses, reference):.3f}",
                     ", ".join(str(i) for i in sorted(order[:LEAST])), ", ".join(str(i) for i in sorted(order[-MOST:]))])
        print(rows[-1], flush=True)
    return rows


def part_text(part: str, parents: list[str], steps: int) -> str:
    """One part of the report (templates app_PART.md.j2): its prose and the tables of what it measured."""
    if part == "queue":  # first, in a fresh process: nothing else of the app's has run in it yet
        return render("app_queue", rows=[row for parent_id in parents for row in queue_rows(parent_id)])
    if part == "actions":
        return render("app_actions", parents=[(p, TARGETS[p], action_rows(p) + (page_rows() if p == "default" else []))
                                              for p in parents])
    if part == "ablation":
        return render("app_ablation", rows=[row for parent_id in parents for row in ablation_token_rows(parent_id)],
                      reference=ABLATION_REFERENCE, least=LEAST, most=MOST, default=probes.ABLATION_TOKENS)
    rows = training_rows(steps)  # before the default runs: the order they have always run in
    return render("app_training", rows=rows, target=sizing.TARGET_SECONDS, defaults=[default_run_row(p) for p in parents])


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--steps", type=int, default=30, help="training steps per run (default 30)")
    parser.add_argument("--only", choices=tuple(SECTIONS), help="run one part only")
    parser.add_argument("--parents", default=",".join(PARENTS), help="embedded parents, comma-separated")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = parser.parse_args()
    keep_freed_memory()  # as `make run` starts the app
    load = os.getloadavg()[0]  # before any part: later, the parts before raise it themselves
    shared = " (other work shared the 2 cores: these numbers are pessimistic)" if load > 1.0 else " (idle)"
    for part in (args.only,) if args.only else tuple(SECTIONS):
        text = f"Machine: {machine()}; load average {load:.1f} when the benchmark started{shared}.\n\n" + part_text(
            part, args.parents.split(","), args.steps)
        print(text, flush=True)
        if not args.no_write:
            name, title = SECTIONS[part]
            write_section(name, f"## {title} (`bench/bench_app.py`)\n\n{text}")


if __name__ == "__main__":
    main()
