"""Page 2, Importance: calibrate the parent on data, then look at which residual neurons, FFN neurons
and heads matter, and how consistent the residual ranking is from block to block."""

from __future__ import annotations

import streamlit as st

from subclone_core.analysis.inspector import Unit, hit_rows, outsized_dimensions
from subclone_core.analysis.probes import off_diagonal_mean, rank_correlation, topk_overlap
from subclone_core.app import charts, ui
from subclone_core.app.inputs import duration_text
from subclone_core.app.longsteps import (
    calibration_work,
    estimate_seconds,
    forward_rate,
    inspector_work,
    result_key,
)
from subclone_core.core.calibration import Importance
from subclone_core.core.shape import Shape

ws = ui.workspace()
st.title("2. Importance")
st.write("Calibration runs the parent on data and records the mean |activation| of every residual neuron, "
         "FFN neuron and attention head, and how much each block changes the residual stream.")
parent = ui.current_parent()
shape = Shape.of(parent.model.config)



def use_calibration(key: tuple, importance: Importance) -> None:
    """Keep a finished calibration for every session, and make it this session's."""
    ws.set_importance(ui.remember(key, importance))


def calibration_controls() -> None:
    """The budget, its time estimate, and Run (at once when this calibration is already known)."""
    tokens = ui.checked_number("Calibration token budget (for images: patches)", 256, 1_048_576, "calib_tokens",
                               ws.calib_tokens, step=256)
    if tokens is not None:
        ws.calib_tokens = int(tokens)
        seconds = estimate_seconds("calibration", int(tokens), forward_rate(ws.parent_metrics))
        st.caption(f"Estimated time: {duration_text(seconds)}. It runs in the background and can be cancelled.")
        if seconds is not None and seconds > 60:
            st.warning(f"{int(tokens):,} tokens will take {duration_text(seconds)}. A few thousand tokens rank "
                       "the neurons well; the default is 4,096.", icon=":material/schedule:")
    running = ws.running("calibration") is not None
    if st.button("Run calibration", type="primary", key="run_calibration", disabled=tokens is None or running):
        key = result_key("calibration", ws.parent_id, ws.data_id, int(tokens))
        known = ui.cached(key)
        if known is not None:
            ws.set_importance(known)
        else:
            ui.start_step("calibration", calibration_work(parent, ws.data_id, int(tokens)),
                          lambda result: use_calibration(key, result), key=key, estimate=seconds)
    ui.step_panel("calibration", "calibrating")


calibration_controls()


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
    """The bounded second pass over the calibration sample for these units (kept for every session)."""
    tokens = ws.importance.tokens if ws.importance is not None else ws.calib_tokens
    key = result_key("inspector", ws.parent_id, ws.data_id, tokens, tuple(units))
    known = ui.cached(key)
    if known is not None:
        ws.inspection = known
        return

    def use(result: dict) -> None:
        ws.inspection = ui.remember(key, result)

    ui.start_step("inspector", inspector_work(parent, units, ws.data_id, tokens), use, key=key,
                  estimate=estimate_seconds("inspector", tokens, forward_rate(ws.parent_metrics)))


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
        if st.button("What do they fire on?", key="inspect_outsized", disabled=ws.running("inspector") is not None):
            run_inspector(outsized)
    kind_col, block_col, index_col = st.columns(3)
    kind = kind_col.selectbox("Unit", list(UNIT_KINDS), format_func=UNIT_KINDS.get, key=ui.keep("inspect_kind",
                                                                                                  "ffn"))
    block = ui.checked_number("Block", 0, shape.layers - 1, "inspect_block", 0, column=block_col, step=1)
    limit = {"residual": shape.hidden, "ffn": shape.ffn, "head": shape.heads}[kind] - 1
    index = ui.checked_number("Index", 0, limit, "inspect_index", 0, column=index_col, step=1)
    running = ws.running("inspector") is not None
    if st.button("Show top activations", key="run_inspect", disabled=None in (block, index) or running):
        run_inspector([Unit(kind, int(block), int(index))])
    ui.step_panel("inspector", "finding the strongest activations")
    st.caption("A second pass over the calibration sample keeps only each unit's strongest activations "
               "(by |value|). For images, item is the image and position the patch (0 is the CLS token).")
    show_hits()


importance = ws.importance
if importance is None:
    st.info("Run the calibration to see the heatmaps.")
else:
    st.caption(f"Measured on {importance.tokens:,} token positions of {ui.plain(importance.data or 'default')}.")
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
