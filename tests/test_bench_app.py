"""`bench/bench_app.py`'s ablation part on a tiny random parent: every token count is ranked against the reference
the way the Blocks page computes it, and the report states the page's default."""

from __future__ import annotations

from bench import bench_app
from bench.bench_scale import write_parent


def test_the_ablation_part_ranks_each_token_count_against_the_reference(tmp_path, monkeypatch):
    parent = tmp_path / "tiny"
    write_parent(parent, "tiny")
    monkeypatch.setattr(bench_app, "ABLATION_REFERENCE", 256)
    monkeypatch.setattr(bench_app, "ABLATION_CANDIDATES", (128,))
    monkeypatch.setattr(bench_app, "LEAST", 2)
    monkeypatch.setattr(bench_app, "MOST", 1)
    measured = []
    rows_of = bench_app.ablation_token_rows
    monkeypatch.setattr(bench_app, "ablation_token_rows", lambda p: measured.extend(rows_of(p)) or measured)
    text = bench_app.part_text("ablation", [str(parent)], steps=1)
    assert [row[1] for row in measured] == ["256", "128"]
    reference, other = measured
    assert reference[3] == "1.000"  # the reference against itself
    assert -1.0 <= float(other[3]) <= 1.0
    for row in measured:
        least, most = ({int(i) for i in cell.split(", ")} for cell in row[4:6])
        assert len(least) == 2 and len(most) == 1 and not least & most and least | most <= set(range(4))
        assert "| " + " | ".join(str(cell) for cell in row) + " |" in text
    assert f"use {bench_app.probes.ABLATION_TOKENS} tokens by default" in text
    assert "| parent | tokens per evaluation | seconds | rank correlation with the 256-token losses |" in text
