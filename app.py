"""The subclone workbench: pick a parent, see what matters inside it, cut a child, train it.

Run with ``streamlit run app.py`` (or ``make run``). The pages live in pages/ and stay thin: widgets,
calls into subclone_core, charts. Server settings: see subclone_core/app/settings.py.
"""

from __future__ import annotations

import streamlit as st

from subclone_core.app import ui

st.set_page_config(page_title="subclone workbench", page_icon=":material/content_cut:", layout="wide")

PAGES = [
    st.Page(ui.PAGES["parent"], title="1. Parent", icon=":material/account_tree:", default=True),
    st.Page(ui.PAGES["importance"], title="2. Importance", icon=":material/grid_on:"),
    st.Page(ui.PAGES["blocks"], title="3. Blocks", icon=":material/view_agenda:"),
    st.Page(ui.PAGES["child"], title="4. Child", icon=":material/child_care:"),
    st.Page(ui.PAGES["train"], title="5. Train", icon=":material/show_chart:"),
]


def sidebar() -> None:
    """What this session has chosen, its training job, and the server's job queue."""
    ws = ui.workspace()
    with st.sidebar:
        st.caption("Session")
        st.markdown(f"**Parent:** `{ws.parent_id or 'none yet'}`  \n**Data:** {ws.data_label}")
        if ws.child is not None:
            shape = ws.child.shape
            strategy = ws.child.manifest["strategy"]
            st.markdown(f"**Child:** {shape.layers} blocks x {shape.hidden} ({strategy})")
        job = ws.job
        if job is not None:
            where = f" (place {job.position} in the queue)" if job.position else ""
            st.markdown(f"**Training:** {job.status}{where}")
        queue = ui.limiter().snapshot()
        st.caption(f"Server: {queue['running']}/{queue['max_running']} training job(s) running, "
                   f"{queue['queued']} waiting. Files go to `{ui.settings().output_dir}`. "
                   f"Device: {ui.device() or 'cpu'}.")


navigation = st.navigation(PAGES)
ui.keep_widget_state()
with ui.errors_shown("reading the server settings"):
    sidebar()
navigation.run()
