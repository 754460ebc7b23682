"""Page 4, Child: choose the child's shape (checked as you type), generate it with its random twin,
compare them with the parent before any training, save it and download it."""

from __future__ import annotations

import streamlit as st

from subclone_core.analysis.explore import REFIT_TOKENS
from subclone_core.app import charts, ui
from subclone_core.app.analysis import zip_folder
from subclone_core.app.inputs import app_words, duration_text, without_markup, without_suggestion
from subclone_core.app.longsteps import (
    SAMPLE_TOKENS,
    STEP0_TOKENS,
    child_work,
    explorer_seconds,
    explorer_work,
    generate_seconds,
    result_key,
)
from subclone_core.app.steps import STRATEGY_LABELS, child_plan, child_settings, save_child_folder
from subclone_core.core.archs import arch_for
from subclone_core.core.errors import SubcloneError
from subclone_core.core.manifest import Manifest
from subclone_core.core.shape import SIZE_ROLES, Shape, nearest_valid_shape
from subclone_core.core.strategies import parameter_count, plan_shape, strategy_shape
from subclone_core.workflow.jobs import CandidateSettings, block_policy_text
from subclone_core.workflow.shapes import starting_shape

EXPLORE_CHART = "chart_explore"
LABELS = {"layers": "Blocks", "hidden": "Hidden", "heads": "Heads", "kv_heads": "KV heads", "ffn": "FFN"}
RANKING_LABELS = {"read": "what reads it (the inputs of the layers after the pre-norms)",
                  "written": "what is written to it (the outputs that join it, the paper's)"}

ws = ui.workspace()
st.title("4. Child")
parent = ui.current_parent()
parent_shape = Shape.of(parent.model.config)


def shape_keys() -> dict[str, str]:
    return {role: f"{ui.KEEP}shape_{role}" for role in SIZE_ROLES}


def set_shape(shape: Shape) -> None:
    """Write a shape into the size inputs (used before they are drawn, or as a button callback)."""
    for role, key in shape_keys().items():
        st.session_state[key] = getattr(shape, role)


def init_shape() -> None:
    """Start from the parent's starting shape (workflow.shapes: measured to start below random init; with the
    Blocks page's block count); reset when the parent changes."""
    if st.session_state.get("shape_parent") != parent.id:
        set_shape(starting_shape(parent.model, ws.child_layers))
        st.session_state["shape_parent"] = parent.id
    if ws.child_layers and st.session_state.get("shape_blocks_seen") != ws.child_layers:
        st.session_state[shape_keys()["layers"]] = ws.child_layers
        st.session_state["shape_blocks_seen"] = ws.child_layers


def shape_inputs() -> Shape | None:
    """The size inputs (range in each label; the parent's size is the top); the validated shape, or None
    after saying what is wrong (and, for a shape the ranges allow but the heads do not, the nearest one)."""
    sizes = {}
    for column, role in zip(st.columns(len(SIZE_ROLES)), SIZE_ROLES):
        sizes[role] = ui.checked_number(LABELS[role], 1, getattr(parent_shape, role), f"shape_{role}",
                                        getattr(parent_shape, role), column=column, step=1)
    if None in sizes.values():
        return None
    try:
        return plan_shape(parent.model, **{role: int(v) for role, v in sizes.items()})
    except SubcloneError as err:
        nearest = nearest_valid_shape(parent.model, sizes)
        text = ", ".join(f"{LABELS[r].lower()} {getattr(nearest, r)}" for r in SIZE_ROLES)
        st.error(f"This shape is not valid: {without_suggestion(str(err))}. Nearest valid shape: {text}.",
                 icon=":material/error:")
        st.button("Use the nearest valid shape", key="use_nearest", on_click=set_shape, args=(nearest,))
        return None


def show_size(target: Shape) -> None:
    """Parameters of the child and their share of the parent's."""
    parent_params = sum(p.numel() for p in parent.model.parameters())
    params = parameter_count(parent.model, target)
    left, right = st.columns(2)
    left.metric("Child parameters", f"{params / 1e6:.2f} M")
    right.metric("Share of the parent", f"{params / parent_params:.1%}")


def parent_step0() -> tuple[dict | None, str | None]:
    """The parent's score on the step-0 tokens and its continuation of the prompt, when already known."""
    metrics = ws.parent_metrics if (ws.parent_metrics or {}).get("budget") == STEP0_TOKENS else None
    metrics = metrics or ui.cached(result_key("parent-eval", ws.parent_id, ws.data_id, STEP0_TOKENS))
    text = ws.generations.get((ws.prompt, SAMPLE_TOKENS))
    return metrics, text or ui.cached(("generation", ws.parent_id, ws.prompt, SAMPLE_TOKENS))


def use_children(result: dict) -> None:
    """Make the generated child and its twin this session's, with their step-0 report and samples."""
    ws.set_child(result["child"], result["twin"], result["settings"])
    if ws.importance is None and result["importance"] is not None:
        ws.importance = result["importance"]
    ws.step0, ws.samples = result["step0"], result["samples"]


def generate(target: Shape, settings: CandidateSettings, seconds: float | None) -> None:
    """Make the child and its twin in the background, then score all three and sample text from them."""
    metrics, text = parent_step0()
    work = child_work(parent, target, settings, ws.importance, metrics, ws.prompt, text)
    # sessions asking for the same child (same calibration, prompt and settings) share one job
    key = result_key("child", ws.parent_id, ws.data_id, repr(target), repr(settings), id(ws.importance), ws.prompt)
    ui.start_step("child", lambda emit, cancel: {**work(emit, cancel), "settings": settings}, use_children, key=key,
                  estimate=seconds)


def shape_of_strategy(strategy: str, target: Shape) -> Shape | None:
    """The shape the strategy builds for the target, said when it differs (a depth-only method keeps every width,
    a rotation the heads and FFN); None, with the reason, where the strategy is not defined for this family."""
    try:
        built = strategy_shape(parent.model, strategy, target)
    except SubcloneError as err:
        st.error(ui.plain(str(err)), icon=":material/error:")
        return None
    if built != target:
        text = ", ".join(f"{LABELS[r].lower()} {getattr(built, r)}" for r in SIZE_ROLES)
        st.info(f"{STRATEGY_LABELS[strategy].split(':')[0]} builds this shape instead: {text} "
                f"({parameter_count(parent.model, built) / 1e6:.2f} M parameters).", icon=":material/info:")
    return built


def show_plan(settings: CandidateSettings, target: Shape) -> tuple[list[str], float | None]:
    """The plan of the child Generate would build, in one line, a warning for anything a visitor would expect
    that it leaves off, and how long Generate should take; returns the warnings shown and that estimate."""
    with ui.errors_shown("planning the child"):
        plan = child_plan(parent, settings, target)
        st.caption(ui.plain(plan.line()))
        for warning in plan.warnings():
            st.warning(ui.plain(app_words(warning)), icon=":material/warning:")
        seconds = generate_seconds(parent, ws.parent_metrics, plan, parameter_count(parent.model, target),
                                   calibrated=ws.importance is not None)
        if seconds is not None:
            st.caption(f"Generate: {duration_text(seconds)}, mostly the refit; in the background, Cancel stops it.")
        return plan.warnings(), seconds
    return [], None


def show_child_plan(manifest: Manifest, shown: list[str]) -> None:
    """The plan the child was built by (a child made by an older version has none), and its warnings that the
    plan above does not show already."""
    plan = manifest.plan or {}
    if plan.get("line"):
        st.caption(f"Built by the {ui.plain(plan['line'])}")
    for warning in plan.get("warnings", []):
        if warning not in shown:
            st.warning(ui.plain(app_words(warning)), icon=":material/warning:")


def expectation(step0: dict[str, dict]) -> None:
    """What the step-0 numbers mean, and a warning when the child starts worse than random init."""
    child, random = step0["subclone"]["loss"], step0["random"]["loss"]
    st.caption("Before training, a child cut this much from its parent is far worse than the parent: a "
               "perplexity in the thousands and garbled samples are normal here. What counts is that it "
               "starts below its random twin and learns faster on the Train page.")
    if child > random:
        st.warning(f"The child starts worse than its random twin (loss {child:.2f} against {random:.2f}). Its "
                   f"inherited weights hurt at this shape: try {', '.join(remedies(ws.child.manifest))} before "
                   "training.", icon=":material/warning:")


def remedies(manifest: Manifest) -> list[str]:
    """What helps a child that starts worse than random init, most effective first (docs/BENCHMARKS.md,
    real-parent quality), leaving out what this child already has."""
    helps = []
    if manifest.order == "importance" and not manifest.refit:
        helps.append("the least-squares refit (the largest gain on both real parents)")
    if manifest.order == "importance" and manifest.residual_score != "read":
        helps.append("ranking the residual stream by what reads it")
    return [*helps, "more blocks or width", "the magnitude block policy", "no weight scaling"]


def headline_value(task, metrics: dict) -> str:
    """The task's headline value, short enough for a metric tile: a perplexity in the billions (a child cut
    hard, before training) as 3.5e+10 rather than a number cut off at the tile's edge."""
    value = metrics.get(task.headline)
    if isinstance(value, float) and abs(value) >= 1e6:
        return f"{value:.2g}"
    return task.headline_text(metrics)


def show_report(step0: dict[str, dict]) -> None:
    """Step-0 loss and the task's headline value (perplexity, accuracy) of the child, its random twin and the parent."""
    task = parent.task_spec
    for column, (name, metrics) in zip(st.columns(3), step0.items()):
        column.metric(f"{name}: validation loss", f"{metrics['loss']:.3f}")
        column.metric(f"{name}: {task.headline}", headline_value(task, metrics))
    expectation(step0)
    st.plotly_chart(charts.comparison_bars(step0), key="chart_step0")
    if ws.samples:
        st.markdown(f"**Samples** (greedy, prompt: _{ui.plain(ws.samples['prompt'])}_)")
        for name in ("parent", "subclone", "random"):
            st.markdown(f"- **{name}:** {ui.plain(without_markup(ws.samples[name]))}")


def save_name_key(shape: Shape) -> str:
    """The folder name input's key, its value following each new child's shape (child-<blocks>x<hidden>)
    unless the visitor typed a name of their own."""
    automatic = f"child-{shape.layers}x{shape.hidden}"
    key = ui.keep("save_name", automatic)
    previous = st.session_state.get("save_name_automatic")
    if previous != automatic and st.session_state[key] in (previous, ""):
        st.session_state[key] = automatic
    st.session_state["save_name_automatic"] = automatic
    return key


def save_and_download(task: str) -> None:
    """Save under the output folder; then offer the folder as a zip."""
    name = st.text_input("Folder name (letters, digits, . _ -)", key=save_name_key(ws.child.shape))
    overwrite = st.checkbox("Replace an existing folder of that name", key="save_overwrite")
    if st.button("Save", key="save_child"):
        with ui.errors_shown("saving the child"):
            folder = ui.settings().output_path(name, "children")
            if not overwrite and folder.is_dir() and any(folder.iterdir()):
                raise SubcloneError(f"a folder named {name!r} already exists: choose another name or tick "
                                    "\"Replace an existing folder of that name\"")
            ws.saved_to = save_child_folder(ws.child, ui.settings(), name, task, overwrite=overwrite, owner=ws.key)
    if ws.saved_to is not None:
        folder = ws.saved_to
        st.success(f"Saved to `{folder}` (config, model.safetensors, tokenizer or image processor, "
                   "README.md model card, subclone.json manifest).")
        st.download_button("Download as zip", data=lambda: zip_folder(folder), file_name=f"{folder.name}.zip",
                           mime="application/zip", key="download_child", on_click="ignore")


def run_explorer(budget: int, seconds: float | None) -> None:
    """Calibrate when needed, then subclone and score every shape near the budget, in the background."""
    key = result_key("explore", ws.parent_id, ws.data_id, ws.calib_tokens, budget)
    known = ui.cached(key)
    if known is not None:
        ws.exploration = known[1]
        return

    def use(result: tuple) -> None:
        importance, ws.exploration = ui.remember(key, result)
        if ws.importance is None:
            ws.importance = importance

    ui.start_step("explorer", explorer_work(parent, ws.importance, ws.data_id, ws.calib_tokens, budget), use, key=key,
                  estimate=seconds)


def use_clicked_shape() -> None:
    """Chart callback: the clicked point's shape goes into the size inputs (before they are drawn)."""
    points = st.session_state[EXPLORE_CHART]["selection"]["points"]
    if points and ws.exploration is not None:
        index = points[0]["customdata"]
        set_shape(ws.exploration.points[int(index[0] if isinstance(index, list) else index)].shape)


def shape_label(index: int) -> str:
    point = ws.exploration.points[index]
    s = point.shape
    return (f"{s.layers} blocks x {s.hidden} ({s.heads} heads, {s.kv_heads} KV, FFN {s.ffn}): "
            f"{point.params / 1e6:.2f} M, step-0 loss {point.loss:.3f}{' (Pareto front)' if point.pareto else ''}")


def show_explorer() -> None:
    """The explorer: a budget, the scatter of shapes (click one to use it), and a picker of the same."""
    default = round(parameter_count(parent.model, starting_shape(parent.model, ws.child_layers)) / 1e6, 3)
    largest = round(sum(p.numel() for p in parent.model.parameters()) / 1e6, 3)
    budget = ui.checked_number("Parameter budget (millions)", 0.001, largest, "explore_budget", default,
                               step=1.0, format="%.3f")
    st.caption("Subclones a grid of shapes (blocks x width, heads, KV heads and FFN at the parent's ratios) "
               "near the budget and measures each one's validation loss before training. Each shape is refit on "
               f"{min(ws.calib_tokens, REFIT_TOKENS):,} of the calibration tokens (the same ranking as all of them); "
               "Generate refits the shape you use on all of them.")
    seconds = None
    if budget is not None:
        seconds = explorer_seconds(parent, ws.parent_metrics, int(budget * 1e6), ws.calib_tokens,
                                   calibrated=ws.importance is not None)
        st.caption(f"Estimated time: {duration_text(seconds)}, in the background; Cancel stops it.")
    running = ws.running("explorer") is not None
    if st.button("Explore shapes", key="run_explore", disabled=budget is None or running):
        run_explorer(int(budget * 1e6), seconds)
    if ui.step_panel("explorer", "exploring shapes") or ws.exploration is None:
        return
    st.plotly_chart(charts.explorer_scatter(ws.exploration), key=EXPLORE_CHART, on_select=use_clicked_shape,
                    selection_mode="points")
    front = [i for i, p in enumerate(ws.exploration.points) if p.pareto]
    if not front:
        st.warning("None of these shapes starts below random init, so none is marked best: try a larger "
                   "budget (more blocks or width).", icon=":material/warning:")
    left, right = st.columns([4, 1], vertical_alignment="bottom")
    index = left.selectbox("Explored shape", front + [i for i in range(len(ws.exploration.points))
                                                      if i not in front], format_func=shape_label,
                           key="explore_pick")
    right.button("Use this shape", key="use_explored", on_click=set_shape,
                 args=(ws.exploration.points[index].shape,))


init_shape()
st.subheader("Shape")
with st.expander("Explore shapes near a parameter budget", expanded=ws.exploration is not None):
    show_explorer()
target = shape_inputs()
planned: list[str] = []  # the warnings of the plan shown above Generate
if target is not None:
    show_size(target)
    st.subheader("How")
    strategy = st.selectbox("Strategy", list(STRATEGY_LABELS), format_func=STRATEGY_LABELS.get,
                            key=ui.keep("strategy", "subclone"))
    use_blocks = ws.drop is not None and st.checkbox(
        f"Remove the blocks chosen on the Blocks page ({ws.drop})", key=ui.keep("use_block_choice", True))
    drop = ws.drop if use_blocks else None
    st.caption(f"Block policy: {block_policy_text(strategy, drop)}")
    arch = arch_for(parent.model.config.model_type)
    scale = st.toggle("Scale sliced weights by sqrt(fan-in ratio)", key=ui.keep("scale", arch.scale_default))
    refit = st.toggle("Refit weights whose inputs shrank (least squares on the calibration data)",
                      key=ui.keep("refit", arch.refit_default), disabled=strategy != "subclone")
    ranking = st.selectbox("Rank the residual stream by", list(RANKING_LABELS), format_func=RANKING_LABELS.get,
                           key=ui.keep("residual_score", arch.residual_score), disabled=strategy != "subclone")
    settings = child_settings(strategy, drop, scale, ws.data_id, ws.calib_tokens, residual_score=ranking,
                              refit=refit)
    built = shape_of_strategy(strategy, target)
    planned, seconds = show_plan(settings, built) if built is not None else ([], None)
    if st.button("Generate", type="primary", key="generate_child",
                 disabled=built is None or ws.running("child") is not None):
        generate(built, settings, seconds)
ui.step_panel("child", "generating the child")
if target is None:
    st.caption("Generate is blocked until the shape above is valid.")
if ws.child is not None:
    st.divider()
    shape = ws.child.shape
    st.subheader(f"The child: {shape.layers} blocks x {shape.hidden} ({ws.child.manifest.strategy})")
    show_child_plan(ws.child.manifest, planned)
    if ws.step0 is not None:
        show_report(ws.step0)
    save_and_download(parent.task)
