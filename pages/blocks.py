"""Page 3, Blocks: how much each block changes the residual stream, which blocks a policy removes, and
(on demand) the parent's loss with each single block removed."""

from __future__ import annotations

import streamlit as st

from subclone_core.analysis.probes import ABLATION_TOKENS
from subclone_core.app import charts, ui
from subclone_core.app.inputs import duration_text
from subclone_core.app.jobs import BlockEvent
from subclone_core.app.longsteps import (
    ablation_work,
    estimate_seconds,
    forward_rate,
    result_key,
)
from subclone_core.core.selection import pick_blocks
from subclone_core.core.shape import Shape
from subclone_core.training.events import Event, of_kind
from subclone_core.workflow.shapes import starting_shape

POLICIES = {"magnitude": "Magnitude: drop the blocks that change the stream least",
            "middle": "Middle: drop a contiguous span in the middle", "manual": "Manual pick"}

ws = ui.workspace()
st.title("3. Blocks")
st.write("A block adds f(x) to the residual stream x. Blocks whose output is small next to x (low relative "
         "magnitude, low 1 - cos) change little and are the ones to remove.")
parent = ui.current_parent()
layers = Shape.of(parent.model.config).layers
importance = ws.importance
if importance is None:
    st.info("The block statistics come from calibration: run it on the Importance page first.")
    st.page_link(ui.PAGES["importance"], label="Go to the Importance page", icon=":material/arrow_forward:")
    st.stop()

policy = st.radio("Which blocks to remove", list(POLICIES), format_func=POLICIES.get, horizontal=True,
                  key=ui.keep("block_policy", "magnitude"))
if policy == "manual":
    dropped = st.multiselect("Blocks to remove", list(range(layers)), key=ui.keep("manual_drop", []))
    child_layers = layers - len(dropped)
    drop: str | list[int] = sorted(dropped)
else:
    default = ws.child_layers or starting_shape(parent.model).layers
    child_layers = ui.checked_number("Blocks in the child", 1, layers, "child_layers", default, step=1)
    drop = policy

removed: list[int] = []
if child_layers is None:
    st.stop()  # the message under the input says what to type
with ui.errors_shown("choosing the blocks"):
    kept = pick_blocks(layers, child_layers, drop, importance.rel_magnitude)
    removed = [i for i in range(layers) if i not in kept]
    ws.drop, ws.child_layers = drop, child_layers
    st.success(f"The child keeps {len(kept)} of {layers} blocks; removed: {removed or 'none'}. "
               "The Child page uses this choice.")
st.plotly_chart(charts.block_bars(importance, removed), key="chart_blocks")



def partial_bars(events: list[Event]) -> None:
    """The bars known so far, while the other blocks are still being evaluated."""
    known = {e.index: e.loss for e in of_kind(events, BlockEvent)}
    if known:
        losses = [known.get(i) for i in range(layers)]
        st.plotly_chart(charts.ablation_bars(known.get(-1), losses, removed), key="chart_ablation_partial")


def use_ablation(key: tuple, tokens: int, result: dict) -> None:
    ws.ablation = ui.remember(key, {**result, "tokens": tokens})


st.subheader("Loss with one block removed")
st.caption("The paper's Fig. 2 (bottom): the parent's validation loss when one block is skipped. It costs one "
           "evaluation per block; a few hundred tokens rank the blocks, more make each bar more precise.")
tokens = ui.checked_number("Validation tokens per evaluation", 128, 65_536, "ablation_tokens", ABLATION_TOKENS,
                           step=128)
if tokens is not None:
    seconds = estimate_seconds("ablation", int(tokens), forward_rate(ws.parent_metrics), blocks=layers)
    st.caption(f"{layers + 1} evaluations of {int(tokens):,} tokens: {duration_text(seconds)}; the bars fill in "
               "as they arrive, and Cancel stops it.")
running = ws.running("ablation") is not None
if st.button("Compute", key="run_ablation", disabled=tokens is None or running):
    key = result_key("ablation", ws.parent_id, ws.data_id, int(tokens))
    ws.ablation = ui.cached(key)
    if ws.ablation is None:
        ui.start_step("ablation", ablation_work(parent, ws.data_id, int(tokens)),
                      lambda result: use_ablation(key, int(tokens), result), key=key, estimate=seconds)
if not ui.step_panel("ablation", "evaluating without each block", partial_bars) and ws.ablation is not None:
    figure = charts.ablation_bars(ws.ablation["base"], ws.ablation["losses"], removed)
    st.plotly_chart(figure, key="chart_ablation")
    measured = ws.parent_metrics or {}
    if "tokens" in measured and "tokens" in ws.ablation and measured["tokens"] != ws.ablation["tokens"]:
        st.caption(f"The intact parent's loss here ({ws.ablation['base']:.3f}) is measured on the "
                   f"{ws.ablation['tokens']:,} validation tokens of each evaluation above; the Parent page's "
                   f"({measured['loss']:.3f}) on {int(measured['tokens']):,}, so the two differ a little.")
