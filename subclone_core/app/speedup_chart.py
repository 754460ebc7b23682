"""The Train page's second chart: the iso-loss speedup (random init's tokens over the candidate's) per level."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go

from subclone_core.app.charts import _LAYOUT, COLORS
from subclone_core.training.events import Event
from subclone_core.training.speedup import IsoLoss, iso_loss_by_candidate, tracks_from_events

# A lower bound (the candidate was already there at step 0) is drawn as an upward triangle: "at least this".
_MARKERS = {False: "circle", True: "triangle-up"}


def iso_loss_chart(rows_by_candidate: Mapping[str, Sequence[IsoLoss]], *, metric: str = "loss",
                   higher_is_better: bool = False) -> go.Figure:
    """Speedup against the level random init reached, one line per candidate.

    The x axis runs the way training goes (loss falling, accuracy rising), so the right end is random
    init's best so far. Levels a candidate has not reached are left out (no extrapolation).

    Args:
        rows_by_candidate: {name: iso_loss rows}, e.g. from iso_loss_by_candidate.
        metric: what the levels are values of ("loss", "perplexity" or "accuracy").
        higher_is_better: True for accuracy (the axis then increases to the right).

    Returns:
        A Plotly figure; with no row that has a number it says what it is waiting for.
    """
    fig = go.Figure()
    for name, rows in rows_by_candidate.items():
        for bound in (False, True):
            _add_points(fig, name, [r for r in rows if r.speedup is not None and r.lower_bound == bound], bound)
    fig.add_hline(y=1.0, line={"color": COLORS["random"], "dash": "dash", "width": 1})
    # on a log axis an annotation's y is log10 of the value: 0 puts the label at 1x (add_hline's own label
    # lands at 10x)
    fig.add_annotation(text="as fast as random init", x=0, xref="paper", y=0, yref="y", showarrow=False,
                       xanchor="left", yanchor="top")
    fig.update_layout(title=f"Speedup at every {metric} level random init reached",
                      xaxis={"title": f"validation {metric} (random init's curve)",
                             "autorange": True if higher_is_better else "reversed"},
                      yaxis={"title": "speedup (random init's tokens / candidate's)", "type": "log",
                             "ticksuffix": "x", "dtick": "D2"},  # log ticks 1x 2x 5x 10x..., read as speedups
                      legend={"orientation": "h", "y": -0.2}, **{**_LAYOUT, "height": 440})
    if not fig.data:
        fig.add_annotation(text="Waiting for random init to improve on its first evaluation", showarrow=False,
                           xref="paper", yref="paper", x=0.5, y=0.5)
    return fig


def _add_points(fig: go.Figure, name: str, rows: list[IsoLoss], bound: bool) -> None:
    """One trace: exact speedups as a line, lower bounds as triangles only."""
    if not rows:
        return
    fig.add_trace(go.Scatter(
        x=[r.level for r in rows], y=[r.speedup for r in rows], customdata=[_hover(r) for r in rows],
        mode="markers" if bound else "lines+markers", legendgroup=name,
        name=f"{name} (at least: there at step 0)" if bound else name,
        marker={"symbol": _MARKERS[bound], "size": 9 if bound else 6, "color": COLORS.get(name)},
        line={"color": COLORS.get(name), "width": 2},
        hovertemplate="level %{x:.4g}<br>%{customdata[0]}<br>%{customdata[1]}<extra>" + name + "</extra>"))


def _hover(row: IsoLoss) -> list[str]:
    """Two hover lines: the speedup, and what each needed."""
    unit, base, cand = ("tokens", row.baseline_tokens, row.candidate_tokens) if row.baseline_tokens is not None \
        else ("steps", row.baseline_steps, row.candidate_steps)
    needed = f"random init {base:,.0f} {unit}, candidate {'<= ' if row.at_start else ''}{cand:,.0f}"
    return [f"speedup {row.text()}", needed]


def iso_loss_chart_from_events(events: Sequence[Event], *, metric: str = "loss",
                               higher_is_better: bool = False, baseline: str = "random") -> go.Figure:
    """iso_loss_chart of a run's events so far (the live chart of the Train page).

    Args:
        events: engine events (a job's events, or read_events of a metrics.jsonl).
        metric: "loss", "perplexity" or "accuracy".
        higher_is_better: True for accuracy.
        baseline: the random-init candidate's name.
    """
    tracks = tracks_from_events(events, metric)
    rows = iso_loss_by_candidate(tracks, higher_is_better=higher_is_better, baseline=baseline)
    return iso_loss_chart(rows, metric=metric, higher_is_better=higher_is_better)
