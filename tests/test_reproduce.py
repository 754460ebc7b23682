"""`bench/reproduce.py` at the smoke size on tiny parents, and the verdict rules of the report."""

from __future__ import annotations

import json
import re

import pytest

from bench import _harness as h
from bench import _repro_report as report_rules
from bench import reproduce
from subclone_core.core.strategies import plan_shape
from subclone_core.sources import load_parent
from subclone_core.training import RunResult
from subclone_core.training.evaluate import evaluate
from subclone_core.workflow.children import make_child
from tests.conftest import save_tiny_vit

VERDICT = re.compile(r"\*\*Verdict: (holds|holds partly|does not hold|within noise|learning rate: [^*]*|open[^*]*)\.\*\*")


@pytest.fixture(scope="module")
def run(tmp_path_factory, counting_text_file, llama_dir):
    """One smoke run: a 4-block tiny Llama on a counting corpus, and a 4-block tiny ViT on scikit-learn digits."""
    root = tmp_path_factory.mktemp("reproduce")
    vit = save_tiny_vit(root / "vit", layers=4)
    llama = llama_dir
    corpus = counting_text_file
    out = root / "docs" / "REPRODUCTION.md"
    budget = root / "speedup_vs_budget.json"
    budget.write_text(json.dumps(_budget([(5.0, 3.2, False), (4.0, 4.6, False)])))
    reproduce.main(["--size", "smoke", "--parent", str(llama), "--data", str(corpus), "--vit-parent", str(vit),
                    "--image-data", "digits", "--out", str(out), "--budget", str(budget)])
    results = json.loads((out.parent / "reproduction" / "results.json").read_text())
    return {"out": out, "text": out.read_text(), "results": results, "llama": llama, "corpus": corpus,
            "budget": budget}


def _budget(rows: list[tuple[float, float | None, bool]]) -> dict:
    """bench_budget.py's JSON, as much of it as finding 9 reads: (loss, speedup, lower bound) per drop level."""
    at_drop = [{"loss": loss, "speedup": speedup, "lower_bound": bound, "fraction": (i + 1) / len(rows),
                "text": "not reached in 100 steps" if speedup is None else (">= " if bound else "") + f"{speedup:.1f}x"}
               for i, (loss, speedup, bound) in enumerate(rows)]
    return {"size": "smoke", "random_tokens": 1_501_184, "at_drop": {"subclone": at_drop}, "seed_spread": [],
            "arms": {"subclone": {"final": 3.5}}}


@pytest.mark.slow  # the module's `run` fixture runs bench/reproduce.py end to end (minutes)
def test_report_covers_every_finding_with_a_computed_verdict(run):
    text = run["text"]
    for number, title, *_ in report_rules.FINDINGS:
        assert f"## {number}. {title}" in text
    verdicts = VERDICT.findall(text)
    lm_findings = len(report_rules.FINDINGS)
    vit_findings = sum("vit" in f[4] for f in report_rules.FINDINGS)
    assert len(verdicts) == lm_findings + vit_findings + 1  # + finding 9 at the longer budget
    assert "| 9 | Headline speedup | language model |" in text
    assert "| 9 | Headline speedup | language model, longer budget | holds |" in text
    assert "the iso-loss speedup at random init's final loss (4.00) is **4.6x**" in text


@pytest.mark.slow
def test_every_linked_plot_exists_as_a_png(run):
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", run["text"])
    assert len(links) == len(report_rules.FINDINGS)
    for link in links:
        data = (run["out"].parent / link).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, link


@pytest.mark.slow
def test_reported_numbers_come_from_the_models(run):
    """Relative magnitude and a step-0 loss recomputed independently match what the run reported."""
    results = run["results"]["lm"]
    parent = load_parent(str(run["llama"]))
    importance = reproduce.calibrate_seed(parent, str(run["corpus"]), reproduce.SIZES["smoke"].calib_tokens, seed=1)
    assert results["analysis"]["rel_magnitude"]["1"] == pytest.approx(importance.rel_magnitude.tolist(), rel=1e-4)
    assert results["analysis"]["layers"] == 4 and len(results["analysis"]["ablation"]["losses"]) == 4

    target = plan_shape(parent.model, **reproduce.SIZES["smoke"].lm_shapes["aggressive"])
    child = make_child(parent, target, strategy="random", seed=1)
    batches = reproduce.validation_batches(parent, str(run["corpus"]), reproduce.SIZES["smoke"].analysis_tokens, 0)
    row = next(r for r in results["step0"] if (r["shape"], r["arm"], r["seed"]) == ("aggressive", "random", 1))
    assert row["loss"] == pytest.approx(evaluate(child.model, batches)["loss"], rel=1e-5)


@pytest.mark.slow
def test_training_ran_every_arm_with_swept_learning_rates(run):
    training = run["results"]["lm"]["training"]
    assert set(training["runs"]) == {a.name for a in reproduce.arms("lm", reproduce.SIZES["smoke"].lrs["lm"])}
    swept = {(r["arm"], r["lr"]) for r in training["sweep"] if r["seed"] == 0}
    assert {("subclone", 1e-4), ("subclone", 1e-3), ("random", 1e-3)} <= swept
    assert training["runs"]["subclone"]["0"]["steps"] == [0, 1, 2, 4]  # every eval_every=2 plus the extra step 1
    vit = run["results"]["vit"]["training"]
    assert vit["metric"] == "accuracy" and "subclone" in vit["speedups"]


@pytest.mark.slow
def test_every_trained_run_is_in_the_benchmarks_one_schema(run):
    """Chosen runs hold exactly h.run_json's keys, sweep rows its summary's plus arm and seed; tokens count what
    the training saw: batch x seq_len tokens per step for the LM, batch images per step for the ViT (the
    committed results.json's tokens were derived so)."""
    empty = RunResult("x", "random", 1e-3, 0.0)
    for part in ("lm", "vit"):
        training, budget = run["results"][part]["training"], reproduce.SIZES["smoke"].budget[part]
        per_step = budget.batch_size * (budget.seq_len if part == "lm" else 1)
        for by_seed in training["runs"].values():
            for r in by_seed.values():
                assert list(r) == list(h.run_json(empty, training["metric"]))
                assert r["tokens"] == [s * per_step for s in r["steps"]] and r["values"][0] == r["start"]
        summary = list(h.run_json(empty, curve=False, arm="random", seed=0))
        assert all(list(r) == summary for r in training["sweep"])


@pytest.mark.slow
def test_redrawing_from_the_json_gives_the_same_report(run, tmp_path):
    out = tmp_path / "REPRODUCTION.md"
    (tmp_path / "reproduction").mkdir()
    json_path = run["out"].parent / "reproduction" / "results.json"
    reproduce.main(["--from-json", str(json_path), "--out", str(out), "--budget", str(run["budget"])])
    assert out.read_text() == run["text"]
    reproduce.main(["--from-json", str(json_path), "--out", str(out), "--budget", str(tmp_path / "none.json")])
    assert "longer budget" not in out.read_text().split("## Settings")[0]  # no file: the short budget alone


def test_the_longer_budget_verdict_compares_the_final_level_with_the_papers_4x():
    verdict = lambda rows: report_rules.finding_budget(_budget(rows))["verdict"]
    assert verdict([(5.0, 9.0, True), (4.0, 4.1, False)]) == report_rules.HOLDS
    assert verdict([(5.0, 9.0, True), (4.0, 2.5, False)]) == report_rules.PARTLY  # the early lead is not the claim
    assert verdict([(5.0, 9.0, True), (4.0, 0.8, False)]) == report_rules.FAILS
    assert verdict([(5.0, 3.0, False), (4.0, None, False)]) == report_rules.FAILS  # never got there


def test_the_longer_budget_finding_names_each_learning_rate_as_swept():
    """The rates were printed with "{:.0e}": 2.5e-4 read "2e-04", a rate that was never trained."""
    budget = {**_budget([(5.0, 3.2, False), (4.0, 4.6, False)]), "lrs": {"random": 1e-3, "subclone": 2.5e-4},
              "plan": {"sweep_lrs": {"random": [5e-4, 1e-3], "subclone": [2.5e-4, 1e-3]}}}
    assert ("the aggressive child, each arm at its best lr at this budget: random 1e-3 of 5e-4, 1e-3; "
            "subclone 2.5e-4 of 2.5e-4, 1e-3)") in report_rules.finding_budget(budget)["text"]


# --- verdict rules on hand-made measurements ------------------------------------------------------------


def _analysis(rel: list[float], losses: list[float]) -> dict:
    return {"analysis": {"layers": len(rel), "rel_magnitude": {"0": rel}, "ablation": {"base": 3.0, "losses": losses},
                         "magnitude_vs_removal_spearman": 0.0}}


def test_magnitude_and_removal_verdicts_follow_the_profile():
    u_shape = [0.9, 0.4, 0.2, 0.1, 0.2, 0.3, 0.5, 0.8]
    assert report_rules.finding_magnitude(_analysis(u_shape, [9] * 8))["verdict"] == report_rules.HOLDS
    rising = [0.1 * i for i in range(1, 9)]
    assert report_rules.finding_magnitude(_analysis(rising, [9] * 8))["verdict"] == report_rules.FAILS
    cheap_middle = [9, 4, 3.2, 3.1, 3.3, 3.5, 4, 8]
    assert report_rules.finding_removal(_analysis(u_shape, cheap_middle))["verdict"] == report_rules.HOLDS
    cheap_ends = [3.1, 5, 6, 7, 7, 6, 5, 3.2]
    assert report_rules.finding_removal(_analysis(u_shape, cheap_ends))["verdict"] == report_rules.FAILS


def _pair_part(step0: dict[str, float], best: dict[str, dict[str, float]]) -> dict:
    rows = [{"shape": "s", "seed": 0, "arm": arm, "loss": v, "accuracy": None} for arm, v in step0.items()]
    runs = {arm: {seed: {"best": v} for seed, v in by_seed.items()} for arm, by_seed in best.items()}
    return {"step0": rows, "step0_shapes": {"s": {}},
            "training": {"metric": "loss", "runs": runs, "labels": {"scaled": "x"}, "shape_key": "s"}}


def test_pair_verdicts_need_agreement_across_seeds():
    wins = _pair_part({"scaled": 8.0, "subclone": 9.0}, {"scaled": {"0": 5.0, "1": 5.1}, "subclone": {"0": 5.5, "1": 5.6}})
    assert report_rules.finding_scaling(wins)["verdict"] == report_rules.HOLDS
    split = _pair_part({"scaled": 8.0, "subclone": 9.0}, {"scaled": {"0": 5.0, "1": 5.6}, "subclone": {"0": 5.5, "1": 5.1}})
    assert report_rules.finding_scaling(split)["verdict"] == report_rules.NOISE
    loses = _pair_part({"scaled": 9.5, "subclone": 9.0}, {"scaled": {"0": 6.0}, "subclone": {"0": 5.5}})
    assert report_rules.finding_scaling(loses)["verdict"] == report_rules.FAILS


def test_consistency_verdict_uses_rank_correlation_and_dominance():
    part = {"analysis": {"rank_corr_off_diagonal": 0.8, "residual_top1_share": 0.2, "scatter": [], "residual_dims": 100,
                         "rank_corr_adjacent": 0.9, "ffn_top1_share": 0.03, "seed_agreement": None}}
    assert report_rules.finding_consistency(part)["verdict"] == report_rules.HOLDS
    part["analysis"].update(rank_corr_off_diagonal=0.1, residual_top1_share=0.011)
    assert report_rules.finding_consistency(part)["verdict"] == report_rules.FAILS


def _sweep_part(random: dict[float, float], child: dict[float, float]) -> dict:
    sweep = [{"arm": arm, "seed": 0, "lr": lr, "best": v} for arm, values in (("random", random), ("subclone", child))
             for lr, v in values.items()]
    return {"training": {"metric": "loss", "sweep": sweep}}


def test_lr_verdict_compares_the_child_with_every_lr_random_init_does_well_with():
    lower = _sweep_part({1e-3: 7.0, 3e-3: 6.0}, {1e-4: 5.0, 1e-3: 4.0, 3e-3: 6.5})
    assert report_rules.lr_verdict(lower)[0] == report_rules.HOLDS
    tie = _sweep_part({1e-3: 7.524, 3e-3: 7.522}, {3e-4: 5.5, 1e-3: 5.3, 3e-3: 7.5})
    assert report_rules.lr_verdict(tie)[0] == report_rules.PARTLY  # random init ties: 1e-3 is one of its lrs
    same = _sweep_part({1e-3: 6.0, 3e-3: 7.0}, {1e-3: 5.0, 3e-3: 5.5})
    assert report_rules.lr_verdict(same)[0] == report_rules.FAILS
