"""`bench/bench_app.py`'s ablation part on a tiny random parent: every token count is ranked against the reference
the way the Blocks page computes it, and the report states the page's default."""

from __future__ import annotations

import pytest

from bench import bench_app
from bench.bench_scale import write_parent


@pytest.fixture(scope="module")
def tiny_parent(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parent") / "tiny"
    write_parent(folder, "tiny")
    return str(folder)


def test_the_ablation_part_ranks_each_token_count_against_the_reference(tiny_parent, monkeypatch):
    monkeypatch.setattr(bench_app, "ABLATION_REFERENCE", 256)
    monkeypatch.setattr(bench_app, "ABLATION_CANDIDATES", (128,))
    monkeypatch.setattr(bench_app, "LEAST", 2)
    monkeypatch.setattr(bench_app, "MOST", 1)
    rows = bench_app.ablation_token_rows(tiny_parent)
    assert [row[1] for row in rows] == ["256", "128"]
    reference, other = rows
    assert reference[3] == "1.000"  # the reference against itself
    assert -1.0 <= float(other[3]) <= 1.0
    for row in rows:
        least, most = ({int(i) for i in cell.split(", ")} for cell in row[4:6])
        assert len(least) == 2 and len(most) == 1 and not least & most and least | most <= set(range(4))


def test_the_ablation_report_names_the_pages_default(tiny_parent, monkeypatch):
    monkeypatch.setattr(bench_app, "ABLATION_REFERENCE", 256)
    monkeypatch.setattr(bench_app, "ABLATION_CANDIDATES", (128,))
    text = bench_app.part_text("ablation", [tiny_parent], steps=1)
    assert f"use {bench_app.probes.ABLATION_TOKENS} tokens by default" in text
    assert "| parent | tokens per evaluation | seconds | rank correlation with the 256-token losses |" in text
