"""Page 2, Importance: calibrate the parent on data, then look at which residual neurons, FFN neurons
and heads matter, and how consistent the residual ranking is from block to block."""

from __future__ import annotations

import streamlit as st

from subclone_core.analysis import exclusive, off_diagonal_mean, rank_correlation, topk_overlap
from subclone_core.app import charts, ui
from subclone_core.calibration import Importance
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


importance = ws.importance
if importance is None:
    st.info("Run the calibration to see the heatmaps.")
else:
    st.caption(f"Measured on {importance.tokens:,} token positions of `{importance.data or 'default'}`.")
    width = show_ranking(importance)
    residual, ffn, heads, consistency = st.tabs(["Residual neurons", "FFN neurons", "Heads", "Consistency"])
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
