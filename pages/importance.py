"""Page 2, Importance: calibrate the parent on data, then look at which residual neurons, FFN neurons
and heads matter, and how consistent the residual ranking is from block to block."""

from __future__ import annotations

import streamlit as st

from subclone_core.analysis import exclusive, off_diagonal_mean, rank_correlation, topk_overlap
from subclone_core.app import charts, ui
from subclone_core.calibration import Importance
from subclone_core.inspector import Unit, hit_rows, inspect_units, outsized_dimensions
from subclone_core.shape import Shape
from subclone_core.workflow import measure_importance

ws = ui.workspace()
st.title("2. Importance")
st.write("Calibration runs the parent on data and records the mean |activation| of every residual neuron, "
         "FFN neuron and attention head, and how much each block changes the residual stream.")
parent = ui.current_parent()
shape = Shape.of(parent.model.config)

tokens = int(st.number_input("Calibration token budget (for images: patches)", 256, 1_048_576, step=256,
                             key=ui.keep("calib_tokens", ws.calib_tokens)))
ws.calib_tokens = tokens
if st.button("Run calibration", type="primary", key="run_calibration"):
    update, clear = ui.progress_bar("Calibrating")
    with ui.errors_shown("calibrating the parent"), exclusive(parent.model):
        ws.set_importance(measure_importance(parent, ws.data_id, tokens=tokens, progress=update))
    clear()


def show_ranking(importance: Importance) -> int:
    """The shared residual score curve with the cut at a chosen width; returns that width."""
    default = ws.child.shape.hidden if ws.child is not None else max(1, shape.hidden // 3)
    width = st.slider("Child hidden width (where the ranking is cut)", 1, shape.hidden,
                      key=ui.keep("cut_width", min(default, shape.hidden)))
    st.plotly_chart(charts.score_curve(importance, width), key="chart_score_curve")
    return width


def show_consistency(importance: Importance, width: int) -> None:
    """Rank correlation between blocks and top-k overlap with the shared ranking."""
    matrix = rank_correlation(importance.residual_block)
    overlap = topk_overlap(importance.residual_block, importance.residual, width)
    left, right = st.columns(2)
    left.metric("Mean rank correlation between two blocks", f"{off_diagonal_mean(matrix):.2f}")
    right.metric(f"Mean top-{width} overlap with the shared ranking", f"{float(overlap.mean()):.0%}")
    st.caption("Subcloning keeps one set of residual neurons for every block; that is sound when blocks "
               "agree on which neurons matter (correlation near 1, overlap near 100%).")
    left, right = st.columns(2)
    left.plotly_chart(charts.rank_correlation_heatmap(matrix), key="chart_rank_correlation")
    right.plotly_chart(charts.topk_overlap_bars(overlap, width), key="chart_topk_overlap")


UNIT_KINDS = {"residual": "Residual dimension (block output)", "ffn": "FFN neuron", "head": "Head"}


def run_inspector(units: list[Unit]) -> None:
    """The bounded second pass over the calibration sample for these units."""
    update, clear = ui.progress_bar("Finding the strongest activations")
    with ui.errors_shown("inspecting units"):
        ws.inspection = inspect_units(parent, units, ws.data_id, tokens=ws.calib_tokens, progress=update)
    clear()


def show_hits() -> None:
    """Each inspected unit's strongest activations, as plain-text tables."""
    for unit, hits in ws.inspection.items():
        st.markdown(f"**{UNIT_KINDS[unit.kind]} {unit.index}, block {unit.block}**")
        st.dataframe(hit_rows(hits, parent.preprocessor), hide_index=True, key=f"hits_{unit.kind}_{unit.block}_{unit.index}")


def show_inspector(importance: Importance) -> None:
    """Outsized residual dimensions first; then any unit picked by kind, block and index."""
    outsized = outsized_dimensions(importance)
    if outsized:
        dims = ", ".join(f"{u.index} (peaks at block {u.block})" for u in outsized)
        st.write(f"Residual dimensions with outsized scores (over 10x the median; they dominate the shared "
                 f"ranking): {dims}.")
        if st.button("What do they fire on?", key="inspect_outsized"):
            run_inspector(outsized)
    kind_col, block_col, index_col = st.columns(3)
    kind = kind_col.selectbox("Unit", list(UNIT_KINDS), format_func=UNIT_KINDS.get, key=ui.keep("inspect_kind",
                                                                                                  "ffn"))
    block = int(block_col.number_input("Block", 0, shape.layers - 1, key=ui.keep("inspect_block", 0)))
    limit = {"residual": shape.hidden, "ffn": shape.ffn, "head": shape.heads}[kind] - 1
    index_key = ui.keep("inspect_index", 0)
    st.session_state[index_key] = min(st.session_state[index_key], limit)  # another kind may have fewer
    index = int(index_col.number_input("Index", 0, limit, key=index_key))
    if st.button("Show top activations", key="run_inspect"):
        run_inspector([Unit(kind, block, index)])
    st.caption("A second pass over the calibration sample keeps only each unit's strongest activations "
               "(by |value|). For images, item is the image and position the patch (0 is the CLS token).")
    show_hits()


importance = ws.importance
if importance is None:
    st.info("Run the calibration to see the heatmaps.")
else:
    st.caption(f"Measured on {importance.tokens:,} token positions of `{importance.data or 'default'}`.")
    width = show_ranking(importance)
    residual, ffn, heads, consistency, inspector = st.tabs(["Residual neurons", "FFN neurons", "Heads",
                                                            "Consistency", "Inspector"])
    with residual:
        left, right = st.columns(2)
        kind = left.radio("Residual output of", list(charts.RESIDUAL_KINDS), horizontal=True,
                          key=ui.keep("residual_kind", "block"))
        normalize = right.toggle("Scale each block by its mean", key=ui.keep("residual_normalize", True))
        st.plotly_chart(charts.residual_heatmap(importance, kind, normalize), key="chart_residual")
    with ffn:
        st.plotly_chart(charts.ffn_heatmap(importance), key="chart_ffn")
    with heads:
        selection = ws.child.selection if ws.child is not None else None
        st.plotly_chart(charts.heads_heatmap(importance, selection and selection.heads,
                                             selection and selection.blocks), key="chart_heads")
    with consistency:
        show_consistency(importance, width)
    with inspector:
        show_inspector(importance)
