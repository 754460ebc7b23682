"""The Train page's second chart: the iso-loss speedup beside the loss chart, from the run's own events."""

from __future__ import annotations

import pytest
from test_app_pages import chart_titles, run, start_app, train_on_page, workdir  # noqa: F401 (workdir: a fixture)

from subclone_core.speedup import iso_loss_by_candidate, tracks_from_events

pytestmark = pytest.mark.usefixtures("one_thread")
ISO_TITLE = "Speedup at every loss level random init reached"


def generate_child(at, timeout: float = 120) -> None:
    """Click Generate on the Child page; wait for the page's background steps where the app has them."""
    at.switch_page("pages/child.py")
    run(at)
    at.button(key="generate_child").click()
    run(at)
    for job, _ in list(getattr(at.session_state["workspace"], "steps", {}).values()):
        assert job.wait(timeout), f"{job.name} still {job.status}"
    run(at)  # applies the finished step's result, as the page's polling would
    assert at.session_state["workspace"].child is not None, [e.value for e in at.error]


def test_the_train_page_shows_the_iso_loss_chart_beside_the_loss_chart(workdir):  # noqa: F811
    at = start_app(workdir / "parent", workdir / "text.txt")
    generate_child(at)
    job = train_on_page(at, {"keep_steps": 6, "keep_batch": 4, "keep_seq_len": 16, "keep_eval_every": 2})
    charts = chart_titles(at)
    assert {"Training and validation loss", ISO_TITLE} <= set(charts)
    # side by side: the iso-loss chart sits in the column next to the loss chart's
    pair = [c for c in at.columns if c.get("plotly_chart")]
    assert len(pair) == 2 and len(pair[0].get("plotly_chart")) == len(pair[1].get("plotly_chart")) == 1
    # the chart draws exactly the rows the speedup module computes from the job's events
    rows = iso_loss_by_candidate(tracks_from_events(job.events(), "loss"), higher_is_better=False)["subclone"]
    points = [(r.level, r.speedup) for r in rows if r.speedup is not None]
    drawn = [(x, y) for trace in charts[ISO_TITLE]["data"] for x, y in zip(trace["x"], trace["y"])]
    assert points  # random init improved within 6 steps, so there are levels
    flat = lambda pairs: [v for pair in sorted(pairs) for v in pair]
    assert flat(drawn) == pytest.approx(flat(points), rel=1e-6)  # Plotly carries float32
