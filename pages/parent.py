"""Page 1, Parent: choose the parent model and the data; see its shape, its validation score, and a
short generation."""

from __future__ import annotations

import html

import streamlit as st
import torch

from subclone_core.analysis.probes import generate_text
from subclone_core.app import ui
from subclone_core.app.inputs import without_markup
from subclone_core.app.longsteps import (
    STEP0_TOKENS,
    VIT_BUILD_MINUTES,
    evaluate_parent,
    result_key,
    vit_build_work,
)
from subclone_core.app.session import DEFAULT_PROMPT
from subclone_core.app.steps import store_upload
from subclone_core.core.errors import SubcloneError
from subclone_core.io.devices import available_bytes
from subclone_core.sources import Parent
from subclone_core.sources.embedded import EMBEDDED, Licence
from subclone_core.sources.parents import default_vit_built, describe
from subclone_core.tasks import TaskSpec

SOURCES = {
    **{entry.id: entry.label for entry in EMBEDDED.values()},  # the embedded parents, from their table
    "default-vit": "Self-pretrained ViT (Fashion-MNIST; minutes to build on first use)",
    "local": "Local folder or .gguf file",
    "hub": "Hugging Face Hub id",
}
UPLOAD, LOCAL = "upload", "local"
VIT_STEP = "build-vit"


def data_options(task: TaskSpec) -> dict[str, str]:
    """The data choices for a task: its built-in data, an upload (text only), a local path."""
    upload = {UPLOAD: "Upload a text file"} if task.sequences else {}
    return {**task.data_choices, **upload, LOCAL: task.local_data_label}


ws = ui.workspace()
st.title("1. Parent")
st.write("The parent is the pretrained model whose weights the child inherits.")


def choose_parent() -> None:
    """The parent picker; loading it replaces the session's parent and everything derived from it."""
    source = st.radio("Parent", list(SOURCES), format_func=SOURCES.get, horizontal=True,
                      key=ui.keep("parent_source", "default"))
    parent_id = source
    if source == "local":
        parent_id = st.text_input("Model folder (config.json + model.safetensors) or .gguf file",
                                  key=ui.keep("parent_path", ""), placeholder="/path/to/model").strip()
    elif source == "hub":
        parent_id = st.text_input("Hub id (needs internet)", key=ui.keep("parent_hub", ""),
                                  placeholder="HuggingFaceTB/SmolLM2-135M").strip()
    choose_placement()
    if st.button("Load parent", type="primary", key="load_parent", disabled=ws.running(VIT_STEP) is not None):
        if parent_id == "default-vit" and not default_vit_built():
            ui.start_step(VIT_STEP, vit_build_work(), lambda _folder: load_parent_now("default-vit"),
                          key=("vit-build",))
        else:
            load_parent_now(parent_id)
    low, high = VIT_BUILD_MINUTES
    ui.step_panel(VIT_STEP, f"pretraining the ViT parent on Fashion-MNIST, once (about {low}-{high} min on 2 "
                            "CPU cores; the app stays usable, Cancel stops it)")


def load_parent_now(parent_id: str) -> None:
    """Load the parent (converting a GGUF once) and make it the session's, with its task's default data."""
    with ui.errors_shown(f"loading the parent {parent_id!r}"), st.spinner(
            f"Loading {parent_id or 'the parent'} (a first use converts it once)..."):
        if not parent_id:
            raise SubcloneError("type a folder path or a Hub id first")
        parent = ui.get_parent(parent_id)
        task = parent.task_spec
        ws.choose(parent_id, None, task.data_choices[task.default_data])


def choose_placement() -> None:
    """Device and dtype of the parent (defaults: cuda + bfloat16 where a GPU is visible, else cpu + float32)."""
    device_name, dtype_name = ui.placement()
    left, right = st.columns(2)
    left.selectbox("Device", ui.device_choices(), key=ui.keep("parent_device", device_name),
                   help="auto spreads the parent over every visible GPU")
    right.selectbox("Dtype", ui.PARENT_DTYPES, key=ui.keep("parent_dtype", dtype_name),
                    help="auto keeps the checkpoint's own; a child keeps the parent's")


def memory_caption(info: dict) -> str:
    """Where the parent's weights are and how much memory the machine has, in one line."""
    places = ", ".join(f"{place} {mb:,.1f} MB" for place, mb in info["placement"].items())
    machine = f"{available_bytes() / 1e9:,.1f} GB of RAM free"
    if torch.cuda.is_available():
        machine += f", {available_bytes('cuda') / 1e9:,.1f} GB free on the GPU"
    return f"The parent takes {info['memory_mb']:,.1f} MB in {info['dtype']} ({places}); this machine has {machine}."


def show_architecture(info: dict) -> None:
    """The parent's shape and size as metrics."""
    st.subheader(info["label"])
    shape = [("Blocks", info["blocks"]), ("Hidden", info["hidden"]), ("Heads", info["heads"]),
             ("KV heads", info["kv_heads"]), ("FFN", info["ffn"]),
             ("Vocabulary", info["vocab"]) if "vocab" in info else ("Classes", info["num_labels"])]
    size = [("Parameters", f"{info['parameters'] / 1e6:,.2f} M"),
            (f"Memory ({info['dtype']})", f"{info['memory_mb']:,.1f} MB"), ("Head dim", info["head_dim"])]
    for row in (shape, size):
        for column, (label, value) in zip(st.columns(len(shape)), row):
            column.metric(label, f"{value:,}" if isinstance(value, int) else value)
    st.caption(f"Family {info['family']} (`{info['model_type']}`), task {info['task']}, "
               f"from {ui.plain(str(info['source']))}")
    st.caption(memory_caption(info))


def show_licence(licence: Licence | None) -> None:
    """The terms of the parent's weights, where known (the embedded parents and children of them)."""
    if licence is not None:
        st.caption(f"Licence: [{licence.name}]({licence.url}). {licence.notice}".strip())


def choose_data(task: TaskSpec) -> None:
    """The data picker, text or images as the parent's task needs; a new choice resets later results."""
    options = data_options(task)
    kind = st.radio("Data", list(options), format_func=options.get, horizontal=True,
                    key=ui.keep(f"data_kind_{task.name}", task.default_data))
    if kind == UPLOAD:
        upload = st.file_uploader(f"Text file, at most {ui.settings().max_upload_mb} MB (.txt or .md: "
                                  "paragraphs separated by blank lines; .jsonl: a \"text\" field per line)",
                                  type=["txt", "md", "jsonl"], key="data_upload")
        if upload is not None and st.button("Use this file", key="use_upload"):
            with ui.errors_shown(f"reading the upload {upload.name!r}"):
                path = store_upload(ui.settings(), ws.key, upload.name, upload.getvalue())
                ws.choose(ws.parent_id, str(path), f"upload {upload.name}")
    elif kind == LOCAL:
        path = st.text_input("Path", key=ui.keep(f"data_path_{task.name}", "")).strip()
        if st.button("Use this path", key="use_path"):
            with ui.errors_shown(f"checking the data path {path!r}"):
                if not path:
                    raise SubcloneError("type a file or folder path first")
                ws.choose(ws.parent_id, str(ui.settings().check_local_path(path, "data")), path)
    else:
        data_id = None if kind == task.default_data else kind
        if data_id != ws.data_id:
            ws.choose(ws.parent_id, data_id, options[kind])
    st.caption(f"Using: {ui.plain(ws.data_label)}")


def show_validation(parent: Parent) -> None:
    """The parent's validation score on the chosen data (kept per parent, data and budget for every session)."""
    tokens = ui.checked_number("Validation tokens", 256, 262_144, "eval_tokens", STEP0_TOKENS, step=256)
    if tokens is None:
        return
    key = result_key("parent-eval", ws.parent_id, ws.data_id, int(tokens))
    if ws.parent_metrics is None or ws.parent_metrics.get("budget") != tokens:
        metrics = ui.cached(key)
        if metrics is None:
            update, clear = ui.progress_bar("Scoring the parent on validation batches")
            with ui.errors_shown("evaluating the parent"):
                metrics = ui.remember(key, evaluate_parent(parent, ws.data_id, int(tokens), progress=update))
            clear()
        ws.parent_metrics = None if metrics is None else {**metrics, "budget": tokens}
    metrics = ws.parent_metrics
    if metrics is None:
        return
    left, middle, right = st.columns(3)
    left.metric("Validation loss", f"{metrics['loss']:.3f}")
    task = parent.task_spec
    middle.metric(task.headline.capitalize(), task.headline_text(metrics))
    right.metric(f"{task.unit_name.capitalize()} scored", f"{metrics[task.unit_name]:,}")


def show_generation(parent: Parent) -> None:
    """A short greedy continuation of a prompt the user can edit (kept per parent, prompt and length)."""
    prompt = st.text_input("Prompt", key=ui.keep("prompt", DEFAULT_PROMPT))
    ws.prompt = prompt
    new_tokens = st.slider("New tokens", 5, 100, key=ui.keep("new_tokens", 30))
    key = ("generation", ws.parent_id, prompt, new_tokens)
    if st.button("Generate", key="parent_generate"):
        text = ui.cached(key)
        if text is None:
            update, clear = ui.progress_bar("Generating tokens")
            with ui.errors_shown("generating text"):
                text = ui.remember(key, generate_text(parent.model, parent.preprocessor, prompt, new_tokens,
                                                      progress=update))
            clear()
        if text is not None:
            ws.generations[(prompt, new_tokens)] = text
    if (prompt, new_tokens) in ws.generations:
        st.html(continuation_html(prompt, ws.generations[(prompt, new_tokens)]))


def continuation_html(prompt: str, continuation: str) -> str:
    """The prompt, then the model's words in bold, joined as the model wrote them ("city's", not
    "city 's"). HTML with every character escaped: Markdown cannot start bold inside a word ("city**'s")."""
    return (f"<blockquote style='margin:0;padding-left:1em;border-left:3px solid #ccc'>{html.escape(prompt)}"
            f"<b>{html.escape(without_markup(continuation))}</b></blockquote>")


choose_parent()
if ws.parent_id is None:
    st.info("Choose a parent and press **Load parent**.")
else:
    with ui.errors_shown("showing the parent"):
        parent = ui.get_parent(ws.parent_id)
        show_architecture(describe(parent))
        show_licence(parent.licence)
        st.subheader("Data")
        choose_data(parent.task_spec)
        show_validation(parent)
        if parent.task_spec.sequences:
            st.subheader("Generation")
            show_generation(parent)
