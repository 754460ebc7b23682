"""The Child page's shape explorer and the Importance page's neuron inspector under AppTest, on the tiny
local Llama of tests/test_app_pages.py."""

from __future__ import annotations

import pytest
import tiny_models
from test_app_pages import chart_titles, errors, run, settle, start_app, workdir  # noqa: F401 (workdir: a fixture)

from subclone_core.analysis.explore import parameter_count, width_shapes  # wherever the library keeps it
from subclone_core.core.shape import Shape

pytestmark = pytest.mark.usefixtures("one_thread")
EXPLORER_TITLE = "Child shapes near the budget: loss before training (click a point to use it)"


def test_explorer_scores_shapes_and_a_picked_shape_fills_the_shape_inputs(workdir):  # noqa: F811
    at = start_app(workdir / "parent", workdir / "text.txt")
    at.switch_page("pages/child.py")
    run(at)
    middle = width_shapes(tiny_models.make("llama"))[3]
    budget = parameter_count(tiny_models.make("llama"), Shape(**{**middle.as_dict(), "layers": 2}))
    at.number_input(key="keep_explore_budget").set_value(budget / 1e6)
    run(at)
    at.button(key="run_explore").click()
    settle(at)
    assert not errors(at)
    exploration = at.session_state["workspace"].exploration
    assert exploration is not None and exploration.points
    # the tiny parent is random: its children may all start worse than random init, and then none is on the front
    assert all(p.loss < exploration.random_loss for p in exploration.front)
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


def test_inspector_shows_a_units_top_tokens_with_context(workdir):  # noqa: F811
    at = start_app(workdir / "parent", workdir / "text.txt")
    at.switch_page("pages/importance.py")
    run(at)
    at.number_input(key="keep_calib_tokens").set_value(512)
    run(at)
    at.button(key="run_calibration").click()
    settle(at)
    at.selectbox(key="keep_inspect_kind").set_value("head")
    run(at)
    at.number_input(key="keep_inspect_block").set_value(1)
    at.number_input(key="keep_inspect_index").set_value(3)
    run(at)
    at.button(key="run_inspect").click()
    settle(at)
    assert not errors(at)
    inspection = at.session_state["workspace"].inspection
    (unit, hits), = inspection.items()
    assert (unit.kind, unit.block, unit.index) == ("head", 1, 3) and len(hits) == 8
    table = at.dataframe[0].value
    assert list(table.columns) == ["rank", "value", "item", "position", "before", "token", "after"]
    assert all(token.strip() for token in table["token"])
    at.selectbox(key="keep_inspect_kind").set_value("residual")  # wider than heads: the index stays valid
    run(at)
