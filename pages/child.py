"""Page 4, Child: choose the child's shape (checked as you type), generate it with its random twin,
compare them with the parent before any training, save it and download it."""

from __future__ import annotations

import streamlit as st

from subclone_core.app import charts, ui
from subclone_core.app.analysis import zip_folder
from subclone_core.app.steps import make_children, sample_generations, save_child_folder, step0_report
from subclone_core.archs import arch_for
from subclone_core.errors import SubcloneError
from subclone_core.shape import SIZE_ROLES, Shape, nearest_valid_shape, parameter_count, suggested_shape
from subclone_core.strategies import DEFAULT_DROP, needs_calibration, plan_shape

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
    if ws.importance is None and needs_calibration(strategy, drop):
        update, clear = ui.progress_bar("Calibrating the parent (this strategy needs importance)")
    with ui.errors_shown("generating the child"):
        child, twin = make_children(parent, target, strategy=strategy, drop=drop, scale=scale,
                                    importance=ws.importance, data_id=ws.data_id,
                                    calib_tokens=ws.calib_tokens,
                                    progress=update)
        ws.set_child(child, twin)
        if ws.importance is None and child.importance is not None:
            ws.importance = child.importance
        clear()
        with st.spinner("Evaluating the child, its random twin and the parent..."):
            ws.step0 = step0_report(parent, child, twin, ws.data_id, 2048)
            if parent.task == "causal-lm":
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


init_shape()
st.subheader("Shape")
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
