"""bench/bench_training.py: the names of its learning-rate sweep's runs."""

from __future__ import annotations

import torch

from bench import bench_training


def test_run_names_state_the_learning_rate_each_run_trains_at():
    """2.5e-4 was named "3e-4": the sweep table then misstated the rate of its run."""
    variant = bench_training.Variant("subclone", "subclone", "subclone", lrs=(2.5e-4, 1e-3))
    cands = bench_training.candidates_for([variant], {"subclone": torch.nn.Linear(2, 2)}, None,
                                          {"subclone": variant.lrs})
    assert [c.name for c in cands] == ["subclone@lr=2.5e-4", "subclone@lr=1e-3"]
    assert [c.lr for c in cands] == [2.5e-4, 1e-3]
