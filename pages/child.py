"""Page 4, Child: choose the child's shape (checked as you type), generate it with its random twin,
compare them with the parent before any training, save it and download it."""

from __future__ import annotations

import streamlit as st

from subclone_core.analysis import exclusive
from subclone_core.app import charts, ui
from subclone_core.app.analysis import zip_folder
from subclone_core.app.steps import (
    child_settings,
    make_children,
    sample_generations,
    save_child_folder,
    step0_report,
)
from subclone_core.archs import arch_for
from subclone_core.errors import SubcloneError
from subclone_core.explore import explore_shapes, validation_sample
from subclone_core.shape import SIZE_ROLES, Shape, nearest_valid_shape, suggested_shape
from subclone_core.strategies import DEFAULT_DROP, parameter_count, plan_shape
from subclone_core.training.job import needs_importance
from subclone_core.workflow import measure_importance

EXPLORE_CHART = "chart_explore"
LABELS = {"layers": "Blocks", "hidden": "Hidden", "heads": "Heads", "kv_heads": "KV heads", "ffn": "FFN"}
STRATEGY_LABELS = {"subclone": "subclone: neurons and heads in importance order (the paper)",
                   "first-k": "first-k: the first neurons and heads, no reordering (ablation)",
                   "uniform": "uniform: evenly strided neurons, first blocks (weight selection)"}

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
    """Start from a suggested shape (with the Blocks page's block count); reset when the parent changes."""
    if st.session_state.get("shape_parent") != parent.id:
        set_shape(suggested_shape(parent.model, ws.child_layers))
        st.session_state["shape_parent"] = parent.id
    if ws.child_layers and st.session_state.get("shape_blocks_seen") != ws.child_layers:
        st.session_state[shape_keys()["layers"]] = ws.child_layers
        st.session_state["shape_blocks_seen"] = ws.child_layers


def shape_inputs() -> Shape | None:
    """The size inputs; the validated shape, or None after showing what is wrong and the nearest valid one."""
    sizes = {}
    for column, (role, key) in zip(st.columns(len(SIZE_ROLES)), shape_keys().items()):
        limit = getattr(parent_shape, role)
        sizes[role] = int(column.number_input(f"{LABELS[role]} (parent {limit})", 1, limit, key=key))
    try:
        return plan_shape(parent.model, **sizes)
    except SubcloneError as err:
        nearest = nearest_valid_shape(parent.model, sizes)
        text = ", ".join(f"{LABELS[r].lower()} {getattr(nearest, r)}" for r in SIZE_ROLES)
        st.error(f"This shape is not valid: {err}. Nearest valid shape: {text}.", icon=":material/error:")
        st.button("Use the nearest valid shape", key="use_nearest", on_click=set_shape, args=(nearest,))
        return None


def show_size(target: Shape) -> None:
    """Parameters of the child and their share of the parent's."""
    parent_params = sum(p.numel() for p in parent.model.parameters())
    params = parameter_count(parent.model, target)
    left, right = st.columns(2)
    left.metric("Child parameters", f"{params / 1e6:.2f} M")
    right.metric("Share of the parent", f"{params / parent_params:.1%}")


def generate(target: Shape, strategy: str, drop, scale: bool) -> None:
    """Make the child and its twin, then evaluate all three and sample text from them."""
    update, clear = None, lambda: None
    settings = child_settings(strategy, drop, scale, ws.data_id, ws.calib_tokens)
    if ws.importance is None and needs_importance(settings):
        update, clear = ui.progress_bar("Calibrating the parent (this strategy needs importance)")
    with ui.errors_shown("generating the child"):
        child, twin = make_children(parent, target, settings, importance=ws.importance, progress=update)
        ws.set_child(child, twin, settings)
        if ws.importance is None and child.importance is not None:
            ws.importance = child.importance
        clear()
        with st.spinner("Evaluating the child, its random twin and the parent..."):
            ws.step0 = step0_report(parent, child, twin, ws.data_id, 2048)
            if parent.task_spec.sequences:
                ws.samples = {"prompt": ws.prompt, **sample_generations(parent, child, twin, ws.prompt, 30)}
    clear()


def show_report(step0: dict[str, dict]) -> None:
    """Step-0 loss and perplexity (or accuracy) of the child, its random twin and the parent."""
    for column, (name, metrics) in zip(st.columns(3), step0.items()):
        column.metric(f"{name}: validation loss", f"{metrics['loss']:.3f}")
        if "perplexity" in metrics:
            column.metric(f"{name}: perplexity", f"{metrics['perplexity']:,.1f}")
        else:
            column.metric(f"{name}: accuracy", f"{metrics['accuracy']:.1%}")
    st.plotly_chart(charts.comparison_bars(step0), key="chart_step0")
    if ws.samples:
        st.markdown(f"**Samples** (greedy, prompt: _{ui.plain(ws.samples['prompt'])}_)")
        for name in ("parent", "subclone", "random"):
            st.markdown(f"- **{name}:** {ui.plain(ws.samples[name])}")


def save_and_download(task: str) -> None:
    """Save under the output folder; then offer the folder as a zip."""
    shape = ws.child.shape
    name = st.text_input("Folder name (letters, digits, . _ -)", key=ui.keep("save_name",
                                                                             f"child-{shape.layers}x{shape.hidden}"))
    overwrite = st.checkbox("Replace an existing folder of that name", key="save_overwrite")
    if st.button("Save", key="save_child"):
        with ui.errors_shown("saving the child"):
            ws.saved_to = save_child_folder(ws.child, ui.settings(), name, task, overwrite=overwrite)
    if ws.saved_to is not None:
        folder = ws.saved_to
        st.success(f"Saved to `{folder}` (config, model.safetensors, tokenizer or image processor, "
                   "README.md model card, subclone.json manifest).")
        st.download_button("Download as zip", data=lambda: zip_folder(folder), file_name=f"{folder.name}.zip",
                           mime="application/zip", key="download_child", on_click="ignore")


def run_explorer(budget: int) -> None:
    """Calibrate when needed, then subclone and score every shape near the budget."""
    with ui.errors_shown("exploring shapes"):
        if ws.importance is None:
            update, clear = ui.progress_bar("Calibrating the parent")
            with exclusive(parent.model):
                ws.set_importance(measure_importance(parent, ws.data_id, tokens=ws.calib_tokens, progress=update))
            clear()
        batches = validation_sample(parent, ws.data_id)
        update, clear = ui.progress_bar("Subcloning and scoring shapes")
        ws.exploration = explore_shapes(parent.model, ws.importance, budget, batches, progress=update)
        clear()


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
    default = round(parameter_count(parent.model, suggested_shape(parent.model, ws.child_layers)) / 1e6, 3)
    budget = st.number_input("Parameter budget (millions)", 0.001, 1e6, step=1.0, format="%.3f",
                             key=ui.keep("explore_budget", default))
    st.caption("Subclones a grid of shapes (blocks x width, heads, KV heads and FFN at the parent's ratios) "
               "near the budget and measures each one's validation loss before training.")
    if st.button("Explore shapes", key="run_explore"):
        run_explorer(int(budget * 1e6))
    if ws.exploration is None:
        return
    st.plotly_chart(charts.explorer_scatter(ws.exploration), key=EXPLORE_CHART, on_select=use_clicked_shape,
                    selection_mode="points")
    front = [i for i, p in enumerate(ws.exploration.points) if p.pareto]
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
if target is not None:
    show_size(target)
    st.subheader("How")
    strategy = st.selectbox("Strategy", list(STRATEGY_LABELS), format_func=STRATEGY_LABELS.get,
                            key=ui.keep("strategy", "subclone"))
    use_blocks = ws.drop is not None and st.checkbox(
        f"Remove the blocks chosen on the Blocks page ({ws.drop})", key=ui.keep("use_block_choice", True))
    drop = ws.drop if use_blocks else None
    st.caption(f"Block policy: {drop if drop is not None else DEFAULT_DROP[strategy] + ' (the default)'}")
    scale = st.toggle("Scale sliced weights by sqrt(fan-in ratio)",
                      key=ui.keep("scale", arch_for(parent.model.config.model_type).scale_default))
    if st.button("Generate", type="primary", key="generate_child"):
        generate(target, strategy, drop, scale)
if ws.child is not None:
    st.divider()
    shape = ws.child.shape
    st.subheader(f"The child: {shape.layers} blocks x {shape.hidden} ({ws.child.manifest['strategy']})")
    if ws.step0 is not None:
        show_report(ws.step0)
    save_and_download(parent.task)
