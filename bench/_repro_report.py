"""docs/REPRODUCTION.md and its figures: per finding the paper's claim, what was measured and a verdict by the rule
in the finding's docstring: "holds" (every test passes), "holds partly" (some do), "does not hold" (none do),
"within noise" (a tie, or the seeds disagree), or which option won where the paper leaves it open."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from statistics import mean
from typing import Any

from bench._report import PAPER_SPEEDUP, TEMPLATES, finish, panels, save_figure
from bench._report import render as render_template
from bench.bench_budget import lr_picks
from subclone_core.training.sweep import grid_edge

HOLDS, PARTLY, FAILS, NOISE = "holds", "holds partly", "does not hold", "within noise"
UNMEASURABLE = "not measurable with fewer than 3 blocks"
TIE = {"loss": 0.01, "accuracy": 0.002}  # best values closer than this count as a tie (0.2% = 1 of 500 images)
PART_NAMES = {"lm": "language model", "lm-budget": "language model, longer budget", "vit": "ViT"}
# (number, title, the paper's claim, figure, parts) per finding, one a line in bench/templates/repro_findings.md
FINDINGS = [(number, title, claim, figure, tuple(parts.split(","))) for number, title, figure, parts, claim in
            (line.split(" | ", 4) for line in (TEMPLATES / "repro_findings.md").read_text().splitlines() if line)]


def found(verdict: str, kind: str, **facts: Any) -> dict[str, str]:
    """A finding's verdict, and its text: the ``kind`` paragraph of bench/templates/repro_measured.md.j2."""
    return {"verdict": verdict, "text": render_template("repro_measured", kind=kind, **facts)}


def grade(tests: list[bool]) -> str:
    """holds when every test passes, holds partly when some do, does not hold when none do."""
    return HOLDS if all(tests) else PARTLY if any(tests) else FAILS


def winner(values: dict[Any, float | None], metric: str) -> Any:
    """The key of the best value (None when there is none)."""
    known = {k: v for k, v in values.items() if v is not None}
    return (max if metric == "accuracy" else min)(known, key=known.get) if known else None


def middle_test(values: list[float], layers: int, kind: str, /, **facts: Any) -> dict[str, str]:
    """Findings 1-2, on a value per block. Tests: the middle half's mean is below the first and last quarters'
    mean; the lowest value is in the middle half."""
    lo, hi = max(1, layers // 4), layers - max(1, layers // 4)
    if lo >= hi:
        return found(UNMEASURABLE, f"{kind}-few", **facts)
    lowest, mid, out = values.index(min(values)), mean(values[lo:hi]), mean(values[:lo] + values[hi:])
    return found(grade([mid < out, lo <= lowest < hi]), kind, lowest=lowest, mid=mid, out=out, layers=layers,
                 **facts)


def finding_magnitude(part: dict) -> dict[str, str]:
    """1. Relative magnitude is lowest in the middle blocks (middle_test)."""
    a = part["analysis"]
    rel = next(iter(a["rel_magnitude"].values()))
    return middle_test(rel, a["layers"], "magnitude", rel=rel,
                       argmins=sorted({r.index(min(r)) for r in a["rel_magnitude"].values()}))


def finding_removal(part: dict) -> dict[str, str]:
    """2. Removing a middle block hurts the untrained parent least (middle_test on each block's removal cost)."""
    abl = part["analysis"]["ablation"]
    metric = "accuracy" if "accuracies" in abl else "loss"
    values, base = (abl["accuracies"], abl["base_accuracy"]) if metric == "accuracy" else (abl["losses"], abl["base"])
    cost = [(base - v) if metric == "accuracy" else (v - base) for v in values]  # larger = removal hurts more
    return middle_test(cost, part["analysis"]["layers"], "removal", metric=metric, base=base, values=values,
                       cost=cost, spearman=part["analysis"]["magnitude_vs_removal_spearman"])


def finding_consistency(part: dict) -> dict[str, str]:
    """3. Neuron importance is consistent across blocks, and a few neurons dominate. Tests: mean Spearman
    correlation between blocks >= 0.5; the top 1% of residual neurons hold >= 5% of the score."""
    a = part["analysis"]
    return found(grade([a["rank_corr_off_diagonal"] >= 0.5, a["residual_top1_share"] >= 0.05]), "consistency", a=a)


def compare(part: dict, arms: tuple[str, ...] | dict[str, str]) -> tuple[dict[str, Any], list[bool], Any]:
    """Arms (or arm -> the name to show) at step 0 and after training: the facts (metric, shape -> name -> step-0
    value over the calibration seeds, seed -> name -> best in each seed that trained them all), whether the first
    beats each other at step 0 per shape, and the clear winner in every seed (None: within TIE, or a split)."""
    names = arms if isinstance(arms, dict) else {a: a for a in arms}
    m, runs = part["training"]["metric"], part["training"]["runs"]

    def at_step0(shape: str, arm: str) -> float | None:
        values = [r[m] for r in part["step0"] if r["shape"] == shape and r["arm"] == arm and r[m] is not None]
        return mean(values) if values else None

    step0 = {s: {name: at_step0(s, arm) for arm, name in names.items()} for s in part["step0_shapes"]}
    first, *others = names.values()
    tests = [v[first] > v[o] if m == "accuracy" else v[first] < v[o] for v in step0.values() for o in others
             if v[first] is not None and v[o] is not None]
    seeds = sorted(set.intersection(*(set(runs.get(arm, {})) for arm in names)))
    per_seed = {s: {name: runs[arm][s]["best"] for arm, name in names.items()} for s in seeds}
    winners = set()
    for values in per_seed.values():
        ranked = sorted((v for v in values.values() if v is not None), reverse=m == "accuracy")
        winners.add(None if len(ranked) > 1 and abs(ranked[0] - ranked[1]) < TIE[m] else winner(values, m))
    return {"m": m, "step0": step0, "per_seed": per_seed}, tests, next(iter(winners)) if len(winners) == 1 else None


def finding_scaling(part: dict) -> dict[str, str]:
    """4. Scaling by sqrt(d/d') helps. Tests: the scaled child is better at step 0 on each shape, and clearly
    better after training in every seed run (a tie or a split between seeds makes the verdict "within noise")."""
    scaled, plain = ("scaled", "subclone") if "scaled" in part["training"]["labels"] else ("subclone", "unscaled")
    facts, tests, win = compare(part, (scaled, plain))
    trained = bool(facts["per_seed"])
    verdict = NOISE if trained and win is None else grade([*tests, win == scaled] if trained else tests)
    return found(verdict, "pair", claimed=scaled, other=plain, trained_shape=part["training"]["shape_key"], **facts)


def finding_reordering(part: dict) -> dict[str, str]:
    """5. Reordering by importance beats first-k, weight selection and random init. Tests: subclone beats each of
    the three at step 0 on each shape, and is clearly best after training."""
    facts, tests, win = compare(part, ("subclone", "first-k", "uniform", "random"))
    return found(grade(tests + [win == "subclone"] if facts["per_seed"] else tests), "step0-and-trained", **facts)


def sweep_values(part: dict, arm: str) -> dict[float, float]:
    """lr -> best value of one arm's runs on seed 0."""
    return {r["lr"]: r["best"] for r in part["training"]["sweep"]
            if r["arm"] == arm and r["seed"] == 0 and r["best"] is not None}


def lr_verdict(part: dict) -> tuple[str, dict[str, Any]]:
    """Does the child want a lower lr than random init? Random init's good lrs are those within TIE of its best.

    holds: the child's best lr is below all of them; holds partly: it is not, but the child is clearly worse
    at the highest lr random init does well with (it cannot take what random init can); else does not hold.
    """
    m = part["training"]["metric"]
    rnd, child = sweep_values(part, "random"), sweep_values(part, "subclone")
    if not rnd or not child:
        return FAILS, {"good": []}
    good = sorted(lr for lr, v in rnd.items() if abs(v - rnd[winner(rnd, m)]) < TIE[m])
    child_lr = winner(child, m)
    at_high = child.get(good[-1])
    hurt = at_high is not None and abs(at_high - child[child_lr]) >= TIE[m] and child_lr < good[-1]
    verdict = HOLDS if child_lr < good[0] else PARTLY if hurt else FAILS
    return verdict, {"good": good, "child_lr": child_lr, "hurt": hurt, "at_high": at_high, "at_best": child[child_lr]}


def finding_lr(part: dict, high_wd: float) -> dict[str, str]:
    """6. The subcloned child prefers a low learning rate (lr_verdict) and low weight decay (clearly better than
    ``high_wd`` in every seed run)."""
    t = part["training"]
    chosen = {arm: t["runs"].get(arm, {}).get("0", {}) for arm in ("random", "subclone")}
    lr_result, lr_facts = lr_verdict(part)
    facts, _, win = compare(part, ("subclone", "subclone-wd"))
    wd_verdict = NOISE if win is None else HOLDS if win == "subclone" else FAILS
    # AdamW's decoupled decay multiplies weights by (1 - lr_t * wd) each step; the cosine averages lr_t to ~lr / 2
    shrink = 1 - (1 - chosen["subclone"].get("lr", 0.0) / 2 * high_wd) ** t["budget"]["steps"]
    return found(f"learning rate: {lr_result}; weight decay: {wd_verdict}", "lr", **facts, **lr_facts,
                 sweep=[(arm, lr, v) for arm in chosen for lr, v in sorted(sweep_values(part, arm).items())],
                 edge=[arm for arm, run in chosen.items() if run and grid_edge(run["lr"], t["swept"][arm])],
                 wd=chosen["subclone"].get("weight_decay"), high_wd=high_wd, shrink=shrink)


def open_question(part: dict, options: dict[str, str], **extra: Any) -> dict[str, str]:
    """For what the paper leaves open: which option (arm -> its name) wins at step 0 per shape and after training."""
    facts, _, win = compare(part, options)
    firsts = [winner(values, facts["m"]) or "none" for values in facts["step0"].values()]
    if facts["per_seed"] and win is None:
        verdict = f"step 0: {', '.join(firsts)} (per shape); after training {NOISE}"
    elif len(set(firsts + ([win] if win else []))) == 1:
        verdict = f"{firsts[0]} wins here"
    else:
        verdict = f"step 0: {', '.join(firsts)} (per shape), after training: {win or 'none'}"
    return found(f"open in the paper; {verdict}", "step0-and-trained", **facts, **extra)


def finding_block_policy(part: dict) -> dict[str, str]:
    """7. (open) Which blocks to drop: the lowest relative magnitude, a middle span, or all but the first N; with
    the blocks each policy removed at the trained shape (once, or per calibration seed where the seeds differ)."""
    policies = {"subclone": "magnitude", "middle": "middle span", "first-blocks": "first N"}
    shape, removed = part["training"]["shape_key"], {}
    for arm, name in policies.items():
        by_seed = {r["seed"]: r["removed_blocks"] for r in part["step0"] if r["arm"] == arm and r["shape"] == shape}
        same = len({tuple(v or ()) for v in by_seed.values()}) == 1
        removed[name] = [(next(iter(by_seed.values())), None)] if same else [(v, s) for s, v in by_seed.items()]
    return open_question(part, policies, removed=removed, trained_shape=shape)


def finding_headline(part: dict) -> dict[str, str]:
    """9. The subcloned child reaches random init's best far sooner. Test per seed: a speedup of at least 4x."""
    t = part["training"]
    speedups = t["speedups"].get("subclone", {})
    if not speedups:
        return found(FAILS, "headline-none")
    return found(grade([v["ratio"] is not None and v["ratio"] >= PAPER_SPEEDUP for v in speedups.values()]),
                 "headline", t=t, m=t["metric"], speedups=speedups,
                 rnd=t["runs"].get("random", {}).get("0", {}), child=t["runs"].get("subclone", {}).get("0", {}))


def finding_budget(budget: dict) -> dict[str, str]:
    """9 at the longest budget measured (docs/speedup_vs_budget.json, bench/bench_budget.py): the iso-loss
    speedup at random init's final loss, the number the paper's ~4x is about (training to the same loss).
    Test: at least 4x holds; faster than random init but under 4x holds partly."""
    rows = budget["at_drop"].get("subclone") or []
    if not rows:
        return found(FAILS, "budget-none")
    speedup = rows[-1]["speedup"]
    verdict = FAILS if speedup is None or speedup <= 1 else HOLDS if speedup >= PAPER_SPEEDUP else PARTLY
    return found(verdict, "budget", b=budget, early=rows[0], final=rows[-1], lrs=lr_picks(budget), paper=PAPER_SPEEDUP)


# finding number -> its rule (6 takes the results' high weight decay); 8, open: with scaling on, the head tied
# to the embedding (unscaled) or untied and scaled
RULES = {"1": finding_magnitude, "2": finding_removal, "3": finding_consistency, "4": finding_scaling,
         "5": finding_reordering, "7": finding_block_policy, "9": finding_headline,
         "8": partial(open_question, options={"scaled": "tied unscaled head", "scaled-untied": "untied scaled head"})}


def render(results: dict[str, Any], figures: str) -> str:
    """The whole report as Markdown; ``figures`` is the plots' folder relative to the report."""
    rules = {**RULES, "6": partial(finding_lr, high_wd=results["high_wd"])}
    findings = [{"number": n, "title": title, "claim": claim, "figure": figure,
                 "parts": [(PART_NAMES[k], finding_budget(results[k]) if k == "lm-budget" else rules[n](results[k]))
                           for k in keys if results.get(k) is not None]}
                for n, title, claim, figure, keys in FINDINGS]
    parts = {k: results[k] for k in ("lm", "vit") if results.get(k)}
    return render_template("repro", **results, findings=findings, parts=parts, figures=figures,
                           part_names=PART_NAMES) + "\n"


# --- figures --------------------------------------------------------------------------------------------

DPI = 72
CURVES = {"scaling": "scaling on / off", "reordering": "neuron order", "block-policy": "which blocks to drop",
          "tied-head": "tied or untied head", "headline": "subclone vs random init"}  # comparison -> title


def draw_all(results: dict[str, Any], folder: Path) -> None:
    """Every figure the report links (one small PNG per finding), into ``folder``."""
    parts = [(PART_NAMES[k], results[k]) for k in ("lm", "vit") if results.get(k)]
    _figure(folder / "rel_magnitude.png", parts, _rel_magnitude)
    _figure(folder / "block_removal.png", parts, _block_removal)
    _figure(folder / "consistency.png", parts, _consistency, 4, 3.4, per_part=4)
    _figure(folder / "lr.png", parts, _lr_sweep)
    for comparison, title in CURVES.items():
        if compared := [(n, p) for n, p in parts if comparison in p["training"]["comparisons"]]:
            _figure(folder / f"{comparison.replace('-', '_')}.png", compared, partial(_curves, comparison, title),
                   5.2, 3.5)


def _figure(path: Path, parts: list[tuple[str, dict]], draw: Callable[[Any, str, dict], None], width: float = 4.6,
           height: float = 3.2, per_part: int = 1) -> None:
    """A panel per part side by side, drawn by ``draw(ax, part name, part)``; or a row of ``per_part`` panels
    per part, ``draw`` given the row."""
    fig, axes = panels(per_part, width, height, len(parts)) if per_part > 1 else panels(len(parts), width, height)
    for ax, (name, part) in zip(axes if per_part > 1 else axes[0], parts):
        draw(ax, name, part)
    save_figure(fig, path, DPI)


def _rel_magnitude(ax: Any, name: str, part: dict) -> None:
    for seed, values in part["analysis"]["rel_magnitude"].items():
        ax.plot(range(len(values)), values, marker=".", label=f"calibration seed {seed}")
    finish(ax, title=f"{name}: relative magnitude", xlabel="block", ylabel="||f(x)|| / ||x + f(x)||")


def _block_removal(ax: Any, name: str, part: dict) -> None:
    """Each block's removal cost as a bar, the blocks the default (magnitude) policy removes in orange."""
    abl = part["analysis"]["ablation"]
    image = "accuracies" in abl
    values, base = (abl["accuracies"], abl["base_accuracy"]) if image else (abl["losses"], abl["base"])
    removed = next((r["removed_blocks"] for r in part["step0"] if r["arm"] == "subclone"
                    and r["shape"] == part["training"]["shape_key"]), None) or []
    ax.bar(range(len(values)), values, color=["tab:orange" if i in removed else "tab:blue" for i in range(len(values))])
    ax.axhline(base, color="black", linestyle="--", linewidth=1, label="intact parent")
    ax.set(title=f"{name}: one block removed", xlabel="block removed",
           ylabel=f"validation {'accuracy' if image else 'loss'}")
    if not image:
        ax.set_ylim(bottom=min(values + [base]) * 0.9)
    ax.legend(fontsize=7, title="orange: removed by 'magnitude'" if removed else None, title_fontsize=7)


def _consistency(row: Any, name: str, part: dict) -> None:
    """Two block-vs-block scatters, the rank correlation matrix, the sorted shared residual scores."""
    a = part["analysis"]
    for ax, pair in zip(row[:2], a["scatter"] + a["scatter"][:1] * (2 - len(a["scatter"]))):
        ax.scatter(pair["x"], pair["y"], s=4, alpha=0.5)
        ax.set(title=f"{name}: block {pair['a']} vs {pair['b']} (Spearman {pair['spearman']:.2f})", xscale="log",
               xlabel=f"|output| of block {pair['a']}", ylabel=f"|output| of block {pair['b']}", yscale="log")
    row[2].figure.colorbar(row[2].imshow(a["rank_corr"], vmin=-1, vmax=1, cmap="RdBu_r"), ax=row[2], fraction=0.046)
    row[2].set(title=f"{name}: rank correlation", xlabel="block", ylabel="block")
    row[3].plot(range(1, len(a["residual_sorted"]) + 1), a["residual_sorted"])
    row[3].set(title=f"{name}: shared residual scores, sorted", xlabel="rank", ylabel="score", xscale="log",
               yscale="log")
    row[3].grid(alpha=0.3)
    for ax in row:
        ax.title.set_fontsize(9)


def _curves(comparison: str, title: str, ax: Any, name: str, part: dict) -> None:
    """Validation curves of the arms one comparison names; second-seed runs dashed."""
    t = part["training"]
    for i, arm in enumerate(t["comparisons"][comparison]):
        for seed, run in t["runs"].get(arm, {}).items():
            if run["values"]:
                first = seed == "0"
                ax.plot(run["steps"], run["values"], color=f"C{i}", linestyle="-" if first else "--",
                        marker="." if first else None,
                        label=f"{arm} (lr {run['lr']:g})" + ("" if first else f", seed {seed}"))
    if comparison == "headline" and "random" in t["runs"]:
        ax.axhline(t["runs"]["random"]["0"]["best"], color="grey", linestyle=":", linewidth=1,
                   label="random init's best")
    if t["metric"] == "loss":
        ax.set_ylim(top=min(12.0, ax.get_ylim()[1]))
    finish(ax, title=f"{name}: {title}", xlabel="step", ylabel=f"validation {t['metric']}")


def _lr_sweep(ax: Any, name: str, part: dict) -> None:
    """Best value per learning rate of each swept arm, seed 0; the high weight decay run as a red cross."""
    t = part["training"]
    for arm in t["swept"]:
        if points := sorted(sweep_values(part, arm).items()):
            decay = t["runs"].get(arm, {}).get("0", {}).get("weight_decay")
            ax.plot(*zip(*points), marker="o", label=arm if decay is None else f"{arm}, weight decay {decay:g}")
    for lr, best in sweep_values(part, "subclone-wd").items():
        ax.scatter([lr], [best], marker="x", color="red", zorder=3, label=t["labels"]["subclone-wd"])
    finish(ax, title=f"{name}: best validation {t['metric']} per learning rate", xlabel="peak learning rate",
           ylabel=f"best validation {t['metric']}", xscale="log")
