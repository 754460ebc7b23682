"""Every benchmark report that is written from a saved JSON under docs/ comes out of today's code exactly as it is
committed: the measuring is the benchmarks' own (their smoke tests), the tables and prose from the numbers are
checked here, section by section, against docs/BENCHMARKS.md and docs/REPRODUCTION.md."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bench import (
    _repro_report,
    bench_budget,
    bench_fsdp,
    bench_methods,
    bench_quality,
    bench_refit,
    bench_scale,
    bench_training,
)
from bench._report import DOC, DOCS
from bench.reproduce import with_budget


def _json(name: str) -> dict:
    return json.loads((DOCS / name).read_text())


def _section(name: str) -> str:
    match = re.search(rf"<!-- begin {re.escape(name)} -->\n(.*?)\n<!-- end {re.escape(name)} -->", DOC.read_text(),
                      re.DOTALL)
    assert match, f"docs/BENCHMARKS.md has no section {name}"
    return match[1]


SECTIONS = {
    "bench_methods": lambda: bench_methods.markdown(_json("methods.json")),
    "bench_fsdp": lambda: bench_fsdp.markdown(_json("fsdp.json")),
    "bench_refit": lambda: bench_refit.markdown(_json("refit_variants.json")),
    "bench_refit_tokens": lambda: bench_refit.tokens_markdown(_json("refit_tokens.json")),
    "bench_refit_dtype": lambda: bench_refit.dtype_markdown(_json("refit_dtype.json")),
    "bench_scale": lambda: bench_scale.markdown(_json("scale.json")),
    "bench_sequential": lambda: bench_scale.sequential_markdown(_json("sequential.json")),
    "bench_ablation": lambda: bench_scale.ablation_markdown(_json("ablation.json")),
    "budget": lambda: bench_budget.section_markdown(_json("speedup_vs_budget.json"), bench_budget.SIZES["cpu"],
                                                    bench_budget.outputs("cpu", None)),
    "quality": lambda: bench_quality.section_markdown(_json("quality.json"), DOCS / "bench_quality.png"),
    "training-lm": lambda: bench_training.markdown(_json("training_lm.json")),
    "training-vit": lambda: bench_training.markdown(_json("training_vit.json")),
}


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_section_from_its_json_is_the_committed_one(name):
    assert SECTIONS[name]().strip() == _section(name)


def test_reproduction_report_from_its_json_is_the_committed_one():
    results = with_budget(_json("reproduction/results.json"), DOCS / "speedup_vs_budget.json")
    assert _repro_report.render(results, "reproduction") == (DOCS / "REPRODUCTION.md").read_text()


def test_a_changed_number_changes_the_section():
    report = _json("methods.json")
    report["parents"][0]["rows"][0]["results"]["subclone"]["losses"]["2048"] += 1.0
    assert bench_methods.markdown(report).strip() != _section("bench_methods")


def test_docs_path_is_the_repository_docs():
    assert DOCS == Path(__file__).resolve().parent.parent / "docs"
