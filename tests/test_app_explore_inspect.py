"""The Child page's shape explorer and the Importance page's neuron inspector under AppTest, on the tiny
local Llama of tests/test_app_pages.py."""

from __future__ import annotations

import pytest
import tiny_models
from test_app_pages import chart_titles, errors, run, start_app, workdir  # noqa: F401 (workdir: a fixture)

from subclone_core.explore import width_shapes
from subclone_core.shape import Shape, parameter_count

pytestmark = pytest.mark.usefixtures("one_thread")
EXPLORER_TITLE = "Child shapes near the budget: loss before training (click a point to use it)"


def test_explorer_scores_shapes_and_a_picked_shape_fills_the_shape_inputs(workdir):
    at = start_app(workdir / "parent", workdir / "text.txt")
    at.switch_page("pages/child.py")
    run(at)
    middle = width_shapes(tiny_models.make("llama"))[3]
    budget = parameter_count(tiny_models.make("llama"), Shape(**{**middle.as_dict(), "layers": 2}))
    at.number_input(key="keep_explore_budget").set_value(budget / 1e6)
    run(at)
    at.button(key="run_explore").click()
    run(at)
    assert not errors(at)
    exploration = at.session_state["workspace"].exploration
    assert exploration is not None and exploration.front
    spec = chart_titles(at)[EXPLORER_TITLE]
    front = next(trace for trace in spec["data"] if trace["name"] == "Pareto front")
    assert len(front["x"]) == len(exploration.front)
    picked = max(range(len(exploration.points)), key=lambda i: exploration.points[i].params)
    at.selectbox(key="explore_pick").set_value(picked)
    run(at)
    at.button(key="use_explored").click()
    run(at)
    shape = exploration.points[picked].shape
    assert [at.number_input(key=f"keep_shape_{role}").value for role in ("layers", "hidden", "heads")] == [
        shape.layers, shape.hidden, shape.heads]
