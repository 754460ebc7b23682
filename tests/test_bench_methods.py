"""`bench/bench_methods.py` at the smoke size on a tiny random parent: every method of every row built the way
`make` builds it, scored at both windows, refusals recorded with their reason, and the report's table."""

from __future__ import annotations

import json
import math

import pytest

from bench import bench_methods

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("methods")
    assert bench_methods.main(["--smoke", "--out-dir", str(out)]) == 0
    return json.loads((out / "methods.json").read_text())


def test_every_method_of_every_row_has_finite_losses_at_both_windows(report):
    (parent,) = report["parents"]
    kinds = [row["kind"] for row in parent["rows"]]
    assert kinds == ["width", "hidden", "depth"]
    for row in parent["rows"]:
        methods = {"width": bench_methods.WIDTH_METHODS, "hidden": bench_methods.HIDDEN_METHODS,
                   "depth": bench_methods.DEPTH_METHODS}[row["kind"]]
        assert list(row["results"]) == list(methods)
        for method, result in row["results"].items():
            assert "refused" not in result, (row["kind"], method, result)  # the tiny Llama takes every method
            assert set(result["losses"]) == {"128", "2048"}
            assert all(math.isfinite(v) for v in result["losses"].values()), (method, result)
            assert result["params"] > 0 and result["seconds"] >= 0


def test_the_rows_cut_what_they_say(report):
    rows = {row["kind"]: row["sizes"] for row in report["parents"][0]["rows"]}
    parent = rows["depth"]  # the depth row keeps every width
    assert rows["hidden"]["heads"] == parent["heads"] and rows["hidden"]["ffn"] == parent["ffn"]
    assert rows["hidden"]["hidden"] < parent["hidden"] and rows["hidden"]["layers"] == rows["width"]["layers"]
    assert rows["width"]["ffn"] < parent["ffn"] and rows["depth"]["layers"] < rows["width"]["layers"]


def test_the_report_has_a_table_per_parent(report):
    text = bench_methods.markdown(report)
    assert text.startswith(bench_methods.SECTION)
    assert "| cut | ratio | shape | subclone | grail | wanda-sp | flap | minitron | random | slicegpt | shortgpt |" in text
