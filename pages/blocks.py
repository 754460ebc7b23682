"""Page 3, Blocks: how much each block changes the residual stream, which blocks a policy removes, and
(on demand) the parent's loss with each single block removed."""

from __future__ import annotations

import streamlit as st

from subclone_core.analysis import block_ablation
from subclone_core.app import charts, ui
from subclone_core.app.steps import validation_batches
from subclone_core.selection import pick_blocks
from subclone_core.shape import Shape, suggested_layers

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
    default = ws.child_layers or suggested_layers(layers)
    child_layers = int(st.number_input("Blocks in the child", 1, layers,
                                       key=ui.keep("child_layers", default)))
    drop = policy

removed: list[int] = []
with ui.errors_shown("choosing the blocks"):
    kept = pick_blocks(layers, child_layers, drop, importance.rel_magnitude)
    removed = [i for i in range(layers) if i not in kept]
    ws.drop, ws.child_layers = drop, child_layers
    st.success(f"The child keeps {len(kept)} of {layers} blocks; removed: {removed or 'none'}. "
               "The Child page uses this choice.")
st.plotly_chart(charts.block_bars(importance, removed), key="chart_blocks")

st.subheader("Loss with one block removed")
st.caption("The paper's Fig. 2 (bottom): the parent's validation loss when one block is skipped. "
           "It costs one evaluation per block.")
tokens = int(st.number_input("Validation tokens per evaluation", 128, 65_536, step=128,
                             key=ui.keep("ablation_tokens", 1024)))
if st.button("Compute", key="run_ablation"):
    update, clear = ui.progress_bar("Evaluating without each block")
    with ui.errors_shown("evaluating the parent without each block"):
        batches = validation_batches(parent, ws.data_id, tokens)
        ws.ablation = block_ablation(parent.model, batches, progress=update)
    clear()
if ws.ablation is not None:
    figure = charts.ablation_bars(ws.ablation["base"], ws.ablation["losses"], removed)
    st.plotly_chart(figure, key="chart_ablation")
