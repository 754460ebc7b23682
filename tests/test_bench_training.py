"""bench/bench_training.py: the names of its learning-rate sweep's runs, and its smoke size end to end."""

from __future__ import annotations

import json

import pytest
import torch

from bench import _harness as h
from bench import bench_training
from subclone_core.training import RunResult


def test_run_names_state_the_learning_rate_each_run_trains_at():
    """2.5e-4 was named "3e-4": the sweep table then misstated the rate of its run."""
    variant = bench_training.Variant("subclone", "subclone", "subclone", lrs=(2.5e-4, 1e-3))
    cands = variant.candidates(torch.nn.Linear(2, 2), variant.lrs)
    assert [c.name for c in cands] == ["subclone@lr=2.5e-4", "subclone@lr=1e-3"]
    assert [c.lr for c in cands] == [2.5e-4, 1e-3]


@pytest.mark.slow
@pytest.mark.default_parent
def test_the_smoke_size_writes_the_language_models_section_and_json_and_redraws_them(tmp_path):
    """The LM benchmark end to end at its smoke size on the default parent (about a minute), into tmp_path: the
    section with its verdicts, the plot, and the JSON (every chosen run in the one schema, h.run_json) from which
    --report-only redraws the same section."""
    doc = tmp_path / "BENCHMARKS.md"
    outcomes = bench_training.main(["--smoke", "--only", "lm", "--threads", "1", "--doc", str(doc)])
    text = doc.read_text()
    assert [o["key"] for o in outcomes] == ["paper-like", "aggressive"]
    assert "Speedup of the subcloned child:" in text and "the paper's 4x is for milder ratios" in text
    for o in outcomes:
        assert set(o["chosen"]) == {v["name"] for v in o["variants"]}  # every variant trained, none diverged
        assert bench_training.headline(o).split(":")[0] in text
        for run in o["chosen"].values():
            assert list(run) == list(h.run_json(RunResult("x", "random", 1e-3, 0.0)))
    assert (tmp_path / "bench_lm_curves.png").stat().st_size > 0
    saved = json.loads((tmp_path / "training_lm.json").read_text())
    assert saved["outcomes"] == json.loads(json.dumps(outcomes))
    doc.unlink()
    bench_training.main(["--report-only", "--only", "lm", "--doc", str(doc)])
    assert doc.read_text() == text
