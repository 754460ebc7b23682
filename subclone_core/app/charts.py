"""Plotly figures of the app, as pure functions of library objects (testable without Streamlit)."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from torch import Tensor

from subclone_core.analysis.explore import Exploration
from subclone_core.core.calibration import Importance
from subclone_core.training.events import EvalEvent, Event, StepEvent, curves
from subclone_core.training.sweep import candidate_of

KEPT, DROPPED, BASE = "#1f77b4", "#d62728", "#7f7f7f"
COLORS = {"subclone": "#1f77b4", "random": "#d62728", "first-k": "#2ca02c", "uniform": "#9467bd",
          "parent": "#7f7f7f"}
RESIDUAL_KINDS = {"block": "residual_block", "attention": "residual_attn", "ffn": "residual_ffn"}
# The title sits just above the plot area, below Plotly's toolbar (which covered titles at the top).
_TITLE = {"x": 0, "xref": "paper", "xanchor": "left", "y": 1, "yref": "paper", "yanchor": "bottom",
          "pad": {"b": 10}}
_LAYOUT = {"margin": {"l": 60, "r": 20, "t": 80, "b": 50}, "height": 400}


def _title(text: str) -> dict:
    return {**_TITLE, "text": text}


def _log10(values: np.ndarray) -> np.ndarray:
    return np.log10(np.clip(values, 1e-12, None))


def _log_colorbar(z: np.ndarray, title: str) -> dict:
    """A colour bar for log10 data, labelled with the real values (1e-2, 1e-1, ...)."""
    lo, hi = int(np.floor(z.min())), int(np.ceil(z.max()))
    ticks = list(range(lo, hi + 1)) or [lo]
    return {"title": {"text": title}, "tickvals": ticks, "ticktext": [f"1e{t}" for t in ticks]}


def _score_heatmap(scores: np.ndarray, index: np.ndarray, x_title: str, unit: str, title: str) -> go.Figure:
    """Rows = blocks; columns in the given order; hover shows block, the original index and the score."""
    z = _log10(scores)
    custom = np.stack([index, scores], axis=-1)  # (L, N, 2): original index, raw score
    fig = go.Figure(go.Heatmap(
        z=z, customdata=custom, colorscale="Viridis", colorbar=_log_colorbar(z, "score (log)"),
        hovertemplate=(f"block %{{y}}<br>{unit} %{{customdata[0]:.0f}}<br>"
                       "score %{customdata[1]:.4g}<extra></extra>"),
    ))
    fig.update_layout(title=_title(title), xaxis_title=x_title, yaxis_title="block", **_LAYOUT)
    return fig


def residual_heatmap(importance: Importance, kind: str = "block", normalize: bool = False) -> go.Figure:
    """Blocks x residual dimensions, columns sorted by the shared ranking (most important first).

    Args:
        importance: a calibration result.
        kind: which per-block residual output to show: "block", "attention" or "ffn".
        normalize: divide each block's scores by their mean, so that blocks of different scale compare.
    """
    scores = getattr(importance, RESIDUAL_KINDS[kind]).double().numpy()  # (L, D)
    if normalize:
        scores = scores / np.clip(scores.mean(axis=1, keepdims=True), 1e-12, None)
    order = importance.residual.argsort(descending=True, stable=True).numpy()  # (D,)
    index = np.broadcast_to(order, scores.shape)
    scale = ", each block / its mean" if normalize else ""
    return _score_heatmap(scores[:, order], index, "residual dimension, by shared rank", "neuron",
                          f"Residual neurons ({kind} output{scale}) in shared-ranking order")


def ffn_heatmap(importance: Importance) -> go.Figure:
    """Blocks x FFN neurons, each block's neurons sorted by their own score."""
    scores = importance.ffn.double().numpy()  # (L, F)
    order = np.argsort(-scores, axis=1, kind="stable")  # (L, F) per-block ranking
    ranked = np.take_along_axis(scores, order, axis=1)  # (L, F) each row descending
    return _score_heatmap(ranked, order, "FFN neuron, by rank within block", "neuron",
                          "FFN neurons, sorted within each block")


def heads_heatmap(importance: Importance, kept: Sequence[Sequence[int]] | None = None,
                  blocks: Sequence[int] | None = None) -> go.Figure:
    """Blocks x attention heads; kept heads of a child (when given) are marked with a dot.

    Args:
        importance: a calibration result.
        kept: per child block, the parent heads kept (Selection.heads).
        blocks: the parent block of each child block (Selection.blocks).
    """
    scores = importance.heads.double().numpy()  # (L, H)
    index = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    fig = _score_heatmap(scores, index, "head", "head", "Attention heads")
    if kept and blocks:
        xs = [h for heads in kept for h in heads]
        ys = [b for b, heads in zip(blocks, kept) for _ in heads]
        marker = {"color": "white", "size": 7, "line": {"color": "black", "width": 1}}
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name="kept by the child", marker=marker))
    return fig


def score_curve(importance: Importance, width: int) -> go.Figure:
    """The shared residual score, sorted, with the cut at the child's width: kept and dropped apart."""
    scores = np.sort(importance.residual.double().numpy())[::-1]  # (D,) descending
    ranks = np.arange(scores.size)
    width = max(0, min(width, scores.size))
    fig = go.Figure([
        go.Scatter(x=ranks[:width], y=scores[:width], mode="lines", name=f"kept ({width})",
                   line={"color": KEPT}),
        go.Scatter(x=ranks[width:], y=scores[width:], mode="lines", name=f"dropped ({scores.size - width})",
                   line={"color": DROPPED}),
    ])
    fig.add_vline(x=width - 0.5, line_dash="dash", line_color=BASE, annotation_text=f"cut at {width}")
    fig.update_layout(title=_title("Shared residual ranking"), xaxis_title="rank", yaxis_title="score",
                      yaxis={"type": "log", **_log_ticks(scores)}, **_LAYOUT)
    return fig


def _log_ticks(values: np.ndarray) -> dict:
    """Ticks at 1, 2 and 5 times each power of ten within the data, written out in full (Plotly's own log
    ticks read "2, 3 ... 1000, 2, 3", the first digits only)."""
    positive = values[values > 0]
    if positive.size == 0:
        return {}
    lo, hi = float(positive.min()), float(positive.max())
    ticks = [m * 10.0**k for k in range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)
             for m in (1, 2, 5) if lo <= m * 10.0**k <= hi]
    return {"tickvals": ticks, "ticktext": [f"{t:,g}" for t in ticks]} if ticks else {}


def rank_correlation_heatmap(matrix: Tensor) -> go.Figure:
    """Block x block Spearman correlation of the residual rankings."""
    fig = go.Figure(go.Heatmap(
        z=matrix.numpy(), zmin=-1, zmax=1, colorscale="RdBu", reversescale=True,
        hovertemplate="block %{y} vs block %{x}<br>Spearman %{z:.3f}<extra></extra>",
    ))
    fig.update_layout(title=_title("Rank correlation of residual scores between blocks"), xaxis_title="block",
                      yaxis_title="block", **_LAYOUT)
    return fig


def topk_overlap_bars(overlap: Tensor, k: int) -> go.Figure:
    """Per block: the share of its top-k residual neurons that are in the shared top-k."""
    values = overlap.numpy()
    fig = go.Figure(go.Bar(x=list(range(values.size)), y=values, marker_color=KEPT,
                           hovertemplate="block %{x}<br>overlap %{y:.2f}<extra></extra>"))
    fig.update_layout(title=_title(f"Top-{k} overlap of each block with the shared ranking"), xaxis_title="block",
                      yaxis_title="overlap", yaxis_range=[0, 1], **_LAYOUT)
    return fig


def block_bars(importance: Importance, removed: Sequence[int]) -> go.Figure:
    """Relative magnitude ||f(x)||/||x+f(x)|| and 1 - cos per block; removed blocks in red."""
    removed = set(removed)
    n = importance.rel_magnitude.numel()
    colors = [DROPPED if i in removed else KEPT for i in range(n)]
    labels = ["removed" if i in removed else "kept" for i in range(n)]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("relative magnitude ||f(x)|| / ||x + f(x)||", "1 - cos(x, x + f(x))"))
    for row, values in enumerate((importance.rel_magnitude, importance.one_minus_cos), start=1):
        bars = go.Bar(x=list(range(n)), y=values.double().numpy(), marker_color=colors, customdata=labels,
                      showlegend=False, hovertemplate="block %{x}: %{y:.4f} (%{customdata})<extra></extra>")
        fig.add_trace(bars, row=row, col=1)
    fig.update_xaxes(title_text="block", row=2, col=1)
    fig.update_layout(title=_title(f"Block statistics ({len(removed)} removed, in red)"),
                      **{**_LAYOUT, "height": 480})
    return fig


def ablation_bars(base: float | None, losses: Sequence[float | None], removed: Sequence[int]) -> go.Figure:
    """The parent's validation loss with each single block removed, against the intact parent.

    ``losses`` may hold None for blocks not evaluated yet (their bars are filled in as they arrive). The
    intact parent is a legend entry and a dashed line, never a label that the bars would hide.
    """
    removed = set(removed)
    n = len(losses)
    colors = [DROPPED if i in removed else KEPT for i in range(n)]
    hover = "without block %{x}: loss %{y:.3f}<extra></extra>"
    fig = go.Figure(go.Bar(x=list(range(n)), y=list(losses), marker_color=colors,
                           name="loss without this block (red: removed by the child)", hovertemplate=hover))
    if base is not None:
        fig.add_trace(go.Scatter(x=[-0.5, n - 0.5], y=[base, base], mode="lines", name=f"intact parent {base:.3f}",
                                 line={"color": BASE, "dash": "dash"}, hoverinfo="skip"))
    done = sum(v is not None for v in losses)
    title = "Parent loss with one block removed" + ("" if done == n else f" ({done} of {n} blocks so far)")
    fig.update_layout(title=_title(title), xaxis_title="removed block", xaxis_range=[-0.5, n - 0.5],
                      yaxis_title="validation loss", legend={"orientation": "h", "y": -0.2}, **_LAYOUT)
    return fig


def comparison_bars(metrics: dict[str, dict]) -> go.Figure:
    """Step-0 validation loss of each model (parent, subcloned child, random child) side by side."""
    names = list(metrics)
    fig = go.Figure(go.Bar(x=names, y=[metrics[n]["loss"] for n in names],
                           marker_color=[COLORS.get(n, KEPT) for n in names],
                           hovertemplate="%{x}: loss %{y:.3f}<extra></extra>"))
    fig.update_layout(title=_title("Validation loss before any training"), yaxis_title="validation loss", **_LAYOUT)
    return fig


def _faint_trace(fig: go.Figure, name: str, points: list[tuple], color: str | None) -> None:
    """A run not chosen by a learning-rate sweep: its validation curve only, thin, dotted and pale."""
    steps, values = zip(*points)
    fig.add_trace(go.Scatter(x=steps, y=values, mode="lines", name=f"{name} (not chosen)", opacity=0.35,
                             legendgroup=candidate_of(name), showlegend=False,
                             line={"color": color, "width": 1, "dash": "dot"}))


def loss_chart(events: list[Event], metric: str = "loss", faint: Collection[str] = ()) -> go.Figure:
    """Training loss (thin lines) and validation loss (markers) of every candidate, from run events.

    Args:
        events: engine events.
        metric: the validation value drawn.
        faint: runs drawn faintly (validation only): a learning-rate sweep's runs that were not chosen.
    """
    fig = go.Figure()
    train, val = curves(events, kind=StepEvent, key="loss"), curves(events, kind=EvalEvent, key=metric)
    for name in dict.fromkeys([*val, *train]):
        color = COLORS.get(candidate_of(name))  # the runs of a sweep share their candidate's colour
        if name in faint:
            if name in val:
                _faint_trace(fig, name, val[name], color)
            continue
        if name in train:
            steps, values = zip(*train[name])
            fig.add_trace(go.Scatter(x=steps, y=values, mode="lines", name=f"{name} train", legendgroup=name,
                                     showlegend=False, line={"color": color, "width": 1}, opacity=0.6))
        if name in val:
            steps, values = zip(*val[name])
            fig.add_trace(go.Scatter(x=steps, y=values, mode="lines+markers", name=f"{name} validation",
                                     legendgroup=name, line={"color": color, "width": 3}))
    # one legend entry per model (its validation curve; a click hides its group): a sweep's eight entries
    # wrapped into rows below the plot and squeezed it; the other lines are named by the legend's title
    how = "thin: training" + (", dotted: learning rates not chosen" if faint else "")
    fig.update_layout(title=_title("Training and validation loss"), xaxis_title="step", yaxis_title=metric,
                      legend={"orientation": "h", "y": -0.2, "title": {"text": f"({how})"}},
                      **{**_LAYOUT, "height": 440})
    if not fig.data:  # no step yet: say so instead of empty axes from -1 to 4
        fig.add_annotation(text="Waiting for the first training step (the models and data are being "
                                "prepared)...", showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
        fig.update_xaxes(visible=False)
        fig.update_yaxes(visible=False)
    return fig


def explorer_scatter(exploration: Exploration) -> go.Figure:
    """Parameters against step-0 validation loss of every explored shape, the Pareto front joined in blue,
    random init's loss as a dashed line; each point's customdata is its index in ``exploration.points``
    (the page maps a clicked point back to its shape)."""
    fig = go.Figure()
    for on_front, name, color in ((False, "other shapes", BASE), (True, "Pareto front", KEPT)):
        # in parameter order, so that the front's line runs left to right instead of zigzagging
        index = sorted((i for i, p in enumerate(exploration.points) if p.pareto == on_front),
                       key=lambda i: exploration.points[i].params)
        points = [exploration.points[i] for i in index]
        fig.add_trace(go.Scatter(
            x=[p.params / 1e6 for p in points], y=[p.loss for p in points], customdata=index, name=name,
            mode="lines+markers+text" if on_front else "markers", line={"color": color},
            marker={"color": color, "size": 11}, textposition="top center",
            text=[f"{p.shape.layers}x{p.shape.hidden}" for p in points],
            hovertemplate=("%{text}: %{x:.2f} M parameters<br>step-0 loss %{y:.3f}<extra></extra>")))
    fig.add_hline(y=exploration.random_loss, line={"color": COLORS["random"], "dash": "dash"},
                  annotation_text=f"random init {exploration.random_loss:.2f}")
    fig.add_vline(x=exploration.budget / 1e6, line={"color": BASE, "dash": "dot"}, annotation_text="budget")
    fig.update_layout(title=_title("Child shapes near the budget: loss before training (click a point to use it)"),
                      xaxis_title="parameters (M)", yaxis_title="step-0 validation loss",
                      legend={"orientation": "h", "y": -0.2}, **{**_LAYOUT, "height": 440})
    return fig
